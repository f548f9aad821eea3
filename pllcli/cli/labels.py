"""`pllcli build-candidates`: raw label sources -> label store (issue 3)."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import JsonOut, Overwrite, Seed, output_or_positional

_P = "Chat alignment"
_C = "Clean labels and weights"
_T = "Weak tags"
_S = "Simulation"


class Numbers(str, Enum):
    words = "words"
    digits = "digits"
    none = "none"


class Weights(str, Enum):
    uniform = "uniform"
    delay_prior = "delay-prior"


def build_candidates(
    out_pos: Annotated[Optional[Path], typer.Argument(
        metavar="OUT", hidden=True, help="Deprecated: the label store to write; use -o/--output.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="PATH", help="Label store to write (.h5); required.")] = None,
    voice: Annotated[Optional[Path], typer.Option(
        "--voice", metavar="FILE", help="Voice messages: id,time[,author].", rich_help_panel=_P)] = None,
    chat: Annotated[Optional[Path], typer.Option(
        "--chat", metavar="FILE", help="Chat log: time,author,text.", rich_help_panel=_P)] = None,
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
    numbers: Annotated[Numbers, typer.Option("--numbers", help="Number equivalence: words ('4 7' -> "
                       "'four seven'), digits ('four seven' -> '4 7') or none.", rich_help_panel=_P)] = "words",
    min_count: Annotated[int, typer.Option(
        "--min-count", metavar="N", min=1, help="A normalised text is a class only if it occurs at least this "
        "often in the chat; rarer texts are dropped from the sets (reported).", rich_help_panel=_P)] = 1,
    vocab: Annotated[Optional[Path], typer.Option(
        "--vocab", metavar="FILE", help="Closed class list (table with a label column, or one class per line); "
        "every other text is off-vocabulary.", rich_help_panel=_P)] = None,
    clean: Annotated[Optional[Path], typer.Option(
        "--clean", metavar="FILE", help="Known labels id,label; they override candidates and give the coverage "
        "and delay-prior estimates.", rich_help_panel=_C)] = None,
    add_clean_labels: Annotated[bool, typer.Option("--add-clean-labels", help="Add clean labels outside "
                                "the vocabulary as classes (warning) instead of failing.",
                                rich_help_panel=_C)] = False,
    weights: Annotated[Weights, typer.Option("--weights", help="uniform or delay-prior (per-candidate weights "
                       "from the smoothed position histogram of the clean items).",
                       rich_help_panel=_C)] = "uniform",
    prior_alpha: Annotated[float, typer.Option(
        "--prior-alpha", metavar="ALPHA", min=0.0, help="Add-alpha smoothing of the position histogram (>0 keeps "
        "every candidate's weight above 0).", rich_help_panel=_C)] = 1.0,
    tags: Annotated[Optional[Path], typer.Option(
        "--tags", metavar="FILE", help="Weak tags id,labels (';'-joined, empty = negative clip); makes a "
        "multi-label store.", rich_help_panel=_T)] = None,
    strong: Annotated[Optional[Path], typer.Option(
        "--strong", metavar="FILE", help="Strong events id,onset,offset,label.", rich_help_panel=_T)] = None,
    durations: Annotated[Optional[Path], typer.Option(
        "--durations", metavar="FILE", help="Feature store (.h5) or table id,duration to check that strong "
        "events lie inside their clips.", rich_help_panel=_T)] = None,
    unlabeled: Annotated[Optional[Path], typer.Option(
        "--unlabeled", metavar="FILE", help="Items with no labels: id[,path].")] = None,
    simulate_from: Annotated[Optional[Path], typer.Option(
        "--simulate-from", metavar="FILE", help="Fully labelled id,label file to draw simulated candidate sets "
        "from.", rich_help_panel=_S)] = None,
    flip_q: Annotated[Optional[float], typer.Option(
        "--flip-q", metavar="Q", help="Uniform flipping probability q.", rich_help_panel=_S)] = None,
    set_size: Annotated[Optional[int], typer.Option(
        "--set-size", metavar="K", help="Fixed set size k.", rich_help_panel=_S)] = None,
    missing_share: Annotated[float, typer.Option(
        "--missing-share", metavar="SHARE", help="Share of sets without the truth.", rich_help_panel=_S)] = 0.0,
    confusions: Annotated[Optional[Path], typer.Option(
        "--confusions", metavar="FILE", help="C x C confusion matrix (.npy or CSV, rows = true class) for "
        "instance-dependent sets.", rich_help_panel=_S)] = None,
    clean_share: Annotated[float, typer.Option(
        "--clean-share", metavar="SHARE", help="Share of simulated items kept clean.", rich_help_panel=_S)] = 0.0,
    seed: Seed = 0,
    json_out: JsonOut = None,
    overwrite: Overwrite = False,
):
    """Build a label store from chat alignment, clean labels, weak tags or simulation."""
    from pllcli.errors import UsageError
    from pllcli.io import check_output, check_report_output, provenance, write_json
    from pllcli.labels import build as B
    from pllcli.labels.store import write_label_store
    from pllcli.labels.text import parse_duration

    numbers, weights = Numbers(numbers).value, Weights(weights).value
    sources = [n for n, v in (("--voice/--chat", voice or chat), ("--tags/--strong", tags or strong),
                              ("--simulate-from", simulate_from)) if v]
    clean_only = not sources and clean is not None
    if len(sources) != 1 and not clean_only:
        raise UsageError("give exactly one label source: --voice and --chat, --tags/--strong, --simulate-from, "
                         "or --clean alone" + (f" (got {', '.join(sources)})" if sources else ""))
    out = output_or_positional(output, out_pos, "build-candidates")
    check_output(out, (".h5", ".hdf5"), command="build-candidates", overwrite=overwrite,
                 inputs=(voice, chat, clean, tags, strong, durations, unlabeled, simulate_from, confusions, vocab))
    check_report_output(json_out, command="build-candidates", overwrite=overwrite,
                        inputs=(out, voice, chat, clean, tags, strong, durations, unlabeled, simulate_from))
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
    print(f"wrote {out} ({stats.get('items', len(built.data))} items, {stats.get('classes', '?')} classes)",
          file=sys.stderr if json_out == "-" else sys.stdout)


# figures of the table that need a word of explanation (printed under it)
_NOTES = {
    "q_eff": "mean share of the wrong classes inside a non-empty set, (|S| - 1) / (C - 1): "
             "0 = one class per set, 1 = every class",
    "clean_labels_added": "clean labels outside the vocabulary added as classes (--add-clean-labels)",
    "coverage_estimate": "share of the clean items with a voice message whose label is in their set",
    "off_vocabulary_examples": "the most frequent normalised texts that are not classes",
    "delay_prior": "candidate weight by position in the set (--weights delay-prior)",
}


def _cell(v) -> str:
    """One table cell: floats to 4 places, lists of texts quoted and comma-separated, nothing = 'none'."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        if not v:
            return "none"
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return " ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
        return ", ".join(f'"{x}"' for x in v)
    return str(v)


def _print_stats(stats: dict) -> None:
    from pllcli.cli._state import settings
    if settings.verbosity < 0:
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    notes = [k for k in _NOTES if k in stats]
    t = Table(title="build-candidates", show_header=True)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in stats.items():
        t.add_row(Text(k + (" *" if k in notes else "")), Text(_cell(v)))
    console = Console(file=sys.stderr)
    console.print(t)
    for k in notes:
        console.print(f"* {k}: {_NOTES[k]}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="build-candidates")(build_candidates)
