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
    r = run_cli("demo", tmp_path / "d", "--size", "tiny", "--epochs", "1", "--json", tmp_path / "demo.json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "demo.json").read_text())
    f = out["figures"]
    for k in ("pll_test_accuracy", "oracle_test_accuracy", "disambiguation_accuracy"):
        assert 0.0 <= f[k] <= 1.0
    assert f["classes"] == 25
    for path in out["artefacts"].values():
        assert (tmp_path / "d").as_posix() in path
    assert (tmp_path / "d" / "runs" / "pll" / "model.onnx").stat().st_size > 0
    picked = _rows(tmp_path / "d" / "runs" / "pll" / "train_disambiguated.csv")
    assert len(picked) >= f["typed_messages"]
    assert "$ pllcli featurize" in r.stderr and "$ pllcli train" in r.stderr


def test_demo_rejects_unknown_size(tmp_path):
    r = run_cli("demo", tmp_path / "d", "--size", "huge")
    assert r.returncode == 1 and "--size must be one of" in r.stderr and "Traceback" not in r.stderr
