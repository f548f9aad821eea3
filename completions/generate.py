"""Write pllcli's shell completion scripts (bash, zsh, fish) beside this file.

The scripts call back into `pllcli` on every TAB (which is why the CLI keeps torch
out of its start-up). Regenerate with `make -C completions`.
"""
from pathlib import Path

try:
    from typer._completion_shared import get_completion_script
except ImportError:  # older typer
    from typer.completion import get_completion_script  # type: ignore

HERE = Path(__file__).parent
NAMES = {"bash": "pllcli.bash", "zsh": "_pllcli", "fish": "pllcli.fish"}

if __name__ == "__main__":
    for shell, name in NAMES.items():
        script = get_completion_script(prog_name="pllcli", complete_var="_PLLCLI_COMPLETE", shell=shell)
        (HERE / name).write_text(script.strip() + "\n")
        print(f"wrote completions/{name}")
