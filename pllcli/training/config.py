"""Training configs that check themselves: `TrainConfig`, `WeakConfig`, `PretrainConfig`.

Each validates in `__post_init__` (ranges, closed choices coerced to their `Enum`, non-empty
objectives), so a bad value fails before any store is opened. Errors are `UsageError`s that name
the CLI flag (`--clean-share must be in [0, 1), got 1.5`). The closed choices are str Enums, which
`pllcli.cli` uses as typer choices; members compare equal to their plain string values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from pllcli.errors import UsageError


class Choice(str, Enum):
    """A closed choice: a str Enum whose str() and f-string form are its value."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def coerce(cls, value, flag: str):
        """`value` as a member of cls, else UsageError naming `flag` and the valid values."""
        try:
            return cls(value.value if isinstance(value, Enum) else value)
        except ValueError:
            raise UsageError(f"{flag} must be one of {', '.join(cls.values())}, got {value!r}") from None


class Optimizer(Choice):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


class LRSchedule(Choice):
    cosine = "cosine"
    cosine_restarts = "cosine-restarts"
    onecycle = "onecycle"
    poly = "poly"
    constant = "constant"


class Sampler(Choice):
    natural = "natural"
    hnh = "hnh"           # half-and-half positive/negative clips (weak tags)
    balanced = "balanced"  # class-balanced sampling, PANNs style (weak tags)


class WhenWhoMode(Choice):
    separate = "separate"
    joint = "joint"
    tied = "tied"


class DataPath(Choice):
    memory = "memory"    # load the feature store into memory (float32)
    stream = "stream"    # read it lazily from disk (pllcli.training.stream), bounded memory
    auto = "auto"        # stream only when the store exceeds --max-memory


class PretrainObjective(Choice):
    contrastive = "contrastive"
    masked = "masked"
    apc = "apc"


OPTIMIZERS = Optimizer.values()
LR_SCHEDULES = LRSchedule.values()
WHEN_WHO_MODES = WhenWhoMode.values()
PRETRAIN_OBJECTIVES = PretrainObjective.values()
WHEN_LOSSES = ("mmm", "max", "mean", "noisy_or", "linear_softmax", "attention")
WHO_LOSSES = ("bce", "hinge")
WHO_SAMPLERS = ("random", "balanced", "hnh")

DEFAULT_OBJECTIVES = ("cr:eps=0.01", "ce")  # see pllcli.training.trainer's docstring
DEFAULT_OBJECTIVES_NO_CLEAN = ("cr:eps=0.01",)  # the default for a store without clean labels
DEFAULT_CLEAN_SHARE = 0.25
# config keys that may change between a run and its --resume
RESUME_FREE = frozenset({"resume", "device", "progress", "outdir", "threads", "prefetch", "features", "labels",
                         "valid", "valid_labels", "init", "data", "max_memory", "loader_workers",
                         "save_every_steps", "save_every_seconds"})


def check_range(value, flag: str, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = True) -> None:
    """UsageError `FLAG must be in [lo, hi), got V` unless lo <= value < hi (bounds as given)."""
    ok = value is not None and value == value  # NaN fails
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return
    if hi is None:
        raise UsageError(f"{flag} must be {'>' if lo_open else '>='} {lo:g}, got {value}")
    if lo is None:
        raise UsageError(f"{flag} must be {'<' if hi_open else '<='} {hi:g}, got {value}")
    raise UsageError(f"{flag} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, got {value}")


def _check_data_flags(cfg) -> None:
    """--data, --max-memory (bytes), --loader-workers of a Train/PretrainConfig."""
    cfg.data = DataPath.coerce(cfg.data, "--data")
    if cfg.max_memory is not None:
        check_range(cfg.max_memory, "--max-memory (bytes)", 1)
    if cfg.loader_workers is not None:
        check_range(cfg.loader_workers, "--loader-workers", 0)


def _plain(v):
    return v.value if isinstance(v, Enum) else v


@dataclass
class TrainConfig:
    """Everything `train` needs; field names follow the `pllcli train` flags."""

    features: str
    labels: str
    outdir: str
    model: str = "convgru"
    model_options: dict = field(default_factory=dict)
    objectives: list = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    epochs: int = 20
    batch_size: int = 64
    clean_share: float = DEFAULT_CLEAN_SHARE
    sampler: Sampler = Sampler.natural
    unlabeled_share: float = 0.0
    max_frames: int | None = 300
    optimizer: Optimizer = Optimizer.adamw
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_schedule: LRSchedule = LRSchedule.cosine
    warmup_epochs: float = 1.0
    restart_epochs: float = 10.0
    restart_mult: float = 1.0
    poly_power: float = 0.9
    grad_clip: float = 5.0
    ema: float = 0.0
    top_k: int = 3
    patience: int = 0
    valid: str | None = None
    valid_labels: str | None = None
    valid_fraction: float = 0.2
    augment: dict = field(default_factory=dict)
    init: str | None = None
    freeze: bool = False
    segment_labels: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: str | None = None
    progress: bool = True
    prefetch: bool = True
    threads: int | None = None
    data: DataPath = DataPath.auto
    max_memory: int | None = None    # bytes (--max-memory); None = a share of RAM
    loader_workers: int | None = None  # DataLoader workers of the stream path; None = 0 on CPU, 2 on CUDA
    save_every_steps: int = 0        # --save-every N: last.pt mid-epoch every N steps (0 = epoch ends only)
    save_every_seconds: float = 0.0  # --save-every DURATION: ... every so many seconds

    def __post_init__(self) -> None:
        _check_data_flags(self)
        check_range(self.save_every_steps, "--save-every", 0)
        check_range(self.save_every_seconds, "--save-every", 0)
        self.optimizer = Optimizer.coerce(self.optimizer, "--optimizer")
        self.lr_schedule = LRSchedule.coerce(self.lr_schedule, "--lr-schedule")
        self.sampler = Sampler.coerce(self.sampler, "--sampler")
        check_range(self.epochs, "--epochs", 1)
        check_range(self.batch_size, "--batch-size", 1)
        check_range(self.lr, "--lr", 0, lo_open=True)
        check_range(self.weight_decay, "--weight-decay", 0)
        check_range(self.momentum, "momentum", 0, 1)
        check_range(self.clean_share, "--clean-share", 0, 1)
        check_range(self.unlabeled_share, "--unlabeled-share", 0, 1)
        if self.clean_share + self.unlabeled_share >= 1:
            raise UsageError(f"--clean-share + --unlabeled-share must be < 1, got "
                             f"{self.clean_share:g} + {self.unlabeled_share:g}")
        if self.max_frames is not None:
            check_range(self.max_frames, "--max-frames", 1)
        check_range(self.warmup_epochs, "--warmup", 0)
        check_range(self.restart_epochs, "--restart-epochs", 0, lo_open=True)
        check_range(self.restart_mult, "restart_mult", 0, lo_open=True)
        check_range(self.poly_power, "poly_power", 0, lo_open=True)
        check_range(self.grad_clip, "grad_clip", 0)
        check_range(self.ema, "--ema", 0, 1)
        check_range(self.top_k, "--top-k", 0)
        check_range(self.patience, "--patience", 0)
        check_range(self.valid_fraction, "--valid-fraction", 0, 1)
        if self.threads is not None:
            check_range(self.threads, "--threads", 1)
        if isinstance(self.objectives, str):
            self.objectives = [self.objectives]
        if not self.objectives or not all(isinstance(o, str) and o.strip() for o in self.objectives):
            raise UsageError(f"--objective: need at least one objective NAME[:KEY=VALUE,...], got {self.objectives!r}")
        if not isinstance(self.model, str) or not self.model:
            raise UsageError(f"--model must name a model, got {self.model!r}")
        for name, flag in (("model_options", "--model-opt"), ("augment", "--augment")):
            if not isinstance(getattr(self, name), dict):
                raise UsageError(f"{flag}: expected KEY=VALUE options (a dict), got {getattr(self, name)!r}")

    def semantic(self) -> dict:
        """The fields that must not change between a run and its --resume (plain values)."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items() if k not in RESUME_FREE}


@dataclass
class WeakConfig:
    """`train --when-who MODE` (WHEN/WHO training, pllcli.training.weak)."""

    mode: WhenWhoMode = WhenWhoMode.separate
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    when_pooling: str = "mmm"
    who_loss: str = "bce"
    when_hnh: bool = True
    who_sampler: str = "random"          # random | balanced | hnh
    joint_weights: tuple[float, float] = (0.5, 5.0)
    joint_hnh: bool = False
    tasks: tuple[str, ...] = ("when", "who")   # separate/tied: train only these
    seed: int = 0
    weight_decay: float = 1e-4
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if str(_plain(self.mode)) not in WHEN_WHO_MODES:
            raise UsageError(f"--when-who: unknown WHEN/WHO mode {self.mode!r} (choose from {', '.join(WHEN_WHO_MODES)})")
        self.mode = WhenWhoMode(_plain(self.mode))
        if self.when_pooling not in WHEN_LOSSES:
            raise UsageError(f"unknown WHEN loss {self.when_pooling!r} (choose from {', '.join(WHEN_LOSSES)})")
        if self.who_loss not in WHO_LOSSES:
            raise UsageError(f"unknown WHO loss {self.who_loss!r} (choose from {', '.join(WHO_LOSSES)})")
        if self.who_sampler not in WHO_SAMPLERS:
            raise UsageError(f"unknown WHO sampler {self.who_sampler!r} (choose from {', '.join(WHO_SAMPLERS)})")
        check_range(self.epochs, "--epochs", 1)
        check_range(self.batch_size, "--batch-size", 2)
        check_range(self.lr, "--lr", 0, lo_open=True)
        check_range(self.weight_decay, "--weight-decay", 0)
        self.tasks = tuple(self.tasks)
        if not self.tasks or any(t not in ("when", "who") for t in self.tasks):
            raise UsageError(f"WHEN/WHO tasks must be a non-empty subset of ('when', 'who'), got {self.tasks!r}")
        if len(self.joint_weights) != 2 or any(w < 0 for w in self.joint_weights):
            raise UsageError(f"joint_weights must be two weights >= 0, got {self.joint_weights!r}")


@dataclass
class PretrainConfig:
    """`pllcli pretrain` (pllcli.pretrain)."""

    objective: PretrainObjective = PretrainObjective.contrastive
    model: str = "convgru"
    model_options: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    crop_frames: int = 100
    crop_min_frac: float = 0.6
    temperature: float = 0.2
    mask_ratio: float = 0.3
    mask_span: int = 8
    apc_shift: int = 5
    seed: int = 0
    max_batches_per_epoch: int = 0  # 0 = all
    data: DataPath = DataPath.auto
    max_memory: int | None = None
    loader_workers: int | None = None

    def __post_init__(self) -> None:
        _check_data_flags(self)
        self.objective = PretrainObjective.coerce(self.objective, "--objective")
        check_range(self.epochs, "--epochs", 1)
        check_range(self.batch_size, "--batch-size", 2)
        check_range(self.lr, "--lr", 0, lo_open=True)
        check_range(self.weight_decay, "--weight-decay", 0)
        check_range(self.crop_frames, "--crop (in frames)", 1)
        check_range(self.crop_min_frac, "crop_min_frac", 0, 1, lo_open=True, hi_open=False)
        check_range(self.temperature, "--temperature", 0, lo_open=True)
        check_range(self.mask_ratio, "--mask-ratio", 0, 1, lo_open=True)
        check_range(self.mask_span, "mask_span", 1)
        check_range(self.apc_shift, "--apc-shift", 1)
        check_range(self.max_batches_per_epoch, "max_batches_per_epoch", 0)
        if not isinstance(self.model, str) or not self.model:
            raise UsageError(f"--model must name a model, got {self.model!r}")
        if not isinstance(self.model_options, dict):
            raise UsageError(f"--model-opt: expected KEY=VALUE options (a dict), got {self.model_options!r}")
