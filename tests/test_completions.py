"""The bash completion script, sourced in a real bash, completes commands and options."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "completions" / "pllcli.bash"


def complete(*words: str) -> list[str]:
    """Simulate pressing TAB after `words` (the last word is the partial one)."""
    words_q = " ".join(f"'{w}'" for w in words)
    prog = f"""
source '{SCRIPT}'
COMP_WORDS=({words_q})
COMP_CWORD={len(words) - 1}
_pllcli_completion pllcli
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True,
                       env=env, timeout=600)  # the timeout only stops a hang
    assert r.returncode == 0, r.stderr
    return [ln.split(":")[0] for ln in r.stdout.splitlines() if ln.strip()]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completes_subcommand():
    assert shutil.which("pllcli", path=os.path.dirname(sys.executable)), "pllcli console script not installed"
    assert complete("pllcli", "fe") == ["featurize"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completes_subcommand_option():
    got = complete("pllcli", "featurize", "--jo")
    assert got == ["--jobs"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_completes_closed_values_to_names():
    """A closed choice (an Enum) completes to its names, not to file names."""
    assert complete("pllcli", "demo", "--size", "") == ["default", "small", "tiny"]
    assert complete("pllcli", "demo", "--size", "t") == ["tiny"]
    assert complete("pllcli", "train", "--objective", "fix") == ["fixmatch"]  # NAME[:k=v]: the names


def test_typer_completion_options_are_gone():
    """One way to complete: the scripts here, not typer's --install-completion."""
    from typer.testing import CliRunner

    from pllcli.cli.app import app
    r = CliRunner().invoke(app, ["-h"])
    assert "--install-completion" not in r.output and "--show-completion" not in r.output
    readme = (SCRIPT.parent / "README.md").read_text()
    assert "pllcli --install-completion" not in readme and "make -C completions" in readme


def test_generated_scripts_are_current(tmp_path):
    """The committed scripts equal what generate.py writes now."""
    gen = SCRIPT.parent / "generate.py"
    src = gen.read_text().replace("HERE = Path(__file__).parent", f"HERE = Path({str(tmp_path)!r})")
    subprocess.run([sys.executable, "-c", src], check=True, capture_output=True)
    for name in ("pllcli.bash", "_pllcli", "pllcli.fish"):
        assert (tmp_path / name).read_text() == (SCRIPT.parent / name).read_text(), name
