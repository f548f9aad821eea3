"""Inference on features: batched forward passes, probabilities, chunk averaging.

Used by training (validation), `predict` and `evaluate`. `feats` is a
`pllcli.training.data.InMemoryFeatures`, a `pllcli.training.stream.StoreFeatures` (read lazily,
bounded memory; `stream.open_features` picks one for --data/--max-memory), or a chunk view of either.
"""
from __future__ import annotations

import numpy as np

from pllcli.errors import UsageError


def infer(model, feats, rows=None, device="cpu", batch_size: int = 64, max_frames: int | None = None,
          amp: bool = False, outputs=("logits",), optional=()) -> dict[str, np.ndarray]:
    """Run `model` (eval) on store rows (sorted by length for little padding; full length unless
    `max_frames`); returns {name: (N, ...) np.float32} in the order of `rows` for every name in
    `outputs` (required) and in `optional` (kept when the model gives it), plus "frame_lengths"
    (N,) with "frame_logits". `feats` read lazily (StoreFeatures) is read in windows of
    neighbouring rows (sorted by length inside each), so memory stays bounded."""
    import torch
    rows = np.arange(len(feats.num_frames)) if rows is None else np.asarray(rows, np.int64)
    pad = getattr(getattr(getattr(model, "encoder", None), "norm", None), "mean", None)
    res: dict[str, list] = {k: [] for k in outputs}
    frame_lens: list[np.ndarray] = []
    done: list[np.ndarray] = []
    was = model.training
    model.eval()
    dev = torch.device(device)
    with torch.no_grad():
        for src, local, where in read_windows(feats, rows, batch_size):
            p = pad.detach().to(src.device) if pad is not None else None
            order = np.argsort(src.num_frames[local], kind="stable")
            for s in range(0, len(order), batch_size):
                x, lens = src.gather(local[order[s:s + batch_size]], max_frames, None, p)
                x, lens = x.to(dev, non_blocking=True), lens.to(dev)
                with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                    out = model(x, lens)
                if not done:
                    outputs = tuple(outputs) + tuple(k for k in optional if k in out and k not in outputs)
                    res.update({k: [] for k in outputs if k not in res})
                done.append(where[order[s:s + batch_size]])
                for k in outputs:
                    if k not in out:
                        raise UsageError(f"this model has no {k!r} output (a frame-level model such as "
                                         f"crnn or whenwho gives frame_logits)")
                    res[k].append(out[k].float().cpu().numpy())
                if "frame_logits" in outputs:
                    fl = out.get("frame_lengths")
                    if fl is None:
                        t_out, t_in = out["frame_logits"].shape[1], x.shape[1]
                        fl = np.minimum(t_out, np.ceil(lens.cpu().numpy() * t_out / t_in))
                    frame_lens.append(np.asarray(fl.cpu() if hasattr(fl, "cpu") else fl).astype(np.int64))
    model.train(was)
    order = np.concatenate(done) if done else np.zeros(0, np.int64)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    result = {}
    for k, v in res.items():
        if not v:
            result[k] = np.zeros((0,), np.float32)
            continue
        if v[0].ndim == 3:  # (B, T', C): batches differ in T'; pad with a very low logit
            t_max = max(a.shape[1] for a in v)
            v = [np.pad(a, ((0, 0), (0, t_max - a.shape[1]), (0, 0)), constant_values=-30.0) for a in v]
        result[k] = np.concatenate(v)[inv]
    if frame_lens:
        result["frame_lengths"] = np.concatenate(frame_lens)[inv]
    return result


def read_windows(feats, rows: np.ndarray, batch_size: int, batches_per_window: int = 8):
    """(features, their rows, positions in `rows`) to run batches of: all of `feats` at once when
    in memory; for a lazily read store (StoreFeatures, with `clips`), windows of 8 batches of
    neighbouring rows read into memory (a few contiguous reads each)."""
    if not hasattr(feats, "clips"):
        yield feats, rows, np.arange(len(rows))
        return
    from pllcli.training.data import InMemoryFeatures
    pos = np.argsort(rows, kind="stable")
    w = batches_per_window * batch_size
    for s in range(0, len(pos), w):
        where = pos[s:s + w]
        yield InMemoryFeatures.from_clips(feats.clips(rows[where])), np.arange(len(where)), where


def chunk_frames_for(meta: dict, feature_config, chunk: float | None) -> int:
    """Frames per chunk for chunk-averaged scoring: `chunk` seconds if given (0 = whole clips),
    else the checkpoint's `segment_seconds` (models trained with `train --segment-labels`)."""
    sec = meta.get("segment_seconds") if chunk is None else chunk
    if not sec or sec <= 0:
        return 0
    return max(1, int(round(float(sec) * feature_config.sample_rate / feature_config.hop_length)))


def score_clips(model, meta: dict, mem, feature_config, device, batch_size: int = 64, chunk: float | None = None,
                frames: str | None = None, amp: bool = False) -> tuple[np.ndarray, dict, int]:
    """(probabilities (N, C), whole-clip outputs of `infer`, chunk frames) for every clip of `mem`.

    `frames`: None (no frame outputs), "optional" (kept when the model gives them) or "required".
    With chunk averaging (`chunk_frames_for`) the probabilities are the mean over chunks and the
    whole clips are run only when frame outputs are wanted.
    """
    task = meta.get("task", "single")
    chunk_frames = chunk_frames_for(meta, feature_config, chunk)
    may_have_frames = getattr(model, "frame_level", True)  # a clip-level Classifier has none
    res: dict = {}
    if chunk_frames and frames == "required" and not may_have_frames:  # a clip-level model as a detector
        res = sliding_chunk_frames(model, mem, chunk_frames, max(1, chunk_frames // 16), task, device, batch_size, amp)
    elif not chunk_frames or frames == "required" or (frames == "optional" and may_have_frames):
        res = infer(model, mem, None, device, batch_size, amp=amp,
                    outputs=("logits", "frame_logits") if frames == "required" else ("logits",),
                    optional=("frame_logits",) if frames == "optional" else ())
    if chunk_frames:
        return chunk_probabilities(model, mem, chunk_frames, task, device, batch_size, amp), res, chunk_frames
    return probabilities(res["logits"], task), res, 0


def sliding_chunk_frames(model, mem, chunk_frames: int, hop_frames: int, task: str, device, batch_size: int = 64,
                         amp: bool = False) -> dict:
    """A clip-level model as a detector: its probabilities on windows of `chunk_frames` input frames
    every `hop_frames` (`events.sliding_windows`), overlap-averaged per input frame
    (`events.overlap_average`) -> {"frame_logits": (N, T_max, C) logits of those probabilities
    (padded with -30), "frame_lengths": (N,) input frames}. `mem` in memory or read lazily."""
    from pllcli.events import overlap_average, sliding_windows
    from pllcli.training.data import InMemoryFeatures
    n = mem.num_frames.astype(np.int64)
    out = None
    for src, local, where in read_windows(mem, np.arange(len(n)), batch_size):
        feats = src.feats.cpu().numpy()
        spans = [sliding_windows(int(src.num_frames[j]), chunk_frames, hop_frames) for j in local]
        crops = [feats[src.offsets[j] + a:src.offsets[j] + b] for j, r in zip(local, spans) for a, b in r]
        p = probabilities(infer(model, InMemoryFeatures.from_clips(crops), None, device, batch_size,
                                amp=amp)["logits"], task)
        if out is None:
            out = np.full((len(n), int(n.max()), p.shape[1]), -30.0, np.float32)
        k = 0
        for w, r in zip(where, spans):
            fp = np.clip(overlap_average(p[k:k + len(r)], r, int(n[w])), 1e-6, 1 - 1e-6)
            out[w, :n[w]] = np.log(fp / (1 - fp))
            k += len(r)
    return {"frame_logits": out, "frame_lengths": n}


def probabilities(logits: np.ndarray, task: str = "single") -> np.ndarray:
    """Logits (N, C) -> probabilities: sigmoid (multi-label) or softmax (single)."""
    if task == "multi":
        return 1.0 / (1.0 + np.exp(-logits))
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def chunk_view(mem, chunk_frames: int):
    """A view of an InMemoryFeatures whose items are consecutive chunks of `chunk_frames` frames
    (the last chunk of a clip may be shorter); returns (view, parent (K,) clip row of each chunk).

    Chunks tile every clip, so their boundaries are offsets into the same frame tensor: no copy.
    """
    if chunk_frames < 1:
        raise UsageError("chunk length must be at least one frame")
    n_chunks = np.maximum(1, -(-mem.num_frames // chunk_frames))            # ceil, >= 1 per clip
    parent = np.repeat(np.arange(len(n_chunks)), n_chunks)
    first = np.concatenate([[0], np.cumsum(n_chunks)[:-1]])
    starts = mem.offsets[parent] + (np.arange(len(parent)) - first[parent]) * chunk_frames
    view = object.__new__(type(mem))
    view.__dict__.update(mem.__dict__)
    view.offsets = np.append(starts, mem.offsets[-1]).astype(np.int64)
    view.num_frames = np.diff(view.offsets)
    return view, parent


def chunk_probabilities(model, mem, chunk_frames: int, task: str, device, batch_size: int = 64,
                        amp: bool = False) -> np.ndarray:
    """(N, C) clip probabilities: the mean of the model's probabilities over each clip's chunks."""
    view, parent = chunk_view(mem, chunk_frames)
    p = probabilities(infer(model, view, None, device, batch_size, amp=amp)["logits"], task)
    n = len(mem.num_frames)
    out = np.zeros((n, p.shape[1]), np.float64)
    np.add.at(out, parent, p)
    return (out / np.bincount(parent, minlength=n)[:, None]).astype(np.float32)
