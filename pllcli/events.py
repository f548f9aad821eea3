"""Frame scores <-> sound events: decoding, rasterising, strong-label tables.

Time convention: frame t of a (T, C) score matrix covers [t * hop, (t + 1) * hop) seconds,
where hop = seconds per output frame (`frame_hop(duration, T)` for a model that keeps the
whole clip, or hop_length / sample_rate x the model's time downsampling). Frames that start
elsewhere (an encoder's frame k is centred half a receptive field after k hop) are first put on
this grid with `on_clip_timeline`.

Decoding (`decode_events`): optional median filter along time (per class), then a threshold
(one for all classes or one per class; with `low` given, hysteresis: a run must reach
`threshold` somewhere and extends while scores stay >= `low`), then runs separated by less
than `min_gap` seconds are merged and runs shorter than `min_duration` seconds dropped; last,
`extend` = (before, after) seconds widens each event (`extend_events`; `dilate` does the same to
frame scores). Widening pays under PSDS1's intersection criteria when the truth includes
silence a detector cannot hear (a detection may be 1 / 0.7 times the truth and still count).

Decoding parameters from the command line: `parse_thresholds` (one value, `CLASS=VALUE` pairs,
or a default plus pairs), `median_frames` (an integer = frames, a duration such as `450ms` or
`0.45` = seconds, rounded to an odd frame count per item). `tune_thresholds` picks, per class, the
candidate threshold with the best collar-based event F1 on clips with strong labels.

WHEN/WHO events (`when_segments`, `label_segments`, `events_at_peaks`): class-agnostic WHEN frame
probabilities (T,) give segments; each segment is named by the class scored highest inside it
(WHO scores of the segment (K, C), or frame evidence (T, C) averaged over it), optionally only
among the clip's tags; or one event per tag, the segment where that class's evidence peaks.

Clip-level models (e.g. a segment-label student): scores of `sliding_windows` chunks (K, C)
become frame scores (T, C) with `overlap_average`, then decode as above.

Event tables are TSV with the header `id onset offset label` (seconds, 3 decimals), the layout
of the weak benchmark's strong.tsv; `read_events_tsv` validates them (numbers, onset < offset,
inside the clip's duration, known labels/ids) and raises InputError naming the line.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from pllcli.errors import InputError, MissingExtraError, UsageError
from pllcli.io import Table, write_text_atomic


class Event(NamedTuple):
    onset: float
    offset: float
    label: str


def frame_hop(duration: float, num_frames: int) -> float:
    """Seconds per frame for a model output covering `duration` seconds with `num_frames` frames."""
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    return float(duration) / num_frames


def on_clip_timeline(scores: np.ndarray, hop: float, offset: float, duration: float) -> np.ndarray:
    """Frame scores (T, ...) whose frame j covers [offset + j hop, offset + (j + 1) hop) -> scores
    on this module's grid, cell t = [t hop, (t + 1) hop) for t < ceil(duration / hop): each cell
    takes the frame that covers its centre (the first or the last frame beyond them). With offset 0
    and duration = T hop, `scores` come back unchanged. `FeatureConfig.frame_timeline` gives hop
    and offset of a store's frames."""
    s = np.asarray(scores)
    if hop <= 0:
        raise ValueError("hop must be > 0")
    n = max(1, int(np.ceil(float(duration) / hop - 1e-9)))
    if offset == 0 and n == len(s):
        return s
    j = np.floor(((np.arange(n) + 0.5) * hop - offset) / hop).astype(np.int64)
    return s[np.clip(j, 0, len(s) - 1)]


def median_filter(scores: np.ndarray, size: int) -> np.ndarray:
    """Median over `size` frames (odd; 1 = none) along axis 0, edges repeated."""
    scores = np.asarray(scores, dtype=np.float64)
    if size is None or size <= 1:
        return scores
    if size % 2 == 0:
        raise UsageError(f"median filter size must be odd (frames), got {size}")
    squeeze = scores.ndim == 1
    s = scores[:, None] if squeeze else scores
    h = size // 2
    padded = np.concatenate([np.repeat(s[:1], h, 0), s, np.repeat(s[-1:], h, 0)], axis=0)
    win = np.lib.stride_tricks.sliding_window_view(padded, size, axis=0)  # (T, C, size)
    out = np.median(win, axis=-1)
    return out[:, 0] if squeeze else out


def _runs(active: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) frame runs where `active` (T,) is True."""
    a = np.concatenate([[False], active.astype(bool), [False]])
    d = np.diff(a.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def binarize(scores: np.ndarray, threshold, low=None) -> np.ndarray:
    """(T, C) scores -> (T, C) bool activity; per-class thresholds allowed; hysteresis with `low`."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    C = s.shape[1]
    thr = np.asarray(threshold, dtype=np.float64)
    if thr.ndim > 1 or (thr.ndim == 1 and len(thr) != C):
        raise UsageError(f"need one threshold or one per class ({C}), got shape {thr.shape}")
    hi = np.broadcast_to(thr, (C,))
    if low is None:
        return s >= hi[None, :]
    lo = np.broadcast_to(np.asarray(low, dtype=np.float64), (C,))
    out = np.zeros_like(s, dtype=bool)
    for c in range(C):
        for a, b in _runs(s[:, c] >= lo[c]):
            if (s[a:b, c] >= hi[c]).any():
                out[a:b, c] = True
    return out


def decode_events(scores: np.ndarray, classes: Sequence[str], hop: float, threshold=0.5, *,
                  low=None, median: "int | float | str" = 1, min_duration: float = 0.0, min_gap: float = 0.0,
                  duration: float | None = None, extend: tuple[float, float] = (0.0, 0.0)) -> list[Event]:
    """Frame scores (T, C) -> events sorted by onset. See the module docstring (`median`: see
    `median_frames`; `extend`: see `extend_events`, applied last)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.shape[1] != len(classes):
        raise UsageError(f"scores have {s.shape[1]} classes but {len(classes)} class names were given")
    if hop <= 0:
        raise UsageError(f"frame hop must be > 0 seconds, got {hop}")
    active = binarize(median_filter(s, median_frames(median, hop)), threshold, low)
    end_time = s.shape[0] * hop if duration is None else float(duration)
    events = []
    for c, name in enumerate(classes):
        runs = _runs(active[:, c])
        merged: list[list[float]] = []
        for a, b in runs:
            on, off = a * hop, min(b * hop, end_time)
            if merged and on - merged[-1][1] < min_gap:
                merged[-1][1] = off
            else:
                merged.append([on, off])
        events += [Event(round(on, 6), round(off, 6), str(name)) for on, off in merged
                   if off - on >= min_duration - 1e-9 and off > on]
    if extend is not None and any(extend):
        events = extend_events(events, *extend, duration=end_time)
    return sorted(events, key=lambda e: (e.onset, e.label))


def extend_events(events: Iterable, before: float, after: float, duration: float | None = None) -> list[Event]:
    """Onsets moved `before` seconds earlier and offsets `after` seconds later (negative: inwards),
    inside [0, duration] and never past the middle of the gap to the neighbouring event of the same
    label (events stay apart); an event shrunk to nothing is dropped."""
    if before == 0 and after == 0:
        return [Event(*e) for e in events]
    by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        by_label[str(e[2])].append((float(e[0]), float(e[1])))
    out = [Event(w[0], w[1], lab) for lab, spans in by_label.items()
           for w in widen_spans(sorted(spans), before, after, duration) if w is not None]
    return sorted(out, key=lambda e: (e.onset, e.label))


def widen_spans(spans: Sequence[tuple[float, float]], before: float, after: float,
                duration: float | None = None) -> list[tuple[float, float] | None]:
    """`extend_events` for one label's spans sorted by onset, index for index (None: shrunk to
    nothing)."""
    out: list[tuple[float, float] | None] = []
    for k, (on, off) in enumerate(spans):
        lo = 0.0 if k == 0 else (spans[k - 1][1] + on) / 2
        hi = (float("inf") if duration is None else float(duration)) if k == len(spans) - 1 \
            else (off + spans[k + 1][0]) / 2
        a = on - before if before <= 0 else max(on - before, min(lo, on))
        b = off + after if after <= 0 else min(off + after, max(hi, off))
        a, b = max(0.0, a), b if duration is None else min(float(duration), b)
        out.append((round(a, 6), round(b, 6)) if b > a else None)
    return out


def dilate(scores: np.ndarray, before: int, after: int) -> np.ndarray:
    """Scores (T,) or (T, C) -> max over frames [t - after, t + before] (before + after >= 0; frames
    outside the clip count as 0): above any threshold a run starts `before` frames earlier and ends
    `after` frames later, a negative value moving that boundary the other way (frame-score
    `extend`; e.g. before -1, after 1 shifts the scores one frame later)."""
    s = np.asarray(scores, dtype=np.float64)
    before, after = int(before), int(after)
    if before == 0 and after == 0:
        return s
    if before + after < 0:
        raise UsageError(f"dilate: before + after must be >= 0 frames, got {before} and {after}")
    p = max(abs(before), abs(after))
    padded = np.pad(s, [(p, p)] + [(0, 0)] * (s.ndim - 1), mode="constant", constant_values=0.0)
    win = np.lib.stride_tricks.sliding_window_view(padded, before + after + 1, axis=0)  # (T + 2p - w + 1, ..., w)
    start = p - after
    return win[start:start + len(s)].max(axis=-1)


def events_to_frames(events: Iterable, classes: Sequence[str], num_frames: int, hop: float) -> np.ndarray:
    """Rasterise (onset, offset, label) events to a (T, C) bool matrix: a frame is active when
    its centre lies inside an event."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((num_frames, len(classes)), dtype=bool)
    centres = (np.arange(num_frames) + 0.5) * hop
    for ev in events:
        on, off, lab = ev[0], ev[1], ev[2]
        if lab not in index:
            raise InputError(f"event label {lab!r} is not one of the classes")
        out[(centres >= on) & (centres < off), index[lab]] = True
    return out


def format_events_tsv(rows: Iterable[tuple]) -> str:
    """(id, onset, offset, label) rows -> TSV text with header."""
    lines = ["id\tonset\toffset\tlabel"]
    for cid, on, off, lab in rows:
        lines.append(f"{cid}\t{on:.3f}\t{off:.3f}\t{lab}")
    return "\n".join(lines) + "\n"


def write_events_tsv(path, rows: Iterable[tuple]) -> None:
    """Write (id, onset, offset, label) rows atomically ('-' = stdout)."""
    write_text_atomic(path, format_events_tsv(rows))


def _score_rows(item, hop, prefix: bool) -> list[str]:
    """TSV rows [id,] onset, offset, scores (4 decimals) of one (id, scores (T, C)[, hop]) item."""
    cid, sc = item[0], np.asarray(item[1])
    hop_i = item[2] if len(item) > 2 else hop
    if hop_i is None:
        raise UsageError("frame scores: no hop given")
    sc = sc[:, None] if sc.ndim == 1 else sc
    head = [cid] if prefix else []
    return ["\t".join([*head, f"{t * hop_i:.3f}", f"{(t + 1) * hop_i:.3f}", *(f"{v:.4f}" for v in row)])
            for t, row in enumerate(sc)]


def write_frame_scores_tsv(path, items: Iterable[tuple], classes: Sequence[str],
                           hop: float | None = None) -> None:
    """Frame scores as one TSV: id, onset, offset, then one column per class (4 decimals).

    `items` are (id, scores (T, C)) with the common `hop`, or (id, scores, hop) per item."""
    lines = ["\t".join(["id", "onset", "offset", *map(str, classes)])]
    for item in items:
        lines += _score_rows(item, hop, True)
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_frame_scores(path, items: Iterable[tuple], classes: Sequence[str], hop: float | None = None) -> None:
    """Frame scores for DCASE tools: a folder of `<id>.tsv` files in the sed_scores_eval score
    layout (onset, offset, one column per class; `sed_scores_eval.io.read_sed_scores(path)` reads
    it), or, for a path ending in .tsv or '-', one table with a leading id column."""
    from pathlib import Path
    if str(path) == "-" or str(path).lower().endswith(".tsv"):
        return write_frame_scores_tsv(path, items, classes, hop)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--frame-scores {path}: not a folder (give a folder, or a .tsv file for one table)")
    header = "\t".join(["onset", "offset", *map(str, classes)])
    items = list(items)
    for item in items:
        if not item[0] or "/" in item[0] or item[0].startswith("."):
            raise UsageError(f"--frame-scores folder: id {item[0]!r} cannot be a file name; give a .tsv file")
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        write_text_atomic(folder / f"{item[0]}.tsv", "\n".join([header, *_score_rows(item, hop, False)]) + "\n")


def parse_thresholds(spec, classes: Sequence[str], option: str = "--threshold") -> np.ndarray:
    """One threshold per class (C,) from a number, a sequence of C numbers, or text: `0.5`,
    `dog=0.3,cat=0.6` or a default plus pairs `0.5,dog=0.3`. Each value in (0, 1)."""
    C = len(classes)
    if isinstance(spec, str):
        default, per = None, {}
        for part in (x.strip() for x in spec.split(",") if x.strip()):
            name, eq, value = part.rpartition("=")
            try:
                v = float(value)
            except ValueError:
                raise UsageError(f"{option}: cannot read {value!r} as a number (e.g. 0.5 or dog=0.3,cat=0.6)") from None
            if not eq:
                default = v
            elif name.strip() not in classes:
                raise UsageError(f"{option}: unknown class {name.strip()!r} (classes: {', '.join(classes[:10])}"
                                 f"{', ...' if C > 10 else ''})")
            else:
                per[name.strip()] = v
        missing = [c for c in classes if c not in per]
        if missing and default is None:
            raise UsageError(f"{option}: no value for {', '.join(missing[:5])}; add a default, e.g. 0.5,{spec}")
        thr = np.array([per.get(c, default) for c in classes], dtype=np.float64)
    else:
        thr = np.broadcast_to(np.asarray(spec, dtype=np.float64), (C,)).copy() if np.ndim(spec) == 0 \
            else np.asarray(spec, dtype=np.float64)
        if thr.shape != (C,):
            raise UsageError(f"{option}: need one value or one per class ({C}), got {thr.shape[0]}")
    if not ((thr > 0) & (thr < 1)).all():
        raise UsageError(f"{option} must be in (0, 1), got {thr.min():g}..{thr.max():g}")
    return thr


def median_frames(spec, hop: float) -> int:
    """Median filter length in frames: an int (or digits) = frames; a float or a duration
    (`450ms`, `0.45s`, `0.45`) = seconds, rounded to the nearest odd number of `hop` frames."""
    import re
    if spec is None:
        return 1
    if isinstance(spec, (int, np.integer)) or (isinstance(spec, str) and re.fullmatch(r"\s*\d+\s*", spec)):
        return int(spec)
    from pllcli.io import parse_duration
    n = int(round(parse_duration(spec, "--median") / hop))
    return max(1, n + 1 if n % 2 == 0 else n)


def read_events_tsv(path, classes: Sequence[str] | None = None, durations: dict[str, float] | None = None,
                    tolerance: float = 0.01) -> dict[str, list[Event]]:
    """Read and validate a strong-label table (id, onset, offset, label; CSV/TSV/JSONL).

    `classes`: labels must be among them. `durations`: id -> seconds; ids must be known and
    events must lie inside [0, duration + tolerance].
    """
    t = Table(path, required=["id", "onset", "offset", "label"])
    known = set(map(str, classes)) if classes is not None else None
    out: dict[str, list[Event]] = defaultdict(list)
    for ln, row in t:
        cid = row["id"]
        try:
            on, off = float(row["onset"]), float(row["offset"])
        except ValueError:
            raise InputError(f"onset/offset must be numbers, got {row['onset']!r}/{row['offset']!r}",
                             t.name, line=ln) from None
        if not (np.isfinite(on) and np.isfinite(off)) or on < 0 or off <= on:
            raise InputError(f"event {on:g}-{off:g} s of {cid!r}: need 0 <= onset < offset", t.name, line=ln)
        if known is not None and row["label"] not in known:
            raise InputError(f"unknown class {row['label']!r} for {cid!r} (known: {', '.join(sorted(known)[:10])}"
                             f"{', ...' if len(known) > 10 else ''})", t.name, line=ln, field="label")
        if durations is not None:
            if cid not in durations:
                raise InputError(f"id {cid!r} is not in the feature store", t.name, line=ln, field="id")
            if off > durations[cid] + tolerance:
                raise InputError(f"event {on:.3f}-{off:.3f} s of {cid!r} lies outside the clip "
                                 f"(duration {durations[cid]:.3f} s)", t.name, line=ln)
        out[cid].append(Event(on, off, row["label"]))
    return dict(out)


__all__ = ["Event", "decode_items", "frame_hop", "median_filter", "median_frames", "binarize", "decode_events",
           "events_to_frames", "format_events_tsv", "write_events_tsv", "write_frame_scores_tsv", "write_frame_scores",
           "read_events_tsv", "parse_thresholds", "extend_events", "widen_spans", "dilate", "tune_thresholds",
           "when_segments", "segment_means",
           "label_segments", "events_at_peaks", "segment_frame_ranges", "likely_tags",
           "sliding_windows", "overlap_average"]


def decode_items(items: Iterable[tuple], classes: Sequence[str], hop: float | None = None,
                 threshold=0.5, **kw) -> list[tuple[str, float, float, str]]:
    """(id, frame probs (T, C)[, hop[, duration]]) items -> (id, onset, offset, label) rows for
    `write_events_tsv`; `hop` for items without their own; `kw` as for `decode_events` (low,
    median, min_duration, min_gap, duration)."""
    rows = []
    for item in items:
        cid, sc = item[0], item[1]
        hop_i = item[2] if len(item) > 2 else hop
        if hop_i is None:
            raise UsageError("decode_items: no hop given")
        kw_i = dict(kw, duration=item[3]) if len(item) > 3 else kw
        rows += [(cid, e.onset, e.offset, e.label) for e in decode_events(sc, classes, hop_i, threshold, **kw_i)]
    return rows


def _group(rows) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = defaultdict(list)
    for cid, on, off, lab in rows:
        out[cid].append((on, off, lab))
    return out


def tune_thresholds(items: Sequence[tuple], reference: dict, classes: Sequence[str], candidates=None, *,
                    t_collar: float = 0.2, percentage_of_length: float = 0.2, default: float = 0.5,
                    **decode_kw) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds (C,) maximising collar-based event F1 on clips with strong labels, and
    that F1 (C,). `items` as for `decode_items` (id, probs (T, C), hop[, duration]); `reference`
    {id: [(onset, offset, label)]}; `candidates` default 0.05, 0.10, ..., 0.95 (ties keep the
    lower); classes without reference events keep `default` (F1 NaN); `decode_kw` as for
    `decode_events` (low, median, min_duration, min_gap)."""
    from pllcli.metrics import event_based
    items = list(items)
    cand = np.round(np.arange(1, 20) * 0.05, 2) if candidates is None else np.asarray(candidates, float)
    ref = {it[0]: list(reference.get(it[0], [])) for it in items}
    has_ref = np.array([any(e[2] == c for evs in ref.values() for e in evs) for c in classes])
    best_f, best_t = np.full(len(classes), -1.0), np.full(len(classes), float(default))
    for t in cand:
        est = _group(decode_items(items, classes, None, float(t), **decode_kw))
        F, *_ = event_based.fscore({i: est.get(i, []) for i in ref}, ref, list(classes), t_collar=t_collar,
                                   percentage_of_length=percentage_of_length)
        for k, c in enumerate(classes):
            if has_ref[k] and F[c] > best_f[k]:
                best_f[k], best_t[k] = F[c], t
    best_f[~has_ref] = np.nan
    return best_t, best_f


# ------------------------------------------------------------------ WHEN/WHO events

def when_segments(when_probs: np.ndarray, hop: float, threshold: float = 0.5, **kw) -> list[tuple[float, float]]:
    """Class-agnostic WHEN frame probabilities (T,) -> [(onset, offset)] segments; `kw` as for
    `decode_events` (low, median, min_duration, min_gap, duration)."""
    ev = decode_events(np.asarray(when_probs, dtype=np.float64).reshape(-1, 1), ["event"], hop, threshold, **kw)
    return [(e.onset, e.offset) for e in ev]


def segment_means(evidence: np.ndarray, segments: Sequence[tuple[float, float]], hop: float) -> np.ndarray:
    """Mean frame evidence (T, C) inside each segment -> (K, C); a frame belongs to a segment when
    its centre lies inside it (a segment shorter than a frame takes the frame under its middle)."""
    ev = np.asarray(evidence, dtype=np.float64)
    ev = ev[:, None] if ev.ndim == 1 else ev
    centres = (np.arange(len(ev)) + 0.5) * hop
    out = np.zeros((len(segments), ev.shape[1]))
    for k, (on, off) in enumerate(segments):
        m = (centres >= on) & (centres < off)
        out[k] = ev[m].mean(0) if m.any() else ev[min(len(ev) - 1, int((on + off) / 2 / hop))]
    return out


def _tag_columns(tags, classes: Sequence[str]) -> list[int]:
    """Column indices of `tags` (class names or indices); None = every class."""
    if tags is None:
        return list(range(len(classes)))
    index = {c: k for k, c in enumerate(classes)}
    return sorted({int(t) if isinstance(t, (int, np.integer)) else index[t] for t in tags})


def label_segments(segments: Sequence[tuple[float, float]], seg_scores, classes: Sequence[str], tags=None,
                   mode: str = "best") -> list[Event]:
    """Name WHEN segments. mode "best": each segment gets the class scored highest inside it
    (`seg_scores` (K, C): WHO on the segment, or `segment_means` of frame evidence) among `tags`
    (None = all classes; empty = no events); mode "cover": as "best", but every tag names at least
    one segment while there are segments enough (the assignment of distinct segments to tags with
    the least loss of score against "best", then "best" for the other segments); mode "all": every
    tag for every segment (the clip's tags, as WHEN x WHO gives them)."""
    cols = _tag_columns(tags, classes)
    if not cols or not len(segments):
        return []
    if mode == "all":
        events = [Event(on, off, classes[c]) for on, off in segments for c in cols]
    elif mode in ("best", "cover"):
        sc = np.asarray(seg_scores, dtype=np.float64).reshape(len(segments), len(classes))[:, cols]
        pick = np.argmax(sc, axis=1)
        if mode == "cover" and 1 < len(cols) <= len(segments):
            try:
                from scipy.optimize import linear_sum_assignment
            except ImportError:  # scipy comes with the sed extra (sed_scores_eval), not the core install
                raise MissingExtraError("scipy", "sed", "segment naming mode 'cover'") from None
            rows, tag_cols = linear_sum_assignment(sc.max(1, keepdims=True) - sc)   # loss of each (segment, tag)
            pick[rows] = tag_cols
        events = [Event(on, off, classes[cols[int(k)]]) for (on, off), k in zip(segments, pick)]
    else:
        raise UsageError(f"unknown segment labelling {mode!r} (best, cover or all)")
    return sorted(events, key=lambda e: (e.onset, e.label))


def events_at_peaks(segments: Sequence[tuple[float, float]], evidence: np.ndarray, hop: float,
                    classes: Sequence[str], tags=None) -> list[Event]:
    """One event per tag: the WHEN segment holding the frame where that class's evidence (T, C)
    peaks among the segments' frames (the segment with the highest mean when no frame centre falls
    inside any segment)."""
    cols = _tag_columns(tags, classes)
    if not cols or not len(segments):
        return []
    ev = np.asarray(evidence, dtype=np.float64).reshape(-1, len(classes))
    centres = (np.arange(len(ev)) + 0.5) * hop
    owner = np.full(len(ev), -1)
    for k, (on, off) in enumerate(segments):
        owner[(centres >= on) & (centres < off)] = k
    means = segment_means(ev, segments, hop)
    events = []
    for c in cols:
        inside = owner >= 0
        k = int(owner[inside][np.argmax(ev[inside, c])]) if inside.any() else int(np.argmax(means[:, c]))
        events.append(Event(segments[k][0], segments[k][1], classes[c]))
    return sorted(events, key=lambda e: (e.onset, e.label))


def segment_frame_ranges(segments: Sequence[tuple[float, float]], hop: float, num_frames: int,
                         min_frames: int = 4, offset: float = 0.0) -> list[tuple[int, int]]:
    """[start, end) input-frame ranges (frame k covers [offset + k hop, offset + (k + 1) hop), clip
    of `num_frames`) of each segment, at least `min_frames` long where the clip allows (to run a
    tagger on the segment)."""
    out = []
    for on, off in segments:
        on, off = max(0.0, on - offset), max(0.0, off - offset)
        a = min(int(on / hop), max(0, num_frames - 1))
        b = min(num_frames, max(a + min_frames, int(np.ceil(off / hop - 1e-9))))
        out.append((max(0, min(a, b - min_frames)), b))
    return out


def likely_tags(clip_scores: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Classes whose clip score (C,) reaches `threshold`, else the top class alone."""
    s = np.asarray(clip_scores, dtype=np.float64)
    return np.flatnonzero(s >= threshold).tolist() or [int(np.argmax(s))]


def sliding_windows(num_frames: int, window: int, hop: int) -> list[tuple[int, int]]:
    """[start, end) frame ranges of windows of `window` frames every `hop` frames over a clip of
    `num_frames`; the last window ends at the clip's end, a clip shorter than a window is one window."""
    if window < 1 or hop < 1:
        raise UsageError(f"window and hop must be >= 1 frame, got {window} and {hop}")
    if num_frames <= window:
        return [(0, max(1, num_frames))]
    starts = list(range(0, num_frames - window + 1, hop))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return [(s, s + window) for s in starts]


def overlap_average(window_scores: np.ndarray, ranges: Sequence[tuple[int, int]], num_frames: int) -> np.ndarray:
    """Chunk scores (K, C) of windows `ranges` -> frame scores (num_frames, C): each frame gets
    the mean score of the windows that cover it (0 where none does). Turns a clip-level model
    run on sliding chunks into time-resolved scores for `decode_events`."""
    s = np.asarray(window_scores, dtype=np.float64)
    s = s[:, None] if s.ndim == 1 else s
    total = np.zeros((num_frames, s.shape[1]))
    count = np.zeros(num_frames)
    for (a, b), row in zip(ranges, s):
        total[a:b] += row
        count[a:b] += 1
    return total / np.maximum(count, 1)[:, None]
