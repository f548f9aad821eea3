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

from pllcli.errors import UsageError
from pllcli.training.objective_base import (  # noqa: F401  (the objective API, re-exported)
    _REGISTRY, SCHEDULES, Objective, SetupContext, StepContext, WeightSchedule, register_objective)


def _load_builtin() -> None:
    from pllcli.training import pll_objectives, semi, weak_objectives  # noqa: F401  (they register themselves)


def list_objectives() -> dict[str, str]:
    """{name: first docstring line}."""
    _load_builtin()
    return {k: (v.__doc__ or "").strip().splitlines()[0] if v.__doc__ else "" for k, v in sorted(_REGISTRY.items())}


COMMON_KEYS = ("weight", "schedule", "start", "end")  # Objective.__init__: every objective takes them


def objective_class(name: str, flag: str = "--objective") -> type:
    """The registered Objective subclass `name`; UsageError naming `flag` when unknown."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UsageError(f"{flag}: unknown objective {name!r} (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def build_objective(spec: str | tuple[str, dict], flag: str = "--objective") -> Objective:
    """An objective from 'name:key=val,...' or (name, kwargs); values are coerced by the class's
    __init__ type hints (pllcli.spec); unknown keys and bad values are UsageErrors naming `flag`."""
    from pllcli import spec as _spec
    name, raw = _spec.parse_spec(spec, flag) if isinstance(spec, str) else spec
    cls = objective_class(name, flag)
    kw = _spec.coerce(cls, raw, f"{flag} {name}")
    obj = cls(**kw)
    obj.params.update({k: v for k, v in kw.items() if k not in COMMON_KEYS})
    return obj
