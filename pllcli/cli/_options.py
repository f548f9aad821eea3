"""Reusable `Annotated` option aliases shared by the subcommands."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOut = Annotated[Optional[str], typer.Option(
    "--json", metavar="FILE", help="Also write the figures as JSON to FILE ('-' for stdout).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Parallel worker processes.")]
Shard = Annotated[Optional[str], typer.Option(
    "--shard", metavar="I/N", help="Process only slice I of N (0-based); merge the parts afterwards.")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail instead of skipping bad items.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Items per batch.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
FeatureStorePath = Annotated[Path, typer.Argument(metavar="FEATURES", help="Feature store (.h5).")]
CheckpointPath = Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Checkpoint file (.pt).")]
Output = Annotated[Path, typer.Option("--output", "-o", metavar="PATH", help="Output file.")]
OutputDir = Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="Output folder.")]
