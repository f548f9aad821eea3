"""Reusable `Annotated` option aliases shared by the subcommands."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Iterable, Optional

import typer

from pllcli.training.config import DataPath

JsonOut = Annotated[Optional[str], typer.Option(
    "--json", metavar="FILE", help="Also write the figures as JSON to FILE ('-' for stdout).")]
# every command gives --device the default "auto" (tests/test_cli_grammar.py checks it)
Device = Annotated[str, typer.Option("--device", help="auto (a GPU when there is one), cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Parallel worker processes.")]
Shard = Annotated[Optional[str], typer.Option(
    "--shard", metavar="I/N", help="Process only slice I of N (0-based); merge the parts afterwards.")]
Strict = Annotated[bool, typer.Option("--strict", help="Fail instead of skipping bad items.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Items per batch.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
FeatureStorePath = Annotated[Path, typer.Argument(metavar="FEATURES", help="Feature store (.h5).")]
CheckpointPath = Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Checkpoint file (.pt).")]
Output = Annotated[Path, typer.Option("--output", "-o", metavar="PATH", help="Output file.")]
OutputDir = Annotated[Path, typer.Option("--output", "-o", metavar="DIR", help="Output folder.")]


def _label_store_path(value: Optional[Path]) -> Optional[Path]:
    if value is not None and str(value).startswith("-"):  # `--restrict-candidates -o out.h5`: the old flag
        raise typer.BadParameter(f"takes a label store path (it is no longer a flag), got {str(value)!r}")
    return value


RestrictCandidates = Annotated[Optional[Path], typer.Option(
    "--restrict-candidates", metavar="LABELS", callback=_label_store_path,
    help="Label store: restrict each item to its candidate set (items without one are unrestricted).")]


def name_completer(names: Callable[[], Iterable[str]]) -> Callable[[str], list[str]]:
    """A typer `autocompletion=` for NAME[:k=v] values: TAB offers the names from `names()`
    (called lazily, on TAB only, so it may import the library)."""
    def complete(incomplete: str) -> list[str]:
        return [n for n in sorted(names()) if n.startswith(incomplete)]
    return complete


def output_or_positional(output: Optional[Path], positional: Optional[Path], command: str,
                         default: Optional[Path] = None) -> Path:
    """-o/--output, or the deprecated positional spelling of the output (warning on stderr), or
    `default`; UsageError when both or (without a default) neither are given."""
    import sys

    from pllcli.errors import UsageError
    if output is not None and positional is not None:
        raise UsageError(f"give the output once: -o {output} (the positional {positional} is its deprecated "
                         "spelling)")
    if positional is not None:
        print(f"warning: the positional output of {command} is deprecated; use -o/--output", file=sys.stderr)
        return positional
    if output is None and default is None:
        raise UsageError(f"missing option -o/--output (see 'pllcli {command} -h')")
    return output if output is not None else default


def positional_output(metavar: str, what: str):
    """typer.Argument for the deprecated positional spelling of a command's output (hidden; kept
    for one release, issue 18). `what` names the output in the help: 'the label store to write'."""
    return typer.Argument(metavar=metavar, hidden=True, help=f"Deprecated: {what}; use -o/--output.")


def output_option(metavar: str, help: str):
    """typer.Option for a command's one output, -o/--output PATH (issue 18)."""
    return typer.Option("--output", "-o", metavar=metavar, help=help)


def valued_option(flag: str, metavar: str, help: str, panel: Optional[str] = None, **kw):
    """typer.Option for a flag with a value (`--voice FILE`), optionally in a --help panel."""
    return typer.Option(flag, metavar=metavar, help=help, rich_help_panel=panel, **kw)


def file_option(flag: str, help: str, panel: Optional[str] = None):
    """typer.Option for an input file: `--vocab FILE`."""
    return valued_option(flag, "FILE", help, panel)


def duration_option(flag: str, help: str, panel: Optional[str] = None):
    """typer.Option for a duration: 2s, 500ms or a plain number of seconds (the command parses it
    with pllcli.io.parse_duration)."""
    return valued_option(flag, "DURATION", help, panel)


Data = Annotated[DataPath, typer.Option(
    "--data", help="Load the feature store into memory, stream it from disk (bounded memory), or stream only "
                   "when it exceeds --max-memory.")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="SIZE", help="Memory budget for feature data: 8G, 512M or 40% of RAM; default 50% "
                                         "of RAM (per machine: shared by its torchrun processes).")]
LoaderWorkers = Annotated[Optional[int], typer.Option(
    "--loader-workers", metavar="N", min=0, help="DataLoader worker processes of the stream path (default 0 on "
                                                 "CPU, 2 with CUDA).")]


def memory_bytes(max_memory: str | None) -> int | None:
    """--max-memory SIZE -> bytes (None: the default budget)."""
    from pllcli.training.stream import parse_memory
    return parse_memory(max_memory)
