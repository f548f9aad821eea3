"""The CLI frame: version, help, error mapping, exit codes, light start-up."""
import subprocess
import sys

from pllcli import __version__
from pllcli.cli.errors import format_error
from pllcli.errors import InputError, UsageError
from tests.conftest import run_cli


def test_version_and_help():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pllcli {__version__}"
    r = run_cli("-h")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_unknown_command_is_usage_error():
    r = run_cli("no-such-command")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_input_error_message_names_file_line_and_field():
    msg, code = format_error(InputError("missing column 'id'", "a.csv", line=1, field="id"))
    assert msg == "a.csv:1 [id]: missing column 'id'" and code == 1
    assert format_error(UsageError("bad"))[1] == 2


def test_unexpected_error_is_one_line_with_hint():
    msg, code = format_error(ValueError("boom\nsecond line"))
    assert code == 1 and "\n" not in msg and "--debug" in msg and "boom" in msg


def test_help_does_not_import_torch():
    code = ("import sys; from pllcli.cli import app; "
            "import typer.main; cmd = typer.main.get_command(app.app); "
            "print('torch' in sys.modules, 'h5py' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False False", r.stderr


def test_ctrl_c_is_exit_130_with_one_line(capsys):
    """typer turns KeyboardInterrupt into a silent exit 130; run_app says why, and puts the
    SIGINT handler back."""
    import os
    import signal

    import typer

    from pllcli.cli.errors import run_app
    app = typer.Typer()

    @app.command()
    def slow():
        os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C delivers
        raise AssertionError("not interrupted")

    @app.command()
    def other():
        pass

    before = signal.getsignal(signal.SIGINT)
    assert run_app(app, ["slow"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "error: interrupted" and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before
