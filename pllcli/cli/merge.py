"""`pllcli merge PART... -o OUT`: combine shards of a store into one."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import Overwrite, output_or_positional


def merge_cmd(
    parts: Annotated[list[str], typer.Argument(metavar="PART...", help=(
        "Stores to combine, all of one format (feature stores or label stores). Feature stores written "
        "with --shard I/N are put in shard order, giving the same store as a single run. (Without -o, "
        "the first is taken as the output: the deprecated `merge OUT PART...`.)"))],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="PATH", help="Store to write (.h5); required.")] = None,
    overwrite: Overwrite = False,
):
    """Merge feature stores (or label stores) made by sharded runs into one store."""
    from pllcli.cli._state import settings
    from pllcli.errors import InputError, UsageError
    from pllcli.features.store import FORMAT, LABEL_FORMAT, read_format

    legacy = None
    if output is None and len(parts) >= 2:
        legacy, parts = Path(parts[0]), parts[1:]
    output = str(output_or_positional(output, legacy, "merge"))

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
            msg = f"merged {len(parts)} stores: {len(fs)} items, {fs.total_duration():.1f} s audio -> {output}"
    elif fmt == LABEL_FORMAT:
        from pllcli.labels.store import merge_label_stores
        merge_label_stores(output, parts)
        msg = f"merged {len(parts)} label stores -> {output}"
    else:
        raise InputError(f"cannot merge files of format {fmt!r} (known: {FORMAT}, {LABEL_FORMAT})",
                         parts[0], field="format")
    if settings.verbosity >= 0:
        print(msg)


def register(app: typer.Typer) -> None:
    app.command(name="merge")(merge_cmd)
