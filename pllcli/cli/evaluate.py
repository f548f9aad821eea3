"""`pllcli evaluate`: metrics tables, JSON report and plots."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import BatchSize, Device, JsonOut


def evaluate_cmd(
    inputs: Annotated[List[Path], typer.Argument(
        metavar="[CHECKPOINT FEATURES] TRUTH",
        help="A checkpoint and a feature store followed by the ground truth, or only the ground "
             "truth with --predictions. Truth: a label store (.h5), a CSV/TSV id,label (labels joined "
             "by ';' for multi-label) or a strong-event TSV id,onset,offset,label.")],
    predictions: Annotated[Optional[Path], typer.Option(
        "--predictions", "-p", help="Score a predictions file instead of a model: CSV/TSV/JSONL with "
        "'id' plus one probability column per class, or rows 'id,label,prob' (top-k).")] = None,
    events: Annotated[Optional[Path], typer.Option(
        "--events", help="Estimated events TSV id,onset,offset,label for segment/event F1.")] = None,
    candidates: Annotated[Optional[Path], typer.Option(
        "--candidates", help="Label store whose candidate sets are scored against the truth "
        "(PLL coverage and disambiguation accuracy).")] = None,
    json_out: JsonOut = None,
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", metavar="DIR", help="Write PNGs (confusion matrix, PR curves, reliability, "
        "training curves) to DIR; needs matplotlib (pip install 'pllcli[plots]').")] = None,
    train_log: Annotated[Optional[Path], typer.Option(
        "--train-log", help="Training log (log.jsonl of `pllcli train`) for the training-curve plot.")] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", min=0.0, max=1.0, help="Decision threshold for multi-label / frame F1.")] = 0.5,
    collar: Annotated[float, typer.Option("--collar", min=0.0, help="Event-based onset collar (s).")] = 0.2,
    offset_pct: Annotated[float, typer.Option(
        "--offset-pct", min=0.0, help="Event-based offset collar as a share of the event length.")] = 0.5,
    segment: Annotated[float, typer.Option(
        "--segment", min=1e-3, help="Segment length (s) for segment-based F1.")] = 1.0,
    bins: Annotated[int, typer.Option("--bins", min=2, help="Confidence bins for ECE.")] = 15,
    chunk: Annotated[Optional[float], typer.Option(
        "--chunk", min=0.0, help="Average clip scores over chunks of this many seconds (default: the "
        "checkpoint's segment length if it was trained with --segment-labels; 0 = whole clips).")] = None,
    batch_size: BatchSize = 32,
    device: Device = "cpu",
):
    """Score a model or a predictions file against ground truth: clip metrics (accuracy, F1,
    ECE / mAP, lwlrap, AUC, d'), PLL metrics, frame/segment/event F1 for strong truth."""
    from pllcli.errors import UsageError
    from pllcli.evaluate import evaluate, make_plots, render
    from pllcli.io import write_json
    if predictions is not None:
        if len(inputs) != 1:
            raise UsageError("with --predictions give only the ground truth as argument")
        ckpt = feats = None
        truth = inputs[0]
    else:
        if len(inputs) != 3:
            raise UsageError("give CHECKPOINT FEATURES TRUTH (or --predictions FILE TRUTH)")
        ckpt, feats, truth = inputs
    if train_log is not None and plots is None:
        raise UsageError("--train-log is used for --plots; give --plots DIR too")
    result = evaluate(truth, checkpoint=ckpt, features=feats, predictions=predictions,
                      estimated_events=events, candidates=candidates, batch_size=batch_size, device=device,
                      threshold=threshold, t_collar=collar, percentage_of_length=offset_pct,
                      segment_resolution=segment, n_bins=bins, chunk=chunk)
    if plots is not None:
        result.report["plots"] = make_plots(result, plots, train_log)
    if json_out != "-":
        from rich.console import Console
        render(result, Console(width=110))
    write_json(result.report, json_out)


def register(app: typer.Typer) -> None:
    app.command(name="evaluate")(evaluate_cmd)
