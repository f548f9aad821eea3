"""`featurize`: audio files -> feature store, batched, parallel, sharded, resumable.

Pipeline: the input list (manifest or directory) is cut into chunks of `chunk_size`
files by position. A process decodes a chunk, sorts its clips by length, pads similar
lengths into batches for the frontend, and journals the chunk's features, in chunk order,
as `OUT.parts/part-NNNNNN.npys` (tmp + rename). With --jobs N the parent and N-1 forked
workers take chunks from one shared counter; workers send back only a small summary and
the parent, the only writer of the output, reads their parts back from the journal. The
output is assembled in chunk order while later chunks are still computing. A rerun keeps
the parts whose chunk still holds the same ids and paths and skips them. At the end the
output's temporary file is renamed onto OUT and the parts folder is removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pllcli.audio import AUDIO_EXTENSIONS, SKIP_REASONS, AudioSkip, load_audio
from pllcli.errors import InputError, StrictModeError, UsageError
from pllcli.features.config import FeatureConfig

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256          # files per chunk (~30 ms of work); the last ones are cut smaller (chunk_bounds)
MIN_TAIL_CHUNK = 16          # smallest tail piece: ~2 ms of work for 0.5 s clips
BATCH_SAMPLES = 1 << 15     # padded samples per frontend batch (~4 s at 8 kHz: its frames stay in L2 cache)
BATCH_MAX_ITEMS = 128
PART_SUFFIX = ".npys"       # journal part files: .npy records back to back (see _write_part)
_DIE_AFTER = "PLLCLI_TEST_KILL_AFTER_CHUNKS"   # test hook: "N" SIGKILLs the parent after N chunks,
#                                               "N:INT" sends SIGINT to its process group (Ctrl-C)


@dataclass(slots=True)
class Item:
    id: str
    path: str          # resolved path
    line: int          # manifest line (0 for directory scans)
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Skip:
    id: str
    path: str
    line: int
    reason: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "line": self.line, "reason": self.reason, "detail": self.detail}


# -------------------------------------------------------------------- inputs

def read_manifest(src: str) -> tuple[list[Item], list[str]]:
    """Rows of a CSV/TSV/JSONL manifest ('-' = stdin) -> (items, meta columns). Relative paths
    resolve against the manifest's folder (the working directory for stdin)."""
    from pllcli.io import STDIO, Table
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


def resolve_inputs(src: str, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> tuple[list[Item], list[str], str]:
    """(items, meta columns, kind) for a manifest file, '-' (stdin manifest) or a directory."""
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


# -------------------------------------------------------------------- worker side

_FRONTENDS: dict[str, Any] = {}


def _frontend(config: FeatureConfig):
    key = config.to_json()
    fe = _FRONTENDS.get(key)
    if fe is None:
        fe = _FRONTENDS[key] = config.make_frontend()
    return fe


def _warm_up(config: FeatureConfig) -> None:
    """Build the frontend and run it once (lazy imports, FFT plans) so forked workers inherit it all."""
    compute_features([np.zeros(2 * config.frame_length, dtype=np.float32)], config)


def stacked_features(waves: Sequence[np.ndarray], config: FeatureConfig, batch_samples: int = BATCH_SAMPLES,
                     max_items: int = BATCH_MAX_ITEMS) -> tuple[np.ndarray, np.ndarray]:
    """Features of many clips stacked in input order: ((sum T_i, F) float32, T_i (N,) int64).

    Clips are sorted by length and zero-padded into batches of similar length; with
    snip-edges framing the padding never changes a clip's own frames.
    """
    import torch
    fe = _frontend(config)
    lens = np.fromiter((len(w) for w in waves), dtype=np.int64, count=len(waves))
    fl, hop = config.frame_length, config.hop_length
    frames = np.where(lens <= fl, 1, 1 + (lens - fl) // hop)  # config.num_frames, vectorised
    starts = np.concatenate([[0], np.cumsum(frames)]).tolist()
    nfr = frames.tolist()
    out = torch.empty((starts[-1], config.n_mels), dtype=torch.float32)
    order = np.argsort(lens, kind="stable").tolist()
    padded = np.maximum(lens, fl).tolist()  # a batch is at least one frame long
    n, i = len(order), 0
    with torch.inference_mode():
        while i < n:
            # grow the batch while the padded size (count x longest) stays within budget
            j = min(n, i + max_items, i + max(1, batch_samples // padded[order[i]]))
            while j > i + 1 and (j - i) * padded[order[j - 1]] > batch_samples:
                j -= 1
            idx = order[i:j]
            batch = np.zeros((len(idx), padded[idx[-1]]), dtype=np.float32)
            for r, k in enumerate(idx):
                batch[r, :len(waves[k])] = waves[k]
            power = fe.power(torch.from_numpy(batch))  # (b, T, n_freq)
            for r, k in enumerate(idx):
                # the mel matmul runs per clip on exactly its own frames: bitwise the same
                # result whatever batch the clip landed in (shards, chunk sizes, jobs)
                fe.mel_into(power[r, :nfr[k]], out[starts[k]:starts[k + 1]])
            i = j
    return out.numpy(), frames


def compute_features(waves: Sequence[np.ndarray], config: FeatureConfig,
                     batch_samples: int = BATCH_SAMPLES, max_items: int = BATCH_MAX_ITEMS) -> list[np.ndarray]:
    """Features for many clips: list of (S_i,) float32 -> list of (T_i, F) float32, T_i = num_frames(S_i)."""
    feats, frames = stacked_features(waves, config, batch_samples, max_items)
    return np.split(feats, np.cumsum(frames)[:-1]) if len(frames) else []


def process_chunk(task: tuple) -> dict[str, Any]:
    """Decode + featurize one chunk and journal it as a part file.

    task = (chunk no, [Item], config dict, parts folder, meta columns). Returns {chunk,
    block (args for FeatureStoreWriter.add_block, items in chunk order), skipped [(local idx,
    reason, detail)], warnings [(local idx, kind, detail)], audio_seconds}. Each process
    writes only its own part files (tmp + rename); the output store is written by the parent alone.
    """
    k, chunk, cfgd, parts_dir, meta_cols = task
    config = FeatureConfig.from_dict(cfgd)
    waves, ok, durs, skipped, warns = [], [], [], [], []
    for li, it in enumerate(chunk):
        try:
            a = load_audio(it.path, config.sample_rate)
        except AudioSkip as e:
            skipped.append((li, e.reason, e.detail))
            continue
        if a.silent:
            warns.append((li, "silent", "all samples are zero"))
        waves.append(a.samples)
        ok.append(li)
        durs.append(a.duration)
    feats, frames = stacked_features(waves, config)
    res = {"chunk": k, "ok": ok, "num_frames": frames, "durations": np.asarray(durs, dtype=np.float64),
           "features": feats.astype(config.dtype, copy=False), "skipped": skipped, "warnings": warns,
           "audio_seconds": float(np.sum(durs)) if durs else 0.0}
    res["block"] = _write_part(Path(parts_dir), config, meta_cols, chunk, res)
    for name in ("features", "num_frames", "durations", "ok"):
        del res[name]
    return res


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def _take_task(counter, n: int) -> int | None:
    """Next task index from the counter shared by all processes, None when all are taken."""
    with counter.get_lock():
        i = counter.value
        if i >= n:
            return None
        counter.value = i + 1
    return i


def _worker_loop(tasks: list[tuple], counter, conn, parent: int) -> None:
    """Forked worker: take tasks until none are left; send each summary (no features: the
    parent reads them from the part file), or the traceback of a failure."""
    _init_worker()
    try:
        while os.getppid() == parent:  # stop if the parent died (e.g. kill -9)
            i = _take_task(counter, len(tasks))
            if i is None:
                break
            res = process_chunk(tasks[i])
            del res["block"]
            conn.send(res)
        conn.send({"done": True})
    except BaseException:  # noqa: BLE001 - reported by the parent
        import traceback
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


# -------------------------------------------------------------------- parent side

def _chunk_key(chunk: Sequence[Item]) -> str:
    h = hashlib.sha1()
    for it in chunk:
        h.update(f"{it.id}\t{it.path}\n".encode())
    return h.hexdigest()


def _part_path(parts_dir: Path, k: int) -> Path:
    return parts_dir / f"part-{k:06d}{PART_SUFFIX}"


def _write_part(parts_dir: Path, config: FeatureConfig, meta_cols: list[str], chunk: list[Item],
                res: dict[str, Any]) -> tuple:
    """Journal one finished chunk as OUT.parts/part-NNNNNN.npys (tmp + rename); return its block for add_block.

    A part is .npy records one after another (np.lib.format, no pickles): `info` (JSON, as
    uint8), ids, features, num_frames, duration, path (ids/paths as unicode arrays), then one
    array per metadata column. No zip container and no CRC pass: ~3x cheaper to write and to
    read back than an .npz (the parent reads back every part a worker wrote).
    """
    ok = res["ok"]
    skipped = [Skip(chunk[li].id, chunk[li].path, chunk[li].line, r, d).as_dict() for li, r, d in res["skipped"]]
    warns = [{"id": chunk[li].id, "path": chunk[li].path, "kind": kd, "detail": d} for li, kd, d in res["warnings"]]
    info = {"chunk": res["chunk"], "chunk_key": _chunk_key(chunk), "feature_config_hash": config.hash(),
            "dtype": config.dtype, "meta_columns": meta_cols, "skipped": skipped, "warnings": warns,
            "audio_seconds": res["audio_seconds"]}
    block = ([chunk[li].id for li in ok], res["features"], res["num_frames"], res["durations"],
             [chunk[li].path for li in ok], {c: [chunk[li].meta.get(c, "") for li in ok] for c in meta_cols})
    arrays = [np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), _ustr(block[0]), block[1],
              np.asarray(block[2], np.int64), np.asarray(block[3], np.float64), _ustr(block[4])]
    arrays += [_ustr(block[5][c]) for c in meta_cols]
    final = _part_path(parts_dir, res["chunk"])
    tmp = parts_dir / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        for a in arrays:
            np.lib.format.write_array(f, a, allow_pickle=False)
    os.replace(tmp, final)
    return block


def _ustr(values) -> np.ndarray:
    a = np.asarray(list(values), dtype=str)
    return a if a.size else np.zeros(0, dtype="<U1")


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-zA-Z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}")


def _map_records(path: Path) -> list[np.ndarray]:
    """The .npy records of a part file as read-only arrays over one mmap of the file: no copy
    (the parent reads back every part a worker wrote, straight from the page cache).
    Raises ValueError for a damaged or truncated file."""
    import mmap
    fmt = np.lib.format
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError if empty
    out, pos, size = [], 0, len(mm)
    while pos < size:
        # the headers np.lib.format.write_array writes (version 1.0), parsed with a regex
        # (numpy's own parser runs ast.literal_eval: ~4x slower); anything else goes to numpy
        if mm[pos:pos + 8] == b"\x93NUMPY\x01\x00":
            hlen = int.from_bytes(mm[pos + 8:pos + 10], "little")
            m = _NPY_HEADER.match(mm[pos + 10:pos + 10 + hlen])
        else:
            m = None
        if m is not None:
            dtype = np.dtype(m.group(1).decode())
            shape = tuple(int(x) for x in m.group(2).split(b",") if x.strip())
            start = pos + 10 + hlen
        else:
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


def _load_part(path: Path) -> tuple[dict[str, Any], tuple] | None:
    """(info, block) of a journaled part, or None if it cannot be read (it is then redone)."""
    try:
        recs = _map_records(path)
        info = json.loads(recs[0].tobytes())
        meta_cols = info["meta_columns"]
        if len(recs) != 6 + len(meta_cols):
            raise ValueError(f"{path}: {len(recs)} records")
        ids, feats, frames, durs, paths = recs[1:6]
        meta = dict(zip(meta_cols, recs[6:]))
    except Exception:  # noqa: BLE001 - a damaged part is simply redone
        return None
    return info, (ids, feats, frames, durs, paths, meta)


def _prepare_parts_dir(parts_dir: Path, config: FeatureConfig, chunk_size: int, meta_cols: list[str],
                       chunks: list[list[Item]]) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """Create or validate OUT.parts; return (chunks already done, their part attrs)."""
    run_file = parts_dir / "run.json"
    run = {"feature_config_hash": config.hash(), "dtype": config.dtype, "chunk_size": chunk_size,
           "meta_columns": meta_cols, "part_format": PART_SUFFIX, "chunking": "tail-thirds"}
    if parts_dir.exists():
        try:
            old = json.loads(run_file.read_text())
        except (OSError, ValueError):
            old = None
        if old != run:
            log.warning("%s: left by a run with other settings; starting afresh", parts_dir)
            shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    if not run_file.exists():
        from pllcli.io import write_json
        write_json(run, run_file)
    for stray in parts_dir.glob(".*.tmp"):  # tmp files of a killed run
        stray.unlink(missing_ok=True)
    done, info = set(), {}
    for p in sorted(parts_dir.glob(f"part-*{PART_SUFFIX}")):
        try:
            k = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        got = _load_part(p) if k < len(chunks) else None
        if got is None or got[0].get("chunk_key") != _chunk_key(chunks[k]) \
                or got[0].get("feature_config_hash") != config.hash():
            p.unlink(missing_ok=True)
            continue
        done.add(k)
        info[k] = got[0]
    return done, info


def _fork_worker(tasks: list[tuple], counter) -> tuple[int, Any]:
    """(pid, receiving Connection) of a forked worker running _worker_loop.

    A bare os.fork, not multiprocessing.Process: the tasks reach the worker by fork either
    way, and Process.start cost ~4 ms more in the parent while the worker has nothing to do.
    """
    from multiprocessing.connection import Connection
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the caller's code (no atexit, no finally)
        code = 1
        try:
            os.close(r)
            _worker_loop(tasks, counter, Connection(w, readable=False), parent)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, Connection(r, writable=False)


def _reap(pids: list[int], kill: bool = False) -> list[int]:
    """Wait for forked workers (SIGTERM them first if `kill`); their exit codes."""
    codes = []
    for pid in pids:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        except ChildProcessError:  # already reaped
            codes.append(0)
    return codes


def _run_parallel(tasks: list[tuple], jobs: int, handle: Callable[[dict], None],
                  started: Callable[[], None] | None = None, idle: Callable[[], None] | None = None) -> list[int]:
    """Run chunk tasks on the calling process plus `jobs - 1` forked workers.

    All processes take tasks from one shared counter, so the split balances itself (the
    parent also writes the output) and the tasks reach the workers by fork, unpickled.
    The parent hands every summary to `handle` as it comes: its own after each chunk, the
    workers' in between; `idle` runs once when it has only the workers' last results to
    wait for. Returns the workers' pids: they have sent everything but may still be
    exiting, so the caller finishes its output meanwhile and then calls `_finish_workers`.
    """
    import gc
    import multiprocessing as mp
    from multiprocessing.connection import wait
    counter = mp.get_context("fork").Value("q", 0)
    conns: dict[Any, int] = {}  # receiving end -> worker pid
    pids: list[int] = []
    finished = False
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # objects inherited by the workers stay out of their GC: fewer copy-on-write pages
    try:
        for _ in range(jobs - 1):
            pid, conn = _fork_worker(tasks, counter)
            conns[conn] = pid
            pids.append(pid)
        gc.unfreeze()
        if started is not None:
            started()

        def take_results(timeout: float | None) -> None:
            for c in wait(list(conns), timeout):
                try:
                    res = c.recv()
                except EOFError:  # gone without its "done": it died (e.g. killed)
                    pid = conns.pop(c)
                    c.close()
                    code = _reap([pid])[0]
                    pids.remove(pid)
                    raise RuntimeError(f"featurize worker exited with code {code}") from None
                if "error" in res:
                    raise RuntimeError(f"featurize worker failed:\n{res['error']}")
                if res.get("done"):
                    conns.pop(c)
                    c.close()
                    continue
                handle(res)

        while True:
            take_results(0)  # write what the workers finished before taking a chunk, not while holding one
            i = _take_task(counter, len(tasks))
            if i is None:
                break
            handle(process_chunk(tasks[i]))
        if conns and idle is not None and not wait(list(conns), 0):
            idle()  # only when there is a wait to fill
        while conns:
            take_results(None)
        finished = True
        return pids
    finally:
        gc.unfreeze()
        if not finished:
            for c in conns:
                c.close()
            _reap(pids, kill=True)


def _finish_workers(pids: list[int]) -> None:
    """Reap workers that have sent all their results (they only exit now)."""
    for code in _reap(pids):
        if code:  # its results all arrived and were checked: the output is complete
            log.warning("a featurize worker exited with code %s after finishing its tasks", code)


def featurize(src: str, out: str | os.PathLike, config: FeatureConfig, jobs: int = 1,
              shard: tuple[int, int] = (0, 1), chunk_size: int = DEFAULT_CHUNK, strict: bool = False,
              overwrite: bool = False, extensions: Sequence[str] = AUDIO_EXTENSIONS,
              progress: bool = True, on_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Featurize `src` (manifest, '-' or directory) into the store `out`; returns the summary dict."""
    import torch  # heavy imports before the clock: wall_seconds is the work itself
    parallel = jobs > 1
    if not parallel:  # with workers, h5py is imported while they already work (see open_output)
        import importlib
        importlib.import_module("h5py")

    from pllcli.io import provenance
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    if jobs < 1:
        raise UsageError("--jobs must be >= 1")
    if chunk_size < 1:
        raise UsageError("--chunk-size must be >= 1")
    all_items, meta_cols, kind = resolve_inputs(src, extensions)
    # duplicates are judged over the whole input, so that shards agree with a single run
    flags = duplicate_flags(all_items)
    sl = shard_slice(len(all_items), shard)
    items = [it for it, d in zip(all_items[sl], flags[sl]) if d is None]
    dups = [d for d in flags[sl] if d is not None]
    if strict and dups:
        d = dups[0]
        where = f"{src}:{d.line}" if d.line else d.path
        raise StrictModeError(f"{where}: duplicate id {d.id!r} ({d.detail}) and --strict is set")

    chunks = [items[a:b] for a, b in chunk_bounds(len(items), chunk_size)]
    parts_dir = out.with_name(out.name + ".parts")
    done, info = _prepare_parts_dir(parts_dir, config, chunk_size, meta_cols, chunks)
    todo = [k for k in range(len(chunks)) if k not in done]
    summary_skips = [d.as_dict() for d in dups]
    warnings: list[dict] = []
    audio_run = 0.0
    for k in sorted(done):
        summary_skips += info[k].get("skipped", [])
        warnings += info[k].get("warnings", [])
    if strict:
        for k in sorted(done):
            sk = info[k].get("skipped", [])
            if sk:
                s0 = sk[0]
                where = f"{src}:{s0['line']}" if s0["line"] else s0["path"]
                raise StrictModeError(f"{where}: {s0['id']}: {s0['reason']} ({s0['detail']}) and --strict is set")
    files_resumed = sum(len(chunks[k]) for k in done)
    if done:
        log.info("resuming: %d of %d chunks already done in %s", len(done), len(chunks), parts_dir)

    attrs = {"provenance": provenance(inputs={"input": src if kind == "manifest" else None},
                                      params={"jobs": jobs, "chunk_size": chunk_size, "input_kind": kind})}
    if shard[1] > 1:
        attrs["shard"] = f"{shard[0]}/{shard[1]}"
    writer = None
    state = {"next": 0, "audio_total": 0.0}
    # finished chunks not yet in the output: their block, or None to read it from the part file
    ready: dict[int, tuple | None] = dict.fromkeys(done)

    def drain():
        """Write the finished chunks that come next in order, at once: a write that waited to
        be grouped with later ones would, near the end, keep the other processes waiting."""
        blocks = []
        while state["next"] in ready:
            k = state["next"]
            block = ready.pop(k)
            if block is None:
                got = _load_part(_part_path(parts_dir, k))
                if got is None:
                    raise InputError("journaled part became unreadable during the run; rerun the command",
                                     str(_part_path(parts_dir, k)))
                block = got[1]
            blocks.append(block)
            state["audio_total"] += float(np.sum(block[3], dtype=np.float64))
            state["next"] += 1
            if len(blocks) == 64:  # e.g. resuming: not every part mapped at once
                writer.add_blocks(blocks)
                blocks.clear()
        writer.add_blocks(blocks)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), initial=files_resumed, unit="file", file=sys.stderr,
                   dynamic_ncols=True, desc="featurize", mininterval=0.5,
                   disable=None)  # None: no bar when stderr is not a terminal
    cfgd = config.to_dict()
    tasks = [(k, chunks[k], cfgd, str(parts_dir), meta_cols) for k in todo]
    kill_after, _, kill_how = (os.environ.get(_DIE_AFTER, "") or "0").partition(":")
    kill_after = int(kill_after)
    written = 0

    def handle(res):
        nonlocal audio_run, written
        k = res["chunk"]
        chunk = chunks[k]
        if strict and res["skipped"]:
            li, r, d = res["skipped"][0]
            it = chunk[li]
            where = f"{src}:{it.line}" if it.line else it.path
            raise StrictModeError(f"{where}: {it.id}: {r} ({d}) and --strict is set")
        ready[k] = res.get("block")  # None from a worker: read back its part file
        for li, r, d in res["skipped"]:
            summary_skips.append(Skip(chunk[li].id, chunk[li].path, chunk[li].line, r, d).as_dict())
        for li, kd, d in res["warnings"]:
            warnings.append({"id": chunk[li].id, "path": chunk[li].path, "kind": kd, "detail": d})
            log.warning("%s: %s (%s)", chunk[li].path, d, chunk[li].id)
        audio_run += res["audio_seconds"]
        written += 1
        if kill_after and written == kill_after:
            if kill_how == "INT":  # as a terminal's Ctrl-C: the whole foreground process group
                os.killpg(os.getpgid(0), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        drain()
        if bar is not None:
            bar.update(len(chunk))
            el = time.perf_counter() - t0
            bar.set_postfix_str(f"{audio_run / max(el, 1e-9):.0f}x RT", refresh=False)
        if on_chunk is not None:
            on_chunk(k)

    def open_output():
        # The output is assembled in chunk order while later chunks are still being computed;
        # its tmp file lives in the parts folder and is renamed onto OUT only at the very end.
        # With workers this runs once they are forked: importing h5py and creating the file
        # overlap their first chunks instead of delaying them.
        nonlocal writer
        from pllcli.features.store import FeatureStoreWriter
        writer = FeatureStoreWriter(out, config, meta_cols, attrs, tmp_dir=parts_dir)
        drain()  # chunks finished by an earlier run

    workers: list = []  # forked workers that have sent everything; reaped once the output is in place
    try:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if not parallel or len(todo) <= 1:
                open_output()
                for task in tasks:
                    handle(process_chunk(task))
            else:
                _warm_up(config)
                workers = _run_parallel(tasks, min(jobs, len(todo)), handle, started=open_output,
                                        idle=lambda: writer.flush_columns())
        finally:
            torch.set_num_threads(prev)
        drain()
        if state["next"] != len(chunks):  # pragma: no cover - would be a bug
            raise RuntimeError(f"assembled {state['next']} of {len(chunks)} chunks")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        _finish_workers(workers)
        raise
    finally:
        if bar is not None:
            bar.close()
    shutil.rmtree(parts_dir, ignore_errors=True)
    _finish_workers(workers)

    wall = time.perf_counter() - t0
    n_done, audio_total, frames = writer.n, state["audio_total"], writer.rows
    summary_skips.sort(key=lambda s: (s["line"], s["path"]))
    by_reason: dict[str, int] = {}
    for s in summary_skips:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    return {
        "output": str(out), "input": src, "input_kind": kind,
        "shard": f"{shard[0]}/{shard[1]}", "jobs": jobs, "chunk_size": chunk_size,
        "files_listed": len(items) + len(dups), "files_done": n_done, "files_skipped": len(summary_skips),
        "skipped_by_reason": by_reason, "skipped": summary_skips,
        "warnings": warnings, "chunks_resumed": len(done), "files_resumed": files_resumed,
        "audio_seconds": round(audio_total, 3), "audio_seconds_this_run": round(audio_run, 3),
        "frames": frames, "wall_seconds": round(wall, 3),
        "x_real_time": round(audio_run / wall, 1) if wall > 0 else None,
        "feature_config": config.to_dict(), "feature_config_hash": config.hash(),
        "reasons": {k: SKIP_REASONS[k] for k in by_reason if k in SKIP_REASONS},
    }
