"""`pllcli info PATH`: describe a feature store, label store, checkpoint or training run folder."""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def describe_feature_store(path: str) -> dict:
    """Summary dict of a feature store: count, duration, config, frame-length stats."""
    import os

    import numpy as np

    from pllcli.features.store import FeatureStore
    with FeatureStore(path) as fs:
        nf = fs.num_frames
        stats = ({"min": int(nf.min()), "mean": round(float(nf.mean()), 2), "median": float(np.median(nf)),
                  "max": int(nf.max())} if len(nf) else {"min": None, "mean": None, "median": None, "max": None})
        d = fs.durations
        return {
            "path": str(path), "format": fs.attrs.get("format"), "format_version": int(fs.attrs.get("format_version", 0)),
            "items": len(fs), "total_duration_s": round(fs.total_duration(), 3),
            "duration_s": ({"min": round(float(d.min()), 3), "mean": round(float(d.mean()), 3),
                            "max": round(float(d.max()), 3)} if len(d) else None),
            "frames": int(fs.offsets[-1]), "frames_per_item": stats, "feature_dim": fs.feature_dim,
            "storage_dtype": fs.dtype, "feature_config": fs.config.to_dict(), "feature_config_hash": fs.config_hash,
            "meta_columns": fs.meta_columns, "pllcli_version": fs.attrs.get("pllcli_version"),
            "shard": fs.attrs.get("shard"), "file_bytes": os.path.getsize(path),
        }


def describe_run(path) -> dict:
    """A `pllcli train` output folder: its run files and which checkpoint model.pt is."""
    import json

    from pllcli.checkpoint import load_checkpoint
    from pllcli.cli.train import RUN_FILES
    d: dict = {"path": str(path), "files": [n for n in RUN_FILES if (path / n).exists()]}
    if (path / "model.pt").exists():
        d["model.pt"] = {"deployed_from": load_checkpoint(path / "model.pt")[1].get("deployed_from")}
    if (path / "summary.json").exists():
        s = json.loads((path / "summary.json").read_text())
        d["summary"] = {k: s[k] for k in ("epochs_run", "best", "averaged") if k in s}
    return d


def _describe(path: str) -> tuple[str, dict]:
    from pathlib import Path

    from pllcli.errors import InputError
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", path)
    if p.is_dir():
        if (p / "last.pt").exists() or (p / "model.pt").exists():
            return "training run", describe_run(p)
        raise InputError("is a directory (not a training run: no last.pt or model.pt)", path)
    import h5py
    if h5py.is_hdf5(str(p)):
        from pllcli.features.store import FORMAT, LABEL_FORMAT, read_format
        fmt = read_format(path)
        if fmt == FORMAT:
            return "feature store", describe_feature_store(path)
        if fmt == LABEL_FORMAT:
            from pllcli.labels.store import describe
            return "label store", describe(path)
        raise InputError(f"HDF5 file of unknown format {fmt!r} (known: {FORMAT}, {LABEL_FORMAT})", path,
                         field="format")
    with open(p, "rb") as f:
        head = f.read(4)
    if p.suffix in (".pt", ".pth", ".ckpt") or head[:2] == b"PK":
        from pllcli.checkpoint import describe as ck_describe
        return "checkpoint", ck_describe(path)
    raise InputError("not a pllcli feature store, label store or checkpoint", path)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v and len(v) <= 16 and all(not isinstance(x, (dict, list)) for x in v.values()):
            rows.append((prefix + k, ", ".join(f"{a}={b}" for a, b in v.items())))
        elif isinstance(v, dict):
            rows += _flat(v, prefix + k + ".")
        elif isinstance(v, (list, tuple)):
            s = ", ".join(map(str, v[:20])) + (f", ... ({len(v)} in all)" if len(v) > 20 else "")
            rows.append((prefix + k, s))
        else:
            rows.append((prefix + k, "" if v is None else str(v)))
    return rows


def info_cmd(
    path: Annotated[str, typer.Argument(
        metavar="PATH", help="Feature store, label store (.h5), checkpoint (.pt) or training run folder.")],
    json_out: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help=(
        "Write the description as JSON to FILE; '-' prints it on stdout instead of the table "
        "(the old bare --json flag is now --json -)."))] = None,
):
    """Describe a store, checkpoint or run folder: counts, durations, feature config, frame-length statistics,
    a run's files and which checkpoint its model.pt is."""
    from pllcli.io import write_json
    kind, d = _describe(path)
    if json_out is not None:
        write_json({"kind": kind, **d}, json_out)
        if json_out == "-":
            return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"{path} ({kind})", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in _flat(d):
        t.add_row(k, v)
    Console().print(t)


def register(app: typer.Typer) -> None:
    app.command(name="info")(info_cmd)
