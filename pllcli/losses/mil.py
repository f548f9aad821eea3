"""Multi-label and multiple-instance (MIL) losses for weakly labelled audio.

Shapes: frame-level outputs are `(B, T, C)` (or `(B, T)` for a single class, e.g. the
class-agnostic WHEN detector); clip-level outputs and targets are `(B, C)` (or `(B,)`).
A `mask` is a `(B, T)` bool tensor, True on real (non-padded) frames; build it with
`lengths_to_mask(lengths, T)`; `scale_lengths` converts input-frame lengths to the
time resolution of a model's `frame_logits`.

Pooling functions (frame probabilities -> clip probability), all masked:
  max            p = max_t p_t
  mean           p = mean_t p_t
  noisy_or       p = 1 - prod_t (1 - p_t)          (computed in log space)
  linear_softmax p = sum_t p_t**2 / sum_t p_t
  attention      p = sum_t w_t p_t, w = softmax_t(Linear(h_t))   (`AttentionPool`, learnable)

MMM loss (Morfi & Stowell, "Deep learning on low-resource datasets", eq. 5), per bag
(clip) b and class c with bag label y in {0, 1} and frame probabilities p_1..p_T:

    L_bc = ( BCE(max_t p_t, y) + BCE(mean_t p_t, y / 2) + BCE(min_t p_t, 0) ) / 3

with BCE(p, y) = -(y log p + (1 - y) log(1 - p)). A negative clip thus pushes its max, mean
and min to 0; a positive clip pushes its max to 1, its mean to 0.5 and its min to 0. The
loss is the mean of L_bc over bags and classes (`reduction="mean"`), or their sum, or the
(B, C) matrix (`"none"`). Max and min are taken on logits and go through
`binary_cross_entropy_with_logits` (sigmoid is monotone, so this equals BCE on the max/min
probability, without its rounding); the mean is taken on probabilities clamped to
[eps, 1 - eps]. Note that a positive clip cannot reach 0: its floor is ln(2) / 3 from the
mean term, which keeps a gradient on every frame (the point of the loss).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pllcli.errors import UsageError

POOLINGS = ("max", "mean", "noisy_or", "linear_softmax", "attention")
EPS = 1e-7


# ------------------------------------------------------------------ masks and shapes

def lengths_to_mask(lengths: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """(B,) frame counts -> (B, T) bool mask (True = real frame); None -> None."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    return torch.arange(T, device=lengths.device)[None, :] < lengths.clamp(min=1)[:, None]


def scale_lengths(lengths: torch.Tensor | None, t_in: int, t_out: int) -> torch.Tensor | None:
    """Lengths counted in input frames -> lengths in a model's output frames (ceil, >= 1)."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    out = torch.ceil(lengths.double() * t_out / max(1, t_in)).long()
    return out.clamp(min=1, max=t_out)


def _as3d(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.dim() == 2:
        return x.unsqueeze(-1), True
    if x.dim() != 3:
        raise ValueError(f"frame-level input must be (B, T) or (B, T, C), got shape {tuple(x.shape)}")
    return x, False


def _mask3(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match frames {tuple(x.shape[:2])}")
    return mask.to(torch.bool).unsqueeze(-1)


def _out(p: torch.Tensor, squeeze: bool) -> torch.Tensor:
    return p.squeeze(-1) if squeeze else p


# ------------------------------------------------------------------ pooling functions

def _extreme_pool(x: torch.Tensor, mask: torch.Tensor | None, largest: bool) -> torch.Tensor:
    """Max (or min) over the real frames: padded frames are filled with -inf (or +inf)."""
    x, sq = _as3d(x)
    m = _mask3(mask, x)
    if m is not None:
        x = x.masked_fill(~m, float("-inf") if largest else float("inf"))
    return _out(x.amax(dim=1) if largest else x.amin(dim=1), sq)


def max_pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Max over frames (works on probabilities or logits)."""
    return _extreme_pool(x, mask, largest=True)


def min_pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Min over frames (works on probabilities or logits)."""
    return _extreme_pool(x, mask, largest=False)


def mean_pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real frames."""
    x, sq = _as3d(x)
    m = _mask3(mask, x)
    if m is None:
        return _out(x.mean(dim=1), sq)
    m = m.to(x.dtype)
    return _out((x * m).sum(1) / m.sum(1).clamp(min=1.0), sq)


def noisy_or_pool(p: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """1 - prod_t (1 - p_t), as 1 - exp(sum_t log(1 - p_t)) over real frames."""
    p, sq = _as3d(p)
    m = _mask3(mask, p)
    log_q = torch.log1p(-p.clamp(0.0, 1.0 - eps))
    if m is not None:
        log_q = log_q * m.to(p.dtype)
    return _out(-torch.expm1(log_q.sum(1)), sq)


def linear_softmax_pool(p: torch.Tensor, mask: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """sum_t p_t^2 / sum_t p_t over real frames (Wang et al., 2019)."""
    p, sq = _as3d(p)
    m = _mask3(mask, p)
    if m is not None:
        p = p * m.to(p.dtype)
    return _out((p * p).sum(1) / p.sum(1).clamp(min=eps), sq)


class AttentionPool(nn.Module):
    """Attention pooling: clip p_c = sum_t w_tc p_tc with w_.c = softmax_t(Linear(h_t))_c.

    `in_features` is the size of the per-frame vectors the weights are computed from (frame
    embeddings, or the frame logits themselves when `features` is not given to forward).
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.att = nn.Linear(self.in_features, self.num_classes)

    def weights(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.att(features)
        if mask is not None:
            a = a.masked_fill(~mask.to(torch.bool).unsqueeze(-1), float("-inf"))
        return torch.softmax(a, dim=1)

    def forward(self, frame_probs: torch.Tensor, features: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        p, sq = _as3d(frame_probs)
        h = p if features is None else features
        if h.shape[-1] != self.in_features:
            raise ValueError(f"AttentionPool expects {self.in_features} features per frame, got {h.shape[-1]}")
        w = self.weights(h, mask)
        return _out((w * p).sum(1), sq)


def check_pooling(name: str) -> str:
    name = name.replace("-", "_").lower()
    if name not in POOLINGS:
        raise UsageError(f"unknown MIL pooling {name!r} (choose from {', '.join(POOLINGS)})")
    return name


def pool(frame_probs: torch.Tensor, method: str, mask: torch.Tensor | None = None,
         attention: AttentionPool | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
    """Pool frame probabilities (B, T[, C]) to clip probabilities (B[, C]) with `method`."""
    method = check_pooling(method)
    if method == "max":
        return max_pool(frame_probs, mask)
    if method == "mean":
        return mean_pool(frame_probs, mask)
    if method == "noisy_or":
        return noisy_or_pool(frame_probs, mask)
    if method == "linear_softmax":
        return linear_softmax_pool(frame_probs, mask)
    if attention is None:
        raise UsageError("attention pooling needs an AttentionPool module (learnable weights)")
    return attention(frame_probs, features, mask)


# ------------------------------------------------------------------ losses

def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def _bce_prob(p: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    p = p.clamp(eps, 1.0 - eps)
    return F.binary_cross_entropy(p, y.to(p.dtype), reduction="none")


def prob_bce_loss(p: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """BCE between pooled clip probabilities p (already in (0, 1), clamped) and bag labels y."""
    return _reduce(_bce_prob(p, y), reduction)


def mmm_loss(frame_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
             reduction: str = "mean", eps: float = EPS) -> torch.Tensor:
    """Max-mean-min MIL loss (see the module docstring for the formula and averaging).

    frame_logits: (B, T) or (B, T, C) pre-sigmoid frame outputs; targets: (B,) or (B, C)
    bag labels in [0, 1]; mask: (B, T) real frames.
    """
    y = targets.to(frame_logits.dtype)
    mx = max_pool(frame_logits, mask)
    mn = min_pool(frame_logits, mask)
    mean_p = mean_pool(torch.sigmoid(frame_logits), mask)
    if y.shape != mx.shape:
        raise ValueError(f"targets shape {tuple(y.shape)} does not match pooled shape {tuple(mx.shape)}")
    l_max = F.binary_cross_entropy_with_logits(mx, y, reduction="none")
    l_mean = _bce_prob(mean_p, 0.5 * y, eps)
    l_min = F.binary_cross_entropy_with_logits(mn, torch.zeros_like(y), reduction="none")
    return _reduce((l_max + l_mean + l_min) / 3.0, reduction)


def mil_loss(frame_logits: torch.Tensor, targets: torch.Tensor, pooling: str = "max",
             mask: torch.Tensor | None = None, attention: AttentionPool | None = None,
             features: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """BCE between the pooled clip probability and the bag label; `pooling="mmm"` gives `mmm_loss`."""
    if pooling.lower() == "mmm":
        return mmm_loss(frame_logits, targets, mask, reduction)
    pooling = check_pooling(pooling)
    y = targets.to(frame_logits.dtype)
    if pooling == "max":  # exact and stable on logits
        return _reduce(F.binary_cross_entropy_with_logits(max_pool(frame_logits, mask), y,
                                                          reduction="none"), reduction)
    if pooling == "noisy_or":  # in log space: log(1 - P) = sum_t log(1 - p_t) = sum_t logsigmoid(-z_t)
        z, sq = _as3d(frame_logits)
        m = _mask3(mask, z)
        log_q = F.logsigmoid(-z)
        if m is not None:
            log_q = log_q * m.to(z.dtype)
        s = _out(log_q.sum(1), sq).clamp(max=-EPS)  # log(1 - P) <= 0
        loss = -(y * torch.log(-torch.expm1(s)) + (1 - y) * s)
        return _reduce(loss, reduction)
    clip = pool(torch.sigmoid(frame_logits), pooling, mask, attention, features)
    return _reduce(_bce_prob(clip, y), reduction)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """Multi-label BCE on clip logits (B, C) vs multi-hot/soft targets (B, C); mean over B*C.

    `weight` (B,) scales each clip (e.g. a has_tags mask); with `reduction="mean"` the loss is
    divided by the total weight x C, so masked clips do not dilute it.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    if weight is None:
        return _reduce(loss, reduction)
    w = weight.to(logits.dtype).reshape(-1, 1)
    loss = loss * w
    if reduction == "mean":
        return loss.sum() / (w.sum() * logits.shape[1]).clamp(min=1.0)
    return _reduce(loss, reduction)


def margin_targets(targets: torch.Tensor) -> torch.Tensor:
    """Multi-hot (B, C) -> the index layout MultiLabelMarginLoss wants: positives first, then -1."""
    pos = targets > 0.5
    C = targets.shape[1]
    idx = torch.arange(C, device=targets.device).expand_as(targets)
    key = torch.where(pos, idx, idx + C)
    srt = key.sort(dim=1).values
    return torch.where(srt < C, srt, torch.full_like(srt, -1)).long()


def hinge_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Multi-label hinge (torch MultiLabelMarginLoss): per clip
    sum_{i in y, j not in y} max(0, 1 - (x_i - x_j)) / C. A clip with no positive tag gives 0."""
    return F.multilabel_margin_loss(logits, margin_targets(targets), reduction=reduction)


MULTILABEL_LOSSES = {"bce": bce_loss, "hinge": hinge_loss}


def multilabel_loss(name: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if name not in MULTILABEL_LOSSES:
        raise UsageError(f"unknown multi-label loss {name!r} (choose from {', '.join(MULTILABEL_LOSSES)})")
    return MULTILABEL_LOSSES[name](logits, targets)


__all__ = [
    "POOLINGS", "lengths_to_mask", "scale_lengths", "max_pool", "min_pool", "mean_pool",
    "noisy_or_pool", "linear_softmax_pool", "AttentionPool", "pool", "check_pooling", "mmm_loss",
    "mil_loss", "bce_loss", "hinge_loss", "margin_targets", "multilabel_loss",
]
