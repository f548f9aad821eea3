"""Batched on-the-fly augmentation of log-mel batches on the training device.

`Augment(cfg)(x (B, T, F), lengths (B,)) -> (B, T, F)`: gain (a per-item offset in log units,
+-gain_db), a small time shift (drop up to `shift` leading frames), SpecAugment time masks
(`time_masks` masks of up to `time_width` of the item's length) and frequency masks
(`freq_masks` of up to `freq_width` bins), filled with `fill` (F,) (the feature mean, i.e. 0
after input normalisation). Uses the global torch RNG (seeded per epoch by the trainer).
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

    def to_dict(self):
        return asdict(self)

    @classmethod
    def none(cls):
        return cls(gain_db=0.0, shift=0, time_masks=0, time_width=0.0, freq_masks=0, freq_width=0)


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
