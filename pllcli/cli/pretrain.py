"""`pllcli pretrain`: self-supervised encoder pretraining on any feature stores."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import BatchSize, Device, JsonOut, Seed, name_completer
from pllcli.cli._options import Data, LoaderWorkers, MaxMemory
from pllcli.training.config import DataPath, PretrainObjective


def _model_names():
    from pllcli.models import list_models
    return list_models()


def pretrain_cmd(
    features: Annotated[List[Path], typer.Argument(metavar="FEATURES...", help="Feature stores (.h5), labeled or not; "
                                                   "all must share one feature config.")],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="PATH", help="Encoder checkpoint to write (.pt).")],
    objective: Annotated[PretrainObjective, typer.Option(
        "--objective", help="contrastive (SimCLR NT-Xent), masked (masked-frame reconstruction) or apc "
                            "(future-frame prediction).")] = PretrainObjective.contrastive,
    model: Annotated[str, typer.Option("--model", metavar="NAME", autocompletion=name_completer(_model_names),
                                       help="Model whose encoder is pretrained (see `pllcli train --list-models`).")]
    = "convgru",
    model_opt: Annotated[Optional[List[str]], typer.Option(
        "--model-opt", metavar="KEY=VALUE", help="Model option (repeatable); keys: `pllcli train --list-models`.")]
    = None,
    epochs: Annotated[int, typer.Option("--epochs", metavar="N", help="Passes over the clips.")] = 30,
    batch_size: BatchSize = 128,
    lr: Annotated[float, typer.Option("--lr", metavar="LR", help="Peak learning rate (AdamW, warm-up then cosine).")]
    = 2e-3,
    crop: Annotated[float, typer.Option("--crop", metavar="SECONDS", help="Crop length in seconds for each view.")]
    = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", metavar="T", help="NT-Xent temperature.")] = 0.2,
    mask_ratio: Annotated[float, typer.Option("--mask-ratio", metavar="SHARE",
                                              help="Fraction of frames hidden (masked).")] = 0.3,
    apc_shift: Annotated[int, typer.Option("--apc-shift", metavar="N", help="Frames predicted ahead (apc).")] = 5,
    augment: Annotated[Optional[List[str]], typer.Option(
        "--augment", metavar="KEY=VALUE", help="View augmentation over the pretraining defaults (repeatable): "
        "gain_db, shift, time_masks, time_width, freq_masks, freq_width, freq_warp, time_warp, noise_std, mix_prob, "
        "mix_max, fill; 'none' turns all off first.")] = None,
    log_file: Annotated[Optional[Path], typer.Option("--log", metavar="FILE", help="JSONL loss log (default: "
                                                     "OUTPUT stem + .log.jsonl).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.resume.pt if present.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT.")] = False,
    device: Device = "auto",
    data: Data = DataPath.auto,
    max_memory: MaxMemory = None,
    loader_workers: LoaderWorkers = None,
    seed: Seed = 0,
    json_out: JsonOut = None,
):
    """Pretrain an encoder without labels; `pllcli train --init OUTPUT [--freeze]` fine-tunes it.

    Prints the paths it wrote (the checkpoint and its loss log)."""
    import dataclasses

    from pllcli.cli._state import settings
    from pllcli.cli._options import memory_bytes
    from pllcli.cli.train import augment_options, model_options
    from pllcli.errors import InputError, UsageError
    from pllcli.io import write_json
    from pllcli.training.config import PretrainConfig, check_range

    check_range(crop, "--crop", 0, lo_open=True)
    cfg = PretrainConfig(objective=objective, model=model, model_options=model_options(model, model_opt),
                         epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature,
                         mask_ratio=mask_ratio, apc_shift=apc_shift, seed=seed, data=data,
                         max_memory=memory_bytes(max_memory), loader_workers=loader_workers)  # checks, before any file
    aug = None
    if augment:
        from pllcli.training.augment import AugmentConfig
        aug = AugmentConfig(**augment_options(augment, base=AugmentConfig.views().to_dict()))
    if output.exists() and not overwrite and not resume:
        raise UsageError(f"{output} exists (use --overwrite to replace it)")
    if not features:
        raise UsageError("give at least one feature store")
    for p in features:
        if not p.exists():
            raise InputError("no such file", str(p))
    from pllcli.features.store import FeatureStore
    from pllcli.pretrain import pretrain
    hop = FeatureStore(features[0]).config
    cfg = dataclasses.replace(cfg, crop_frames=max(4, int(round(crop * hop.sample_rate / hop.hop_length))))
    summary = pretrain(features, output, cfg, log_path=log_file, resume=resume, device=device, augment=aug,
                       progress=settings.verbosity >= 0)
    import os
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports (and writes)
        return
    typer.echo(f"pretrained {objective.value}: {summary['clips']} clips, {epochs} epochs, "
               f"final loss {summary['final_loss']:.4f}", err=True)
    write_json(summary, json_out)
    for path in (output, summary.get("log")):
        if path:
            typer.echo(str(path), err=json_out == "-")


def register(app: typer.Typer) -> None:
    app.command(name="pretrain")(pretrain_cmd)
