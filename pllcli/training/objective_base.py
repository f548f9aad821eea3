"""Objective base classes and their registry (see pllcli.training.objectives for the contract).

Builtin objectives (pll_objectives, semi, weak_objectives) import from here; the catalogue in
`objectives` loads them, so the base never imports an objective module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from pllcli.errors import UsageError

SCHEDULES = ("constant", "linear", "sigmoid")

_REGISTRY: dict[str, type] = {}


def register_objective(name: str):
    """Class decorator adding an Objective subclass to the registry under `name`."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


@dataclass
class WeightSchedule:
    """Loss weight as a function of training progress (fractional epochs)."""

    weight: float = 1.0
    kind: str = "constant"
    start: float = 0.0
    end: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise UsageError(f"unknown weight schedule {self.kind!r} (choose from {', '.join(SCHEDULES)})")
        if self.kind != "constant" and self.end <= self.start:
            raise UsageError(f"weight schedule {self.kind}: need end > start (got start={self.start}, end={self.end})")

    def __call__(self, progress: float) -> float:
        if progress < self.start:
            return 0.0
        if self.kind == "constant":
            return float(self.weight)
        t = min(1.0, max(0.0, (progress - self.start) / (self.end - self.start)))
        if self.kind == "linear":
            return float(self.weight * t)
        return float(self.weight * math.exp(-5.0 * (1.0 - t) ** 2))


class Objective:
    """Base class. Subclasses set `items` and implement `loss(ctx)`; see the module docstring."""

    name = "objective"
    items: tuple[str, ...] = ()
    needs_teacher = False

    def __init__(self, weight: float = 1.0, schedule: str = "constant", start: float = 0.0, end: float = 0.0):
        self.schedule = WeightSchedule(float(weight), schedule, float(start), float(end))
        self.params: dict[str, Any] = {}

    # -- lifecycle hooks
    def setup(self, setup: "SetupContext") -> None:
        """Called once before training (after the model exists)."""
        self.num_items, self.num_classes, self.device = setup.num_items, setup.num_classes, setup.device

    def loss(self, ctx: "StepContext"):  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, ctx: "StepContext") -> None:
        """Called instead of `loss` while the weight is 0 (under no_grad); default: nothing."""

    def end_epoch(self, epoch: int) -> None:
        """Called after each training epoch."""

    def weight(self, progress: float) -> float:
        return self.schedule(progress)

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        s = self.schedule
        return {"name": self.name, "weight": s.weight, "schedule": s.kind, "start": s.start, "end": s.end,
                **self.params}


@dataclass
class SetupContext:
    num_items: int            # rows in the feature store (batch["index"] < num_items)
    num_classes: int
    device: Any
    task: str = "single"
    classes: list = field(default_factory=list)
    dist: Any = None


class StepContext:
    """What an objective sees in one training step (see the module docstring)."""

    def __init__(self, model, batch, out, *, epoch, step, progress, epochs, num_classes, task, device,
                 forward: Callable, augment: Callable, teacher=None, dist=None):
        self.model, self.batch, self.out = model, batch, out
        self.epoch, self.step, self.progress, self.epochs = epoch, step, progress, epochs
        self.num_classes, self.task, self.device = num_classes, task, device
        self.forward, self.augment = forward, augment
        self.teacher, self.dist = teacher, dist
        self.cache: dict = {}

    def mask(self, kind: str):
        """(B,) bool mask of the items of one kind in this batch."""
        b = self.batch
        if kind == "clean":
            return b["clean"] >= 0
        if kind == "candidates":
            return b["has_candidates"]
        if kind == "tags":
            return b["has_tags"]
        if kind == "soft":
            return b["has_soft"]
        if kind == "unlabeled":
            return b["unlabeled"]
        if kind == "all":
            return b["clean"] > -2
        raise KeyError(f"unknown item kind {kind!r}")

    def view(self, k: int = 1):
        """Outputs of the model on the k-th extra augmented view of the batch (k >= 1, cached)."""
        key = ("view", k)
        if key not in self.cache:
            b = self.batch
            self.cache[key] = self.forward(self.augment(b["x_raw"], b["lengths"]), b["lengths"])
        return self.cache[key]

    def teacher_out(self):
        """EMA teacher (or the model itself in eval if no EMA) on the un-augmented batch, no grad."""
        import torch
        if "teacher" not in self.cache:
            b = self.batch
            net = self.teacher if self.teacher is not None else self.model
            with torch.no_grad():
                was = net.training
                net.eval()
                self.cache["teacher"] = self.forward(b["x_raw"], b["lengths"], model=net)
                net.train(was)
        return self.cache["teacher"]
