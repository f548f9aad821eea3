"""Partial-label metrics: how well a model picks the true class out of a candidate set.

`candidates` is (N, C): > 0 marks a member (weights allowed); a row with no members means
"no candidate set" and is skipped. `y_true` (N,) class indices, -1 = unknown (skipped).
"""
from __future__ import annotations

import numpy as np

from pllcli.metrics._util import as_scores


def _rows(candidates, y_true):
    cand = np.asarray(candidates) > 0
    y = np.asarray(y_true, dtype=np.int64)
    if cand.ndim != 2 or y.shape != (cand.shape[0],):
        raise ValueError(f"candidates {cand.shape} and y_true {y.shape} do not fit")
    keep = cand.any(axis=1) & (y >= 0)
    return cand, y, keep


def candidate_coverage(candidates, y_true) -> dict:
    """coverage = share of items (with a set and a known truth) whose set holds the truth;
    also the mean set size and the share of ambiguous sets (size > 1)."""
    cand, y, keep = _rows(candidates, y_true)
    n = int(keep.sum())
    sizes = cand.sum(axis=1)
    if n == 0:
        return {"n_items": 0, "coverage": float("nan"), "mean_set_size": float("nan"),
                "ambiguous_share": float("nan")}
    covered = cand[np.nonzero(keep)[0], y[keep]]
    return {"n_items": n, "coverage": float(covered.mean()),
            "mean_set_size": float(sizes[keep].mean()),
            "ambiguous_share": float((sizes[keep] > 1).mean())}


def disambiguation_accuracy(scores, candidates, y_true) -> dict:
    """Accuracy of argmax over the candidate set (`restricted`) and over all classes
    (`unrestricted`), on items with a candidate set and a known truth."""
    s = as_scores(scores)
    cand, y, keep = _rows(candidates, y_true)
    if cand.shape != s.shape:
        raise ValueError(f"scores {s.shape} and candidates {cand.shape} differ")
    idx = np.nonzero(keep)[0]
    if idx.size == 0:
        return {"n_items": 0, "restricted": float("nan"), "unrestricted": float("nan")}
    masked = np.where(cand[idx], s[idx], -np.inf)
    return {"n_items": int(idx.size),
            "restricted": float(np.mean(masked.argmax(axis=1) == y[idx])),
            "unrestricted": float(np.mean(s[idx].argmax(axis=1) == y[idx]))}
