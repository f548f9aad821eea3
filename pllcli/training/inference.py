"""Inference on in-memory features: batched forward passes, probabilities, chunk averaging.

Used by training (validation), `predict` and `evaluate`. `feats` is a
`pllcli.training.data.InMemoryFeatures` (or a chunk view of one).
"""
from __future__ import annotations

import numpy as np

from pllcli.errors import UsageError


def infer(model, feats, rows=None, device="cpu", batch_size: int = 64, max_frames: int | None = None,
          amp: bool = False, outputs=("logits",), optional=()) -> dict[str, np.ndarray]:
    """Run `model` (eval) on store rows (sorted by length for little padding; full length unless
    `max_frames`); returns {name: (N, ...) np.float32} in the order of `rows` for every name in
    `outputs` (required) and in `optional` (kept when the model gives it), plus "frame_lengths"
    (N,) with "frame_logits"."""
    import torch
    rows = np.arange(len(feats.num_frames)) if rows is None else np.asarray(rows, np.int64)
    order = np.argsort(feats.num_frames[rows], kind="stable")
    pad = getattr(getattr(getattr(model, "encoder", None), "norm", None), "mean", None)
    pad = pad.detach().to(feats.device) if pad is not None else None
    res: dict[str, list] = {k: [] for k in outputs}
    frame_lens: list[np.ndarray] = []
    was = model.training
    model.eval()
    dev = torch.device(device)
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            b = rows[order[s:s + batch_size]]
            x, lens = feats.gather(b, max_frames, None, pad)
            x, lens = x.to(dev, non_blocking=True), lens.to(dev)
            with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                out = model(x, lens)
            if s == 0:
                outputs = tuple(outputs) + tuple(k for k in optional if k in out and k not in outputs)
                res.update({k: [] for k in outputs if k not in res})
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
    if not chunk_frames or frames == "required" or (frames == "optional" and may_have_frames):
        res = infer(model, mem, None, device, batch_size, amp=amp,
                    outputs=("logits", "frame_logits") if frames == "required" else ("logits",),
                    optional=("frame_logits",) if frames == "optional" else ())
    if chunk_frames:
        return chunk_probabilities(model, mem, chunk_frames, task, device, batch_size, amp), res, chunk_frames
    return probabilities(res["logits"], task), res, 0


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
