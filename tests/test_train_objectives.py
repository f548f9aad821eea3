"""Objective registry, weight schedules, spec parsing."""
import math

import pytest
import torch

from pllcli.errors import UsageError
from pllcli.training.objectives import (StepContext, SetupContext, WeightSchedule, build_objective,
                                        list_objectives)


def test_schedules_hand_values():
    assert WeightSchedule(2.0, "constant", start=1)(0.5) == 0.0
    assert WeightSchedule(2.0, "constant", start=1)(1.0) == 2.0
    lin = WeightSchedule(2.0, "linear", 1, 5)
    assert lin(0.0) == 0.0 and lin(3.0) == pytest.approx(1.0) and lin(9.0) == 2.0
    sig = WeightSchedule(1.0, "sigmoid", 0, 10)
    assert sig(5.0) == pytest.approx(math.exp(-5 * 0.25)) and sig(10) == 1.0
    with pytest.raises(UsageError):
        WeightSchedule(1.0, "linear", 3, 3)
    with pytest.raises(UsageError):
        WeightSchedule(1.0, "cubic")


def test_spec_parsing_and_registry():
    names = list_objectives()
    for n in ("ce", "cc", "proden", "rc", "lws", "pico", "cr", "mse"):
        assert n in names
    o = build_objective("lws:beta=2,weight=0.5")
    assert o.beta == 2.0 and o.weight(0) == 0.5
    with pytest.raises(UsageError, match="unknown objective"):
        build_objective("nope")
    with pytest.raises(UsageError, match="unknown key 'gamma'.*valid: eps"):
        build_objective("cc:gamma=3")


def _ctx(logits, cand, clean, index):
    b = {"candidates": cand, "has_candidates": cand.sum(1) > 0, "clean": clean, "index": index}
    return StepContext(None, b, {"logits": logits}, epoch=0, step=0, progress=0.0, epochs=1, num_classes=4,
                       task="single", device="cpu", forward=None, augment=None)


def test_proden_objective_updates_confidence_buffer():
    o = build_objective("proden")
    o.setup(SetupContext(num_items=10, num_classes=4, device="cpu"))
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    cand = torch.tensor([[1.0, 0, 1.0, 0]])
    ctx = _ctx(logits, cand, torch.tensor([-1]), torch.tensor([7]))
    loss = o.loss(ctx)
    # first sight: uniform over {0, 2}
    assert loss.item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.125)), rel=1e-5)
    assert torch.allclose(o.buf.conf[7], torch.tensor([0.8, 0, 0.2, 0]), atol=1e-6)
    loss2 = o.loss(ctx)
    assert loss2.item() == pytest.approx(-(0.8 * math.log(0.5) + 0.2 * math.log(0.125)), rel=1e-5)
    st = o.state_dict()
    o2 = build_objective("proden")
    o2.setup(SetupContext(num_items=10, num_classes=4, device="cpu"))
    o2.load_state_dict(st)
    assert torch.equal(o2.buf.conf, o.buf.conf)


def test_ce_objective_only_uses_clean_items():
    o = build_objective("ce")
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]]))
    ctx = _ctx(logits, torch.zeros(2, 4), torch.tensor([0, -1]), torch.tensor([0, 1]))
    assert o.loss(ctx).item() == pytest.approx(-math.log(0.5), rel=1e-5)
    assert o.loss(_ctx(logits, torch.zeros(2, 4), torch.tensor([-1, -1]), torch.tensor([0, 1]))) is None


def test_ce_mixup_mixes_inputs_and_targets():
    torch.manual_seed(0)
    o = build_objective("ce:mixup=0.4")
    seen = {}

    def fwd(x, lengths):
        seen["x"] = x
        return {"logits": torch.zeros(x.shape[0], 4)}

    x = torch.stack([torch.zeros(5, 3), torch.ones(5, 3)])
    b = {"candidates": torch.zeros(2, 4), "has_candidates": torch.zeros(2, dtype=torch.bool),
         "clean": torch.tensor([0, 1]), "index": torch.tensor([0, 1]), "x": x, "lengths": torch.tensor([5, 5])}
    ctx = StepContext(None, b, {"logits": torch.zeros(2, 4)}, epoch=0, step=0, progress=0.0, epochs=1,
                      num_classes=4, task="single", device="cpu", forward=fwd, augment=None)
    loss = o.loss(ctx)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-5)  # uniform logits: CE = log C for any target
    v = seen["x"][:, 0, 0]
    assert torch.allclose(v.sum(), torch.tensor(1.0)) or torch.allclose(v, torch.tensor([0.0, 1.0]))
