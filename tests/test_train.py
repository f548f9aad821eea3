"""Trainer, CLI train/predict, checkpoints: behaviour on tiny synthetic stores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli


class _R:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def run_inproc(capsys, *args):
    """Run the CLI in this process (no interpreter start-up); like run_cli's CompletedProcess."""
    from pllcli.cli.app import app
    from pllcli.cli.errors import run_app
    capsys.readouterr()
    code = run_app(app, [str(a) for a in args])
    cap = capsys.readouterr()
    return _R(code, cap.out, cap.err)

N_MELS = 16
CLASSES = ["a b", "b a", "c d", "d c"]


def make_features(path, n=96, seed=0, n_mels=N_MELS, config=None, nan_item=None):
    """Store of n items; class k = (n mod 4): bands of word 1 then word 2 ("a b" != "b a").
    Returns the true class per item."""
    from pllcli.features import FeatureConfig, write_feature_store
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    bands = {"a": 0, "b": 4, "c": 8, "d": 12}
    items = []
    for i in range(n):
        T = int(rng.integers(36, 60))
        x = rng.normal(0, 0.3, (T, n_mels)).astype(np.float32)
        w1, w2 = CLASSES[y[i]].split()
        h = T // 2
        x[2:h - 2, bands[w1]:bands[w1] + 4] += 2.0
        x[h + 2:T - 2, bands[w2]:bands[w2] + 4] += 1.0
        if nan_item is not None and i == nan_item:
            x[3, 3] = np.nan
        items.append({"id": f"u{i:04d}", "features": x, "duration": T / 100})
    cfg = config or FeatureConfig.preset("speech8k", n_mels=n_mels)
    write_feature_store(path, cfg, items)
    return y


def make_labels(path, y, n_clean=16, set_size=2, seed=0, classes=CLASSES, ids=None, drop_truth=0.0):
    """Candidate sets of `set_size` (truth + random others), the first n_clean items clean."""
    from pllcli.labels.store import LabelData, write_label_store
    rng = np.random.default_rng(seed)
    C = len(classes)
    cands, clean = [], []
    for i, t in enumerate(y):
        others = [c for c in range(C) if c != t]
        s = list(rng.choice(others, set_size - 1, replace=False)) + [int(t)]
        if rng.random() < drop_truth:
            s = [c for c in s if c != t] + [int(rng.choice([c for c in others if c not in s]))]
        cands.append(sorted(int(v) for v in s))
        clean.append(int(t) if i < n_clean else -1)
    ids = ids if ids is not None else [f"u{i:04d}" for i in range(len(y))]
    write_label_store(path, LabelData.new(ids, classes, candidates=cands, clean=clean), {"test": True})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    y = make_features(d / "f.h5")
    make_labels(d / "l.h5", y)
    return d, y


FAST = ["--epochs", "3", "--batch-size", "32", "--model-opt", "width=4,rnn_hidden=16,proj=16",
        "--lr", "0.01", "--device", "cpu"]


def _cfg(d, out, **kw):
    from pllcli.training.trainer import TrainConfig
    base = dict(features=str(d / "f.h5"), labels=str(d / "l.h5"), outdir=str(out), epochs=3, batch_size=32,
                model_options={"width": 4, "rnn_hidden": 16, "proj": 16}, lr=0.01, device="cpu",
                progress=False, prefetch=True, top_k=2)
    base.update(kw)
    return TrainConfig(**base)


def test_cli_train_then_predict_round_trip(data, tmp_path):
    d, y = data
    out = tmp_path / "run"
    r = run_cli("-q", "train", d / "f.h5", "--labels", d / "l.h5", "-o", out, *FAST, "--json", "-")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["epochs_run"] == 3 and summary["valid_items"] == 3  # 20% of 16 clean
    for name in ("best.pt", "last.pt", "averaged.pt", "log.jsonl", "summary.json"):
        assert (out / name).exists(), name
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert {"loss", "val_accuracy", "time_s", "data_wait_share", "lr"} <= set(log[0])
    r = run_cli("predict", out / "averaged.pt", d / "f.h5", "--top-k", "2", "-o", tmp_path / "p.jsonl",
                "--restrict-candidates", d / "l.h5")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == len(y) and len(rows[0]["labels"]) == 2
    # restricted to the set of 2: the two labels are exactly the candidate set, probs sum to 1
    from pllcli.labels.store import read_label_store
    lab = read_label_store(d / "l.h5")
    for i in (20, 50):  # non-clean items
        assert sorted(rows[i]["labels"]) == sorted(CLASSES[j] for j in lab.candidates(i))
        assert sum(rows[i]["probs"]) == pytest.approx(1.0, abs=1e-4)
    r = run_cli("predict", out / "best.pt", d / "f.h5")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "id,label,prob"
    assert len(r.stdout.splitlines()) == len(y) + 1


def test_training_learns_and_disambiguates(data, tmp_path):
    """PRODEN on sets of 2 (16 clean of 96): the restricted prediction picks the truth."""
    from pllcli.checkpoint import load_model
    from pllcli.labels.store import read_label_store
    from pllcli.predict import infer, restrict_to_candidates
    from pllcli.training.data import InMemoryFeatures
    from pllcli.training.trainer import train
    from pllcli.features import FeatureStore
    d, y = data
    train(_cfg(d, tmp_path / "r", epochs=12, batch_size=16, valid_fraction=0, objectives=["proden"]))
    m, _ = load_model(tmp_path / "r" / "last.pt")
    fs = FeatureStore(d / "f.h5")
    f, o = fs.load_all()
    logits = infer(m, InMemoryFeatures(f, o), None, "cpu")["logits"]
    lab = read_label_store(d / "l.h5")
    p = restrict_to_candidates(np.exp(logits), lab.candidate_matrix(np.arange(len(y))))
    acc = (p.argmax(1) == y).mean()
    assert acc >= 0.8, acc  # chance is 0.5


def test_bad_inputs_are_one_line_errors(data, tmp_path, capsys):
    d, y = data
    # labels that do not cover the features: the 6 missing ids train as unlabeled (issue 18 item 5)
    make_labels(tmp_path / "partial.h5", y[:90], ids=[f"u{i:04d}" for i in range(90)])
    r = run_inproc(capsys, "train", d / "f.h5", "--labels", tmp_path / "partial.h5", "-o", tmp_path / "o1", *FAST)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert summary["features_not_in_labels"] == 6 and summary["train_items"] == 90 - summary["valid_items"]
    # one class
    from pllcli.labels.store import LabelData, write_label_store
    ids = [f"u{i:04d}" for i in range(96)]
    write_label_store(tmp_path / "one.h5", LabelData.new(ids, ["only"], clean=[0] * 96))
    r = run_inproc(capsys, "train", d / "f.h5", "--labels", tmp_path / "one.h5", "-o", tmp_path / "o2", *FAST)
    assert r.returncode == 1 and "1 class(es)" in r.stderr and "Traceback" not in r.stderr
    # empty training set: no clean labels, objective ce
    write_label_store(tmp_path / "none.h5", LabelData.new(ids, CLASSES))
    r = run_inproc(capsys, "train", d / "f.h5", "--labels", tmp_path / "none.h5", "-o", tmp_path / "o3", *FAST,
                "--objective", "ce")
    assert r.returncode == 1 and "empty training set" in r.stderr
    # usage errors
    r = run_inproc(capsys, "train", d / "f.h5", "--labels", d / "l.h5", "-o", tmp_path / "o4", *FAST, "--objective", "bogus")
    assert r.returncode == 2 and "unknown objective 'bogus'" in r.stderr
    r = run_inproc(capsys, "predict", tmp_path / "nothere.pt", d / "f.h5")
    assert r.returncode == 1 and "no such checkpoint" in r.stderr


def test_predict_refuses_other_feature_config(data, tmp_path, capsys):
    from pllcli.features import FeatureConfig
    from pllcli.training.trainer import train
    d, y = data
    train(_cfg(d, tmp_path / "r", epochs=1))
    make_features(tmp_path / "g.h5", n=8, config=FeatureConfig.preset("speech8k", n_mels=N_MELS, hop_length=160))
    r = run_inproc(capsys, "predict", tmp_path / "r" / "best.pt", tmp_path / "g.h5")
    assert r.returncode == 1 and "hop_length" in r.stderr and "Traceback" not in r.stderr
    # --init from that checkpoint onto the other store is refused too
    make_labels(tmp_path / "gl.h5", np.arange(8) % 4, n_clean=8)
    r = run_inproc(capsys, "train", tmp_path / "g.h5", "--labels", tmp_path / "gl.h5", "-o", tmp_path / "o", *FAST,
                "--init", tmp_path / "r" / "best.pt")
    assert r.returncode == 1 and "hop_length" in r.stderr


_STOP = {"at": None}


def _register_test_objectives():
    from pllcli.training.objectives import Objective, register_objective
    from pllcli.training.pll_objectives import Proden

    @register_objective("test-nan")
    class NanAt(Objective):
        """Test: NaN loss from epoch 2."""
        items = ("candidates",)

        def loss(self, ctx):
            lo = ctx.out["logits"].float().logsumexp(1).mean()
            return lo * float("nan") if ctx.epoch >= 1 else lo

    @register_objective("test-stop")
    class StopAt(Proden):
        """Test: PRODEN that raises KeyboardInterrupt at the start of epoch _STOP['at']."""

        def loss(self, ctx):
            if _STOP["at"] is not None and ctx.epoch == _STOP["at"]:
                raise KeyboardInterrupt
            return super().loss(ctx)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    from pllcli.errors import TrainingError
    from pllcli.training.trainer import train
    _register_test_objectives()
    d, _ = data
    with pytest.raises(TrainingError, match=r"NaN/inf at epoch 2, batch 1 \(items u\d+"):
        train(_cfg(d, tmp_path / "r", objectives=["test-nan"]))
    from pllcli.checkpoint import load_checkpoint
    _, meta = load_checkpoint(tmp_path / "r" / "last.pt")
    assert meta["epoch"] == 1


def test_resume_is_exact_and_refuses_other_config(data, tmp_path):
    import torch
    from pllcli.checkpoint import load_checkpoint
    from pllcli.errors import ConfigMismatchError
    from pllcli.training.trainer import train
    _register_test_objectives()
    d, _ = data
    kw = dict(objectives=["test-stop"], epochs=3, ema=0.9)
    _STOP["at"] = None
    train(_cfg(d, tmp_path / "full", **kw))
    _STOP["at"] = 2
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(d, tmp_path / "part", **kw))
    _STOP["at"] = None
    with pytest.raises(ConfigMismatchError, match="lr"):
        train(_cfg(d, tmp_path / "part", resume=str(tmp_path / "part"), **{**kw, "lr": 0.02}))
    train(_cfg(d, tmp_path / "part", resume=str(tmp_path / "part"), **kw))
    a, ma, ea = load_checkpoint(tmp_path / "full" / "last.pt", with_extra=True)
    b, mb, eb = load_checkpoint(tmp_path / "part" / "last.pt", with_extra=True)
    assert ma["epoch"] == mb["epoch"] == 3
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ea["trainer"]["model"]:
        assert torch.equal(ea["trainer"]["model"][k], eb["trainer"]["model"][k]), k
    la = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]


def test_init_and_freeze_linear_probe(data, tmp_path):
    import torch
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.trainer import train
    d, _ = data
    train(_cfg(d, tmp_path / "a", epochs=1))
    train(_cfg(d, tmp_path / "b", epochs=1, init=str(tmp_path / "a" / "last.pt"), freeze=True))
    a, _ = load_checkpoint(tmp_path / "a" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "b" / "last.pt")
    enc = [k for k in a if k.startswith("encoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)  # frozen (BN stats too)
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_progress_without_a_terminal_logs_one_line_per_epoch(caplog, monkeypatch):
    import io
    import logging
    import sys

    from pllcli.training.progress import Progress
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a tty
    with caplog.at_level(logging.INFO, logger="pllcli.training"):
        p = Progress(total=20, enabled=True)
        for _ in range(10):
            p.step(loss="1.0")
        p.epoch("epoch 1/2 loss 1.0")
        p.close()
    assert p.bar is None and "\r" not in sys.stderr.getvalue() and "step/s" not in sys.stderr.getvalue()
    assert [r.getMessage() for r in caplog.records] == ["epoch 1/2 loss 1.0"]


def test_lr_schedules_run_through_one_lambdalr():
    import io

    import torch

    from pllcli.training.engine import _factor
    from pllcli.training.schedules import Schedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    s = Schedule("cosine", epochs=2, warmup_epochs=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _factor(s, 4))
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up over 2 steps (max(1e-3, e / 0.5)), then cosine from epoch 0.5 to 2
    assert seen[:3] == pytest.approx([2e-3, 1.0, 2.0])
    assert seen[5] == pytest.approx(2.0 * 0.5 * (1 + np.cos(np.pi * (1.25 - 0.5) / 1.5)))
    buf = io.BytesIO()  # the scheduler state goes into last.pt, which is loaded with weights_only=True
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["last_epoch"] == 8


def test_progress_on_a_terminal_is_a_live_bar(monkeypatch):
    import io
    import sys

    from pllcli.training.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Tty())
    p = Progress(total=20, enabled=True, desc="train")
    for _ in range(10):
        p.step(loss="1.0")
    p.bar.refresh()
    assert "10/20" in sys.stderr.getvalue()
    p.close()


def test_registered_test_objectives_do_not_outlive_their_test():
    """conftest restores the objective registry: the objectives the NaN/stop tests register are gone."""
    from pllcli.training.objective_base import _REGISTRY
    assert "test-nan" not in _REGISTRY and "test-stop" not in _REGISTRY and "ce" in _REGISTRY
