"""`pllcli predict`: top-k labels with probabilities for every item of a feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import (BatchSize, CheckpointPath, Device, JsonOut, RestrictCandidates, duration_option,
                                 file_option, valued_option)
from pllcli.cli._options import Data, MaxMemory
from pllcli.training.config import DataPath

_EV = "Frame-level outputs"
_THRESHOLDS = "T|CLASS=T,..."  # metavar of --threshold and --low


def predict_cmd(
    checkpoint: CheckpointPath,
    features: Annotated[str, typer.Argument(
        metavar="FEATURES", help="Feature store (.h5), or audio featurized with the checkpoint's feature "
        "config: one file, a folder, a manifest (CSV/TSV/JSONL with id,path) or '-' (manifest on stdin).")],
    output: Annotated[str, typer.Option(
        "-o", "--output", metavar="PATH", help="Predictions: .csv, .tsv or .jsonl ('-' = CSV on stdout).")] = "-",
    top_k: Annotated[int, typer.Option("--top-k", "-k", metavar="K", min=1, help="Labels per item.")] = 1,
    restrict_candidates: RestrictCandidates = None,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Leave out items whose features contain NaN/inf (counted on stderr and in "
                           "--json) instead of failing.")] = False,
    encoder: Annotated[Optional[str], typer.Option(
        "--encoder", metavar="SPEC", help="For audio inputs of a checkpoint trained on encoder features: the "
        "same encoder files at other paths on this machine (their sha256 must match the checkpoint's).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output that is not a predictions table.")] = False,
    out_old: Annotated[Optional[str], typer.Option("--out", hidden=True, help="Deprecated: use -o/--output.")] = None,
    events: Annotated[Optional[str], file_option("--events", "Frame-level models: write thresholded events (id "
                                                 "onset offset label) as TSV ('-' = stdout).", _EV)] = None,
    frame_scores: Annotated[Optional[str], valued_option(
        "--frame-scores", "PATH", "Frame-level models: write per-frame class probabilities: a folder of <id>.tsv "
        "score files (onset, offset, one column per class; the sed_scores_eval layout DCASE tools read), or one "
        "table with an id column for a PATH ending in .tsv.", _EV)] = None,
    threshold: Annotated[str, valued_option("--threshold", _THRESHOLDS, "Event threshold on frame probability: "
        "one value, or per class (dog=0.3,cat=0.6, with an optional default first: 0.5,dog=0.3).", _EV)] = "0.5",
    low: Annotated[Optional[str], valued_option("--low", _THRESHOLDS, "Hysteresis: an event starts at --threshold "
                                                "and lasts while the probability stays >= this (same forms as "
                                                "--threshold).", _EV)] = None,
    median: Annotated[str, valued_option("--median", "N|DURATION", "Median filter: N frames (odd integer), or a "
                                         "duration (450ms, 0.45s) rounded to an odd number of frames.", _EV)] = "1",
    min_duration: Annotated[str, duration_option(
        "--min-duration", "Drop events shorter than this (200ms, 0.2 or 0 = keep all).", _EV)] = "0",
    min_gap: Annotated[str, duration_option("--min-gap", "Merge events of one class separated by less than this "
                                            "(100ms, 0.1 or 0 = never).", _EV)] = "0",
    extend: Annotated[Optional[str], valued_option(
        "--extend", "BEFORE,AFTER", "Widen each event: onset BEFORE earlier, offset AFTER later (64ms,128ms or "
        "seconds; one value = both; -64ms,128ms moves onsets later), never past the middle of the gap to the "
        "next event of its class.",
        _EV)] = None,
    tune_labels: Annotated[Optional[Path], valued_option("--tune-labels", "LABELS", "Pick each class's threshold "
        "for the best event F1 on these strong labels (label store or id,onset,offset,label TSV) of "
        "--tune-features.", _EV)] = None,
    tune_features: Annotated[Optional[Path], valued_option(
        "--tune-features", "FEATURES", "Validation feature store for --tune-labels.", _EV)] = None,
    segment_classes: Annotated[bool, typer.Option(
        "--segment-classes", help="WHEN/WHO checkpoints: each detected segment gets the one tag WHO scores "
        "highest on that segment (default: every likely tag of the clip).", rich_help_panel=_EV)] = False,
    chunk: Annotated[Optional[str], duration_option(
        "--chunk", "Average clip scores over chunks of this length (2s, 500ms or seconds; default: the "
        "checkpoint's segment length if it was trained with --segment-labels; 0 = whole clips).")] = None,
    data: Data = DataPath.auto,
    max_memory: MaxMemory = None,
    device: Device = "auto",
    batch_size: BatchSize = 64,
    json_out: JsonOut = None,
):
    """Predict labels for a feature store or audio files with a trained checkpoint (and events for
    frame-level models)."""
    import sys

    from pllcli.cli._state import one_blas_thread
    one_blas_thread()   # audio inputs are featurized here; the model itself runs on torch's threads
    from pllcli.cli._options import memory_bytes
    from pllcli.io import write_json
    from pllcli.predict import predict
    if out_old is not None:
        if output != "-":
            from pllcli.errors import UsageError
            raise UsageError("give only -o/--output (--out is its deprecated spelling)")
        print("warning: --out is deprecated; use -o/--output", file=sys.stderr)
        output = out_old
    if output == "-" and json_out == "-":
        from pllcli.errors import UsageError
        raise UsageError("the predictions go to stdout (-o -): give --json a file, or -o a file")
    summary = predict(checkpoint, features, output, top_k, restrict_candidates, device, batch_size,
                      events=events, frame_scores=frame_scores, threshold=threshold, median=median,
                      min_duration=_seconds_or_zero(min_duration, "--min-duration"), chunk=_chunk_seconds(chunk),
                      skip_bad=skip_bad, overwrite=overwrite, json_out=json_out,
                      data=data, max_memory=memory_bytes(max_memory), encoder=encoder,
                      decode=_decode_options(low, min_gap, tune_labels, tune_features, events, segment_classes,
                                             extend))
    write_json(summary, json_out)
    _report_written(summary, output, json_out, events, frame_scores)


def _chunk_seconds(spec: Optional[str]) -> Optional[float]:
    """--chunk: None (checkpoint default), 0 (whole clips) or a duration in seconds."""
    if spec is None:
        return None
    try:
        if float(spec) == 0:
            return 0.0
    except ValueError:
        pass
    from pllcli.io import parse_duration
    return parse_duration(spec, "--chunk")


def _seconds_or_zero(spec: str, option: str) -> float:
    """A duration in seconds, with 0 allowed (= off)."""
    try:
        if float(spec) == 0:
            return 0.0
    except ValueError:
        pass
    from pllcli.io import parse_duration
    return parse_duration(spec, option)


def _extend_seconds(spec: Optional[str]) -> tuple[float, float]:
    """--extend BEFORE,AFTER (or one value for both) -> (before, after) seconds; a leading '-'
    moves that boundary inwards (-64ms,128ms: onsets 64 ms later, offsets 128 ms later)."""
    from pllcli.errors import UsageError
    if spec is None:
        return (0.0, 0.0)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) not in (1, 2) or not all(p.lstrip("-") for p in parts):
        raise UsageError(f"--extend: give BEFORE,AFTER or one value (e.g. 0,128ms or -64ms,128ms), got {spec!r}")
    before, after = ((-1.0 if p.startswith("-") else 1.0) * _seconds_or_zero(p.lstrip("-"), "--extend")
                     for p in (parts * 2)[:2])
    return (before, after)


def _decode_options(low, min_gap, tune_labels, tune_features, events, segment_classes=False, extend=None) -> dict:
    """The event-decoding options beyond threshold / median / min-duration, for `predict(decode=)`."""
    from pllcli.errors import UsageError
    if (tune_labels is None) != (tune_features is None):
        raise UsageError("--tune-labels and --tune-features go together")
    if tune_labels is not None and events is None:
        raise UsageError("--tune-labels tunes event thresholds; give --events FILE too")
    return {"low": low, "min_gap": _seconds_or_zero(min_gap, "--min-gap"), "segment_classes": segment_classes,
            "tune": None if tune_labels is None else (tune_features, tune_labels), "extend": _extend_seconds(extend)}


def _report_written(summary: dict, output: str, json_out, events, frame_scores) -> None:
    """What predict wrote: on stdout, or on stderr when stdout carries data."""
    import sys
    to_stdout = "-" not in (output, json_out, events, frame_scores)
    stream = sys.stdout if to_stdout else sys.stderr
    skipped = len(summary.get("skipped_bad", []))
    written = [f"{summary['items']} predictions to {'stdout' if output == '-' else output}"]
    written += [f"{what} to {'stdout' if p == '-' else p}" for what, p in
                (("events", events), ("frame scores", frame_scores), ("figures", json_out)) if p is not None]
    print("wrote " + ", ".join(written) + (f" ({skipped} item(s) skipped)" if skipped else ""), file=stream)


def register(app):
    app.command(name="predict")(predict_cmd)
