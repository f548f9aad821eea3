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
Figures: WHO mAP / lwlrap / d' (test clips), WHEN frame AUC (any event active at a frame;
frames of 64 ms) and clip AUC, event-based F1 (sed_eval definition, 200 ms onset collar,
offset collar max(200 ms, 50 % of length)) of the WHEN x WHO transcription.
"""
from __future__ import annotations

import argparse
import logging
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


def load(data: Path, out: Path):
    from pllcli.features import FeatureStore
    from pllcli.features.config import FeatureConfig
    store = out / "feats_h256_m40.h5"
    cfg = FeatureConfig.preset("speech8k", hop_length=256, win_length=256, n_fft=512, n_mels=40)
    if not store.exists():
        from pllcli.features.extract import featurize
        featurize(str(data / "clips.csv"), store, cfg, jobs=1, progress=False)
    fs = FeatureStore(store)
    split = {row["id"]: row["split"] for _, row in Table(data / "clips.csv", required=["id", "split"])}
    classes = sorted({x for _, r in Table(data / "truth_tags.csv") for x in r["labels"].split(";") if x})
    tr_ids, Ytr, _ = read_tags(data / "tags.csv", classes=classes)
    all_ids, Yall, _ = read_tags(data / "truth_tags.csv", classes=classes)
    te = [i for i, cid in enumerate(all_ids) if split[cid] == "test"]
    te_ids, Yte = [all_ids[i] for i in te], Yall[te]
    durations = dict(zip(fs.ids.tolist(), np.asarray(fs.durations, dtype=float).tolist()))
    strong = read_events_tsv(data / "strong.tsv", classes=classes, durations=durations)
    Xtr, Ltr = pad_features([fs.get(c) for c in tr_ids])
    Xte, Lte = pad_features([fs.get(c) for c in te_ids])
    hop = cfg.hop_length / cfg.sample_rate
    return dict(classes=classes, Xtr=Xtr, Ltr=Ltr, Ytr=Ytr, Xte=Xte, Lte=Lte, Yte=Yte, te_ids=te_ids,
                strong=strong, hop=hop, durations=durations)


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


def event_metrics(D, when, who, frame_lengths, hop_out, threshold=0.3):
    from pllcli.metrics.event_based import fscore
    est = {}
    for i, cid in enumerate(D["te_ids"]):
        n = int(frame_lengths[i])
        tr = when[i, :n, None] * who[i][None, :]
        est[cid] = [tuple(e) for e in decode_events(tr, D["classes"], hop_out, threshold, median=3,
                                                     min_duration=0.1, min_gap=0.1,
                                                     duration=D["durations"][cid])]
    ref = {cid: [tuple(e) for e in D["strong"].get(cid, [])] for cid in D["te_ids"]}
    f, p, r, _ = fscore(est, ref, D["classes"], t_collar=0.2)
    return {"event_f1_micro": float(f["micro_average"]), "event_f1_macro": float(f["macro_average"]),
            "event_precision": float(p["micro_average"]), "event_recall": float(r["micro_average"])}


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
    ap.add_argument("--mel-pool", type=int, default=2, help="average adjacent mel bands (40 -> 20) to save time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--when-epochs", type=int, default=None, help="epochs of the WHEN-only runs (default --epochs)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N train/test clips (smoke test)")
    ap.add_argument("--base-when-pooling", default="mmm", help="WHEN loss of the base separate run")
    ap.add_argument("--base-who-sampler", default="random", help="WHO sampler of the base run: random|balanced")
    ap.add_argument("--only", nargs="*", default=None, help="run names to run (default all)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    D = load(a.data, a.out)
    if a.mel_pool > 1:
        for k in ("Xtr", "Xte"):
            X = D[k]
            F_ = X.shape[2] // a.mel_pool * a.mel_pool
            D[k] = X[:, :, :F_].reshape(X.shape[0], X.shape[1], -1, a.mel_pool).mean(-1).contiguous()
    if a.limit:
        for k in ("Xtr", "Ltr", "Ytr", "Xte", "Lte", "Yte", "te_ids"):
            D[k] = D[k][:a.limit]
    C = len(D["classes"])
    stride = 2
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
    pA = run(base_name, teacher, WeakConfig(mode="separate", when_pooling=a.base_when_pooling,
                                           who_sampler=a.base_who_sampler, **base))
    if pA is not None:
        results[base_name].update(event_metrics(D, pA["when"], pA["who"], pA["frame_lengths"], hop_out))
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
    cols = ["who_mAP", "who_lwlrap", "who_dprime", "when_frame_auc", "when_clip_auc", "event_f1_micro",
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
