"""Event-based (collar) F-score, the sed_eval `EventBasedMetrics` definition.

An estimated event matches a reference event of the same class in the same item when
|onset_ref - onset_est| <= t_collar and (if evaluate_offset)
|offset_ref - offset_est| <= max(t_collar, percentage_of_length * (offset_ref - onset_ref)).
Each event matches at most one other; the number of true positives is the maximum
matching (sed_eval's 'optimal' bipartite matching). fp = estimated - tp,
fn = reference - tp. Micro average = sed_eval overall; the macro average skips classes
without reference events.
"""
from __future__ import annotations

import numpy as np

from pllcli.metrics._events import event_classes, normalize_events
from pllcli.metrics._util import fscore_dicts


def _max_matching(adj: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching (Kuhn's augmenting paths)."""
    match_r = [-1] * n_right

    def augment(u, seen):
        for v in adj[u]:
            if not seen[v]:
                seen[v] = True
                if match_r[v] < 0 or augment(match_r[v], seen):
                    match_r[v] = u
                    return True
        return False

    return sum(augment(u, [False] * n_right) for u in range(len(adj)))


def match_count(ref, est, *, t_collar=0.2, percentage_of_length=0.5, evaluate_onset=True,
                evaluate_offset=True) -> int:
    """Number of matched (reference, estimated) pairs for events of one class in one item."""
    adj = []
    for r_on, r_off, _ in ref:
        off_collar = max(t_collar, percentage_of_length * (r_off - r_on))
        row = []
        for j, (e_on, e_off, _) in enumerate(est):
            ok = True
            if evaluate_onset and abs(r_on - e_on) > t_collar + 1e-9:
                ok = False
            if ok and evaluate_offset and abs(r_off - e_off) > off_collar + 1e-9:
                ok = False
            if ok:
                row.append(j)
        adj.append(row)
    return _max_matching(adj, len(est))


def intermediate_statistics(estimated, reference, classes=None, *, t_collar=0.2,
                            percentage_of_length=0.5, evaluate_onset=True, evaluate_offset=True):
    est, ref = normalize_events(estimated), normalize_events(reference)
    classes = list(classes) if classes is not None else event_classes(ref, est)
    index = {c: i for i, c in enumerate(classes)}
    C = len(classes)
    tp, n_sys, n_ref = (np.zeros(C, dtype=np.int64) for _ in range(3))
    for item in sorted(set(ref) | set(est)):
        for c, ci in index.items():
            r = [ev for ev in ref.get(item, []) if ev[2] == c]
            e = [ev for ev in est.get(item, []) if ev[2] == c]
            n_ref[ci] += len(r)
            n_sys[ci] += len(e)
            if r and e:
                tp[ci] += match_count(r, e, t_collar=t_collar,
                                      percentage_of_length=percentage_of_length,
                                      evaluate_onset=evaluate_onset, evaluate_offset=evaluate_offset)
    return classes, tp, n_sys - tp, n_ref - tp, n_ref


def fscore(estimated, reference, classes=None, *, t_collar=0.2, percentage_of_length=0.5,
           evaluate_onset=True, evaluate_offset=True, beta=1.0):
    """(f, p, r, stats) dicts keyed by class plus "macro_average" / "micro_average"."""
    classes, tp, fp, fn, n_ref = intermediate_statistics(
        estimated, reference, classes, t_collar=t_collar, percentage_of_length=percentage_of_length,
        evaluate_onset=evaluate_onset, evaluate_offset=evaluate_offset)
    return fscore_dicts(tp, fp, fn, classes, n_ref, beta)
