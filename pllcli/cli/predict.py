"""`pllcli predict`: top-k labels with probabilities for every item of a feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import BatchSize, CheckpointPath, Device, FeatureStorePath, JsonOut


def predict_cmd(
    checkpoint: CheckpointPath,
    features: FeatureStorePath,
    out: Annotated[str, typer.Option("-o", "--out", help="Output .csv, .tsv or .jsonl ('-' = CSV on stdout).")] = "-",
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels per item.")] = 1,
    restrict_candidates: Annotated[Optional[Path], typer.Option(
        "--restrict-candidates", help="Label store: restrict each item to its candidate set "
                                      "(disambiguates training data).")] = None,
    device: Device = "auto",
    batch_size: BatchSize = 64,
    json_out: JsonOut = None,
):
    """Predict labels for a feature store with a trained checkpoint."""
    from pllcli.io import write_json
    from pllcli.predict import predict
    summary = predict(checkpoint, features, out, top_k, restrict_candidates, device, batch_size)
    write_json(summary, json_out)


def register(app):
    app.command(name="predict")(predict_cmd)
