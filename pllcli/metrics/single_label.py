"""Single-label (multi-class) metrics.

`scores` (N, C) are probabilities or logits (only their order matters, except for ECE, which
needs probabilities); `y_true` (N,) are class indices. `y_pred` defaults to argmax(scores)
(the first maximum on ties, like numpy).
"""
from __future__ import annotations

import numpy as np

from pllcli.metrics._util import as_labels, as_scores, fscore_from_counts, safe_div


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = as_labels(y_true), as_labels(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError("y_true and y_pred differ in length")
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def top_k_accuracy(y_true, scores, k: int = 5) -> float:
    """Fraction of items whose true class is among the k highest scores.

    Ties: an item counts as a hit when fewer than k classes score strictly higher than the
    true class (ties resolved in favour of the true class). With no ties this equals
    sklearn's top_k_accuracy_score.
    """
    s = as_scores(scores)
    y = as_labels(y_true, s.shape[1])
    if not y.size:
        return float("nan")
    true_score = s[np.arange(len(y)), y]
    higher = (s > true_score[:, None]).sum(axis=1)
    return float(np.mean(higher < k))


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows are true classes, columns predicted (sklearn's layout)."""
    y_true, y_pred = as_labels(y_true, num_classes), as_labels(y_pred, num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def precision_recall_per_class(y_true, y_pred, num_classes: int):
    """(precision, recall, f1, support) arrays of shape (C,).

    Precision of a class never predicted is 0 and recall of a class without support is
    0 (sklearn's zero_division=0); use `support` to tell those classes apart.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    f, p, r = fscore_from_counts(tp, fp, fn)
    return np.atleast_1d(p), np.atleast_1d(r), np.atleast_1d(f), cm.sum(axis=1)


def f1_scores(y_true, y_pred, num_classes: int) -> dict:
    """{"macro": ..., "micro": ..., "per_class": (C,)}.

    Macro F1 averages the classes that occur in y_true (support > 0); classes without
    positives are skipped (equals sklearn f1_score(labels=<present classes>, average="macro")).
    Micro F1 counts every prediction (equals accuracy for single-label data).
    """
    p, r, f, support = precision_recall_per_class(y_true, y_pred, num_classes)
    keep = support > 0
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.trace(cm)
    n = cm.sum()
    micro = float(safe_div(tp, n)) if n else float("nan")
    return {"macro": float(f[keep].mean()) if keep.any() else float("nan"),
            "micro": micro, "per_class": f}


def reliability_bins(y_true, probs, n_bins: int = 15) -> dict:
    """Equal-width confidence bins for a reliability diagram and ECE.

    Confidence is max(probs) per item, correctness is argmax == y_true. Bin b covers
    (b/n, (b+1)/n], the first bin also holds confidence 0. Returns arrays `count`,
    `confidence` (mean per bin, NaN when empty), `accuracy` (same) and the bin `edges`.
    """
    p = as_scores(probs, "probs")
    y = as_labels(y_true, p.shape[1])
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return {"edges": edges, "count": count.astype(np.int64), "confidence": mean_conf,
            "accuracy": mean_acc}


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width bins of max probability."""
    b = reliability_bins(y_true, probs, n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    keep = b["count"] > 0
    return float(np.sum(b["count"][keep] / n * np.abs(b["accuracy"][keep] - b["confidence"][keep])))


def summary(y_true, scores, classes, top_k=(1, 5), n_bins: int = 15, probs=None) -> dict:
    """Every single-label metric in one JSON-ready dict."""
    s = as_scores(scores)
    C = s.shape[1]
    y = as_labels(y_true, C)
    pred = s.argmax(axis=1)
    p, r, f, support = precision_recall_per_class(y, pred, C)
    f1 = f1_scores(y, pred, C)
    out = {"n_items": int(len(y)), "accuracy": accuracy(y, pred)}
    for k in top_k:
        if k > 1 and k < C:
            out[f"top{k}_accuracy"] = top_k_accuracy(y, s, k)
    out["macro_f1"] = f1["macro"]
    out["micro_f1"] = f1["micro"]
    if probs is not None:
        out["ece"] = expected_calibration_error(y, probs, n_bins)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(support[i])} for i, c in enumerate(classes)}
    out["confusion_matrix"] = confusion_matrix(y, pred, C).tolist()
    return out
