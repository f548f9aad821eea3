"""featurize's fast start (issue 16) and default preset (issue 15): log-mel / fbank runs import no
torch; one audio file is an input; `--preset auto` follows the rates of the input's first files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

from pllcli.cli.app import app  # noqa: E402
from pllcli.cli.errors import run_app  # noqa: E402
from pllcli.features.config import FeatureConfig  # noqa: E402
from pllcli.features.store import FeatureStore  # noqa: E402


def cli(*args):
    return run_app(app, [str(a) for a in args])


def _write(path, sr, seconds=0.3, seed=0, **kw):
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * (300 + 40 * seed) * t) + 0.02 * rng.standard_normal(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, **kw)
    return path


def _folder(root, rates):
    for i, sr in enumerate(rates):
        _write(root / f"f{i:02d}.{'flac' if i % 5 == 4 else 'wav'}", sr, seed=i)
    return root


_PROBE = """
import sys
from pllcli.cli.app import main
sys.argv = ["pllcli", "-q", "featurize"] + sys.argv[1:]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
try:  # BLAS threads of the numpy featurize loaded (dev installs have threadpoolctl)
    from threadpoolctl import threadpool_info
    blas = sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
except ImportError:
    blas = [1]
print(json.dumps({"code": code, "loaded": sorted(m for m in ("torch", "torchaudio", "scipy", "rich")
                                                  if m in sys.modules), "blas_threads": blas}))
"""


@pytest.mark.parametrize("preset,jobs", [("speech8k", 1), ("fbank8k", 2), ("speech16k", 1), ("fbank16k", 2)])
def test_featurize_imports_no_torch(tmp_path, preset, jobs):
    # 8, 16 and 44.1 kHz files: decoding, resampling, the frontend, workers and the store, torch-free
    d = _folder(tmp_path / "a", [8000, 16000, 44100, 8000, 16000, 22050])
    out = tmp_path / "o.h5"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    p = subprocess.run([sys.executable, "-c", "import json\n" + _PROBE, str(d), "-o", str(out), "--preset", preset,
                        "--jobs", str(jobs), "--chunk-size", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    # no torch; one BLAS thread per process (OpenBLAS would otherwise spread each clip's matmul)
    assert r == {"code": 0, "loaded": [], "blas_threads": [1]}, (r, p.stderr)
    assert len(FeatureStore(out)) == 6


def test_featurize_store_matches_the_torch_frontend(tmp_path):
    torch = pytest.importorskip("torch")
    import torchaudio
    d = _folder(tmp_path / "a", [16000, 16000, 22050])
    for preset in ("speech16k", "fbank16k"):
        assert cli("-q", "featurize", d, "-o", tmp_path / f"{preset}.h5", "--preset", preset) == 0
        fs = FeatureStore(tmp_path / f"{preset}.h5")
        fe = FeatureConfig.preset(preset).make_frontend()
        for i, path in enumerate(fs.paths):
            x, sr = sf.read(path, dtype="float32")
            w = torch.from_numpy(x)[None]
            if sr != 16000:
                w = torchaudio.transforms.Resample(sr, 16000)(w)
            np.testing.assert_allclose(fs[i], fe(w)[0].numpy(), atol=1e-4, rtol=0)


def test_one_audio_file_is_an_input(tmp_path, capsys):
    wav = _write(tmp_path / "one.wav", 8000, seconds=0.5)
    assert cli("featurize", wav, "-o", tmp_path / "x.h5", "--json", tmp_path / "r.json") == 0
    fs = FeatureStore(tmp_path / "x.h5")
    assert list(fs.ids) == ["one"] and fs.paths[0] == str(wav.resolve()) and fs.config.sample_rate == 8000
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["input_kind"] == "file" and r["files_done"] == 1
    assert "featurized 1 files" in capsys.readouterr().out


def _auto(tmp_path, src, *extra, name="o.h5"):
    out = tmp_path / name
    rep = tmp_path / (name + ".json")
    assert cli("featurize", src, "-o", out, "--json", rep, *extra) == 0
    return FeatureStore(out), json.loads(rep.read_text())


def test_auto_preset_16k_input_picks_speech16k_with_a_notice(tmp_path, capsys):
    d = _folder(tmp_path / "a", [16000] * 10 + [48000] * 3)
    fs, r = _auto(tmp_path, d)
    assert fs.config.to_dict() == r["feature_config"] and r["feature_config"]["sample_rate"] == 16000
    assert fs.config.hash() == FeatureConfig.preset("speech16k").hash()
    assert r["preset_auto"]["preset"] == "speech16k" and sorted(set(r["preset_auto"]["rates"])) == [16000, 48000]
    err = capsys.readouterr().err
    notice = [ln for ln in err.splitlines() if "preset speech16k" in ln]
    assert len(notice) == 1, err
    assert "auto" in notice[0] and "16000 Hz" in notice[0] and "48000 Hz" in notice[0] and "--preset" in notice[0]


def test_auto_preset_8k_and_mixed_inputs_pick_speech8k(tmp_path, capsys):
    fs, r = _auto(tmp_path, _folder(tmp_path / "a", [8000] * 4), name="a.h5")
    assert fs.config.sample_rate == 8000 and r["preset_auto"]["preset"] == "speech8k"
    assert "preset speech8k" in capsys.readouterr().err
    # one 8 kHz file among the first 16 is enough: speech8k, and the notice says why
    fs, r = _auto(tmp_path, _folder(tmp_path / "b", [16000] * 6 + [8000] + [16000] * 3), name="b.h5")
    assert fs.config.sample_rate == 8000 and r["preset_auto"]["preset"] == "speech8k"
    err = capsys.readouterr().err
    assert "below 16 kHz" in err and "8000 Hz x1" in err and "16000 Hz x9" in err
    # only the first 16 files count: an 8 kHz file after them changes nothing
    fs, r = _auto(tmp_path, _folder(tmp_path / "c", [16000] * 16 + [8000]), name="c.h5")
    assert fs.config.sample_rate == 16000 and r["preset_auto"]["files"] == 16 and len(fs) == 17


def test_explicit_preset_and_overrides(tmp_path, capsys):
    d = _folder(tmp_path / "a", [16000] * 3)
    fs, r = _auto(tmp_path, d, "--preset", "speech8k", name="a.h5")
    assert fs.config.sample_rate == 8000 and "preset_auto" not in r
    assert "auto" not in capsys.readouterr().err
    fs, r = _auto(tmp_path, d, "-p", "fbank16k", name="b.h5")
    assert fs.config.frontend == "fbank" and fs.config.sample_rate == 16000
    # auto, then the overrides apply to the preset it chose
    fs, r = _auto(tmp_path, d, "--n-mels", "32", "--frontend", "fbank", name="c.h5")
    assert (fs.config.frontend, fs.config.sample_rate, fs.config.n_mels, fs.config.n_fft) == ("fbank", 16000, 32, 512)


def test_auto_preset_shards_agree_and_merge(tmp_path):
    # the second shard holds only 8 kHz files: it still chooses as the whole input's first files say
    d = _folder(tmp_path / "a", [16000] * 16 + [8000] * 16)
    whole, _ = _auto(tmp_path, d, name="w.h5")
    s0, r0 = _auto(tmp_path, d, "--shard", "0/2", name="s0.h5")
    s1, r1 = _auto(tmp_path, d, "--shard", "1/2", name="s1.h5")
    assert whole.config.sample_rate == s0.config.sample_rate == s1.config.sample_rate == 16000
    assert r0["preset_auto"] == r1["preset_auto"]
    assert cli("merge", tmp_path / "s0.h5", tmp_path / "s1.h5", "-o", tmp_path / "m.h5") == 0
    m = FeatureStore(tmp_path / "m.h5")
    np.testing.assert_array_equal(m.load_all()[0], whole.load_all()[0])


def test_auto_preset_resume_keeps_the_choice(tmp_path):
    from pllcli.features.config import AutoPreset
    from pllcli.features.extract import featurize
    d = _folder(tmp_path / "a", [16000] * 9)
    out = tmp_path / "o.h5"

    def stop(k):
        if k == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        featurize(str(d), out, AutoPreset(), chunk_size=2, progress=False, on_chunk=stop)
    r = featurize(str(d), out, AutoPreset(), chunk_size=2, progress=False)
    assert r["chunks_resumed"] >= 1 and r["preset_auto"]["preset"] == "speech16k"
    clean = featurize(str(d), tmp_path / "c.h5", AutoPreset(), chunk_size=2, progress=False)
    np.testing.assert_array_equal(FeatureStore(out).load_all()[0], FeatureStore(tmp_path / "c.h5").load_all()[0])
    assert clean["feature_config_hash"] == r["feature_config_hash"]


def test_peek_sample_rate(tmp_path):
    from pllcli.audio import peek_sample_rate
    assert peek_sample_rate(_write(tmp_path / "a.wav", 22050)) == 22050
    assert peek_sample_rate(_write(tmp_path / "b.wav", 16000, subtype="FLOAT")) == 16000
    assert peek_sample_rate(_write(tmp_path / "c.flac", 44100)) == 44100
    assert peek_sample_rate(_write(tmp_path / "d.wav", 8000, format="RF64")) == 8000
    (tmp_path / "t.wav").write_text("not audio\n")
    assert peek_sample_rate(tmp_path / "t.wav") is None and peek_sample_rate(tmp_path / "missing.wav") is None
    os.mkfifo(tmp_path / "fifo.wav")  # no writer: opening it must not wait for one
    assert peek_sample_rate(tmp_path / "fifo.wav") is None and peek_sample_rate(tmp_path) is None


def test_bench_featurize_process_smoke(tmp_path):
    # the whole-process benchmark runs end to end on a small corpus (no timing asserted)
    from pathlib import Path
    d = _folder(tmp_path / "a", [8000] * 18 + [16000] * 2)
    script = Path(__file__).resolve().parents[1] / "examples" / "bench_featurize_process.py"
    p = subprocess.run([sys.executable, str(script), str(d), "--work", str(tmp_path / "w"), "--repeats", "1",
                        "--rows", "naive", "jobs1", "jobs2", "one", "--json", str(tmp_path / "b.json")],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["files"] == 20 and set(r) >= {"naive", "jobs1", "jobs2", "one", "speedup_jobs1_vs_naive"}
    assert all(r[k]["best_wall_s"] > 0 and r[k]["peak_rss_mb"] > 0 for k in ("naive", "jobs1", "jobs2", "one"))
    assert "naive / jobs1" in p.stdout and "pllcli" in r["commands"]["jobs1"]
    assert len(FeatureStore(tmp_path / "w" / "jobs2.h5")) == 20 and len(FeatureStore(tmp_path / "w" / "one.h5")) == 1
    with np.load(tmp_path / "w" / "naive.npz") as z:
        assert len(z["lengths"]) == 20 and z["features"].shape == (z["lengths"].sum(), 64)


def test_one_blas_thread_only_before_numpy_and_never_over_the_user(monkeypatch):
    from pllcli.cli._state import one_blas_thread
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    one_blas_thread()                                     # numpy is loaded here: too late to matter
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    monkeypatch.delitem(sys.modules, "numpy")
    one_blas_thread()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    one_blas_thread()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
