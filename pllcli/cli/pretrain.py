"""`pllcli pretrain`: self-supervised encoder pretraining on any feature stores."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import BatchSize, Device, JsonOut, Seed


def pretrain_cmd(
    features: Annotated[List[Path], typer.Argument(metavar="FEATURES...", help="Feature stores (.h5), labeled or not; "
                                                   "all must share one feature config.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Encoder checkpoint to write (.pt).")],
    objective: Annotated[str, typer.Option("--objective", help="contrastive (SimCLR NT-Xent), masked "
                                           "(masked-frame reconstruction) or apc (future-frame prediction).")]
    = "contrastive",
    model: Annotated[str, typer.Option("--model", help="Model whose encoder is pretrained (see `pllcli train --help`).")]
    = "convgru",
    model_opt: Annotated[Optional[List[str]], typer.Option("--model-opt", metavar="KEY=VALUE",
                                                           help="Model option (repeatable).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the clips.")] = 30,
    batch_size: BatchSize = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warm-up then cosine).")] = 2e-3,
    crop: Annotated[float, typer.Option("--crop", help="Crop length in seconds for each view.")] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", help="NT-Xent temperature.")] = 0.2,
    mask_ratio: Annotated[float, typer.Option("--mask-ratio", help="Fraction of frames hidden (masked).")] = 0.3,
    apc_shift: Annotated[int, typer.Option("--apc-shift", min=1, help="Frames predicted ahead (apc).")] = 5,
    log_file: Annotated[Optional[Path], typer.Option("--log", help="JSONL loss log (default: OUTPUT stem + "
                                                     ".log.jsonl).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT.resume.pt if present.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT.")] = False,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: JsonOut = None,
):
    """Pretrain an encoder without labels; `pllcli train --init OUTPUT [--freeze]` fine-tunes it."""
    from pllcli.errors import UsageError
    from pllcli.io import write_json
    from pllcli.models import parse_model_options
    from pllcli.pretrain import OBJECTIVES, PretrainConfig, pretrain
    from pllcli.cli._state import settings

    if objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if output.exists() and not overwrite and not resume:
        raise UsageError(f"{output} exists (use --overwrite to replace it)")
    if crop <= 0 or not 0 < mask_ratio < 1 or temperature <= 0 or lr <= 0:
        raise UsageError("need --crop > 0, 0 < --mask-ratio < 1, --temperature > 0 and --lr > 0")
    from pllcli.features.store import FeatureStore
    from pllcli.errors import InputError
    if not features:
        raise UsageError("give at least one feature store")
    for p in features:
        if not p.exists():
            raise InputError("no such file", str(p))
    hop = FeatureStore(features[0]).config
    crop_frames = max(4, int(round(crop * hop.sample_rate / hop.hop_length)))
    cfg = PretrainConfig(objective=objective, model=model, model_options=parse_model_options(model_opt),
                         epochs=epochs, batch_size=batch_size, lr=lr, crop_frames=crop_frames,
                         temperature=temperature, mask_ratio=mask_ratio, apc_shift=apc_shift, seed=seed)
    summary = pretrain(features, output, cfg, log_path=log_file, resume=resume, device=device,
                       progress=settings.verbosity >= 0)
    typer.echo(f"wrote {output} ({objective}, {summary['clips']} clips, {epochs} epochs, "
               f"final loss {summary['final_loss']:.4f})", err=True)
    write_json(summary, json_out)


def register(app: typer.Typer) -> None:
    app.command(name="pretrain")(pretrain_cmd)
