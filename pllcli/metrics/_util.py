"""Input validation shared by the metric modules."""
from __future__ import annotations

import numpy as np


def as_scores(scores, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def as_labels(y, num_classes: int | None = None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"targets must be 1-D class indices, got shape {y.shape}")
    y = y.astype(np.int64)
    if num_classes is not None and y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"target class index out of range [0, {num_classes})")
    return y


def as_multihot(y, shape=None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"targets must be 2-D (N, C) multi-hot, got shape {y.shape}")
    if shape is not None and y.shape != tuple(shape):
        raise ValueError(f"targets shape {y.shape} != scores shape {tuple(shape)}")
    return (y > 0)


def safe_div(a, b, default: float = 0.0):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.full(np.broadcast(a, b).shape, default, dtype=np.float64)
    np.divide(a, b, out=out, where=b != 0)
    return out if out.ndim else float(out)


def nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def fscore_from_counts(tp, fp, fn, beta: float = 1.0):
    """(f, p, r) from counts; 0 where a denominator is 0 (sed_eval / sklearn zero_division=0)."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    p = safe_div(tp, tp + fp)
    r = safe_div(tp, tp + fn)
    b2 = beta * beta
    f = safe_div((1 + b2) * p * r, b2 * p + r)
    return f, p, r


def fscore_dicts(tp, fp, fn, classes, n_ref, beta: float = 1.0):
    """sed_scores_eval-style (f, p, r, stats) dicts with macro and micro averages.

    Macro averages are over classes with at least one reference positive (n_ref > 0);
    classes without positives are reported but skipped in the macro average.
    """
    tp, fp, fn, n_ref = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, n_ref))
    f, p, r = fscore_from_counts(tp, fp, fn, beta)
    f, p, r = np.atleast_1d(f), np.atleast_1d(p), np.atleast_1d(r)
    keep = n_ref > 0
    F, P, R, S = {}, {}, {}, {}
    for c, name in enumerate(classes):
        F[name], P[name], R[name] = float(f[c]), float(p[c]), float(r[c])
        S[name] = {"tp": int(tp[c]), "fp": int(fp[c]), "fn": int(fn[c]), "n_ref": int(n_ref[c])}
    for d, v in ((F, f), (P, p), (R, r)):
        d["macro_average"] = float(v[keep].mean()) if keep.any() else float("nan")
    mf, mp, mr = fscore_from_counts(tp.sum(), fp.sum(), fn.sum(), beta)
    F["micro_average"], P["micro_average"], R["micro_average"] = float(mf), float(mp), float(mr)
    S["micro_average"] = {"tp": int(tp.sum()), "fp": int(fp.sum()), "fn": int(fn.sum()),
                          "n_ref": int(n_ref.sum())}
    return F, P, R, S
