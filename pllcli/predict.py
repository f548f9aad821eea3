"""Inference: model outputs for a feature store, top-k tables, restriction to candidate sets.

    infer(model, feats: InMemoryFeatures, rows, device) -> logits (N, C) np.float32
    predict(ckpt, features, out, top_k=1, restrict_labels=None) -> summary dict
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from pllcli.errors import InputError, UsageError


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
                t_out, t_in = out["frame_logits"].shape[1], x.shape[1]
                frame_lens.append(np.minimum(t_out, np.ceil(lens.cpu().numpy() * t_out / t_in)).astype(np.int64))
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
        from pllcli.training.segments import chunk_probabilities
        return chunk_probabilities(model, mem, chunk_frames, task, device, batch_size, amp), res, chunk_frames
    return probabilities(res["logits"], task), res, 0


def probabilities(logits: np.ndarray, task: str = "single") -> np.ndarray:
    if task == "multi":
        return 1.0 / (1.0 + np.exp(-logits))
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def restrict_to_candidates(probs: np.ndarray, cand: np.ndarray, renormalize: bool = True) -> np.ndarray:
    """Zero probabilities outside each row's candidate set (rows with an empty set are kept);
    renormalise to sum 1 inside the set (single-label)."""
    has = (cand > 0).any(1)
    out = np.where((cand > 0) | ~has[:, None], probs, 0.0)
    if renormalize:
        out = out / np.clip(out.sum(1, keepdims=True), 1e-12, None)
    return out


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k), probabilities (N, k)) sorted descending."""
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, 1)


def _open_features(path):
    from pllcli.features import FeatureStore
    if not Path(path).exists():
        raise InputError("no such feature store", str(path))
    return FeatureStore(path)


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def features_for(path, meta: dict, workdir: Path, jobs: int = 1) -> tuple[Path, dict | None]:
    """(feature store, featurize summary or None): `path` itself if it is a feature store, else
    audio (one file, a folder, a manifest or '-') featurized with the checkpoint's feature config
    into `workdir`."""
    import csv

    from pllcli.audio import AUDIO_EXTENSIONS
    from pllcli.features.config import FeatureConfig
    from pllcli.features.extract import featurize
    p = Path(path)
    if str(path) != "-" and p.is_file() and _is_hdf5(p):
        return p, None
    if str(path) != "-" and not p.exists():
        raise InputError("no such feature store or audio", str(path))
    if not meta.get("feature_config"):
        raise InputError("the checkpoint has no feature config to featurize audio with; featurize it first",
                         str(path))
    src = str(path)
    if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
        src = str(workdir / "audio.csv")
        with open(src, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("id", "path"), (p.stem, str(p.resolve()))])
    store = workdir / "features.h5"
    summary = featurize(src, store, FeatureConfig.from_dict(meta["feature_config"]), jobs=jobs, progress=False)
    for sk in summary["skipped"]:
        print(f"warning: skipped {sk['path']}: {sk['reason']} ({sk['detail']})", file=sys.stderr)
    if summary["files_done"] == 0:
        raise InputError("no audio could be read (every file was skipped)", src)
    return store, summary


def predict(checkpoint, features, out="-", top_k_n: int = 1, restrict_labels=None, device="auto",
            batch_size: int = 64, fmt: str | None = None, events: str | None = None,
            frame_scores: str | None = None, threshold: float = 0.5, median: int = 1,
            min_duration: float = 0.0, chunk: float | None = None) -> dict:
    """Write top-k labels with probabilities for every item of a feature store (or of audio:
    see `features_for`); for frame-level models optionally also frame scores and thresholded
    events (id, onset, offset, label) as TSV. `chunk` seconds: average the probabilities of
    consecutive chunks (default: the checkpoint's `segment_seconds`, else whole clips; 0 = whole
    clips)."""
    import tempfile

    from pllcli.checkpoint import load_model
    from pllcli.runtime import resolve_device
    if top_k_n < 1:
        raise UsageError("--top-k must be >= 1")
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, device=dev)
    with tempfile.TemporaryDirectory(prefix="pllcli-predict-") as tmp:
        store, feat_summary = features_for(features, meta, Path(tmp))
        summary = _predict_store(model, meta, checkpoint, store, features, out, top_k_n, restrict_labels, dev,
                                 batch_size, fmt, events, frame_scores, threshold, median, min_duration, chunk)
    if feat_summary is not None:
        summary["featurized"] = {k: feat_summary[k] for k in ("files_done", "files_skipped", "audio_seconds")}
    return summary


def _predict_store(model, meta, checkpoint, store, features, out, top_k_n, restrict_labels, dev, batch_size, fmt,
                   events, frame_scores, threshold, median, min_duration, chunk) -> dict:
    from pllcli.checkpoint import check_feature_config
    from pllcli.training.data import InMemoryFeatures
    fs = _open_features(store)
    check_feature_config(meta, fs.config, f"{features} vs checkpoint {checkpoint}")
    classes = list(meta.get("classes") or [])
    task = meta.get("task", "single")
    feats, offsets = fs.load_all()
    mem = InMemoryFeatures(feats, offsets, dev)
    want_frames = events is not None or frame_scores is not None
    probs, res, chunk_frames = score_clips(model, meta, mem, fs.config, dev, batch_size, chunk,
                                           frames="required" if want_frames else None, amp=dev.type == "cuda")
    n_events = None
    if want_frames:
        n_events = _write_frame_outputs(fs, classes, res["frame_logits"], res["frame_lengths"], events,
                                        frame_scores, threshold, median, min_duration)
    restricted = 0
    if restrict_labels is not None:
        from pllcli.labels.store import align_ids, read_label_store
        lab = read_label_store(restrict_labels)
        if list(lab.classes) != classes:
            raise InputError(f"label store classes differ from the checkpoint's ({len(lab.classes)} vs "
                             f"{len(classes)} classes)", str(restrict_labels), field="classes")
        lr = align_ids(fs.ids, lab.ids, what=f"label store {restrict_labels}")
        cand = lab.candidate_matrix(lr)
        restricted = int((cand > 0).any(1).sum())
        probs = restrict_to_candidates(probs, cand, renormalize=task != "multi")
    idx, p = top_k(probs, top_k_n)
    write_predictions(out, fs.ids, idx, p, classes, fmt)
    summary = {"items": len(fs.ids), "top_k": top_k_n, "restricted": restricted, "out": str(out)}
    if chunk_frames:
        summary["chunk_seconds"] = round(chunk_frames * fs.config.hop_length / fs.config.sample_rate, 4)
    if n_events is not None:
        summary["events"] = n_events
    return summary


def _write_frame_outputs(fs, classes, frame_logits, frame_lengths, events, frame_scores, threshold,
                         median, min_duration) -> int:
    """Frame probabilities (sigmoid of frame_logits) -> events TSV and/or frame-score TSV.

    Each item's hop is its duration over its number of valid output frames."""
    from pllcli.events import decode_events, frame_hop, write_events_tsv, write_frame_scores_tsv
    if not 0.0 < threshold < 1.0:
        raise UsageError("--threshold must be in (0, 1)")
    probs = 1.0 / (1.0 + np.exp(-frame_logits))
    lengths = np.maximum(1, frame_lengths.astype(np.int64))
    hops = [frame_hop(float(d), int(t)) for d, t in zip(fs.durations, lengths)]
    rows = []
    for i, item in enumerate(fs.ids):
        for e in decode_events(probs[i, :lengths[i]], classes, hops[i], threshold, median=median,
                               min_duration=min_duration, duration=float(fs.durations[i])):
            rows.append((str(item), e.onset, e.offset, e.label))
    if events is not None:
        write_events_tsv(events, rows)
    if frame_scores is not None:
        write_frame_scores_tsv(frame_scores, [(str(item), probs[i, :lengths[i]], hops[i])
                                              for i, item in enumerate(fs.ids)], classes)
    return len(rows)


def write_predictions(out, ids, idx, p, classes, fmt=None) -> None:
    """CSV (id,label,prob[,label_2,prob_2,...]) or JSONL ({"id","labels","probs"}); '-' = stdout CSV."""
    from pllcli.io import write_text_atomic
    out = str(out)
    fmt = fmt or ("jsonl" if out.endswith((".jsonl", ".ndjson")) else "tsv" if out.endswith(".tsv") else "csv")
    k = idx.shape[1]
    lines = []
    if fmt == "jsonl":
        for i, item in enumerate(ids):
            lines.append(json.dumps({"id": str(item), "labels": [classes[j] for j in idx[i]],
                                     "probs": [round(float(v), 6) for v in p[i]]}))
    else:
        import csv
        import io
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        header = ["id", "label", "prob"] + [f"{c}_{r}" for r in range(2, k + 1) for c in ("label", "prob")]
        w.writerow(header)
        for i, item in enumerate(ids):
            row = [str(item)]
            for r in range(k):
                row += [classes[idx[i, r]], f"{p[i, r]:.6f}"]
            w.writerow(row)
        lines = [buf.getvalue().rstrip("\n")]
    text = "\n".join(lines) + "\n"
    if out == "-":
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # pragma: no cover
            os._exit(0)
    else:
        write_text_atomic(out, text)
