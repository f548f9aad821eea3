"""`pllcli featurize`, `merge` and `info`: inputs, bad files, shards, resume, reports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sf = pytest.importorskip("soundfile")

from pllcli.cli.app import app  # noqa: E402
from pllcli.cli.errors import run_app  # noqa: E402
from pllcli.features.config import FeatureConfig  # noqa: E402
from pllcli.features.store import FeatureStore  # noqa: E402

SR = 8000


def _wave(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.2 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)


def cli(*args):
    return run_app(app, [str(a) for a in args])


@pytest.fixture
def corpus(tmp_path):
    """8 good clips (one 16 kHz stereo flac, one nested) + manifest with a speaker column."""
    d = tmp_path / "audio"
    (d / "sub").mkdir(parents=True)
    rows = []
    for i in range(8):
        n = 600 + 523 * i
        if i == 3:
            p = d / "sub" / f"c{i}.flac"
            x = np.stack([_wave(2 * n, i), _wave(2 * n, i)], 1)
            sf.write(p, x, 2 * SR)
        else:
            p = d / f"c{i}.wav"
            sf.write(p, _wave(n, i), SR, subtype="PCM_16")
        rows.append((f"c{i}", os.path.relpath(p, tmp_path), f"spk{i % 2}"))
    man = tmp_path / "m.csv"
    man.write_text("id,path,speaker\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return tmp_path, man, d


def _same_store(a, b):
    fa, fb = FeatureStore(a), FeatureStore(b)
    np.testing.assert_array_equal(fa.ids, fb.ids)
    np.testing.assert_array_equal(fa.offsets, fb.offsets)
    np.testing.assert_array_equal(fa.paths, fb.paths)
    np.testing.assert_array_equal(fa.durations, fb.durations)
    np.testing.assert_array_equal(fa.load_all()[0], fb.load_all()[0])
    assert fa.meta_columns == fb.meta_columns
    for c in fa.meta_columns:
        np.testing.assert_array_equal(fa.meta(c), fb.meta(c))
    assert fa.config_hash == fb.config_hash


def test_featurize_manifest_values_meta_report(corpus, capsys):
    root, man, d = corpus
    out, rep = root / "f.h5", root / "r.json"
    assert cli("featurize", man, out, "--report", rep, "--chunk-size", "3") == 0
    fs = FeatureStore(out)
    assert list(fs.ids) == [f"c{i}" for i in range(8)]
    assert list(fs.meta("speaker")) == ["spk0", "spk1"] * 4
    c = FeatureConfig.preset("speech8k")
    assert fs.config == c
    fe = c.make_frontend()
    for i in (0, 5):  # values equal the frontend on the decoded audio
        x = sf.read(fs.paths[i], dtype="float32")[0]
        ref = fe(torch.from_numpy(x)[None])[0].numpy()
        np.testing.assert_allclose(fs[i], ref, atol=1e-4)
    # the 16 kHz stereo flac was mixed down and resampled to 8 kHz
    assert fs.num_frames[3] == c.num_frames(600 + 523 * 3)
    assert abs(fs.durations[3] - (600 + 523 * 3) / SR) < 1e-6
    assert fs.paths[3] == str(d / "sub" / "c3.flac")
    r = json.loads(rep.read_text())
    assert r["files_done"] == 8 and r["files_skipped"] == 0
    assert abs(r["audio_seconds"] - sum((600 + 523 * i) / SR for i in range(8))) < 1e-3
    assert r["x_real_time"] > 0
    err = capsys.readouterr().err
    assert "featurized 8 files (0 skipped)" in err and "x real time" in err
    # existing output is refused without --overwrite
    assert cli("featurize", man, out) == 2
    assert "already exists" in capsys.readouterr().err


def test_featurize_directory_and_stdin(corpus):
    root, man, d = corpus
    assert cli("featurize", d, root / "d.h5", "--preset", "fbank8k") == 0
    fs = FeatureStore(root / "d.h5")
    assert list(fs.ids) == [f"c{i}" for i in range(8) if i != 3] + ["sub/c3"]
    assert fs.config.frontend == "fbank" and fs.feature_dim == 40 and fs.meta_columns == []
    # stdin manifest (JSONL): relative paths resolve against the working directory
    lines = "".join(json.dumps({"id": f"c{i}", "path": f"c{i}.wav"}) + "\n" for i in (0, 1))
    p = subprocess.run([sys.executable, "-m", "pllcli", "-q", "featurize", "-", str(root / "s.h5")], input=lines,
                       text=True, capture_output=True, cwd=d, timeout=300)
    assert p.returncode == 0, p.stderr
    s = FeatureStore(root / "s.h5")
    assert list(s.ids) == ["c0", "c1"]
    c = FeatureConfig.preset("speech8k")
    np.testing.assert_array_equal(s.num_frames, [c.num_frames(n) for n in (600, 1123)])
    x = sf.read(d / "c1.wav", dtype="float32")[0]
    np.testing.assert_array_equal(s.get("c1"), c.make_frontend()(torch.from_numpy(x)[None])[0].numpy())


def test_bad_inputs_are_skipped_with_reasons(corpus, capsys):
    root, man, d = corpus
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.wav").write_bytes(b"")
    good = (d / "c1.wav").read_bytes()
    (bad / "trunc.wav").write_bytes(good[: len(good) // 2])
    (bad / "text.wav").write_text("id,path\nthis is not audio\n")
    sf.write(bad / "zero.wav", np.zeros((0, 1), np.float32), SR)
    x = _wave(1000, 1)
    x[10], x[20] = np.nan, np.inf
    sf.write(bad / "nan.wav", x, SR, subtype="FLOAT")
    sf.write(bad / "ch4.wav", np.stack([_wave(800, 2)] * 4, 1), SR)
    sf.write(bad / "silent.wav", np.zeros(1600, np.float32), SR)
    (bad / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    names = ["missing", "empty", "trunc", "text", "zero", "nan", "ch4", "corrupt"]
    paths = {n: f"bad/{n}.wav" for n in names}
    paths["corrupt"] = "bad/corrupt.flac"
    rows = ["id,path", "ok0,audio/c0.wav"] + [f"{n},{paths[n]}" for n in names] + \
        ["silent,bad/silent.wav", "ok0,audio/c1.wav", "ok1,audio/c1.wav"]
    m = root / "bad.csv"
    m.write_text("\n".join(rows) + "\n")
    rep = root / "bad.json"
    assert cli("featurize", m, root / "b.h5", "--report", rep, "--chunk-size", "4") == 0
    fs = FeatureStore(root / "b.h5")
    assert list(fs.ids) == ["ok0", "silent", "ok1"]
    r = json.loads(rep.read_text())
    reasons = {s["id"] + "@" + str(s["line"]): s["reason"] for s in r["skipped"]}
    assert reasons == {
        "missing@3": "missing_file", "empty@4": "empty_file", "trunc@5": "truncated", "text@6": "not_audio",
        "zero@7": "no_samples", "nan@8": "non_finite", "ch4@9": "too_many_channels", "corrupt@10": "corrupt",
        "ok0@12": "duplicate_id"}
    assert r["files_skipped"] == 9 and r["skipped_by_reason"]["duplicate_id"] == 1
    assert [w["id"] for w in r["warnings"]] == ["silent"] and r["warnings"][0]["kind"] == "silent"
    err = capsys.readouterr().err
    assert "all samples are zero" in err and "9 skipped" in err
    # --strict turns the first skip into a failure, no output store
    assert cli("featurize", m, root / "s.h5", "--strict") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "duplicate id 'ok0'" in err and "Traceback" not in err
    m2 = root / "bad2.csv"
    m2.write_text("id,path\nok0,audio/c0.wav\nnan,bad/nan.wav\n")
    assert cli("featurize", m2, root / "s.h5", "--strict") == 1
    err = capsys.readouterr().err
    assert f"{m2}:3: nan: non_finite" in err and len(err.strip().splitlines()) == 1
    assert not (root / "s.h5").exists()


@pytest.mark.parametrize("header,col", [("name,path", "id"), ("id,file", "path")])
def test_manifest_missing_column_is_one_line_error(tmp_path, header, col):
    m = tmp_path / "m.csv"
    m.write_text(header + "\na,b.wav\n")
    p = subprocess.run([sys.executable, "-m", "pllcli", "featurize", str(m), str(tmp_path / "o.h5")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(m) in lines[0] and f"missing column '{col}'" in lines[0], p.stderr
    assert not (tmp_path / "o.h5").exists()


def test_shards_merged_equal_single_run_and_jobs(corpus, capsys):
    root, man, d = corpus
    single = root / "single.h5"
    assert cli("featurize", man, single, "--chunk-size", "2") == 0
    parts = []
    for i in (2, 0, 1):
        p = root / f"part{i}.h5"
        assert cli("featurize", man, p, "--shard", f"{i}/3", "--chunk-size", "2", "--jobs", "2") == 0
        assert FeatureStore(p).attrs["shard"] == f"{i}/3"
        parts.append(p)
    assert sum(len(FeatureStore(p)) for p in parts) == 8
    assert cli("merge", root / "merged.h5", *parts) == 0
    _same_store(single, root / "merged.h5")
    # jobs 2 gives the same store as jobs 1
    assert cli("featurize", man, root / "j2.h5", "--jobs", "2", "--chunk-size", "1") == 0
    _same_store(single, root / "j2.h5")
    # merge refuses an incomplete set and mixed formats
    capsys.readouterr()
    assert cli("merge", root / "bad.h5", parts[0], parts[1]) == 1
    assert "missing shard(s) 1/3" in capsys.readouterr().err
    (root / "x.h5").write_text("not hdf5")
    assert cli("merge", root / "bad.h5", parts[0], root / "x.h5") == 1
    assert "x.h5: not a readable" in capsys.readouterr().err


def test_cli_chunk_size_default_is_the_librarys():
    from pllcli.cli import featurize as cmd
    from pllcli.features.extract import DEFAULT_CHUNK
    assert cmd._DEFAULT_CHUNK == DEFAULT_CHUNK


def test_resume_after_kill_9(corpus):
    root, man, d = corpus
    out = root / "k.h5"
    env = dict(os.environ, PLLCLI_TEST_KILL_AFTER_CHUNKS="2")
    p = subprocess.run([sys.executable, "-m", "pllcli", "-q", "featurize", str(man), str(out), "--chunk-size", "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()  # never a store that looks complete
    parts = sorted(x.name for x in (root / "k.h5.parts").glob("part-*.npys"))
    assert parts == ["part-000000.npys", "part-000001.npys"]
    rep = root / "k.json"
    assert cli("featurize", man, out, "--chunk-size", "2", "--report", rep) == 0
    r = json.loads(rep.read_text())
    assert r["chunks_resumed"] == 2 and r["files_resumed"] == 4 and r["files_done"] == 8
    assert not (root / "k.h5.parts").exists()
    assert cli("featurize", man, root / "clean.h5", "--chunk-size", "2") == 0
    _same_store(out, root / "clean.h5")


def _processes_naming(path) -> list[str]:
    """pids whose command line holds `path` (a forked worker keeps its parent's command line)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if str(path).encode() in cmd:
            found.append(pid)
    return found


def _featurize_with_hook(man, out, hook, *opts, **run_kw):
    """`pllcli featurize MAN OUT --chunk-size 1 --jobs 2 OPTS` in a subprocess with the test
    hook PLLCLI_TEST_KILL_AFTER_CHUNKS=hook."""
    env = dict(os.environ, PLLCLI_TEST_KILL_AFTER_CHUNKS=hook)
    return subprocess.run([sys.executable, "-m", "pllcli", "featurize", str(man), str(out), "--chunk-size", "1",
                           "--jobs", "2", *opts], env=env, capture_output=True, text=True, timeout=300, **run_kw)


def _resume_equals_clean(man, out) -> dict:
    """Rerun into OUT (2 jobs), check it equals a clean 1-job run; the rerun's report."""
    rep, clean = out.with_suffix(".json"), out.with_name(out.stem + "_clean.h5")
    assert cli("featurize", man, out, "--chunk-size", "1", "--jobs", "2", "--report", rep) == 0
    assert cli("featurize", man, clean, "--chunk-size", "1") == 0
    _same_store(out, clean)
    return json.loads(rep.read_text())


def test_kill_9_of_the_parent_stops_its_worker_and_resumes(corpus):
    import time
    root, man, d = corpus
    out = root / "k2.h5"
    p = _featurize_with_hook(man, out, "2")
    assert p.returncode == -signal.SIGKILL, p.stderr
    deadline = time.time() + 30  # the orphaned worker notices after its current chunk
    while _processes_naming(out) and time.time() < deadline:
        time.sleep(0.05)
    assert _processes_naming(out) == [] and not out.exists()
    assert _resume_equals_clean(man, out)["chunks_resumed"] >= 2


def test_ctrl_c_with_workers_keeps_the_journal_and_leaves_no_process(corpus):
    root, man, d = corpus
    out = root / "int.h5"
    # "3:INT": after 3 chunks the parent sends SIGINT to its process group, as a terminal's Ctrl-C;
    # its own session keeps that SIGINT away from pytest
    p = _featurize_with_hook(man, out, "3:INT", start_new_session=True)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in p.stderr
    assert not out.exists()
    parts = list((root / "int.h5.parts").glob("part-*.npys"))
    assert len(parts) >= 3
    assert _processes_naming(out) == []  # no worker left behind
    r = _resume_equals_clean(man, out)
    assert r["chunks_resumed"] == len(parts) and r["files_done"] == 8


def test_stale_parts_are_redone(corpus):
    root, man, d = corpus
    out = root / "k.h5"
    env = dict(os.environ, PLLCLI_TEST_KILL_AFTER_CHUNKS="1")
    p = subprocess.run([sys.executable, "-m", "pllcli", "-q", "featurize", str(man), str(out), "--chunk-size", "4",
                        "--n-mels", "40"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    # rerun with other settings: the old part must not leak into the new store
    rep = root / "r.json"
    assert cli("featurize", man, out, "--chunk-size", "4", "--report", rep) == 0
    assert json.loads(rep.read_text())["chunks_resumed"] == 0
    assert FeatureStore(out).feature_dim == 64


def test_info_table_and_json(corpus, capsys):
    root, man, d = corpus
    out = root / "f.h5"
    assert cli("featurize", man, out) == 0
    capsys.readouterr()
    assert cli("info", out, "--json") == 0
    j = json.loads(capsys.readouterr().out)
    fs = FeatureStore(out)
    assert j["kind"] == "feature store" and j["items"] == 8
    assert abs(j["total_duration_s"] - float(fs.durations.sum())) < 1e-3
    assert j["frames_per_item"] == {"min": int(fs.num_frames.min()), "mean": round(float(fs.num_frames.mean()), 2),
                                    "median": float(np.median(fs.num_frames)), "max": int(fs.num_frames.max())}
    assert j["feature_config"]["n_mels"] == 64 and j["meta_columns"] == ["speaker"]
    assert cli("info", out) == 0
    o = capsys.readouterr().out
    assert "total_duration_s" in o and "frames_per_item" in o
    (root / "z.bin").write_bytes(b"\x00\x01garbage")
    assert cli("info", root / "z.bin") == 1
    assert "not a pllcli feature store, label store or checkpoint" in capsys.readouterr().err
    import h5py
    with h5py.File(root / "u.h5", "w") as f:
        f.attrs["format"] = "something-else"
    assert cli("info", root / "u.h5") == 1
    assert "unknown format 'something-else'" in capsys.readouterr().err


def test_strict_also_checks_resumed_chunks(corpus, capsys):
    root, man, d = corpus
    (root / "empty.wav").write_bytes(b"")
    m = root / "e.csv"
    m.write_text("id,path\nc0,audio/c0.wav\nbad,empty.wav\nc1,audio/c1.wav\nc2,audio/c2.wav\n")
    out = root / "e.h5"
    env = dict(os.environ, PLLCLI_TEST_KILL_AFTER_CHUNKS="1")
    p = subprocess.run([sys.executable, "-m", "pllcli", "-q", "featurize", str(m), str(out), "--chunk-size", "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert cli("featurize", m, out, "--chunk-size", "2", "--strict") == 1
    assert f"{m}:3: bad: empty_file" in capsys.readouterr().err
    assert not out.exists()
    assert cli("featurize", m, out, "--chunk-size", "2") == 0
    assert list(FeatureStore(out).ids) == ["c0", "c1", "c2"]


def test_config_overrides_on_the_command_line(corpus, capsys):
    root, man, d = corpus
    assert cli("featurize", man, root / "o.h5", "--sample-rate", "4000", "--n-mels", "32", "--dtype", "float16") == 0
    fs = FeatureStore(root / "o.h5")
    c = fs.config
    assert (c.sample_rate, c.fmax, c.n_mels, c.dtype, fs.dtype) == (4000, 2000.0, 32, "float16", "float16")
    assert fs.num_frames[0] == c.num_frames(300)  # 600 samples at 8 kHz -> 300 at 4 kHz
    assert cli("featurize", man, root / "k.h5", "--preset", "fbank8k", "--win-length", "400") == 0
    assert FeatureStore(root / "k.h5").config.n_fft == 512
    capsys.readouterr()
    assert cli("featurize", man, root / "x.h5", "--preset", "speech9k") == 2
    assert "unknown feature preset 'speech9k'" in capsys.readouterr().err
    assert cli("featurize", man, root / "x.h5", "--fmax", "9000") == 2
    assert "fmax" in capsys.readouterr().err


def test_info_and_merge_dispatch_on_format(tmp_path, monkeypatch, capsys):
    import h5py

    import pllcli.checkpoint
    import pllcli.labels.store
    calls = []
    monkeypatch.setattr(pllcli.labels.store, "describe", lambda p: {"n": 3, "path": str(p)})
    monkeypatch.setattr(pllcli.labels.store, "merge_label_stores", lambda out, parts: calls.append((out, parts)))
    monkeypatch.setattr(pllcli.checkpoint, "describe", lambda p: {"classes": 2})
    for name in ("a.h5", "b.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            f.attrs["format"] = "pllcli-labels"
    assert cli("info", tmp_path / "a.h5", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "label store", "n": 3, "path": str(tmp_path / "a.h5")}
    (tmp_path / "m.pt").write_bytes(b"PK\x03\x04rest")
    assert cli("info", tmp_path / "m.pt", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "checkpoint", "classes": 2}
    assert cli("merge", tmp_path / "o.h5", tmp_path / "a.h5", tmp_path / "b.h5") == 0
    assert calls == [(str(tmp_path / "o.h5"), [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")])]
