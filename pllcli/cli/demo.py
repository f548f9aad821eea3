"""`pllcli demo`: run the whole pipeline on an embedded synthetic voice-message corpus."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import JsonOut, Seed


def demo(
    outdir: Annotated[Path, typer.Argument(metavar="[DIR]", help="Working folder (created).")] = Path("pllcli-demo"),
    size: Annotated[str, typer.Option("--size", help="default (~3-5 min on 2 cores), small or tiny.")] = "default",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Override the training epochs.")] = None,
    seed: Seed = 0,
    json_out: JsonOut = None,
):
    """Synthesise a voice-message + chat corpus and run featurize -> build-candidates -> train ->
    evaluate -> predict -> export on it, then compare with an oracle trained on the true labels."""
    from rich.console import Console
    from rich.table import Table

    from pllcli.demo import run_demo
    from pllcli.io import write_json

    res = run_demo(outdir, size=size, epochs=epochs, seed=seed)
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
