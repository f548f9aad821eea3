"""Multi-label (tagging) metrics: AP / mAP, lwlrap, ROC AUC, d-prime.

`y_true` is (N, C) multi-hot, `scores` (N, C). Class-wise values are NaN where undefined:
AP without positives, AUC without positives or without negatives. Macro averages skip
NaN classes (documented behaviour, unlike sklearn, which warns and scores them 0 or fails).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from pllcli.metrics._util import as_multihot, as_scores, nanmean


def _binary_curve(y: np.ndarray, s: np.ndarray):
    """Cumulative (tp, fp) at each distinct threshold, thresholds descending (ties grouped)."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each tie group
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return tps, fps, s[last]


def precision_recall_curve(y_true_1d, scores_1d):
    """(precision, recall, thresholds) over distinct thresholds, descending.

    Same points as sklearn.metrics.precision_recall_curve (without its final (1, 0) point).
    """
    y = np.asarray(y_true_1d) > 0
    s = np.asarray(scores_1d, dtype=np.float64)
    tps, fps, thr = _binary_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tps / (tps + fps)
        recall = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return precision, recall, thr


def _ap_1d(y: np.ndarray, s: np.ndarray) -> float:
    if not y.any():
        return float("nan")
    tps, fps, _ = _binary_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_precision(y_true, scores) -> np.ndarray:
    """Class-wise average precision (C,): sum_n (R_n - R_{n-1}) P_n over distinct thresholds.

    Tied scores form one threshold (as sklearn.metrics.average_precision_score); NaN for
    a class without positives.
    """
    s = as_scores(scores)
    y = as_multihot(y_true, s.shape)
    return np.array([_ap_1d(y[:, c], s[:, c]) for c in range(s.shape[1])])


def mean_average_precision(y_true, scores, average: str = "macro") -> float:
    """mAP. "macro": mean of class-wise AP over classes with positives; "micro": AP of the
    flattened (N*C) decisions (sklearn average="micro")."""
    s = as_scores(scores)
    y = as_multihot(y_true, s.shape)
    if average == "macro":
        return nanmean(average_precision(y, s))
    if average == "micro":
        return _ap_1d(y.ravel(), s.ravel())
    raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their mean rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    n = len(s)
    starts = np.r_[0, np.nonzero(np.diff(ss))[0] + 1]
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(n)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _auc_1d(y: np.ndarray, s: np.ndarray) -> float:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true, scores) -> np.ndarray:
    """Class-wise ROC AUC (C,) via the Mann-Whitney statistic; a tie counts 1/2.

    NaN for a class with no positives or no negatives.
    """
    s = as_scores(scores)
    y = as_multihot(y_true, s.shape)
    return np.array([_auc_1d(y[:, c], s[:, c]) for c in range(s.shape[1])])


def roc_auc_micro(y_true, scores) -> float:
    s = as_scores(scores)
    y = as_multihot(y_true, s.shape)
    return _auc_1d(y.ravel(), s.ravel())


def d_prime(auc) -> float:
    """d' = sqrt(2) * Phi^-1(AUC) (PANNs / PSL convention; Phi^-1 = statistics.NormalDist).

    +inf for AUC 1, -inf for AUC 0, NaN for NaN.
    """
    auc = float(auc)
    if math.isnan(auc):
        return float("nan")
    if auc >= 1.0:
        return float("inf")
    if auc <= 0.0:
        return float("-inf")
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def lwlrap_per_class(y_true, scores):
    """(per_class_lwlrap (C,), weights (C,)) per DCASE 2019 task 2.

    For every (clip i, positive class j): precision_ij = |{positive k: s_ik >= s_ij}| /
    |{k: s_ik >= s_ij}|. Ties: a class tied with j counts as ranked above it (pessimistic,
    the convention of sklearn's label_ranking_average_precision_score; the DCASE reference
    code breaks ties by argsort order instead). Per-class lwlrap is the mean of precision_ij
    over the clips positive for j (NaN without positives); the weight of a class is its
    share of all positive labels. Clips without positive labels contribute nothing.
    """
    s = as_scores(scores)
    y = as_multihot(y_true, s.shape)
    C = s.shape[1]
    sums = np.zeros(C)
    counts = y.sum(axis=0).astype(np.float64)
    for i in np.nonzero(y.any(axis=1))[0]:
        row, pos = s[i], y[i]
        all_sorted = np.sort(row)
        pos_sorted = np.sort(row[pos])
        v = row[pos]
        n_ge = C - np.searchsorted(all_sorted, v, side="left")
        n_pos_ge = len(pos_sorted) - np.searchsorted(pos_sorted, v, side="left")
        sums[pos] += n_pos_ge / n_ge
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    total = counts.sum()
    weights = counts / total if total > 0 else np.zeros(C)
    return per_class, weights


def lwlrap(y_true, scores) -> float:
    """Label-weighted label-ranking average precision (overall); see `lwlrap_per_class`."""
    per_class, weights = lwlrap_per_class(y_true, scores)
    if weights.sum() == 0:
        return float("nan")
    return float(np.sum(np.nan_to_num(per_class) * weights))


def summary(y_true, scores, classes, threshold: float = 0.5) -> dict:
    """Every multi-label metric in one JSON-ready dict (scores are probabilities)."""
    from pllcli.metrics._util import fscore_dicts
    s = as_scores(scores)
    y = as_multihot(y_true, s.shape)
    ap = average_precision(y, s)
    auc = roc_auc(y, s)
    lw, w = lwlrap_per_class(y, s)
    mean_auc = nanmean(auc)
    pred = s >= threshold
    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    F, P, R, _ = fscore_dicts(tp, fp, fn, classes, y.sum(axis=0))
    out = {
        "n_items": int(len(y)),
        "mAP": nanmean(ap), "micro_mAP": mean_average_precision(y, s, "micro"),
        "lwlrap": lwlrap(y, s), "roc_auc": mean_auc, "micro_roc_auc": roc_auc_micro(y, s),
        "d_prime": d_prime(mean_auc),
        "threshold": threshold, "macro_f1": F["macro_average"], "micro_f1": F["micro_average"],
        "classes_without_positives": [c for c, n in zip(classes, y.sum(axis=0)) if n == 0],
        "per_class": {c: {"ap": float(ap[i]), "roc_auc": float(auc[i]), "lwlrap": float(lw[i]),
                          "lwlrap_weight": float(w[i]), "f1": F[c], "precision": P[c],
                          "recall": R[c], "support": int(y[:, i].sum())}
                      for i, c in enumerate(classes)},
    }
    return out
