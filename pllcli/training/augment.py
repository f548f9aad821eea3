"""Batched on-the-fly augmentation of log-mel batches on the training device.

`Augment(cfg)(x (B, T, F), lengths (B,)) -> (B, T, F)`: gain (a per-item offset in log units,
+-gain_db), a small time shift (drop up to `shift` leading frames), SpecAugment time masks
(`time_masks` masks of up to `time_width` of the item's length) and frequency masks
(`freq_masks` of up to `freq_width` bins), filled with `fill` (F,) (the feature mean, i.e. 0
after input normalisation). Two length-preserving warps imitate other speakers and speaking rates:
`freq_warp` a (scale the mel axis by a factor in [1-a, 1+a], a cheap vocal-tract-length
perturbation) and `time_warp` w (move one anchor frame by up to w of the item's length and
stretch both sides linearly, SpecAugment's time warp). Uses the global torch RNG (seeded per
epoch by the trainer).
`mixup(x, y, alpha)` mixes a batch with a permutation of itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class AugmentConfig:
    gain_db: float = 6.0
    shift: int = 10
    time_masks: int = 2
    time_width: float = 0.1
    freq_masks: int = 2
    freq_width: int = 8
    freq_warp: float = 0.0
    time_warp: float = 0.0

    def to_dict(self):
        return asdict(self)

    @classmethod
    def none(cls):
        return cls(gain_db=0.0, shift=0, time_masks=0, time_width=0.0, freq_masks=0, freq_width=0)


def _lerp_gather(x: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """x (B, T, F) read at fractional positions `src` along `dim` (1 or 2) by linear interpolation.

    src is (B, T, 1) for dim=1 or (B, 1, F) for dim=2, already clamped to [0, size-1].
    """
    size = x.shape[dim]
    lo = src.floor().long().clamp(0, size - 1)
    hi = (lo + 1).clamp(max=size - 1)
    w = (src - lo.to(src.dtype)).to(x.dtype)
    shape = x.shape
    return torch.gather(x, dim, lo.expand(shape)) * (1 - w) + torch.gather(x, dim, hi.expand(shape)) * w


def _uniform(shape, device, generator=None) -> torch.Tensor:
    """U[0, 1) of `shape` on `device`; from `generator` (a CPU generator) when given, else the global RNG."""
    if generator is None:
        return torch.rand(*shape, device=device)
    return torch.rand(*shape, generator=generator).to(device)


def freq_warp(x: torch.Tensor, max_warp: float, generator=None) -> torch.Tensor:
    """(B, T, F): bin f takes the value at f * a_b, a_b ~ U[1-max_warp, 1+max_warp] (edges clamped)."""
    B, T, F = x.shape
    a = 1 + (_uniform((B, 1, 1), x.device, generator) * 2 - 1) * max_warp
    src = (torch.arange(F, device=x.device, dtype=torch.float32)[None, None, :] * a).clamp(0, F - 1)
    return _lerp_gather(x, src, 2)


def time_warp(x: torch.Tensor, lengths: torch.Tensor, max_warp: float, generator=None) -> torch.Tensor:
    """(B, T, F): the valid frames of each item are warped piecewise-linearly (one anchor moved by
    up to max_warp * length); lengths and padding are unchanged."""
    B, T, F = x.shape
    dev = x.device
    L = lengths.to(dev).float().clamp_min(2)[:, None]                     # (B, 1)
    lo, hi = torch.ones_like(L), (L - 2).clamp_min(1)
    c = ((0.25 + 0.5 * _uniform((B, 1), dev, generator)) * (L - 1)).clamp(lo, hi)   # source anchor
    d = (_uniform((B, 1), dev, generator) * 2 - 1) * max_warp * L
    c2 = (c + d).clamp(lo, hi)                                                  # its new position
    t = torch.arange(T, device=dev, dtype=torch.float32)[None, :]
    left = t * c / c2
    right = c + (t - c2) * (L - 1 - c) / (L - 1 - c2).clamp_min(1e-3)
    src = torch.where(t < c2, left, right)
    src = torch.where((t < L) & (L >= 4), src.clamp(0, T - 1), t)  # padding and very short items stay
    return _lerp_gather(x, src[..., None], 1)


class Augment:
    def __init__(self, cfg: AugmentConfig | None = None, fill=None):
        self.cfg = cfg or AugmentConfig()
        self.fill = fill

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, T, F = x.shape
        dev = x.device
        lengths = lengths.to(dev)
        fill = torch.zeros(F, device=dev, dtype=x.dtype) if self.fill is None else \
            torch.as_tensor(self.fill, device=dev, dtype=x.dtype)
        if c.gain_db > 0:
            g = (torch.rand(B, 1, 1, device=dev) * 2 - 1) * (c.gain_db * math.log(10) / 10)
            x = x + g.to(x.dtype)
        if c.freq_warp > 0:
            x = freq_warp(x, c.freq_warp)
        if c.time_warp > 0:
            x = time_warp(x, lengths, c.time_warp)
        t = torch.arange(T, device=dev)
        if c.shift > 0:
            s = torch.randint(0, c.shift + 1, (B, 1), device=dev)
            s = torch.minimum(s, (lengths[:, None] - 1).clamp_min(0))
            idx = torch.minimum(t[None, :] + s, (lengths[:, None] - 1).clamp_min(0))
            x = torch.gather(x, 1, idx[..., None].expand(B, T, F))
        keep = torch.ones(B, T, F, dtype=torch.bool, device=dev)
        for _ in range(c.time_masks):
            w = (torch.rand(B, 1, device=dev) * c.time_width * lengths[:, None]).long()
            s = (torch.rand(B, 1, device=dev) * (lengths[:, None] - w).clamp_min(1)).long()
            keep &= ~((t[None] >= s) & (t[None] < s + w))[..., None]
        f = torch.arange(F, device=dev)
        for _ in range(c.freq_masks):
            w = torch.randint(0, c.freq_width + 1, (B, 1), device=dev)
            s = (torch.rand(B, 1, device=dev) * (F - w + 1)).long()
            keep &= ~((f[None] >= s) & (f[None] < s + w))[:, None, :]
        return torch.where(keep, x, fill)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """(x', y') = lam * (x, y) + (1 - lam) * (x, y)[perm], lam ~ Beta(alpha, alpha) (one per batch)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
