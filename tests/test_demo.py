"""The embedded demo: corpus synthesis and the whole pipeline at a reduced size."""
import csv
import json

import numpy as np
import pytest
import soundfile as sf

from pllcli.synth import WORDS, DemoCorpusSpec, Speaker, make_demo_corpus, synth_word
from tests.conftest import run_cli


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_synth_word_is_deterministic_and_speaker_dependent():
    rng = np.random.default_rng(0)
    a, b = Speaker("a", 110, 0.9, 1.0, 0.05), Speaker("b", 220, 1.15, 1.0, 0.05)
    x1 = synth_word("fish", a, 8000, np.random.default_rng(1))
    x2 = synth_word("fish", a, 8000, np.random.default_rng(1))
    np.testing.assert_array_equal(x1, x2)
    y = synth_word("fish", b, 8000, np.random.default_rng(1))
    assert x1.dtype == np.float32 and np.isfinite(x1).all() and np.abs(x1).max() <= 1.5
    # pitch differs: the strongest low-frequency peak of the vowel follows f0 / formants
    def peak(x):
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        f = np.fft.rfftfreq(len(x), 1 / 8000)
        band = (f > 60) & (f < 1000)
        return f[band][spec[band].argmax()]
    assert peak(x1) != peak(y)
    assert 0.15 < len(x1) / 8000 < 0.8 and rng is not None


def test_demo_corpus_layout_and_scenario(tmp_path):
    spec = DemoCorpusSpec(train_messages=60, test_messages=10, seed=3)
    info = make_demo_corpus(tmp_path, spec)
    assert info["classes"] == 25 == len(spec.classes())
    voice, chat = _rows(tmp_path / "voice.csv"), _rows(tmp_path / "chat.csv")
    truth = {r["id"]: r for r in _rows(tmp_path / "truth.csv")}
    assert len(truth) == 70 and info["counts"]["typed"] == len(voice)
    assert len(voice) + info["counts"]["unlabeled"] == 60
    times = [float(r["time"]) for r in chat]
    assert times == sorted(times)
    # each typed message appears in the chat after its voice message (case/punctuation may differ)
    texts = [(float(r["time"]), r["text"].lower().strip(" .!")) for r in chat]
    for v in voice[:20]:
        t, label = float(v["time"]), truth[v["id"]]["label"]
        assert any(tt > t and tx == label for tt, tx in texts), v["id"]
    for r in _rows(tmp_path / "clean.csv"):
        assert truth[r["id"]]["label"] == r["label"] and truth[r["id"]]["split"] == "train"
    x, sr = sf.read(tmp_path / voice[0]["path"])
    assert sr == 8000 and 0.3 < len(x) / sr < 4
    assert set(w for c in spec.classes() for w in c.split()) <= set(WORDS)
    # same seed -> same corpus
    make_demo_corpus(tmp_path / "again", DemoCorpusSpec(train_messages=60, test_messages=10, seed=3))
    assert (tmp_path / "chat.csv").read_text() == (tmp_path / "again" / "chat.csv").read_text()


@pytest.mark.slow
def test_demo_runs_end_to_end_tiny(tmp_path):
    r = run_cli("demo", "-o", tmp_path / "d", "--size", "tiny", "--epochs", "1", "--json", tmp_path / "demo.json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "demo.json").read_text())
    f = out["figures"]
    d = tmp_path / "d"
    for name in ("pll", "oracle"):  # the summary's figures are the stages' own, on all 40 test messages
        m = json.loads((d / "runs" / name / "test_metrics.json").read_text())["clip"]
        assert m["n_items"] == 40 and f[f"{name}_test_accuracy"] == m["accuracy"]
    truth = {r["id"]: r["label"] for r in _rows(d / "corpus" / "truth.csv") if r["split"] == "train"}
    got = {r["id"]: r["label"] for r in _rows(d / "runs" / "pll" / "train_disambiguated.csv")}
    right = sum(got.get(i) == lab for i, lab in truth.items())
    assert f["disambiguation_accuracy"] == pytest.approx(right / len(truth))
    assert f["classes"] == 25
    for path in out["artefacts"].values():
        assert (tmp_path / "d").as_posix() in path
    assert (tmp_path / "d" / "runs" / "pll" / "model.onnx").stat().st_size > 0
    picked = _rows(tmp_path / "d" / "runs" / "pll" / "train_disambiguated.csv")
    assert len(picked) >= f["typed_messages"]
    assert "$ pllcli featurize" in r.stderr and "$ pllcli train" in r.stderr
    # the stages' own logs pass through: each training shows its epochs, not minutes of silence
    assert r.stderr.count("epoch 1/1") == 2, r.stderr[-2000:]


def test_demo_rejects_unknown_size(tmp_path):
    r = run_cli("demo", "-o", tmp_path / "d", "--size", "huge")
    assert r.returncode == 2 and r.stderr.startswith("error: invalid value for '--size'"), r.stderr
    assert "tiny" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "d").exists()


@pytest.fixture
def demo_call(monkeypatch):
    """Run `pllcli demo ARGS` in-process with run_demo replaced: (exit code, outdir it got, stderr)."""
    import pllcli.demo
    from typer.testing import CliRunner

    from pllcli.cli.app import app
    seen = {}

    def fake(outdir, **kw):
        seen["outdir"] = outdir
        raise SystemExit(0)
    monkeypatch.setattr(pllcli.demo, "run_demo", fake)

    def call(*args):
        r = CliRunner().invoke(app, ["demo", *map(str, args)])
        return r.exit_code, seen.get("outdir"), r.stderr if hasattr(r, "stderr") else r.output
    return call


def test_demo_writes_under_the_ignored_runs_folder(demo_call):
    import shutil
    import subprocess
    from pathlib import Path
    code, outdir, _ = demo_call("--size", "tiny")
    assert code == 0 and Path(outdir) == Path("runs/demo")
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") and (root / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", "runs/demo/"], cwd=root).returncode == 0


def test_demo_old_positional_dir_still_works_with_a_warning(demo_call, tmp_path):
    code, outdir, err = demo_call(tmp_path / "old")
    assert code == 0 and outdir == tmp_path / "old" and "deprecated; use -o/--output" in err
    code, outdir, _ = demo_call("-o", tmp_path / "new")
    assert code == 0 and outdir == tmp_path / "new"


def test_demo_help_states_a_realistic_time_range():
    """The issue measured 15.6 min for the default demo at load 3-5 on 2 cores (and ~1.6 min alone):
    the help's range for the default size must cover both."""
    import re
    r = run_cli("demo", "-h")
    text = " ".join(r.stdout.replace("│", " ").split())
    lo, hi = map(int, re.search(r"default \(1,500 messages[^)]*\) (\d+)-(\d+) min", text).groups())
    assert lo <= 2 and hi >= 16
    for size in ("small", "tiny"):
        assert re.search(rf"{size} \([^)]*\) \d+-\d+ min", text), size
