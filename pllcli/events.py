"""Frame scores <-> sound events: decoding, rasterising, strong-label tables.

Time convention: frame t of a (T, C) score matrix covers [t * hop, (t + 1) * hop) seconds,
where hop = seconds per output frame (`frame_hop(duration, T)` for a model that keeps the
whole clip, or hop_length / sample_rate x the model's time downsampling).

Decoding (`decode_events`): optional median filter along time (per class), then a threshold
(one for all classes or one per class; with `low` given, hysteresis: a run must reach
`threshold` somewhere and extends while scores stay >= `low`), then runs separated by less
than `min_gap` seconds are merged and runs shorter than `min_duration` seconds dropped.

Event tables are TSV with the header `id onset offset label` (seconds, 3 decimals), the layout
of the weak benchmark's strong.tsv; `read_events_tsv` validates them (numbers, onset < offset,
inside the clip's duration, known labels/ids) and raises InputError naming the line.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from pllcli.errors import InputError, UsageError
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
                  low=None, median: int = 1, min_duration: float = 0.0, min_gap: float = 0.0,
                  duration: float | None = None) -> list[Event]:
    """Frame scores (T, C) -> events sorted by onset. See the module docstring."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.shape[1] != len(classes):
        raise UsageError(f"scores have {s.shape[1]} classes but {len(classes)} class names were given")
    if hop <= 0:
        raise UsageError(f"frame hop must be > 0 seconds, got {hop}")
    active = binarize(median_filter(s, median), threshold, low)
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
    return sorted(events, key=lambda e: (e.onset, e.label))


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


def write_frame_scores_tsv(path, items: Iterable[tuple], classes: Sequence[str],
                           hop: float | None = None) -> None:
    """Frame scores as TSV: id, onset, offset, then one column per class (4 decimals).

    `items` are (id, scores (T, C)) with the common `hop`, or (id, scores, hop) per item."""
    lines = ["\t".join(["id", "onset", "offset", *map(str, classes)])]
    for item in items:
        cid, sc = item[0], np.asarray(item[1])
        hop_i = item[2] if len(item) > 2 else hop
        if hop_i is None:
            raise UsageError("write_frame_scores_tsv: no hop given")
        sc = sc[:, None] if sc.ndim == 1 else sc
        for t, row in enumerate(sc):
            lines.append("\t".join([cid, f"{t * hop_i:.3f}", f"{(t + 1) * hop_i:.3f}",
                                    *(f"{v:.4f}" for v in row)]))
    write_text_atomic(path, "\n".join(lines) + "\n")


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


__all__ = ["Event", "decode_items", "frame_hop", "median_filter", "binarize", "decode_events", "events_to_frames",
           "format_events_tsv", "write_events_tsv", "write_frame_scores_tsv", "read_events_tsv"]


def decode_items(items: Iterable[tuple[str, np.ndarray]], classes: Sequence[str], hop: float,
                 threshold=0.5, **kw) -> list[tuple[str, float, float, str]]:
    """(id, frame probs (T, C)) pairs -> (id, onset, offset, label) rows for `write_events_tsv`;
    `kw` as for `decode_events` (low, median, min_duration, min_gap, duration)."""
    rows = []
    for cid, sc in items:
        rows += [(cid, e.onset, e.offset, e.label) for e in decode_events(sc, classes, hop, threshold, **kw)]
    return rows
