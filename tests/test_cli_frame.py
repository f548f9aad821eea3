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


def test_usage_errors_are_one_lowercase_line_exit_2():
    """click/typer usage errors read like pllcli's own: `error: ...`, one line, exit 2."""
    for args, words in ((("no-such-command",), "no such command 'no-such-command'"),
                        (("train", "--no-such-flag"), "no such option: --no-such-flag"),
                        (("export",), "missing argument 'CHECKPOINT'")):
        r = run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"error: {words}") and "-h" in lines[0], lines[0]


def test_no_args_still_prints_the_help():
    r = run_cli()
    assert "Usage" in r.stdout + r.stderr and "featurize" in r.stdout + r.stderr
    assert "error:" not in r.stderr


def test_one_completion_way_no_typer_install_completion():
    r = run_cli("-h")
    assert "--install-completion" not in r.stdout and "--show-completion" not in r.stdout
    r = run_cli("--install-completion")
    assert r.returncode == 2 and r.stderr.startswith("error: no such option")


def test_flags_show_no_bool_type_in_help():
    r = run_cli("-h")
    assert "--debug" in r.stdout and "<bool>" not in r.stdout and "<int>" not in r.stdout


def test_a_command_module_that_fails_to_import_fails_the_app():
    """No silent skipping: a broken (here: missing) command module is an ImportError, not a CLI
    without that command."""
    code = ("import sys; sys.modules['pllcli.cli.demo'] = None\n"
            "try:\n    import pllcli.cli.app\nexcept ImportError as e:\n    print('refused', e.name)\n"
            "else:\n    print('skipped')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "refused pllcli.cli.demo", r.stdout + r.stderr


def test_enum_usage_error_reads_plainly():
    r = run_cli("demo", "--size", "huge")
    assert r.stderr.strip() == ("error: invalid value for '--size': 'huge' is not one of 'default', 'small', "
                                "'tiny' (see 'pllcli demo -h')") and r.returncode == 2


def test_help_hides_raw_list_types_of_any_command():
    """The app's command class: a variadic argument shows no `<list[Path]>`, a repeatable option
    without a metavar shows its NAME, a flag no `<bool>`."""
    from pathlib import Path
    from typing import Annotated, List, Optional

    import typer
    from typer.testing import CliRunner

    from pllcli.cli.app import typer_factory
    toy = typer_factory()

    @toy.command()
    def one(clips: Annotated[List[Path], typer.Argument(help="Clips.")],
            tag: Annotated[Optional[List[str]], typer.Option("--tag", help="A tag.")] = None,
            check: Annotated[bool, typer.Option("--check", help="Check.")] = False):
        pass

    @toy.command()
    def two():
        pass

    out = CliRunner().invoke(toy, ["one", "-h"], terminal_width=200).output
    assert "--tag" in out and "TAG" in out and "clips" in out.lower()
    assert "list[" not in out and "<bool>" not in out, out
