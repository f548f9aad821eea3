"""`pllcli export`: checkpoint + frontend -> TorchScript or ONNX, with an optional parity check."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import CheckpointPath, JsonOut, Overwrite


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


def export_cmd(
    checkpoint: CheckpointPath,
    clips: Annotated[Optional[List[Path]], typer.Argument(
        metavar="CLIPS", help="Audio clips for --check (default: a synthetic tone).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH",
                                         help="Output file: model.onnx (ONNX) or model.pt (TorchScript).")] = ...,
    fmt: Annotated[Optional[ExportFormat], typer.Option(
        "--format", "-f", help="Output format (default: from the output suffix).")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Run the exported model and torch eager on CLIPS; fail above --tolerance and "
                        "then leave nothing at the output path.")] = False,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", metavar="TOL", min=0.0, help="Max abs difference of logits/probabilities allowed by --check.")] = 1e-3,
    overwrite: Overwrite = False,
    json_out: JsonOut = None,
):
    """Export a classifier with its feature frontend inside the graph: waveform in, logits and
    probabilities out (dynamic time axis; classes and sample rate stored as metadata)."""
    import sys

    from pllcli.errors import UsageError
    from pllcli.export import SUFFIXES, ExportError, check as run_check, export
    from pllcli.io import check_output, check_report_output, write_json
    if clips and not check:
        raise UsageError("clips were given without --check")
    fmt = fmt.value if fmt is not None else None
    suffixes = SUFFIXES[fmt] if fmt else tuple(s for v in SUFFIXES.values() for s in v)
    check_output(output, suffixes, command="export", overwrite=overwrite, inputs=(checkpoint, *(clips or [])))
    check_report_output(json_out, command="export", overwrite=overwrite, inputs=(checkpoint, output))
    out = sys.stderr if json_out == "-" else sys.stdout  # stdout carries the JSON then
    result: dict = {}

    def verify(tmp, tmp_fmt):
        res = run_check(checkpoint, tmp, [str(c) for c in clips or []], tolerance, tmp_fmt)
        res["exported"] = str(output)
        result["check"] = res
        _print_parity(res, tolerance, out)
        if not res["ok"]:
            raise ExportError(f"--check: exported model differs from torch eager by {res['max_abs_diff']:.3g} "
                              f"> tolerance {tolerance:g}; nothing was written to {output}")

    try:
        md = export(checkpoint, output, fmt, verify=verify if check else None)
    except ExportError:
        if "check" in result:
            write_json(dict(result, written=None), json_out)
        raise
    result = {"export": {k: md[k] for k in ("path", "format", "size_bytes", "sample_rate", "task",
                                              "min_samples", "feature_config_hash")},
              "classes": md["classes"], **result}
    if "frontend_rewrite_max_abs_diff" in md:
        result["export"]["frontend_rewrite_max_abs_diff"] = md["frontend_rewrite_max_abs_diff"]
    write_json(result, json_out)
    print(f"wrote {md['path']} ({md['format']}, {md['size_bytes'] / 1e6:.2f} MB, {len(md['classes'])} classes, "
          f"{md['sample_rate']} Hz" + (", parity checked" if check else "") + ")", file=out)


def _print_parity(res: dict, tolerance: float, file) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"parity {res['format']} vs torch eager")
    for col in ("clip", "seconds", "max |dlogits|", "max |dprobs|", "same top-1"):
        t.add_column(col)
    for r in res["clips"]:
        t.add_row(r["clip"], f"{r['seconds']:.2f}", f"{r['logits_max_abs_diff']:.3g}",
                  f"{r['probs_max_abs_diff']:.3g}", "yes" if r["same_top1"] else "NO")
    console = Console(width=110, file=file)
    console.print(t)
    console.print(f"max abs diff {res['max_abs_diff']:.3g} (tolerance {tolerance:g})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="export")(export_cmd)
