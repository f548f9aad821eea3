"""In-memory batching: the whole feature store lives in one (sumT, F) tensor, batches are built
with one vectorised gather (random crops, padding with the feature mean), label tensors come
from the label store's CSR arrays. No per-item HDF5 reads or Python per-item work in the hot path.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import torch

from pllcli.errors import InputError


class InMemoryFeatures:
    """features (sumT, F) tensor (on `device` if it fits, else CPU, pinned for CUDA), offsets (N+1,)."""

    def __init__(self, feats: np.ndarray, offsets: np.ndarray, device=None, max_device_bytes: int = 4 << 30):
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        self.offsets = np.asarray(offsets, np.int64)
        self.num_frames = np.diff(self.offsets)
        self.dim = feats.shape[1]
        t = torch.from_numpy(feats)
        self.device = torch.device("cpu")
        if device is not None and torch.device(device).type == "cuda":
            if t.numel() * 4 <= max_device_bytes:
                t, self.device = t.to(device), torch.device(device)
            else:
                t = t.pin_memory()
        self.feats = t

    def stats(self, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Per-bin mean and std over the frames of `rows` (all rows if None)  -> (F,), (F,)."""
        if rows is None or len(rows) == len(self.num_frames):
            f = self.feats
        else:
            f = self.feats[torch.as_tensor(_frame_index(self.offsets, np.asarray(rows)))]
        f = f.double()
        mean = f.mean(0)
        std = f.std(0) if f.shape[0] > 1 else torch.ones_like(mean)
        return mean.float().cpu().numpy(), std.float().cpu().numpy()

    def gather(self, rows: np.ndarray, max_frames: int | None = None, rng: np.random.Generator | None = None,
               pad_value=None, min_frac: float = 1.0):
        """(x (B, T, F), lengths (B,)) for `rows`; a crop of at most `max_frames`: random with `rng`,
        else centred (whole items without `max_frames`). With `min_frac` < 1 and `rng`, each crop
        keeps a random fraction in [min_frac, 1] of min(item, max_frames) frames (so two views of
        one item differ in length). Padded frames get `pad_value` (F,) (e.g. the feature mean), default 0."""
        rows = np.asarray(rows, np.int64)
        L = self.num_frames[rows]
        lens = L if max_frames is None else np.minimum(L, max_frames)
        if rng is not None and min_frac < 1.0:
            lens = np.round(lens * rng.uniform(min_frac, 1.0, len(rows))).astype(np.int64)
        lens = np.maximum(lens, 1)
        if rng is not None:
            start = (rng.random(len(rows)) * (L - lens + 1)).astype(np.int64)
        else:
            start = np.maximum(0, (L - lens) // 2)
        T = int(lens.max()) if len(rows) else 1
        pos = np.arange(T)[None, :]
        idx = self.offsets[rows][:, None] + start[:, None] + np.minimum(pos, lens[:, None] - 1)
        idx = np.minimum(idx, self.offsets[rows + 1][:, None] - 1).clip(min=0)
        x = self.feats[torch.from_numpy(idx).to(self.device)]
        valid = torch.from_numpy(pos < lens[:, None]).to(self.device)
        fill = torch.zeros(self.dim, device=self.device) if pad_value is None else \
            torch.as_tensor(pad_value, dtype=x.dtype, device=self.device)
        x = torch.where(valid[..., None], x, fill)
        return x, torch.from_numpy(lens)

    @classmethod
    def from_clips(cls, clips, device=None) -> "InMemoryFeatures":
        """From a list of (T_i, F) arrays."""
        if not len(clips):
            raise ValueError("no clips")
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])])
        return cls(np.concatenate([np.asarray(c, np.float32) for c in clips], 0), offsets, device)


def pad_clips(clips) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, F) arrays -> (N, T_max, F) float32 tensor (zero padded) and lengths (N,)."""
    mem = InMemoryFeatures.from_clips(clips)
    return mem.gather(np.arange(len(clips)))


def unpad(x: torch.Tensor, lengths) -> InMemoryFeatures:
    """A padded batch (N, T, F) with lengths (N,) as InMemoryFeatures (the padding dropped)."""
    return InMemoryFeatures.from_clips([x[i, :int(n)].cpu().numpy() for i, n in enumerate(lengths)])


def _frame_index(offsets, rows):
    starts, ends = offsets[rows], offsets[rows + 1]
    lens = ends - starts
    return np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())


class LabelTensors:
    """Label arrays for feature-store rows (via `label_rows`), producing batch dicts."""

    def __init__(self, labels, label_rows: np.ndarray):
        self.labels = labels
        self.label_rows = np.asarray(label_rows, np.int64)
        self.C = labels.num_classes

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        lrows = self.label_rows[rows]
        lab = self.labels
        cand = lab.candidate_matrix(lrows)
        clean = lab.clean[lrows].astype(np.int64)
        has_c = lab.has_candidates[lrows]
        ci = clean >= 0
        if ci.any():  # clean items: their candidate row is the one-hot of the clean label
            cand[ci] = 0.0
            cand[np.flatnonzero(ci), clean[ci]] = 1.0
            has_c = has_c | ci
        return {
            "index": torch.from_numpy(np.asarray(rows, np.int64)),
            "candidates": torch.from_numpy(cand),
            "has_candidates": torch.from_numpy(has_c),
            "clean": torch.from_numpy(clean),
            "tags": torch.from_numpy(lab.tag_matrix(lrows)),
            "has_tags": torch.from_numpy(lab.has_tags[lrows].astype(bool)),
            "soft": torch.from_numpy(lab.soft_matrix(lrows)),
            "has_soft": torch.from_numpy(lab.has_soft[lrows].astype(bool)),
            "unlabeled": torch.from_numpy(lab.unlabeled[lrows].astype(bool)),
        }


def epoch_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1, bucket: int = 32, drop_last: bool = False,
                  groups: list[tuple[np.ndarray, float]] | None = None) -> list[np.ndarray]:
    """Shuffled batches of `rows` for one epoch, identical on every rank before slicing.

    Items are shuffled, grouped in chunks of `bucket` batches, sorted by length inside a chunk
    (less padding), cut into batches, and the batches shuffled. With world > 1 each rank gets
    batches[rank::world], truncated so that all ranks run the same number of steps.

    `groups` = [(group_rows, share), ...] (disjoint subsets of `rows`): every batch then holds
    round(share * batch_size) items of each group, drawn from a fresh permutation of the group
    each time it is used up (so a small group, e.g. the clean items, is oversampled), and the
    rest of the batch from the other rows. One epoch is one pass over the other rows (over the
    groups' rows, cycling, when there are no other rows)."""
    rng = np.random.default_rng([seed, epoch, 7])
    if groups:
        return _grouped_batches(np.asarray(rows), lengths, batch_size, rng, rank, world, bucket, groups)
    perm = np.asarray(rows)[rng.permutation(len(rows))]
    out = []
    chunk = batch_size * bucket
    for s in range(0, len(perm), chunk):
        c = perm[s:s + chunk]
        c = c[np.argsort(lengths[c], kind="stable")]
        out += [c[i:i + batch_size] for i in range(0, len(c), batch_size)]
    order = rng.permutation(len(out))
    out = [out[i] for i in order]
    return rank_slice(out, rank, world)


def rank_slice(out: list, rank: int, world: int) -> list:
    """This rank's share of an epoch's batches: out[rank::world], cut so every rank runs as many."""
    if world > 1:
        n = len(out) // world
        if n == 0:
            out = out * world
            n = 1
        out = out[rank::world][:n]
    return out


def _grouped_batches(rows, lengths, batch_size, rng, rank, world, bucket, groups):
    groups = [(np.asarray(g, np.int64), float(s)) for g, s in groups if len(g) and float(s) > 0]
    taken = np.concatenate([g for g, _ in groups]) if groups else np.zeros(0, np.int64)
    rest = np.setdiff1d(rows, taken)
    counts = [max(1, int(round(s * batch_size))) for _, s in groups]
    n_rest = batch_size - sum(counts)
    if n_rest < 1 or len(rest) == 0:  # groups fill the batch: scale them to batch_size, no rest
        tot = sum(s for _, s in groups)
        counts = [max(1, int(round(s / tot * batch_size))) for _, s in groups]
        n_rest = 0
        n_batches = max(1, int(np.ceil(sum(len(g) for g, _ in groups) / max(1, sum(counts)))))
    else:
        n_batches = int(np.ceil(len(rest) / n_rest))
    # the rest: length-bucketed exactly like the plain path
    parts = []
    if n_rest:
        perm = rest[rng.permutation(len(rest))]
        chunk = n_rest * bucket
        for s in range(0, len(perm), chunk):
            c = perm[s:s + chunk]
            c = c[np.argsort(lengths[c], kind="stable")]
            parts += [c[i:i + n_rest] for i in range(0, len(c), n_rest)]
        parts = [parts[i] for i in rng.permutation(len(parts))]
    else:
        parts = [np.zeros(0, np.int64)] * n_batches
    streams = []
    for (g, _), k in zip(groups, counts):
        need = n_batches * k
        reps = int(np.ceil(need / len(g)))
        streams.append(np.concatenate([g[rng.permutation(len(g))] for _ in range(reps)])[:need])
    out = []
    for b in range(n_batches):
        out.append(np.concatenate([parts[b]] + [st[b * k:(b + 1) * k] for st, k in zip(streams, counts)]))
    return rank_slice(out, rank, world)


class Prefetcher:
    """Build batches in a background thread (queue of `depth`); `wait` accumulates the time the
    consumer spent blocked on the queue (the data-wait figure). `items` is listed first unless
    `lazy` (an iterable read as it goes, e.g. a StreamEpoch)."""

    def __init__(self, make, items, depth: int = 2, thread: bool = True, lazy: bool = False):
        self.make, self.items, self.depth, self.thread = make, items if lazy else list(items), depth, thread
        self.wait = 0.0

    def __iter__(self):
        if not self.thread:
            for it in self.items:
                t = time.perf_counter()
                b = self.make(it)
                self.wait += time.perf_counter() - t
                yield b
            return
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def work():
            try:
                for it in self.items:
                    if stop.is_set():
                        return
                    q.put(("ok", self.make(it)))
                q.put(("end", None))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                q.put(("err", e))

        th = threading.Thread(target=work, daemon=True)
        th.start()
        try:
            while True:
                t = time.perf_counter()
                kind, val = q.get()
                self.wait += time.perf_counter() - t
                if kind == "end":
                    return
                if kind == "err":
                    raise val
                yield val
        finally:
            stop.set()
            while th.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    th.join(timeout=0.05)


def crop_batch(feats: np.ndarray, offsets: np.ndarray, rows: np.ndarray, crop: int, rng: np.random.Generator,
               random: bool = True, min_frac: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of at most `crop` frames of items of (sumT, F) `feats`: random (centred with
    random=False), zero padded; see `InMemoryFeatures.gather`."""
    return InMemoryFeatures(feats, offsets).gather(rows, crop, rng if random else None, None, min_frac)


def nonfinite_items(feats: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Items (sorted indices) whose frames (sum T, F) hold a NaN or inf; `offsets` (N+1,)."""
    bad_frames = ~np.isfinite(feats).all(1)
    if not bad_frames.any():
        return np.zeros(0, np.int64)
    return np.unique(np.searchsorted(offsets, np.flatnonzero(bad_frames), side="right") - 1)


def nonfinite_error(ids, bad, where, hint: str = "") -> InputError:
    """The one message for items `bad` (sorted indices into `ids`) with NaN/inf features."""
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return InputError(f"features of item {str(ids[bad[0]])!r} contain NaN/inf{more}{hint}", str(where))
