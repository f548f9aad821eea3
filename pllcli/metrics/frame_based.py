"""Frame-level metrics for models with frame outputs.

`scores` is {item: (T_i, C) array} of frame probabilities with frame hop `hop_seconds`;
the reference is strong events {item: [(onset, offset, label)]}, turned into a frame roll
where frame t covers [t*hop, (t+1)*hop). Frames of all items are pooled, then the
multi-label metrics apply per class (macro skips classes without active frames).
"""
from __future__ import annotations

import numpy as np

from pllcli.metrics import multi_label
from pllcli.metrics._events import events_to_roll, normalize_events
from pllcli.metrics._util import fscore_dicts, nanmean


def pooled_frames(scores: dict, reference, classes, hop_seconds: float):
    ref = normalize_events(reference)
    S, Y = [], []
    for item, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        S.append(s)
        Y.append(events_to_roll(ref.get(str(item), []), classes, hop_seconds, s.shape[0]))
    C = len(classes)
    if not S:
        return np.zeros((0, C)), np.zeros((0, C), dtype=bool)
    return np.concatenate(S), np.concatenate(Y)


def auc(scores: dict, reference, classes, hop_seconds: float) -> dict:
    s, y = pooled_frames(scores, reference, classes, hop_seconds)
    per_class = multi_label.roc_auc(y, s)
    return {"macro": nanmean(per_class), "per_class": dict(zip(classes, per_class.tolist()))}


def fscore(scores: dict, reference, classes, hop_seconds: float, threshold: float = 0.5,
           beta: float = 1.0):
    """(f, p, r, stats) dicts over pooled frames at `threshold`."""
    s, y = pooled_frames(scores, reference, classes, hop_seconds)
    pred = s >= threshold
    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    return fscore_dicts(tp, fp, fn, classes, y.sum(axis=0), beta)
