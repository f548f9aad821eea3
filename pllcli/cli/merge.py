"""`pllcli merge OUT PART...`: combine shards of a store into one."""
from __future__ import annotations

from typing import Annotated

import typer

from pllcli.cli._options import Overwrite


def merge_cmd(
    output: Annotated[str, typer.Argument(metavar="OUT", help="Store to write (.h5).")],
    parts: Annotated[list[str], typer.Argument(metavar="PART...", help=(
        "Stores to combine, all of one format (feature stores or label stores). Feature stores written "
        "with --shard I/N are put in shard order, giving the same store as a single run."))],
    overwrite: Overwrite = False,
):
    """Merge feature stores (or label stores) made by sharded runs into one store."""
    import logging
    from pathlib import Path

    from pllcli.errors import InputError, UsageError
    from pllcli.features.store import FORMAT, read_format

    if Path(output).exists() and not overwrite:
        raise UsageError(f"{output} already exists; pass --overwrite to replace it")
    if any(Path(p).resolve() == Path(output).resolve() for p in parts):
        raise UsageError(f"{output} is also one of the inputs")
    formats = {p: read_format(p) for p in parts}
    kinds = set(formats.values())
    if len(kinds) != 1:
        desc = ", ".join(f"{p}: {f or 'no format attr'}" for p, f in formats.items())
        raise InputError(f"inputs have different formats ({desc})", parts[0], field="format")
    fmt = kinds.pop()
    if fmt == FORMAT:
        from pllcli.features.store import FeatureStore, merge_feature_stores
        merge_feature_stores(output, parts)
        with FeatureStore(output) as fs:
            logging.getLogger("pllcli.merge").info(
                "merged %d stores: %d items, %.1f s audio -> %s", len(parts), len(fs), fs.total_duration(), output)
    elif fmt == "pllcli-labels":
        try:
            from pllcli.labels.store import merge_label_stores
        except ImportError:
            raise InputError("merging label stores needs pllcli.labels.store.merge_label_stores, "
                             "which this pllcli does not have", parts[0], field="format") from None
        merge_label_stores(output, parts)
        logging.getLogger("pllcli.merge").info("merged %d label stores -> %s", len(parts), output)
    else:
        raise InputError(f"cannot merge files of format {fmt!r} (known: {FORMAT}, pllcli-labels)",
                         parts[0], field="format")


def register(app: typer.Typer) -> None:
    app.command(name="merge")(merge_cmd)
