import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    yield


def run_cli(*args, input=None):
    """Run `python -m pllcli ARGS` in a subprocess; return CompletedProcess."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "pllcli", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=600)


@pytest.fixture
def cli_inproc(capsys):
    """Run the CLI in this process (no interpreter start-up): cli_inproc(*args) -> (exit code, stdout, stderr)."""
    from pllcli.cli.app import app
    from pllcli.cli.errors import run_app

    def run(*args):
        capsys.readouterr()
        code = run_app(app, [str(a) for a in args])
        cap = capsys.readouterr()
        return code, cap.out, cap.err
    return run
