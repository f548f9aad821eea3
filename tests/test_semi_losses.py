"""Hand-computed checks of the unlabeled-audio losses (pllcli.losses.semi)."""
import math

import pytest
import torch

from pllcli.errors import UsageError
from pllcli.losses import semi


def test_nt_xent_identical_views_2x2():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # anchor e1: positive sim 1, negatives 0 and 0 -> -log(e / (e + 2))
    assert semi.nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


def test_nt_xent_swapped_views_and_temperature():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # scale does not matter (cosine similarity)
    # anchor e1: positive e2 (sim 0); negatives e2 (0), e1 (1) -> -log(1 / (2 + e^(1/tau)))
    assert semi.nt_xent(z1, z2, temperature=1.0).item() == pytest.approx(math.log(2 + math.e), abs=1e-6)
    assert semi.nt_xent(z1, z2, temperature=0.5).item() == pytest.approx(math.log(2 + math.e ** 2), abs=1e-5)


def test_nt_xent_bad_input():
    with pytest.raises(UsageError, match="at least 2"):
        semi.nt_xent(torch.ones(1, 3), torch.ones(1, 3))
    with pytest.raises(UsageError):
        semi.nt_xent(torch.ones(2, 3), torch.ones(2, 4))


def test_masked_reconstruction_counts_only_masked_frames():
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pred = torch.zeros_like(target)
    assert semi.masked_reconstruction_loss(pred, target, torch.tensor([[1, 0]])).item() == pytest.approx(2.5)
    assert semi.masked_reconstruction_loss(pred, target, torch.tensor([[0, 1]])).item() == pytest.approx(12.5)
    fmask = torch.tensor([[[0, 1], [0, 0]]])
    assert semi.masked_reconstruction_loss(pred, target, fmask).item() == pytest.approx(4.0)


def test_apc_shift_and_lengths():
    x = torch.arange(4.0).reshape(1, 4, 1)
    assert semi.apc_loss(x, x, shift=1).item() == pytest.approx(1.0)
    z = torch.zeros_like(x)
    assert semi.apc_loss(z, x, shift=1).item() == pytest.approx(2.0)   # targets 1, 2, 3
    assert semi.apc_loss(z, x, shift=1, lengths=torch.tensor([3])).item() == pytest.approx(1.5)  # 1, 2
    assert semi.apc_loss(z, x, shift=2).item() == pytest.approx(2.5)   # targets 2, 3
    with pytest.raises(UsageError, match="too short"):
        semi.apc_loss(z, x, shift=4)


def test_consistency_mse_and_kl():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> [.75, .25]
    assert semi.consistency_loss(s, t, "mse").item() == pytest.approx(0.0625)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert semi.consistency_loss(s, t, "kl").item() == pytest.approx(kl, abs=1e-6)
    # multi-label: sigmoid(log 3) = .75, sigmoid(0) = .5 per class
    assert semi.consistency_loss(s, t, "mse", multi_label=True).item() == pytest.approx(0.0625 / 2)
    # teacher gets no gradient
    t2 = t.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    semi.consistency_loss(s2, t2).backward()
    assert t2.grad is None and s2.grad is not None
    # example weights: a masked-out example contributes nothing
    both = semi.consistency_loss(torch.cat([s, s]), torch.cat([t, s]), weights=torch.tensor([1.0, 0.0]))
    assert both.item() == pytest.approx(0.0625)


def test_ema_update():
    student = torch.nn.Linear(1, 1, bias=False)
    teacher = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
    assert semi.ema_update(teacher, student, decay=0.9, step=0) == 0.0
    assert teacher.weight.item() == pytest.approx(1.0)  # step 0 copies
    with torch.no_grad():
        teacher.weight.fill_(0.0)
    assert semi.ema_update(teacher, student, decay=0.9, step=100) == pytest.approx(0.9)
    assert teacher.weight.item() == pytest.approx(0.1)


def _linear_model(w):
    def f(x):
        a = (x.reshape(x.shape[0], -1) * w).sum(-1, keepdim=True)
        return torch.cat([a, torch.zeros_like(a)], -1)
    return f


def test_vat_direction_finds_the_only_sensitive_direction():
    torch.manual_seed(0)
    w = torch.tensor([3.0, 4.0, 0.0, 0.0])
    f = _linear_model(w)
    x = torch.zeros(5, 2, 2)
    p = semi.probs(f(x))
    d = semi.vat_direction(f, x, p, xi=1e-3, power_iterations=1).reshape(5, -1)
    cos = (d * w).sum(-1) / w.norm()
    assert torch.allclose(cos.abs(), torch.ones(5), atol=1e-4)
    # loss: logits move by +-5*eps from 0 -> KL(.5,.5 || sigmoid(1), sigmoid(-1)) for eps = 0.2
    s1 = 1 / (1 + math.exp(-1.0))
    expected = 0.5 * math.log(0.5 / s1) + 0.5 * math.log(0.5 / (1 - s1))
    assert semi.vat_loss(f, x, xi=1e-3, eps=0.2).item() == pytest.approx(expected, rel=1e-3)


def test_vat_respects_mask_and_validates():
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    f = _linear_model(w)
    x = torch.zeros(1, 2, 2)
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # second frame is padding
    d = semi.vat_direction(f, x, semi.probs(f(x)), xi=1e-3, mask=mask)
    assert torch.all(d[0, 1] == 0)
    assert d[0, 0].abs().tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5], abs=1e-4)
    with pytest.raises(UsageError):
        semi.vat_loss(f, x, eps=0.0)


def test_mixup_values_and_lengths():
    x = torch.tensor([[[0.0]], [[10.0]]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    xm, ym, lm, _ = semi.mixup(x, y, 0.7, perm=torch.tensor([1, 0]), lengths=torch.tensor([3, 5]))
    assert xm.flatten().tolist() == pytest.approx([3.0, 7.0])
    assert ym.tolist() == [pytest.approx([0.7, 0.3]), pytest.approx([0.3, 0.7])]
    assert lm.tolist() == [5, 5]
    xm, ym, _, _ = semi.mixup(x, y, torch.tensor([1.0, 0.5]), perm=torch.tensor([1, 0]))
    assert xm.flatten().tolist() == pytest.approx([0.0, 5.0])
    lam = semi.sample_lambda(0.75, n=1000, mixmatch=True)
    assert lam.min() >= 0.5 and lam.max() <= 1.0


def test_sharpen_softmax_and_multilabel():
    p = torch.tensor([[0.6, 0.4]])
    assert semi.sharpen(p, 0.5)[0].tolist() == pytest.approx([0.36 / 0.52, 0.16 / 0.52])
    assert semi.sharpen(p, 1.0)[0].tolist() == pytest.approx([0.6, 0.4])
    q = semi.sharpen_multilabel(torch.tensor([0.6, 0.5, 0.2]), 0.5)
    assert q.tolist() == pytest.approx([0.36 / 0.52, 0.5, 0.04 / 0.68], abs=1e-6)
    with pytest.raises(UsageError):
        semi.sharpen(p, 0.0)


def test_guess_targets_average_then_sharpen():
    v1 = torch.log(torch.tensor([[0.8, 0.2]]))
    v2 = torch.log(torch.tensor([[0.4, 0.6]]))
    g = semi.guess_targets([v1, v2], temperature=0.5)  # mean [.6, .4] -> sharpened
    assert g[0].tolist() == pytest.approx([0.36 / 0.52, 0.16 / 0.52], abs=1e-6)
    gm = semi.guess_targets([torch.logit(torch.tensor([[0.7, 0.1]])),
                             torch.logit(torch.tensor([[0.5, 0.3]]))], 0.5, multi_label=True)
    assert gm[0].tolist() == pytest.approx([0.36 / 0.52, 0.04 / 0.68], abs=1e-5)


def test_mixmatch_hand_computed():
    def f(x, lengths=None):
        return x.mean(1)  # (B, T, C) -> logits (B, C)

    x_l = torch.tensor([[[2.0, 0.0]]])
    y_l = torch.tensor([[1.0, 0.0]])
    u = torch.tensor([[[0.0, 0.0]]])
    lx, lu, guess = semi.mixmatch_loss(f, x_l, y_l, [u], temperature=0.5, lam=0.6, perm=torch.tensor([1, 0]))
    assert guess[0].tolist() == pytest.approx([0.5, 0.5])
    # labeled: logits .6*[2,0] + .4*[0,0] = [1.2, 0], target .6*[1,0] + .4*[.5,.5] = [.8, .2]
    s = 1 / (1 + math.exp(-1.2))
    assert lx.item() == pytest.approx(-(0.8 * math.log(s) + 0.2 * math.log(1 - s)), abs=1e-5)
    # unlabeled: logits [.8, 0], target .6*[.5,.5] + .4*[1,0] = [.7, .3]
    s = 1 / (1 + math.exp(-0.8))
    assert lu.item() == pytest.approx(((s - 0.7) ** 2 + ((1 - s) - 0.3) ** 2) / 2, abs=1e-7)
    # no mixing (lam = 1): L_x is plain CE of the labeled logits
    lx1, _, _ = semi.mixmatch_loss(f, x_l, y_l, [u, u], lam=1.0, perm=torch.arange(3))
    assert lx1.item() == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-6)


def test_mixmatch_multilabel_runs_with_lengths_and_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4)

    def f(x, lengths=None):
        return lin(x).mean(1)

    x_l = torch.randn(2, 5, 3)
    u = [torch.randn(3, 4, 3) for _ in range(2)]
    lx, lu, g = semi.mixmatch_loss(f, x_l, torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]]), u, multi_label=True,
                                   lengths_l=torch.tensor([5, 3]), lengths_u=torch.tensor([4, 4, 2]))
    (lx + lu).backward()
    assert lin.weight.grad is not None and g.shape == (3, 4)
    assert torch.all((g > 0) & (g < 1))


def test_fixmatch_threshold_mask():
    weak = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0]])  # p = [.9, .1], [.5, .5]
    strong = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    loss, frac = semi.fixmatch_loss(weak, strong, threshold=0.8)
    assert loss.item() == pytest.approx(math.log(2) / 2)
    assert frac.item() == pytest.approx(0.5)
    loss, frac = semi.fixmatch_loss(weak, strong, threshold=0.95)
    assert loss.item() == 0.0 and frac.item() == 0.0


def test_fixmatch_multilabel():
    weak = torch.logit(torch.tensor([[0.9, 0.5, 0.05]]))
    strong = torch.zeros(1, 3)
    loss, frac = semi.fixmatch_loss(weak, strong, threshold=0.8, multi_label=True)
    assert loss.item() == pytest.approx(2 * math.log(2) / 3, abs=1e-6)
    assert frac.item() == pytest.approx(2 / 3)
    with pytest.raises(UsageError):
        semi.fixmatch_loss(weak, strong, threshold=0.0)


def test_prefix_apc_targets_after_the_cut():
    x = torch.arange(6.0).reshape(1, 6, 1).repeat(2, 1, 1)
    pred = torch.zeros(2, 2, 1)
    # clip 0 cut at 2: targets x[2], x[3] = 2, 3; clip 1 cut at 4, length 5: only x[4] = 4 valid
    loss = semi.prefix_apc_loss(pred, x, torch.tensor([2, 4]), torch.tensor([6, 5]))
    assert loss.item() == pytest.approx((2 + 3 + 4) / 3)
