"""`pllcli export`: checkpoint + frontend -> TorchScript or ONNX, with an optional parity check."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import CheckpointPath, JsonOut, Overwrite


def export_cmd(
    checkpoint: CheckpointPath,
    clips: Annotated[Optional[List[Path]], typer.Argument(
        metavar="[CLIPS]...", help="Audio clips for --check (default: a synthetic tone).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file: model.onnx or model.pt.")] = ...,
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="onnx or torchscript (default: from the output suffix).")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Run the exported model and torch eager on CLIPS; fail above --tolerance.")] = False,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", min=0.0, help="Max abs difference of logits/probabilities allowed by --check.")] = 1e-3,
    overwrite: Overwrite = False,
    json_out: JsonOut = None,
):
    """Export a classifier with its feature frontend inside the graph: waveform in, logits and
    probabilities out (dynamic time axis; classes and sample rate stored as metadata)."""
    from pllcli.errors import UsageError
    from pllcli.export import ExportError, check as run_check, export
    from pllcli.io import write_json
    if clips and not check:
        raise UsageError("clips were given without --check")
    if output.exists() and not overwrite:
        raise UsageError(f"{output} exists (use --overwrite)")
    md = export(checkpoint, output, fmt)
    result = {"export": {k: md[k] for k in ("path", "format", "size_bytes", "sample_rate", "task",
                                              "min_samples", "feature_config_hash")},
              "classes": md["classes"]}
    if "frontend_rewrite_max_abs_diff" in md:
        result["export"]["frontend_rewrite_max_abs_diff"] = md["frontend_rewrite_max_abs_diff"]
    typer.echo(f"wrote {md['path']} ({md['format']}, {md['size_bytes'] / 1e6:.2f} MB, "
               f"{len(md['classes'])} classes, {md['sample_rate']} Hz)")
    if check:
        res = run_check(checkpoint, output, [str(c) for c in clips or []], tolerance, fmt)
        result["check"] = res
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"parity {res['format']} vs torch eager")
        for col in ("clip", "seconds", "max |dlogits|", "max |dprobs|", "same top-1"):
            t.add_column(col)
        for r in res["clips"]:
            t.add_row(r["clip"], f"{r['seconds']:.2f}", f"{r['logits_max_abs_diff']:.3g}",
                      f"{r['probs_max_abs_diff']:.3g}", "yes" if r["same_top1"] else "NO")
        Console(width=110).print(t)
        typer.echo(f"max abs diff {res['max_abs_diff']:.3g} (tolerance {tolerance:g})")
    write_json(result, json_out)
    if check and not result["check"]["ok"]:
        raise ExportError(f"--check: exported model differs from torch eager by "
                          f"{result['check']['max_abs_diff']:.3g} > tolerance {tolerance:g}")


def register(app: typer.Typer) -> None:
    app.command(name="export")(export_cmd)
