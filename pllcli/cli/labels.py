"""`pllcli build-candidates`: raw label sources -> label store (issue 3)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import JsonOut, Overwrite, Seed

_P = "Chat alignment"
_C = "Clean labels and weights"
_T = "Weak tags"
_S = "Simulation"


def build_candidates(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Label store to write (.h5).")],
    voice: Annotated[Optional[Path], typer.Option("--voice", help="Voice messages: id,time[,author].",
                                                  rich_help_panel=_P)] = None,
    chat: Annotated[Optional[Path], typer.Option("--chat", help="Chat log: time,author,text.",
                                                 rich_help_panel=_P)] = None,
    next_k: Annotated[Optional[int], typer.Option("--next", metavar="K", help="Candidates = the next K "
                      "in-vocabulary messages at or after the voice time (default 10 unless --window).",
                      rich_help_panel=_P)] = None,
    window: Annotated[Optional[str], typer.Option("--window", metavar="DURATION", help="Candidates = all "
                      "messages within DURATION after the voice time (30s, 1.5m, 500ms).",
                      rich_help_panel=_P)] = None,
    same_author: Annotated[bool, typer.Option("--same-author", help="Only chat messages by the voice "
                           "message's author (voice.csv needs an author column).", rich_help_panel=_P)] = False,
    exclude_authors: Annotated[Optional[List[str]], typer.Option("--exclude-authors", metavar="A,B",
                               help="Ignore chat messages by these authors (comma-separated, repeatable).",
                               rich_help_panel=_P)] = None,
    numbers: Annotated[str, typer.Option("--numbers", help="Number equivalence: words ('4 7' -> "
                       "'four seven'), digits ('four seven' -> '4 7') or none.", rich_help_panel=_P)] = "words",
    min_count: Annotated[int, typer.Option("--min-count", min=1, help="A normalised text is a class only "
                         "if it occurs at least this often in the chat; rarer texts are dropped from the "
                         "sets (reported).", rich_help_panel=_P)] = 1,
    vocab: Annotated[Optional[Path], typer.Option("--vocab", help="Closed class list (table with a label "
                     "column, or one class per line); every other text is off-vocabulary.",
                     rich_help_panel=_P)] = None,
    clean: Annotated[Optional[Path], typer.Option("--clean", help="Known labels id,label; they override "
                     "candidates and give the coverage and delay-prior estimates.", rich_help_panel=_C)] = None,
    add_clean_labels: Annotated[bool, typer.Option("--add-clean-labels", help="Add clean labels outside "
                                "the vocabulary as classes (warning) instead of failing.",
                                rich_help_panel=_C)] = False,
    weights: Annotated[str, typer.Option("--weights", help="uniform or delay-prior (per-candidate weights "
                       "from the smoothed position histogram of the clean items).",
                       rich_help_panel=_C)] = "uniform",
    prior_alpha: Annotated[float, typer.Option("--prior-alpha", min=0.0, help="Add-alpha smoothing of the "
                           "position histogram (>0 keeps every candidate's weight above 0).",
                           rich_help_panel=_C)] = 1.0,
    tags: Annotated[Optional[Path], typer.Option("--tags", help="Weak tags id,labels (';'-joined, empty = "
                    "negative clip); makes a multi-label store.", rich_help_panel=_T)] = None,
    strong: Annotated[Optional[Path], typer.Option("--strong", help="Strong events id,onset,offset,label.",
                      rich_help_panel=_T)] = None,
    durations: Annotated[Optional[Path], typer.Option("--durations", help="Feature store (.h5) or table "
                         "id,duration to check that strong events lie inside their clips.",
                         rich_help_panel=_T)] = None,
    unlabeled: Annotated[Optional[Path], typer.Option("--unlabeled", help="Items with no labels: id[,path].")] = None,
    simulate_from: Annotated[Optional[Path], typer.Option("--simulate-from", help="Fully labelled id,label "
                             "file to draw simulated candidate sets from.", rich_help_panel=_S)] = None,
    flip_q: Annotated[Optional[float], typer.Option("--flip-q", help="Uniform flipping probability q.",
                      rich_help_panel=_S)] = None,
    set_size: Annotated[Optional[int], typer.Option("--set-size", help="Fixed set size k.",
                        rich_help_panel=_S)] = None,
    missing_share: Annotated[float, typer.Option("--missing-share", help="Share of sets without the truth.",
                             rich_help_panel=_S)] = 0.0,
    confusions: Annotated[Optional[Path], typer.Option("--confusions", help="C x C confusion matrix (.npy "
                          "or CSV, rows = true class) for instance-dependent sets.", rich_help_panel=_S)] = None,
    clean_share: Annotated[float, typer.Option("--clean-share", help="Share of simulated items kept clean.",
                           rich_help_panel=_S)] = 0.0,
    seed: Seed = 0,
    json_out: JsonOut = None,
    overwrite: Overwrite = False,
):
    """Build a label store from chat alignment, clean labels, weak tags or simulation."""
    from pllcli.errors import UsageError
    from pllcli.io import provenance, write_json
    from pllcli.labels import build as B
    from pllcli.labels.store import write_label_store
    from pllcli.labels.text import parse_duration

    sources = [n for n, v in (("--voice/--chat", voice or chat), ("--tags/--strong", tags or strong),
                              ("--simulate-from", simulate_from)) if v]
    clean_only = not sources and clean is not None
    if len(sources) != 1 and not clean_only:
        raise UsageError("give exactly one label source: --voice and --chat, --tags/--strong, --simulate-from, "
                         "or --clean alone" + (f" (got {', '.join(sources)})" if sources else ""))
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    vocab_list = B.read_vocab(str(vocab)) if vocab else None
    inputs = {"voice": voice, "chat": chat, "clean": clean, "tags": tags, "strong": strong,
              "durations": durations, "unlabeled": unlabeled, "simulate_from": simulate_from,
              "confusions": confusions, "vocab": vocab}
    if clean_only:
        if weights != "uniform":
            raise UsageError("--weights applies to chat alignment, not to --clean alone")
        built = B.build_from_clean(str(clean), str(unlabeled) if unlabeled else None, vocab_list)
        params = {}
    elif voice or chat:
        if not (voice and chat):
            raise UsageError("chat alignment needs both --voice and --chat")
        if window is not None and next_k is not None:
            raise UsageError("give only one of --next and --window")
        opts = B.ChatOptions(
            next_k=None if window is not None else (next_k or 10),
            window=parse_duration(window) if window is not None else None,
            same_author=same_author,
            exclude_authors=[a for s in (exclude_authors or []) for a in s.split(",")],
            numbers=numbers, min_count=min_count, vocab=vocab_list, weights=weights,
            prior_alpha=prior_alpha, add_clean_labels=add_clean_labels)
        if weights == "delay-prior" and prior_alpha <= 0:
            raise UsageError("--weights delay-prior needs --prior-alpha > 0 so that no candidate gets weight 0")
        built = B.build_from_chat(str(voice), str(chat), opts, clean_path=str(clean) if clean else None,
                                  unlabeled_path=str(unlabeled) if unlabeled else None)
        params = {k: (v if not isinstance(v, (list, tuple)) or k != "vocab" else len(v))
                  for k, v in vars(opts).items()}
    elif tags or strong:
        if clean or weights != "uniform":
            raise UsageError("--clean/--weights apply to chat alignment, not to --tags")
        durs = B.read_durations(str(durations)) if durations else None
        built = B.build_from_tags(str(tags) if tags else None, str(strong) if strong else None, durs,
                                  str(unlabeled) if unlabeled else None, vocab_list,
                                  durations_name=str(durations))
        params = {"durations": str(durations) if durations else None}
    else:
        if clean:
            raise UsageError("--clean does not apply to --simulate-from (use --clean-share)")
        built = B.simulate(str(simulate_from), q=flip_q, k=set_size, missing=missing_share,
                           confusions=str(confusions) if confusions else None, clean_share=clean_share,
                           seed=seed, vocab=vocab_list, unlabeled_path=str(unlabeled) if unlabeled else None)
        params = {"flip_q": flip_q, "set_size": set_size, "missing_share": missing_share,
                  "clean_share": clean_share, "seed": seed}
    prov = provenance(inputs={k: v for k, v in inputs.items() if v is not None}, params=params)
    prov["stats"] = built.stats
    write_label_store(out, built.data, prov)
    stats = dict(built.stats, output=str(out))
    _print_stats(stats)
    write_json(stats, json_out)


def _print_stats(stats: dict) -> None:
    from pllcli.cli._state import settings
    if settings.verbosity < 0:
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title="build-candidates", show_header=True)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in stats.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, list) and v and isinstance(v[0], float):
            v = " ".join(f"{x:.3f}" for x in v)
        elif isinstance(v, list):
            v = " ".join(map(str, v)) if v else "-"
        t.add_row(k, str(v))
    Console(file=sys.stderr).print(t)


def register(app: typer.Typer) -> None:
    app.command(name="build-candidates")(build_candidates)
