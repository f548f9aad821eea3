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


def _np_features(c, x):
    """(T, F) features of one clip by featurize's numpy frontend (what the store must hold bitwise)."""
    from pllcli.features.np_frontend import build_np_frontend
    return build_np_frontend(c)(x[None])[0]


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


# `pllcli ARGS...` in a fresh process whose featurize stops itself after AFTER chunks are in
# its output, through featurize's on_chunk callback: "KILL" sends SIGKILL to itself (kill -9),
# "INT" SIGINT to its process group (a terminal's Ctrl-C).
_STOPPER = """
import os, signal, sys
import pllcli.features.extract as X
after, how = int(sys.argv[1]), sys.argv[2]
real = X.featurize

def stopping(*a, **k):
    seen = []

    def on_chunk(c):
        seen.append(c)
        if len(seen) == after:
            if how == "INT":
                os.killpg(os.getpgid(0), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, on_chunk=on_chunk, **k)

X.featurize = stopping
from pllcli.cli.app import main
main(sys.argv[3:])
"""


def _featurize_stopping(after, how, *args, **run_kw):
    return subprocess.run([sys.executable, "-c", _STOPPER, str(after), how, *map(str, args)],
                          capture_output=True, text=True, timeout=300, **run_kw)


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
    assert cli("featurize", man, "-o", out, "--json", rep, "--chunk-size", "3") == 0
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
    out_text = capsys.readouterr().out
    assert "featurized 8 files (0 skipped)" in out_text and f"x real time -> {out}" in out_text
    # existing output is refused without --overwrite
    assert cli("featurize", man, "-o", out) == 2
    assert "already exists" in capsys.readouterr().err


def test_featurize_directory_and_stdin(corpus):
    root, man, d = corpus
    assert cli("featurize", d, "-o", root / "d.h5", "--preset", "fbank8k") == 0
    fs = FeatureStore(root / "d.h5")
    assert list(fs.ids) == [f"c{i}" for i in range(8) if i != 3] + ["sub/c3"]
    assert fs.config.frontend == "fbank" and fs.feature_dim == 40 and fs.meta_columns == []
    # stdin manifest (JSONL): relative paths resolve against the working directory
    lines = "".join(json.dumps({"id": f"c{i}", "path": f"c{i}.wav"}) + "\n" for i in (0, 1))
    p = subprocess.run([sys.executable, "-m", "pllcli", "-q", "featurize", "-", "-o", str(root / "s.h5")], input=lines,
                       text=True, capture_output=True, cwd=d, timeout=300)
    assert p.returncode == 0, p.stderr
    s = FeatureStore(root / "s.h5")
    assert list(s.ids) == ["c0", "c1"]
    c = FeatureConfig.preset("speech8k")
    np.testing.assert_array_equal(s.num_frames, [c.num_frames(n) for n in (600, 1123)])
    x = sf.read(d / "c1.wav", dtype="float32")[0]
    np.testing.assert_array_equal(s.get("c1"), _np_features(c, x))
    np.testing.assert_allclose(s.get("c1"), c.make_frontend()(torch.from_numpy(x)[None])[0].numpy(), atol=1e-4)


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
    assert cli("featurize", m, "-o", root / "b.h5", "--json", rep, "--chunk-size", "4") == 0
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
    cap = capsys.readouterr()
    assert "all samples are zero" in cap.err and "9 skipped" in cap.out
    # --strict turns the first skip into a failure, no output store
    assert cli("featurize", m, "-o", root / "s.h5", "--strict") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "duplicate id 'ok0'" in err and "Traceback" not in err
    m2 = root / "bad2.csv"
    m2.write_text("id,path\nok0,audio/c0.wav\nnan,bad/nan.wav\n")
    assert cli("featurize", m2, "-o", root / "s.h5", "--strict", "-p", "speech8k") == 1  # -p: no auto notice
    err = capsys.readouterr().err
    assert f"{m2}:3: nan: non_finite" in err and len(err.strip().splitlines()) == 1
    assert not (root / "s.h5").exists()


@pytest.mark.parametrize("header,col", [("name,path", "id"), ("id,file", "path")])
def test_manifest_missing_column_is_one_line_error(tmp_path, header, col):
    m = tmp_path / "m.csv"
    m.write_text(header + "\na,b.wav\n")
    p = subprocess.run([sys.executable, "-m", "pllcli", "featurize", str(m), "-o", str(tmp_path / "o.h5")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(m) in lines[0] and f"missing column '{col}'" in lines[0], p.stderr
    assert not (tmp_path / "o.h5").exists()


def test_shards_merged_equal_single_run_and_jobs(corpus, capsys):
    root, man, d = corpus
    single = root / "single.h5"
    assert cli("featurize", man, "-o", single, "--chunk-size", "2") == 0
    parts = []
    for i in (2, 0, 1):
        p = root / f"part{i}.h5"
        assert cli("featurize", man, "-o", p, "--shard", f"{i}/3", "--chunk-size", "2", "--jobs", "2") == 0
        assert FeatureStore(p).attrs["shard"] == f"{i}/3"
        parts.append(p)
    assert sum(len(FeatureStore(p)) for p in parts) == 8
    assert cli("merge", "-o", root / "merged.h5", *parts) == 0
    _same_store(single, root / "merged.h5")
    # jobs 2 gives the same store as jobs 1
    assert cli("featurize", man, "-o", root / "j2.h5", "--jobs", "2", "--chunk-size", "1") == 0
    _same_store(single, root / "j2.h5")
    # merge refuses an incomplete set and mixed formats
    capsys.readouterr()
    assert cli("merge", "-o", root / "bad.h5", parts[0], parts[1]) == 1
    assert "missing shard(s) 1/3" in capsys.readouterr().err
    (root / "x.h5").write_text("not hdf5")
    assert cli("merge", "-o", root / "bad.h5", parts[0], root / "x.h5") == 1
    assert "x.h5: not a readable" in capsys.readouterr().err


def test_cli_chunk_size_default_is_the_librarys():
    from pllcli.cli import featurize as cmd
    from pllcli.features.extract import DEFAULT_CHUNK
    assert cmd._DEFAULT_CHUNK == DEFAULT_CHUNK


def test_resume_after_kill_9(corpus):
    root, man, d = corpus
    out = root / "k.h5"
    p = _featurize_stopping(2, "KILL", "-q", "featurize", man, "-o", out, "--chunk-size", "2")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists()  # never a store that looks complete
    parts = sorted(x.name for x in (root / "k.h5.parts").glob("part-*.npys"))
    assert parts == ["part-000000.npys", "part-000001.npys"]
    rep = root / "k.json"
    assert cli("featurize", man, "-o", out, "--chunk-size", "2", "--json", rep) == 0
    r = json.loads(rep.read_text())
    assert r["chunks_resumed"] == 2 and r["files_resumed"] == 4 and r["files_done"] == 8
    assert not (root / "k.h5.parts").exists()
    assert cli("featurize", man, "-o", root / "clean.h5", "--chunk-size", "2") == 0
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


def _featurize_with_hook(man, out, after, how, **run_kw):
    """`pllcli featurize MAN OUT --chunk-size 1 --jobs 2` in a subprocess that stops itself after
    `after` chunks (see _STOPPER)."""
    return _featurize_stopping(after, how, "featurize", man, "-o", out, "--chunk-size", "1", "--jobs", "2", **run_kw)


def _resume_equals_clean(man, out) -> dict:
    """Rerun into OUT (2 jobs), check it equals a clean 1-job run; the rerun's report."""
    rep, clean = out.with_suffix(".json"), out.with_name(out.stem + "_clean.h5")
    assert cli("featurize", man, "-o", out, "--chunk-size", "1", "--jobs", "2", "--json", rep) == 0
    assert cli("featurize", man, "-o", clean, "--chunk-size", "1") == 0
    _same_store(out, clean)
    return json.loads(rep.read_text())


def test_kill_9_of_the_parent_stops_its_worker_and_resumes(corpus):
    import time
    root, man, d = corpus
    out = root / "k2.h5"
    p = _featurize_with_hook(man, out, 2, "KILL")
    assert p.returncode == -signal.SIGKILL, p.stderr
    deadline = time.time() + 30  # the orphaned worker notices after its current chunk
    while _processes_naming(out) and time.time() < deadline:
        time.sleep(0.05)
    assert _processes_naming(out) == [] and not out.exists()
    assert _resume_equals_clean(man, out)["chunks_resumed"] >= 2


def test_ctrl_c_with_workers_keeps_the_journal_and_leaves_no_process(corpus):
    root, man, d = corpus
    out = root / "int.h5"
    # after 3 chunks the parent sends SIGINT to its process group, as a terminal's Ctrl-C;
    # its own session keeps that SIGINT away from pytest
    p = _featurize_with_hook(man, out, 3, "INT", start_new_session=True)
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
    p = _featurize_stopping(1, "KILL", "-q", "featurize", man, "-o", out, "--chunk-size", "4", "--n-mels", "40")
    assert p.returncode == -signal.SIGKILL
    # rerun with other settings: the old part must not leak into the new store
    rep = root / "r.json"
    assert cli("featurize", man, "-o", out, "--chunk-size", "4", "--json", rep) == 0
    assert json.loads(rep.read_text())["chunks_resumed"] == 0
    assert FeatureStore(out).feature_dim == 64


def test_info_table_and_json(corpus, capsys):
    root, man, d = corpus
    out = root / "f.h5"
    assert cli("featurize", man, "-o", out) == 0
    capsys.readouterr()
    assert cli("info", out, "--json", "-") == 0
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
    p = _featurize_stopping(1, "KILL", "-q", "featurize", m, "-o", out, "--chunk-size", "2")
    assert p.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert cli("featurize", m, "-o", out, "--chunk-size", "2", "--strict") == 1
    assert f"{m}:3: bad: empty_file" in capsys.readouterr().err
    assert not out.exists()
    assert cli("featurize", m, "-o", out, "--chunk-size", "2") == 0
    assert list(FeatureStore(out).ids) == ["c0", "c1", "c2"]


def test_config_overrides_on_the_command_line(corpus, capsys):
    root, man, d = corpus
    assert cli("featurize", man, "-o", root / "o.h5", "--sample-rate", "4000", "--n-mels", "32", "--dtype", "float16") == 0
    fs = FeatureStore(root / "o.h5")
    c = fs.config
    assert (c.sample_rate, c.fmax, c.n_mels, c.dtype, fs.dtype) == (4000, 2000.0, 32, "float16", "float16")
    assert fs.num_frames[0] == c.num_frames(300)  # 600 samples at 8 kHz -> 300 at 4 kHz
    assert cli("featurize", man, "-o", root / "k.h5", "--preset", "fbank8k", "--win-length", "400") == 0
    assert FeatureStore(root / "k.h5").config.n_fft == 512
    capsys.readouterr()
    assert cli("featurize", man, "-o", root / "x.h5", "--preset", "speech9k") == 2
    err = capsys.readouterr().err
    assert "speech9k" in err and "speech16k" in err  # the choices are listed
    assert cli("featurize", man, "-o", root / "x.h5", "--fmax", "9000") == 2
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
    assert cli("info", tmp_path / "a.h5", "--json", "-") == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "label store", "n": 3, "path": str(tmp_path / "a.h5")}
    (tmp_path / "m.pt").write_bytes(b"PK\x03\x04rest")
    assert cli("info", tmp_path / "m.pt", "--json", "-") == 0
    assert json.loads(capsys.readouterr().out) == {"kind": "checkpoint", "classes": 2}
    assert cli("merge", "-o", tmp_path / "o.h5", tmp_path / "a.h5", tmp_path / "b.h5") == 0
    assert calls == [(str(tmp_path / "o.h5"), [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")])]


# ---------------------------------------------------------------- issue 14: resume, faults, locks

class _Stop(Exception):
    pass


def _interrupted(man, out, after, **kw):
    """An in-process featurize run stopped (by its on_chunk callback) after `after` chunks: its journal stays."""
    from pllcli.features.extract import featurize

    def stop(k, seen=[]):  # noqa: B006 - one list per call of _interrupted (a new default each def)
        seen.append(k)
        if len(seen) == after:
            raise _Stop
    with pytest.raises(_Stop):
        featurize(str(man), out, FeatureConfig.preset("speech8k"), chunk_size=2, progress=False, on_chunk=stop, **kw)
    assert not out.exists() and (out.parent / (out.name + ".parts")).is_dir()


def _bump(path, data: bytes | None = None):
    """Rewrite `path` (with `data`, else its own bytes) and move its mtime on."""
    data = path.read_bytes() if data is None else data
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_resume_redoes_a_file_replaced_since_the_interruption(corpus):
    root, man, d = corpus
    out = root / "r.h5"
    _interrupted(man, out, 2)  # chunks 0 (c0, c1) and 1 (c2, c3) are journaled
    sf.write(d / "c1.wav", _wave(4000, 11), SR, subtype="PCM_16")  # replaced: other samples, other size
    _bump(d / "c2.wav")  # same bytes, newer mtime: redone too (mtime is part of the key)
    rep = root / "r.json"
    assert cli("featurize", man, "-o", out, "--chunk-size", "2", "--json", rep) == 0
    r = json.loads(rep.read_text())
    assert (r["chunks_resumed"], r["chunks_redone"], r["files_changed"]) == (0, 2, 2)
    assert cli("featurize", man, "-o", root / "clean.h5", "--chunk-size", "2") == 0
    _same_store(out, root / "clean.h5")
    assert FeatureStore(out).num_frames[1] == FeatureConfig.preset("speech8k").num_frames(4000)


def test_resume_retries_a_file_fixed_since_the_interruption(corpus, capsys):
    root, man, d = corpus
    (root / "late.wav").write_text("not audio yet\n")
    m = root / "fix.csv"
    m.write_text("id,path\nlate,late.wav\nc0,audio/c0.wav\nc1,audio/c1.wav\nc2,audio/c2.wav\nc4,audio/c4.wav\n")
    out = root / "fix.h5"
    _interrupted(m, out, 2)
    sf.write(root / "late.wav", _wave(2000, 5), SR, subtype="PCM_16")
    _bump(root / "late.wav")
    rep = root / "fix.json"
    assert cli("featurize", m, "-o", out, "--chunk-size", "2", "--json", rep) == 0
    r = json.loads(rep.read_text())
    assert r["files_skipped"] == 0 and r["files_done"] == 5
    assert (r["chunks_resumed"], r["chunks_redone"], r["files_changed"]) == (1, 1, 1)
    cap = capsys.readouterr()
    assert "1 chunk(s) redone (1 file(s) changed since)" in cap.err and "1 redone (changed since)" in cap.out
    assert list(FeatureStore(out).ids) == ["late", "c0", "c1", "c2", "c4"]


def test_overwrite_is_a_fresh_run(corpus):
    root, man, d = corpus
    out = root / "o.h5"
    assert cli("featurize", man, "-o", out) == 0
    _interrupted(man, out.with_name("x.h5"), 1)
    import shutil
    shutil.move(root / "x.h5.parts", root / "o.h5.parts")  # a journal beside an existing store
    rep = root / "o.json"
    assert cli("featurize", man, "-o", out, "--chunk-size", "2", "--overwrite", "--json", rep) == 0
    r = json.loads(rep.read_text())
    assert r["chunks_resumed"] == 0 and r["files_done"] == 8
    assert not (root / "o.h5.parts").exists()


def _wav_with_rate_0(path):
    sf.write(path, _wave(1600, 3), SR, subtype="PCM_16")
    b = bytearray(path.read_bytes())
    assert b[24:28] == SR.to_bytes(4, "little")
    b[24:28] = bytes(4)
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sample_rate_0_is_a_bad_file(corpus, capsys, jobs):
    root, man, d = corpus
    _wav_with_rate_0(root / "sr0.wav")
    sf.write(root / "sr0_24.wav", _wave(1600, 3), SR, subtype="PCM_24")  # soundfile's path
    b = bytearray((root / "sr0_24.wav").read_bytes())
    b[24:28] = bytes(4)
    (root / "sr0_24.wav").write_bytes(bytes(b))
    m = root / "sr.csv"
    m.write_text("id,path\nc0,audio/c0.wav\nz,sr0.wav\nc1,audio/c1.wav\nz24,sr0_24.wav\n")
    rep = root / f"sr{jobs}.json"
    assert cli("featurize", m, "-o", root / f"sr{jobs}.h5", "--jobs", jobs, "--chunk-size", "1", "--json", rep) == 0
    r = json.loads(rep.read_text())
    assert {s["id"]: s["reason"] for s in r["skipped"]} == {"z": "corrupt", "z24": "corrupt"}
    assert list(FeatureStore(root / f"sr{jobs}.h5").ids) == ["c0", "c1"]
    capsys.readouterr()
    assert cli("featurize", m, "-o", root / f"st{jobs}.h5", "--jobs", jobs, "--chunk-size", "1", "--strict",
               "-p", "speech8k") == 1  # -p: no auto notice, the error alone
    err = capsys.readouterr().err
    assert f"{m}:3: z: corrupt (sample rate 0 in the header) in {root / 'sr0.wav'}" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_predict_audio_folder_skips_a_rate_0_wav(tmp_path, capsys):
    from pllcli.predict import features_for
    d = tmp_path / "new"
    d.mkdir()
    sf.write(d / "ok.wav", _wave(1600, 1), SR, subtype="PCM_16")
    _wav_with_rate_0(d / "bad.wav")
    store, summary = features_for(d, {"feature_config": FeatureConfig.preset("speech8k").to_dict()}, tmp_path)
    assert list(FeatureStore(store).ids) == ["ok"] and summary["skipped"][0]["reason"] == "corrupt"


def test_non_regular_files_are_refused(corpus):
    root, man, d = corpus
    os.mkfifo(root / "fifo.wav")
    m = root / "nr.csv"
    m.write_text(f"id,path\nc0,audio/c0.wav\nzero,/dev/zero\nfifo,fifo.wav\ndir,{d}\n")
    rep = root / "nr.json"
    assert cli("featurize", m, "-o", root / "nr.h5", "--json", rep) == 0
    r = json.loads(rep.read_text())
    assert {s["id"]: s["reason"] for s in r["skipped"]} == {"zero": "not_regular", "fifo": "not_regular",
                                                            "dir": "not_audio"}


def test_max_duration_cuts_and_reports(tmp_path, capsys):
    sf.write(tmp_path / "long.wav", _wave(3 * SR, 1), SR, subtype="PCM_16")
    sf.write(tmp_path / "longer.flac", _wave(3 * SR, 1), SR)  # soundfile's path
    sf.write(tmp_path / "short.wav", _wave(SR // 2, 2), SR, subtype="PCM_16")
    rep = tmp_path / "c.json"
    assert cli("featurize", tmp_path, "-o", tmp_path / "c.h5", "--max-duration", "1s", "--json", rep) == 0
    fs = FeatureStore(tmp_path / "c.h5")
    c = FeatureConfig.preset("speech8k")
    assert list(fs.ids) == ["long", "longer", "short"]
    assert fs.num_frames.tolist() == [c.num_frames(SR), c.num_frames(SR), c.num_frames(SR // 2)]
    np.testing.assert_allclose(fs.durations, [1.0, 1.0, 0.5])
    r = json.loads(rep.read_text())
    assert r["files_cut"] == 2 and {w["kind"] for w in r["warnings"]} == {"cut"}
    assert "cut to the first 1 s of 3 s" in r["warnings"][0]["detail"]
    # the cut features are the first second's
    x = sf.read(tmp_path / "long.wav", dtype="float32")[0][:SR]
    np.testing.assert_array_equal(fs.get("long"), _np_features(c, x))
    capsys.readouterr()
    assert cli("featurize", tmp_path, "-o", tmp_path / "d.h5", "--max-duration", "1.5m") == 0
    assert cli("featurize", tmp_path, "-o", tmp_path / "e.h5", "--max-duration", "soon") == 2
    assert "--max-duration" in capsys.readouterr().err


def test_disk_full_is_one_line_and_keeps_store_and_journal(corpus, capsys, monkeypatch):
    import errno

    from pllcli.features.store import FeatureStoreWriter
    root, man, d = corpus
    out = root / "full.h5"
    assert cli("featurize", man, "-o", out) == 0
    before = out.read_bytes()
    real, calls = FeatureStoreWriter.add_blocks, []

    def failing(self, blocks):
        calls.append(1)
        if len(calls) == 3:  # as h5py reports a write on a full disk
            raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, "
                                        "error message = 'No space left on device')")
        return real(self, blocks)
    monkeypatch.setattr(FeatureStoreWriter, "add_blocks", failing)
    capsys.readouterr()
    assert cli("featurize", man, "-o", out, "--overwrite", "--chunk-size", "2", "-p", "speech8k") == 1  # no notice
    err = capsys.readouterr().err
    line = err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"error: {out}: no space left on device (wrote ") \
        and line[0].endswith(" bytes)"), err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert out.read_bytes() == before  # the old store survives
    parts = sorted(p.name for p in (root / "full.h5.parts").glob("part-*.npys"))
    assert parts == ["part-000000.npys", "part-000001.npys"]  # the third write failed, after its part
    assert not list((root / "full.h5.parts").glob(".*.tmp"))  # the output's tmp is gone


def test_disk_full_while_journaling_names_the_short_write(corpus, capsys, monkeypatch):
    import pllcli.features.journal as J
    root, man, d = corpus

    def short(f, a, allow_pickle=False):
        raise OSError("764160 requested and 506651 written")

    class Full:
        f_bavail, f_frsize = 0, 4096
    monkeypatch.setattr(J.np.lib.format, "write_array", short)
    monkeypatch.setattr(J.os, "statvfs", lambda p: Full)
    assert cli("featurize", man, "-o", root / "j.h5", "-p", "speech8k") == 1  # -p: the error alone, no notice
    err = capsys.readouterr().err
    assert err.strip() == f"error: {root / 'j.h5'}: no space left on device (wrote 506651 of 764160 bytes)"
    assert not list((root / "j.h5.parts").glob(".*"))  # no half-written part


def test_a_second_run_on_one_output_is_refused(corpus, capsys):
    from pllcli.features.journal import lock_journal, unlock_journal
    root, man, d = corpus
    out = root / "l.h5"
    parts = root / "l.h5.parts"
    lock_journal(parts, str(out))  # as a run in progress holds it (another open file: flock conflicts)
    try:
        assert cli("featurize", man, "-o", out, "-p", "speech8k") == 1
        assert capsys.readouterr().err.strip() == f"error: another pllcli run is writing {out} (pid {os.getpid()})"
        assert not out.exists()
    finally:
        unlock_journal(parts, remove=True)
    assert not parts.exists()
    assert cli("featurize", man, "-o", out) == 0 and not parts.exists()


def test_output_that_is_a_directory_is_named_as_given(corpus, capsys):
    root, man, d = corpus
    (root / "outdir").mkdir()
    for extra in ((), ("--overwrite",)):
        assert cli("featurize", man, "-o", root / "outdir", *extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {root / 'outdir'}: is a directory") and ".tmp" not in err, err
    assert not (root / "outdir.parts").exists()


def test_corrupt_feature_config_and_label_store_in_the_features_place(corpus, capsys):
    import h5py
    root, man, d = corpus
    out = root / "c.h5"
    assert cli("featurize", man, "-o", out) == 0
    with h5py.File(out, "a") as f:
        f.attrs["feature_config"] = "{not json"
    from pllcli.errors import InputError
    with pytest.raises(InputError, match="corrupt feature_config attribute"):
        FeatureStore(out)
    capsys.readouterr()
    assert cli("info", out) == 1
    assert capsys.readouterr().err.strip() == f"error: {out}: corrupt feature_config attribute"
    for bad in ('["a list"]', '{"n_mels": -3}', '{"colour": 1}'):  # not an object; bad value; unknown field
        with h5py.File(out, "a") as f:
            f.attrs["feature_config"] = bad
        with pytest.raises(InputError, match=f"{out}: corrupt feature_config attribute"):
            FeatureStore(out)
    with h5py.File(root / "labels.h5", "w") as f:
        f.attrs["format"] = "pllcli-labels"
    with pytest.raises(InputError, match="labels.h5: this is a label store; pass it with --labels"):
        FeatureStore(root / "labels.h5")


# ---------------------------------------------------------------- issue 18: the grammar

def test_old_spellings_still_work_with_a_warning(corpus, capsys):
    root, man, d = corpus
    assert cli("featurize", man, root / "old.h5", "--report", root / "old.json") == 0
    cap = capsys.readouterr()
    assert "warning: the positional output of featurize is deprecated; use -o/--output" in cap.err
    assert json.loads((root / "old.json").read_text())["files_done"] == 8
    assert cli("featurize", man, "-o", root / "new.h5", "--json", "-") == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["files_done"] == 8 and "deprecated" not in cap.err
    assert "featurized 8 files" in cap.err  # the closing line moves to stderr when stdout carries the JSON
    _same_store(root / "old.h5", root / "new.h5")
    assert cli("featurize", man, root / "x.h5", "-o", root / "y.h5") == 2
    assert "give the output once" in capsys.readouterr().err
    assert cli("featurize", man) == 2
    assert "missing option -o/--output" in capsys.readouterr().err
    # merge: PART... -o OUT, and the old `merge OUT PART...`
    assert cli("merge", root / "m1.h5", root / "old.h5") == 0
    cap = capsys.readouterr()
    assert "deprecated" in cap.err and f"-> {root / 'm1.h5'}" in cap.out
    assert cli("merge", root / "new.h5", "-o", root / "m2.h5") == 0
    _same_store(root / "m1.h5", root / "m2.h5")
    # info --json FILE (the bare flag is now --json -)
    capsys.readouterr()
    assert cli("info", root / "m2.h5", "--json", root / "i.json") == 0
    assert json.loads((root / "i.json").read_text())["items"] == 8 and "items" in capsys.readouterr().out


def test_cli_choices_are_the_librarys():
    from pllcli.cli import featurize as cmd
    from pllcli.features import config as C
    assert [p.value for p in cmd.Preset] == [C.AUTO_PRESET, *C.PRESETS]
    # frontend "encoder" is chosen with --encoder SPEC, not --frontend
    assert tuple(f.value for f in cmd.Frontend) + ("encoder",) == C.FRONTENDS
    assert tuple(t.value for t in cmd.Dtype) == C.DTYPES
