"""The `pllcli` application: one typer factory, global options, error mapping.

Subcommand modules live beside this file and expose `register(app)`; each one
imports torch/h5py inside its command functions so that `pllcli --help` and
shell completion stay fast.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Annotated, Optional

import typer

from pllcli import __version__
from pllcli.cli._state import settings

# Modules that add commands, in the order they appear in --help.
COMMAND_MODULES = [
    "featurize", "merge", "labels", "pretrain", "train", "pseudo_label", "evaluate",
    "predict", "export", "info", "demo",
]


def _untyped_flags(params):
    """--help without raw type names: flags and counters show no `<bool>`/`<int>`; a repeatable
    option without a metavar shows its NAME, a variadic argument no `<list[Path]>`."""
    for p in params:
        if (getattr(p, "is_flag", False) or getattr(p, "count", False)) and p.metavar is None:
            p.metavar = ""
        elif p.type_descriptor.is_list:
            if p.param_type_name == "argument":
                p.display_type_rich = lambda ctx: None  # its metavar already says PATH...
            elif p.metavar is None:
                p.metavar = p.name.upper()
    return params


class PllcliCommand(typer.core.TyperCommand):
    """A command whose --help shows flags without a value type."""

    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class PllcliGroup(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class PllcliTyper(typer.Typer):
    """Typer whose commands are `PllcliCommand`s unless a module asks for another class."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or PllcliCommand, **kwargs)


def typer_factory(**kwargs) -> typer.Typer:
    """A Typer app with the project's shared settings. Completion: the scripts in completions/
    (one way; typer's --install-completion is off)."""
    defaults = dict(
        cls=PllcliGroup,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    defaults.update(kwargs)
    return PllcliTyper(**defaults)


app = typer_factory(help="Train audio classifiers from ambiguous labels: candidate sets, "
                         "a few clean labels, weak tags and unlabeled audio.")


def _version_callback(value: bool):
    if value:
        typer.echo(f"pllcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only warnings and errors on stderr.")] = False,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More log output (repeatable).")] = 0,
):
    settings.debug = debug
    settings.verbosity = -1 if quiet else verbose
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


for _name in COMMAND_MODULES:  # a module that fails to import fails the app, loudly
    importlib.import_module(f"pllcli.cli.{_name}").register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and map exceptions to exit codes."""
    import os

    from pllcli.cli.errors import run_app
    if os.environ.get("_PLLCLI_COMPLETE"):  # a TAB from completions/: typer registers its shells
        from typer._completion_classes import completion_init  # only with add_completion, so here
        completion_init()
    code = run_app(app, argv)
    if _torchrun_rank():
        _exit_now(code)
    sys.exit(code)


def _torchrun_rank() -> bool:
    """True in one process of a multi-process torchrun job (WORLD_SIZE > 1) that has loaded torch
    (which loads torch.distributed)."""
    import os
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "torch.distributed" in sys.modules


def _exit_now(code: int) -> None:
    """Flush and leave without the interpreter's teardown. Under torchrun a gloo rank whose work
    is all done and written occasionally aborts in that teardown ("terminate called without an
    active exception" from a C++ destructor, no Python frame left: seen in 2 of 40 runs on a
    loaded machine), and torchrun then reports the whole job as failed."""
    import os
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)
