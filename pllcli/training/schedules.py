"""Optimisers and learning-rate schedules of the engine.

`lr_factor(...)` is stateless (the LR multiplier at a global step), so `--resume` is exact; the
engine applies it through one `torch.optim.lr_scheduler.LambdaLR` per optimiser.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """`kind` (constant | cosine | cosine-restarts | poly | onecycle) over `epochs`, after a linear
    warm-up of `warmup_epochs`; `onecycle` ramps up over the first `pct` of the steps instead."""

    kind: str = "cosine"
    epochs: float = 1.0
    warmup_epochs: float = 0.0
    restart_epochs: float = 10.0
    restart_mult: float = 1.0
    poly_power: float = 0.9
    pct: float = 0.3

    def factor(self, step: int, steps_per_epoch: int) -> float:
        """LR multiplier at global step `step` (0-based)."""
        return lr_factor(self, step, steps_per_epoch)


def lr_factor(s: Schedule, step: int, steps_per_epoch: int) -> float:
    total = max(1, s.epochs * steps_per_epoch)
    e = step / max(1, steps_per_epoch)
    warm = s.warmup_epochs
    if s.kind == "onecycle":
        t = step / total
        if t < s.pct:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * t / s.pct)) / 2
        t = (t - s.pct) / (1 - s.pct)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * min(t, 1.0))) / 2
    if warm > 0 and e < warm:
        return max(1e-3, e / warm)
    if s.kind == "constant":
        return 1.0
    if s.kind == "cosine":
        t = (e - warm) / max(1e-9, s.epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if s.kind == "cosine-restarts":
        t, period = e - warm, s.restart_epochs
        while t >= period:
            t -= period
            period *= s.restart_mult
        return 0.5 * (1 + math.cos(math.pi * t / period))
    if s.kind == "poly":
        t = (e - warm) / max(1e-9, s.epochs - warm)
        return max(0.0, 1 - min(1.0, t)) ** s.poly_power
    raise ValueError(f"unknown LR schedule {s.kind!r}")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    """adamw | adam | sgd (Nesterov when momentum > 0) over `params`."""
    import torch
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}")
