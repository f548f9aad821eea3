"""Losses for unlabeled audio: self-supervised pretraining and semi-supervised consistency.

Pure functions over tensors (no trainer state); `pllcli.training.semi` wraps them into
objectives for `pllcli train`, `pllcli.pretrain` uses the self-supervised ones.

Notation: B batch, T frames, F features (mel bins), C classes. "logits" are raw model
outputs; `multi_label=True` means independent per-class sigmoids, otherwise one softmax.

Formulas
--------
NT-Xent (SimCLR), views z1, z2 (B, D), u = normalise(z), s_ij = u_i . u_j / tau over the 2B
stacked vectors:  l_i = -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) ),  loss = mean_i l_i,
where p(i) is the other view of the same clip.

Masked reconstruction: sum_{b,t,f} m_bt (xhat - x)^2 / (F * sum m_bt) (MSE on masked frames only).

APC (autoregressive predictive coding, shift n): mean over valid t of
|yhat_t - x_{t+n}|_1 / F, for t + n < length.

Mean-teacher consistency: softmax-MSE  sum_c (p_s - p_t)^2 / C  (p = softmax, or sigmoid when
multi-label), or KL(p_t || p_s); teacher detached. EMA update:
theta_t <- a theta_t + (1-a) theta_s with a = min(decay, 1 - 1/(step+1)).

VAT: d ~ N(0, I) normalised per example; `power_iterations` times
d <- normalise(grad_d D(p(x), p(x + xi d))); r_adv = eps d; loss = D(p(x), p(x + r_adv)),
D = KL for softmax, summed per-class binary KL for multi-label; p(x) detached.

Mixup: lam ~ Beta(a, a) (MixMatch variant: lam = max(lam, 1 - lam)),
x~ = lam x + (1-lam) x[perm], y~ = lam y + (1-lam) y[perm].

MixMatch: guess q = Sharpen(mean_k p(u_k), T); softmax sharpening q_c = p_c^(1/T) / sum_j p_j^(1/T);
multi-label (per-class sigmoid) sharpening q_c = p_c^(1/T) / (p_c^(1/T) + (1-p_c)^(1/T))
= sigmoid(logit(p_c) / T), which pushes classes away from 0.5. Labeled and unlabeled sets are
mixed (mixup over their union), L_x = soft cross-entropy (BCE for multi-label) on the labeled
part, L_u = mean squared error between probabilities and mixed guesses.

FixMatch: q = p(weak view) (detached), yhat = argmax q, mask = max q >= tau;
loss = sum_b mask_b CE(strong_b, yhat_b) / B. Multi-label: per class, target 1 where q >= tau,
0 where q <= 1 - tau, ignored otherwise; loss = sum masked BCE / (B * C).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pllcli.errors import UsageError

__all__ = [
    "nt_xent", "masked_reconstruction_loss", "apc_loss", "prefix_apc_loss", "probs", "consistency_loss",
    "ema_update", "vat_direction", "vat_loss", "sample_lambda", "mixup", "sharpen",
    "sharpen_multilabel", "guess_targets", "soft_cross_entropy", "mixmatch_loss", "fixmatch_loss",
]


# ------------------------------------------------------------------ self-supervised

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross entropy (SimCLR) between two views (B, D) each."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise UsageError(f"nt_xent: views must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise UsageError("nt_xent: temperature must be > 0")
    b = z1.shape[0]
    if b < 2:
        raise UsageError("nt_xent needs at least 2 clips per batch (negatives come from the batch)")
    z = F.normalize(torch.cat([z1, z2], 0), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def _frame_mask(lengths: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    return torch.arange(t, device=device)[None, :] < lengths.to(device)[:, None]


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between `pred` and `target` (B, T, F) over masked positions.

    `mask` is (B, T) (whole frames masked) or (B, T, F); True/1 = position was hidden from the
    encoder and counts in the loss. Returns 0 (with grad) when nothing is masked.
    """
    if pred.shape != target.shape:
        raise UsageError(f"reconstruction: shapes differ {tuple(pred.shape)} vs {tuple(target.shape)}")
    m = mask.to(pred.dtype)
    if m.dim() == 2:
        m = m[:, :, None].expand_as(pred)
    denom = m.sum()
    err = (pred - target) ** 2 * m
    return err.sum() / denom.clamp_min(1.0)


def apc_loss(pred: torch.Tensor, x: torch.Tensor, shift: int = 3,
             lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Future-frame L1 loss: frame t of `pred` predicts frame t + shift of `x` (both (B, T, F))."""
    if shift < 1:
        raise UsageError("apc: shift must be >= 1")
    b, t, f = x.shape
    if t <= shift:
        raise UsageError(f"apc: clips of {t} frames are too short for shift {shift}")
    valid = _frame_mask(lengths, b, t, x.device)[:, shift:]  # target frame t+shift exists
    diff = (pred[:, : t - shift] - x[:, shift:]).abs().mean(-1)
    v = valid.to(diff.dtype)
    return (diff * v).sum() / v.sum().clamp_min(1.0)


def prefix_apc_loss(pred: torch.Tensor, x: torch.Tensor, cut: torch.Tensor,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Future-frame L1 loss for encoders that see a prefix: pred (B, K, F) predicts x[b, cut_b + k].

    Mean over valid (b, k) (cut_b + k < length_b) of |pred[b, k] - x[b, cut_b + k]|_1 / F.
    """
    b, k, f = pred.shape
    t = x.shape[1]
    pos = cut.to(x.device)[:, None] + torch.arange(k, device=x.device)[None, :]      # (B, K)
    lens = lengths.to(x.device) if lengths is not None else torch.full((b,), t, device=x.device)
    valid = pos < lens[:, None]
    idx = pos.clamp(max=t - 1)
    tgt = torch.gather(x, 1, idx[..., None].expand(b, k, f))
    diff = (pred - tgt).abs().mean(-1)
    v = valid.to(diff.dtype)
    return (diff * v).sum() / v.sum().clamp_min(1.0)


# ------------------------------------------------------------------ consistency

def probs(logits: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)


def _divergence(p_target: torch.Tensor, logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Mean over the batch of KL(p_target || p(logits)); binary KL summed over classes if multi-label."""
    eps = 1e-8
    if multi_label:
        pt = p_target.clamp(eps, 1 - eps)
        kl = pt * (pt.log() - F.logsigmoid(logits)) + (1 - pt) * ((1 - pt).log() - F.logsigmoid(-logits))
        return kl.sum(-1).mean()
    logq = F.log_softmax(logits, -1)
    return (p_target * (p_target.clamp_min(eps).log() - logq)).sum(-1).mean()


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "mse",
                     multi_label: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-teacher consistency between student and (detached) teacher predictions.

    kind "mse": mean over batch and classes of (p_s - p_t)^2; "kl": KL(p_t || p_s).
    `weights` (B,) optionally weights (or masks) the examples.
    """
    pt = probs(teacher_logits.detach(), multi_label)
    if kind == "mse":
        per = ((probs(student_logits, multi_label) - pt) ** 2).mean(-1)
    elif kind == "kl":
        eps = 1e-8
        if multi_label:
            ptc = pt.clamp(eps, 1 - eps)
            per = (ptc * (ptc.log() - F.logsigmoid(student_logits))
                   + (1 - ptc) * ((1 - ptc).log() - F.logsigmoid(-student_logits))).mean(-1)
        else:
            per = (pt * (pt.clamp_min(eps).log() - F.log_softmax(student_logits, -1))).sum(-1)
    else:
        raise UsageError(f"consistency: unknown kind {kind!r} (mse or kl)")
    if weights is None:
        return per.mean()
    w = weights.to(per.dtype)
    return (per * w).sum() / w.sum().clamp_min(1.0)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float, step: int) -> float:
    """theta_t <- a theta_t + (1 - a) theta_s, a = min(decay, 1 - 1/(step + 1)); buffers copied.

    Returns the `a` used. Early steps use the true running average (step 0 copies the student).
    """
    a = min(decay, 1.0 - 1.0 / (step + 1))
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(a).add_(ps.detach(), alpha=1 - a)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)
    return a


def _l2_normalise(d: torch.Tensor) -> torch.Tensor:
    flat = d.reshape(d.shape[0], -1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape_as(d)


def vat_direction(forward_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  p_clean: torch.Tensor, xi: float = 1e-6, power_iterations: int = 1,
                  multi_label: bool = False, mask: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit (per example) adversarial direction by power iteration on the KL's Hessian.

    `forward_fn(x) -> logits`; `p_clean` are detached clean probabilities; `mask` (same shape as
    x, or broadcastable) zeros padding so that the perturbation stays inside the clip.
    """
    if power_iterations < 1:
        raise UsageError("vat: power_iterations must be >= 1")
    d = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if generator is not None \
        else torch.randn_like(x)
    if mask is not None:
        d = d * mask
    d = _l2_normalise(d)
    x = x.detach()
    for _ in range(power_iterations):
        d = d.detach().requires_grad_(True)
        dist = _divergence(p_clean, forward_fn(x + xi * d), multi_label)
        (grad,) = torch.autograd.grad(dist, d)
        if mask is not None:
            grad = grad * mask
        d = _l2_normalise(grad.detach())
    return d


def vat_loss(forward_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             logits: torch.Tensor | None = None, xi: float = 1e-6, eps: float | torch.Tensor = 1.0,
             power_iterations: int = 1, multi_label: bool = False,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Virtual adversarial training loss (Miyato et al.): D(p(x), p(x + eps * d_adv)).

    `eps` is the L2 norm of the perturbation per example: a float, or a tensor broadcastable to x
    (e.g. (B, 1, 1) to scale with each clip's length). Model modules with batch norm should be in a state where the extra forward passes do not
    disturb running statistics (the trainer wrapper handles this).
    """
    if xi <= 0 or (torch.as_tensor(eps) <= 0).any():
        raise UsageError("vat: xi and eps must be > 0")
    with torch.no_grad():
        clean = logits.detach() if logits is not None else forward_fn(x)
        p_clean = probs(clean, multi_label)
    d = vat_direction(forward_fn, x, p_clean, xi=xi, power_iterations=power_iterations,
                      multi_label=multi_label, mask=mask)
    return _divergence(p_clean, forward_fn(x.detach() + eps * d), multi_label)


# ------------------------------------------------------------------ mixup / MixMatch / FixMatch

def sample_lambda(alpha: float, n: int | None = None, mixmatch: bool = False) -> torch.Tensor:
    """lam ~ Beta(alpha, alpha) (scalar, or (n,) per example); MixMatch keeps lam >= 0.5."""
    if alpha <= 0:
        raise UsageError("mixup: alpha must be > 0")
    shape = () if n is None else (n,)
    lam = torch.distributions.Beta(float(alpha), float(alpha)).sample(shape)
    if mixmatch:
        lam = torch.maximum(lam, 1 - lam)
    return lam


def mixup(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor | float, perm: torch.Tensor | None = None,
          lengths: torch.Tensor | None = None):
    """Mix each example with example perm[b]: returns (x_mix, y_mix, lengths_mix, perm).

    `lam` is a scalar or (B,) per example. Mixed clips last as long as the longer of the pair.
    """
    b = x.shape[0]
    if perm is None:
        perm = torch.randperm(b, device=x.device)
    lam_t = torch.as_tensor(lam, dtype=x.dtype, device=x.device)
    lx = lam_t.reshape(-1, *([1] * (x.dim() - 1))) if lam_t.dim() else lam_t
    ly = lam_t.reshape(-1, *([1] * (y.dim() - 1))) if lam_t.dim() else lam_t
    x_mix = lx * x + (1 - lx) * x[perm]
    y_mix = ly * y + (1 - ly) * y[perm].to(y.dtype)
    len_mix = torch.maximum(lengths, lengths[perm]) if lengths is not None else None
    return x_mix, y_mix, len_mix, perm


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax sharpening: p_c^(1/T) / sum_j p_j^(1/T) (T -> 0 gives one-hot)."""
    if temperature <= 0:
        raise UsageError("sharpen: temperature must be > 0")
    logp = p.clamp_min(1e-12).log() / temperature
    return torch.softmax(logp, -1)


def sharpen_multilabel(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-class sigmoid sharpening: sigmoid(logit(p) / T) = p^(1/T) / (p^(1/T) + (1-p)^(1/T))."""
    if temperature <= 0:
        raise UsageError("sharpen: temperature must be > 0")
    pc = p.clamp(1e-7, 1 - 1e-7)
    return torch.sigmoid(torch.logit(pc) / temperature)


def guess_targets(logits_views: Sequence[torch.Tensor], temperature: float = 0.5,
                  multi_label: bool = False) -> torch.Tensor:
    """MixMatch label guess: average the K views' probabilities, then sharpen (detached)."""
    if len(logits_views) < 1:
        raise UsageError("mixmatch: need at least one augmented view")
    with torch.no_grad():
        p = torch.stack([probs(lg.detach(), multi_label) for lg in logits_views]).mean(0)
        return sharpen_multilabel(p, temperature) if multi_label else sharpen(p, temperature)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """Mean over batch of -sum_c y_c log p_c (softmax), or mean BCE over classes (multi-label)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1).mean()
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()


def mixmatch_loss(forward_fn: Callable[..., torch.Tensor], x_l: torch.Tensor, y_l: torch.Tensor,
                  u_views: Sequence[torch.Tensor], temperature: float = 0.5, alpha: float = 0.75,
                  multi_label: bool = False, lengths_l: torch.Tensor | None = None,
                  lengths_u: torch.Tensor | None = None, guess: torch.Tensor | None = None,
                  lam: float | None = None, perm: torch.Tensor | None = None):
    """MixMatch (Berthelot et al. 2019). Returns (L_x, L_u, guessed targets).

    `forward_fn(x, lengths) -> logits`. x_l (B, T, F), y_l (B, C) targets (one-hot / candidate
    distribution / tag vector), u_views: K augmented versions (U, T, F) of the unlabeled batch.
    `guess`, `lam` and `perm` may be passed to make the result deterministic (tests).
    """
    k = len(u_views)
    if k < 1:
        raise UsageError("mixmatch: need K >= 1 augmentations")
    if guess is None:
        with torch.no_grad():
            guess = guess_targets([forward_fn(u, lengths_u) for u in u_views], temperature, multi_label)
    nb = x_l.shape[0]
    t = max(x_l.shape[1], u_views[0].shape[1])

    def pad(a):
        return F.pad(a, (0, 0, 0, t - a.shape[1])) if a.shape[1] < t else a

    xs = torch.cat([pad(x_l)] + [pad(u) for u in u_views], 0)
    ys = torch.cat([y_l.to(guess.dtype)] + [guess] * k, 0)
    lens = None
    if lengths_l is not None or lengths_u is not None:
        ll = lengths_l if lengths_l is not None else torch.full((nb,), x_l.shape[1], device=x_l.device)
        lu = lengths_u if lengths_u is not None else torch.full((u_views[0].shape[0],), u_views[0].shape[1],
                                                                device=x_l.device)
        lens = torch.cat([ll] + [lu] * k, 0)
    if lam is None:
        lam = float(sample_lambda(alpha, mixmatch=True))
    x_mix, y_mix, len_mix, _ = mixup(xs, ys, lam, perm=perm, lengths=lens)
    logits = forward_fn(x_mix, len_mix)
    loss_x = soft_cross_entropy(logits[:nb], y_mix[:nb], multi_label)
    loss_u = ((probs(logits[nb:], multi_label) - y_mix[nb:]) ** 2).mean()
    return loss_x, loss_u, guess


def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float = 0.95,
                  multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch (Sohn et al. 2020). Returns (loss, mask fraction)."""
    if not 0 < threshold <= 1:
        raise UsageError("fixmatch: threshold must be in (0, 1]")
    q = probs(logits_weak.detach(), multi_label)
    if multi_label:
        pos = q >= threshold
        neg = q <= 1 - threshold
        m = (pos | neg).to(logits_strong.dtype)
        bce = F.binary_cross_entropy_with_logits(logits_strong, pos.to(logits_strong.dtype), reduction="none")
        return (bce * m).sum() / bce.numel(), m.mean()
    conf, yhat = q.max(-1)
    m = (conf >= threshold).to(logits_strong.dtype)
    ce = F.cross_entropy(logits_strong, yhat, reduction="none")
    return (ce * m).sum() / max(ce.shape[0], 1), m.mean()
