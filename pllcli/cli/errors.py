"""Map exception types to one-line messages and exit codes.

0 ok, 1 failure, 2 usage, 130 Ctrl-C. Tracebacks only with `--debug`
(or PLLCLI_DEBUG=1, which also covers errors raised before option parsing).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

import typer

try:  # typer >= 0.22 vendors click
    from typer.exceptions import TyperException as _CliException
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException as _CliException

from pllcli.cli._state import settings
from pllcli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, PllcliError


def _debug() -> bool:
    return settings.debug or os.environ.get("PLLCLI_DEBUG", "") not in ("", "0")


def format_error(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception raised by a command."""
    if isinstance(exc, PllcliError):
        return str(exc), exc.exit_code
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file or directory", EXIT_FAILURE
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename}: is a directory", EXIT_FAILURE
    if isinstance(exc, PermissionError):
        return f"{exc.filename}: permission denied", EXIT_FAILURE
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return f"{exc.filename}: {exc.strerror or exc}", EXIT_FAILURE
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not valid UTF-8 ({exc.reason} at byte {exc.start})", EXIT_FAILURE
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --batch-size", EXIT_FAILURE
    name = type(exc).__name__
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"internal error ({name}{': ' + msg if msg else ''}); rerun with --debug for the traceback", EXIT_FAILURE


def usage_error_line(exc: BaseException) -> str:
    """A click/typer usage error in pllcli's own style: `error: <lowercase message> (see 'CMD -h')`,
    one line."""
    fmt = getattr(exc, "format_message", None)
    msg = " ".join(str(fmt() if fmt else exc).split()).rstrip(".").replace(": Value error, ", ": ")
    if msg[:1].isupper() and not msg[1:2].isupper():
        msg = msg[0].lower() + msg[1:]
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
    return f"error: {msg or type(exc).__name__}{hint}"


def run_app(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run a Typer app in non-standalone mode; return the exit code."""
    command = typer.main.get_command(app)
    stopped: list[int] = []

    def on_signal(signum, frame):  # typer turns Ctrl-C into a silent exit 130: note it to say so
        stopped.append(signum)
        raise KeyboardInterrupt  # stages save what they can (train: last.pt mid-epoch; featurize: its journal)

    def interrupted() -> int:
        if stopped and stopped[0] == signal.SIGTERM:  # kill, scancel, a batch system's time limit
            print("error: terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

    prev = {}
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                prev[sig] = signal.signal(sig, on_signal)
    try:
        rv = command.main(args=argv, prog_name="pllcli", standalone_mode=False)
        if stopped and rv == EXIT_INTERRUPTED:
            return interrupted()
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return interrupted()
    except _CliException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `pllcli` alone: the help is the answer
            e.show(file=sys.stderr)
        else:
            print(usage_error_line(e), file=sys.stderr)
        return e.exit_code if e.exit_code else EXIT_USAGE
    except BrokenPipeError:
        return 0
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into messages
        if isinstance(e, SystemExit):
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILURE)
        if _debug():
            traceback.print_exc()
        msg, code = format_error(e)
        print(f"error: {msg}", file=sys.stderr)
        return code
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)
