"""Objectives: the pieces of the training loss, each with a weight schedule.

Writing an objective (this is how `pllcli/training/semi.py` and `weak.py` plug in)::

    from pllcli.training.objectives import Objective, register_objective

    @register_objective("my-loss")
    class MyLoss(Objective):
        '''One line shown by `pllcli train --list-objectives`.'''
        items = ("unlabeled", "candidates")    # which items the trainer must put into batches
        def __init__(self, temperature: float = 0.5, **kw):
            super().__init__(**kw)              # takes weight, schedule, start, end
            self.temperature = temperature
        def loss(self, ctx):                    # -> scalar tensor, or None (nothing to do here)
            m = ctx.mask("unlabeled")           # (B,) bool
            if not m.any():
                return None
            strong = ctx.view(1)                # outputs of a 2nd augmented view (cached per step)
            teacher = ctx.teacher_out()         # EMA teacher on the un-augmented batch (no grad)
            ...

CLI spec: `--objective NAME[:KEY=VALUE,...]`, e.g. `--objective "proden:eps=0.01"`,
`--objective "consistency:weight=10,schedule=sigmoid,start=0,end=5"`. `weight`, `schedule`
(constant | linear | sigmoid), `start`, `end` (epochs, fractional allowed) are common to all;
other keys go to the objective's constructor.

Weight at training progress e (epochs, fractional): 0 before `start`; constant: w;
linear: w * clip((e - start) / (end - start), 0, 1); sigmoid ramp-up (Laine & Aila):
w * exp(-5 (1 - t)^2) with t = clip((e - start) / (end - start), 0, 1); w after `end`.

Step context (`StepContext`): model, batch (dict of tensors on the device: x (B, T, F),
lengths, index (row in the feature store), candidates (B, C) weights — for items with a clean
label, the one-hot of that label — has_candidates, clean (B,) -1 unknown, tags, has_tags, soft,
has_soft, unlabeled), out (the plain forward pass on the augmented batch: logits, embedding[,
frame_logits]), epoch (0-based), step (global), progress (fractional epoch), epochs,
num_classes, task, device, view(k), teacher_out(), forward(x, lengths), augment(x, lengths),
mask(kind), dist (rank, world_size, gather_rows(index, rows)), cache (per-step dict).

While an objective's weight is 0 (e.g. before its `start`), the trainer does not call `loss` but
calls `observe(ctx)` (no gradient): objectives with per-item state use it to keep that state
current (PRODEN re-estimates its confidences from the warming-up model), so that when the weight
turns on the state already carries what the model has learnt.

Objectives with per-item state (e.g. PRODEN confidences) keep it in tensors returned by
`state_dict()` so that `--resume` restores it; `metrics()` adds figures to the epoch log.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from pllcli.errors import UsageError

ITEM_KINDS = ("clean", "candidates", "tags", "soft", "unlabeled")
SCHEDULES = ("constant", "linear", "sigmoid")

_REGISTRY: dict[str, type] = {}


def register_objective(name: str):
    """Class decorator adding an Objective subclass to the registry under `name`."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_builtin() -> None:
    import importlib
    from pllcli.training import pll_objectives  # noqa: F401
    for mod in ("pllcli.training.semi", "pllcli.training.weak"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # other areas not written yet
            if e.name != mod:
                raise


def list_objectives() -> dict[str, str]:
    """{name: first docstring line}."""
    _load_builtin()
    return {k: (v.__doc__ or "").strip().splitlines()[0] if v.__doc__ else "" for k, v in sorted(_REGISTRY.items())}


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


def parse_objective_spec(spec: str) -> tuple[str, dict]:
    """'name:key=val,key=val' -> (name, {key: parsed value})."""
    from pllcli.models import _parse_value
    name, _, rest = spec.strip().partition(":")
    kw = {}
    for part in rest.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise UsageError(f"--objective {spec!r}: options must look like KEY=VALUE, got {part!r}")
        k, v = part.split("=", 1)
        kw[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return name.strip(), kw


def build_objective(spec: str | tuple[str, dict]) -> Objective:
    """An objective from a spec string or (name, kwargs)."""
    _load_builtin()
    name, kw = parse_objective_spec(spec) if isinstance(spec, str) else spec
    if name not in _REGISTRY:
        raise UsageError(f"unknown objective {name!r} (available: {', '.join(sorted(_REGISTRY))})")
    try:
        obj = _REGISTRY[name](**kw)
    except TypeError as e:
        raise UsageError(f"objective {name}: bad option ({e})") from None
    obj.params.update({k: v for k, v in kw.items() if k not in ("weight", "schedule", "start", "end")})
    return obj
