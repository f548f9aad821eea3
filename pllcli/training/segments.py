"""Segment-level training and chunk-averaged inference (the PSL recipe's steps 3 and 4).

`pllcli pseudo-label --segment 2s` writes one soft label per chunk of a clip (`segments/*` in the
label store). `train --segment-labels` turns every such segment into a training item of its own:
its frames (sliced from the clip), its soft label, and the clip's other labels (clean label,
candidates, tags), so that `distill` and the supervised objectives see chunks. Clips without
segment labels stay whole. The checkpoint records the median segment length
(`meta["segment_seconds"]`); `predict` and `evaluate` then cut test clips into chunks of that
length and average the chunk probabilities (`chunk_probabilities`).
"""
from __future__ import annotations

import numpy as np

from pllcli.errors import InputError
from pllcli.training.inference import chunk_probabilities, chunk_view  # noqa: F401  (re-exported)


def expand_segments(feats: np.ndarray, offsets: np.ndarray, ids, lab, label_rows: np.ndarray,
                    hop_seconds: float, where: str = "label store"):
    """Replace clips that have segment soft labels by one item per segment.

    feats (sumT, F), offsets (N+1,), ids (N,), `lab` a LabelData, label_rows (N,) feature row ->
    label row. Returns (feats', offsets', ids', lab', label_rows', info) where lab' has one row per
    output item (label_rows' = arange) and info = {"segments", "clips_split", "clips_whole",
    "segment_seconds" (median)}.
    """
    if len(lab.segments_item) == 0:
        raise InputError("--segment-labels: the label store holds no segment-level soft labels "
                         "(write them with `pllcli pseudo-label --segment 2s`)", where, field="segments")
    seg_of: dict[int, list[int]] = {}
    for s, it in enumerate(lab.segments_item.tolist()):
        seg_of.setdefault(int(it), []).append(s)
    parts, new_offsets, new_ids, parent_lrow, seg_index = [], [0], [], [], []
    split = whole = 0
    lengths = []
    for r in range(len(offsets) - 1):
        a0, b0 = int(offsets[r]), int(offsets[r + 1])
        lrow = int(label_rows[r])
        segs = seg_of.get(lrow)
        if not segs:
            whole += 1
            parts.append(feats[a0:b0])
            new_ids.append(str(ids[r]))
            parent_lrow.append(lrow)
            seg_index.append(-1)
            new_offsets.append(new_offsets[-1] + (b0 - a0))
            continue
        split += 1
        for s in segs:
            on, off = float(lab.segments_onset[s]), float(lab.segments_offset[s])
            a = min(max(0, int(round(on / hop_seconds))), b0 - a0 - 1)
            b = min(max(a + 1, int(round(off / hop_seconds))), b0 - a0)
            parts.append(feats[a0 + a:a0 + b])
            new_ids.append(f"{ids[r]}@{on:.3f}-{off:.3f}")
            parent_lrow.append(lrow)
            seg_index.append(s)
            new_offsets.append(new_offsets[-1] + (b - a))
            lengths.append(off - on)
    parent_lrow = np.asarray(parent_lrow, np.int64)
    seg_index = np.asarray(seg_index, np.int64)
    out = lab.subset(parent_lrow)
    from pllcli.labels.store import _str_array
    out.ids = _str_array(new_ids)
    # segments are not carried over (they are the items now); soft labels: the segment's own
    is_seg = seg_index >= 0
    out.clear_soft()
    keep_soft = np.flatnonzero(~is_seg & lab.has_soft[parent_lrow])
    if len(keep_soft):
        out.set_soft(keep_soft, lab.soft_matrix(parent_lrow[keep_soft]))
    rows = np.flatnonzero(is_seg)
    out.set_soft(rows, lab._dense(seg_index[rows], lab.segments_indptr, lab.segments_indices,
                                  lab.segments_values))
    out.segments_item = np.zeros(0, np.int32)
    out.segments_onset = np.zeros(0, np.float32)
    out.segments_offset = np.zeros(0, np.float32)
    out.segments_indptr = np.zeros(1, np.int64)
    out.segments_indices = np.zeros(0, np.int32)
    out.segments_values = np.zeros(0, np.float32)
    info = {"segments": int(is_seg.sum()), "clips_split": split, "clips_whole": whole,
            "segment_seconds": float(np.median(lengths)) if lengths else None}
    return (np.concatenate(parts, 0) if parts else feats[:0], np.asarray(new_offsets, np.int64),
            np.asarray(new_ids, dtype=object), out, np.arange(len(new_ids), dtype=np.int64), info)
