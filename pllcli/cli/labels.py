"""`pllcli build-candidates`: raw label sources -> label store (issue 3)."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from pllcli.cli._options import (JsonOut, Overwrite, Seed, duration_option, file_option, output_option,
                                 output_or_positional, positional_output, valued_option)

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
    out_pos: Annotated[Optional[Path], positional_output("OUT", "the label store to write")] = None,
    output: Annotated[Optional[Path], output_option("PATH", "Label store to write (.h5); required.")] = None,
    voice: Annotated[Optional[Path], file_option("--voice", "Voice messages: id,time[,author].", _P)] = None,
    chat: Annotated[Optional[Path], file_option("--chat", "Chat log: time,author,text.", _P)] = None,
    next_k: Annotated[Optional[int], valued_option("--next", "K", "Candidates = the next K in-vocabulary "
                      "messages at or after the voice time (default 10 unless --window).", _P)] = None,
    window: Annotated[Optional[str], duration_option("--window", "Candidates = all messages within DURATION "
                      "after the voice time (30s, 1.5m, 500ms).", _P)] = None,
    same_author: Annotated[bool, typer.Option("--same-author", help="Only chat messages by the voice "
                           "message's author (voice.csv needs an author column).", rich_help_panel=_P)] = False,
    exclude_authors: Annotated[Optional[List[str]], valued_option("--exclude-authors", "A,B", "Ignore chat "
                               "messages by these authors (comma-separated, repeatable).", _P)] = None,
    numbers: Annotated[Numbers, typer.Option("--numbers", help="Number equivalence: words ('4 7' -> "
                       "'four seven'), digits ('four seven' -> '4 7') or none.", rich_help_panel=_P)] = "words",
    min_count: Annotated[int, valued_option("--min-count", "N", "A normalised text is a class only if it occurs "
        "at least this often in the chat; rarer texts are dropped from the sets (reported).", _P, min=1)] = 1,
    vocab: Annotated[Optional[Path], file_option("--vocab", "Closed class list (table with a label column, or one "
                                                 "class per line); every other text is off-vocabulary.", _P)] = None,
    clean: Annotated[Optional[Path], file_option("--clean", "Known labels id,label; they override candidates and "
                                                 "give the coverage and delay-prior estimates.", _C)] = None,
    add_clean_labels: Annotated[bool, typer.Option("--add-clean-labels", help="Add clean labels outside "
                                "the vocabulary as classes (warning) instead of failing.",
                                rich_help_panel=_C)] = False,
    weights: Annotated[Weights, typer.Option("--weights", help="uniform or delay-prior (per-candidate weights "
                       "from the smoothed position histogram of the clean items).",
                       rich_help_panel=_C)] = "uniform",
    prior_alpha: Annotated[float, valued_option("--prior-alpha", "ALPHA", "Add-alpha smoothing of the position "
                           "histogram (>0 keeps every candidate's weight above 0).", _C, min=0.0)] = 1.0,
    tags: Annotated[Optional[Path], file_option("--tags", "Weak tags id,labels (';'-joined, empty = negative "
                                                "clip); makes a multi-label store.", _T)] = None,
    strong: Annotated[Optional[Path], file_option("--strong", "Strong events id,onset,offset,label.", _T)] = None,
    durations: Annotated[Optional[Path], file_option("--durations", "Feature store (.h5) or table id,duration to "
                                                     "check that strong events lie inside their clips.", _T)] = None,
    unlabeled: Annotated[Optional[Path], file_option("--unlabeled", "Items with no labels: id[,path].")] = None,
    simulate_from: Annotated[Optional[Path], file_option("--simulate-from", "Fully labelled id,label file to "
                                                         "draw simulated candidate sets from.", _S)] = None,
    flip_q: Annotated[Optional[float], valued_option("--flip-q", "Q", "Uniform flipping probability q.", _S)] = None,
    set_size: Annotated[Optional[int], valued_option("--set-size", "K", "Fixed set size k.", _S)] = None,
    missing_share: Annotated[float, valued_option("--missing-share", "SHARE", "Share of sets without the truth.",
                                                  _S)] = 0.0,
    confusions: Annotated[Optional[Path], file_option("--confusions", "C x C confusion matrix (.npy or CSV, rows = "
                                                      "true class) for instance-dependent sets.", _S)] = None,
    clean_share: Annotated[float, valued_option("--clean-share", "SHARE", "Share of simulated items kept clean.",
                                                _S)] = 0.0,
    seed: Seed = 0,
    json_out: JsonOut = None,
    overwrite: Overwrite = False,
):
    """Build a label store from chat alignment, clean labels, weak tags or simulation."""
    from pllcli.errors import UsageError
    from pllcli.io import check_output, check_report_output
    from pllcli.labels import build as B

    numbers, weights = Numbers(numbers).value, Weights(weights).value
    source = _label_source(voice, chat, tags, strong, simulate_from, clean)
    out = output_or_positional(output, out_pos, "build-candidates")
    inputs = {"voice": voice, "chat": chat, "clean": clean, "tags": tags, "strong": strong,
              "durations": durations, "unlabeled": unlabeled, "simulate_from": simulate_from,
              "confusions": confusions, "vocab": vocab}
    check_output(out, (".h5", ".hdf5"), command="build-candidates", overwrite=overwrite, inputs=inputs.values())
    check_report_output(json_out, command="build-candidates", overwrite=overwrite,
                        inputs=(out, voice, chat, clean, tags, strong, durations, unlabeled, simulate_from))
    vocab_list = B.read_vocab(str(vocab)) if vocab else None
    unl = str(unlabeled) if unlabeled else None
    if source == "clean":
        if weights != "uniform":
            raise UsageError("--weights applies to chat alignment, not to --clean alone")
        built, params = B.build_from_clean(str(clean), unl, vocab_list), {}
    elif source == "chat":
        built, params = _from_chat(voice, chat, clean, unl, _chat_options(
            voice, chat, next_k, window, same_author, exclude_authors, numbers, min_count, vocab_list, weights,
            prior_alpha, add_clean_labels))
    elif source == "tags":
        if clean or weights != "uniform":
            raise UsageError("--clean/--weights apply to chat alignment, not to --tags")
        built, params = _from_tags(tags, strong, durations, unl, vocab_list)
    else:
        if clean:
            raise UsageError("--clean does not apply to --simulate-from (use --clean-share)")
        built, params = _from_simulation(simulate_from, flip_q, set_size, missing_share, confusions, clean_share,
                                         seed, vocab_list, unl)
    _write_store(out, built, inputs, params, json_out)


def _label_source(voice, chat, tags, strong, simulate_from, clean) -> str:
    """The one label source: 'chat', 'tags', 'simulate' or 'clean' (--clean alone); UsageError otherwise."""
    from pllcli.errors import UsageError
    sources = [n for n, v in (("--voice/--chat", voice or chat), ("--tags/--strong", tags or strong),
                              ("--simulate-from", simulate_from)) if v]
    if not sources and clean is not None:
        return "clean"
    if len(sources) != 1:
        raise UsageError("give exactly one label source: --voice and --chat, --tags/--strong, --simulate-from, "
                         "or --clean alone" + (f" (got {', '.join(sources)})" if sources else ""))
    return {"--voice/--chat": "chat", "--tags/--strong": "tags", "--simulate-from": "simulate"}[sources[0]]


def _chat_options(voice, chat, next_k, window, same_author, exclude_authors, numbers, min_count, vocab_list,
                  weights, prior_alpha, add_clean_labels):
    """The checked ChatOptions of a chat alignment (--next defaults to 10 unless --window)."""
    from pllcli.errors import UsageError
    from pllcli.labels.build import ChatOptions
    from pllcli.labels.text import parse_duration
    if not (voice and chat):
        raise UsageError("chat alignment needs both --voice and --chat")
    if window is not None and next_k is not None:
        raise UsageError("give only one of --next and --window")
    opts = ChatOptions(
        next_k=None if window is not None else (next_k or 10),
        window=parse_duration(window) if window is not None else None,
        same_author=same_author,
        exclude_authors=[a for s in (exclude_authors or []) for a in s.split(",")],
        numbers=numbers, min_count=min_count, vocab=vocab_list, weights=weights,
        prior_alpha=prior_alpha, add_clean_labels=add_clean_labels)
    if weights == "delay-prior" and prior_alpha <= 0:
        raise UsageError("--weights delay-prior needs --prior-alpha > 0 so that no candidate gets weight 0")
    return opts


def _from_chat(voice: Path, chat: Path, clean: Optional[Path], unlabeled: Optional[str], opts):
    """(Built, provenance params) of a chat alignment; params show --vocab as its size."""
    from pllcli.labels.build import build_from_chat
    built = build_from_chat(str(voice), str(chat), opts, clean_path=str(clean) if clean else None,
                            unlabeled_path=unlabeled)
    params = {k: (v if not isinstance(v, (list, tuple)) or k != "vocab" else len(v))
              for k, v in vars(opts).items()}
    return built, params


def _from_tags(tags: Optional[Path], strong: Optional[Path], durations: Optional[Path],
               unlabeled: Optional[str], vocab_list):
    """(Built, provenance params) from weak tags and/or strong events."""
    from pllcli.labels import build as B
    durs = B.read_durations(str(durations)) if durations else None
    built = B.build_from_tags(str(tags) if tags else None, str(strong) if strong else None, durs,
                              unlabeled, vocab_list, durations_name=str(durations))
    return built, {"durations": str(durations) if durations else None}


def _from_simulation(simulate_from: Path, flip_q, set_size, missing_share, confusions: Optional[Path],
                     clean_share, seed, vocab_list, unlabeled: Optional[str]):
    """(Built, provenance params) of candidate sets simulated from fully labelled items."""
    from pllcli.labels.build import simulate
    built = simulate(str(simulate_from), q=flip_q, k=set_size, missing=missing_share,
                     confusions=str(confusions) if confusions else None, clean_share=clean_share,
                     seed=seed, vocab=vocab_list, unlabeled_path=unlabeled)
    return built, {"flip_q": flip_q, "set_size": set_size, "missing_share": missing_share,
                   "clean_share": clean_share, "seed": seed}


def _write_store(out: Path, built, inputs: dict, params: dict, json_out) -> None:
    """Write the label store (stats in its provenance), show the stats table, --json, and what was written."""
    from pllcli.io import provenance, write_json
    from pllcli.labels.store import write_label_store
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
