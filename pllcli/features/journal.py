"""featurize's resume journal: OUT.parts/part-NNNNNN.npys, one per finished chunk.

A part holds a chunk's features and, per file, the (size, mtime_ns) it had when it was
decoded; a rerun keeps a part only if its chunk still lists the same ids and paths and
every file still has that size and mtime (a replaced file, or a once corrupt one since
fixed, is decoded again). The folder is locked (fcntl.flock) for the whole run, so two
runs on one output cannot mix their parts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pllcli.errors import InputError
from pllcli.features.config import FeatureConfig
from pllcli.features.items import Item, Skip
from pllcli.io import write_json

log = logging.getLogger(__name__)

PART_SUFFIX = ".npys"       # journal part files: .npy records back to back (see write_part)
OWNER_FILE = "owner"        # pid of the run holding the lock
RUN_FILE = "run.json"


def file_stats(chunk: Sequence[Item]) -> list[list[int]]:
    """[size, mtime_ns] of each item's file ([-1, -1] if it cannot be stat'ed)."""
    out = []
    for it in chunk:
        try:
            st = os.stat(it.path)
            out.append([st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([-1, -1])
    return out


def chunk_key(chunk: Sequence[Item]) -> str:
    h = hashlib.sha1()
    for it in chunk:
        seg = "" if it.onset is None and it.offset is None else f"\t{it.onset}\t{it.offset}"
        h.update(f"{it.id}\t{it.path}{seg}\n".encode())
    return h.hexdigest()


def part_path(parts_dir: Path, k: int) -> Path:
    return parts_dir / f"part-{k:06d}{PART_SUFFIX}"


def write_part(parts_dir: Path, config: FeatureConfig, meta_cols: list[str], chunk: list[Item],
               res: dict[str, Any]) -> tuple:
    """Journal one finished chunk as OUT.parts/part-NNNNNN.npys (tmp + rename); return its block for add_block.

    A part is .npy records one after another (np.lib.format, no pickles): `info` (JSON, as
    uint8), ids, features, num_frames, duration, path (ids/paths as unicode arrays), then one
    array per metadata column. No zip container and no CRC pass: cheaper to write and to
    read back than an .npz (the parent reads back every part a worker wrote).
    """
    ok = res["ok"]
    skipped = [Skip(chunk[li].id, chunk[li].path, chunk[li].line, r, d).as_dict() for li, r, d in res["skipped"]]
    warns = [{"id": chunk[li].id, "path": chunk[li].path, "kind": kd, "detail": d} for li, kd, d in res["warnings"]]
    info = {"chunk": res["chunk"], "chunk_key": chunk_key(chunk), "feature_config_hash": config.hash(),
            "dtype": config.dtype, "meta_columns": meta_cols, "skipped": skipped, "warnings": warns,
            "audio_seconds": res["audio_seconds"], "stats": res["stats"]}
    block = ([chunk[li].id for li in ok], res["features"], res["num_frames"], res["durations"],
             [chunk[li].path for li in ok], {c: [chunk[li].meta.get(c, "") for li in ok] for c in meta_cols})
    arrays = [np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), _ustr(block[0]), block[1],
              np.asarray(block[2], np.int64), np.asarray(block[3], np.float64), _ustr(block[4])]
    arrays += [_ustr(block[5][c]) for c in meta_cols]
    final = part_path(parts_dir, res["chunk"])
    tmp = parts_dir / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            for a in arrays:
                np.lib.format.write_array(f, a, allow_pickle=False)
    except OSError as e:
        full = _disk_full_error(e, parts_dir)
        tmp.unlink(missing_ok=True)  # no half part left
        if full is not None:
            raise full from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    return block


_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")  # numpy's tofile when a write falls short


def _disk_full_error(e: OSError, folder: Path) -> OSError | None:
    """An ENOSPC OSError 'wrote N of M bytes' for a short write on a full filesystem, else None.
    (numpy reports a short write without an errno; the free space tells a full disk from other limits.)"""
    m = _SHORT_WRITE.search(str(e))
    if e.errno == errno.ENOSPC:
        return e
    if m is None:
        return None
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize >= (1 << 20):
        return None
    return OSError(errno.ENOSPC, f"wrote {m.group(2)} of {m.group(1)} bytes")


def _ustr(values) -> np.ndarray:
    a = np.asarray(list(values), dtype=str)
    return a if a.size else np.zeros(0, dtype="<U1")


def map_records(path: Path) -> list[np.ndarray]:
    """The .npy records of a part file as read-only arrays over one mmap of the file: no copy
    (the parent reads back every part a worker wrote, straight from the page cache).
    Raises ValueError for a damaged or truncated file.

    What np.load(mmap_mode="r") does for one .npy file, for records back to back: numpy's own
    header reader (np.lib.format), then np.frombuffer over the map (np.load maps one array per file).
    """
    import mmap
    fmt = np.lib.format
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError if empty
    out, pos, size = [], 0, len(mm)
    while pos < size:
        hdr = io.BytesIO(mm[pos:pos + 65536])  # a header is < 64 KiB
        version = fmt.read_magic(hdr)
        shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0)
                                 else fmt.read_array_header_2_0)(hdr)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: unexpected record layout")
        start = pos + hdr.tell()
        count = int(np.prod(shape, dtype=np.int64))
        a = np.frombuffer(mm, dtype=dtype, count=count, offset=start)  # ValueError if truncated
        out.append(a.reshape(shape))
        pos = start + count * dtype.itemsize
    return out


def load_part(path: Path) -> tuple[dict[str, Any], tuple] | None:
    """(info, block) of a journaled part, or None if it cannot be read (it is then redone)."""
    try:
        recs = map_records(path)
        info = json.loads(recs[0].tobytes())
        meta_cols = info["meta_columns"]
        if len(recs) != 6 + len(meta_cols):
            raise ValueError(f"{path}: {len(recs)} records")
        ids, feats, frames, durs, paths = recs[1:6]
        meta = dict(zip(meta_cols, recs[6:]))
    except Exception:  # noqa: BLE001 - a damaged part is simply redone
        return None
    return info, (ids, feats, frames, durs, paths, meta)


@dataclass
class Journal:
    """The parts folder of one run: chunks already done (their part info) and what was re-done."""
    folder: Path
    done: set[int] = field(default_factory=set)
    info: dict[int, dict[str, Any]] = field(default_factory=dict)
    chunks_redone: int = 0      # parts dropped because a file changed since it was written
    files_changed: int = 0


def open_journal(parts_dir: Path, out: str, run: dict[str, Any], chunks: list[list[Item]],
                 fresh: bool = False) -> Journal:
    """Lock (see lock_journal), then create or validate OUT.parts against this run's settings
    `run` and `chunks`; `fresh` discards what an earlier run left."""
    lock_journal(parts_dir, out)
    run_file = parts_dir / RUN_FILE
    try:
        old = json.loads(run_file.read_text())
    except (OSError, ValueError):
        old = None
    if fresh or old != run:
        if old is not None and not fresh:
            log.warning("%s: left by a run with other settings; starting afresh", parts_dir)
        _clear(parts_dir)
        write_json(run, run_file)
    for stray in parts_dir.glob(".*.tmp"):  # tmp files of a killed run
        stray.unlink(missing_ok=True)
    j = Journal(parts_dir)
    for p in sorted(parts_dir.glob(f"part-*{PART_SUFFIX}")):
        try:
            k = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        got = load_part(p) if k < len(chunks) else None
        if got is None or got[0].get("chunk_key") != chunk_key(chunks[k]) \
                or got[0].get("feature_config_hash") != run["feature_config_hash"]:
            p.unlink(missing_ok=True)
            continue
        changed = sum(a != b for a, b in zip(file_stats(chunks[k]), got[0].get("stats") or []))
        if changed or len(got[0].get("stats") or []) != len(chunks[k]):
            j.chunks_redone += 1
            j.files_changed += changed
            p.unlink(missing_ok=True)
            continue
        j.done.add(k)
        j.info[k] = got[0]
    return j


def _clear(parts_dir: Path) -> None:
    """Remove what a run left in the (locked) parts folder, keeping the folder and its owner file."""
    for p in parts_dir.iterdir():
        if p.name != OWNER_FILE:
            with contextlib.suppress(OSError):
                p.unlink()


_LOCKS: dict[str, int] = {}  # parts folder -> fd holding its flock


def lock_journal(parts_dir: Path, out: str) -> None:
    """Create OUT.parts and hold an exclusive flock on it until unlock_journal; InputError
    naming the other run's pid if it is held. Forked workers share the lock."""
    for _ in range(20):
        parts_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(parts_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
        except FileNotFoundError:  # removed by the run that just finished
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                pid = (parts_dir / OWNER_FILE).read_text().strip() or "?"
            except OSError:
                pid = "?"
            raise InputError(f"another pllcli run is writing {out} (pid {pid})") from None
        try:  # the holder may have removed the folder between our mkdir and flock
            same = os.stat(parts_dir).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        (parts_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        _LOCKS[str(parts_dir)] = fd
        return
    raise InputError(f"could not lock {parts_dir}", out)  # pragma: no cover - 20 lost races


def unlock_journal(parts_dir: Path, remove: bool = False) -> None:
    """Release the lock (after removing the folder if `remove`: the run is complete)."""
    if remove:
        shutil.rmtree(parts_dir, ignore_errors=True)
    fd = _LOCKS.pop(str(parts_dir), None)
    if fd is not None:
        os.close(fd)
