"""The label store: ambiguous labels for items joined to feature stores by id.

HDF5 layout (schema in docs/label_store.md). Every HDF5 dataset `a/b` is the
`LabelData` attribute `a_b` (`candidates/indptr` -> `candidates_indptr`,
`segments/onset` -> `segments_onset`); top-level datasets keep their names
(`ids`, `classes`, `clean`, `has_tags`, `has_soft`, `unlabeled`).

All sparse per-item data is CSR over classes: row i is
`indices[indptr[i]:indptr[i+1]]`, so 100k classes x 1M items stays small.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence

import numpy as np

from pllcli.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "pllcli-labels"
FORMAT_VERSION = 1
TASKS = ("single", "multi")

# dataset path -> (attribute, dtype kind) ; "str" = utf-8 strings
_SCHEMA: dict[str, tuple[str, Any]] = {
    "ids": ("ids", "str"),
    "classes": ("classes", "str"),
    "candidates/indptr": ("candidates_indptr", np.int64),
    "candidates/indices": ("candidates_indices", np.int32),
    "candidates/weights": ("candidates_weights", np.float32),  # optional
    "clean": ("clean", np.int32),
    "tags/indptr": ("tags_indptr", np.int64),
    "tags/indices": ("tags_indices", np.int32),
    "has_tags": ("has_tags", np.bool_),
    "soft/indptr": ("soft_indptr", np.int64),
    "soft/indices": ("soft_indices", np.int32),
    "soft/values": ("soft_values", np.float32),
    "has_soft": ("has_soft", np.bool_),
    "segments/item": ("segments_item", np.int32),
    "segments/onset": ("segments_onset", np.float32),
    "segments/offset": ("segments_offset", np.float32),
    "segments/indptr": ("segments_indptr", np.int64),
    "segments/indices": ("segments_indices", np.int32),
    "segments/values": ("segments_values", np.float32),
    "strong/item": ("strong_item", np.int32),
    "strong/onset": ("strong_onset", np.float32),
    "strong/offset": ("strong_offset", np.float32),
    "strong/label": ("strong_label", np.int32),
    "unlabeled": ("unlabeled", np.bool_),
}
_OPTIONAL = {"candidates/weights"}


def _empty_indptr(n: int) -> np.ndarray:
    return np.zeros(n + 1, np.int64)


def _str_array(values: Iterable) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


@dataclass
class LabelData:
    """Everything in a label store, as numpy arrays (see module docstring for names).

    Build one with `LabelData.new(ids, classes, ...)`; `validate()` checks shapes.
    """

    ids: np.ndarray
    classes: np.ndarray
    task: str = "single"
    candidates_indptr: np.ndarray | None = None
    candidates_indices: np.ndarray | None = None
    candidates_weights: np.ndarray | None = None
    clean: np.ndarray | None = None
    tags_indptr: np.ndarray | None = None
    tags_indices: np.ndarray | None = None
    has_tags: np.ndarray | None = None
    soft_indptr: np.ndarray | None = None
    soft_indices: np.ndarray | None = None
    soft_values: np.ndarray | None = None
    has_soft: np.ndarray | None = None
    segments_item: np.ndarray | None = None
    segments_onset: np.ndarray | None = None
    segments_offset: np.ndarray | None = None
    segments_indptr: np.ndarray | None = None
    segments_indices: np.ndarray | None = None
    segments_values: np.ndarray | None = None
    strong_item: np.ndarray | None = None
    strong_onset: np.ndarray | None = None
    strong_offset: np.ndarray | None = None
    strong_label: np.ndarray | None = None
    unlabeled: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)
    _index: dict | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------ building
    def __post_init__(self):
        self.ids = _str_array(self.ids)
        self.classes = _str_array(self.classes)
        n = len(self.ids)
        if self.task not in TASKS:
            raise InputError(f"task must be one of {TASKS}, got {self.task!r}", field="task")
        def fill(name, default):
            v = getattr(self, name)
            setattr(self, name, default if v is None else np.asarray(v, dtype=_dtype_of(name)))
        fill("candidates_indptr", _empty_indptr(n))
        fill("candidates_indices", np.zeros(0, np.int32))
        if self.candidates_weights is not None:
            self.candidates_weights = np.asarray(self.candidates_weights, np.float32)
        fill("clean", np.full(n, -1, np.int32))
        fill("tags_indptr", _empty_indptr(n))
        fill("tags_indices", np.zeros(0, np.int32))
        fill("has_tags", np.zeros(n, bool))
        fill("soft_indptr", _empty_indptr(n))
        fill("soft_indices", np.zeros(0, np.int32))
        fill("soft_values", np.zeros(0, np.float32))
        fill("has_soft", np.zeros(n, bool))
        for name in ("segments_item", "segments_indices", "strong_item", "strong_label"):
            fill(name, np.zeros(0, np.int32))
        for name in ("segments_onset", "segments_offset", "segments_values", "strong_onset", "strong_offset"):
            fill(name, np.zeros(0, np.float32))
        fill("segments_indptr", _empty_indptr(len(self.segments_item)))
        if self.unlabeled is None:
            self.unlabeled = self.compute_unlabeled()
        else:
            self.unlabeled = np.asarray(self.unlabeled, bool)
        self.provenance = dict(self.provenance or {})

    @classmethod
    def new(cls, ids: Sequence[str], classes: Sequence[str], *, task: str = "single",
            candidates: Sequence[Sequence[int] | None] | None = None,
            weights: Sequence[Sequence[float] | None] | None = None,
            clean: Sequence[int] | None = None,
            tags: Sequence[Sequence[int] | None] | None = None,
            strong: Sequence[tuple[int, float, float, int]] | None = None,
            provenance: dict | None = None) -> "LabelData":
        """Build from Python lists: `candidates[i]` a list of class indices (None/[] = no set),
        `weights[i]` matching floats (or None for all rows: uniform), `tags[i]` a list of class
        indices or None (not tagged; [] = tagged negative), `strong` (item, onset, offset, label)."""
        n = len(ids)
        kw: dict[str, Any] = {}
        if candidates is not None:
            if len(candidates) != n:
                raise InputError(f"candidates has {len(candidates)} rows for {n} ids", field="candidates")
            kw["candidates_indptr"], kw["candidates_indices"] = _csr([c or [] for c in candidates])
            if weights is not None:
                w = [list(wi) if wi is not None else [1.0 / max(1, len(c or []))] * len(c or [])
                     for wi, c in zip(weights, candidates)]
                kw["candidates_weights"] = np.asarray([x for row in w for x in row], np.float32)
        if tags is not None:
            kw["tags_indptr"], kw["tags_indices"] = _csr([t or [] for t in tags])
            kw["has_tags"] = np.asarray([t is not None for t in tags], bool)
        if strong:
            s = list(strong)
            kw["strong_item"] = np.asarray([e[0] for e in s], np.int32)
            kw["strong_onset"] = np.asarray([e[1] for e in s], np.float32)
            kw["strong_offset"] = np.asarray([e[2] for e in s], np.float32)
            kw["strong_label"] = np.asarray([e[3] for e in s], np.int32)
        if clean is not None:
            kw["clean"] = np.asarray(clean, np.int32)
        d = cls(ids=ids, classes=classes, task=task, provenance=provenance or {}, **kw)
        d.unlabeled = d.compute_unlabeled()
        d.validate()
        return d

    # ------------------------------------------------------------ basic views
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_items(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_candidates(self) -> np.ndarray:
        """(N,) bool: rows with a non-empty candidate set."""
        return np.diff(self.candidates_indptr) > 0

    @property
    def set_sizes(self) -> np.ndarray:
        return np.diff(self.candidates_indptr).astype(np.int64)

    def index(self, item_id: str) -> int:
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.ids)}
        try:
            return self._index[str(item_id)]
        except KeyError:
            raise InputError(f"id {item_id!r} is not in the label store", field="ids") from None

    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def candidates(self, row: int) -> np.ndarray:
        a, b = self.candidates_indptr[row], self.candidates_indptr[row + 1]
        return self.candidates_indices[a:b]

    def candidate_weights(self, row: int) -> np.ndarray:
        a, b = self.candidates_indptr[row], self.candidates_indptr[row + 1]
        if self.candidates_weights is None:
            return np.ones(b - a, np.float32)
        return self.candidates_weights[a:b]

    def tags(self, row: int) -> np.ndarray:
        return self.tags_indices[self.tags_indptr[row]:self.tags_indptr[row + 1]]

    def soft(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.soft_indptr[row], self.soft_indptr[row + 1]
        return self.soft_indices[a:b], self.soft_values[a:b]

    def compute_unlabeled(self) -> np.ndarray:
        """Items with neither candidates, a clean label, tags nor soft labels."""
        return ~(self.has_candidates | (self.clean >= 0) | self.has_tags | self.has_soft)

    # ------------------------------------------------------------ dense batches
    def _dense(self, rows, indptr, indices, values) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.zeros((len(rows), self.num_classes), np.float32)
        if len(rows) == 0:
            return out
        starts, ends = indptr[rows], indptr[rows + 1]
        lens = ends - starts
        r = np.repeat(np.arange(len(rows)), lens)
        flat = _ranges(starts, lens)
        cols = indices[flat]
        out[r, cols] = 1.0 if values is None else values[flat]
        return out

    def candidate_matrix(self, rows) -> np.ndarray:
        """(B, C) float32: the candidate weights (or 1 for members), 0 outside the set."""
        return self._dense(rows, self.candidates_indptr, self.candidates_indices, self.candidates_weights)

    def tag_matrix(self, rows) -> np.ndarray:
        """(B, C) float32 multi-hot tags (all zero for untagged and negative rows; see has_tags)."""
        return self._dense(rows, self.tags_indptr, self.tags_indices, None)

    def soft_matrix(self, rows) -> np.ndarray:
        """(B, C) float32 clip-level soft labels (zero rows where has_soft is False)."""
        return self._dense(rows, self.soft_indptr, self.soft_indices, self.soft_values)

    def segments_of(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(onset (S,), offset (S,), dense values (S, C)) of item `row`'s soft segments."""
        sel = np.flatnonzero(self.segments_item == row)
        vals = self._dense(sel, self.segments_indptr, self.segments_indices, self.segments_values)
        return self.segments_onset[sel], self.segments_offset[sel], vals

    def strong_of(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sel = self.strong_item == row
        return self.strong_onset[sel], self.strong_offset[sel], self.strong_label[sel]

    # ------------------------------------------------------------ soft labels (pseudo-label)
    def set_soft(self, rows, values, *, indices=None, threshold: float = 0.0,
                 top_k: int | None = None) -> "LabelData":
        """Add or replace clip-level soft labels of `rows` (in place; returns self).

        `values` is dense (B, C), or with `indices` given, (B, K) values for the (B, K) class
        indices (e.g. a top-k). Entries <= `threshold` are dropped; `top_k` keeps the k largest.
        Rows get has_soft=True (even when every entry was dropped) and are no longer unlabeled.
        """
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        values = np.asarray(values, np.float32)
        if values.ndim != 2 or values.shape[0] != len(rows):
            raise InputError(f"soft values must be (B, C) with B={len(rows)}, got {values.shape}", field="soft")
        if indices is None:
            if values.shape[1] != self.num_classes:
                raise InputError(f"soft values have {values.shape[1]} columns, store has "
                                 f"{self.num_classes} classes", field="soft")
            idx = np.broadcast_to(np.arange(self.num_classes), values.shape)
        else:
            idx = np.asarray(indices, np.int64)
            if idx.shape != values.shape:
                raise InputError("soft indices and values differ in shape", field="soft")
        if len(np.unique(rows)) != len(rows) or (len(rows) and (rows.min() < 0 or rows.max() >= len(self))):
            raise InputError("soft rows must be unique and inside the store", field="soft")
        new_rows = [_sparsify(idx[i], values[i], threshold, top_k) for i in range(len(rows))]
        self.soft_indptr, self.soft_indices, self.soft_values = _replace_rows(
            self.soft_indptr, self.soft_indices, self.soft_values, rows, new_rows)
        self.has_soft[rows] = True
        self.unlabeled = self.compute_unlabeled()
        return self

    def clear_soft(self) -> "LabelData":
        n = len(self)
        self.soft_indptr, self.soft_indices = _empty_indptr(n), np.zeros(0, np.int32)
        self.soft_values, self.has_soft = np.zeros(0, np.float32), np.zeros(n, bool)
        self.unlabeled = self.compute_unlabeled()
        return self

    def set_segments(self, rows, items_segments: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                     threshold: float = 0.0, top_k: int | None = None) -> "LabelData":
        """Replace the segment-level soft labels of `rows` (in place; returns self).

        `items_segments[i] = (onset (S,), offset (S,), values (S, C))` for item `rows[i]`.
        """
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        if len(items_segments) != len(rows):
            raise InputError("one (onset, offset, values) triple per row is needed", field="segments")
        keep = ~np.isin(self.segments_item, rows)
        old = [(int(self.segments_item[s]), float(self.segments_onset[s]), float(self.segments_offset[s]),
                self.segments_indices[self.segments_indptr[s]:self.segments_indptr[s + 1]],
                self.segments_values[self.segments_indptr[s]:self.segments_indptr[s + 1]])
               for s in np.flatnonzero(keep)]
        new = []
        for r, (on, off, vals) in zip(rows, items_segments):
            on, off = np.asarray(on, np.float32).ravel(), np.asarray(off, np.float32).ravel()
            vals = np.asarray(vals, np.float32).reshape(len(on), -1)
            if vals.shape[1] != self.num_classes or len(off) != len(on):
                raise InputError(f"segments of row {r}: need onset (S,), offset (S,), values (S, "
                                 f"{self.num_classes})", field="segments")
            if np.any(off < on):
                raise InputError(f"segments of row {r}: offset before onset", field="segments")
            cols = np.arange(self.num_classes)
            for s in range(len(on)):
                i, v = _sparsify(cols, vals[s], threshold, top_k)
                new.append((int(r), float(on[s]), float(off[s]), i, v))
        allseg = sorted(old + new, key=lambda e: (e[0], e[1], e[2]))
        self.segments_item = np.asarray([e[0] for e in allseg], np.int32)
        self.segments_onset = np.asarray([e[1] for e in allseg], np.float32)
        self.segments_offset = np.asarray([e[2] for e in allseg], np.float32)
        self.segments_indptr, self.segments_indices = _csr([e[3] for e in allseg])
        self.segments_values = (np.concatenate([e[4] for e in allseg]).astype(np.float32)
                                if allseg else np.zeros(0, np.float32))
        return self

    # ------------------------------------------------------------ subsets
    def subset(self, rows) -> "LabelData":
        """A new LabelData with only `rows` (in that order); segments and strong events follow."""
        rows = np.asarray(rows, np.int64)
        remap = np.full(len(self), -1, np.int64)
        remap[rows] = np.arange(len(rows))
        def take(indptr, indices, values=None):
            return _take_rows(indptr, indices, values, rows)
        ci, cx, cw = take(self.candidates_indptr, self.candidates_indices, self.candidates_weights)
        ti, tx, _ = take(self.tags_indptr, self.tags_indices)
        si, sx, sv = take(self.soft_indptr, self.soft_indices, self.soft_values)
        segsel = np.flatnonzero(remap[self.segments_item] >= 0) if len(self.segments_item) else np.zeros(0, np.int64)
        segsel = segsel[np.argsort(remap[self.segments_item[segsel]], kind="stable")]
        gi, gx, gv = _take_rows(self.segments_indptr, self.segments_indices, self.segments_values, segsel)
        stsel = np.flatnonzero(remap[self.strong_item] >= 0) if len(self.strong_item) else np.zeros(0, np.int64)
        return LabelData(
            ids=self.ids[rows], classes=self.classes, task=self.task,
            candidates_indptr=ci, candidates_indices=cx, candidates_weights=cw,
            clean=self.clean[rows], tags_indptr=ti, tags_indices=tx, has_tags=self.has_tags[rows],
            soft_indptr=si, soft_indices=sx, soft_values=sv, has_soft=self.has_soft[rows],
            segments_item=remap[self.segments_item[segsel]], segments_onset=self.segments_onset[segsel],
            segments_offset=self.segments_offset[segsel], segments_indptr=gi, segments_indices=gx,
            segments_values=gv,
            strong_item=remap[self.strong_item[stsel]], strong_onset=self.strong_onset[stsel],
            strong_offset=self.strong_offset[stsel], strong_label=self.strong_label[stsel],
            unlabeled=self.unlabeled[rows], provenance=self.provenance)

    # ------------------------------------------------------------ checks
    def validate(self, where: str | None = None) -> None:
        """Raise InputError (naming `where` and the field) if the arrays do not fit together."""
        n, c = len(self.ids), len(self.classes)
        def bad(msg, fld):
            raise InputError(msg, where, field=fld)
        if len(set(self.ids.tolist())) != n:
            seen, dup = set(), None
            for s in self.ids:
                if s in seen:
                    dup = s
                    break
                seen.add(s)
            bad(f"duplicate id {dup!r}", "ids")
        if len(set(self.classes.tolist())) != c:
            bad("duplicate class names", "classes")
        for name, rows_n, idx_name, val_name in (
                ("candidates", n, "candidates_indices", "candidates_weights"),
                ("tags", n, "tags_indices", None),
                ("soft", n, "soft_indices", "soft_values"),
                ("segments", len(self.segments_item), "segments_indices", "segments_values")):
            ip = getattr(self, f"{name}_indptr")
            idx = getattr(self, idx_name)
            if ip.shape != (rows_n + 1,) or ip[0] != 0 or np.any(np.diff(ip) < 0) or ip[-1] != len(idx):
                bad(f"indptr must be ({rows_n + 1},) non-decreasing from 0 to {len(idx)}", f"{name}/indptr")
            if len(idx) and (idx.min() < 0 or idx.max() >= c):
                bad(f"class index outside 0..{c - 1}", f"{name}/indices")
            if val_name is not None:
                v = getattr(self, val_name)
                if v is not None and len(v) != len(idx):
                    bad(f"{len(v)} values for {len(idx)} indices", val_name.replace("_", "/", 1))
        for name in ("clean", "has_tags", "has_soft", "unlabeled"):
            if getattr(self, name).shape != (n,):
                bad(f"must have shape ({n},)", name)
        if len(self.clean) and (self.clean.max(initial=-1) >= c or self.clean.min(initial=-1) < -1):
            bad("clean label outside -1..C-1", "clean")
        for grp, cols in (("segments", ("item", "onset", "offset")), ("strong", ("item", "onset", "offset", "label"))):
            arrs = [getattr(self, f"{grp}_{k}") for k in cols]
            if len({len(a) for a in arrs}) != 1:
                bad("arrays differ in length", grp)
            item = arrs[0]
            if len(item) and (item.min() < 0 or item.max() >= n):
                bad("item index outside the store", f"{grp}/item")
        if len(self.strong_label) and (self.strong_label.min() < 0 or self.strong_label.max() >= c):
            bad("label outside the classes", "strong/label")


def _dtype_of(attr: str):
    for _, (a, dt) in _SCHEMA.items():
        if a == attr:
            return None if dt == "str" else dt
    return None


def _csr(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indices = (np.concatenate([np.asarray(r, np.int64) for r in rows]).astype(np.int32)
               if len(rows) and indptr[-1] else np.zeros(0, np.int32))
    return indptr, indices


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), vectorised."""
    starts, lens = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return offs + np.arange(total)


def _take_rows(indptr, indices, values, rows):
    rows = np.asarray(rows, np.int64)
    lens = indptr[rows + 1] - indptr[rows]
    flat = _ranges(indptr[rows], lens)
    ip = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return ip, indices[flat], (None if values is None else values[flat])


def _sparsify(idx, vals, threshold, top_k):
    idx, vals = np.asarray(idx), np.asarray(vals, np.float32)
    keep = vals > threshold
    idx, vals = idx[keep], vals[keep]
    if top_k is not None and len(vals) > top_k:
        o = np.argsort(-vals, kind="stable")[:top_k]
        idx, vals = idx[o], vals[o]
    o = np.argsort(idx, kind="stable")
    return idx[o].astype(np.int32), vals[o]


def _replace_rows(indptr, indices, values, rows, new_rows):
    """Rebuild a CSR with `rows` replaced by `new_rows` [(indices, values)]."""
    n = len(indptr) - 1
    lens = np.diff(indptr).copy()
    repl = {int(r): nr for r, nr in zip(rows, new_rows)}
    for r, (i, _) in repl.items():
        lens[r] = len(i)
    new_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    new_idx = np.zeros(int(new_ptr[-1]), np.int32)
    new_val = np.zeros(int(new_ptr[-1]), np.float32)
    keep = np.ones(n, bool)
    keep[list(repl)] = False
    kr = np.flatnonzero(keep)
    src = _ranges(indptr[kr], np.diff(indptr)[kr])
    dst = _ranges(new_ptr[kr], np.diff(indptr)[kr])
    new_idx[dst], new_val[dst] = indices[src], values[src]
    for r, (i, v) in repl.items():
        new_idx[new_ptr[r]:new_ptr[r + 1]] = i
        new_val[new_ptr[r]:new_ptr[r + 1]] = v
    return new_ptr, new_idx, new_val


# ---------------------------------------------------------------- files

def write_label_store(path: str | os.PathLike, data: LabelData, provenance: dict | None = None) -> None:
    """Validate `data` and write it to `path` atomically (HDF5)."""
    import h5py

    from pllcli import __version__
    from pllcli.io import _json_default, atomic_path
    data.validate()
    prov = provenance if provenance is not None else data.provenance
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["task"] = data.task
            f.attrs["provenance"] = json.dumps(prov or {}, default=_json_default)
            f.attrs["pllcli_version"] = __version__
            sdt = h5py.string_dtype("utf-8")
            for key, (attr, dt) in _SCHEMA.items():
                v = getattr(data, attr)
                if v is None:
                    continue
                if dt == "str":
                    f.create_dataset(key, data=np.asarray([str(s) for s in v], dtype=object), dtype=sdt)
                else:
                    f.create_dataset(key, data=np.asarray(v, dtype=dt))
    data.provenance = dict(prov or {})


def read_label_store(path: str | os.PathLike) -> LabelData:
    """Read a whole label store; InputError naming the file and field if it is not one."""
    import h5py
    path = str(path)
    if not os.path.exists(path):
        raise InputError("no such file", path)
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise InputError("not an HDF5 file (expected a pllcli label store)", path) from None
    with f:
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            raise InputError(f"not a label store (format={fmt!r}, expected {FORMAT!r})", path, field="format")
        ver = int(f.attrs.get("format_version", -1))
        if ver > FORMAT_VERSION:
            raise InputError(f"format_version {ver} is newer than this pllcli supports ({FORMAT_VERSION})",
                             path, field="format_version")
        kw: dict[str, Any] = {}
        for key, (attr, dt) in _SCHEMA.items():
            if key not in f:
                if key in ("ids", "classes"):
                    raise InputError("dataset missing", path, field=key)
                continue
            if dt == "str":
                kw[attr] = np.asarray(f[key].asstr()[()], dtype=object)
            else:
                kw[attr] = np.asarray(f[key][()], dtype=dt)
        task = f.attrs.get("task", "single")
        task = task.decode() if isinstance(task, bytes) else str(task)
        try:
            prov = json.loads(f.attrs.get("provenance", "{}"))
        except (json.JSONDecodeError, TypeError):
            raise InputError("provenance attribute is not JSON", path, field="provenance") from None
    data = LabelData(task=task, provenance=prov, **kw)
    data.validate(where=path)
    return data


def LabelStore(path: str | os.PathLike) -> LabelData:  # noqa: N802 - contract name
    """Open a label store read-only: the arrays as numpy attributes (a LabelData)."""
    return read_label_store(path)


def align_ids(feature_ids: Sequence[str], label_ids: Sequence[str], *, allow_missing: bool = False,
              what: str = "label store") -> np.ndarray:
    """For each feature id, its row in the label store (int64).

    Raises InputError with the count and a few example ids when some feature ids have no
    labels; with `allow_missing=True` those get -1 instead.
    """
    index = {str(s): i for i, s in enumerate(label_ids)}
    out = np.fromiter((index.get(str(s), -1) for s in feature_ids), np.int64, count=len(feature_ids))
    missing = np.flatnonzero(out < 0)
    if len(missing) and not allow_missing:
        ex = ", ".join(repr(str(feature_ids[i])) for i in missing[:5])
        raise InputError(f"{len(missing)} of {len(out)} feature ids are not in the {what} "
                         f"(e.g. {ex})", field="ids")
    return out


def cover_features(lab: LabelData, feature_ids: Sequence[str], where: str = "label store"
                   ) -> tuple[LabelData, np.ndarray, int]:
    """(labels, label_rows (N,) int64, added): `lab` extended so that it covers every feature id.

    Feature ids missing from `lab` are appended as unlabeled items (no candidates, clean -1, no
    tags or soft labels), so `label_rows[i]` is the row of `feature_ids[i]` in the returned
    labels; `added` counts them (logged). `lab` itself is not changed; with nothing missing it
    is returned as is. Raises InputError (naming `where`) when no feature id is in `lab`.
    """
    rows = align_ids(feature_ids, lab.ids, allow_missing=True, what=where)
    missing = np.flatnonzero(rows < 0)
    if len(missing) == 0:
        return lab, rows, 0
    if len(missing) == len(rows):
        ex = ", ".join(repr(str(feature_ids[i])) for i in missing[:5])
        raise InputError(f"none of the {len(rows)} feature ids are in the {where} (e.g. {ex})", field="ids")
    extra = LabelData.new([str(feature_ids[i]) for i in missing], lab.classes, task=lab.task)
    covered = merge_label_data([lab, extra], [where, "feature ids"])
    covered.provenance = dict(lab.provenance)
    rows[missing] = len(lab) + np.arange(len(missing))
    log.info("%d of %d feature ids are not in the %s: treated as unlabeled", len(missing), len(rows), where)
    return covered, rows, len(missing)


def describe(path: str | os.PathLike) -> dict:
    """Summary figures for `pllcli info`."""
    d = read_label_store(path)
    sizes = d.set_sizes
    has = sizes > 0
    return {
        "format": FORMAT,
        "path": str(path),
        "task": d.task,
        "items": len(d),
        "classes": d.num_classes,
        "class_examples": [str(c) for c in d.classes[:5]],
        "with_candidates": int(has.sum()),
        "mean_set_size": float(sizes[has].mean()) if has.any() else 0.0,
        "max_set_size": int(sizes.max()) if len(sizes) else 0,
        "weights": d.candidates_weights is not None,
        "clean": int((d.clean >= 0).sum()),
        "tagged": int(d.has_tags.sum()),
        "negative_clips": int((d.has_tags & (np.diff(d.tags_indptr) == 0)).sum()),
        "soft": int(d.has_soft.sum()),
        "segments": int(len(d.segments_item)),
        "strong_events": int(len(d.strong_item)),
        "unlabeled": int(d.unlabeled.sum()),
        "provenance": {k: d.provenance.get(k) for k in ("command", "time", "pllcli_version", "params")
                       if k in d.provenance},
    }


def merge_label_data(parts: Sequence[LabelData], where: Sequence[str] | None = None) -> LabelData:
    """Concatenate LabelData over disjoint ids with identical classes and task."""
    if not parts:
        raise InputError("nothing to merge", field="parts")
    names = list(where) if where is not None else [f"part {i}" for i in range(len(parts))]
    first = parts[0]
    for p, nm in zip(parts[1:], names[1:]):
        if p.task != first.task:
            raise InputError(f"task {p.task!r} differs from {first.task!r} in {names[0]}", nm, field="task")
        if len(p.classes) != len(first.classes) or np.any(p.classes != first.classes):
            raise InputError(f"classes differ from those in {names[0]}", nm, field="classes")
    weighted = [p.candidates_weights is not None for p in parts]
    seen: dict[str, str] = {}
    for p, nm in zip(parts, names):
        for s in p.ids:
            if s in seen:
                raise InputError(f"id {s!r} is also in {seen[s]} (parts must be disjoint)", nm, field="ids")
            seen[s] = nm
    offs = np.cumsum([0] + [len(p) for p in parts])

    def cat_csr(name, val):
        ptrs, idxs, vals = [np.zeros(1, np.int64)], [], []
        base = 0
        for p in parts:
            ip = getattr(p, f"{name}_indptr")
            ptrs.append(ip[1:] + base)
            base += ip[-1]
            idxs.append(getattr(p, f"{name}_indices"))
            if val is not None:
                v = getattr(p, val)
                if v is None:  # uniform weights for an unweighted part
                    v = np.repeat(1.0 / np.maximum(np.diff(ip), 1), np.diff(ip)).astype(np.float32)
                vals.append(v)
        return (np.concatenate(ptrs), np.concatenate(idxs).astype(np.int32),
                np.concatenate(vals).astype(np.float32) if val is not None else None)

    ci, cx, cw = cat_csr("candidates", "candidates_weights" if any(weighted) else None)
    ti, tx, _ = cat_csr("tags", None)
    si, sx, sv = cat_csr("soft", "soft_values")
    gi, gx, gv = cat_csr("segments", "segments_values")
    cat = lambda a, dt=None: np.concatenate([getattr(p, a) for p in parts])  # noqa: E731
    return LabelData(
        ids=np.concatenate([p.ids for p in parts]), classes=first.classes, task=first.task,
        candidates_indptr=ci, candidates_indices=cx, candidates_weights=cw,
        clean=cat("clean"), tags_indptr=ti, tags_indices=tx, has_tags=cat("has_tags"),
        soft_indptr=si, soft_indices=sx, soft_values=sv, has_soft=cat("has_soft"),
        segments_item=np.concatenate([p.segments_item + o for p, o in zip(parts, offs)]),
        segments_onset=cat("segments_onset"), segments_offset=cat("segments_offset"),
        segments_indptr=gi, segments_indices=gx, segments_values=gv,
        strong_item=np.concatenate([p.strong_item + o for p, o in zip(parts, offs)]),
        strong_onset=cat("strong_onset"), strong_offset=cat("strong_offset"), strong_label=cat("strong_label"),
        unlabeled=cat("unlabeled"),
        provenance={"merged_from": [dict(p.provenance, part=nm) for p, nm in zip(parts, names)]})


def merge_label_stores(out: str | os.PathLike, parts: Sequence[str | os.PathLike],
                       provenance: dict | None = None) -> LabelData:
    """Merge label stores over disjoint ids with identical classes into `out` (atomic)."""
    datas = [read_label_store(p) for p in parts]
    merged = merge_label_data(datas, [str(p) for p in parts])
    prov = dict(provenance or {})
    prov["merged_from"] = merged.provenance["merged_from"]
    write_label_store(out, merged, prov)
    return merged
