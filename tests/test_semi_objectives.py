"""The semi-supervised objectives of pllcli.training.semi on a tiny model and hand-made batches."""
import copy
import math

import pytest
import torch

from pllcli.errors import UsageError
from pllcli.training import semi as S
from pllcli.training.objectives import StepContext, build_objective, list_objectives


class Tiny(torch.nn.Module):
    def __init__(self, f=4, c=3):
        super().__init__()
        self.lin = torch.nn.Linear(f, c)

    def forward(self, x, lengths=None):
        return {"logits": self.lin(x).mean(1), "embedding": x.mean(1)}


def _batch(b=6, t=5, f=4, c=3):
    torch.manual_seed(0)
    x = torch.randn(b, t, f)
    clean = torch.tensor([0, -1, -1, -1, -1, -1])[:b]
    cand = torch.zeros(b, c)
    cand[0, 0] = 1
    cand[1, :2] = 1
    has_c = torch.tensor([True, True] + [False] * (b - 2))
    return {"x": x, "x_raw": x, "lengths": torch.full((b,), t), "index": torch.arange(b), "clean": clean,
            "candidates": cand, "has_candidates": has_c, "tags": torch.zeros(b, c),
            "has_tags": torch.zeros(b, dtype=torch.bool), "soft": torch.zeros(b, c),
            "has_soft": torch.zeros(b, dtype=torch.bool), "unlabeled": ~has_c}


def _ctx(model, batch, teacher=None, augment=None, task="single"):
    def fwd(x, lengths, model=None):
        return (model or model_)(x, lengths)
    model_ = model
    out = model(batch["x"], batch["lengths"])
    return StepContext(model, batch, out, epoch=0, step=0, progress=0.0, epochs=1, num_classes=3, task=task,
                       device="cpu", forward=fwd, augment=augment or (lambda x, ln: x + 0.1 * torch.randn_like(x)),
                       teacher=teacher)


def test_registered_and_buildable():
    names = list_objectives()
    for n in S.SEMI_OBJECTIVES:
        assert n in names
    o = build_objective("mixmatch:k=3,t=0.4,lambda_u=10")
    assert (o.k, o.t, o.lambda_u) == (3, 0.4, 10.0)
    with pytest.raises(UsageError):
        build_objective("fixmatch:threshold=1.5")
    with pytest.raises(UsageError):
        build_objective("vat:on=everything")


def test_decaying_unsupervised_weight():
    uns = build_objective("fixmatch:threshold=0.9,weight=10,final_weight=1,decay_start=5,decay_end=15")
    assert uns.threshold == 0.9
    assert uns.weight(0.0) == pytest.approx(10.0)
    assert uns.weight(5.0) == pytest.approx(10.0)      # decay starts at decay_start
    assert uns.weight(10.0) == pytest.approx(5.5)      # halfway through the decay
    assert uns.weight(20.0) == pytest.approx(1.0)
    sup = build_objective("ce:schedule=sigmoid,end=10")
    assert sup.weight(0.0) == pytest.approx(math.exp(-5)) and sup.weight(10.0) == pytest.approx(1.0)


def test_label_targets():
    b = _batch()
    tgt, has = S.label_targets(b)
    assert has.tolist() == [True, True, False, False, False, False]
    assert tgt[0].tolist() == [1.0, 0.0, 0.0]
    assert tgt[1].tolist() == [0.5, 0.5, 0.0]


def test_mean_teacher_zero_for_identical_teacher_without_augmentation():
    m = Tiny()
    b = _batch()
    o = build_objective("mean-teacher")
    o.setup(type("S", (), {"num_items": 6, "num_classes": 3, "device": "cpu"})())
    assert o.needs_teacher
    assert o.loss(_ctx(m, b, teacher=copy.deepcopy(m))).item() == pytest.approx(0.0, abs=1e-7)
    b2 = dict(b, x=b["x"] + 1.0)
    assert o.loss(_ctx(m, b2, teacher=copy.deepcopy(m))).item() > 1e-4


@pytest.mark.parametrize("spec", ["vat:eps=0.3", "mixup", "mixmatch:k=2", "fixmatch:threshold=0.3",
                                  "mean-teacher:on=all,kind=kl"])
def test_objectives_give_finite_loss_with_gradient(spec):
    m = Tiny()
    o = build_objective(spec)
    loss = o.loss(_ctx(m, _batch(), teacher=copy.deepcopy(m)))
    assert loss is not None and torch.isfinite(loss)
    loss.backward()
    assert m.lin.weight.grad is not None and m.lin.weight.grad.abs().sum() > 0


def test_fixmatch_restricts_to_candidates_and_thresholds():
    m = Tiny()
    with torch.no_grad():
        m.lin.weight.zero_()
        m.lin.bias.copy_(torch.tensor([0.0, 0.0, 9.0]))  # everything confidently class 2
    b = _batch()
    o = build_objective("fixmatch:threshold=0.9,on=all")
    ctx = _ctx(m, b)
    strong = m(b["x"])["logits"]
    loss = o.loss(ctx)
    # items 2..5 (no candidates): pseudo-label 2 kept; item 0: candidate {0} -> label 0, conf 1;
    # item 1: candidates {0, 1} -> conf .5 < .9 dropped
    ce2 = torch.nn.functional.cross_entropy(strong[:1], torch.tensor([2])).item()
    ce0 = torch.nn.functional.cross_entropy(strong[:1], torch.tensor([0])).item()
    assert loss.item() == pytest.approx((4 * ce2 + ce0) / 6, rel=1e-4)


def test_distill_alpha_mixes_soft_and_original():
    m = Tiny()
    with torch.no_grad():
        m.lin.weight.zero_()
        m.lin.bias.zero_()
    b = _batch()
    b["has_soft"] = torch.tensor([True, False, True, False, False, False])
    b["soft"][0] = torch.tensor([0.0, 1.0, 0.0])
    b["soft"][2] = torch.tensor([0.0, 0.0, 1.0])
    o = build_objective("distill:alpha=0.5")
    # uniform predictions: CE = log 3 whatever the target distribution
    assert o.loss(_ctx(m, b)).item() == pytest.approx(math.log(3))
    with torch.no_grad():
        m.lin.bias.copy_(torch.tensor([1.0, 1.0, 0.0]))
    ls = torch.log_softmax(torch.tensor([1.0, 1.0, 0.0]), 0)
    item0 = -(0.5 * ls[0] + 0.5 * ls[1])   # .5 * soft [0,1,0] + .5 * clean one-hot [1,0,0]
    item2 = -ls[2]                          # no original label: soft only
    assert o.loss(_ctx(m, b)).item() == pytest.approx(((item0 + item2) / 2).item(), rel=1e-5)


def test_multilabel_mixmatch_uses_tags():
    m = Tiny()
    b = _batch()
    b["has_tags"][:2] = True
    b["tags"][0] = torch.tensor([1.0, 0.0, 1.0])
    o = build_objective("mixmatch")
    loss = o.loss(_ctx(m, b, task="multi"))
    assert torch.isfinite(loss) and set(o.metrics()) == {"mixmatch_lx", "mixmatch_lu"}


def test_fixmatch_distribution_alignment_counters_collapse():
    import torch
    from pllcli.training.objectives import build_objective
    torch.manual_seed(0)
    fm = build_objective("fixmatch:threshold=0.9,align_momentum=0")
    assert fm.align is True
    # every item leans to class 0: after alignment the argmax follows the second-best evidence
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    q = fm._aligned(logits).exp()
    assert torch.allclose(q.sum(-1), torch.ones(3), atol=1e-5)
    assert q[0].argmax() == 1 and q[1].argmax() == 2
    off = build_objective("fixmatch:align=false")
    assert off.align is False


def test_frozen_bn_stats_keeps_running_statistics():
    import torch
    from pllcli.training.semi import frozen_bn_stats
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    before = m[1].running_mean.clone()
    with frozen_bn_stats(m):
        m(torch.randn(8, 3) * 5 + 3)
    assert torch.equal(m[1].running_mean, before) and m[1].momentum == 0.1
    m(torch.randn(8, 3) * 5 + 3)
    assert not torch.equal(m[1].running_mean, before)
