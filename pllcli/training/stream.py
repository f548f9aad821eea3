"""Streaming batches from a feature store with bounded memory (`--data stream`).

The in-memory path (`pllcli.training.data`) loads the whole store as float32; this one reads it
lazily. Each epoch has a *plan*, computed from the offsets alone (no features read):

- the selected rows are grouped in *blocks*: the rows whose first frame falls in one window of
  `block_frames` store frames (a multiple of the HDF5 chunk, so a block is one contiguous slice
  of `features` covering a few chunks);
- blocks are shuffled (seed, epoch) and laid end to end; rank r of w takes one contiguous run of
  that sequence, sized so every rank has the same number of batches (full batches, then one
  last partial one); its DataLoader workers split the rank's run the same way;
- a worker reads its blocks in order, one `features[a:b]` slice each, into a shuffle buffer of
  at most `buffer_frames` frames, and draws each batch of `batch_size` items at random from it
  (`shuffle=False`: the shortest items first, for little padding in inference);
- batch groups (`groups=[(rows, share)]`, as `epoch_batches` takes them for --clean-share,
  --unlabeled-share, --sampler hnh): each group is a source of its own, split across ranks and
  workers, with its own part of the buffer, giving round(share * batch_size) items of every
  batch and cycling (each item once per round) while the rest makes one pass.

The order is fixed by (seed, epoch, rank, world, number of workers, batch size, block and buffer
sizes): another worker count gives other (equally shuffled) batches.

Items keep the store's dtype in the buffer (float16 stays float16); a batch is converted to
float32 and cropped/padded by `InMemoryFeatures.gather` with the random generator the classifier
task uses, so a batch of the same rows equals the in-memory one. Batch dict: x (B, T, F) float32
(key `x_key`), lengths (B,), index (B,) store rows, plus `labels.batch(rows)` (a LabelTensors).

    path, why = choose_data_path(in_memory_bytes(fs), max_memory, "auto")   # log `why`
    ds = StreamDataset(fs, rows, batch_size=64, seed=0, max_frames=300, labels=label_tensors,
                       rank=rank, world=world, buffer_frames=stream_buffer_frames(max_memory, fs, 64, 2, 300))
    loader = StreamLoader(ds, num_workers=2, device="cuda")
    for epoch in range(epochs):
        for batch in loader.epoch(epoch):   # dicts on the device; loader.state_dict() at any point
            ...

The stages use two helpers: `make_loader(store, rows, batch_size=, max_memory=, workers=, device=,
procs=, ...)` (a StreamLoader whose buffers fit the budget; train and pretrain) and
`open_features(store, data, max_memory)` (InMemoryFeatures or StoreFeatures for inference).

Resume is exact mid-epoch (`RESUME_GRANULARITY = "batch"`): the plan is deterministic, so a
loader restored from `state_dict()` skips the batches already consumed (reading only the blocks
that still hold items of later batches) and yields the same batches as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pllcli.errors import InputError, TrainingError, UsageError
from pllcli.features.store import FEATURE_CHUNK_ROWS
from pllcli.training.data import InMemoryFeatures, nonfinite_error

log = logging.getLogger(__name__)

RESUME_GRANULARITY = "batch"       # what `StreamLoader.load_state_dict` restores: mid-epoch, exactly
DEFAULT_BLOCK_CHUNKS = 4            # a block covers about 4 HDF5 chunks (4096 frames)
DEFAULT_BUFFER_FRAMES = 1 << 16     # per worker: 16 MiB at F = 64 float32, 8 MiB float16
DEFAULT_MEMORY_FRACTION = 0.5       # --max-memory default: this fraction of RAM
_READ_CACHE_BYTES = 1 << 20         # h5py chunk cache of a streaming handle: reads are whole slices


# ------------------------------------------------------------------ --data memory|stream|auto

def parse_memory(spec: "str | int | float | None", option: str = "--max-memory") -> "int | None":
    """`8G`, `512M`, `1.5GiB`, `2e9` (bytes) or `40%` (of RAM) -> bytes; None stays None."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, (int, float)):
        return int(spec)
    s = str(spec).strip().upper().replace(" ", "")
    try:
        if s.endswith("%"):
            v = total_memory() * float(s[:-1]) / 100.0
        else:
            s = s[:-1] if s.endswith("B") else s
            s = s[:-1] if s.endswith("I") else s
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
            v = float(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UsageError(f"{option}: expected a size such as 8G, 512M or 40%, got {spec!r}")
    if v < 1:
        raise UsageError(f"{option}: must be positive, got {spec!r}")
    return int(v)


def total_memory() -> int:
    """RAM in bytes: MemTotal of /proc/meminfo (os.sysconf elsewhere), capped by a cgroup v2 limit."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not total:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            lim = f.read().strip()
        if lim.isdigit():
            total = min(total, int(lim))
    except OSError:
        pass
    return int(total)


def default_memory_budget(fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """The `--max-memory` default: `fraction` of RAM."""
    return int(total_memory() * fraction)


def in_memory_bytes(fs, rows=None) -> int:
    """Bytes the in-memory path needs for `rows` of FeatureStore `fs`: float32 frames, plus the
    storage-dtype copy `load_all` holds while converting a float16 store."""
    frames = int(fs.offsets[-1]) if rows is None else int(fs.num_frames[np.asarray(rows)].sum())
    item = np.dtype(fs.dtype).itemsize
    return frames * fs.feature_dim * (4 + (item if item != 4 else 0))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def choose_data_path(store_bytes: int, max_memory: "int | None" = None, mode: str = "auto",
                     procs: int = 1) -> tuple[str, str]:
    """("memory" | "stream", one-line reason to log) for `--data mode`; `auto` streams when the
    store (`in_memory_bytes`) times `procs` (processes of this machine each holding a copy, e.g.
    LOCAL_WORLD_SIZE under torchrun) exceeds `max_memory` (default `default_memory_budget()`)."""
    mode = str(getattr(mode, "value", mode))
    if mode not in ("memory", "stream", "auto"):
        raise UsageError(f"--data must be memory, stream or auto, got {mode!r}")
    procs = max(1, int(procs))
    need = _fmt_bytes(store_bytes * procs) + (f" ({procs} processes)" if procs > 1 else "")
    store_bytes *= procs
    if mode != "auto":
        return mode, f"data path: {mode} (--data {mode}; the store needs {need} in memory)"
    budget, src = (max_memory, "--max-memory") if max_memory else \
        (default_memory_budget(), f"default --max-memory, {DEFAULT_MEMORY_FRACTION:.0%} of RAM")
    if store_bytes > budget:
        return "stream", f"data path: stream (--data auto: the store needs {need} > {_fmt_bytes(budget)}, {src})"
    return "memory", f"data path: memory (--data auto: the store needs {need} <= {_fmt_bytes(budget)}, {src})"


# ------------------------------------------------------------------ the epoch plan

@dataclass
class WorkerPlan:
    """What one DataLoader worker of one rank reads and yields in one epoch.

    `rows` (n,) store rows in read order; unit u is rows[bounds[u]:bounds[u+1]] (ascending, one
    contiguous slice of `features`); `batches` are arrays of positions into `rows`; batch j is
    drawn once `reads_before[j]` units have been read."""

    rows: np.ndarray
    bounds: np.ndarray
    batches: list = field(default_factory=list)
    reads_before: list = field(default_factory=list)
    peak_frames: int = 0

    @property
    def num_units(self) -> int:
        return len(self.bounds) - 1


def make_blocks(offsets: np.ndarray, rows: np.ndarray, block_frames: int) -> list[np.ndarray]:
    """Selected `rows` grouped by the window of `block_frames` store frames their first frame is in."""
    rows = np.unique(np.asarray(rows, np.int64))
    if not len(rows):
        return []
    win = offsets[rows] // int(block_frames)
    cut = np.flatnonzero(np.diff(win)) + 1
    return np.split(rows, cut)


def rank_sizes(n: int, batch_size: int, world: int) -> tuple[int, list[int]]:
    """(batches per rank, items per rank) for n items: every rank gets the same number of batches
    (full ones, then one partial); the last round's items are split as evenly as possible. A rank
    left without an item for its last batch (fewer left than ranks) is given one repeated item."""
    nb = max(1, math.ceil(n / (world * batch_size)))
    rest = n - (nb - 1) * world * batch_size
    return nb, [(nb - 1) * batch_size + rest // world + (r < rest % world) for r in range(world)]


def _split_counts(n: int, k: int) -> list[int]:
    return [n // k + (i < n % k) for i in range(k)]


def _units(seq: np.ndarray, starts: np.ndarray, a: int, b: int) -> list[np.ndarray]:
    """The pieces of the blocks (beginning at `starts` in `seq`) that lie in seq[a:b]."""
    cuts = np.concatenate([[a], starts[(starts > a) & (starts < b)], [b]]).astype(np.int64)
    return [seq[x:y] for x, y in zip(cuts[:-1], cuts[1:]) if y > x]


class _Source:
    """One source of a worker's batches: units (row arrays, one contiguous read each) entering
    its own buffer of at most `cap` frames, `k` items per batch. With `cycle` (a Generator) the
    units come round again in a new order when used up (an oversampled group); else it ends.
    With `bucket` > 1 (and shuffling) a draw takes `bucket` batches' worth of buffered items at
    random, sorts them by length and cuts them into batches that come out in random order (as
    `epoch_batches` does: little padding); their frames stay counted until each batch leaves."""

    def __init__(self, units: list, cap: int, k: int, cycle=None, bucket: int = 1):
        self.units, self.cap, self.k, self.cycle, self.bucket = units, cap, k, cycle, max(1, int(bucket))
        self.order, self.i, self.held, self.round = list(range(len(units))), 0, 0, 0
        self.ids, self.frames, self.rounds = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.queue: list = []  # cut batches of the last bucket: (ids, frames), next last

    def pending(self):
        if self.i == len(self.order) and self.cycle is not None and self.units:
            if len(self.ids) >= self.k:  # a round is drawn out before the next one comes in
                return None
            self.order, self.i, self.round = list(self.cycle.permutation(len(self.units))), 0, self.round + 1
        return self.units[self.order[self.i]] if self.i < len(self.order) else None

    def fill(self, frames: np.ndarray, add) -> None:
        """Take units while they fit; `add(rows)` gives their item ids."""
        while (u := self.pending()) is not None and (self.held + int(frames[u].sum()) <= self.cap
                                                     or not (len(self.ids) or self.queue)):
            self.ids = np.concatenate([self.ids, add(u)])
            self.frames = np.concatenate([self.frames, frames[u]])
            self.rounds = np.concatenate([self.rounds, np.full(len(u), self.round)])
            self.held += int(frames[u].sum())
            self.i += 1

    def _check_holds_a_batch(self) -> bool:
        """Whether units are still to come; UsageError when the buffer is too small for one batch."""
        more = self.pending() is not None
        if len(self.ids) < self.k and more:
            raise UsageError(f"the shuffle buffer ({self.cap} frames) cannot hold one batch of {self.k} items "
                             f"plus one block; raise --max-memory or lower --batch-size")
        return more

    def draw(self, rng, shuffle: bool) -> np.ndarray:
        if shuffle and self.bucket > 1 and self.cycle is None:
            return self._draw_bucketed(rng)
        self._check_holds_a_batch()
        k = min(self.k, len(self.ids))
        if not shuffle:
            pick = np.argsort(self.frames, kind="stable")[:k]
        elif self.cycle is None:
            pick = rng.choice(len(self.ids), k, replace=False)
        else:  # the older round's items first, so every item is drawn once per round
            old = np.flatnonzero(self.rounds == self.rounds.min())
            new = np.flatnonzero(self.rounds != self.rounds.min())
            pick = rng.choice(old, k, replace=False) if len(old) >= k else \
                np.concatenate([old, rng.choice(new, k - len(old), replace=False)])
        out = self.ids[pick]
        self.held -= int(self.frames[pick].sum())
        self._drop(pick)
        return out

    def _drop(self, pick: np.ndarray) -> None:
        keep = np.ones(len(self.ids), bool)
        keep[pick] = False
        self.ids, self.frames, self.rounds = self.ids[keep], self.frames[keep], self.rounds[keep]

    def _draw_bucketed(self, rng) -> np.ndarray:
        if not self.queue:
            more = self._check_holds_a_batch()
            m = min(len(self.ids), self.k * self.bucket)
            if more:  # whole batches only: a short one ends the source's epoch
                m -= m % self.k
            pick = rng.choice(len(self.ids), m, replace=False)
            pick = pick[np.argsort(self.frames[pick], kind="stable")]
            cuts = [pick[i:i + self.k] for i in range(0, m, self.k)]
            self.queue = [(self.ids[cuts[j]], self.frames[cuts[j]]) for j in rng.permutation(len(cuts))]
            self._drop(pick)
        ids, frames = self.queue.pop()
        self.held -= int(frames.sum())
        return ids


def simulate_buffers(sources: list, frames: np.ndarray, rng, shuffle: bool = True) -> WorkerPlan:
    """One worker's plan from the offsets alone: the sources (sources[0] the rest of each batch,
    until it runs out; then the groups, cycling) take units while their buffers have room, and
    each batch draws from what is buffered (at random, or shortest first without `shuffle`)."""
    rows, bounds, batches, reads, peak = [], [0], [], [], 0

    def add(u):
        rows.append(u)
        bounds.append(bounds[-1] + len(u))
        return np.arange(bounds[-2], bounds[-1])

    main = sources[0]
    while True:
        main.fill(frames, add)
        if not (len(main.ids) or main.queue):
            break
        for src in sources[1:]:
            src.fill(frames, add)
        peak = max(peak, sum(src.held for src in sources))
        batches.append(np.concatenate([src.draw(rng, shuffle) for src in sources]))
        reads.append(len(bounds) - 1)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return WorkerPlan(r, np.asarray(bounds, np.int64), batches, reads, peak)


def min_buffer_frames(frames: np.ndarray, blocks: list[np.ndarray], batch_size: int) -> int:
    """The smallest `buffer_frames` that always holds a batch plus the next block: the largest
    block's frames plus the `batch_size` longest items."""
    if not blocks:
        return 1
    largest = max(int(frames[b].sum()) for b in blocks)
    longest = np.sort(frames[np.concatenate(blocks)])[::-1][:batch_size]
    return largest + int(longest.sum())


# ------------------------------------------------------------------ the dataset

class StreamDataset(IterableDataset):
    """Batches of store rows read lazily (see the module docstring); one epoch per `iter()`.

    `store` a FeatureStore (its own h5py handle is opened per process, keyed by pid); `rows`
    the rows to use (default all); `groups` [(rows, share)] oversampled batch groups;
    `rank`/`world` the DDP share; `batch_fn(mem, rows, epoch, number)` (picklable) builds a batch
    itself from an InMemoryFeatures `mem` of the batch's items (mem row k = store row rows[k];
    `number` the batch's place in this rank's epoch), e.g. pretraining's two views, instead of
    the default dict; `set_epoch(e)` before each
    epoch. `counters` (this process's reads, frames read, buffer peaks) are for tests and logs:
    with workers each worker keeps its own."""

    def __init__(self, store, rows=None, *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 max_frames: "int | None" = None, pad_value=None, min_frac: float = 1.0, labels=None,
                 rank: int = 0, world: int = 1, block_frames: "int | None" = None,
                 buffer_frames: int = DEFAULT_BUFFER_FRAMES, x_key: str = "x", crops: bool = True,
                 groups: "list[tuple[np.ndarray, float]] | None" = None, batch_fn=None, bucket: int = 32):
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        self.path, self.offsets = store.path, np.asarray(store.offsets, np.int64)
        self.num_frames, self.dim, self.dtype = np.diff(self.offsets), store.feature_dim, store.dtype
        self.rows = np.arange(len(self.num_frames)) if rows is None else np.unique(np.asarray(rows, np.int64))
        if not len(self.rows):
            raise TrainingError(f"{self.path}: no items to stream")
        self.batch_size, self.seed, self.shuffle, self.max_frames = int(batch_size), int(seed), shuffle, max_frames
        self.min_frac, self.labels, self.rank, self.world, self.x_key = min_frac, labels, rank, world, x_key
        self.crops, self.batch_fn = crops, batch_fn
        self.pad_value = None if pad_value is None else torch.as_tensor(pad_value).detach().float().cpu()
        self.block_frames = int(block_frames or DEFAULT_BLOCK_CHUNKS * FEATURE_CHUNK_ROWS)
        self.buffer_frames = int(buffer_frames)
        self.bucket = max(1, int(bucket))  # batches per length-sorted draw (1: each batch drawn at random)
        self._set_groups(groups)
        self._handle = StoreHandle(store)
        self.fingerprint = _fingerprint(store.ids, self.offsets)
        self.epoch, self.skip = 0, 0
        self.counters = _new_counters()

    def _set_groups(self, groups) -> None:
        """Blocks of the rest and of each group (`groups` as for `epoch_batches`: every batch holds
        round(share * batch_size) items of each group, drawn again when the group is used up),
        and the buffer frames of each source."""
        groups = [(np.unique(np.asarray(g, np.int64)), float(sh)) for g, sh in (groups or []) if len(g) and sh > 0]
        self.group_k = [max(1, int(round(sh * self.batch_size))) for _, sh in groups]
        self.n_main = self.batch_size - sum(self.group_k)
        taken = np.concatenate([g for g, _ in groups]) if groups else np.zeros(0, np.int64)
        self.main_rows = np.setdiff1d(self.rows, taken)
        if groups and (self.n_main < 1 or not len(self.main_rows)):
            groups = self._groups_fill_the_batch(groups)
        self.blocks = make_blocks(self.offsets, self.main_rows, self.block_frames)
        self.group_blocks = [make_blocks(self.offsets, g, self.block_frames) for g, _ in groups]
        need = [min_buffer_frames(self.num_frames, gb, k) for gb, k in zip(self.group_blocks, self.group_k)]
        gcaps = [max(n, int(self.buffer_frames * sh)) for n, (_, sh) in zip(need, groups)]
        main_need = min_buffer_frames(self.num_frames, self.blocks, self.n_main)
        if self.buffer_frames - sum(gcaps) < main_need:
            raise UsageError(f"{self.path}: the streaming buffer of {self.buffer_frames} frames is below what one "
                             f"batch needs ({main_need + sum(gcaps)} frames: a block plus the {self.batch_size} "
                             f"longest items); raise --max-memory or lower --batch-size")
        self.caps = [self.buffer_frames - sum(gcaps)] + gcaps

    def _groups_fill_the_batch(self, groups: list) -> list:
        """No items outside the groups (a fully labelled store and --clean-share, say): as in
        `epoch_batches`, the groups share the whole batch in proportion to their shares. The
        largest group becomes the stream an epoch passes over once; the others cycle beside it."""
        tot = sum(sh for _, sh in groups)
        main = max(range(len(groups)), key=lambda i: len(groups[i][0]))
        self.main_rows = groups[main][0]
        rest = [(g, sh / tot) for i, (g, sh) in enumerate(groups) if i != main]
        self.group_k = [max(1, int(round(sh * self.batch_size))) for _, sh in rest]
        self.n_main = self.batch_size - sum(self.group_k)
        if self.n_main < 1:
            raise UsageError(f"{self.path}: --batch-size {self.batch_size} is too small for "
                             f"{len(groups)} batch groups; raise --batch-size")
        return rest

    def _sequence(self, blocks: list, key: list) -> tuple[np.ndarray, np.ndarray]:
        """The rows of `blocks` end to end in a shuffled block order, and where each block starts."""
        if not blocks:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        order = np.random.default_rng(key).permutation(len(blocks)) if self.shuffle else np.arange(len(blocks))
        bl = [blocks[i] for i in order]
        return np.concatenate(bl), np.cumsum([0] + [len(b) for b in bl[:-1]]).astype(np.int64)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Epoch `epoch`, skipping the first `skip` batches of the loader order (resume)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def plan(self, epoch: int, num_workers: int = 1, only: "int | None" = None) -> list[WorkerPlan]:
        """This rank's per-worker plans for `epoch` (worker k of `num_workers`); with `only`, the
        other workers' plans are left empty (not simulated)."""
        W = max(1, int(num_workers))
        seq, starts = self._sequence(self.blocks, [self.seed, epoch, 11])
        gseqs = [self._sequence(gb, [self.seed, epoch, 17, g]) for g, gb in enumerate(self.group_blocks)]
        nb, sizes = rank_sizes(len(seq), self.n_main, self.world)
        a = int(sum(sizes[:self.rank]))
        b = a + sizes[self.rank]
        plans, pos = [], a
        for k, nbk in enumerate(_split_counts(nb, W)):
            n_items = min(nbk * self.n_main, b - pos) if nbk else 0
            units = _units(seq, starts, pos, pos + n_items)
            if nbk and n_items == (nbk - 1) * self.n_main:  # a rank short of its last item: repeat one
                units.append(seq[[a % len(seq)]])
            pos += n_items
            if not units or only not in (None, k):
                plans.append(WorkerPlan(np.zeros(0, np.int64), np.zeros(1, np.int64)))
                continue
            sources = [_Source(units, self.caps[0], self.n_main, bucket=self.bucket)]
            slot, n_slots = self.rank * W + k, self.world * W
            for g, (gseq, gstarts) in enumerate(gseqs):  # each worker cycles its own share of a group
                cnt = _split_counts(len(gseq), n_slots)
                ga = int(sum(cnt[:slot]))
                gu = _units(gseq, gstarts, ga, ga + cnt[slot]) if cnt[slot] else _units(gseq, gstarts, 0, len(gseq))
                cyc = np.random.default_rng([self.seed, epoch, self.rank, k, 19, g])
                sources.append(_Source(gu, self.caps[g + 1], self.group_k[g], cycle=cyc))
            wrng = np.random.default_rng([self.seed, epoch, self.rank, k, 13])
            plans.append(simulate_buffers(sources, self.num_frames, wrng, self.shuffle))
        return plans

    def __len__(self) -> int:
        return rank_sizes(len(self.main_rows), self.n_main, self.world)[0]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, W = (info.id, info.num_workers) if info is not None else (0, 1)
        counts = self.plan_counts(W)
        order = loader_order(counts)
        if self.skip < len(order):  # resumed: the loader's first worker plays the one whose turn is next
            k = (k + order[self.skip]) % W
        plan = self.plan(self.epoch, W, only=k)[k]
        skip = worker_skips(counts, self.skip)[k]
        numbers = [p for p, w in enumerate(order) if w == k]  # each batch's place in the rank's epoch
        try:
            yield from self._run(plan, skip, numbers)
        except InputError as e:  # sent as a value: DataLoader would rewrap the typed error
            yield {"__error__": str(e)}

    def plan_counts(self, num_workers: int) -> list[int]:
        """Batches of each worker of this rank (equal for every epoch)."""
        return _split_counts(len(self), max(1, int(num_workers)))

    def _run(self, plan: WorkerPlan, skip: int, numbers: list):
        c = self.counters
        buf: dict[int, np.ndarray] = {}
        last_use = np.full(len(plan.rows), -1, np.int64)
        for j, bt in enumerate(plan.batches):
            last_use[bt] = j
        u = 0
        for j, bt in enumerate(plan.batches):
            while u < plan.reads_before[j]:
                self._read_unit(plan, u, buf, last_use, skip)
                u += 1
            if j < skip:
                continue
            clips = [buf.pop(int(p)) for p in bt]
            c["held_frames"] -= sum(len(x) for x in clips)
            c["held_items"] -= len(clips)
            yield self._make_batch(plan.rows[bt], clips, numbers[j])

    def _read_unit(self, plan: WorkerPlan, u: int, buf: dict, last_use: np.ndarray, skip: int) -> None:
        p0, p1 = int(plan.bounds[u]), int(plan.bounds[u + 1])
        need = np.flatnonzero(last_use[p0:p1] >= skip) + p0
        if not len(need):
            return
        rows = plan.rows[p0:p1]
        a, b = int(self.offsets[rows[0]]), int(self.offsets[rows[-1] + 1])
        try:
            block = self._handle.features()[a:b]
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"reading items {rows[0]}-{rows[-1]} (frames {a}-{b}) failed: "
                             f"{str(e).splitlines()[0]}", self.path) from None
        c = self.counters
        c["reads"] += 1
        c["frames_read"] += b - a
        if c["read_log"] is not None:
            c["read_log"].append((a, b))
        for p in need:
            r = int(plan.rows[p])
            buf[int(p)] = block[self.offsets[r] - a:self.offsets[r + 1] - a].copy()  # not a view: frees the block
            c["held_frames"] += int(self.num_frames[r])
            c["held_items"] += 1
        c["dtype"] = str(buf[int(need[-1])].dtype)  # what the buffer holds
        c["peak_frames"] = max(c["peak_frames"], c["held_frames"])
        c["peak_items"] = max(c["peak_items"], c["held_items"])

    def _make_batch(self, rows: np.ndarray, clips: list, number: int = 0) -> dict:
        mem = InMemoryFeatures.from_clips(clips)  # float32 from here on
        if self.batch_fn is not None:
            return self.batch_fn(mem, rows, self.epoch, number)
        rng = np.random.default_rng([self.seed, int(rows[0]), self.epoch, self.rank]) if self.crops else None
        x, lens = mem.gather(np.arange(len(rows)), self.max_frames, rng, self.pad_value, self.min_frac)
        b = self.labels.batch(rows) if self.labels is not None else \
            {"index": torch.from_numpy(np.asarray(rows, np.int64))}
        b[self.x_key], b["lengths"] = x, lens
        return b


class StoreHandle:
    """This process's h5py handle on a store's `features` (opened on first use in each process,
    keyed by pid, dropped when pickled); refuses a store whose size, mtime, frame or item count
    changed since `store` was read."""

    def __init__(self, store):
        st = os.stat(store.path)
        self.path = store.path
        self.stamp = (st.st_size, st.st_mtime_ns, int(store.offsets[-1]), len(store.offsets) - 1)
        self._h5, self._pid = None, None

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_h5"], d["_pid"] = None, None
        return d

    def check(self, f=None) -> None:
        """InputError if the file on disk is no longer the store this handle was made for (with
        an open h5py file `f`, its frame and item counts are compared too)."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise InputError(f"the feature store is gone since the run started ({e.strerror})", self.path) from None
        shape = (int(f["features"].shape[0]), int(f["ids"].shape[0])) if f is not None else self.stamp[2:]
        stamp = (st.st_size, st.st_mtime_ns) + tuple(shape)
        if stamp != self.stamp:
            raise InputError(f"the feature store changed since the run started (size, mtime, frames, "
                             f"items {self.stamp} -> {stamp})", self.path)

    def features(self):
        if self._h5 is None or self._pid != os.getpid():
            import h5py
            f = h5py.File(self.path, "r", rdcc_nbytes=_READ_CACHE_BYTES)
            try:
                self.check(f)
            except InputError:
                f.close()
                raise
            self._h5, self._pid = f, os.getpid()
        return self._h5["features"]


def loader_order(counts: list[int]) -> list[int]:
    """The worker of each batch in the DataLoader's order: workers with batches left take turns."""
    return [k for rnd in range(max(counts, default=0)) for k, n in enumerate(counts) if n > rnd]


def worker_skips(counts: list[int], consumed: int) -> list[int]:
    """How many of each worker's batches are among the first `consumed` of `loader_order`."""
    order = loader_order(counts)[:consumed]
    return [order.count(k) for k in range(len(counts))]


def _new_counters() -> dict:
    return {"reads": 0, "frames_read": 0, "held_frames": 0, "held_items": 0, "peak_frames": 0,
            "peak_items": 0, "dtype": None, "read_log": None}


def _fingerprint(ids, offsets) -> str:
    h = hashlib.sha256()
    h.update("\0".join(map(str, ids)).encode())
    h.update(np.asarray(offsets, np.int64).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ the loader

class StreamLoader:
    """A StreamDataset behind a fresh DataLoader each epoch (so `set_epoch` reaches the workers).

    `epoch(e)` -> StreamEpoch, a sized iterable of batch dicts on `device` (pinned memory and
    non_blocking copies on CUDA) with `wait` (seconds blocked on data). `state_dict()` after any
    batch gives {epoch, batches consumed, ...}; `load_state_dict` makes the next `epoch(e)` of
    that epoch skip what was consumed (`resume_granularity` = "batch": exact mid-epoch resume)."""

    resume_granularity = RESUME_GRANULARITY

    def __init__(self, dataset: StreamDataset, num_workers: int = 0, device="cpu", prefetch_factor: int = 2,
                 multiprocessing_context=None):
        self.dataset, self.num_workers = dataset, int(num_workers)
        self.device = torch.device(device)
        self.prefetch_factor, self.mp_context = prefetch_factor, multiprocessing_context
        self._epoch, self._consumed, self._resume = 0, 0, None

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        """One line for the log: the plan's shape and the resume granularity."""
        d = self.dataset
        return (f"streaming {d.path}: {len(d.rows)} items in {len(d.blocks)} blocks of ~{d.block_frames} frames, "
                f"buffer {d.buffer_frames} frames per worker, {self.num_workers} worker(s), rank {d.rank}/{d.world}, "
                f"{len(d)} batches per epoch; resume: mid-epoch ({self.resume_granularity})")

    def epoch(self, epoch: int) -> "StreamEpoch":
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip, self._resume = self._resume[1], None
        elif self._resume is not None and epoch > self._resume[0]:
            self._resume = None
        self.dataset._handle.check()
        self.dataset.set_epoch(epoch, skip)
        self._epoch, self._consumed = int(epoch), skip
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        kw = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": self.mp_context} \
            if self.num_workers else {}
        # a generator of its own: the DataLoader's base seed must not draw from the global RNG
        # (the training's augmentations do; a mid-epoch resume restores that RNG)
        gen = torch.Generator().manual_seed(self.dataset.seed * 7919 + int(epoch))
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                         pin_memory=cuda, persistent_workers=False, generator=gen, **kw)
        return StreamEpoch(self, dl, skip)

    def state_dict(self, consumed: "int | None" = None) -> dict:
        """Where the run is: after `consumed` batches of the current epoch (default: all
        yielded so far; the engine passes the batches it has trained on)."""
        e, n = self._epoch, self._consumed if consumed is None else int(consumed)
        if n >= len(self):
            e, n = e + 1, 0
        d = self.dataset
        return {"epoch": e, "batches": n, "store": d.fingerprint, "plan": self._plan_key(),
                "granularity": self.resume_granularity}

    def load_state_dict(self, state: dict) -> str:
        """Restore; returns a line to log saying where the epoch resumes."""
        if state.get("store") != self.dataset.fingerprint:
            raise InputError("the feature store differs from the one the run started on (id/offset hash "
                             f"{state.get('store')} -> {self.dataset.fingerprint})", self.dataset.path)
        e, n = int(state["epoch"]), int(state["batches"])
        if n and state.get("plan") != self._plan_key():
            self._resume = None
            return (f"resuming at the start of epoch {e + 1}: the batch plan changed ({state.get('plan')} -> "
                    f"{self._plan_key()}), so batch {n} cannot be found again")
        self._resume = (e, n)
        return f"resuming epoch {e + 1} at batch {n + 1} of {len(self)} (exact, mid-epoch)"

    def _plan_key(self) -> str:
        d = self.dataset
        # not the rank: every rank resumes from rank 0's state (the same number of batches consumed)
        return (f"seed={d.seed},B={d.batch_size},world={d.world},workers={self.num_workers},"
                f"block={d.block_frames},buffer={d.buffer_frames},shuffle={int(d.shuffle)},groups={d.group_k},"
                f"bucket={d.bucket}")

    def _worker_rows(self, n: int) -> str:
        d = self.dataset
        order = loader_order(d.plan_counts(self.num_workers))
        k = order[min(n, len(order) - 1)]
        rows = d.plan(self._epoch, max(1, self.num_workers), only=k)[k].rows
        if not len(rows):
            return f"worker {k}"
        return f"worker {k}, items {int(rows.min())}-{int(rows.max())} ({len(rows)} items)"


class StreamEpoch:
    """One epoch of a StreamLoader: iterate for batches; `len()` (batches still to come), `start`
    (batches skipped by a resume: the first one yielded is batch `start` of the epoch), `total`
    (start + len), `wait` (seconds blocked on data)."""

    def __init__(self, loader: StreamLoader, dl, start: int):
        self.loader, self.dl, self.start, self.total, self.wait = loader, dl, start, len(loader), 0.0
        self.n = self.total - start

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        ld = self.loader
        it = iter(self.dl)
        while True:
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            except RuntimeError as e:  # a worker killed or crashed
                raise TrainingError(f"{ld.dataset.path}: a data loader worker failed in epoch {ld._epoch + 1} "
                                    f"({ld._worker_rows(ld._consumed)}): {str(e).splitlines()[0]}") from None
            if "__error__" in b:
                raise InputError(b["__error__"])
            b = to_device(b, ld.device)
            self.wait += time.perf_counter() - t
            ld._consumed += 1
            yield b


def to_device(batch: dict, device) -> dict:
    """Tensors of `batch` on `device` (non_blocking: from pinned memory the copy overlaps compute)."""
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def stream_buffer_frames(max_memory: int, store, batch_size: int, num_workers: int = 0,
                         max_frames: "int | None" = None, prefetch_factor: int = 2) -> int:
    """Per-worker `buffer_frames` that keeps the streamed feature data within `max_memory` bytes:
    what is left after the batches in flight (float32, queued and in use) and one block read per
    worker. UsageError when not even one batch fits."""
    F, item = store.feature_dim, np.dtype(store.dtype).itemsize
    W = max(1, int(num_workers))
    t = int(min(max_frames or np.inf, store.num_frames.max()))
    in_flight = (W * prefetch_factor + 2) * batch_size * t * F * 4
    block = (DEFAULT_BLOCK_CHUNKS * FEATURE_CHUNK_ROWS + int(store.num_frames.max())) * F * item
    frames = (int(max_memory) - in_flight - W * block) // (W * F * item)
    if frames <= 0:
        raise UsageError(f"--max-memory {_fmt_bytes(max_memory)} is below what streaming one batch needs "
                         f"({_fmt_bytes(in_flight + W * block)} for batches of {batch_size} x {t} frames and "
                         f"{W} worker(s)); raise --max-memory or lower --batch-size")
    return int(frames)


def default_loader_workers(workers: "int | None", device) -> int:
    """--loader-workers: as given, else 2 on CUDA (reads overlap the GPU's work) and 0 on CPU."""
    if workers is not None:
        return int(workers)
    return 2 if torch.device(device).type == "cuda" else 0


def make_loader(store, rows=None, *, batch_size: int, max_memory: "int | None", workers: "int | None", device,
                procs: int = 1, max_frames: "int | None" = None, **dataset_kw) -> StreamLoader:
    """A StreamLoader over `rows` of `store` whose buffers fit `max_memory // procs` (procs: the
    processes of this machine, e.g. LOCAL_WORLD_SIZE). Without --max-memory the buffer is at most
    4 x DEFAULT_BUFFER_FRAMES per worker (a bigger one only delays the first batch)."""
    w = default_loader_workers(workers, device)
    budget = (max_memory or default_memory_budget()) // max(1, int(procs))
    buf = stream_buffer_frames(budget, store, batch_size, w, max_frames)
    if not max_memory:
        buf = min(buf, 4 * DEFAULT_BUFFER_FRAMES)
    ds = StreamDataset(store, rows, batch_size=batch_size, max_frames=max_frames, buffer_frames=buf, **dataset_kw)
    return StreamLoader(ds, w, device)


# ------------------------------------------------------------------ reading without a plan

class StoreFeatures:
    """InMemoryFeatures' reading interface (`num_frames`, `offsets`, `dim`, `device`, `gather`,
    `stats`) over a FeatureStore, reading only the rows asked for (consecutive rows in one slice):
    a bounded-memory drop-in for inference and validation."""

    def __init__(self, store):
        self.store, self.offsets, self._handle = store, np.asarray(store.offsets, np.int64), StoreHandle(store)
        self.num_frames, self.dim, self.device = np.diff(self.offsets), store.feature_dim, torch.device("cpu")

    def clips(self, rows) -> list[np.ndarray]:
        """(T_i, F) arrays of `rows` in storage dtype, in the order of `rows`."""
        rows = np.asarray(rows, np.int64)
        u = np.unique(rows)
        runs = np.split(u, np.flatnonzero(np.diff(u) != 1) + 1) if len(u) else []
        feats = self._handle.features()
        got = {}
        for run in runs:
            a = int(self.offsets[run[0]])
            block = feats[a:int(self.offsets[run[-1] + 1])]
            for r in run:
                got[int(r)] = block[self.offsets[r] - a:self.offsets[r + 1] - a]
        return [got[int(r)] for r in rows]

    def gather(self, rows, max_frames=None, rng=None, pad_value=None, min_frac: float = 1.0):
        """As `InMemoryFeatures.gather`: (x (B, T, F) float32, lengths (B,))."""
        rows = np.asarray(rows, np.int64)
        mem = InMemoryFeatures.from_clips(self.clips(rows))
        pad = None if pad_value is None else torch.as_tensor(pad_value).detach().float().cpu()
        return mem.gather(np.arange(len(rows)), max_frames, rng, pad, min_frac)

    def stats(self, rows=None):
        return feature_stats(self.store, rows)


def open_features(store, data="auto", max_memory: "int | None" = None, device=None, procs: int = 1):
    """The reading side of a stage for `--data`/`--max-memory`: InMemoryFeatures of the whole
    store (on `device` when it fits), or StoreFeatures (bounded memory, same interface) when
    `choose_data_path` says stream; logs which and why."""
    path, why = choose_data_path(in_memory_bytes(store), max_memory, data, procs)
    log.info("%s: %s", store.path, why)
    if path == "stream":
        return StoreFeatures(store)
    return InMemoryFeatures(*store.load_all(), device)


def iter_store_blocks(store, rows=None, block_frames: int = 64 * FEATURE_CHUNK_ROWS):
    """(rows (k,), frames (sum T, F) in storage dtype) of `rows` (default all), block by block in
    store order: one read per run of consecutive rows."""
    offsets = np.asarray(store.offsets, np.int64)
    sf = StoreFeatures(store)
    for blk in make_blocks(offsets, np.arange(len(offsets) - 1) if rows is None else rows, block_frames):
        yield blk, np.concatenate(sf.clips(blk))


def _bad_rows(blk: np.ndarray, x: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(x).all(1)
    if not bad.any():
        return np.zeros(0, np.int64)
    return blk[np.unique(np.searchsorted(np.cumsum(num_frames[blk]), np.flatnonzero(bad), side="right"))]


def nonfinite_rows(store, rows=None, block_frames: int = 64 * FEATURE_CHUNK_ROWS) -> np.ndarray:
    """Sorted rows whose frames hold a NaN or inf, read block by block (bounded memory)."""
    nf = np.diff(np.asarray(store.offsets, np.int64))
    bad = [_bad_rows(blk, x, nf) for blk, x in iter_store_blocks(store, rows, block_frames)]
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def feature_stats(store, rows=None, block_frames: int = 8 * FEATURE_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and std (F,), (F,) over the frames of `rows`, read block by block (as
    `InMemoryFeatures.stats`); InputError naming the first item with NaN/inf frames. Blocks are
    small: float64 temporaries of large blocks stay in the heap after the pass (glibc keeps them)."""
    nf = np.diff(np.asarray(store.offsets, np.int64))
    n, mean, m2 = 0, np.zeros(store.feature_dim), np.zeros(store.feature_dim)
    for blk, x in iter_store_blocks(store, rows, block_frames):
        x = x.astype(np.float64)
        bad = _bad_rows(blk, x, nf)
        if len(bad):
            raise nonfinite_error(store.ids, bad, store.path)
        k, mk = len(x), x.mean(0)
        d = mk - mean
        mean = mean + d * k / (n + k)
        m2 = m2 + ((x - mk) ** 2).sum(0) + d * d * n * k / (n + k)
        n += k
    std = np.sqrt(m2 / (n - 1)) if n > 1 else np.ones_like(mean)
    return mean.astype(np.float32), std.astype(np.float32)
