"""Segment-based F-score (sed_eval `SegmentBasedMetrics` definition).

Each item's time axis is cut into segments of `time_resolution` seconds; a class is active
in a segment when any of its events overlaps it (onset segment floor(onset/res), offset
segment ceil(offset/res)). Per class, tp/fp/fn count segments; each item's roll is as long
as the later of its reference and estimated events (or `durations[item]` when given).
Micro average = overall sed_eval metrics; the macro average skips classes without
reference activity (sed_eval averages over its whole label list instead).
"""
from __future__ import annotations

import math

import numpy as np

from pllcli.metrics._events import event_classes, events_to_roll, normalize_events
from pllcli.metrics._util import fscore_dicts


def intermediate_statistics(estimated, reference, classes=None, *, time_resolution: float = 1.0,
                            durations: dict | None = None):
    est, ref = normalize_events(estimated), normalize_events(reference)
    classes = list(classes) if classes is not None else event_classes(ref, est)
    C = len(classes)
    tp, fp, fn, n_ref = (np.zeros(C, dtype=np.int64) for _ in range(4))
    for item in sorted(set(ref) | set(est)):
        r, e = ref.get(item, []), est.get(item, [])
        ends = [ev[1] for ev in r + e]
        if durations and item in durations:
            ends.append(float(durations[item]))
        T = int(math.ceil(max(ends, default=0.0) / time_resolution - 1e-9))
        R = events_to_roll(r, classes, time_resolution, T)
        E = events_to_roll(e, classes, time_resolution, T)
        tp += (R & E).sum(axis=0)
        fp += (~R & E).sum(axis=0)
        fn += (R & ~E).sum(axis=0)
        n_ref += R.sum(axis=0)
    return classes, tp, fp, fn, n_ref


def fscore(estimated, reference, classes=None, *, time_resolution: float = 1.0,
           durations: dict | None = None, beta: float = 1.0):
    """(f, p, r, stats) dicts keyed by class plus "macro_average" / "micro_average"."""
    classes, tp, fp, fn, n_ref = intermediate_statistics(
        estimated, reference, classes, time_resolution=time_resolution, durations=durations)
    return fscore_dicts(tp, fp, fn, classes, n_ref, beta)
