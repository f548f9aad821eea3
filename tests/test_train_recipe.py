"""Default recipe pieces: PRODEN warm-up (confidences follow the model while its weight is 0),
clean-share batches, `train --alpha`, default EMA for teacher objectives, --clean-share wiring."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pllcli.training.objectives import SetupContext, StepContext, build_objective


def _ctx(logits, cand, index, progress=0.0):
    b = {"candidates": cand, "has_candidates": cand.sum(1) > 0, "clean": torch.full((len(index),), -1),
         "index": index}
    return StepContext(None, b, {"logits": logits}, epoch=0, step=0, progress=progress, epochs=5, num_classes=4,
                       task="single", device="cpu", forward=None, augment=None)


def test_proden_observe_updates_confidences_with_prior_and_eps():
    """While weight 0 (start=2), observe() sets c_j = pi_j p_j / sum_k pi_k p_k, pi = w / max w in
    the set, eps outside; the first loss after the warm-up uses those confidences."""
    o = build_objective("proden:eps=0.1,start=2")
    o.setup(SetupContext(num_items=5, num_classes=4, device="cpu"))
    assert o.weight(1.9) == 0 and o.weight(2.0) == 1
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    cand = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # prior pi = (1, 0.5, 0.1, 0.1)
    ctx = _ctx(torch.log(p), cand, torch.tensor([3]))
    o.observe(ctx)
    w = torch.tensor([0.4, 0.15, 0.02, 0.01])
    assert torch.allclose(o.buf.conf[3], w / w.sum(), atol=1e-6)
    c = w / w.sum()
    loss = o.loss(_ctx(torch.log(p), cand, torch.tensor([3]), progress=2.0))
    assert loss.item() == pytest.approx(float(-(c * torch.log(p)).sum()), rel=1e-5)


def test_first_sight_confidence_is_the_normalised_prior():
    o = build_objective("proden")
    o.setup(SetupContext(num_items=2, num_classes=3, device="cpu"))
    got = o.buf.get(torch.tensor([0]), torch.tensor([[3.0, 1.0, 0.0]]))
    assert torch.allclose(got, torch.tensor([[0.75, 0.25, 0.0]]))


def test_trainer_calls_observe_while_weight_is_zero(tmp_path):
    from tests.test_train import _cfg, make_features, make_labels
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.trainer import train
    y = make_features(tmp_path / "f.h5", n=48)
    make_labels(tmp_path / "l.h5", y, n_clean=8)
    train(_cfg(tmp_path, tmp_path / "r", epochs=1, objectives=["proden:start=5", "ce"], top_k=0))
    _, _, extra = load_checkpoint(tmp_path / "r" / "last.pt", with_extra=True)
    seen = extra["trainer"]["task"]["proden/seen"]
    conf = extra["trainer"]["task"]["proden/conf"]
    assert int(seen.sum()) > 30  # confidences were estimated although the loss weight was 0
    # not the uniform first-sight init any more: they moved with the model
    assert float(conf[seen].max(1).values.mean()) != pytest.approx(0.5, abs=1e-4)


def test_epoch_batches_clean_share_oversamples_the_group():
    from pllcli.training.data import epoch_batches
    rows = np.arange(200)
    lengths = np.random.default_rng(0).integers(10, 50, 200)
    clean = np.arange(10)  # 10 clean items of 200
    b = epoch_batches(rows, lengths, 20, 0, 0, groups=[(clean, 0.25)])
    assert len(b) == int(np.ceil(190 / 15))
    assert all(np.isin(x, clean).sum() == 5 for x in b)
    rest = np.concatenate([x[~np.isin(x, clean)] for x in b])
    assert sorted(rest.tolist()) == list(range(10, 200))  # one pass over the others
    got = np.concatenate([x[np.isin(x, clean)] for x in b])
    assert set(got.tolist()) == set(clean.tolist())  # every clean item used, several times
    # DDP: ranks get disjoint, equally many batches
    b0 = epoch_batches(rows, lengths, 20, 0, 0, 0, 2, groups=[(clean, 0.25)])
    b1 = epoch_batches(rows, lengths, 20, 0, 0, 1, 2, groups=[(clean, 0.25)])
    assert len(b0) == len(b1) == len(b) // 2
    # no groups: unchanged behaviour (a plain permutation of the rows)
    p = np.concatenate(epoch_batches(rows, lengths, 20, 0, 0))
    assert sorted(p.tolist()) == list(range(200))


def test_trainer_clean_share_and_bad_values(tmp_path):
    from tests.test_train import _cfg, make_features, make_labels
    from pllcli.errors import UsageError
    from pllcli.training.trainer import train
    y = make_features(tmp_path / "f.h5", n=48)
    make_labels(tmp_path / "l.h5", y, n_clean=8)
    s = train(_cfg(tmp_path, tmp_path / "r", epochs=1, clean_share=0.25, batch_size=16, top_k=0,
                   valid_fraction=0))
    assert s["epochs_run"] == 1 and s["train_items"] == 48
    with pytest.raises(UsageError, match="clean-share"):
        train(_cfg(tmp_path, tmp_path / "r2", clean_share=1.5))


def _captured(monkeypatch, capsys, *args):
    import pllcli.training.trainer as T
    from tests.test_train import run_inproc
    got = {}
    monkeypatch.setattr(T, "train", lambda cfg: got.setdefault("cfg", cfg) and {})
    r = run_inproc(capsys, "train", "f.h5", "--labels", "l.h5", "-o", "out", *args)
    return r, got.get("cfg")


def test_cli_alpha_ema_default_and_shares(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    from pllcli.training.trainer import DEFAULT_CLEAN_SHARE, DEFAULT_OBJECTIVES, TrainConfig
    r, cfg = _captured(monkeypatch, capsys)
    assert r.returncode == 0, r.stderr
    assert cfg.objectives == list(DEFAULT_OBJECTIVES) and cfg.ema == 0.0
    assert cfg.clean_share == DEFAULT_CLEAN_SHARE == TrainConfig.clean_share
    assert cfg.epochs == TrainConfig.epochs
    r, cfg = _captured(monkeypatch, capsys, "--alpha", "0.3", "--labeled-share", "0.5", "--unlabeled-share", "0.2")
    assert cfg.objectives[-1] == "distill:alpha=0.3" and cfg.objectives[:-1] == list(DEFAULT_OBJECTIVES)
    assert cfg.clean_share == 0.5 and cfg.unlabeled_share == 0.2
    r, cfg = _captured(monkeypatch, capsys, "--objective", "mean-teacher", "--objective", "ce")
    assert cfg.ema == 0.99
    r, cfg = _captured(monkeypatch, capsys, "--objective", "mean-teacher", "--ema", "0.9")
    assert cfg.ema == 0.9
    r, cfg = _captured(monkeypatch, capsys, "--alpha", "1.5")
    assert r.returncode == 2 and "--alpha" in r.stderr and cfg is None


def test_default_ema_helper():
    from pllcli.training.trainer import default_ema
    assert default_ema(["ce", "proden"]) == 0.0
    assert default_ema(["mean-teacher"]) == 0.99
    assert math.isclose(default_ema(["mean-teacher"], 0.95), 0.95)


def test_lws_and_cr_observe_hand_values():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    cand = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    lws = build_objective("lws:start=1")
    lws.setup(SetupContext(num_items=2, num_classes=4, device="cpu"))
    lws.observe(_ctx(torch.log(p), cand, torch.tensor([1])))
    assert torch.allclose(lws.buf.conf[1], torch.tensor([4 / 7, 3 / 7, 2 / 3, 1 / 3]), atol=1e-6)
    cr = build_objective("cr:eps=0,start=1")
    cr.setup(SetupContext(num_items=2, num_classes=4, device="cpu"))
    cr.observe(_ctx(torch.log(p), cand, torch.tensor([0])))
    assert torch.allclose(cr.buf.conf[0], torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=1e-6)
