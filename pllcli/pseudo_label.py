"""Pseudo-labels from one or more teacher checkpoints into a label store (`pllcli pseudo-label`).

For every item of the feature store (or of shard I/N) each teacher predicts class
probabilities (softmax, or per-class sigmoid for multi-label teachers); the ensemble is the
mean of the teachers' probabilities. Then, in this order:

1. ``restrict_candidates``: for items with a candidate set, p_c <- p_c [c in set] / sum (PLL data);
   multi-label: entries outside the set are zeroed.
2. ``temperature`` T: sharpening p_c^(1/T) / sum_j p_j^(1/T) (single) or sigmoid(logit(p)/T) (multi).
3. confidence filtering: ``threshold`` keeps single-label items whose max probability >= it
   (multi-label: drops class entries below it); ``top_n_per_class`` keeps, for every class, the
   N items most confidently assigned to it (single: among items whose argmax it is; multi: the
   N largest scores of that class). Filtered-out items get no soft label. Both act within one shard.

``segment`` (seconds): PSL pseudo strong labels. Every clip is cut into consecutive chunks of
that length (the last one may be shorter; a clip shorter than the segment is one chunk), each
chunk is relabelled by the ensemble and written as segment-level soft labels
(`segments/*`); clip-level soft labels are then not written.

The output is the input label store (its labels kept) with soft labels added; with
``shard=(i, n)`` it holds only the shard's items (shard 0 also keeps label rows that have no
features), and `merge_label_stores` joins the parts.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from pllcli.errors import ConfigMismatchError, InputError, UsageError

log = logging.getLogger(__name__)


def parse_duration(spec: str | float | None) -> float | None:
    """'2s', '2', '500ms', '0.5' -> seconds; None -> None."""
    if spec is None:
        return None
    if isinstance(spec, (int, float)):
        v = float(spec)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", str(spec))
        if not m:
            raise UsageError(f"--segment must look like 2s, 500ms or 1.5, got {spec!r}")
        v = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    if v <= 0:
        raise UsageError("--segment must be > 0")
    return v


def load_teachers(paths: Sequence[str | Path], device="cpu"):
    """Load classifier checkpoints; all must have the same classes, task and feature config."""
    from pllcli.checkpoint import load_model
    from pllcli.features.config import check_compatible
    if not paths:
        raise UsageError("give at least one --teacher checkpoint")
    models, metas = [], []
    for p in paths:
        m, meta = load_model(p, device=device, kind="classifier")
        if metas:
            first = metas[0]
            if list(meta.get("classes") or []) != list(first.get("classes") or []):
                a, b = list(first.get("classes") or []), list(meta.get("classes") or [])
                diff = sorted(set(a) ^ set(b))
                what = f"e.g. {', '.join(map(repr, diff[:3]))}" if diff else "same classes in another order"
                raise ConfigMismatchError(f"teacher {p} has other classes than {paths[0]} "
                                          f"({len(b)} vs {len(a)} classes; {what})")
            if meta.get("task", "single") != first.get("task", "single"):
                raise ConfigMismatchError(f"teacher {p} is a {meta.get('task')!r} model, {paths[0]} a "
                                          f"{first.get('task')!r} one")
            if first.get("feature_config") and meta.get("feature_config"):
                check_compatible(first["feature_config"], meta["feature_config"], f"teacher {p} vs {paths[0]}")
        models.append(m)
        metas.append(meta)
    return models, metas


def ensemble_probs(models, x, lengths, multi_label: bool):
    """Mean of the teachers' probabilities on a padded batch (B, T, F)."""
    import torch
    with torch.no_grad():
        ps = []
        for m in models:
            lg = m(x, lengths)["logits"].float()
            ps.append(torch.sigmoid(lg) if multi_label else torch.softmax(lg, -1))
        return torch.stack(ps).mean(0)


def postprocess(p: np.ndarray, *, cand: np.ndarray | None = None, has_cand: np.ndarray | None = None,
                temperature: float = 1.0, multi_label: bool = False) -> np.ndarray:
    """Candidate restriction then temperature sharpening of probabilities (N, C)."""
    p = np.asarray(p, np.float64).copy()
    if cand is not None:
        inside = (cand > 0) & has_cand[:, None]
        p = np.where(has_cand[:, None] & ~inside, 0.0, p)
        if not multi_label:
            s = p.sum(1, keepdims=True)
            # an item whose teachers put ~no mass on its candidates: uniform over the set
            uni = inside / np.maximum(inside.sum(1, keepdims=True), 1)
            p = np.where(s > 1e-12, p / np.maximum(s, 1e-300), np.where(has_cand[:, None], uni, p))
    if temperature != 1.0:
        if temperature <= 0:
            raise UsageError("--temperature must be > 0")
        if multi_label:
            pc = np.clip(p, 1e-7, 1 - 1e-7)
            z = np.log(pc) - np.log1p(-pc)
            p = np.where(p > 0, 1 / (1 + np.exp(-z / temperature)), 0.0)
        else:
            with np.errstate(divide="ignore"):
                lp = np.where(p > 0, np.log(np.maximum(p, 1e-300)), -np.inf) / temperature
            lp -= lp.max(1, keepdims=True)
            e = np.exp(lp)
            p = e / e.sum(1, keepdims=True)
    return p.astype(np.float32)


def confidence_filter(p: np.ndarray, threshold: float | None = None, top_n_per_class: int | None = None,
                      multi_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(kept (N,) bool, p with dropped multi-label entries zeroed)."""
    n, c = p.shape
    keep = np.ones(n, bool)
    p = p.copy()
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise UsageError("--threshold must be in [0, 1]")
        if multi_label:
            p[p < threshold] = 0.0
        else:
            keep &= p.max(1) >= threshold
    if top_n_per_class is not None:
        if top_n_per_class < 1:
            raise UsageError("--top-n-per-class must be >= 1")
        if multi_label:
            for k in range(c):
                order = np.argsort(-p[:, k], kind="stable")
                p[order[top_n_per_class:], k] = 0.0
        else:
            sel = np.zeros(n, bool)
            arg = p.argmax(1)
            for k in range(c):
                cand = np.flatnonzero((arg == k) & keep)
                best = cand[np.argsort(-p[cand, k], kind="stable")[:top_n_per_class]]
                sel[best] = True
            keep &= sel
    return keep, p


def _padded(feats: np.ndarray, offsets: np.ndarray, rows, spans=None):
    import torch
    pieces = []
    for j, r in enumerate(rows):
        a, b = int(offsets[r]), int(offsets[r + 1])
        if spans is not None:
            s, e = spans[j]
            a, b = a + s, a + e
        pieces.append(feats[a:b])
    lens = np.array([len(q) for q in pieces], np.int64)
    x = np.zeros((len(pieces), max(1, lens.max()), feats.shape[1]), np.float32)
    for i, q in enumerate(pieces):
        x[i, :len(q)] = q
    return torch.from_numpy(x), torch.from_numpy(lens)


def pseudo_label(features: str | Path, teachers: Sequence[str | Path], labels: str | Path, out: str | Path, *,
                 restrict_candidates: bool = False, threshold: float | None = None,
                 top_n_per_class: int | None = None, temperature: float = 1.0, segment: float | None = None,
                 shard: tuple[int, int] = (0, 1), only_unlabeled: bool = False, batch_size: int = 64,
                 device: str = "cpu", progress: bool = False) -> dict:
    """Write soft labels for the items of `features` into a copy of `labels` at `out`; return a summary."""
    from pllcli.checkpoint import check_feature_config
    from pllcli.features.store import FeatureStore
    from pllcli.io import provenance
    from pllcli.labels.store import align_ids, read_label_store, write_label_store
    from pllcli.runtime import resolve_device

    if temperature <= 0:
        raise UsageError("--temperature must be > 0")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    for p in [features, labels, *teachers]:
        if not Path(p).exists():
            raise InputError("no such file", str(p))
    dev = resolve_device(device)
    models, metas = load_teachers(teachers, dev)
    meta = metas[0]
    multi = meta.get("task", "single") == "multi"
    fs = FeatureStore(features)
    for tp, m in zip(teachers, metas):
        check_feature_config(m, fs.config, f"feature store {features} vs teacher {tp}")
    data = read_label_store(labels)
    t_classes = [str(c) for c in (meta.get("classes") or [])]
    if t_classes != [str(c) for c in data.classes]:
        diff = sorted(set(t_classes) ^ set(map(str, data.classes)))
        raise ConfigMismatchError(f"label store {labels} has other classes than teacher {teachers[0]} "
                                  f"({len(data.classes)} vs {len(t_classes)}"
                                  + (f"; e.g. {', '.join(map(repr, diff[:3]))})" if diff else "; other order)"))
    lrow = align_ids(fs.ids, data.ids, what=f"label store {labels}")
    i, n = shard
    frows = np.array_split(np.arange(len(fs)), n)[i]
    if only_unlabeled:
        frows = frows[data.unlabeled[lrow[frows]]]
    feats, offsets = fs.load_all()
    nf = np.diff(offsets)
    hop_s = fs.config.hop_length / fs.config.sample_rate
    cand_all = data.candidate_matrix(lrow[frows]) if restrict_candidates else None
    has_cand = (np.diff(data.candidates_indptr)[lrow[frows]] > 0) if restrict_candidates else None
    for m in models:
        m.eval()

    it_progress = None
    if progress:
        try:
            from tqdm import tqdm
            it_progress = tqdm(total=len(frows), desc="pseudo-label", leave=False,
                               file=__import__("sys").stderr)
        except ImportError:  # pragma: no cover
            it_progress = None

    summary = {"items": int(len(frows)), "teachers": [str(t) for t in teachers], "shard": f"{i}/{n}",
               "task": "multi" if multi else "single"}
    if segment is None:
        order = frows[np.argsort(nf[frows], kind="stable")]
        probs = np.zeros((len(fs), len(t_classes)), np.float32)
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            x, ln = _padded(feats, offsets, rows)
            probs[rows] = ensemble_probs(models, x.to(dev), ln.to(dev), multi).cpu().numpy()
            if it_progress is not None:
                it_progress.update(len(rows))
        p = postprocess(probs[frows], cand=cand_all, has_cand=has_cand, temperature=temperature, multi_label=multi)
        keep, p = confidence_filter(p, threshold, top_n_per_class, multi)
        data.set_soft(lrow[frows[keep]], p[keep])
        summary.update({"soft_labels": int(keep.sum()), "filtered_out": int((~keep).sum()),
                        # confidence of what was kept and of every item (the filter's effect)
                        "mean_max_prob_kept": float(p[keep].max(1).mean()) if keep.any() else None,
                        "mean_max_prob_all": float(p.max(1).mean()) if len(p) else None})
    else:
        seg_frames = max(1, int(round(segment / hop_s)))
        longest = int(nf[frows].max()) if len(frows) else 0
        if len(frows) and seg_frames > longest:
            raise UsageError(f"--segment {segment:g}s is longer than the clips (longest {longest * hop_s:.2f}s); "
                             f"use a shorter segment")
        short = int((nf[frows] < seg_frames).sum())
        if short:
            log.warning("%d clips are shorter than the %gs segment; each becomes one segment", short, segment)
        chunks = []  # (feature row, start frame, end frame)
        for r in frows:
            t = int(nf[r])
            for a in range(0, max(t, 1), seg_frames):
                chunks.append((int(r), a, min(t, a + seg_frames)))
        chunks.sort(key=lambda c: c[2] - c[1])
        cp = np.zeros((len(chunks), len(t_classes)), np.float32)
        for s in range(0, len(chunks), batch_size):
            part = chunks[s:s + batch_size]
            x, ln = _padded(feats, offsets, [c[0] for c in part], [(c[1], c[2]) for c in part])
            cp[s:s + len(part)] = ensemble_probs(models, x.to(dev), ln.to(dev), multi).cpu().numpy()
        pos = {r: k for k, r in enumerate(frows)}
        crow = np.array([pos[c[0]] for c in chunks], np.int64)
        cc = cand_all[crow] if cand_all is not None else None
        hc = has_cand[crow] if has_cand is not None else None
        cp = postprocess(cp, cand=cc, has_cand=hc, temperature=temperature, multi_label=multi)
        keep, cp = confidence_filter(cp, threshold, top_n_per_class, multi)
        per_item: dict[int, list] = {}
        for k, (r, a, b) in enumerate(chunks):
            if keep[k]:
                per_item.setdefault(r, []).append((a * hop_s, b * hop_s, cp[k]))
        rows_out, segs = [], []
        for r, lst in per_item.items():
            lst.sort(key=lambda e: e[0])
            rows_out.append(lrow[r])
            segs.append((np.array([e[0] for e in lst]), np.array([e[1] for e in lst]), np.stack([e[2] for e in lst])))
        data.set_segments(np.asarray(rows_out, np.int64), segs)
        summary.update({"segment_seconds": segment, "segments": int(keep.sum()), "filtered_out": int((~keep).sum()),
                        "items_with_segments": len(rows_out)})
    if it_progress is not None:
        it_progress.close()
    if n > 1:
        keep_rows = lrow[frows] if not only_unlabeled else lrow[np.array_split(np.arange(len(fs)), n)[i]]
        if i == 0:
            without = np.setdiff1d(np.arange(len(data)), lrow)
            keep_rows = np.concatenate([keep_rows, without])
        data = data.subset(np.sort(keep_rows))
    params = {"restrict_candidates": restrict_candidates, "threshold": threshold,
              "top_n_per_class": top_n_per_class, "temperature": temperature, "segment": segment,
              "shard": f"{i}/{n}", "only_unlabeled": only_unlabeled, "teacher_classes": len(t_classes)}
    prov = provenance(inputs={"features": features, "labels": labels,
                              **{f"teacher{k}": t for k, t in enumerate(teachers)}}, params=params)
    write_label_store(out, data, prov)
    summary["output"] = str(out)
    return summary
