"""`pllcli train`: train a classifier from a feature store and a label store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import BatchSize, Device, JsonOut, Seed


def train_cmd(
    features: Annotated[Optional[Path], typer.Argument(metavar="FEATURES", help="Feature store (.h5).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", "-l", help="Label store (.h5) joined by id.")] = None,
    outdir: Annotated[Optional[Path], typer.Option("-o", "--outdir", help="Output folder (checkpoints, log.jsonl).")] = None,
    model: Annotated[str, typer.Option("--model", help="Model name (see --list-models).")] = "convgru",
    model_opt: Annotated[Optional[list[str]], typer.Option(
        "--model-opt", help="Model option KEY=VALUE (repeatable), e.g. width=16.")] = None,
    objective: Annotated[Optional[list[str]], typer.Option(
        "--objective", help="NAME[:KEY=VALUE,...] (repeatable); default 'cr:eps=0.01' + 'ce' (CR-DPLL on the "
                            "candidate sets with their weights as prior, plus CE on clean items). Common "
                            "keys: weight, schedule (constant|linear|sigmoid), start, end.")] = None,
    pll: Annotated[Optional[str], typer.Option(
        "--pll", help="Shortcut: the candidate-set loss (cc, proden, rc, lws, pico, cr, mse) with defaults.")] = None,
    alpha: Annotated[Optional[float], typer.Option(
        "--alpha", help="Teacher-student mix of original and pseudo labels (soft labels from pseudo-label): "
                        "target = A * pseudo + (1 - A) * original; adds objective 'distill:alpha=A'.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1)] = 20,
    batch_size: BatchSize = 64,
    clean_share: Annotated[float, typer.Option(
        "--clean-share", "--labeled-share",
        help="Share of every batch taken from the clean-labelled items (oversampled), 0 = natural share.")] = 0.25,
    when_who: Annotated[Optional[str], typer.Option(
        "--when-who", metavar="MODE", help="Train a WHEN/WHO model on weak tags (Morfi & Stowell): separate, "
        "joint or tied. Uses --epochs, --batch-size, --lr, --seed, --device, --model-opt.")] = None,
    sampler: Annotated[str, typer.Option(
        "--sampler", help="natural; hnh: half-and-half positive/negative clips (weak tags); "
                          "balanced: class-balanced sampling (weak tags).")] = "natural",
    unlabeled_share: Annotated[float, typer.Option(
        "--unlabeled-share", help="Share of every batch taken from the unlabeled items, 0 = natural share.")] = 0.0,
    max_frames: Annotated[int, typer.Option("--max-frames", help="Random crop length in frames (0 = full).")] = 300,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw, adam or sgd.")] = "adamw",
    lr: Annotated[float, typer.Option("--lr")] = 3e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    lr_schedule: Annotated[str, typer.Option(
        "--lr-schedule", help="cosine, cosine-restarts, onecycle, poly or constant.")] = "cosine",
    warmup: Annotated[float, typer.Option("--warmup", help="Linear LR warm-up, epochs.")] = 1.0,
    restart_epochs: Annotated[float, typer.Option("--restart-epochs", help="cosine-restarts period.")] = 10.0,
    ema: Annotated[Optional[float], typer.Option(
        "--ema", help="EMA decay of weights (0 = off), e.g. 0.999; default 0.99 when an objective needs an "
                      "EMA teacher (mean-teacher, ...), else off.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Average the K best checkpoints (0 = off).")] = 3,
    patience: Annotated[int, typer.Option("--patience", help="Early stopping patience in epochs (0 = off).")] = 0,
    valid: Annotated[Optional[Path], typer.Option("--valid", help="Validation feature store.")] = None,
    valid_labels: Annotated[Optional[Path], typer.Option("--valid-labels", help="Labels of --valid (default: --labels).")] = None,
    valid_fraction: Annotated[float, typer.Option(
        "--valid-fraction", help="Share of clean items held out for validation (without --valid).")] = 0.2,
    augment: Annotated[Optional[list[str]], typer.Option(
        "--augment", help="Augmentation KEY=VALUE (gain_db, shift, time_masks, time_width, freq_masks, "
                          "freq_width, freq_warp, time_warp) or 'none'.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Load encoder weights from this checkpoint.")] = None,
    freeze: Annotated[bool, typer.Option("--freeze", help="Freeze the encoder (linear probe).")] = False,
    segment_labels: Annotated[bool, typer.Option(
        "--segment-labels", help="Train on segments: every segment soft label (pseudo-label --segment) "
        "becomes an item; predict/evaluate then average chunk scores.")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue from OUTDIR/last.pt (or this file).")] = None,
    device: Device = "auto",
    seed: Seed = 0,
    no_amp: Annotated[bool, typer.Option("--no-amp", help="No mixed precision on CUDA.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch intra-op threads.")] = None,
    list_models_: Annotated[bool, typer.Option("--list-models", help="List models and exit.")] = False,
    list_objectives_: Annotated[bool, typer.Option("--list-objectives", help="List objectives and exit.")] = False,
    json_out: JsonOut = None,
):
    """Train a classifier from candidate sets, clean labels and unlabeled items.

    Writes OUTDIR/best.pt, last.pt, averaged.pt, log.jsonl and summary.json. Works unchanged
    under `torchrun --nproc_per_node N` (data parallel, rank 0 writes).
    """
    from pllcli.cli._state import settings
    from pllcli.errors import UsageError
    from pllcli.io import write_json
    if list_models_ or list_objectives_:
        if list_models_:
            from pllcli.models import list_models
            for k, v in list_models().items():
                typer.echo(f"{k:14s} {v}")
        if list_objectives_:
            from pllcli.training.objectives import list_objectives
            for k, v in list_objectives().items():
                typer.echo(f"{k:14s} {v}")
        return
    if features is None:
        raise UsageError("missing argument FEATURES (a feature store)")
    if labels is None:
        raise UsageError("--labels is required")
    if outdir is None and resume is None:
        raise UsageError("-o/--outdir is required")
    if outdir is None:
        outdir = resume if resume.is_dir() else resume.parent
    from pllcli.models import parse_model_options
    if when_who is not None:
        from pllcli.training.weak import MODES, train_when_who
        if when_who not in MODES:
            raise UsageError(f"--when-who must be one of {', '.join(MODES)}, got {when_who!r}")
        summary = train_when_who(features, labels, outdir, mode=when_who, epochs=epochs, batch_size=batch_size,
                                 lr=lr, seed=seed, device=device, model_options=parse_model_options(model_opt))
        write_json(summary, json_out)
        return
    from pllcli.training.trainer import DEFAULT_OBJECTIVES, TrainConfig, default_ema, train
    objectives = list(objective or [])
    if pll:
        objectives.append(pll)
    if not objectives:
        objectives = list(DEFAULT_OBJECTIVES)
    if alpha is not None:
        if not 0 <= alpha <= 1:
            raise UsageError(f"--alpha must be in [0, 1], got {alpha}")
        objectives.append(f"distill:alpha={alpha:g}")
    ema = default_ema(objectives) if ema is None else ema
    aug = {}
    if augment and any(a.strip().lower() == "none" for a in augment):
        from pllcli.training.augment import AugmentConfig
        aug = AugmentConfig.none().to_dict()
    else:
        aug = parse_model_options(augment)
    if resume is None and (outdir / "last.pt").exists():
        raise UsageError(f"{outdir} already holds a training run (last.pt); use --resume {outdir} or another -o")
    cfg = TrainConfig(
        features=str(features), labels=str(labels), outdir=str(outdir), model=model,
        model_options=parse_model_options(model_opt), objectives=objectives, epochs=epochs,
        batch_size=batch_size, clean_share=clean_share, unlabeled_share=unlabeled_share, sampler=sampler, max_frames=max_frames or None, optimizer=optimizer, lr=lr,
        weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_epochs=warmup,
        restart_epochs=restart_epochs, ema=ema, top_k=top_k, patience=patience,
        valid=str(valid) if valid else None, valid_labels=str(valid_labels) if valid_labels else None,
        valid_fraction=valid_fraction, augment=aug, init=str(init) if init else None, freeze=freeze,
        segment_labels=segment_labels,
        seed=seed, device=device, amp=not no_amp, resume=str(resume) if resume else None,
        progress=settings.verbosity >= 0, threads=threads)
    summary = train(cfg)
    write_json(summary, json_out)


def register(app):
    app.command(name="train")(train_cmd)
