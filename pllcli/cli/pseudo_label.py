"""`pllcli pseudo-label`: soft labels from teacher checkpoints into a label store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import (BatchSize, Device, FeatureStorePath, JsonOut, Overwrite, RestrictCandidates,
                                 Shard)
from pllcli.cli._options import Data, MaxMemory
from pllcli.training.config import DataPath


def pseudo_label_cmd(
    features: FeatureStorePath,
    teacher: Annotated[List[Path], typer.Option(
        "--teacher", "-t", metavar="CHECKPOINT",
        help="Teacher classifier checkpoint (repeat for an ensemble; probabilities are averaged).")],
    labels: Annotated[Path, typer.Option("--labels", "-l", metavar="LABELS",
                                         help="Input label store (its labels are kept).")],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="PATH",
                                         help="Label store to write, with soft labels.")],
    restrict_candidates: RestrictCandidates = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Keep items whose top probability "
                                                       "reaches this (multi-label: drop entries below it).")] = None,
    top_n_per_class: Annotated[Optional[int], typer.Option("--top-n-per-class", help="Keep the N most "
                                                           "confident items of each class (per shard).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sharpening temperature (< 1 sharpens).")]
    = 1.0,
    segment: Annotated[Optional[str], typer.Option("--segment", metavar="DURATION", help="Write segment-level "
                                                   "soft labels for chunks of this length (PSL): 2s, 500ms or "
                                                   "seconds.")] = None,
    only_unlabeled: Annotated[bool, typer.Option("--only-unlabeled", help="Label only items without labels.")]
    = False,
    shard: Shard = None,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    data: Data = DataPath.auto,
    max_memory: MaxMemory = None,
    overwrite: Overwrite = False,
    json_out: JsonOut = None,
):
    """Label FEATURES with an ensemble of teachers; `pllcli train --labels OUTPUT` reads the soft labels."""
    from pllcli.cli._state import settings
    from pllcli.cli._options import memory_bytes
    from pllcli.errors import UsageError
    from pllcli.io import parse_duration, parse_shard, write_json
    from pllcli.pseudo_label import pseudo_label

    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists (use --overwrite to replace it)")
    summary = pseudo_label(features, teacher, labels, output, restrict_candidates=restrict_candidates,
                           threshold=threshold, top_n_per_class=top_n_per_class, temperature=temperature,
                           segment=parse_duration(segment, "--segment"), shard=parse_shard(shard),
                           only_unlabeled=only_unlabeled, batch_size=batch_size, device=device,
                           progress=settings.verbosity >= 0, data_path=data,
                           max_memory=memory_bytes(max_memory))
    n = summary.get("soft_labels", summary.get("segments"))
    what = "segments" if segment else "items"
    typer.echo(f"wrote {output}: soft labels for {n} {what} ({summary['filtered_out']} filtered out)",
               err=json_out == "-")
    write_json(summary, json_out)


def register(app: typer.Typer) -> None:
    app.command(name="pseudo-label")(pseudo_label_cmd)
