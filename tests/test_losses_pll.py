"""PLL losses against hand-computed values."""
import math

import pytest
import torch

from pllcli.losses import pll

# logits chosen so that softmax = (0.5, 0.25, 0.125, 0.125)
LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
CAND = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # set {0, 2}


def test_candidate_prior_scales_weights_and_puts_eps_outside():
    pi = pll.candidate_prior(torch.tensor([[0.2, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 0.0]]), eps=0.01)
    assert torch.allclose(pi[0], torch.tensor([0.5, 0.01, 1.0, 0.01]))
    assert torch.allclose(pi[1], torch.ones(4))  # no set: no constraint


def test_cc_is_minus_log_of_candidate_mass():
    assert pll.cc_loss(LOGITS, CAND).item() == pytest.approx(-math.log(0.625), rel=1e-5)
    # with eps = 0.1 the non-candidates count with weight 0.1: 0.625 + 0.1 * 0.375
    assert pll.cc_loss(LOGITS, CAND, eps=0.1).item() == pytest.approx(-math.log(0.6625), rel=1e-5)


def test_cc_with_candidate_weights_as_prior():
    w = torch.tensor([[0.5, 0.0, 1.0, 0.0]])   # pi = (0.5, 0, 1, 0)
    assert pll.cc_loss(LOGITS, w).item() == pytest.approx(-math.log(0.5 * 0.5 + 0.125), rel=1e-5)


def test_proden_confidence_and_soft_ce():
    c = pll.proden_confidence(LOGITS, CAND)
    assert torch.allclose(c, torch.tensor([[0.8, 0.0, 0.2, 0.0]]), atol=1e-6)
    loss = pll.soft_ce(LOGITS, c).item()
    assert loss == pytest.approx(-(0.8 * math.log(0.5) + 0.2 * math.log(0.125)), rel=1e-5)
    # eps leaves mass outside: 0.5, 0.25*e, 0.125, 0.125*e normalised
    e = 0.1
    ce = pll.proden_confidence(LOGITS, CAND, eps=e)
    z = 0.5 + 0.125 + e * 0.375
    assert torch.allclose(ce, torch.tensor([[0.5 / z, 0.025 / z, 0.125 / z, 0.0125 / z]]), atol=1e-6)


def test_uniform_confidence():
    c = pll.uniform_confidence(torch.tensor([[1.0, 0, 1.0, 1.0]]))
    assert torch.allclose(c, torch.tensor([[1 / 3, 0, 1 / 3, 1 / 3]]))


def test_lws_loss_and_confidence():
    f = torch.tensor([[2.0, -1.0, 0.0, 1.0]])
    conf = pll.lws_initial_confidence(CAND)
    assert torch.allclose(conf, torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = 0.5 * s(-2) + 0.5 * s(0) + 2.0 * (0.5 * s(-1) + 0.5 * s(1))
    assert pll.lws_loss(f, CAND, conf, beta=2.0).item() == pytest.approx(want, rel=1e-5)
    c = pll.lws_confidence(LOGITS, CAND)
    assert torch.allclose(c, torch.tensor([[0.8, 2 / 3, 0.2, 1 / 3]]), atol=1e-6)


def test_complementary_and_kl():
    want = -(math.log(0.75) + math.log(0.875))
    assert pll.complementary_loss(LOGITS, CAND).item() == pytest.approx(want, rel=1e-5)
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert pll.kl_to_target(LOGITS, t).item() == pytest.approx(-math.log(0.5), rel=1e-5)


def test_cr_confidence_is_geometric_mean_in_set():
    l2 = torch.log(torch.tensor([[0.125, 0.25, 0.5, 0.125]]))
    c = pll.cr_confidence([LOGITS, l2], CAND)
    # sqrt(0.5*0.125) for both candidates -> equal
    assert torch.allclose(c, torch.tensor([[0.5, 0.0, 0.5, 0.0]]), atol=1e-6)


def test_mse_naive_baseline():
    f = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert pll.mse_loss(f, CAND).item() == pytest.approx(0.25, rel=1e-6)
    f = torch.tensor([[100.0, -100.0, 100.0, -100.0]])
    assert pll.mse_loss(f, CAND).item() == pytest.approx(0.0, abs=1e-8)


def test_supcon_two_items_hand_value():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    T = 1.0
    # item 0: sims to others: own view 1 (pos), item1 views 0,0 -> -log(e / (e + 2))
    want = -math.log(math.e / (math.e + 2))
    out = pll.supcon_loss(z1, z2, labels, temperature=T)
    assert torch.allclose(out, torch.tensor([want, want]), atol=1e-5)


def test_pico_pseudo_target_only_picks_candidates():
    emb = torch.tensor([[1.0, 0.0]])
    protos = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.01]])
    t = pll.pico_pseudo_target(emb, protos, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    assert t.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_losses_have_gradients_only_where_expected():
    f = LOGITS.clone().requires_grad_(True)
    pll.cc_loss(f, CAND).sum().backward()
    # raising a candidate logit lowers the loss; raising a non-candidate raises it
    assert f.grad[0, 0] < 0 and f.grad[0, 2] < 0 and f.grad[0, 1] > 0
