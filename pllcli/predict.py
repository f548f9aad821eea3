"""Inference: model outputs for a feature store, top-k tables, restriction to candidate sets.

    infer(model, feats: InMemoryFeatures, rows, device) -> logits (N, C) np.float32
    predict(ckpt, features, out, top_k=1, restrict_labels=None) -> summary dict
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from pllcli.errors import InputError, UsageError

log = logging.getLogger(__name__)
from pllcli.training.inference import chunk_frames_for, infer, probabilities, score_clips  # noqa: F401


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


def features_for(path, meta: dict, workdir: Path, jobs: int = 1, encoder: str | None = None) -> tuple[Path, dict | None]:
    """(feature store, featurize summary or None): `path` itself if it is a feature store, else
    audio (one file, a folder, a manifest or '-') featurized with the checkpoint's feature config
    into `workdir`. `encoder`: the checkpoint's encoder at other paths on this machine (its
    identity, file sha256s included, must match: `FeatureConfig.with_encoder`)."""
    import csv

    from pllcli.audio import AUDIO_EXTENSIONS
    from pllcli.features.config import FeatureConfig
    from pllcli.features.extract import featurize
    p = Path(path)
    if str(path) != "-" and p.is_file() and _is_hdf5(p):
        if encoder:
            raise UsageError(f"--encoder applies to audio inputs; {path} is already a feature store")
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
    config = FeatureConfig.from_dict(meta["feature_config"])
    if encoder:
        config = config.with_encoder(encoder)
    summary = featurize(src, store, config, jobs=jobs, progress=False)
    for sk in summary["skipped"]:
        print(f"warning: skipped {sk['path']}: {sk['reason']} ({sk['detail']})", file=sys.stderr)
    if summary["files_done"] == 0:
        raise InputError("no audio could be read (every file was skipped)", src)
    return store, summary


PREDICTION_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def is_predictions_file(path) -> bool:
    """True for an empty file or one whose first line is a predictions header (CSV/TSV) or object."""
    with open(path, "rb") as f:
        first = f.readline(4096).decode("utf-8", "replace").strip()
    if not first:
        return True
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            return False
        return isinstance(obj, dict) and {"id", "labels", "probs"} <= set(obj)
    return first.replace("\t", ",").startswith("id,label,prob")


def check_predict_outputs(out, features, restrict_labels=None, overwrite: bool = False, side=()) -> None:
    """Refuse `out` before any work: a suffix predict does not write, an input, or an existing
    file that is not a predictions table (unless `overwrite`). `side` outputs (events, frame
    scores) that exist as files must be text files and no input."""
    from pllcli.io import check_output, check_report_output
    inputs = (features, restrict_labels)
    check_output(out, PREDICTION_SUFFIXES, command="predict", overwrite=overwrite, own_kind=is_predictions_file,
                 kind="a predictions table", inputs=inputs, allow_stdout=True)
    for p in side:
        if p is not None and str(p) != "-" and Path(p).is_file():
            check_report_output(p, command="predict", overwrite=overwrite, inputs=inputs)


def _drop_items(feats, offsets, bad):
    """(feats, offsets, keep mask (N,)) without the items `bad`."""
    keep = np.ones(len(offsets) - 1, bool)
    keep[bad] = False
    frames = np.repeat(keep, np.diff(offsets))
    new_off = np.concatenate([[0], np.cumsum(np.diff(offsets)[keep])]).astype(offsets.dtype)
    return feats[frames], new_off, keep


def predict(checkpoint, features, out="-", top_k_n: int = 1, restrict_labels=None, device="auto",
            batch_size: int = 64, fmt: str | None = None, events: str | None = None,
            frame_scores: str | None = None, threshold: float = 0.5, median: int = 1,
            min_duration: float = 0.0, chunk: float | None = None, skip_bad: bool = False,
            overwrite: bool = False, decode: dict | None = None, json_out=None, data: str = "auto",
            max_memory: int | None = None, encoder: str | None = None) -> dict:
    """Write top-k labels with probabilities for every item of a feature store (or of audio:
    see `features_for`); for frame-level models optionally also frame scores and thresholded
    events (id, onset, offset, label) as TSV. `chunk` seconds: average the probabilities of
    consecutive chunks (default: the checkpoint's `segment_seconds`, else whole clips; 0 = whole
    clips). Items whose features hold NaN/inf are an InputError, or with `skip_bad` left out and
    listed in the summary ("skipped_bad"). `json_out` (written by the caller) is only checked here,
    with the other outputs, before any work. `data` ("auto" | "memory" | "stream") and `max_memory`
    (bytes) choose how the store is read (`pllcli.training.stream.choose_data_path`). Event decoding: `threshold` as for
    `events.parse_thresholds`, `median` as for `events.median_frames`; `decode` may add `low`
    (hysteresis), `min_gap` (seconds) and `tune` = (feature store, strong labels) to pick per-class
    thresholds there (`events.tune_thresholds`)."""
    import tempfile

    from pllcli.checkpoint import load_model
    from pllcli.runtime import resolve_device
    if top_k_n < 1:
        raise UsageError("--top-k must be >= 1")
    check_predict_outputs(out, features, restrict_labels, overwrite, side=(events, frame_scores, json_out))
    dev = resolve_device(device)
    model, meta = load_model(checkpoint, device=dev)
    with tempfile.TemporaryDirectory(prefix="pllcli-predict-") as tmp:
        store, feat_summary = features_for(features, meta, Path(tmp), encoder=encoder)
        summary = _predict_store(model, meta, checkpoint, store, features, out, top_k_n, restrict_labels, dev,
                                 batch_size, fmt, events, frame_scores, threshold, median, min_duration, chunk,
                                 skip_bad, decode, data, max_memory)
    if feat_summary is not None:
        summary["featurized"] = {k: feat_summary[k] for k in ("files_done", "files_skipped", "audio_seconds")}
    return summary


def _predict_store(model, meta, checkpoint, store, features, out, top_k_n, restrict_labels, dev, batch_size, fmt,
                   events, frame_scores, threshold, median, min_duration, chunk, skip_bad=False,
                   decode=None, data="auto", max_memory=None) -> dict:
    from pllcli.checkpoint import check_feature_config
    fs = _open_features(store)
    check_feature_config(meta, fs.config, f"{features} vs checkpoint {checkpoint}")
    classes = list(meta.get("classes") or [])
    task = meta.get("task", "single")
    fs, mem, feats, offsets, skipped = _read_features(fs, features, dev, skip_bad, decode, data, max_memory)
    want_frames = events is not None or frame_scores is not None
    probs, res, chunk_frames = score_clips(model, meta, mem, fs.config, dev, batch_size, chunk,
                                           frames="required" if want_frames else None, amp=dev.type == "cuda")
    n_events = None
    if want_frames:
        decode = dict(decode or {})
        if decode.get("tune") and events is not None:
            threshold = decode["tuned"] = _tuned_thresholds(model, meta, dev, batch_size, classes, threshold,
                                                            median, min_duration, decode)
        if decode.get("segment_classes"):
            decode["rows"] = _segment_class_rows(model, meta, fs, feats, offsets, res, classes, dev, batch_size,
                                                 threshold, median, min_duration, decode)
        n_events = _write_frame_outputs(fs, classes, res["frame_logits"], res["frame_lengths"], events,
                                        frame_scores, threshold, median, min_duration, decode)
    restricted = 0
    if restrict_labels is not None:
        from pllcli.labels.store import cover_features, read_label_store
        lab = read_label_store(restrict_labels)
        if list(lab.classes) != classes:
            raise InputError(f"label store classes differ from the checkpoint's ({len(lab.classes)} vs "
                             f"{len(classes)} classes)", str(restrict_labels), field="classes")
        # items missing from the label store have no candidate set: unrestricted
        lab, lr, _ = cover_features(lab, fs.ids, f"label store {restrict_labels}")
        cand = lab.candidate_matrix(lr)
        restricted = int((cand > 0).any(1).sum())
        probs = restrict_to_candidates(probs, cand, renormalize=task != "multi")
    idx, p = top_k(probs, top_k_n)
    write_predictions(out, fs.ids, idx, p, classes, fmt)
    summary = {"items": len(fs.ids), "top_k": top_k_n, "restricted": restricted, "out": str(out)}
    if skip_bad:
        summary["skipped_bad"] = skipped
    if chunk_frames:
        summary["chunk_seconds"] = round(chunk_frames * fs.config.hop_length / fs.config.sample_rate, 4)
    if n_events is not None:
        summary["events"] = n_events
        if decode.get("tuned") is not None:
            summary["thresholds"] = dict(zip(classes, np.round(decode["tuned"], 4).tolist()))
    return summary


def _raise_nonfinite(ids, bad, name):
    from pllcli.training.data import nonfinite_error
    raise nonfinite_error(ids, bad, name, "; --skip-bad leaves such items out")


def _read_features(fs, name, dev, skip_bad, decode, data="auto", max_memory=None):
    """(store view, features for score_clips, feats, offsets, skipped ids) on the `--data` path:
    `StoreFeatures` (bounded memory; feats None) when `data` or the memory budget says stream, else
    the whole store in memory. --skip-bad and --segment-classes need the frames in memory."""
    from pllcli.training.data import InMemoryFeatures
    from pllcli.training.stream import StoreFeatures, choose_data_path, in_memory_bytes, nonfinite_rows
    data = str(getattr(data, "value", data))
    needs = [f for f, on in (("--skip-bad", skip_bad), ("--segment-classes", (decode or {}).get("segment_classes")))
             if on]
    if data == "stream" and needs:
        raise UsageError(f"--data stream does not support {', '.join(needs)}; use --data memory or auto")
    path = "memory"
    if not needs:
        path, why = choose_data_path(in_memory_bytes(fs), max_memory, data)
        log.info("%s: %s", name, why)
    if path == "stream":
        bad = nonfinite_rows(fs)
        if len(bad):
            _raise_nonfinite(fs.ids, bad, name)
        return fs, StoreFeatures(fs), None, np.asarray(fs.offsets, np.int64), []
    feats, offsets = fs.load_all()
    fs, feats, offsets, skipped = _without_bad_items(fs, feats, offsets, name, skip_bad)
    return fs, InMemoryFeatures(feats, offsets, dev), feats, offsets, skipped


def _without_bad_items(fs, feats, offsets, name, skip_bad):
    """(store view, feats, offsets, skipped ids): items with NaN/inf features are an InputError
    naming `name`, or with `skip_bad` dropped (a warning on stderr) from a view of `fs` that has
    the `ids`, `durations` and `config` of the items kept."""
    from types import SimpleNamespace

    from pllcli.training.data import nonfinite_items
    bad = nonfinite_items(feats, offsets)
    if not len(bad):
        return fs, feats, offsets, []
    ids = fs.ids
    if not skip_bad:
        _raise_nonfinite(ids, bad, name)
    if len(bad) == len(ids):
        raise InputError(f"the features of every item ({len(ids)}) contain NaN/inf", str(name))
    skipped = [str(ids[i]) for i in bad]
    ex = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    print(f"warning: skipped {len(skipped)} item(s) whose features contain NaN/inf: {ex}", file=sys.stderr)
    feats, offsets, keep = _drop_items(feats, offsets, bad)
    view = SimpleNamespace(ids=ids[keep], durations=np.asarray(fs.durations)[keep], config=fs.config)
    return view, feats, offsets, skipped


def _frame_items(fs, frame_logits, frame_lengths) -> list[tuple]:
    """(id, frame probabilities (T, C) on the clip's timeline, hop, duration) per item
    (`clip_frame_probs`)."""
    probs = 1.0 / (1.0 + np.exp(-frame_logits))
    lengths = np.maximum(1, frame_lengths.astype(np.int64))
    out = []
    for i, item in enumerate(fs.ids):
        p, hop = clip_frame_probs(fs.config, float(fs.durations[i]), probs[i, :lengths[i]])
        out.append((str(item), p, hop, float(fs.durations[i])))
    return out


def clip_frame_probs(config, duration: float, probs: np.ndarray) -> tuple[np.ndarray, float]:
    """A model's output frames (T, ...) of one clip -> (frames on the clip's timeline, hop): a
    log-mel model's T frames span the clip (hop = duration / T); an encoder's are moved to where
    their windows are (`FeatureConfig.frame_timeline`, `events.on_clip_timeline`)."""
    from pllcli.events import on_clip_timeline
    hop, offset = config.frame_timeline(duration, len(probs))
    return on_clip_timeline(probs, hop, offset, duration), hop


def _write_frame_outputs(fs, classes, frame_logits, frame_lengths, events, frame_scores, threshold,
                         median, min_duration, decode=None) -> int:
    """Frame probabilities (sigmoid of frame_logits) -> events TSV and/or frame scores
    (`events.write_frame_scores`: a folder of sed_scores_eval score files, or one .tsv)."""
    from pllcli.events import decode_items, parse_thresholds, write_events_tsv, write_frame_scores
    decode = decode or {}
    thr = parse_thresholds(threshold, classes)
    low = None if decode.get("low") is None else parse_thresholds(decode["low"], classes, "--low")
    if low is not None and (low > thr).any():
        raise UsageError("--low must not exceed --threshold (hysteresis: on at --threshold, off below --low)")
    items = _frame_items(fs, frame_logits, frame_lengths)
    rows = decode.get("rows")
    if rows is None:
        rows = decode_items(items, classes, None, thr, low=low, median=median, min_duration=min_duration,
                            min_gap=decode.get("min_gap") or 0.0, extend=decode.get("extend") or (0.0, 0.0))
    if events is not None:
        write_events_tsv(events, rows)
    if frame_scores is not None:
        write_frame_scores(frame_scores, [it[:3] for it in items], classes)
    return len(rows)


def _segment_class_rows(model, meta, fs, feats, offsets, res, classes, dev, batch_size, threshold, median,
                        min_duration, decode) -> list[tuple]:
    """WHEN/WHO checkpoints: events = WHEN segments, each named by the likely tag that WHO scores
    highest on the segment's own frames (`events.label_segments`), not every tag of the clip.
    WHEN(t) is recovered from the transcription P(t, c) = WHEN(t) WHO(c) at the top WHO class;
    `decode["extend"]` widens the named segments (`events.widen_spans`)."""
    from pllcli.events import (label_segments, likely_tags, parse_thresholds, segment_frame_ranges, when_segments,
                               widen_spans)
    from pllcli.training.data import InMemoryFeatures
    extend = decode.get("extend") or (0.0, 0.0)
    if (meta.get("model") or {}).get("name") != "whenwho":
        raise UsageError("--segment-classes needs a WHEN/WHO checkpoint (model whenwho)")
    who = 1.0 / (1.0 + np.exp(-res["logits"]))
    when_thr = float(np.median(parse_thresholds(threshold, classes)))
    in_hop = fs.config.hop_length / fs.config.sample_rate
    segs, crops = [], []
    for i, (cid, p, hop, dur) in enumerate(_frame_items(fs, res["frame_logits"], res["frame_lengths"])):
        top = int(np.argmax(who[i]))
        when = np.clip(p[:, top] / max(who[i, top], 1e-6), 0.0, 1.0)
        segs.append(when_segments(when, hop, when_thr, median=median, min_duration=min_duration,
                                  min_gap=decode.get("min_gap") or 0.0, duration=dur))
        clip = feats[offsets[i]:offsets[i + 1]]
        in_offset = fs.config.frame_timeline(dur, len(clip))[1]
        crops += [clip[a:b] for a, b in segment_frame_ranges(segs[-1], in_hop, len(clip), offset=in_offset)]
    seg_who = np.zeros((0, len(classes)))
    if crops:
        logits = infer(model, InMemoryFeatures.from_clips(crops), None, dev, batch_size)["logits"]
        seg_who = 1.0 / (1.0 + np.exp(-logits))
    rows, k = [], 0
    for i, cid in enumerate(fs.ids):
        n = len(segs[i])
        wide = widen_spans(segs[i], *extend, duration=float(fs.durations[i]))  # segments widen as one class
        keep = [j for j, w in enumerate(wide) if w is not None]
        named = label_segments([wide[j] for j in keep], seg_who[k:k + n][keep], classes, likely_tags(who[i]))
        rows += [(str(cid), e.onset, e.offset, e.label) for e in named]
        k += n
    return rows


def _tuned_thresholds(model, meta, dev, batch_size, classes, threshold, median, min_duration, decode) -> np.ndarray:
    """Per-class thresholds with the best event F1 on `decode["tune"]` = (feature store, strong
    labels: a label store or an id,onset,offset,label table)."""
    from pllcli.checkpoint import check_feature_config
    from pllcli.events import parse_thresholds, read_events_tsv, tune_thresholds
    from pllcli.training.data import InMemoryFeatures
    feats_path, labels_path = decode["tune"]
    vfs = _open_features(feats_path)
    check_feature_config(meta, vfs.config, f"{feats_path} vs checkpoint")
    feats, offsets = vfs.load_all()
    vfs, feats, offsets, _ = _without_bad_items(vfs, feats, offsets, feats_path, False)
    _, res, _ = score_clips(model, meta, InMemoryFeatures(feats, offsets, dev), vfs.config, dev, batch_size, 0,
                            frames="required")
    durations = dict(zip(map(str, vfs.ids), np.asarray(vfs.durations, float).tolist()))
    if _is_hdf5(Path(labels_path)):
        from pllcli.labels.store import read_label_store
        lab = read_label_store(labels_path)
        ref: dict = {}
        for it, on, off, c in zip(lab.strong_item, lab.strong_onset, lab.strong_offset, lab.strong_label):
            ref.setdefault(str(lab.ids[int(it)]), []).append((float(on), float(off), str(lab.classes[int(c)])))
    else:
        ref = read_events_tsv(labels_path, classes=classes, durations=durations)
    if not ref:
        raise InputError("no strong labels (events) to tune thresholds on", str(labels_path))
    low = None if decode.get("low") is None else parse_thresholds(decode["low"], classes, "--low")
    thr, _ = tune_thresholds(_frame_items(vfs, res["frame_logits"], res["frame_lengths"]), ref, classes,
                             low=low, median=median, min_duration=min_duration, min_gap=decode.get("min_gap") or 0.0,
                             extend=decode.get("extend") or (0.0, 0.0),
                             default=float(np.median(parse_thresholds(threshold, classes))))
    return thr


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
