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
Noise (`noise_std`, times the clip's std) and mixing with another clip of the batch (`mix_prob`,
`mix_max`) make the views of contrastive pretraining (`AugmentConfig.views()`); every
augmentation leaves the padded frames as they were.
`mixup(x, y, alpha)` mixes a batch with a permutation of itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class AugmentConfig:
    """Which augmentations, how strong. `fill` of the masks: "mean" (the `fill` vector given to
    `augment`, the feature mean) or "clip" (each clip's own mean)."""

    gain_db: float = 6.0
    shift: int = 10
    time_masks: int = 2
    time_width: float = 0.1
    freq_masks: int = 2
    freq_width: int = 8
    freq_warp: float = 0.0
    time_warp: float = 0.0
    noise_std: float = 0.0       # Gaussian noise in the log domain, times the clip's std
    mix_prob: float = 0.0        # probability of mixing with another clip of the batch
    mix_max: float = 0.35        # its weight in the power domain, uniform in [0, mix_max]
    fill: str = "mean"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def for_features(cls, frontend: str, frame_rate: float) -> "AugmentConfig":
        """`train`'s defaults for a store's frames: the shift stays 0.1 s at any frame rate (10
        log-mel frames, 1 frame of a 12.5 Hz encoder), and encoder frames get no gain (adding a
        constant to log-mel changes the level; to an embedding it only adds a bias)."""
        return cls(shift=max(0, int(round(0.1 * float(frame_rate)))),
                   gain_db=0.0 if frontend == "encoder" else cls.gain_db)

    @classmethod
    def none(cls):
        return cls(gain_db=0.0, shift=0, time_masks=0, time_width=0.0, freq_masks=0, freq_width=0)

    @classmethod
    def views(cls):
        """Views for contrastive pretraining: masks, gain, noise, mixing and both warps."""
        return cls(gain_db=6.0, shift=0, time_masks=2, time_width=0.15, freq_masks=2, freq_width=8, freq_warp=0.1,
                   time_warp=0.2, noise_std=0.2, mix_prob=0.5, fill="clip")

    @classmethod
    def weak(cls):
        """The weak view of consistency objectives: a little gain and noise."""
        return cls(gain_db=3.0, shift=0, time_masks=0, freq_masks=0, noise_std=0.05, fill="clip")


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


def augment(x: torch.Tensor, lengths: torch.Tensor | None, cfg: AugmentConfig, fill=None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """A random view of a log-mel batch (B, T, F); padded frames stay untouched. Draws from
    `generator` (a CPU generator) when given, else from the global torch RNG.

    Order: warps, mixing (log(a e^x + w e^x_other) with the next clip of the batch, in the power
    domain as audio mixing would), gain, noise, shift, time and frequency masks.
    """
    B, T, F = x.shape
    dev, g = x.device, generator
    lengths = torch.full((B,), T, device=dev) if lengths is None else lengths.to(dev)
    valid = (torch.arange(T, device=dev)[None, :] < lengths[:, None])[..., None]      # (B, T, 1)
    vm = valid.to(x.dtype)
    n = (vm.sum((1, 2)) * F).clamp_min(1)
    mean = (x * vm).sum((1, 2)) / n                                                    # (B,)
    y = x
    if cfg.freq_warp > 0:
        y = freq_warp(y, cfg.freq_warp, g)
    if cfg.time_warp > 0:
        y = time_warp(y, lengths, cfg.time_warp, g)
    if cfg.mix_prob > 0 and B > 1:
        w = _uniform((B,), dev, g) * cfg.mix_max * (_uniform((B,), dev, g) < cfg.mix_prob).to(x.dtype)
        w_t = w[:, None, None] * torch.roll(vm, 1, 0)
        mixed = torch.logaddexp(y + torch.log1p(-w_t), torch.roll(x, 1, 0) + torch.log(w_t.clamp_min(1e-12)))
        y = torch.where(w_t > 0, mixed, y)
    if cfg.gain_db > 0:
        y = y + ((_uniform((B, 1, 1), dev, g) * 2 - 1) * (cfg.gain_db * math.log(10) / 10)).to(x.dtype)
    if cfg.noise_std > 0:
        std = (((x - mean[:, None, None]) ** 2 * vm).sum((1, 2)) / n).sqrt()
        noise = torch.randn(y.shape, generator=g).to(dev) if g is not None else torch.randn_like(y)
        y = y + noise * cfg.noise_std * std[:, None, None]
    t = torch.arange(T, device=dev)
    last = (lengths[:, None] - 1).clamp_min(0)
    if cfg.shift > 0:
        s = (_uniform((B, 1), dev, g) * (cfg.shift + 1)).long().clamp(max=cfg.shift)
        idx = torch.minimum(t[None, :] + torch.minimum(s, last), last)
        y = torch.gather(y, 1, idx[..., None].expand(B, T, F))
    keep = torch.ones(B, T, F, dtype=torch.bool, device=dev)
    for _ in range(cfg.time_masks):
        w = (_uniform((B, 1), dev, g) * cfg.time_width * lengths[:, None]).long()
        s = (_uniform((B, 1), dev, g) * (lengths[:, None] - w).clamp_min(1)).long()
        keep &= ~((t[None] >= s) & (t[None] < s + w))[..., None]
    f = torch.arange(F, device=dev)
    for _ in range(cfg.freq_masks):
        w = (_uniform((B, 1), dev, g) * (cfg.freq_width + 1)).long().clamp(max=cfg.freq_width)
        s = (_uniform((B, 1), dev, g) * (F - w + 1)).long()
        keep &= ~((f[None] >= s) & (f[None] < s + w))[:, None, :]
    if cfg.fill == "clip":
        value = mean[:, None, None].expand(B, T, F)
    else:
        value = (torch.zeros(F, device=dev) if fill is None else torch.as_tensor(fill, device=dev)).to(x.dtype)
    y = torch.where(keep, y, value)
    return torch.where(valid, y, x)


class Augment:
    """`augment` with a fixed config and mask fill, on the global torch RNG (seeded per epoch)."""

    def __init__(self, cfg: AugmentConfig | None = None, fill=None):
        self.cfg = cfg or AugmentConfig()
        self.fill = fill

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return augment(x, lengths, self.cfg, self.fill)


def augment_batch(x: torch.Tensor, lengths: torch.Tensor | None, cfg: AugmentConfig | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random view for contrastive learning (`AugmentConfig.views()` unless `cfg`); masks fill
    with the clip mean unless cfg.fill says otherwise."""
    return augment(x, lengths, cfg or AugmentConfig.views(), None, generator)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """(x', y') = lam * (x, y) + (1 - lam) * (x, y)[perm], lam ~ Beta(alpha, alpha) (one per batch)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
