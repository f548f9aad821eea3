"""Raw label sources -> LabelData: chat alignment, clean labels, tags, strong events,
unlabeled items and simulated candidate sets (`pllcli build-candidates`)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pllcli.errors import InputError, UsageError
from pllcli.io import Table
from pllcli.labels.store import LabelData
from pllcli.labels.text import natural_key, normalize_text, parse_time
from pllcli.labels.weak_tags import split_tags

log = logging.getLogger(__name__)


@dataclass
class ChatOptions:
    next_k: int | None = 10
    window: float | None = None
    same_author: bool = False
    exclude_authors: Sequence[str] = ()
    numbers: str = "words"
    min_count: int = 1
    vocab: Sequence[str] | None = None  # closed vocabulary (raw texts; normalised here)
    weights: str = "uniform"  # or "delay-prior"
    prior_alpha: float = 1.0  # add-alpha smoothing of the position histogram
    add_clean_labels: bool = False


@dataclass
class Built:
    data: LabelData
    stats: dict[str, Any] = field(default_factory=dict)
    # chat alignment: per voice row, each candidate's position among the kept messages
    # (before clean labels override the set); rows line up with data.ids[:len(positions)]
    sets: list[list[int]] | None = None
    positions: list[list[int]] | None = None


# ---------------------------------------------------------------- small readers

def _read_ids(table: Table, seen: dict[str, tuple[str, int]] | None = None, col: str = "id"):
    """Yield (line, row) checking that ids are non-empty and unique (also across files via `seen`)."""
    return table.unique_rows(col, seen)


def read_unlabeled_ids(path: str, known: Sequence[str], known_name: str) -> list[str]:
    """Ids listed in an unlabeled table (id[,path]), unique and disjoint from `known`."""
    seen = {i: (known_name, 0) for i in known}
    return [row["id"] for _, row in _read_ids(Table(path, required=["id"]), seen)]


def read_vocab(path: str) -> list[str]:
    """A class list: a table with a `label` (or `class`) column, or plain text, one per line."""
    import os
    if not os.path.isfile(path):
        raise InputError("no such file", path)
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", "replace").strip()
    cols = [c.strip() for c in first.replace("\t", ",").split(",")]
    if "label" in cols or "class" in cols:
        t = Table(path)
        col = "label" if "label" in t.columns else "class"
        out = [row[col] for _, row in t if row[col]]
    else:
        try:
            text = open(path, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise InputError(f"not valid UTF-8 (byte {e.start})", path) from None
        out = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not out:
        raise InputError("empty vocabulary: no class names (give one per line, or a table with a "
                         "label or class column)", path, field="vocab")
    return out


def read_clean(path: str) -> list[tuple[int, str, str]]:
    t = Table(path, required=["id", "label"])
    out = []
    for ln, row in _read_ids(t):
        if not row["label"]:
            raise InputError("empty label", t.name, line=ln, field="label")
        out.append((ln, row["id"], row["label"]))
    return out


# ---------------------------------------------------------------- chat alignment

@dataclass
class _Voice:
    """Voice messages in file order: ids, times (s) and authors ('' without an author column)."""
    name: str
    ids: list[str]
    time: list[float]
    author: list[str]


@dataclass
class _Chat:
    """The chat log without excluded authors, sorted by time (stable); `norm` = normalised texts."""
    time: np.ndarray
    author: list[str]
    norm: list[str]
    rows: int
    excluded: int


def _read_voice(path: str, need_author: bool) -> _Voice:
    t = Table(path, required=["id", "time"] + (["author"] if need_author else []))
    v = _Voice(t.name, [], [], [])
    for ln, row in _read_ids(t, {}):
        v.ids.append(row["id"])
        v.time.append(parse_time(row["time"], t.name, ln))
        v.author.append(row.get("author", ""))
    return v


def _read_chat(path: str, exclude_authors: Sequence[str], norm) -> _Chat:
    ct = Table(path, required=["time", "author", "text"])
    excluded = {a.strip() for a in exclude_authors if a.strip()}
    c_time, c_author, c_text = [], [], []
    n_rows = n_excluded = 0
    for ln, row in ct:
        n_rows += 1
        t = parse_time(row["time"], ct.name, ln)
        if row["author"] in excluded:
            n_excluded += 1
            continue
        c_time.append(t)
        c_author.append(row["author"])
        c_text.append(row["text"])
    if n_rows == 0:
        raise InputError("empty chat log (no messages after the header)", ct.name, line=2)
    order = np.argsort(np.asarray(c_time), kind="stable")
    return _Chat(time=np.asarray(c_time, np.float64)[order], author=[c_author[i] for i in order],
                 norm=[norm(c_text[i]) for i in order], rows=n_rows, excluded=n_excluded)


def _chat_vocabulary(texts: list[str], opts: ChatOptions, norm) -> tuple[list[str], str]:
    """(classes, description): the closed --vocab normalised, else texts seen >= min_count times."""
    if opts.vocab is None:
        counts = Counter(s for s in texts if s)
        classes = sorted((s for s, n in counts.items() if n >= opts.min_count), key=natural_key)
        return classes, f"min-count {opts.min_count}"
    classes = []
    for s in opts.vocab:
        s = norm(s)
        if s and s not in classes:
            classes.append(s)
    if not classes:
        raise InputError("no vocabulary entry is left after normalisation (--vocab)", field="vocab")
    return classes, "closed"


def _check_clean_labels(clean_rows, classes: list[str], cindex: dict[str, int], vocab_mode: str,
                        opts: ChatOptions, norm, clean_path: str | None) -> list[str]:
    """Every clean label must be in the vocabulary; with --add-clean-labels a missing one is
    appended to `classes`/`cindex` (in place). Returns the added classes."""
    added = []
    for ln, i, lab in clean_rows:
        s = norm(lab)
        if s in cindex:
            continue
        if not (opts.add_clean_labels and s):
            raise InputError(f"clean label {lab!r} (normalised {s!r}) is not in the vocabulary "
                             f"({vocab_mode}, {len(classes)} classes); pass --add-clean-labels "
                             "to add it", clean_path, line=ln, field="label")
        cindex[s] = len(classes)
        classes.append(s)
        added.append(s)
        log.warning("%s:%d: clean label %r is not in the vocabulary; added as a class",
                    clean_path, ln, lab)
    return added


def _align(voice: _Voice, chat: _Chat, msg_class: np.ndarray, opts: ChatOptions):
    """Per voice message, the distinct classes among the next K in-vocabulary messages (or those
    within the window), and each one's position among them. Returns (sets, positions, merged)."""
    keep = msg_class >= 0  # K counts kept messages only
    k_time = chat.time[keep]
    k_class = msg_class[keep]
    k_author = np.asarray(chat.author, dtype=object)[keep]
    streams: dict[str, np.ndarray] = {}
    if opts.same_author:
        for a in set(voice.author):
            streams[a] = np.flatnonzero(k_author == a)
    all_idx = np.arange(len(k_time))
    sets: list[list[int]] = []
    positions: list[list[int]] = []
    merged = 0
    for t, a in zip(voice.time, voice.author):
        idx = streams[a] if opts.same_author else all_idx
        times = k_time[idx]
        lo = int(np.searchsorted(times, t, side="left"))
        if opts.next_k is not None:
            hi = min(len(idx), lo + opts.next_k)
        else:
            hi = int(np.searchsorted(times, t + opts.window, side="right"))
        row, pos, seen_c = [], [], set()
        for p, m in enumerate(idx[lo:hi]):
            c = int(k_class[m])
            if c in seen_c:
                merged += 1
                continue
            seen_c.add(c)
            row.append(c)
            pos.append(p)
        sets.append(row)
        positions.append(pos)
    return sets, positions, merged


def _place_clean(clean_rows, voice_ids: list[str], sets, positions, cindex, norm):
    """Clean class per item (-1 = none). A clean id without a voice message becomes a clean-only
    item (appended to ids, sets, positions in place). Counts, for voice items, how often the set
    holds the clean label and at which position. Returns (ids, clean, hist, n_clean_voice, covered)."""
    item_index = {i: r for r, i in enumerate(voice_ids)}
    ids = list(voice_ids)
    clean = [-1] * len(ids)
    hist: Counter = Counter()
    n_clean_voice = covered = 0
    for ln, i, lab in clean_rows:
        c = cindex[norm(lab)]
        r = item_index.get(i)
        if r is None:
            item_index[i] = len(ids)
            ids.append(i)
            clean.append(c)
            sets.append([])
            positions.append([])
            continue
        clean[r] = c
        n_clean_voice += 1
        if c in sets[r]:
            covered += 1
            hist[positions[r][sets[r].index(c)]] += 1
    return ids, clean, hist, n_clean_voice, covered


def _delay_prior(hist: Counter, positions, opts: ChatOptions) -> tuple[np.ndarray, np.ndarray]:
    """(histogram, prior) over candidate positions, add-alpha smoothed; length K (or, for a
    window, the furthest position seen)."""
    max_pos = (opts.next_k if opts.next_k is not None
               else max([p[-1] + 1 for p in positions if p] + [max(hist, default=-1) + 1, 1]))
    hist_arr = np.asarray([hist.get(j, 0) for j in range(max_pos)], np.int64)
    prior = (hist_arr + opts.prior_alpha) / (hist_arr.sum() + opts.prior_alpha * max_pos)
    return hist_arr, prior


def _candidate_weights(positions, prior: np.ndarray, opts: ChatOptions, n_clean_voice: int):
    """Per-item weights from the delay prior (normalised per set), or None for uniform."""
    if opts.weights == "uniform":
        return None
    if opts.weights != "delay-prior":
        raise UsageError(f"--weights must be uniform or delay-prior, got {opts.weights!r}")
    if n_clean_voice == 0:
        raise UsageError("--weights delay-prior needs --clean with items that have voice messages")
    weights = []
    for pos in positions:
        w = np.asarray([prior[min(p, len(prior) - 1)] for p in pos], np.float64)
        weights.append((w / w.sum()).tolist() if len(w) else [])
    return weights


def build_from_chat(voice_path: str, chat_path: str, opts: ChatOptions, clean_path: str | None = None,
                    unlabeled_path: str | None = None) -> Built:
    """Each voice message's candidates: the distinct in-vocabulary chat texts that follow it
    (next K, or within a window); clean labels override the set; unlabeled ids are appended."""
    if (opts.next_k is None) == (opts.window is None):
        raise UsageError("give exactly one of --next K and --window DURATION")
    if opts.next_k is not None and opts.next_k < 1:
        raise UsageError("--next must be >= 1")
    norm = lambda s: normalize_text(s, opts.numbers)  # noqa: E731
    voice = _read_voice(voice_path, opts.same_author)
    chat = _read_chat(chat_path, opts.exclude_authors, norm)
    classes, vocab_mode = _chat_vocabulary(chat.norm, opts, norm)
    cindex = {s: i for i, s in enumerate(classes)}
    # clean labels are validated against the vocabulary before anything is dropped
    clean_rows = read_clean(clean_path) if clean_path else []
    added = _check_clean_labels(clean_rows, classes, cindex, vocab_mode, opts, norm, clean_path)

    msg_class = np.asarray([cindex.get(s, -1) for s in chat.norm], np.int64)
    off = Counter(s for s, c in zip(chat.norm, msg_class) if c < 0 and s)
    sets, positions, merged = _align(voice, chat, msg_class, opts)
    ids, clean, hist, n_clean_voice, covered = _place_clean(clean_rows, voice.ids, sets, positions,
                                                            cindex, norm)
    hist_arr, prior = _delay_prior(hist, positions, opts)
    weights = _candidate_weights(positions, prior, opts, n_clean_voice)

    n_voice = len(voice.ids)
    empty_sets = sum(1 for r in range(n_voice) if not sets[r])
    raw_sets = [list(r) for r in sets]
    for r, c in enumerate(clean):  # override: a clean item's set is {clean}
        if c >= 0:
            sets[r] = [c]
            if weights is not None:
                weights[r] = [1.0]
    unl = read_unlabeled_ids(unlabeled_path, ids, voice.name) if unlabeled_path else []
    ids += unl
    clean += [-1] * len(unl)
    sets += [[] for _ in unl]
    if weights is not None:
        weights += [[] for _ in unl]
    # uniform weights: no weights dataset (candidate_matrix gives 1 for members)
    data = LabelData.new(ids, classes, task="single", candidates=sets, weights=weights, clean=clean)
    sizes = np.asarray([len(s) for s in sets[:n_voice]], np.float64)
    stats = {
        "source": "chat",
        "items": len(ids),
        "classes": len(classes),
        "voice_messages": n_voice,
        "chat_messages": chat.rows,
        "excluded_author_messages": chat.excluded,
        "vocabulary": vocab_mode,
        "empty_after_normalisation": sum(1 for s in chat.norm if not s),
        "off_vocabulary_messages": int(sum(off.values())),
        "off_vocabulary_texts": len(off),
        "off_vocabulary_examples": [s for s, _ in off.most_common(5)],
        "clean_labels_added": added,
        "repeats_merged": merged,
        "mean_set_size": float(sizes[sizes > 0].mean()) if (sizes > 0).any() else 0.0,
        "q_eff": _q_eff(sizes, len(classes)),
        "empty_set_share": empty_sets / n_voice if n_voice else 0.0,
        "clean": int(sum(c >= 0 for c in clean)),
        "clean_with_voice": n_clean_voice,
        "coverage_estimate": covered / n_clean_voice if n_clean_voice else None,
        "position_histogram": hist_arr.tolist(),
        "delay_prior": prior.tolist(),
        "weights": opts.weights,
        "unlabeled": int(data.unlabeled.sum()),
        "unlabeled_listed": len(unl),
    }
    return Built(data, stats, sets=raw_sets, positions=positions)


def _q_eff(sizes: np.ndarray, num_classes: int) -> float | None:
    """Mean share of the wrong classes inside the non-empty sets: (|S| - 1) / (C - 1)."""
    s = sizes[sizes > 0]
    if not len(s) or num_classes < 2:
        return None
    return float(((s - 1) / (num_classes - 1)).mean())


# ---------------------------------------------------------------- weak tags and strong events

def read_durations(path: str) -> dict[str, float]:
    """Clip durations from a feature store (.h5: `ids`, `duration`) or a table (id, duration)."""
    if str(path).endswith((".h5", ".hdf5")):
        import h5py
        try:
            with h5py.File(path, "r") as f:
                if "ids" not in f or "duration" not in f:
                    raise InputError("feature store lacks 'ids' or 'duration'", path, field="duration")
                return dict(zip(f["ids"].asstr()[()].tolist(), f["duration"][()].astype(float).tolist()))
        except OSError:
            raise InputError("not an HDF5 file", path) from None
    t = Table(path, required=["id", "duration"])
    out = {}
    for ln, row in t:
        try:
            out[row["id"]] = float(row["duration"])
        except ValueError:
            raise InputError(f"duration {row['duration']!r} is not a number", t.name, line=ln,
                             field="duration") from None
    return out


def build_from_tags(tags_path: str | None, strong_path: str | None = None, durations: dict | None = None,
                    unlabeled_path: str | None = None, vocab: Sequence[str] | None = None,
                    durations_name: str = "durations", tolerance: float = 0.05) -> Built:
    ids: list[str] = []
    rows: list[list[str] | None] = []
    index: dict[str, int] = {}
    seen: dict[str, tuple[str, int]] = {}
    if tags_path:
        tt = Table(tags_path, required=["id", "labels"])
        for ln, row in _read_ids(tt, seen):
            labs = split_tags(row["labels"])
            if len(set(labs)) != len(labs):
                raise InputError(f"repeated tag in {row['labels']!r}", tt.name, line=ln, field="labels")
            index[row["id"]] = len(ids)
            ids.append(row["id"])
            rows.append(labs)
    events = []
    if strong_path:
        st = Table(strong_path, required=["id", "onset", "offset", "label"])
        for ln, row in st:
            try:
                on, off = float(row["onset"]), float(row["offset"])
            except ValueError:
                raise InputError("onset/offset must be numbers", st.name, line=ln, field="onset") from None
            if not row["id"] or not row["label"]:
                raise InputError("empty id or label", st.name, line=ln)
            if not (0 <= on < off):
                raise InputError(f"need 0 <= onset < offset, got {on} and {off}", st.name, line=ln, field="offset")
            if durations is not None:
                if row["id"] not in durations:
                    raise InputError(f"id {row['id']!r} has no duration in {durations_name}", st.name, line=ln,
                                     field="id")
                if off > durations[row["id"]] + tolerance:
                    raise InputError(f"event ends at {off} s, after the clip ({durations[row['id']]:.3f} s)",
                                     st.name, line=ln, field="offset")
            events.append((row["id"], on, off, row["label"]))
            if row["id"] not in index:
                index[row["id"]] = len(ids)
                ids.append(row["id"])
                rows.append(None)
    if vocab is not None:
        classes = list(dict.fromkeys(v.strip() for v in vocab if v.strip()))
        known = set(classes)
        for r in rows:
            for lab in r or []:
                if lab not in known:
                    raise InputError(f"tag {lab!r} is not in the vocabulary", tags_path, field="labels")
        for e in events:
            if e[3] not in known:
                raise InputError(f"label {e[3]!r} is not in the vocabulary", strong_path, field="label")
    else:
        classes = sorted({lab for r in rows for lab in (r or [])} | {e[3] for e in events}, key=natural_key)
    ci = {c: i for i, c in enumerate(classes)}
    n_tagged = len(ids)
    n_unl = 0
    if unlabeled_path:
        for uid in read_unlabeled_ids(unlabeled_path, ids, "labels"):
            ids.append(uid)
            rows.append(None)
            n_unl += 1
    tags = [None if r is None else [ci[x] for x in r] for r in rows]
    strong = sorted(((index[e[0]], e[1], e[2], ci[e[3]]) for e in events), key=lambda e: (e[0], e[1]))
    data = LabelData.new(ids, classes, task="multi", tags=tags, strong=strong)
    tagged = [r for r in rows if r is not None]
    stats = {
        "source": "tags",
        "items": len(ids),
        "classes": len(classes),
        "tagged": len(tagged),
        "negative_clips": sum(1 for r in tagged if not r),
        "mean_tags": float(np.mean([len(r) for r in tagged])) if tagged else 0.0,
        "strong_events": len(events),
        "strong_items": len({e[0] for e in events}),
        "durations_checked": durations is not None,
        "unlabeled": int(data.unlabeled.sum()),
        "unlabeled_listed": n_unl,
    }
    return Built(data, stats)


# ---------------------------------------------------------------- simulation

def read_confusions(path: str, num_classes: int) -> np.ndarray:
    if str(path).endswith(".npy"):
        try:
            m = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"cannot read .npy ({e})", path) from None
    else:
        try:
            m = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError as e:
            raise InputError(f"not a numeric CSV matrix ({e})", path) from None
    if m.shape != (num_classes, num_classes):
        raise InputError(f"confusion matrix is {m.shape}, need ({num_classes}, {num_classes}) "
                         "(rows = true class, in class order)", path)
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise InputError("confusion matrix must be finite and non-negative", path)
    return m.astype(np.float64)


def simulate(labels_path: str, *, q: float | None = None, k: int | None = None, missing: float = 0.0,
             confusions: str | None = None, clean_share: float = 0.0, seed: int = 0,
             vocab: Sequence[str] | None = None, unlabeled_path: str | None = None) -> Built:
    """Candidate sets from a fully labelled file (id, label).

    - uniform flipping (`q`): every wrong class joins the set independently with probability q;
    - fixed size (`k`): the truth plus k-1 wrong classes drawn uniformly (or by `confusions`);
    - `confusions` (C x C, rows = true class): instance-dependent; with `q`, wrong class j joins with
      probability q * conf[t, j] / max_j' conf[t, j'] ; with `k`, drawn without replacement in
      proportion to conf[t, j];
    - `missing`: share of sets whose truth is replaced by one more wrong class (noisy PLL);
    - `clean_share`: share of items whose label is kept as clean;
    - `unlabeled_path`: further items (id[,path]) added with no labels.
    """
    if (q is None) == (k is None):
        raise UsageError("simulation needs exactly one of --flip-q and --set-size")
    if q is not None and not 0 <= q <= 1:
        raise UsageError("--flip-q must be in [0, 1]")
    for name, v in (("--missing-share", missing), ("--clean-share", clean_share)):
        if not 0 <= v <= 1:
            raise UsageError(f"{name} must be in [0, 1]")
    t = Table(labels_path, required=["id", "label"])
    ids, labs = [], []
    for ln, row in _read_ids(t):
        if not row["label"]:
            raise InputError("empty label", t.name, line=ln, field="label")
        ids.append(row["id"])
        labs.append((ln, row["label"]))
    if vocab is not None:
        classes = list(dict.fromkeys(vocab))
    else:
        classes = sorted({lab for _, lab in labs}, key=natural_key)
    ci = {c: i for i, c in enumerate(classes)}
    y = []
    for ln, lab in labs:
        if lab not in ci:
            raise InputError(f"label {lab!r} is not in the vocabulary", t.name, line=ln, field="label")
        y.append(ci[lab])
    C = len(classes)
    if k is not None and not 1 <= k <= C:
        raise UsageError(f"--set-size must be in 1..{C} (the number of classes)")
    conf = read_confusions(confusions, C) if confusions else None
    rng = np.random.default_rng(seed)
    sets, covered = [], 0
    for t_ in y:
        others = np.delete(np.arange(C), t_)
        if conf is not None:
            p = conf[t_, others]
            p = p / p.sum() if p.sum() > 0 else np.full(len(others), 1 / max(1, len(others)))
        else:
            p = np.full(len(others), 1 / max(1, len(others)))
        drop_truth = rng.random() < missing
        if k is not None:
            n_wrong = k - 1 + (1 if drop_truth else 0)
            n_wrong = min(n_wrong, len(others))
            nz = int((p > 0).sum())
            if n_wrong > nz:  # not enough confusable classes: fill uniformly
                p = (p + 1e-12) / (p + 1e-12).sum()
            # one class: nothing to draw (numpy refuses an empty p)
            wrong = rng.choice(others, size=n_wrong, replace=False, p=p).tolist() if len(others) else []
        else:
            pj = q * (p / p.max() if conf is not None and p.max() > 0 else np.ones(len(others)))
            wrong = others[rng.random(len(others)) < pj].tolist()
            if drop_truth and len(wrong) < len(others):
                rest = np.setdiff1d(others, wrong)
                wrong.append(int(rng.choice(rest)))
        row = ([] if drop_truth else [t_]) + [int(w) for w in wrong]
        rng.shuffle(row)
        covered += (t_ in row)
        sets.append(sorted(row))
    n = len(ids)
    clean = [-1] * n
    if clean_share > 0:
        for r in rng.choice(n, size=int(round(clean_share * n)), replace=False):
            clean[r] = y[r]
            sets[r] = [y[r]]
    sizes = np.asarray([len(s) for s in sets], np.float64)
    if unlabeled_path:
        extra = read_unlabeled_ids(unlabeled_path, ids, t.name)
        ids, sets, clean = ids + extra, sets + [[] for _ in extra], clean + [-1] * len(extra)
    data = LabelData.new(ids, classes, task="single", candidates=sets, clean=clean)
    stats = {
        "source": "simulate",
        "items": len(ids), "classes": C,
        "mode": ("confusions-" if conf is not None else "uniform-") + ("q" if q is not None else "k"),
        "mean_set_size": float(sizes[sizes > 0].mean()) if (sizes > 0).any() else 0.0,
        "q_eff": _q_eff(sizes, C),
        "coverage": covered / n if n else None,
        "coverage_estimate": covered / n if n else None,
        "empty_set_share": float((sizes == 0).mean()) if n else 0.0,
        "clean": int(sum(c >= 0 for c in clean)),
        "seed": seed,
        "unlabeled": int(data.unlabeled.sum()),
    }
    return Built(data, stats)


def build_from_clean(clean_path: str, unlabeled_path: str | None = None,
                     vocab: Sequence[str] | None = None) -> Built:
    """A store of clean labels only (id,label), plus optional unlabeled items: the few-label case."""
    built = simulate(clean_path, k=1, clean_share=1.0, vocab=vocab, unlabeled_path=unlabeled_path)
    built.stats.update(source="clean", mode="clean")
    return built
