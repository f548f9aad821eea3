"""`predict` on frame-level models: frame scores and thresholded events."""
from types import SimpleNamespace

import numpy as np
import pytest

from pllcli.errors import UsageError
from pllcli.predict import _write_frame_outputs
from tests.conftest import run_cli


def _logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _view(ids, durations):
    """What predict passes around for a log-mel feature store: ids, durations, config."""
    from pllcli.features import FeatureConfig
    return SimpleNamespace(ids=np.array(ids), durations=np.array(durations), config=FeatureConfig.preset("speech8k"))


def test_events_from_frame_logits_exact(tmp_path):
    # item a: 1.0 s, 10 valid frames of 0.1 s; class "x" active on frames 2-4, "y" on 7-9.
    # item b: 0.5 s, 5 valid frames (0.1 s each) then padding that must be ignored.
    pa = np.full((10, 2), 0.1)
    pa[2:5, 0] = 0.9
    pa[7:10, 1] = 0.8
    pb = np.full((10, 2), 0.1)
    pb[5:, 0] = 0.99  # padding region: beyond b's 5 valid frames
    fl = _logit(np.stack([pa, pb]))
    fs = _view(["a", "b"], [1.0, 0.5])
    ev, sc = tmp_path / "ev.tsv", tmp_path / "sc.tsv"
    n = _write_frame_outputs(fs, ["x", "y"], fl, np.array([10, 5]), str(ev), str(sc), 0.5, 1, 0.0)
    assert n == 2
    lines = ev.read_text().splitlines()
    rows = [ln.split("\t") for ln in lines[1:]]
    got = [(r[0], float(r[1]), float(r[2]), r[3]) for r in rows]
    assert got == [("a", pytest.approx(0.2), pytest.approx(0.5), "x"), ("a", pytest.approx(0.7), pytest.approx(1.0), "y")]
    srows = [ln.split("\t") for ln in sc.read_text().splitlines()]
    assert srows[0] == ["id", "onset", "offset", "x", "y"]
    assert sum(r[0] == "a" for r in srows[1:]) == 10 and sum(r[0] == "b" for r in srows[1:]) == 5
    assert float(srows[3][3]) == pytest.approx(0.9, abs=1e-4)  # a, frame 2, class x
    with pytest.raises(UsageError, match="threshold"):
        _write_frame_outputs(fs, ["x", "y"], fl, np.array([10, 5]), str(ev), None, 1.5, 1, 0.0)


def _crnn_and_store(tmp_path):
    from pllcli.checkpoint import save_checkpoint
    from pllcli.features import FeatureConfig, write_feature_store
    from pllcli.models import build_model

    cfg = FeatureConfig.preset("speech8k", n_mels=16)
    rng = np.random.default_rng(0)
    lens = [30, 57, 100, 12, 81]  # different lengths -> different T' per batch
    items = [{"id": f"c{i}", "features": rng.standard_normal((t, 16)).astype(np.float32),
              "duration": t * 0.01} for i, t in enumerate(lens)]
    write_feature_store(tmp_path / "f.h5", cfg, items)
    model = build_model("crnn", n_mels=16, num_classes=3)
    meta = {"kind": "classifier", "model": model.config, "classes": ["a", "b", "c"], "task": "multi",
            "feature_config": cfg.to_dict(), "feature_config_hash": cfg.hash()}
    save_checkpoint(tmp_path / "m.pt", model, meta)
    return items, meta


def test_cli_predict_events_with_untrained_crnn(tmp_path):
    from pllcli.checkpoint import save_checkpoint
    from pllcli.models import build_model
    items, meta = _crnn_and_store(tmp_path)
    r = run_cli("predict", tmp_path / "m.pt", tmp_path / "f.h5", "-o", tmp_path / "p.csv", "-b", "2",
                "--events", tmp_path / "ev.tsv", "--frame-scores", tmp_path / "fs.tsv", "--threshold", "0.01")
    assert r.returncode == 0, r.stderr
    ev = [ln.split("\t") for ln in (tmp_path / "ev.tsv").read_text().splitlines()[1:]]
    dur = {it["id"]: it["duration"] for it in items}
    assert ev and all(0 <= float(o) < float(f) <= dur[i] + 1e-6 for i, o, f, _ in ev)
    fsr = [ln.split("\t") for ln in (tmp_path / "fs.tsv").read_text().splitlines()[1:]]
    assert {r_[0] for r_ in fsr} == set(dur)
    for cid in dur:  # the last frame of each clip ends at its duration
        assert max(float(r_[2]) for r_ in fsr if r_[0] == cid) == pytest.approx(dur[cid], abs=1e-3)
    # a clip-level model has no frame outputs: clear error, no traceback
    m2 = build_model("convgru", n_mels=16, num_classes=3)
    save_checkpoint(tmp_path / "m2.pt", m2, dict(meta, model=m2.config))
    r = run_cli("predict", tmp_path / "m2.pt", tmp_path / "f.h5", "--events", tmp_path / "e2.tsv")
    assert r.returncode == 2 and "frame_logits" in r.stderr and "Traceback" not in r.stderr


def test_frame_scores_folder_is_read_by_sed_scores_eval(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sse = pytest.importorskip("sed_scores_eval")
    pa = np.full((10, 2), 0.1)
    pa[2:5, 0] = 0.9
    fl = _logit(np.stack([pa, pa]))
    fs = _view(["a", "b"], [1.0, 0.5])
    _write_frame_outputs(fs, ["x", "y"], fl, np.array([10, 5]), None, str(tmp_path / "scores"), 0.5, 1, 0.0)
    back = sse.io.read_sed_scores(tmp_path / "scores")
    assert sorted(back) == ["a", "b"]
    assert list(back["a"].columns) == ["onset", "offset", "x", "y"]
    np.testing.assert_allclose(back["a"]["x"].to_numpy(), pa[:, 0], atol=1e-4)
    assert back["b"]["offset"].to_numpy()[-1] == pytest.approx(0.5) and len(back["b"]) == 5


def test_per_class_threshold_hysteresis_and_gap_options(tmp_path):
    # class x: 0.45 on frames 2-7 with a 0.7 peak at 4 -> with x=0.6 and --low 0.4 one event
    # 0.2-0.8 s; class y: two 0.9 runs 0.1 s apart (frames 1-2, 4-5) -> merged by min_gap 0.15 s.
    p = np.full((10, 2), 0.1)
    p[2:8, 0] = 0.45
    p[4, 0] = 0.7
    p[[1, 2, 4, 5], 1] = 0.9
    fl = _logit(p[None])
    fs = _view(["a"], [1.0])
    ev = tmp_path / "ev.tsv"
    _write_frame_outputs(fs, ["x", "y"], fl, np.array([10]), str(ev), None, "0.5,x=0.6", 1, 0.0,
                         {"low": "0.4", "min_gap": 0.15})
    rows = [ln.split("\t") for ln in ev.read_text().splitlines()[1:]]
    assert [(r[1], r[2], r[3]) for r in rows] == [("0.100", "0.600", "y"), ("0.200", "0.800", "x")]
    with pytest.raises(UsageError, match="--low must not exceed"):
        _write_frame_outputs(fs, ["x", "y"], fl, np.array([10]), str(ev), None, "0.3", 1, 0.0, {"low": "0.4"})


def test_cli_tuned_thresholds_are_used_and_reported(tmp_path):
    import json
    _crnn_and_store(tmp_path)
    strong = tmp_path / "strong.tsv"
    strong.write_text("id\tonset\toffset\tlabel\nc1\t0.1\t0.4\ta\nc2\t0.2\t0.9\tb\nc4\t0.0\t0.5\ta\n")
    r = run_cli("predict", tmp_path / "m.pt", tmp_path / "f.h5", "-o", tmp_path / "p.csv", "--events",
                tmp_path / "ev.tsv", "--frame-scores", tmp_path / "fs.tsv", "--tune-labels", strong,
                "--tune-features", tmp_path / "f.h5", "--median", "30ms", "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    thr = json.loads((tmp_path / "s.json").read_text())["thresholds"]
    assert sorted(thr) == ["a", "b", "c"] and thr["c"] == 0.5  # no truth events for c: the default
    # the events written are those of the reported thresholds given explicitly
    spec = ",".join(f"{c}={v}" for c, v in thr.items())
    r = run_cli("predict", tmp_path / "m.pt", tmp_path / "f.h5", "-o", tmp_path / "p2.csv", "--events",
                tmp_path / "ev2.tsv", "--threshold", spec, "--median", "30ms")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ev.tsv").read_text() == (tmp_path / "ev2.tsv").read_text()
    r = run_cli("predict", tmp_path / "m.pt", tmp_path / "f.h5", "--events", tmp_path / "e2.tsv",
                "--tune-labels", strong)
    assert r.returncode == 2 and "--tune-labels and --tune-features go together" in r.stderr


def test_cli_segment_classes_name_each_when_segment_once(tmp_path):
    import torch

    from pllcli.checkpoint import save_checkpoint
    from pllcli.models import build_model
    items, meta = _crnn_and_store(tmp_path)
    torch.manual_seed(0)
    ww = build_model("whenwho", n_mels=16, num_classes=3, width=4, rnn_hidden=8)
    save_checkpoint(tmp_path / "ww.pt", ww, dict(meta, model=ww.config))
    base = ["predict", tmp_path / "ww.pt", tmp_path / "f.h5", "-o", tmp_path / "p.csv", "--threshold", "0.05"]
    r = run_cli(*base, "--events", tmp_path / "all.tsv")
    assert r.returncode == 0, r.stderr
    r = run_cli(*base, "--events", tmp_path / "seg.tsv", "--segment-classes")
    assert r.returncode == 0, r.stderr
    rows = [ln.split("\t") for ln in (tmp_path / "seg.tsv").read_text().splitlines()[1:]]
    spans = [(i, on, off) for i, on, off, _ in rows]
    assert rows and len(spans) == len(set(spans))  # one class per WHEN segment
    # the thresholded transcription gives a segment one event per class above the threshold
    all_rows = [ln.split("\t") for ln in (tmp_path / "all.tsv").read_text().splitlines()[1:]]
    assert len(all_rows) > len(rows)
    r = run_cli("predict", tmp_path / "m.pt", tmp_path / "f.h5", "--events", tmp_path / "x.tsv", "--segment-classes")
    assert r.returncode == 2 and "--segment-classes needs a WHEN/WHO checkpoint" in r.stderr
    # --extend is accepted with --segment-classes: same events and labels, offsets at most 0.1 s
    # later (this untrained WHEN marks whole clips, so they stay at the clips' ends)
    r = run_cli(*base, "--events", tmp_path / "wide.tsv", "--segment-classes", "--extend", "0,100ms")
    assert r.returncode == 0, r.stderr
    wide = [ln.split("\t") for ln in (tmp_path / "wide.tsv").read_text().splitlines()[1:]]
    assert [(w[0], w[1], w[3]) for w in wide] == [(s[0], s[1], s[3]) for s in rows]
    assert all(0 < float(w[2]) - float(s[2]) <= 0.1 + 1e-3 or float(w[2]) == float(s[2]) for w, s in zip(wide, rows))


def test_extend_widens_decoded_events_and_is_validated(tmp_path):
    # class x on frames 3-4 of ten 0.1 s frames: 0.3-0.5 s; --extend 0.1,0.2 -> 0.2-0.7 s
    p = np.full((10, 1), 0.1)
    p[3:5, 0] = 0.9
    fs = _view(["a"], [1.0])
    ev = tmp_path / "ev.tsv"
    _write_frame_outputs(fs, ["x"], _logit(p[None]), np.array([10]), str(ev), None, "0.5", 1, 0.0,
                         {"extend": (0.1, 0.2)})
    assert ev.read_text().splitlines()[1].split("\t") == ["a", "0.200", "0.700", "x"]
    from pllcli.cli.predict import _extend_seconds
    assert _extend_seconds("64ms,0.128") == (0.064, 0.128) and _extend_seconds("0.1") == (0.1, 0.1)
    assert _extend_seconds(None) == (0.0, 0.0) and _extend_seconds("-64ms,0.2") == (-0.064, 0.2)
    for bad in ("1,2,3", "x", "-", "0.1,"):
        with pytest.raises(UsageError, match="--extend"):
            _extend_seconds(bad)
