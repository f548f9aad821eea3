"""`pllcli evaluate`: metrics tables, JSON report and plots."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import BatchSize, Device, JsonOut
from pllcli.cli._options import Data, MaxMemory
from pllcli.training.config import DataPath

_SED = "Sound events (strong truth)"


def evaluate_cmd(
    inputs: Annotated[List[Path], typer.Argument(
        metavar="[CHECKPOINT FEATURES] TRUTH",
        help="A checkpoint and a feature store followed by the ground truth, or only the ground "
             "truth with --predictions / --frame-scores. Truth: a label store (.h5), a CSV/TSV id,label "
             "(labels joined by ';' for multi-label) or a strong-event TSV id,onset,offset,label.")],
    predictions: Annotated[Optional[Path], typer.Option(
        "--predictions", metavar="FILE", help="Score a predictions file instead of a model: CSV/TSV/JSONL "
        "with 'id' plus one probability column per class, or rows 'id,label,prob' (top-k).")] = None,
    frame_scores: Annotated[Optional[Path], typer.Option(
        "--frame-scores", metavar="PATH", help="Frame scores of `pllcli predict --frame-scores` (a folder of "
        "<id>.tsv in the sed_scores_eval layout, or one TSV with an id column): PSDS, frame and event "
        "metrics; alone, a clip's score is its highest frame score.", rich_help_panel=_SED)] = None,
    events: Annotated[Optional[Path], typer.Option(
        "--events", metavar="FILE", help="Estimated events TSV id,onset,offset,label for segment / "
        "collar / intersection F1.", rich_help_panel=_SED)] = None,
    candidates: Annotated[Optional[Path], typer.Option(
        "--candidates", metavar="LABELS", help="Label store whose candidate sets are scored against the "
        "truth (PLL coverage and disambiguation accuracy).")] = None,
    json_out: JsonOut = None,
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", metavar="DIR", help="Write PNGs (confusion matrix, PR curves, reliability, PSD-ROC, "
        "per-class F1, training curves) to DIR; needs matplotlib: pip install 'pllcli\\[plots]'.")] = None,
    train_log: Annotated[Optional[Path], typer.Option(
        "--train-log", metavar="FILE",
        help="Training log (log.jsonl of `pllcli train`) for the training-curve plot.")] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", min=0.0, max=1.0, help="Decision threshold for multi-label, frame and event F1.")] = 0.5,
    collar: Annotated[str, typer.Option(
        "--collar", metavar="DURATION", help="Event-based onset / offset collar (e.g. 200ms, 0.2).",
        rich_help_panel=_SED)] = "200ms",
    offset_pct: Annotated[float, typer.Option(
        "--offset-pct", min=0.0, help="Event-based offset collar: at least this share of the event length.",
        rich_help_panel=_SED)] = 0.2,
    segment: Annotated[str, typer.Option(
        "--segment", metavar="DURATION", help="Segment length for segment-based F1 (e.g. 1s, 500ms).",
        rich_help_panel=_SED)] = "1s",
    median: Annotated[str, typer.Option(
        "--median", metavar="N|DURATION", help="Median filter on frame scores before decoding events and PSDS: "
        "N frames (odd integer) or a duration (450ms) rounded to an odd number of frames.",
        rich_help_panel=_SED)] = "1",
    bins: Annotated[int, typer.Option("--bins", min=2, help="Confidence bins for ECE.")] = 15,
    chunk: Annotated[Optional[str], typer.Option(
        "--chunk", metavar="DURATION", help="Average clip scores over chunks of this length (default: the "
        "checkpoint's segment length if it was trained with --segment-labels; 0 = whole clips).")] = None,
    batch_size: BatchSize = 32,
    device: Device = "auto",
    data: Data = DataPath.auto,
    max_memory: MaxMemory = None,
):
    """Score a model or a predictions file against ground truth: clip metrics (accuracy, F1,
    ECE / mAP, lwlrap, AUC, d'), PLL metrics; for strong truth frame, segment, collar and
    intersection F1 and PSDS1 / PSDS2 (sed_scores_eval, pip install 'pllcli\\[sed]')."""
    from pllcli.errors import UsageError
    from pllcli.evaluate import evaluate, make_plots, render
    from pllcli.cli._options import memory_bytes
    from pllcli.io import parse_duration, write_json
    if predictions is not None or frame_scores is not None:
        if len(inputs) != 1:
            raise UsageError("with --predictions or --frame-scores give only the ground truth as argument")
        ckpt = feats = None
        truth = inputs[0]
    else:
        if len(inputs) != 3:
            raise UsageError("give CHECKPOINT FEATURES TRUTH (or --predictions FILE TRUTH)")
        ckpt, feats, truth = inputs
    if train_log is not None and plots is None:
        raise UsageError("--train-log is used for --plots; give --plots DIR too")
    chunk_s = None if chunk is None else (0.0 if chunk.strip() in ("0", "0s") else parse_duration(chunk, "--chunk"))
    result = evaluate(truth, checkpoint=ckpt, features=feats, predictions=predictions, frame_scores=frame_scores,
                      estimated_events=events, candidates=candidates, batch_size=batch_size, device=device,
                      threshold=threshold, t_collar=parse_duration(collar, "--collar"),
                      percentage_of_length=offset_pct, segment_resolution=parse_duration(segment, "--segment"),
                      n_bins=bins, chunk=chunk_s, median=median, data=data,
                      max_memory=memory_bytes(max_memory))
    if plots is not None:
        result.report["plots"] = make_plots(result, plots, train_log)
    if json_out != "-":
        from rich.console import Console
        render(result, Console(width=110))
    write_json(result.report, json_out)
    written = [p for p in [json_out if json_out not in (None, "-") else None, *result.report.get("plots", [])] if p]
    if written:
        import sys
        print("wrote " + ", ".join(map(str, written)), file=sys.stderr if json_out == "-" else sys.stdout)


def register(app: typer.Typer) -> None:
    app.command(name="evaluate")(evaluate_cmd)
