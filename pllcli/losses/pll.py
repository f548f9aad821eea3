"""Partial-label (candidate-set) losses. Shapes: logits (B, C); candidate weights `cand` (B, C),
> 0 inside the item's candidate set and 0 outside; confidences `conf` (B, C), rows summing to 1.
All functions return per-item losses (B,); callers average.

Prior and robustness. The label store's candidate weights act as a prior over the set:
`candidate_prior(cand, eps)` gives pi_j = w_j / max_k w_k inside the set and `eps` outside it.
eps > 0 leaves a little mass outside the set, so that an item whose true label was typed too
late (missing from its set) can still move its confidence onto a confident non-candidate.

The default recipe of `pllcli train` (trainer module docstring) is CE on clean items, plus
CC after a clean warm start of 3 epochs, with the label store's (delay-prior) weights as pi
and eps = 0 (eps = 0.01 measured worse on chat-fsdd, also on the items whose truth is missing).

Losses (p = softmax(logits)):
- CC (Feng et al. 2020):               L = -log sum_j pi_j p_j
- PRODEN / RC (Lv 2020, Feng 2020):    L = -sum_j c_j log p_j,  c re-estimated as
                                       c_j <- pi_j p_j / sum_k pi_k p_k   (`proden_confidence`)
- LWS (Wen et al. 2021), s = sigmoid:  L = sum_{j in S} c_j s(-f_j) + beta sum_{j not in S} c_j s(f_j),
                                       c_j <- p_j / sum_{k in S} p_k on S, p_j / sum_{k not in S} p_k off S
- PiCO-style (Wang et al. 2022):       L = -sum_j c_j log p_j + lambda * SupCon(z1, z2; pseudo labels),
                                       c <- phi c + (1 - phi) onehot(argmax_{j in S} <z, mu_j>)
                                       with class prototypes mu (EMA of normalised embeddings)
- CR-DPLL (Wu et al. 2022):            L = -sum_{j not in S} log(1 - p_j) + lambda(t) sum_v KL(c || p_v),
                                       c_j <- (prod_v p_{v,j})^(1/V) on S, normalised
- naive MSE (seed 000):                L = mean_j (sigmoid(f_j) - y_j)^2, y = multi-hot candidate vector
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-12


def candidate_prior(cand: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(B, C) prior pi: candidate weights scaled to max 1 inside the set, `eps` outside.

    Rows without any candidate get pi = 1 everywhere (no constraint)."""
    cand = cand.float()
    inside = cand > 0
    mx = cand.amax(dim=1, keepdim=True)
    pi = torch.where(inside, cand / mx.clamp_min(_TINY), torch.full_like(cand, float(eps)))
    empty = ~inside.any(dim=1, keepdim=True)
    return torch.where(empty, torch.ones_like(pi), pi)


def uniform_confidence(cand: torch.Tensor) -> torch.Tensor:
    """(B, C) initial confidences: the candidate weights normalised to sum 1 over the set."""
    pi = candidate_prior(cand, 0.0)
    return pi / pi.sum(dim=1, keepdim=True)


def cc_loss(logits: torch.Tensor, cand: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Classifier-consistent loss: -log sum_j pi_j p_j  (B,)."""
    pi = candidate_prior(cand, eps)
    logp = F.log_softmax(logits.float(), dim=1)
    return -torch.logsumexp(logp + torch.log(pi.clamp_min(_TINY)), dim=1)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with a soft target: -sum_j t_j log p_j  (B,). This is the PRODEN/RC loss."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


rc_loss = soft_ce


@torch.no_grad()
def proden_confidence(logits: torch.Tensor, cand: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Re-estimated confidences c_j = pi_j p_j / sum_k pi_k p_k  (B, C)."""
    pi = candidate_prior(cand, eps)
    w = F.softmax(logits.float(), dim=1) * pi
    return w / w.sum(dim=1, keepdim=True).clamp_min(_TINY)


def lws_loss(logits: torch.Tensor, cand: torch.Tensor, conf: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Leveraged weighted sigmoid loss (B,): sum_S c s(-f) + beta sum_notS c s(f)."""
    f = logits.float()
    inside = (cand > 0).float()
    pos = (conf * inside * torch.sigmoid(-f)).sum(dim=1)
    neg = (conf * (1 - inside) * torch.sigmoid(f)).sum(dim=1)
    return pos + beta * neg


@torch.no_grad()
def lws_confidence(logits: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """LWS confidences: softmax renormalised separately inside and outside the set  (B, C)."""
    p = F.softmax(logits.float(), dim=1)
    inside = (cand > 0).float()
    pin, pout = p * inside, p * (1 - inside)
    return pin / pin.sum(1, keepdim=True).clamp_min(_TINY) + pout / pout.sum(1, keepdim=True).clamp_min(_TINY)


def lws_initial_confidence(cand: torch.Tensor) -> torch.Tensor:
    inside = (cand > 0).float()
    out = 1 - inside
    return inside / inside.sum(1, keepdim=True).clamp_min(1) + out / out.sum(1, keepdim=True).clamp_min(1)


def complementary_loss(logits: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """-sum_{j not in S} log(1 - p_j)  (B,): pushes probability off the non-candidates."""
    p = F.softmax(logits.float(), dim=1)
    outside = (cand <= 0).float()
    return -(outside * torch.log((1 - p).clamp_min(_TINY))).sum(dim=1)


def kl_to_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits))  (B,)."""
    logp = F.log_softmax(logits.float(), dim=1)
    t = target.float()
    return (t * (torch.log(t.clamp_min(_TINY)) - logp)).sum(dim=1)


@torch.no_grad()
def cr_confidence(logits_views: list[torch.Tensor], cand: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """CR-DPLL confidences: geometric mean over views of p, times the prior, normalised  (B, C)."""
    logp = torch.stack([F.log_softmax(lg.float(), dim=1) for lg in logits_views]).mean(0)
    pi = candidate_prior(cand, eps)
    w = torch.exp(logp) * pi
    return w / w.sum(dim=1, keepdim=True).clamp_min(_TINY)


def mse_loss(logits: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Naive baseline: mean_j (sigmoid(f_j) - y_j)^2 with y the multi-hot candidate vector  (B,)."""
    y = (cand > 0).float()
    return ((torch.sigmoid(logits.float()) - y) ** 2).mean(dim=1)


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over 2B normalised embeddings (B,): positives share a label.

    L_i = -mean_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    y = torch.cat([labels, labels])
    n = z.shape[0]
    sim = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, -1e4)
    logprob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    per = -(logprob * pos).sum(1) / pos.sum(1).clamp_min(1)
    return per.view(2, -1).mean(0)


@torch.no_grad()
def pico_pseudo_target(emb: torch.Tensor, prototypes: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """One-hot (B, C) of the candidate whose prototype is most similar to the normalised embedding."""
    sim = F.normalize(emb.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).t()
    sim = sim.masked_fill(cand <= 0, -1e4)
    return F.one_hot(sim.argmax(1), cand.shape[1]).float()
