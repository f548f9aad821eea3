"""featurize's input listing: manifests, directory scans, Kaldi data dirs, lhotse manifests
-> `Item`s; duplicate ids; chunks and shards."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from pllcli.audio import AUDIO_EXTENSIONS
from pllcli.errors import InputError
from pllcli.features.items import Item, Skip
from pllcli.features.manifests import KALDI_SCP, is_lhotse_dir, is_lhotse_file, read_kaldi_dir, read_lhotse
from pllcli.io import STDIO, Table

__all__ = ["Item", "Skip", "MIN_TAIL_CHUNK", "read_manifest", "scan_directory", "resolve_inputs",
           "duplicate_flags", "chunk_bounds", "shard_slice"]

MIN_TAIL_CHUNK = 16          # smallest tail piece: ~2 ms of work for 0.5 s clips


def read_manifest(src: str) -> tuple[list[Item], list[str]]:
    """Rows of a CSV/TSV/JSONL manifest ('-' = stdin) -> (items, meta columns). Relative paths
    resolve against the manifest's folder (the working directory for stdin)."""
    t = Table(src, required=["id", "path"])
    base = str(Path.cwd() if src == STDIO else Path(src).resolve().parent)
    meta_cols = [c for c in t.columns if c not in ("id", "path")]
    join, normpath = os.path.join, os.path.normpath
    isabs = (lambda p: p[:1] == "/") if os.sep == "/" and not os.altsep else os.path.isabs  # 5x cheaper on POSIX
    if t.format == "jsonl":
        rows = ((ln, [row.get(c, "") for c in t.columns]) for ln, row in t)
    else:
        rows = t.csv_values()  # plain lists: ~3x cheaper than a dict per row
    i_id, i_path = t.columns.index("id"), t.columns.index("path")
    i_meta = [t.columns.index(c) for c in meta_cols]
    items = []
    for ln, values in rows:
        iid, p = values[i_id], values[i_path]
        if not iid:
            raise InputError("empty id", t.name, line=ln, field="id")
        if not p:
            raise InputError("empty path", t.name, line=ln, field="path")
        items.append(Item(iid, p if isabs(p) else normpath(join(base, p)), ln,
                          {c: values[i] for c, i in zip(meta_cols, i_meta)} if i_meta else {}))
    return items, meta_cols


def scan_directory(root: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[Item]:
    """Audio files under `root` (recursive, sorted by relative path); id = relative path without extension."""
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    rootp = os.path.abspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(rootp):
        rel_dir = os.path.relpath(dirpath, rootp)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for fn in filenames:
            stem, e = os.path.splitext(fn)
            if e.lower() in exts:
                found.append((rel_dir + fn, rel_dir + stem, os.path.join(dirpath, fn)))
    found.sort()
    return [Item(iid, full, 0) for _, iid, full in found]


def is_audio_file(src: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> bool:
    """True if `src` is an existing file whose extension is one of `extensions` (a single audio input)."""
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    return src != "-" and os.path.splitext(src)[1].lower() in exts and os.path.isfile(src)


def resolve_inputs(src: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> tuple[list[Item], list[str], str]:
    """(items, meta columns, kind) for a manifest file, '-' (stdin manifest), a Kaldi data
    directory, a lhotse manifest (file or folder), a directory of audio files or one audio
    file (id = its name without extension).
    kind: "manifest", "kaldi", "lhotse", "directory" or "file"."""
    if is_audio_file(src, extensions):
        return [Item(Path(src).stem, os.path.abspath(src), 0)], [], "file"
    if src != "-" and Path(src).is_dir() and (Path(src) / KALDI_SCP).is_file():
        return (*read_kaldi_dir(src), "kaldi")
    if src != "-" and Path(src).is_dir() and is_lhotse_dir(src):
        return (*read_lhotse(src), "lhotse")
    if src != "-" and Path(src).is_file() and is_lhotse_file(src):
        return (*read_lhotse(src), "lhotse")
    if src != "-" and Path(src).is_dir():
        items = scan_directory(src, extensions)
        if not items:
            raise InputError(f"no audio files ({', '.join(extensions)}) found in directory", src)
        return items, [], "directory"
    if src != "-" and not Path(src).exists():
        raise InputError("no such manifest file or directory", src)
    items, cols = read_manifest(src)
    return items, cols, "manifest"


def duplicate_flags(items: list[Item]) -> list[Skip | None]:
    """Per item: None for the first use of its id, a duplicate_id Skip for later ones."""
    first: dict[str, Item] = {}
    flags: list[Skip | None] = []
    for it in items:
        f = first.setdefault(it.id, it)
        if f is it:
            flags.append(None)
        else:
            where = f"line {f.line}" if f.line else f.path
            flags.append(Skip(it.id, it.path, it.line, "duplicate_id", f"id first used at {where}"))
    return flags


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of n items: `size` items each, except that the last 2 * size
    or fewer are cut into shrinking pieces (a third of what is left, at least min(size,
    MIN_TAIL_CHUNK)). With several processes taking chunks in turn, the last chunks are then
    short, so the processes finish within a few ms of each other. Depends on n and size only:
    a resumed run finds the same chunks whatever its --jobs."""
    bounds, a = [], 0
    while n - a > 2 * size:
        bounds.append((a, a + size))
        a += size
    floor = min(size, MIN_TAIL_CHUNK)
    while a < n:
        b = a + min(n - a, max(floor, -(-(n - a) // 3)))
        if n - b < floor and n - a <= size:  # no crumb of a last piece
            b = n
        bounds.append((a, b))
        a = b
    return bounds


def shard_slice(n: int, shard: tuple[int, int]) -> slice:
    i, k = shard
    return slice(i * n // k, (i + 1) * n // k)


