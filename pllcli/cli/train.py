"""`pllcli train`: train a classifier from a feature store and a label store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import (BatchSize, Data, Device, JsonOut, LoaderWorkers, MaxMemory, Seed, memory_bytes,
                                 name_completer)
from pllcli.training.config import DEFAULT_CLEAN_SHARE, DataPath, LRSchedule, Optimizer, Sampler, WhenWhoMode

RUN_FILES = ("model.pt", "best.pt", "last.pt", "averaged.pt", "log.jsonl", "summary.json")
_MODEL_ARGS = ("n_mels", "num_classes")  # passed by the trainer, not settable with --model-opt


# ------------------------------------------------------------------------------ option strings

def _model_names():
    from pllcli.models import list_models
    return list_models()


def _objective_names():
    from pllcli.training.objectives import list_objectives
    return list_objectives()


def model_target(name: str, flag: str = "--model"):
    """The builder registered as model `name` (what --model-opt keys are checked against)."""
    from pllcli.errors import UsageError
    from pllcli.models import list_models, model_builder
    if name not in list_models():
        raise UsageError(f"{flag}: unknown model {name!r} (available: {', '.join(list_models())})")
    return model_builder(name)


def model_options(name: str, items: list[str] | None, flag: str = "--model-opt", skip=()) -> dict:
    """--model-opt KEY=VALUE items -> typed kwargs of model `name`'s builder."""
    from pllcli import spec
    return spec.coerce(model_target(name), spec.parse_pairs(items, flag), flag,
                       skip=(*_MODEL_ARGS, *skip), what=f"model {name}")


def augment_options(items: list[str] | None, flag: str = "--augment", base: dict | None = None) -> dict:
    """--augment KEY=VALUE items over `base` (or over 'none': everything off) -> AugmentConfig kwargs."""
    from pllcli import spec
    from pllcli.training.augment import AugmentConfig
    items = list(items or [])
    if any(a.strip().lower() == "none" for a in items):
        base = AugmentConfig.none().to_dict()
        items = [a for a in items if a.strip().lower() != "none"]
    return {**(base or {}), **spec.coerce(AugmentConfig, spec.parse_pairs(items, flag), flag)}


def _format_keys(keys) -> str:
    return "\n".join(f"    {k}: {t} = {d}" for k, t, d in keys)


def _echo_catalogue(names: dict, keys_of) -> None:
    """Print each `name  help` with its option keys (`keys_of(name)`), then end the command."""
    for name, help_ in names.items():
        typer.echo(f"{name:14s} {help_}")
        keys = keys_of(name)
        if keys:
            typer.echo(_format_keys(keys))
    raise typer.Exit()


def _list_models(ctx: typer.Context, value: bool):
    if not value or ctx.resilient_parsing:
        return
    from pllcli import spec
    _echo_catalogue(_model_names(), lambda name: spec.describe(model_target(name), skip=_MODEL_ARGS))


def _list_objectives(ctx: typer.Context, value: bool):
    if not value or ctx.resilient_parsing:
        return
    from pllcli import spec
    from pllcli.training.objectives import COMMON_KEYS, Objective, objective_class
    common = [k for k in spec.describe(Objective) if k[0] in COMMON_KEYS]
    typer.echo("every objective also takes:\n" + _format_keys(common))
    _echo_catalogue(_objective_names(), lambda name: spec.describe(objective_class(name), skip=COMMON_KEYS))


_NOT_IN_CONFIG = ("config", "list_models_", "list_objectives_", "help")


def _config_keys(command) -> dict:
    """{key: parameter} for a --config file: the long flag names (without --) and the argument names."""
    keys = {}
    for p in command.params:
        if p.name in _NOT_IN_CONFIG or getattr(p, "hidden", False):
            continue
        names = [o[2:] for o in (*p.opts, *p.secondary_opts) if o.startswith("--")] or [p.name]
        keys.update({n.replace("_", "-"): p for n in names})
    return keys


def _load_config(ctx: typer.Context, value: Optional[Path]):
    """--config FILE.toml: its keys become the defaults of the flags (flags given override them)."""
    if value is None or ctx.resilient_parsing:
        return value
    from pllcli.errors import InputError, UsageError
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise UsageError("--config needs Python >= 3.11 (tomllib)") from None
    try:
        data = tomllib.loads(value.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no such config file", str(value)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not a TOML file ({e})", str(value)) from None
    keys = _config_keys(ctx.command)
    defaults = {}
    for k, v in data.items():
        p = keys.get(k.replace("_", "-"))
        if p is None:
            raise UsageError(f"{value}: unknown key {k!r} (valid: {', '.join(sorted(keys))})")
        if isinstance(v, dict):
            raise UsageError(f"{value}: key {k!r} must be a value or a list, not a table")
        defaults[p.name] = list(v) if p.multiple and isinstance(v, list) else [v] if p.multiple else v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def report_written(outdir: Path, to_stderr: bool = False) -> None:
    """Print the run files that exist in `outdir`, one path a line (rank 0 only under torchrun)."""
    import os
    if os.environ.get("RANK", "0") != "0":
        return
    for name in RUN_FILES:
        if (outdir / name).exists():
            typer.echo(str(outdir / name), err=to_stderr)


# ------------------------------------------------------------------------------ options

_Output = Annotated[Optional[Path], typer.Option(
    "-o", "--output", metavar="DIR",
    help="Output folder: model.pt (the checkpoint to deploy: a copy of averaged.pt, or of best.pt with "
         "--top-k 0), best.pt, last.pt, averaged.pt, log.jsonl, summary.json (required unless --resume names "
         "the run).")]
_ModelOpt = Annotated[Optional[list[str]], typer.Option(
    "--model-opt", metavar="KEY=VALUE",
    help="Model option (repeatable, or comma-separated), e.g. width=16; keys: --list-models.")]
_Objective = Annotated[Optional[list[str]], typer.Option(
    "--objective", metavar="NAME[:KEY=VALUE,...]", autocompletion=name_completer(_objective_names),
    help="Loss term (repeatable); default 'cr:eps=0.01' + 'ce' (CR-DPLL on the candidate sets with "
         "their weights as prior, plus CE on clean items). Keys and types: --list-objectives.")]
_Pll = Annotated[Optional[str], typer.Option(
    "--pll", metavar="NAME", help="Shortcut: the candidate-set loss (cc, proden, rc, lws, pico, cr, mse) "
                                  "with defaults.")]
_Alpha = Annotated[Optional[float], typer.Option(
    "--alpha", metavar="A", help="Teacher-student mix of original and pseudo labels (soft labels from "
    "pseudo-label): target = A * pseudo + (1 - A) * original; adds objective 'distill:alpha=A'.")]
_CleanShare = Annotated[float, typer.Option(
    "--clean-share", "--labeled-share", metavar="SHARE",
    help="Share of every batch taken from the clean-labelled items (oversampled), 0 = natural share.")]
_WhenWho = Annotated[Optional[WhenWhoMode], typer.Option(
    "--when-who", help="Train a WHEN/WHO model on weak tags (Morfi & Stowell). The engine flags apply "
    "(--epochs, --batch-size, --lr, --optimizer, --lr-schedule, --ema, --top-k, --patience, --valid-fraction, "
    "--resume, --model-opt); flags it cannot honour are refused.")]
_Sampler = Annotated[Sampler, typer.Option(
    "--sampler", help="natural; hnh: half-and-half positive/negative clips (weak tags); "
                      "balanced: class-balanced sampling (weak tags).")]
_UnlabeledShare = Annotated[float, typer.Option(
    "--unlabeled-share", metavar="SHARE",
    help="Share of every batch taken from the unlabeled items, 0 = natural share.")]
_MaxFrames = Annotated[int, typer.Option(
    "--max-frames", metavar="N", help="Random crop length in frames (0 = full).")]
_WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", metavar="WD", help="Weight decay (decoupled for adamw, L2 for adam and sgd).")]
_RestartEpochs = Annotated[float, typer.Option(
    "--restart-epochs", metavar="EPOCHS", help="cosine-restarts period.")]
_Ema = Annotated[Optional[float], typer.Option(
    "--ema", metavar="DECAY", help="EMA decay of weights (0 = off), e.g. 0.999; default 0.99 when an "
                                   "objective needs an EMA teacher (mean-teacher, ...), else off.")]
_Patience = Annotated[int, typer.Option(
    "--patience", metavar="EPOCHS", help="Early stopping patience in epochs (0 = off).")]
_ValidLabels = Annotated[Optional[Path], typer.Option(
    "--valid-labels", metavar="LABELS", help="Labels of --valid (default: --labels).")]
_ValidFraction = Annotated[float, typer.Option(
    "--valid-fraction", metavar="SHARE", help="Share of clean items held out for validation (without --valid).")]
_Augment = Annotated[Optional[list[str]], typer.Option(
    "--augment", metavar="KEY=VALUE", help="Augmentation option (repeatable): gain_db, shift, time_masks, "
    "time_width, freq_masks, freq_width, freq_warp, time_warp, noise_std, mix_prob, mix_max, fill; 'none' turns "
    "all off first. Defaults follow the store's frames: a 0.1 s shift, and no gain on encoder frames.")]
_Init = Annotated[Optional[Path], typer.Option(
    "--init", metavar="CHECKPOINT", help="Load encoder weights from this checkpoint.")]
_SegmentLabels = Annotated[bool, typer.Option(
    "--segment-labels", help="Train on segments: every segment soft label (pseudo-label --segment) "
    "becomes an item; predict/evaluate then average chunk scores.")]
_Resume = Annotated[Optional[Path], typer.Option(
    "--resume", metavar="RUN", help="Continue from RUN/last.pt (or this file).")]
_SaveEvery = Annotated[Optional[str], typer.Option(
    "--save-every", metavar="N|DURATION", help=(
        "Also write last.pt mid-epoch every N optimiser steps or every DURATION (10m, 1h) of training, "
        "so that --resume loses at most that much after a crash or a kill (under torchrun too; an "
        "epoch end always writes it)."))]
_ListModels = Annotated[bool, typer.Option(
    "--list-models", is_eager=True, callback=_list_models,
    help="List the models with their --model-opt keys (type = default) and exit.")]
_ListObjectives = Annotated[bool, typer.Option(
    "--list-objectives", is_eager=True, callback=_list_objectives,
    help="List the objectives with their keys (type = default) and exit.")]
_Config = Annotated[Optional[Path], typer.Option(
    "--config", metavar="FILE.toml", is_eager=True, callback=_load_config,
    help="Read options from a TOML file: keys are the long flag names (clean-share = 0.3, objective = "
         "[\"cr\", \"ce\"], features = \"f.h5\"); flags given on the command line override them.")]


# the data-path flags (also used by pretrain): --data, --max-memory, --loader-workers
# ------------------------------------------------------------------------------ the command

def train_cmd(
    features: Annotated[Path, typer.Argument(metavar="FEATURES", help="Feature store (.h5).")],
    labels: Annotated[Path, typer.Option("--labels", "-l", metavar="LABELS",
                                         help="Label store (.h5) joined by id.")],
    output: _Output = None,
    outdir_old: Annotated[Optional[Path], typer.Option("--outdir", hidden=True, help="Deprecated: -o/--output.")] = None,
    model: Annotated[str, typer.Option("--model", metavar="NAME", autocompletion=name_completer(_model_names),
                                       help="Model name (see --list-models).")] = "convgru",
    model_opt: _ModelOpt = None,
    objective: _Objective = None,
    pll: _Pll = None,
    alpha: _Alpha = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", metavar="N", help="Passes over the training items.")] = 20,
    batch_size: BatchSize = 64,
    clean_share: _CleanShare = DEFAULT_CLEAN_SHARE,
    when_who: _WhenWho = None,
    sampler: _Sampler = Sampler.natural,
    unlabeled_share: _UnlabeledShare = 0.0,
    max_frames: _MaxFrames = 300,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="Optimizer.")] = Optimizer.adamw,
    lr: Annotated[float, typer.Option("--lr", metavar="LR", help="Peak learning rate (after --warmup).")] = 3e-3,
    weight_decay: _WeightDecay = 1e-4,
    lr_schedule: Annotated[LRSchedule, typer.Option("--lr-schedule", help="Learning-rate schedule.")]
    = LRSchedule.cosine,
    warmup: Annotated[float, typer.Option("--warmup", metavar="EPOCHS", help="Linear LR warm-up, epochs.")] = 1.0,
    restart_epochs: _RestartEpochs = 10.0,
    ema: _Ema = None,
    top_k: Annotated[int, typer.Option("--top-k", metavar="K", help="Average the K best checkpoints (0 = off).")] = 3,
    patience: _Patience = 0,
    valid: Annotated[Optional[Path], typer.Option("--valid", metavar="FEATURES",
                                                  help="Validation feature store.")] = None,
    valid_labels: _ValidLabels = None,
    valid_fraction: _ValidFraction = 0.2,
    augment: _Augment = None,
    init: _Init = None,
    freeze: Annotated[bool, typer.Option("--freeze", help="Freeze the encoder (linear probe).")] = False,
    segment_labels: _SegmentLabels = False,
    resume: _Resume = None,
    save_every: _SaveEvery = None,
    device: Device = "auto",
    seed: Seed = 0,
    no_amp: Annotated[bool, typer.Option("--no-amp", help="No mixed precision on CUDA.")] = False,
    data: Data = DataPath.auto,
    max_memory: MaxMemory = None,
    loader_workers: LoaderWorkers = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="torch intra-op threads.")] = None,
    list_models_: _ListModels = False,
    list_objectives_: _ListObjectives = False,
    json_out: JsonOut = None,
    config: _Config = None,
):
    """Train a classifier from candidate sets, clean labels and unlabeled items.

    Writes DIR/model.pt (the checkpoint to deploy: averaged.pt, the top-k average, or best.pt with
    --top-k 0), best.pt, last.pt (with the resume state), averaged.pt, log.jsonl and summary.json
    and prints their paths.
    Works unchanged under `torchrun --nproc_per_node N` (data parallel, rank 0 writes).
    """
    from pllcli.cli._state import settings
    from pllcli.errors import UsageError
    from pllcli.io import write_json
    outdir = _resolve_outdir(output, outdir_old, resume)
    from pllcli.training.objectives import build_objective
    from pllcli.training.trainer import DEFAULT_OBJECTIVES, TrainConfig, default_ema, train
    if pll:
        build_objective(pll, flag="--pll")  # so that its errors name --pll
    objectives = list(objective or []) + ([pll] if pll else [])
    objectives = objectives or list(DEFAULT_OBJECTIVES)
    if alpha is not None:
        if not 0 <= alpha <= 1:
            raise UsageError(f"--alpha must be in [0, 1], got {alpha}")
        objectives.append(f"distill:alpha={alpha:g}")
    ema = default_ema(objectives) if ema is None else ema  # builds each objective: checks its keys
    mopt = model_options("whenwho", model_opt, skip=("shared",)) if when_who else model_options(model, model_opt)
    cfg = TrainConfig(
        features=str(features), labels=str(labels), outdir=str(outdir), model=model,
        model_options=mopt, objectives=objectives, epochs=epochs,
        batch_size=batch_size, clean_share=clean_share, unlabeled_share=unlabeled_share, sampler=sampler,
        max_frames=max_frames or None, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        lr_schedule=lr_schedule, warmup_epochs=warmup, restart_epochs=restart_epochs, ema=ema, top_k=top_k,
        patience=patience, valid=str(valid) if valid else None,
        valid_labels=str(valid_labels) if valid_labels else None, valid_fraction=valid_fraction,
        augment=augment_options(augment), init=str(init) if init else None, freeze=freeze,
        segment_labels=segment_labels, seed=seed, device=device, amp=not no_amp,
        resume=str(resume) if resume else None, progress=settings.verbosity >= 0, threads=threads,
        data=data, max_memory=memory_bytes(max_memory), loader_workers=loader_workers,
        **save_every_options(save_every))
    if when_who is not None:
        from pllcli.training.config import WeakConfig
        from pllcli.training.weak import check_when_who_flags, train_when_who
        check_when_who_flags(cfg)
        WeakConfig(mode=when_who, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay)  # checks
        summary = train_when_who(cfg, mode=when_who.value)
    else:
        if resume is None and (outdir / "last.pt").exists():
            raise UsageError(f"{outdir} already holds a training run (last.pt); use --resume {outdir} or another -o")
        summary = train(cfg)
    write_json(summary, json_out)
    report_written(outdir, to_stderr=json_out == "-")


def save_every_options(spec: str | None) -> dict:
    """--save-every N (steps) or DURATION (seconds) -> TrainConfig fields."""
    from pllcli.errors import UsageError
    from pllcli.io import parse_duration
    if spec is None:
        return {}
    s = spec.strip()
    if s.isdigit():
        return {"save_every_steps": int(s)}
    if not s or s[-1].isdigit():
        raise UsageError(f"--save-every takes N steps or a duration with its unit (30s, 10m, 1h), got {spec!r}")
    return {"save_every_seconds": parse_duration(s, "--save-every")}


def _resolve_outdir(output: Path | None, outdir_old: Path | None, resume: Path | None) -> Path:
    """-o/--output, else the deprecated --outdir (with a warning), else the run folder of --resume."""
    from pllcli.errors import UsageError
    if outdir_old is not None:
        if output is not None and output != outdir_old:
            raise UsageError("give -o/--output only (--outdir is its deprecated spelling)")
        typer.echo("warning: --outdir is deprecated; use -o/--output", err=True)
        output = outdir_old
    if output is None and resume is None:
        raise UsageError("missing option -o/--output DIR")
    if output is None:
        output = resume if resume.is_dir() else resume.parent
    return output


def register(app):
    app.command(name="train")(train_cmd)
