"""Weak tags: `id,labels` tables ('a;b', empty = no event) and CSR tags -> multi-hot matrices."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pllcli.errors import InputError
from pllcli.io import Table


def split_tags(cell: str, sep: str = ";") -> list[str]:
    """'dog; cat;' -> ['dog', 'cat'] (blank parts dropped)."""
    return [x.strip() for x in cell.split(sep) if x.strip()]


def read_tags(path, classes: Sequence[str] | None = None, sep: str = ";",
              column: str = "labels") -> tuple[list[str], np.ndarray, list[str]]:
    """Read `id,labels` -> (ids, multi-hot (N, C) float32, classes).

    With `classes` given, a tag naming another class is an InputError naming the line;
    otherwise the classes are the sorted union of the tags. Duplicate ids are an error.
    """
    t = Table(path, required=["id", column])
    rows = [(ln, row["id"], split_tags(row[column], sep)) for ln, row in t.unique_rows("id")]
    if classes is None:
        classes = sorted({x for _, _, tags in rows for x in tags})
    classes = [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    Y = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for r, (ln, cid, tags) in enumerate(rows):
        for x in tags:
            if x not in index:
                shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
                raise InputError(f"tag {x!r} of {cid!r} is not a known class (classes: {shown})",
                                 t.name, line=ln, field=column)
            Y[r, index[x]] = 1.0
    return [cid for _, cid, _ in rows], Y, classes


def tags_matrix(indptr: np.ndarray, indices: np.ndarray, num_classes: int,
                rows: Sequence[int] | None = None) -> np.ndarray:
    """CSR tags (a label store's tags/indptr, tags/indices) -> multi-hot (N or len(rows), C)."""
    indptr = np.asarray(indptr)
    rows = np.arange(len(indptr) - 1) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.zeros((len(rows), num_classes), dtype=np.float32)
    for k, r in enumerate(rows):
        out[k, np.asarray(indices[indptr[r]:indptr[r + 1]], dtype=np.int64)] = 1.0
    return out


def positive_clips(tags: np.ndarray) -> np.ndarray:
    """WHEN targets: a clip is positive when it has any tag."""
    return np.asarray(tags).reshape(len(tags), -1).max(axis=1) > 0.5
