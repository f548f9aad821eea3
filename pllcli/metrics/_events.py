"""Event lists: {item_id: [(onset, offset, label), ...]} (seconds, label a class name)."""
from __future__ import annotations

import math

import numpy as np


def normalize_events(events) -> dict:
    out = {}
    for item, evs in events.items():
        lst = []
        for ev in evs:
            onset, offset, label = float(ev[0]), float(ev[1]), str(ev[2])
            if not (math.isfinite(onset) and math.isfinite(offset)) or offset < onset:
                raise ValueError(f"{item}: bad event ({onset}, {offset}, {label})")
            lst.append((onset, offset, label))
        out[str(item)] = lst
    return out


def event_classes(*event_dicts) -> list[str]:
    return sorted({ev[2] for d in event_dicts for evs in d.values() for ev in evs})


def events_to_roll(events, classes, time_resolution: float, n_steps: int | None = None) -> np.ndarray:
    """Binary activity (T, C): step t is active when an event overlaps [t*res, (t+1)*res).

    Onset step floor(onset/res), offset step ceil(offset/res) (exclusive), as sed_eval.
    """
    index = {c: i for i, c in enumerate(classes)}
    ends = [int(math.ceil(ev[1] / time_resolution - 1e-9)) for ev in events]
    T = n_steps if n_steps is not None else (max(ends) if ends else 0)
    roll = np.zeros((T, len(classes)), dtype=bool)
    for (onset, offset, label), end in zip(events, ends):
        if label not in index:
            continue
        start = int(math.floor(onset / time_resolution + 1e-9))
        roll[start:min(end, T), index[label]] = True
    return roll
