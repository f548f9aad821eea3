#!/usr/bin/env python3
"""Weak-tag benchmark: WHEN/WHO on the weak corpus (../shared/bench/make_weak_corpus.py).

    flock /tmp/pllcli-bench.lock python examples/bench_weak.py /work/data/weak \
        --out /work/runs/weak --json /work/runs/weak/bench_weak.json

Trains on the `train` clips' weak tags only; scores the `test` clips against truth_tags.csv
and strong.tsv. Runs (same network, epochs and seed everywhere):
  A  separate, WHEN = MMM + HnH, WHO = BCE (this WHO is also the weak-label student)
  B  WHEN pooling: max / noisy-or / attention (+ HnH)     (WHEN only; events use A's WHO)
  C  WHEN MMM without HnH                                  (WHEN only)
     WHO with hinge loss (MultiLabelMarginLoss) / class-balanced sampling (WHO only; events use A's WHEN)
  D  joint (0.5 / 5.0, plain batches) and tied (alternating epochs, own samplers)
  E  pseudo-strong-label student: A's WHO relabels 1 s segments of the training clips with
     soft labels (PSL), a fresh WHO is trained on the segments and scored on whole clips.
  F  events from A: `whenwho_all_tags` (the WHEN x WHO transcription thresholded: every
     detected event gets the clip's tags) vs `whenwho_per_event` (WHEN segments, each named by
     the tag that A's WHO scores highest on the segment alone) vs `whenwho_peak` (one event per
     likely tag, on the segment where WHO scores that tag highest).
  G  class-wise CRNN (frame outputs, HnH batches) trained from the weak tags with MIL pooling
     max / noisy-or / linear-softmax / MMM / attention (`crnn_<pooling>`).
  H  pseudo-strong-label students of the best G row (PSDS1): `psl_frames` (a CRNN trained on the
     weak tags plus frame targets from the teacher's frame probabilities: zeroed outside the clip's
     tags, each tag scaled to peak at 1, then >= 0.5; --psl-targets); `psl_segments_*` (a CRNN
     trained on 1 s segments whose soft labels are the teacher's scores of the segment, zeroed
     outside the clip's tags, as `pseudo-label --segment 1s` + `train --segment-labels` without the
     tag mask), scored by its own frame outputs (`_frames`) or as a clip tagger on sliding 1 s chunks every 64 ms,
     overlap-averaged to frame scores (`_chunks`). With --psl-unlabeled (default) the teacher also
     labels the unlabeled clips and the students train on them.
  I  `crnn_attention_mt`: G's attention CRNN plus a mean-teacher consistency (clip + frame
     probabilities, MSE, EMA teacher) on the unlabeled clips, DCASE task 4 baseline style;
     `crnn_attention_mt_ema` scores the EMA teacher.
  J  decoding of the per-event rows (F): `_extended` (--extend BEFORE AFTER: segments widened,
     `events.extend_events`, WHEN dilated alike for PSDS) and `_tuned` (--tune-decoder N: WHEN
     threshold, median, min-gap and the (before, after) widening, a negative before = onsets later,
     tuned on N unlabeled clips with their strong labels, `tune_per_event`); with --student,
     `crnn_per_event_student`: a class-wise CRNN trained on the training clips' per-event
     events of that decoder (named among the clip's true tags) as frame targets.
  --when-stride 1 gives WHEN/WHO 32 ms output frames; --save-base / --load-base keep and reuse the
  base run's weights (OUT/<base run>_s<stride>.pt), so decoding rows need no retraining.
Figures: WHO mAP / lwlrap / d' (test clips), WHEN frame AUC (any event active at a frame;
frames of 64 ms) and clip AUC; for event outputs collar-based event F1 (200 ms onset collar,
offset collar max(200 ms, 20 % of length)), segment F1 (1 s), and PSDS1 / PSDS2 (DCASE
2021-2023 scenarios, sed_scores_eval; needs pip install 'pllcli[sed]').
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pllcli.events import decode_events, events_to_frames, read_events_tsv
from pllcli.io import Table, write_json
from pllcli.training.weak import (WeakConfig, WhenWhoNet, fit_when_who, pad_features, predict_when_who,
                                  read_tags, segment_views)

log = logging.getLogger("bench_weak")


def encoder_align(frames: np.ndarray, lead: int) -> np.ndarray:
    """Encoder frames (T', D) on the clip's timeline: frame k of an encoder covers
    [k hop, k hop + receptive field), so its centre lies half a receptive field after k hop; the
    first and last frames are repeated `lead` times (round(field / 2 / hop)) so that frame k is
    centred near k hop, as the strong labels and the event decoding assume."""
    if lead <= 0 or len(frames) == 0:
        return frames
    return np.concatenate([np.repeat(frames[:1], lead, 0), frames, np.repeat(frames[-1:], lead, 0)])


def load(data: Path, out: Path, encoder: str | None = None, align: bool = True):
    """The weak corpus as padded tensors; log-mel (hop 256, 40 mels) or, with `encoder` (a
    `featurize --encoder` SPEC), the encoder's frames (store `feats_<config hash>.h5`, aligned
    with `encoder_align` unless `align` is False)."""
    from pllcli.features import FeatureStore
    from pllcli.features.config import FeatureConfig
    store = out / "feats_h256_m40.h5"
    cfg = FeatureConfig.preset("speech8k", hop_length=256, win_length=256, n_fft=512, n_mels=40)
    lead = 0
    if encoder:
        from pllcli.features.config import encoder_config
        cfg = encoder_config(encoder)
        store = out / f"feats_{cfg.hash()}.h5"
        lead = int(round(cfg.win_length / 2 / cfg.hop_length)) if align else 0
    if not store.exists():
        from pllcli.features.extract import featurize
        featurize(str(data / "clips.csv"), store, cfg, jobs=1, progress=False)
    fs = FeatureStore(store)
    get = (lambda c: encoder_align(fs.get(c), lead)) if lead else fs.get
    split = {row["id"]: row["split"] for _, row in Table(data / "clips.csv", required=["id", "split"])}
    classes = sorted({x for _, r in Table(data / "truth_tags.csv") for x in r["labels"].split(";") if x})
    tr_ids, Ytr, _ = read_tags(data / "tags.csv", classes=classes)
    all_ids, Yall, _ = read_tags(data / "truth_tags.csv", classes=classes)
    te = [i for i, cid in enumerate(all_ids) if split[cid] == "test"]
    te_ids, Yte = [all_ids[i] for i in te], Yall[te]
    durations = dict(zip(fs.ids.tolist(), np.asarray(fs.durations, dtype=float).tolist()))
    strong = read_events_tsv(data / "strong.tsv", classes=classes, durations=durations)
    Xtr, Ltr = pad_features([get(c) for c in tr_ids])
    Xte, Lte = pad_features([get(c) for c in te_ids])
    un_ids = [cid for cid, s in split.items() if s == "unlabeled"]
    Xun, Lun = pad_features([get(c) for c in un_ids]) if un_ids else (Xtr[:0], Ltr[:0])
    hop = cfg.hop_length / cfg.sample_rate
    return dict(classes=classes, Xtr=Xtr, Ltr=Ltr, Ytr=Ytr, Xte=Xte, Lte=Lte, Yte=Yte, te_ids=te_ids,
                Xun=Xun, Lun=Lun, strong=strong, hop=hop, durations=durations,
                features=cfg.summary(), align_frames=lead)


def who_metrics(Y, P):
    from pllcli.metrics.multi_label import d_prime, lwlrap, mean_average_precision, roc_auc
    auc = float(np.nanmean(roc_auc(Y, P)))
    return {"who_mAP": mean_average_precision(Y, P), "who_lwlrap": lwlrap(Y, P), "who_auc": auc,
            "who_dprime": d_prime(auc)}


def when_metrics(D, pred, hop_out):
    from sklearn.metrics import roc_auc_score
    ys, ss, clip_y = [], [], []
    for i, cid in enumerate(D["te_ids"]):
        n = int(pred["frame_lengths"][i])
        act = events_to_frames(D["strong"].get(cid, []), D["classes"], n, hop_out).any(1)
        ys.append(act)
        ss.append(pred["when"][i, :n])
        clip_y.append(bool(act.any()) or bool(D["strong"].get(cid)))
    return {"when_frame_auc": float(roc_auc_score(np.concatenate(ys), np.concatenate(ss))),
            "when_clip_auc": float(roc_auc_score(clip_y, pred["when_clip"]))}


DECODE = dict(median=0.192, min_duration=0.1, min_gap=0.1)  # median in seconds: 3 frames of 64 ms


def sed_metrics(D, est, frame_scores, hop_out):
    """Event F1 (collar), segment F1 (1 s) of `est` {id: events}; PSDS1 / PSDS2 of
    `frame_scores` {id: (T, C)} when given and sed_scores_eval is installed."""
    from pllcli.metrics import event_based, sed, segment_based
    ref, _ = sed.merge_overlaps({cid: [tuple(e) for e in D["strong"].get(cid, [])] for cid in D["te_ids"]})
    dur = {cid: D["durations"][cid] for cid in D["te_ids"]}
    f, p, r, _ = event_based.fscore(est, ref, D["classes"], t_collar=0.2, percentage_of_length=0.2)
    sf, *_ = segment_based.fscore(est, ref, D["classes"], time_resolution=1.0, durations=dur)
    out = {"event_f1_micro": float(f["micro_average"]), "event_f1_macro": float(f["macro_average"]),
           "event_precision": float(p["micro_average"]), "event_recall": float(r["micro_average"]),
           "segment_f1_micro": float(sf["micro_average"]), "segment_f1_macro": float(sf["macro_average"])}
    if frame_scores is not None and sed.available():
        rep, _ = sed.psds_from_frames(frame_scores, hop_out, D["classes"], ref, dur)
        out.update({name: r_["value"] for name, r_ in rep.items()})
    return out


def event_metrics(D, when, who, frame_lengths, hop_out, threshold=0.3):
    """WHEN x WHO transcription (T, C) thresholded: every event gets the clip's likely tags."""
    est, frames = {}, {}
    for i, cid in enumerate(D["te_ids"]):
        n = int(frame_lengths[i])
        frames[cid] = when[i, :n, None] * who[i][None, :]
        est[cid] = [tuple(e) for e in decode_events(frames[cid], D["classes"], hop_out, threshold,
                                                     duration=D["durations"][cid], **DECODE)]
    return sed_metrics(D, est, frames, hop_out)


def per_event_outputs(D, model, pred, ids, X, L, hop_out, in_hop, threshold=0.5, tag_threshold=0.5,
                      decode=None, extend=(0.0, 0.0), tags=None, cache=None, crop_extended=False,
                      label_mode="best"):
    """WHEN segments of clips `ids` (inputs X (N, T, F), L (N,); `pred` of predict_when_who) named
    per event -> (best {id: events}: each segment gets the likely tag (WHO >= tag_threshold, else
    the top class; or the clip's `tags` rows (N, C) when given) that WHO scores highest on the
    segment alone, peak {id: events}: one event per likely tag where WHO scores it highest,
    frames {id: (T', C)}: WHEN(t) x WHO(segment) inside segments, WHEN(t) x WHO(clip) elsewhere).
    `decode` (default DECODE) and the WHEN `threshold` give the segments, `extend` = (before,
    after) seconds widens them (`events.widen_spans`; the frame scores' WHEN is dilated alike),
    WHO names them on the segment's frames before widening (after, with `crop_extended`), mode
    `label_mode` of `events.label_segments` ("cover": every likely tag names a segment).
    `cache`: a dict of WHO segment scores kept across calls."""
    from pllcli.events import (dilate, events_at_peaks, label_segments, likely_tags, segment_frame_ranges,
                               when_segments, widen_spans)
    decode = DECODE if decode is None else decode
    cache = {} if cache is None else cache
    segs_of, crops_of, todo = {}, {}, {}
    for i, cid in enumerate(ids):
        n = int(pred["frame_lengths"][i])
        segs = when_segments(pred["when"][i, :n], hop_out, threshold, duration=D["durations"][cid], **decode)
        wide = widen_spans(segs, *extend, duration=D["durations"][cid])
        keep = [k for k, w in enumerate(wide) if w is not None]
        segs_of[cid] = ([segs[k] for k in keep], [wide[k] for k in keep])
        crops_of[cid] = segment_frame_ranges(segs_of[cid][1 if crop_extended else 0], in_hop, int(L[i]))
        for a, b in crops_of[cid]:
            if (cid, a, b) not in cache:
                todo[(cid, a, b)] = X[i, a:b].numpy()
    if todo:
        for key, row in zip(todo, predict_when_who(model, *pad_features(list(todo.values())))["who"]):
            cache[key] = row
    before, after = (int(np.floor(e / hop_out + 0.5)) for e in extend)
    best, peak, frames = {}, {}, {}
    for i, cid in enumerate(ids):
        who, (segs, wide) = pred["who"][i], segs_of[cid]
        clip_tags = np.flatnonzero(tags[i]).tolist() if tags is not None else likely_tags(who, tag_threshold)
        sw = np.array([cache[(cid, a, b)] for a, b in crops_of[cid]]) if segs else np.zeros((0, len(who)))
        named = label_segments(wide, sw, D["classes"], clip_tags, label_mode)   # one per segment, in onset order
        n = int(pred["frame_lengths"][i])
        when = dilate(pred["when"][i, :n], before, after)[:, None]
        fr, evidence = when * who[None, :], np.zeros((n, len(who)))
        for (on, off), row in zip(wide, sw):
            a, b = int(on / hop_out), int(np.ceil(off / hop_out))
            fr[a:b] = when[a:b] * row[None, :]
            evidence[a:b] = row[None, :]
        best[cid] = [tuple(e) for e in named]
        peak[cid] = [tuple(e) for e in events_at_peaks(wide, evidence, hop_out, D["classes"], clip_tags)]
        frames[cid] = fr
    return best, peak, frames


def per_event_metrics(D, model, pred, hop_out, in_hop, threshold=0.5, tag_threshold=0.5, decode=None,
                      extend=(0.0, 0.0), suffix="", crop_extended=False, label_mode="best") -> dict:
    """Figures of `per_event_outputs` on the test clips -> {"whenwho_per_event<suffix>",
    "whenwho_peak<suffix>"}."""
    best, peak, frames = per_event_outputs(D, model, pred, D["te_ids"], D["Xte"], D["Lte"], hop_out, in_hop,
                                           threshold, tag_threshold, decode, extend, crop_extended=crop_extended,
                                           label_mode=label_mode)
    return {f"whenwho_per_event{suffix}": sed_metrics(D, best, frames, hop_out),
            f"whenwho_peak{suffix}": sed_metrics(D, peak, frames, hop_out)}


TUNE_GRID = {"threshold": (0.3, 0.4, 0.5, 0.6, 0.7), "median": (0.064, 0.192, 0.32), "min_gap": (0.0, 0.1, 0.2),
             "extend": tuple((b, f) for b in (-0.128, -0.064, -0.032, 0.0, 0.032, 0.064)
                             for f in (0.0, 0.064, 0.128, 0.192, 0.256) if b + f >= 0),  # before < 0: onsets later
             "crop_extended": (False, True), "label_mode": ("best", "cover")}


def tune_per_event(D, model, hop_out, in_hop, clips: int = 300, grid=None) -> dict:
    """Decoder of `per_event_outputs` tuned on `clips` of the unlabeled clips (never trained on in
    the base run) with their strong labels, coordinate ascent from DECODE / threshold 0.5 / no
    extension over `grid` (default TUNE_GRID; "extend" = (before, after) pairs, searched jointly) on
    event F1 + segment F1 + PSDS1 (one pass per parameter, twice) -> {"params", "objective",
    "validation": figures, "clips", "evaluated"}."""
    grid = TUNE_GRID if grid is None else grid
    ids = [cid for cid in D["un_ids"][:clips]]
    if not ids:
        raise SystemExit("--tune-decoder: the corpus has no unlabeled clips to tune on")
    X, L = D["Xun"][:len(ids)], D["Lun"][:len(ids)]
    pred = predict_when_who(model, X, L)
    V = dict(D, te_ids=ids)
    cache, seen = {}, {}

    def value(p):
        key = tuple(sorted(p.items()))
        if key not in seen:
            dec = {"median": p["median"], "min_duration": DECODE["min_duration"], "min_gap": p["min_gap"]}
            best, _, frames = per_event_outputs(V, model, pred, ids, X, L, hop_out, in_hop, p["threshold"],
                                                decode=dec, extend=tuple(p["extend"]), cache=cache,
                                                crop_extended=p["crop_extended"], label_mode=p["label_mode"])
            m = sed_metrics(V, best, frames, hop_out)
            seen[key] = (m["event_f1_micro"] + m["segment_f1_micro"] + m.get("psds1", 0.0), m)
            log.info("tune %s: %.4f", p, seen[key][0])
        return seen[key]

    p = {"threshold": 0.5, "median": DECODE["median"], "min_gap": DECODE["min_gap"], "extend": (0.0, 0.0),
         "crop_extended": False, "label_mode": "best"}
    for _ in range(2):
        for name, values in grid.items():
            p[name] = max(values, key=lambda v: value(dict(p, **{name: v}))[0])
    obj, m = value(p)
    return {"params": p, "objective": obj, "validation": m, "clips": len(ids), "evaluated": len(seen)}


def _crnn(D, a):
    from pllcli.models import build_model
    return build_model("crnn", D["Xtr"].shape[2], len(D["classes"]), width=a.width, rnn_hidden=32)


def _pad_to(X: torch.Tensor, T: int) -> torch.Tensor:
    """(N, T0, F) -> (N, T, F): cut or zero-pad in time."""
    return torch.nn.functional.pad(X[:, :T], (0, 0, 0, T - min(T, X.shape[1])))


def _weak_loss(out, Y, pooling):
    """MIL loss of frame_logits vs clip targets Y (B, C) in [0, 1]; attention: BCE on the model's
    attention-pooled clip logits."""
    from pllcli.losses.mil import lengths_to_mask, mil_loss
    if pooling == "attention":
        return torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], Y)
    mask = lengths_to_mask(out["frame_lengths"], out["frame_logits"].shape[1])
    return mil_loss(out["frame_logits"], Y, pooling, mask)


def _frame_loss(out, target):
    """BCE of frame_logits (B, T', C) vs soft frame targets (B, >= T', C) over the valid frames."""
    from pllcli.losses.mil import lengths_to_mask
    z = out["frame_logits"]
    m = lengths_to_mask(out["frame_lengths"], z.shape[1]).to(z.dtype)[..., None]
    per = torch.nn.functional.binary_cross_entropy_with_logits(z, target[:, :z.shape[1]], reduction="none")
    return (per * m).sum() / (m.sum() * z.shape[2]).clamp_min(1.0)


class _MeanTeacher:
    """Mean teacher, DCASE task 4 baseline style: an EMA copy of the student; MSE consistency of
    clip and frame probabilities on the whole batch (labelled clips + as many unlabeled ones),
    weight ramped up as exp(-5 (1 - t)^2) over the first 30 % of the steps."""

    def __init__(self, model, Xu, Lu, weight: float, decay: float, total_steps: int, seed: int):
        import copy
        if not len(Xu):
            raise SystemExit("mean teacher: the corpus has no unlabeled clips "
                             "(make_weak_corpus.py --unlabeled-fraction)")
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.Xu, self.Lu, self.weight, self.decay = Xu, Lu, weight, decay
        self.ramp, self.step, self.last = max(1, int(0.3 * total_steps)), 0, float("nan")
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, X, L):
        """(X (B, T, F), L (B,)) with B unlabeled clips appended, padded to one length."""
        u = torch.randint(len(self.Xu), (len(X),), generator=self.gen)
        T = int(max(L.max(), self.Lu[u].max()))
        return torch.cat([_pad_to(X, T), _pad_to(self.Xu[u], T)]), torch.cat([L, self.Lu[u]])

    def loss(self, out, X, L):
        from pllcli.losses.mil import lengths_to_mask
        from pllcli.losses.semi import consistency_loss
        with torch.no_grad():
            t = self.ema(X, L)
        m = lengths_to_mask(out["frame_lengths"], out["frame_logits"].shape[1])
        c = (consistency_loss(out["logits"], t["logits"], "mse", True)
             + consistency_loss(out["frame_logits"][m], t["frame_logits"][m], "mse", True))
        self.last = float(c.detach())
        return self.weight * math.exp(-5 * (1 - min(1.0, self.step / self.ramp)) ** 2) * c

    def update(self, model):
        from pllcli.losses.semi import ema_update
        ema_update(self.ema, model, self.decay, self.step)
        self.step += 1


def fit_crnn(D, pooling, a, X=None, L=None, Y=None, frame_targets=None, mean_teacher=False):
    """Class-wise CRNN from clip targets Y (N, C) in [0, 1] (default: the training clips' weak
    tags) with the MIL loss of `pooling`, half-and-half batches (positive: a target >= 0.5),
    AdamW + one-cycle. frame_targets (N, T', C): soft frame labels (pseudo-strong student), frame
    BCE added. mean_teacher: `_MeanTeacher` on the unlabeled clips -> (student, the _MeanTeacher)."""
    from pllcli.sampling import HalfAndHalfSampler
    X, L = (D["Xtr"], D["Ltr"]) if X is None else (X, L)
    Y = torch.as_tensor(np.asarray(D["Ytr"] if Y is None else Y, dtype=np.float32))
    torch.manual_seed(a.seed)
    model = _crnn(D, a)
    frames = torch.cat([X[i, :int(n)] for i, n in enumerate(L)])
    model.encoder.norm.set_stats(frames.mean(0), frames.std(0))
    positive = (Y >= 0.5).any(1).numpy()
    if not positive.any():  # a weak teacher's soft labels: its more confident half counts as positive
        top = Y.max(1).values.numpy()
        positive = top >= np.median(top)
        log.warning("no target reaches 0.5; half-and-half batches use the %d most confident items", positive.sum())
    sampler = HalfAndHalfSampler(positive, a.batch_size, seed=a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    total = a.epochs * len(sampler)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=total, pct_start=0.15)
    mt = _MeanTeacher(model, D["Xun"], D["Lun"], a.mt_weight, a.mt_decay, total, a.seed) if mean_teacher else None
    model.train()
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        for b in sampler:
            b = torch.as_tensor(np.asarray(b), dtype=torch.long)
            xb, lb = X[b, :int(L[b].max())], L[b]
            if mt is not None:
                xb, lb = mt.batch(xb, lb)
            out = model(xb, lb)
            lab = {k: out[k][:len(b)] for k in ("logits", "frame_logits", "frame_lengths")}
            loss = _weak_loss(lab, Y[b], pooling)
            if frame_targets is not None:
                loss = loss + _frame_loss(lab, frame_targets[b])
            if mt is not None:
                loss = loss + mt.loss(out, xb, lb)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            if mt is not None:
                mt.update(model)
    return (model, mt) if mt is not None else model


@torch.no_grad()
def _forward(model, X, L, batch_size: int = 64):
    """-> clip probabilities (N, C) (the model's pooled logits) and frame probabilities [(T'_i, C)]."""
    model.eval()
    clip, frames = [], []
    for s in range(0, len(X), batch_size):
        Lb = L[s:s + batch_size]
        out = model(X[s:s + batch_size, :int(Lb.max())], Lb)
        clip.append(torch.sigmoid(out["logits"]).numpy())
        fp = torch.sigmoid(out["frame_logits"]).numpy()
        frames += [fp[j, :n] for j, n in enumerate(out["frame_lengths"].tolist())]
    return np.concatenate(clip), frames


def decoded_metrics(D, frames: dict, hop: float, threshold: float = 0.5) -> dict:
    """WHO figures of the clip scores max_t frames (T, C), and the SED figures of the events
    decoded from `frames` {test id: (T, C)} (DECODE at `threshold`)."""
    est = {cid: [tuple(e) for e in decode_events(f, D["classes"], hop, threshold, duration=D["durations"][cid],
                                                  **DECODE)] for cid, f in frames.items()}
    res = who_metrics(D["Yte"], np.stack([frames[cid].max(0) for cid in D["te_ids"]]))
    res.update(sed_metrics(D, est, frames, hop))
    return res


def crnn_metrics(D, model, hop_out):
    """Figures of a CRNN's own frame outputs on the test clips."""
    return decoded_metrics(D, dict(zip(D["te_ids"], _forward(model, D["Xte"], D["Lte"])[1])), hop_out)


def chunk_metrics(D, model, window: int, hop_frames: int):
    """Figures of a model used as a clip tagger on sliding chunks (`window` input frames every
    `hop_frames`), overlap-averaged to frame scores at the input hop (`events.overlap_average`)."""
    from pllcli.events import overlap_average, sliding_windows
    crops, spans = [], []
    for i in range(len(D["te_ids"])):
        n = int(D["Lte"][i])
        spans.append((n, sliding_windows(n, window, hop_frames)))
        crops += [D["Xte"][i, a:b].numpy() for a, b in spans[-1][1]]
    probs = _forward(model, *pad_features(crops))[0]
    frames, k = {}, 0
    for cid, (n, r) in zip(D["te_ids"], spans):
        frames[cid] = overlap_average(probs[k:k + len(r)], r, n)
        k += len(r)
    return decoded_metrics(D, frames, D["hop"])


def run_crnns(D, a, hop_out, results) -> dict:
    """The class-wise CRNN runs (one per MIL pooling in --crnn-poolings) into `results`;
    returns {name: model}."""
    models = {}
    for pooling in a.crnn_poolings:
        name = f"crnn_{pooling}"
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        models[name] = fit_crnn(D, pooling, a)
        results[name] = {"train_seconds": round(time.perf_counter() - t0, 1),
                         **crnn_metrics(D, models[name], hop_out)}
        log.info("%s: %s", name, {k: round(v, 4) for k, v in results[name].items()})
    return models


def frame_targets(probs: np.ndarray, tags: np.ndarray | None, kind: str) -> np.ndarray:
    """Teacher frame probabilities (T', C) -> pseudo-strong frame targets. With the clip's tags
    (C,): zeroed outside them, and for kind "peak" / "hard" each tag's scores divided by their
    maximum in the clip (the tag occurs somewhere); "hard": those >= 0.5. Without tags
    (unlabeled clips): the probabilities ("raw", "peak") or probabilities >= 0.5 ("hard")."""
    f = np.asarray(probs, np.float32)
    if tags is not None:
        f = f * tags[None]
        if kind != "raw":
            f = f / np.maximum(f.max(0, keepdims=True), 1e-6)
    return (f >= 0.5).astype(np.float32) if kind == "hard" else f


def psl_pool(D, teacher, with_unlabeled: bool, kind: str = "hard"):
    """Training clips (+ the unlabeled clips) relabelled by `teacher` -> X, L, Y (N, C), frame
    targets (N, T', C) (`frame_targets` of `kind`), n_labelled: labelled clips keep their tags as
    Y; unlabeled clips get the teacher's clip probabilities."""
    X, L, Y = D["Xtr"], D["Ltr"], np.asarray(D["Ytr"], np.float32)
    frames = [frame_targets(f, Y[i], kind) for i, f in enumerate(_forward(teacher, X, L)[1])]
    if with_unlabeled and len(D["Xun"]):
        cu, fu = _forward(teacher, D["Xun"], D["Lun"])
        T = max(X.shape[1], D["Xun"].shape[1])
        X, L = torch.cat([_pad_to(X, T), _pad_to(D["Xun"], T)]), torch.cat([L, D["Lun"]])
        Y, frames = np.concatenate([Y, cu]), frames + [frame_targets(f, None, kind) for f in fu]
    return X, L, Y, pad_features(frames)[0], len(D["Xtr"])


def run_students(D, a, hop_out, results, models) -> None:
    """Pseudo-strong-label students of the best CRNN teacher, and the mean-teacher CRNN."""
    want = lambda n: not a.only or n in a.only  # noqa: E731
    students = ("psl_frames", "psl_segments_frames", "psl_segments_chunks")
    if any(want(n) for n in students):
        if not models:
            models = {"crnn_attention": fit_crnn(D, "attention", a)}
        name = max(models, key=lambda n: (results.get(n, {}).get("psds1", 0.0),
                                          results.get(n, {}).get("event_f1_micro", 0.0)))
        teacher, pooling = models[name], name[len("crnn_"):]
        log.info("pseudo-strong teacher: %s", name)
        X, L, Y, frame_tgt, n_lab = psl_pool(D, teacher, a.psl_unlabeled, a.psl_targets)
        info = {"teacher": name, "pseudo_labelled_clips": int(len(X) - n_lab)}
        if want("psl_frames"):
            t0 = time.perf_counter()
            student = fit_crnn(D, pooling, a, X, L, Y, frame_targets=frame_tgt)
            results["psl_frames"] = {"train_seconds": round(time.perf_counter() - t0, 1), **info,
                                     "targets": a.psl_targets,
                                     **crnn_metrics(D, student, hop_out)}
        if want("psl_segments_frames") or want("psl_segments_chunks"):
            seg = max(1, int(round(a.psl_segment / D["hop"])))
            Xs, Ls, owner = segment_views(X, L, seg)
            soft = _forward(teacher, Xs, Ls)[0]
            lab = owner < n_lab
            soft[lab] *= Y[owner[lab]]   # a segment of a labelled clip holds only the clip's tags
            t0 = time.perf_counter()
            student = fit_crnn(D, pooling, a, Xs, Ls, soft)
            seg_info = {"train_seconds": round(time.perf_counter() - t0, 1), **info, "segments": int(len(Xs)),
                        "segment_seconds": a.psl_segment}
            if want("psl_segments_frames"):
                results["psl_segments_frames"] = {**seg_info, **crnn_metrics(D, student, hop_out)}
            if want("psl_segments_chunks"):
                results["psl_segments_chunks"] = {**seg_info, "chunk_hop_seconds": 2 * D["hop"],
                                                  **chunk_metrics(D, student, seg, 2)}
    if want("crnn_attention_mt") or want("crnn_attention_mt_ema"):
        t0 = time.perf_counter()
        student, mt = fit_crnn(D, "attention", a, mean_teacher=True)
        sec = {"train_seconds": round(time.perf_counter() - t0, 1), "unlabeled_clips": int(len(D["Xun"])),
               "last_consistency_mse": mt.last}   # unweighted, last batch
        results["crnn_attention_mt"] = {**sec, **crnn_metrics(D, student, hop_out)}
        results["crnn_attention_mt_ema"] = {**sec, **crnn_metrics(D, mt.ema, hop_out)}
    for n in students + ("crnn_attention_mt", "crnn_attention_mt_ema"):
        if n in results:
            log.info("%s: %s", n, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[n].items()})


def per_event_student(D, a, teacher, hop_out, decode_kw: dict) -> dict:
    """`crnn_per_event_student`: a class-wise attention CRNN trained on the training clips' weak
    tags plus hard frame targets (N, T', C) = the teacher's per-event WHEN/WHO events (named among
    the clip's true tags, `per_event_outputs` with `decode_kw`) rasterised at the CRNN's frame hop."""
    from pllcli.events import events_to_frames
    X, L = D["Xtr"], D["Ltr"]
    pred = predict_when_who(teacher, X, L)
    ids = [f"train{i}" for i in range(len(X))]
    V = dict(D, durations={cid: float(L[i]) * D["hop"] for i, cid in enumerate(ids)})
    best, _, _ = per_event_outputs(V, teacher, pred, ids, X, L, hop_out, D["hop"], tags=np.asarray(D["Ytr"]),
                                   **decode_kw)
    crnn_hop = D["hop"] * 2
    targets = [events_to_frames(best[cid], D["classes"], int(L[i]) // 2 + 1, crnn_hop).astype(np.float32)
               for i, cid in enumerate(ids)]
    t0 = time.perf_counter()
    student = fit_crnn(D, "attention", a, X, L, D["Ytr"], frame_targets=pad_features(targets)[0])
    return {"train_seconds": round(time.perf_counter() - t0, 1), "pseudo_events": int(sum(map(len, best.values()))),
            "teacher_decoder": {k: (list(v) if isinstance(v, tuple) else v) for k, v in decode_kw.items()},
            **crnn_metrics(D, student, crnn_hop)}


def segment_who_student(D, a, teacher, net, hop_out, decode_kw: dict):
    """A fresh WHO (`net()`, WHO task only, class-balanced) trained on crops of the training clips'
    per-event events (the teacher's WHEN segments named among the clip's true tags, `per_event_outputs`
    with `decode_kw`, label mode "cover"), one-hot targets -> (model, crops). It names test segments
    instead of the clip WHO (`whenwho_per_event_segwho`)."""
    from pllcli.events import segment_frame_ranges
    X, L = D["Xtr"], D["Ltr"]
    pred = predict_when_who(teacher, X, L)
    ids = [f"train{i}" for i in range(len(X))]
    V = dict(D, durations={cid: float(L[i]) * D["hop"] for i, cid in enumerate(ids)})
    kw = dict(decode_kw, label_mode="cover")
    best, _, _ = per_event_outputs(V, teacher, pred, ids, X, L, hop_out, D["hop"], tags=np.asarray(D["Ytr"]), **kw)
    index = {c: k for k, c in enumerate(D["classes"])}
    crops, Y = [], []
    for i, cid in enumerate(ids):
        for (on, off, lab), (s0, s1) in zip(best[cid], segment_frame_ranges([e[:2] for e in best[cid]], D["hop"],
                                                                            int(L[i]))):
            crops.append(X[i, s0:s1].numpy())
            Y.append(np.eye(len(D["classes"]), dtype=np.float32)[index[lab]])
    Xs, Ls = pad_features(crops)
    model = net()
    torch.manual_seed(a.seed)
    fit_when_who(model, Xs, Ls, np.stack(Y), WeakConfig(mode="separate", tasks=("who",), when_hnh=False,
                                                         who_sampler="balanced", epochs=a.epochs,
                                                         batch_size=a.batch_size, seed=a.seed, lr=a.lr))
    return model, len(crops)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/work/runs/weak"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mel-pool", type=int, default=None,
                    help="average adjacent mel bands (40 -> 20) to save time (default 2; 1 with --encoder)")
    ap.add_argument("--encoder", default=None, metavar="SPEC",
                    help="train on a pretrained encoder's frames (`pllcli featurize --encoder SPEC`) instead of log-mel")
    ap.add_argument("--no-encoder-align", action="store_true",
                    help="keep encoder frame k at k hop (no half-receptive-field shift, see encoder_align)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--when-epochs", type=int, default=None, help="epochs of the WHEN-only runs (default --epochs)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N train/test clips (smoke test)")
    ap.add_argument("--base-when-pooling", default="mmm", help="WHEN loss of the base separate run")
    ap.add_argument("--base-who-sampler", default="random", help="WHO sampler of the base run: random|balanced")
    ap.add_argument("--only", nargs="*", default=None, help="run names to run (default all)")
    ap.add_argument("--crnn-poolings", nargs="*", default=["max", "noisy_or", "linear_softmax", "mmm", "attention"],
                    help="MIL poolings of the class-wise CRNN runs (none: skip them)")
    ap.add_argument("--psl-segment", type=float, default=1.0, help="segment seconds of the psl_segments_* student")
    ap.add_argument("--psl-unlabeled", action=argparse.BooleanOptionalAction, default=True,
                    help="the pseudo-strong students also train on the teacher's labels of the unlabeled clips")
    ap.add_argument("--mt-weight", type=float, default=2.0, help="mean-teacher consistency weight (after ramp-up)")
    ap.add_argument("--psl-targets", choices=("raw", "peak", "hard"), default="hard",
                    help="frame targets of psl_frames (see frame_targets)")
    ap.add_argument("--mt-decay", type=float, default=0.99, help="mean-teacher EMA decay")
    ap.add_argument("--when-stride", type=int, default=2,
                    help="time pooling of the WHEN/WHO trunks (2: 64 ms output frames, 1: 32 ms)")
    ap.add_argument("--save-base", action="store_true",
                    help="save the base run's weights and test predictions to "
                         "OUT/<base run>_s<stride>[_seed<seed>].pt")
    ap.add_argument("--load-base", type=Path, default=None,
                    help="a --save-base file: the base run's weights instead of training it (same data options)")
    ap.add_argument("--extend", type=float, nargs=2, default=None, metavar=("BEFORE", "AFTER"),
                    help="also score the per-event rows with segments widened by these seconds (`_extended`)")
    ap.add_argument("--tune-decoder", type=int, default=0, metavar="CLIPS",
                    help="also score the per-event rows with the decoder tuned on this many unlabeled clips "
                         "(strong labels; `_tuned`, see tune_per_event)")
    ap.add_argument("--segment-who", action="store_true",
                    help="whenwho_per_event_segwho: segments named by a WHO trained on the training clips' "
                         "per-event crops (segment_who_student; tuned decoder with --tune-decoder)")
    ap.add_argument("--student", action="store_true",
                    help="crnn_per_event_student: a CRNN trained on the base run's per-event pseudo-strong labels "
                         "(tuned decoder with --tune-decoder)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    if a.mel_pool is None:
        a.mel_pool = 1 if a.encoder else 2
    D = load(a.data, a.out, a.encoder, align=not a.no_encoder_align)
    D["un_ids"] = [r["id"] for _, r in Table(a.data / "clips.csv", required=["id", "split"])
                   if r["split"] == "unlabeled"]   # the order of load()'s Xun
    if a.mel_pool > 1:
        for k in ("Xtr", "Xte", "Xun"):
            X = D[k]
            F_ = X.shape[2] // a.mel_pool * a.mel_pool
            D[k] = X[:, :, :F_].reshape(X.shape[0], X.shape[1], F_ // a.mel_pool, a.mel_pool).mean(-1).contiguous()
    if a.limit:
        for k in ("Xtr", "Ltr", "Ytr", "Xte", "Lte", "Yte", "te_ids", "Xun", "Lun", "un_ids"):
            D[k] = D[k][:a.limit]
    C = len(D["classes"])
    stride = a.when_stride
    hop_out = D["hop"] * stride
    results: dict[str, dict] = {}

    def net(shared):
        return WhenWhoNet(D["Xtr"].shape[2], C, width=a.width, rnn_hidden=32, time_stride=stride, shared=shared)

    def run(name, model, cfg, X=None, L=None, Y=None):
        if a.only and name not in a.only:
            return None
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        hist = fit_when_who(model, D["Xtr"] if X is None else X, D["Ltr"] if L is None else L,
                            D["Ytr"] if Y is None else Y, cfg)
        pred = predict_when_who(model, D["Xte"], D["Lte"], when_pooling=cfg.when_pooling)
        res = {"train_seconds": round(time.perf_counter() - t0, 1), "final": hist[-1]}
        if "who" in cfg.tasks or cfg.mode == "joint":
            res.update(who_metrics(D["Yte"], pred["who"]))
        if "when" in cfg.tasks or cfg.mode == "joint":
            res.update(when_metrics(D, pred, hop_out))
        results[name] = res
        if a.json:  # partial results survive an interrupted run
            write_json({"partial": True, "results": results}, a.json)
        log.info("%s: %s", name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                                   if k != "final"})
        return pred

    base = dict(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, lr=a.lr)
    wbase = dict(base, epochs=a.when_epochs or a.epochs)
    teacher = net(False)
    base_name = f"separate_{a.base_when_pooling}_hnh" + ("_balanced" if a.base_who_sampler == "balanced" else "")
    if a.load_base is not None:
        saved = torch.load(a.load_base, weights_only=False)
        teacher.load_state_dict(saved["state_dict"])
        pA = predict_when_who(teacher, D["Xte"], D["Lte"], when_pooling=a.base_when_pooling)
        results[base_name] = {"loaded": str(a.load_base), **who_metrics(D["Yte"], pA["who"]),
                              **when_metrics(D, pA, hop_out)}
    else:
        pA = run(base_name, teacher, WeakConfig(mode="separate", when_pooling=a.base_when_pooling,
                                               who_sampler=a.base_who_sampler, **base))
    if pA is not None and a.save_base:
        torch.save({"state_dict": teacher.state_dict(), "config": teacher.config, "pred": pA,
                    "hop_out": hop_out, "mel_pool": a.mel_pool},
                   a.out / f"{base_name}_s{stride}{f'_seed{a.seed}' if a.seed else ''}.pt")
    if pA is not None:
        results["whenwho_all_tags"] = event_metrics(D, pA["when"], pA["who"], pA["frame_lengths"], hop_out)
        results[base_name].update(results["whenwho_all_tags"])
        rows = per_event_metrics(D, teacher, pA, hop_out, D["hop"])
        if a.extend:
            rows.update(per_event_metrics(D, teacher, pA, hop_out, D["hop"], extend=tuple(a.extend),
                                          suffix="_extended"))
        decode_kw = {"extend": tuple(a.extend)} if a.extend else {}
        if a.tune_decoder:
            tuned = tune_per_event(D, teacher, hop_out, D["hop"], a.tune_decoder)
            p = tuned["params"]
            decode_kw = {"threshold": p["threshold"], "extend": tuple(p["extend"]),
                         "crop_extended": p["crop_extended"], "label_mode": p["label_mode"],
                         "decode": {"median": p["median"], "min_duration": DECODE["min_duration"],
                                    "min_gap": p["min_gap"]}}
            rows.update(per_event_metrics(D, teacher, pA, hop_out, D["hop"], suffix="_tuned", **decode_kw))
            rows["whenwho_per_event_tuned"]["tuning"] = tuned
        for name, res in rows.items():
            results[name] = res
            log.info("%s: %s", name, {k: round(v, 4) for k, v in res.items() if isinstance(v, float)})
        if a.segment_who:
            t0 = time.perf_counter()
            seg_who, n_crops = segment_who_student(D, a, teacher, lambda: net(False), hop_out, decode_kw)
            kw = dict(decode_kw, crop_extended=True)   # it trained on crops of the widened segments
            res = per_event_metrics(D, seg_who, pA, hop_out, D["hop"], suffix="_segwho", **kw)
            results["whenwho_per_event_segwho"] = {"train_seconds": round(time.perf_counter() - t0, 1),
                                                   "crops": n_crops, **res["whenwho_per_event_segwho"]}
            log.info("whenwho_per_event_segwho: %s", {k: round(v, 4) for k, v in
                                                      results["whenwho_per_event_segwho"].items()
                                                      if isinstance(v, float)})
        if a.student and (not a.only or "crnn_per_event_student" in a.only or base_name in a.only):
            results["crnn_per_event_student"] = per_event_student(D, a, teacher, hop_out, decode_kw)
            log.info("crnn_per_event_student: %s", {k: round(v, 4) for k, v in results["crnn_per_event_student"].items()
                                                    if isinstance(v, float)})
        if a.json:
            write_json({"partial": True, "results": results}, a.json)
    models = run_crnns(D, a, hop_out, results)
    run_students(D, a, hop_out, results, models)
    del models
    for pooling in ("mmm", "max", "noisy_or", "attention"):
        p = run(f"when_{pooling}_hnh", net(False), WeakConfig(mode="separate", when_pooling=pooling,
                                                                tasks=("when",), **wbase))
        if p is not None and pA is not None:
            results[f"when_{pooling}_hnh"].update(event_metrics(D, p["when"], pA["who"], p["frame_lengths"], hop_out))
    p = run("when_mmm_no_hnh", net(False), WeakConfig(mode="separate", when_hnh=False, tasks=("when",), **wbase))
    if p is not None and pA is not None:
        results["when_mmm_no_hnh"].update(event_metrics(D, p["when"], pA["who"], p["frame_lengths"], hop_out))
    for mode in ("joint", "tied"):
        p = run(mode, net(True), WeakConfig(mode=mode, **base))
        if p is not None:
            results[mode].update(event_metrics(D, p["when"], p["who"], p["frame_lengths"], hop_out))
    if pA is not None and (not a.only or "psl_student" in a.only):
        seg = int(round(1.0 / D["hop"]))  # 1 s segments
        Xs, Ls, owner = segment_views(D["Xtr"], D["Ltr"], seg)
        with torch.no_grad():
            soft = predict_when_who(teacher, Xs, Ls)["who"].astype(np.float32)
        p = run("psl_student", net(False), WeakConfig(mode="separate", tasks=("who",), when_hnh=False, **base),
                X=Xs, L=Ls, Y=soft)
        if p is not None:
            results["psl_student"]["segments"] = int(len(Xs))
            results["psl_student"].update(event_metrics(D, pA["when"], p["who"], pA["frame_lengths"], hop_out))
    for name, kw in (("who_hinge", dict(who_loss="hinge")), ("who_balanced", dict(who_sampler="balanced"))):
        p = run(name, net(False), WeakConfig(mode="separate", tasks=("who",), when_hnh=False, **kw, **base))
        if p is not None and pA is not None:
            results[name].update(event_metrics(D, pA["when"], p["who"], pA["frame_lengths"], hop_out))
    out = {"data": str(a.data), "epochs": a.epochs, "lr": a.lr, "when_only_epochs": wbase["epochs"],
           "limit": a.limit, "mel_pool": a.mel_pool, "batch_size": a.batch_size, "width": a.width,
           "seed": a.seed, "frame_hop_s": hop_out, "train_clips": int(len(D["Xtr"])),
           "test_clips": int(len(D["Xte"])), "results": results,
           "wall_seconds": round(time.perf_counter() - t_all, 1)}
    out.update({"features": D["features"], "encoder": a.encoder, "encoder_align_frames": D["align_frames"]})
    cols = ["who_mAP", "who_dprime", "when_frame_auc", "event_f1_micro", "segment_f1_micro", "psds1", "psds2",
            "train_seconds"]
    print(f"{'run':22s} " + " ".join(f"{c:>14s}" for c in cols))
    for name, r in results.items():
        cells = [f"{r[c]:14.3f}" if isinstance(r.get(c), float) else f"{'-':>14s}" for c in cols]
        print(f"{name:22s} " + " ".join(cells))
    if a.json:
        write_json(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
