"""`featurize`: audio files -> feature store, batched, parallel, sharded, resumable.

Pipeline: the input list (`inputs`: manifest, directory, Kaldi data dir, lhotse
manifest or one audio file) is cut into chunks of `chunk_size` files by position. A process decodes a
chunk, featurizes it (`compute`) and journals it as `OUT.parts/part-NNNNNN.npys`
(`journal`). With --jobs N the parent and N-1 forked workers take chunks from one shared
counter (`pool`); workers send back only a small summary and the parent, the only writer
of the output, reads their parts back from the journal. The output is assembled in chunk
order while later chunks are still computing. A rerun keeps the parts whose chunk still
holds the same ids, paths and file sizes/mtimes. At the end the output's temporary file
is renamed onto OUT and the parts folder is removed.
"""
from __future__ import annotations

import errno
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pllcli.audio import AUDIO_EXTENSIONS, SKIP_REASONS, peek_sample_rate
from pllcli.errors import InputError, StrictModeError, UsageError
from pllcli.features.compute import decode_chunk, stacked_features, warm_up
from pllcli.features.config import AUTO_FILES, AutoPreset, FeatureConfig
from pllcli.features.inputs import Item, Skip, chunk_bounds, duplicate_flags, resolve_inputs, shard_slice
from pllcli.features.journal import (
    PART_SUFFIX, Journal, load_part, open_journal, part_path, unlock_journal, write_part,
)
from pllcli.features.pool import WorkerError, finish_workers, run_parallel
from pllcli.io import provenance

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256          # files per chunk (~30 ms of work); the last ones are cut smaller (chunk_bounds)
DEFAULT_MAX_DURATION = 3600.0  # seconds one file may decode to (--max-duration)


def process_chunk(task: tuple) -> dict[str, Any]:
    """Decode + featurize one chunk and journal it as a part file.

    task = (chunk no, [Item], config dict, parts folder, meta columns, max seconds per file).
    Returns {chunk, block (args for FeatureStoreWriter.add_block, items in chunk order),
    skipped [(local idx, reason, detail)], warnings [(local idx, kind, detail)],
    audio_seconds}. Each process writes only its own part files (tmp + rename); the output
    store is written by the parent alone.
    """
    k, chunk, cfgd, parts_dir, meta_cols, max_seconds = task
    config = FeatureConfig.from_dict(cfgd)
    d = decode_chunk(chunk, config, max_seconds)
    if config.frontend == "encoder":
        from pllcli.features.compute import encoder_features
        feats, frames, pads = encoder_features(d["waves"], config)
        d["warnings"] += [(d["ok"][i], "padded", f"{p} zero samples added to reach the encoder's "
                           "minimum length (receptive field or min_duration=)") for i, p in enumerate(pads) if p]
    else:
        feats, frames = stacked_features(d["waves"], config)
    durs = d["durations"]
    res = {"chunk": k, "ok": d["ok"], "num_frames": frames, "durations": np.asarray(durs, dtype=np.float64),
           "features": feats.astype(config.dtype, copy=False), "skipped": d["skipped"],
           "warnings": d["warnings"], "audio_seconds": float(np.sum(durs)) if durs else 0.0, "stats": d["stats"]}
    res["block"] = write_part(Path(parts_dir), config, meta_cols, chunk, res)
    for name in ("features", "num_frames", "durations", "ok", "stats"):
        del res[name]
    return res


# -------------------------------------------------------------------- planning

@dataclass
class _Job:
    """The arguments of one featurize() call."""
    src: str
    out: Path
    config: FeatureConfig
    jobs: int
    shard: tuple[int, int]
    chunk_size: int
    strict: bool
    progress: bool
    on_chunk: Callable[[int], None] | None
    max_duration: float | None
    t0: float
    preset_auto: dict | None = None  # how --preset auto chose (None: the config was given)


@dataclass
class _Plan:
    items: list[Item]          # this shard's items, duplicates left out
    dups: list[Skip]
    chunks: list[list[Item]]
    meta_cols: list[str]
    kind: str
    head: list[str]            # the first AUTO_FILES distinct paths of the whole input (--preset auto)


def _where(src: str, line: int, path: str) -> str:
    return f"{src}:{line}" if line else path


def _strict_message(src: str, s: dict) -> str:
    """MANIFEST:LINE: ID: REASON (DETAIL) in FILE, for the first bad file under --strict."""
    where = _where(src, s["line"], s["path"])
    return f"{where}: {s['id']}: {s['reason']} ({s['detail']}) in {s['path']} and --strict is set"


def _plan(src: str, shard: tuple[int, int], chunk_size: int, strict: bool, extensions: Sequence[str]) -> _Plan:
    all_items, meta_cols, kind = resolve_inputs(src, extensions)
    # duplicates are judged over the whole input, so that shards agree with a single run
    flags = duplicate_flags(all_items)
    sl = shard_slice(len(all_items), shard)
    items = [it for it, d in zip(all_items[sl], flags[sl]) if d is None]
    dups = [d for d in flags[sl] if d is not None]
    if strict and dups:
        d = dups[0]
        raise StrictModeError(f"{_where(src, d.line, d.path)}: duplicate id {d.id!r} ({d.detail}) and --strict is set")
    chunks = [items[a:b] for a, b in chunk_bounds(len(items), chunk_size)]
    head: dict[str, None] = {}
    for it in all_items:  # of the whole input, not of the shard: every shard chooses alike
        if len(head) == AUTO_FILES:
            break
        head.setdefault(it.path)
    return _Plan(items, dups, chunks, meta_cols, kind, list(head))


def _choose_preset(auto: AutoPreset, plan: _Plan) -> tuple[FeatureConfig, dict]:
    """--preset auto: the config for the header rates of the input's first files, and the summary's
    record of the choice; the notice goes to the log (stderr)."""
    rates = [peek_sample_rate(p) for p in plan.head]
    config, name, notice = auto.choose(rates)
    log.info("%s", notice)
    return config, {"preset": name, "files": len(rates), "rates": [r or 0 for r in rates], "notice": notice}


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise InputError("is a directory; give the feature store's file name (e.g. feats.h5)", str(out))
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")


# -------------------------------------------------------------------- assembling

class _Assembler:
    """The parent's side of a run: takes finished chunks (its own, the workers', the journal's)
    and writes them into the output in chunk order, collecting skips and warnings."""

    def __init__(self, job: _Job, plan: _Plan, journal: Journal, attrs: dict):
        self.out, self.config, self.plan, self.journal, self.attrs = job.out, job.config, plan, journal, attrs
        self.src, self.strict, self.on_chunk, self.t0 = job.src, job.strict, job.on_chunk, job.t0
        self.bar = None
        self.writer = None
        self.next = 0
        self.audio_total = 0.0
        self.audio_run = 0.0
        self.pending_rows = 0   # rows of the block being written (for a disk-full message)
        # finished chunks not yet in the output: their block, or None to read it from the part file
        self.ready: dict[int, tuple | None] = dict.fromkeys(journal.done)
        self.strict_errors: dict[int, str] = {}
        self.skips = [d.as_dict() for d in plan.dups]
        self.warnings: list[dict] = []
        for k in sorted(journal.done):
            self.skips += journal.info[k].get("skipped", [])
            self.warnings += journal.info[k].get("warnings", [])
            if job.strict and journal.info[k].get("skipped"):
                raise StrictModeError(_strict_message(job.src, journal.info[k]["skipped"][0]))

    def open_output(self) -> None:
        # The output is assembled in chunk order while later chunks are still being computed;
        # its tmp file lives in the parts folder and is renamed onto OUT only at the very end.
        # With workers this runs once they are forked: importing h5py and creating the file
        # overlap their first chunks instead of delaying them.
        from pllcli.features.store import FeatureStoreWriter
        self.writer = FeatureStoreWriter(self.out, self.config, self.plan.meta_cols, self.attrs,
                                         tmp_dir=self.journal.folder)
        self.drain()  # chunks finished by an earlier run

    def drain(self) -> None:
        """Write the finished chunks that come next in order, at once: a write that waited to
        be grouped with later ones would, near the end, keep the other processes waiting."""
        blocks: list[tuple] = []
        while self.next in self.ready:
            k = self.next
            if k in self.strict_errors:  # in chunk order: the first bad file of the input is named
                raise StrictModeError(self.strict_errors[k])
            block = self.ready.pop(k)
            if block is None:
                got = load_part(part_path(self.journal.folder, k))
                if got is None:
                    raise InputError("journaled part became unreadable during the run; rerun the command",
                                     str(part_path(self.journal.folder, k)))
                block = got[1]
            blocks.append(block)
            self.audio_total += float(np.sum(block[3], dtype=np.float64))
            self.next += 1
            if len(blocks) == 64:  # e.g. resuming: not every part mapped at once
                self._write(blocks)
        self._write(blocks)

    def _write(self, blocks: list[tuple]) -> None:
        self.pending_rows = sum(len(b[1]) for b in blocks)
        self.writer.add_blocks(blocks)
        self.pending_rows = 0
        blocks.clear()

    def handle(self, res: dict) -> None:
        k = res["chunk"]
        chunk = self.plan.chunks[k]
        if self.strict and res["skipped"]:
            li, r, d = res["skipped"][0]
            self.strict_errors[k] = _strict_message(self.src, Skip(chunk[li].id, chunk[li].path, chunk[li].line,
                                                                   r, d).as_dict())
        self.ready[k] = res.get("block")  # None from a worker: read back its part file
        for li, r, d in res["skipped"]:
            self.skips.append(Skip(chunk[li].id, chunk[li].path, chunk[li].line, r, d).as_dict())
        for li, kd, d in res["warnings"]:
            self.warnings.append({"id": chunk[li].id, "path": chunk[li].path, "kind": kd, "detail": d})
            if kd != "padded":  # short clips under an encoder: counted in the closing line instead
                log.warning("%s: %s (%s)", chunk[li].path, d, chunk[li].id)
        self.audio_run += res["audio_seconds"]
        self.drain()
        if self.bar is not None:
            self.bar.update(len(chunk))
            el = time.perf_counter() - self.t0
            self.bar.set_postfix_str(f"{self.audio_run / max(el, 1e-9):.0f}x RT", refresh=False)
        if self.on_chunk is not None:
            self.on_chunk(k)

    def disk_full(self, e: BaseException) -> InputError:
        """The error for a full disk: the short write's figures, else the bytes of features
        written to the output and about how many the whole store needs."""
        m = _WROTE.search(str(e))
        if m:
            return InputError(f"no space left on device ({m.group(0)})", str(self.out))
        w = self.writer
        per_row = self.config.n_mels * np.dtype(self.config.dtype).itemsize
        wrote = (w.rows if w is not None else 0) * per_row
        done_items = max(1, w.n if w is not None else 0)
        need = (wrote + self.pending_rows * per_row) * max(1, len(self.plan.items)) // done_items
        return InputError(f"no space left on device (wrote {wrote} of {max(need, wrote)} bytes)", str(self.out))


_WROTE = re.compile(r"wrote \d+ of \d+ bytes")  # journal.write_part's figures


def _is_disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) == errno.ENOSPC or "errno = 28" in str(e) or "No space left on device" in str(e)


def _compute(asm: _Assembler, tasks: list[tuple], jobs: int, config: FeatureConfig) -> list[int]:
    """Run the tasks (here, or here and on forked workers); the workers still to be reaped."""
    parallel = jobs > 1 and len(tasks) > 1
    # the --encoder path imported torch: with workers, one thread per process, set before the
    # encoder opens its sessions (onnxruntime must not have run a multi-threaded session before a
    # fork, see pllcli.encoders.onnx._Session); alone, the encoder keeps torch's threads
    torch = sys.modules.get("torch") if parallel else None
    prev = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        if not parallel:
            asm.open_output()
            for task in tasks:
                asm.handle(process_chunk(task))
            return []
        warm_up(config)
        return run_parallel(tasks, min(jobs, len(tasks)), process_chunk, asm.handle, started=asm.open_output,
                            idle=lambda: asm.writer.flush_columns())
    finally:
        if torch is not None:
            torch.set_num_threads(prev)


def _progress_bar(progress: bool, total: int, initial: int):
    if not progress or not sys.stderr.isatty():  # tqdm would draw nothing: skip its import (and its mp lock)
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="file", file=sys.stderr, dynamic_ncols=True, desc="featurize",
                mininterval=0.5, disable=None)  # None: no bar when stderr is not a terminal


def featurize(src: str, out: str | Path, config: FeatureConfig | AutoPreset, jobs: int = 1,
              shard: tuple[int, int] = (0, 1), chunk_size: int = DEFAULT_CHUNK, strict: bool = False,
              overwrite: bool = False, extensions: Sequence[str] = AUDIO_EXTENSIONS,
              progress: bool = True, on_chunk: Callable[[int], None] | None = None,
              max_duration: float | None = DEFAULT_MAX_DURATION) -> dict[str, Any]:
    """Featurize `src` (manifest, '-', directory, Kaldi data dir, lhotse manifest or one audio
    file) into the store `out`; returns the summary dict. `config` may be an `AutoPreset`
    (--preset auto): the preset then follows the rates of the input's first files. `overwrite`
    also discards the resume journal (a fresh run); `on_chunk(k)` is called after chunk k is
    in the output."""
    # heavy imports before the clock (wall_seconds is the work itself); log-mel / fbank need no torch
    if getattr(config, "frontend", None) == "encoder":
        import torch  # noqa: F401
    if jobs <= 1:  # with workers, h5py is imported while they already work (see open_output)
        import h5py  # noqa: F401
    t0 = time.perf_counter()
    out = Path(out)
    _check_output(out, overwrite)
    if jobs < 1:
        raise UsageError("--jobs must be >= 1")
    if chunk_size < 1:
        raise UsageError("--chunk-size must be >= 1")
    plan = _plan(src, shard, chunk_size, strict, extensions)
    chosen = None
    if isinstance(config, AutoPreset):
        config, chosen = _choose_preset(config, plan)
    parts_dir = out.with_name(out.name + ".parts")
    run = {"feature_config_hash": config.hash(), "dtype": config.dtype, "chunk_size": chunk_size,
           "meta_columns": plan.meta_cols, "part_format": PART_SUFFIX, "chunking": "tail-thirds",
           "max_duration": max_duration, "journal": 2}
    job = _Job(src, out, config, jobs, shard, chunk_size, strict, progress, on_chunk, max_duration, t0, chosen)
    journal = open_journal(parts_dir, str(out), run, plan.chunks, fresh=overwrite)
    try:
        return _featurize_locked(job, plan, journal)
    finally:
        unlock_journal(parts_dir)


def _featurize_locked(job: _Job, plan: _Plan, journal: Journal) -> dict[str, Any]:
    """featurize() once the journal is open and locked."""
    todo = [k for k in range(len(plan.chunks)) if k not in journal.done]
    files_resumed = sum(len(plan.chunks[k]) for k in journal.done)
    if journal.done or journal.chunks_redone:
        log.info("resuming: %d of %d chunks already done in %s; %d chunk(s) redone (%d file(s) changed since)",
                 len(journal.done), len(plan.chunks), journal.folder, journal.chunks_redone, journal.files_changed)
    # a listing file to checksum (not a single audio input: it may be large, and it is the data itself)
    listed = job.src if plan.kind == "manifest" or (plan.kind != "file" and Path(job.src).is_file()) else None
    attrs = {"provenance": provenance(inputs={"input": listed}, params={
        "jobs": job.jobs, "chunk_size": job.chunk_size, "input_kind": plan.kind})}
    if job.shard[1] > 1:
        attrs["shard"] = f"{job.shard[0]}/{job.shard[1]}"
    asm = _Assembler(job, plan, journal, attrs)
    bar = asm.bar = _progress_bar(job.progress, len(plan.items), files_resumed)
    cfgd = job.config.to_dict()
    tasks = [(k, plan.chunks[k], cfgd, str(journal.folder), plan.meta_cols, job.max_duration) for k in todo]
    workers: list[int] = []  # forked workers that have sent everything; reaped once the output is in place
    try:
        workers = _compute(asm, tasks, job.jobs, job.config)
        asm.drain()
        if asm.next != len(plan.chunks):  # pragma: no cover - would be a bug
            raise RuntimeError(f"assembled {asm.next} of {len(plan.chunks)} chunks")
        asm.writer.close()
    except BaseException as e:
        if asm.writer is not None:
            asm.writer.abort()
        finish_workers(workers)
        if isinstance(e, (OSError, WorkerError)) and _is_disk_full(e):
            raise asm.disk_full(e) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    unlock_journal(journal.folder, remove=True)
    finish_workers(workers)
    return _summary(job, plan, journal, asm, files_resumed)


def _summary(job: _Job, plan: _Plan, journal: Journal, asm: _Assembler, files_resumed: int) -> dict[str, Any]:
    src, out, config, shard = job.src, job.out, job.config, job.shard
    wall = time.perf_counter() - job.t0
    skips = sorted(asm.skips, key=lambda s: (s["line"], s["path"]))
    by_reason: dict[str, int] = {}
    for s in skips:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    warnings = [w for w in asm.warnings if w["kind"] != "padded"]
    return {
        "output": str(out), "input": src, "input_kind": plan.kind,
        "shard": f"{shard[0]}/{shard[1]}", "jobs": job.jobs, "chunk_size": job.chunk_size,
        "files_listed": len(plan.items) + len(plan.dups), "files_done": asm.writer.n, "files_skipped": len(skips),
        "skipped_by_reason": by_reason, "skipped": skips,
        "warnings": warnings, "chunks_resumed": len(journal.done), "files_resumed": files_resumed,
        "chunks_redone": journal.chunks_redone, "files_changed": journal.files_changed,
        "files_cut": sum(w["kind"] == "cut" for w in warnings),
        "files_padded": len(asm.warnings) - len(warnings),
        "audio_seconds": round(asm.audio_total, 3), "audio_seconds_this_run": round(asm.audio_run, 3),
        "frames": asm.writer.rows, "wall_seconds": round(wall, 3),
        "x_real_time": round(asm.audio_run / wall, 1) if wall > 0 else None,
        "feature_config": config.to_dict(), "feature_config_hash": config.hash(),
        **({"preset_auto": job.preset_auto} if job.preset_auto else {}),
        "reasons": {k: SKIP_REASONS[k] for k in by_reason if k in SKIP_REASONS},
    }
