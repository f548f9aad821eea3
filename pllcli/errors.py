"""Exception types that the CLI maps to one-line messages and exit codes.

Library code raises these; `pllcli.cli.app` turns them into `error: <message>`
on stderr and an exit code, with a traceback only under `--debug`.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class PllcliError(Exception):
    """Base class: a failure the user can act on. `str(e)` is the one-line message."""

    exit_code = EXIT_FAILURE


class InputError(PllcliError):
    """Bad input data. Names the file and, where known, the line or field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            if field is not None:
                where += f" [{field}]"
            where += ": "
        elif field is not None:
            where = f"[{field}] "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class UsageError(PllcliError):
    """Options that do not fit together (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigMismatchError(PllcliError):
    """A store or checkpoint made with another configuration than the one required."""


class CheckpointError(PllcliError):
    """A checkpoint that cannot be loaded safely or is of the wrong kind."""


class TrainingError(PllcliError):
    """Training cannot go on (empty set, NaN loss, ...)."""


class StrictModeError(PllcliError):
    """`--strict` was given and an item had to be skipped."""


class MissingExtraError(PllcliError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs the optional package '{package}': "
                         f"pip install 'pllcli[{extra}]'")
