"""MIL pooling, MMM and multi-label losses against hand-computed values."""
import math

import pytest
import torch

from pllcli.errors import UsageError
from pllcli.losses import mil


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


P = torch.tensor([[0.2, 0.5, 0.8]], dtype=torch.float64)  # one bag, three frames


def test_pooling_values():
    assert mil.max_pool(P).item() == pytest.approx(0.8)
    assert mil.mean_pool(P).item() == pytest.approx(0.5)
    assert mil.min_pool(P).item() == pytest.approx(0.2)
    # 1 - (0.8 * 0.5 * 0.2) = 0.92
    assert mil.noisy_or_pool(P).item() == pytest.approx(0.92)
    # (0.04 + 0.25 + 0.64) / 1.5 = 0.62
    assert mil.linear_softmax_pool(P).item() == pytest.approx(0.62)


def test_pooling_masks_padded_frames():
    p = torch.tensor([[0.2, 0.5, 0.8], [0.3, 0.9, 0.99]], dtype=torch.float64).unsqueeze(-1)  # (2,3,1)
    mask = mil.lengths_to_mask(torch.tensor([3, 1]), 3)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert mil.max_pool(p, mask)[:, 0].tolist() == pytest.approx([0.8, 0.3])
    assert mil.mean_pool(p, mask)[:, 0].tolist() == pytest.approx([0.5, 0.3])
    assert mil.min_pool(p, mask)[:, 0].tolist() == pytest.approx([0.2, 0.3])
    assert mil.noisy_or_pool(p, mask)[:, 0].tolist() == pytest.approx([0.92, 0.3])
    assert mil.linear_softmax_pool(p, mask)[:, 0].tolist() == pytest.approx([0.62, 0.3])


def test_scale_lengths():
    assert mil.scale_lengths(torch.tensor([100, 50, 1]), 100, 25).tolist() == [25, 13, 1]


def test_attention_pool_uniform_weights_equal_mean_and_mask():
    att = mil.AttentionPool(in_features=2, num_classes=1).double()
    with torch.no_grad():
        att.att.weight.zero_()
        att.att.bias.zero_()
    feats = torch.randn(1, 3, 2, dtype=torch.float64)
    assert att(P, feats).item() == pytest.approx(0.5)
    mask = mil.lengths_to_mask(torch.tensor([2]), 3)
    assert att(P, feats, mask).item() == pytest.approx(0.35)
    # weights from features: feature 0 large on frame 2 -> attention almost all on 0.8
    with torch.no_grad():
        att.att.weight[0, 0] = 50.0
    feats = torch.tensor([[[0.0, 0], [0.0, 0], [1.0, 0]]], dtype=torch.float64)
    assert att(P, feats).item() == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(UsageError, match="AttentionPool"):
        mil.pool(P, "attention")
    with pytest.raises(UsageError, match="unknown MIL pooling"):
        mil.pool(P, "median")


def test_mmm_positive_and_negative_hand_computed():
    z = logit(P)
    # positive: [-ln .8 + ln 2 + -ln .8] / 3
    pos = (-math.log(0.8) + math.log(2) - math.log(0.8)) / 3
    assert mil.mmm_loss(z, torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(pos, rel=1e-6)
    assert pos == pytest.approx(0.379811, abs=1e-6)
    # negative: [-ln .2 - ln .5 - ln .8] / 3
    neg = (-math.log(0.2) - math.log(0.5) - math.log(0.8)) / 3
    assert mil.mmm_loss(z, torch.tensor([0.0], dtype=torch.float64)).item() == pytest.approx(neg, rel=1e-6)
    assert neg == pytest.approx(0.841910, abs=1e-6)
    # batch mean of the two, and "none" gives both
    zz = torch.cat([z, z])
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert mil.mmm_loss(zz, y).item() == pytest.approx((pos + neg) / 2, rel=1e-6)
    assert mil.mmm_loss(zz, y, reduction="none").tolist() == pytest.approx([pos, neg], rel=1e-6)


def test_mmm_multiclass_and_mask():
    # (1, 3, 2): class 0 as above, class 1 constant 0.5; mask drops the last frame
    z = torch.stack([logit(P[0]), logit(torch.full((3,), 0.5))], dim=-1).unsqueeze(0)
    mask = mil.lengths_to_mask(torch.tensor([2]), 3)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = mil.mmm_loss(z, y, mask, reduction="none")[0]
    # class 0 over frames [0.2, 0.5]: max .5 -> ln2; mean .35 vs .5; min .2 vs 0
    mean_term = -(0.5 * math.log(0.35) + 0.5 * math.log(0.65))
    c0 = (math.log(2) + mean_term - math.log(0.8)) / 3
    c1 = (3 * math.log(2)) / 3
    assert out.tolist() == pytest.approx([c0, c1], rel=1e-6)


def test_mmm_gradient_reaches_every_frame_but_max_only_one():
    z = logit(torch.tensor([[0.1, 0.3, 0.8]])).clone().requires_grad_(True)  # mean 0.4 != 0.5
    mil.mmm_loss(z, torch.tensor([1.0], dtype=torch.float64)).backward()
    assert (z.grad.abs() > 0).all()
    z2 = logit(P).clone().requires_grad_(True)
    mil.mil_loss(z2, torch.tensor([1.0], dtype=torch.float64), "max").backward()
    assert (z2.grad.abs() > 0).sum().item() == 1


def test_mil_loss_matches_bce_of_pooled():
    z = logit(P)
    y = torch.tensor([1.0], dtype=torch.float64)
    assert mil.mil_loss(z, y, "max").item() == pytest.approx(-math.log(0.8))
    assert mil.mil_loss(z, y, "noisy_or").item() == pytest.approx(-math.log(0.92))
    assert mil.mil_loss(z, y, "mean").item() == pytest.approx(-math.log(0.5))
    assert mil.mil_loss(z, y, "linear-softmax").item() == pytest.approx(-math.log(0.62))
    assert mil.mil_loss(z, y, "mmm").item() == pytest.approx(mil.mmm_loss(z, y).item())


def test_bce_and_hinge_hand_computed():
    logits = torch.tensor([[0.0, 0.5, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    # hinge: [max(0, 1-(0-0.5)) + max(0, 1-(0-0))] / 3 = 2.5/3
    assert mil.hinge_loss(logits, y).item() == pytest.approx(2.5 / 3)
    assert mil.hinge_loss(torch.tensor([[1.0, 0.0, -1.0]]), y).item() == pytest.approx(0.0)
    assert mil.margin_targets(torch.tensor([[0.0, 1, 0, 1]])).tolist() == [[1, 3, -1, -1]]
    # a negative clip gives no hinge loss
    assert mil.hinge_loss(logits, torch.zeros(1, 3)).item() == 0.0
    # bce: mean of softplus terms
    expect = (math.log(2) + (0.5 + math.log1p(math.exp(-0.5))) + math.log(2)) / 3
    assert mil.bce_loss(logits, y).item() == pytest.approx(expect, rel=1e-6)
    # weight masks a clip out entirely
    two = torch.cat([logits, torch.full((1, 3), 9.0)])
    yy = torch.cat([y, torch.zeros(1, 3)])
    assert mil.bce_loss(two, yy, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(expect, rel=1e-6)
    with pytest.raises(UsageError, match="unknown multi-label loss"):
        mil.multilabel_loss("focal", logits, y)


def test_noisy_or_loss_keeps_a_gradient_on_long_negative_bags():
    # 200 frames at p = 0.5: the pooled probability rounds to 1, yet the loss is exact (200 ln 2)
    z = torch.zeros(1, 200, dtype=torch.float64, requires_grad=True)
    loss = mil.mil_loss(z, torch.tensor([0.0], dtype=torch.float64), "noisy_or")
    assert loss.item() == pytest.approx(200 * math.log(2))
    loss.backward()
    assert z.grad.abs().min().item() == pytest.approx(0.5)
