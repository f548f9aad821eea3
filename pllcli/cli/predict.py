"""`pllcli predict`: top-k labels with probabilities for every item of a feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import BatchSize, CheckpointPath, Device, JsonOut

_EV = "Frame-level outputs"


def predict_cmd(
    checkpoint: CheckpointPath,
    features: Annotated[str, typer.Argument(
        metavar="FEATURES", help="Feature store (.h5), or audio featurized with the checkpoint's feature "
        "config: one file, a folder, a manifest (CSV/TSV/JSONL with id,path) or '-' (manifest on stdin).")],
    out: Annotated[str, typer.Option("-o", "--out", help="Output .csv, .tsv or .jsonl ('-' = CSV on stdout).")] = "-",
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels per item.")] = 1,
    restrict_candidates: Annotated[Optional[Path], typer.Option(
        "--restrict-candidates", help="Label store: restrict each item to its candidate set "
                                      "(disambiguates training data).")] = None,
    events: Annotated[Optional[str], typer.Option(
        "--events", metavar="FILE", help="Frame-level models: write thresholded events (id onset offset "
                                         "label) as TSV ('-' = stdout).", rich_help_panel=_EV)] = None,
    frame_scores: Annotated[Optional[str], typer.Option(
        "--frame-scores", metavar="FILE", help="Frame-level models: write per-frame class probabilities "
                                               "as TSV.", rich_help_panel=_EV)] = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Event threshold on frame probability.",
                                             rich_help_panel=_EV)] = 0.5,
    median: Annotated[int, typer.Option("--median", min=1, help="Median filter length in frames (odd).",
                                        rich_help_panel=_EV)] = 1,
    min_duration: Annotated[float, typer.Option("--min-duration", min=0.0, help="Drop events shorter than "
                                                "this (seconds).", rich_help_panel=_EV)] = 0.0,
    chunk: Annotated[Optional[float], typer.Option(
        "--chunk", min=0.0, help="Average clip scores over chunks of this many seconds (default: the "
        "checkpoint's segment length if it was trained with --segment-labels; 0 = whole clips).")] = None,
    device: Device = "auto",
    batch_size: BatchSize = 64,
    json_out: JsonOut = None,
):
    """Predict labels for a feature store or audio files with a trained checkpoint (and events for
    frame-level models)."""
    from pllcli.io import write_json
    from pllcli.predict import predict
    summary = predict(checkpoint, features, out, top_k, restrict_candidates, device, batch_size,
                      events=events, frame_scores=frame_scores, threshold=threshold, median=median,
                      min_duration=min_duration, chunk=chunk)
    write_json(summary, json_out)


def register(app):
    app.command(name="predict")(predict_cmd)
