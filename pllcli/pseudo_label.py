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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pllcli.errors import ConfigMismatchError, InputError, UsageError

log = logging.getLogger(__name__)


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


class _Progress:
    """Items done: a live tqdm bar on a terminal; otherwise one log line per ~10% (redirected logs
    stay short)."""

    def __init__(self, total: int, enabled: bool, desc: str = "pseudo-label"):
        import sys
        self.total, self.done, self.desc, self.bar, self.next_tenth = total, 0, desc, None, 1
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            tenth = self.done * 10 // self.total
            if tenth >= self.next_tenth:
                log.info("%s: %d%% (%d/%d)", self.desc, 10 * tenth, self.done, self.total)
                self.next_tenth = tenth + 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Ensemble:
    models: list
    device: object
    multi: bool
    batch_size: int
    n_classes: int

    def probs(self, mem, rows: np.ndarray, progress: bool) -> np.ndarray:
        """Mean teacher probabilities (len(rows), C) for rows of `mem` (InMemoryFeatures or
        StoreFeatures, read in windows: `read_windows`), batched by length."""
        from pllcli.training.inference import read_windows
        out = np.zeros((len(rows), self.n_classes), np.float32)
        bar = _Progress(len(rows), progress)
        for src, local, where in read_windows(mem, rows, self.batch_size):
            order = np.argsort(src.num_frames[local], kind="stable")
            for s in range(0, len(order), self.batch_size):
                pick = order[s:s + self.batch_size]
                x, ln = src.gather(local[pick])
                out[where[pick]] = ensemble_probs(self.models, x.to(self.device), ln.to(self.device),
                                                  self.multi).cpu().numpy()
                bar.update(len(pick))
        bar.close()
        return out


def _restriction(data, labels, restrict, fs_ids, frows):
    """(cand (n, C), has_cand (n,)) for the feature rows `frows`, from the label store `restrict`
    (True = the input label store); (None, None) without restriction."""
    if restrict is None or restrict is False:
        return None, None
    from pllcli.labels.store import align_ids, read_label_store
    if restrict is True or Path(restrict) == Path(labels):
        src = data
    else:
        if not Path(restrict).exists():
            raise InputError("no such file", str(restrict), field="--restrict-candidates")
        src = read_label_store(restrict)
        if [str(c) for c in src.classes] != [str(c) for c in data.classes]:
            raise ConfigMismatchError(f"--restrict-candidates {restrict} has other classes than {labels}")
    rows = align_ids(fs_ids[frows], src.ids, allow_missing=True, what=f"label store {restrict}")
    safe = np.maximum(rows, 0)
    has = (np.diff(src.candidates_indptr)[safe] > 0) & (rows >= 0)
    return src.candidate_matrix(safe) * has[:, None], has


def pseudo_label(features: str | Path, teachers: Sequence[str | Path], labels: str | Path, out: str | Path, *,
                 restrict_candidates: "bool | str | Path | None" = None, threshold: float | None = None,
                 top_n_per_class: int | None = None, temperature: float = 1.0, segment: float | None = None,
                 shard: tuple[int, int] = (0, 1), only_unlabeled: bool = False, batch_size: int = 64,
                 device: str = "auto", progress: bool = False, data_path: str = "auto",
                 max_memory: int | None = None) -> dict:
    """Write soft labels for the items of `features` into a copy of `labels` at `out`; return a summary.
    `restrict_candidates`: a label store path whose candidate sets restrict each item (True = `labels`).
    `data_path` (--data)/`max_memory`: load the store or read it lazily (`pllcli.training.stream.open_features`)."""
    from pllcli.checkpoint import check_feature_config
    from pllcli.features.store import FeatureStore
    from pllcli.io import provenance
    from pllcli.labels.store import align_ids, read_label_store, write_label_store
    from pllcli.runtime import resolve_device
    from pllcli.training.stream import open_features

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
    mem = open_features(fs, data_path, max_memory)
    cand_all, has_cand = _restriction(data, labels, restrict_candidates, np.asarray(fs.ids), frows)
    for m in models:
        m.eval()

    summary = {"items": int(len(frows)), "teachers": [str(t) for t in teachers], "shard": f"{i}/{n}",
               "task": "multi" if multi else "single"}
    ens = _Ensemble(models, dev, multi, batch_size, len(t_classes))
    post = dict(temperature=temperature, multi_label=multi)
    if segment is None:
        probs = ens.probs(mem, frows, progress)
        p = postprocess(probs, cand=cand_all, has_cand=has_cand, **post)
        keep, p = confidence_filter(p, threshold, top_n_per_class, multi)
        data.set_soft(lrow[frows[keep]], p[keep])
        summary.update({"soft_labels": int(keep.sum()), "filtered_out": int((~keep).sum()),
                        # confidence of what was kept and of every item (the filter's effect)
                        "mean_max_prob_kept": float(p[keep].max(1).mean()) if keep.any() else None,
                        "mean_max_prob_all": float(p.max(1).mean()) if len(p) else None})
    else:
        cp, chunks = _segment_probs(ens, mem, fs.config, frows, segment, progress)
        crow = np.searchsorted(frows, chunks[0])  # frows is sorted: each chunk's row among them
        cc = cand_all[crow] if cand_all is not None else None
        hc = has_cand[crow] if has_cand is not None else None
        cp = postprocess(cp, cand=cc, has_cand=hc, **post)
        keep, cp = confidence_filter(cp, threshold, top_n_per_class, multi)
        summary.update(_set_segments(data, lrow, chunks, cp, keep, fs.config))
        summary["segment_seconds"] = segment
    if n > 1:
        keep_rows = lrow[frows] if not only_unlabeled else lrow[np.array_split(np.arange(len(fs)), n)[i]]
        if i == 0:
            without = np.setdiff1d(np.arange(len(data)), lrow)
            keep_rows = np.concatenate([keep_rows, without])
        data = data.subset(np.sort(keep_rows))
    params = {"restrict_candidates": None if restrict_candidates in (None, False) else
              str(labels if restrict_candidates is True else restrict_candidates), "threshold": threshold,
              "top_n_per_class": top_n_per_class, "temperature": temperature, "segment": segment,
              "shard": f"{i}/{n}", "only_unlabeled": only_unlabeled, "teacher_classes": len(t_classes)}
    prov = provenance(inputs={"features": features, "labels": labels,
                              **{f"teacher{k}": t for k, t in enumerate(teachers)}}, params=params)
    write_label_store(out, data, prov)
    summary["output"] = str(out)
    return summary


def _segment_probs(ens: _Ensemble, mem, config, frows, segment: float, progress: bool):
    """PSL: ensemble probabilities (S, C) of consecutive `segment`-second chunks of the clips of
    `frows` of `mem` (in memory or read lazily), and the chunks (feature row (S,), start frame
    (S,), frames (S,))."""
    from pllcli.training.inference import chunk_view
    nf = mem.num_frames
    hop_s = config.hop_length / config.sample_rate
    seg_frames = max(1, int(round(segment / hop_s)))
    longest = int(nf[frows].max()) if len(frows) else 0
    if len(frows) and seg_frames > longest:
        raise UsageError(f"--segment {segment:g}s is longer than the clips (longest {longest * hop_s:.2f}s); "
                         f"use a shorter segment")
    short = int((nf[frows] < seg_frames).sum())
    if short:
        log.warning("%d clips are shorter than the %gs segment; each becomes one segment", short, segment)
    # consecutive chunks tile every clip: a view of the same frames with the chunks as items
    view, owner = chunk_view(mem, seg_frames)
    starts = view.offsets[:-1] - mem.offsets[owner]
    mine = np.flatnonzero(np.isin(owner, frows))
    return ens.probs(view, mine, progress), (owner[mine], starts[mine], view.num_frames[mine])


def _set_segments(data, lrow, chunks, cp, keep, config) -> dict:
    """Write the kept chunk probabilities as segment soft labels of their clips."""
    hop_s = config.hop_length / config.sample_rate
    owner, starts, frames = chunks
    rows_out, segs = [], []
    for r in np.unique(owner[keep]):
        k = np.flatnonzero(keep & (owner == r))
        rows_out.append(lrow[r])
        segs.append((starts[k] * hop_s, (starts[k] + frames[k]) * hop_s, cp[k]))
    data.set_segments(np.asarray(rows_out, np.int64), segs)
    return {"segments": int(keep.sum()), "filtered_out": int((~keep).sum()), "items_with_segments": len(rows_out)}
