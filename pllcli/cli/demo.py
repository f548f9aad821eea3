"""`pllcli demo`: run the whole pipeline on an embedded synthetic voice-message corpus."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import JsonOut, Seed, output_option, positional_output


class Size(str, Enum):
    default = "default"
    small = "small"
    tiny = "tiny"


def demo(
    outdir_pos: Annotated[Optional[Path], positional_output("[DIR]", "the working folder")] = None,
    output: Annotated[Optional[Path], output_option("DIR", "Working folder (created; default: runs/demo).")] = None,
    size: Annotated[Size, typer.Option("--size", help="Corpus size and epochs; wall time on 2 CPU cores, free "
                                       "to shared with other jobs: default (1,500 messages, 12 epochs, two "
                                       "trainings) 2-16 min; small (500, 10 epochs) 2-5 min; tiny (120, 2 "
                                       "epochs) 1-4 min.")] = Size.default,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Override the training epochs.")] = None,
    seed: Seed = 0,
    json_out: JsonOut = None,
):
    """Synthesise a voice-message + chat corpus and run featurize -> build-candidates -> train ->
    evaluate -> predict -> export on it, then compare with an oracle trained on the true labels."""
    from rich.console import Console
    from rich.table import Table

    from pllcli.cli._options import output_or_positional
    from pllcli.cli._state import settings
    from pllcli.demo import run_demo
    from pllcli.io import write_json

    outdir = output_or_positional(output, outdir_pos, "demo", default=Path("runs/demo"))
    res = run_demo(outdir, size=size.value, epochs=epochs, seed=seed, quiet=settings.verbosity < 0)
    f = res.figures
    console = Console(stderr=json_out == "-")
    t = Table(title="pllcli demo: voice messages with chat candidates")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("classes / typed messages / clean / unlabeled",
              f"{f['classes']} / {f['typed_messages']} / {f['clean_labels']} / {f['unlabeled_messages']}")
    if f.get("mean_set_size") is not None:
        t.add_row("mean candidate-set size", f"{f['mean_set_size']:.2f}")
    t.add_row("test accuracy, PLL default (chat candidates)", f"{f['pll_test_accuracy']:.3f}")
    t.add_row("test accuracy, oracle (true labels)", f"{f['oracle_test_accuracy']:.3f}")
    t.add_row("PLL / oracle", f"{f['pll_over_oracle']:.3f}")
    t.add_row("training messages disambiguated correctly", f"{f['disambiguation_accuracy']:.3f}")
    t.add_row("wall time (s)", f"{f['wall_seconds']:.0f}")
    console.print(t)
    a = Table(title="artefacts")
    a.add_column("what")
    a.add_column("where")
    for k, v in res.artefacts.items():
        a.add_row(k, v)
    console.print(a)
    write_json({"figures": f, "artefacts": res.artefacts, "stages": res.stages}, json_out)


def register(app: typer.Typer) -> None:
    app.command(name="demo")(demo)
