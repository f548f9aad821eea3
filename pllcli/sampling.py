"""Samplers for weakly labelled (multi-label) training, rank-aware for DDP.

- `HalfAndHalfSampler` (Morfi & Stowell's "HnH"): a *batch* sampler; every batch holds
  batch_size/2 positive and batch_size/2 negative clips. The larger kind is covered once per
  epoch; the rarer kind is duplicated (fresh random permutations, concatenated) to match.
- `ClassBalancedSampler` (PANNs' balanced sampler): an index sampler that cycles through the
  classes in a shuffled order and takes the next clip from that class's own shuffled queue,
  so rare classes are seen as often as common ones. Clips with no tag form one more bucket
  (`include_negatives=True`).

Both draw one global sequence from `(seed, epoch)` and give rank r of N every N-th piece
starting at r, padded so that every rank gets the same number of batches/indices (DDP needs
equal step counts). With `num_replicas=None` the rank and world size come from
`torch.distributed` when it is initialised, else (0, 1). Call `set_epoch(e)` each epoch.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Sequence

import numpy as np

from pllcli.errors import UsageError

log = logging.getLogger(__name__)


def dist_info(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(num_replicas, rank), from torch.distributed when not given and initialised."""
    if num_replicas is None or rank is None:
        import torch.distributed as dist
        world, r = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, r = dist.get_world_size(), dist.get_rank()
        num_replicas = world if num_replicas is None else num_replicas
        rank = r if rank is None else rank
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise UsageError(f"sampler: need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
    return int(num_replicas), int(rank)


def _stream(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from idx: whole random permutations, concatenated (each item once per pass)."""
    reps = max(1, math.ceil(n / len(idx)))
    return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:n]


class HalfAndHalfSampler:
    """Batch sampler: each batch has batch_size/2 positive and batch_size/2 negative clips.

    `positive` is a (N,) bool array (for WHEN: the clip has any event). Raises UsageError
    when there is no negative (or no positive) clip or the batch size is odd.
    """

    def __init__(self, positive: Sequence[bool] | np.ndarray, batch_size: int, *,
                 num_batches: int | None = None, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, what: str = "training set"):
        positive = np.asarray(positive, dtype=bool).reshape(-1)
        self.pos = np.flatnonzero(positive)
        self.neg = np.flatnonzero(~positive)
        n = len(positive)
        if len(self.neg) == 0:
            raise UsageError(f"half-and-half batches need negative clips (clips with no event), but all {n} "
                             f"clips of the {what} are positive; leave half-and-half (--hnh) off")
        if len(self.pos) == 0:
            raise UsageError(f"half-and-half batches need positive clips, but none of the {n} clips of the "
                             f"{what} has an event; leave half-and-half (--hnh) off")
        if batch_size < 2 or batch_size % 2:
            raise UsageError(f"half-and-half batches need an even batch size >= 2, got {batch_size}")
        self.batch_size, self.half = int(batch_size), int(batch_size) // 2
        self.num_replicas, self.rank = dist_info(num_replicas, rank)
        self.seed, self.epoch = int(seed), 0
        total = num_batches or math.ceil(max(len(self.pos), len(self.neg)) / self.half)
        self.batches_per_rank = math.ceil(total / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.batches_per_rank * self.num_replicas
        P = _stream(self.pos, total * self.half, rng)
        N = _stream(self.neg, total * self.half, rng)
        for b in range(self.rank, total, self.num_replicas):
            s = slice(b * self.half, (b + 1) * self.half)
            batch = np.concatenate([P[s], N[s]])
            yield batch.tolist()  # positives first, then negatives


class ClassBalancedSampler:
    """PANNs-style class-balanced index sampler over multi-label targets.

    `labels`: (N, C) multi-hot array (or a list of per-clip class-index lists with
    `num_classes`). `num_samples` per epoch (all ranks together) defaults to N.
    """

    def __init__(self, labels, num_classes: int | None = None, *, num_samples: int | None = None,
                 include_negatives: bool = True, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0):
        if isinstance(labels, np.ndarray) and labels.ndim == 2:
            lists = [np.flatnonzero(row > 0.5) for row in labels]
            num_classes = labels.shape[1] if num_classes is None else num_classes
        else:
            lists = [np.asarray(list(r), dtype=np.int64) for r in labels]
            if num_classes is None:
                num_classes = 1 + max((int(r.max()) for r in lists if len(r)), default=-1)
        n = len(lists)
        buckets: list[np.ndarray] = []
        members: list[list[int]] = [[] for _ in range(num_classes)]
        negatives = []
        for i, r in enumerate(lists):
            if len(r) == 0:
                negatives.append(i)
            for c in r:
                if not 0 <= c < num_classes:
                    raise UsageError(f"class-balanced sampler: clip {i} has class index {c} outside 0..{num_classes - 1}")
                members[c].append(i)
        empty = [c for c in range(num_classes) if not members[c]]
        if empty:
            log.warning("class-balanced sampling: %d class(es) have no training clip and are skipped", len(empty))
        buckets = [np.asarray(m, dtype=np.int64) for m in members if m]
        if include_negatives and negatives:
            buckets.append(np.asarray(negatives, dtype=np.int64))
        if not buckets:
            raise UsageError("class-balanced sampling needs at least one tagged clip")
        self.buckets = buckets
        self.num_replicas, self.rank = dist_info(num_replicas, rank)
        self.seed, self.epoch = int(seed), 0
        self.num_samples_per_rank = math.ceil((num_samples or n) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples_per_rank

    def global_sequence(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_samples_per_rank * self.num_replicas
        queues = [rng.permutation(b) for b in self.buckets]
        ptr = [0] * len(self.buckets)
        order: list[int] = []
        out = np.empty(total, dtype=np.int64)
        for k in range(total):
            if not order:
                order = rng.permutation(len(self.buckets)).tolist()
            c = order.pop()
            if ptr[c] == len(queues[c]):
                queues[c], ptr[c] = rng.permutation(self.buckets[c]), 0
            out[k] = queues[c][ptr[c]]
            ptr[c] += 1
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_sequence()[self.rank::self.num_replicas].tolist())


__all__ = ["HalfAndHalfSampler", "ClassBalancedSampler", "dist_info"]
