"""Benchmark: FSDD spoken digits with few labels (issue 6).

Conventional split: takes 0-4 of every speaker/digit are the test set; of the training takes,
5 clips per class keep their label and the rest are unlabeled. Reports test accuracy of:
supervised-only, each semi-supervised objective, contrastive pretrain + fine-tune, pretrain +
linear probe, the best combination, and full labels.

    flock /tmp/pllcli-bench.lock python examples/bench_ssl.py /work/shared/data/fsdd/recordings \
        --work /work/runs/ssl --json /work/runs/ssl/bench_ssl.json

Notes: the trainer has no labeled/unlabeled batch-ratio sampler, so the labeled clips are
replicated (`--replicate`, ids "<id>#k") in the training store for the semi-supervised runs so
that each batch holds labeled items. Evaluation uses last.pt (no validation split: 50 labels).
Everything goes through the library: pllcli.features (featurize), pllcli.training.trainer.train,
pllcli.pretrain.pretrain.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = [str(d) for d in range(10)]


def split_stores(work: Path, src_store: Path, per_class: int, replicate: int, seed: int):
    from pllcli.features.store import FeatureStore, write_feature_store
    from pllcli.labels.store import LabelData, write_label_store
    fs = FeatureStore(src_store)
    feats, offs = fs.load_all()
    ids = [str(i) for i in fs.ids]
    digit = np.array([int(i.split("_")[0]) for i in ids])
    take = np.array([int(i.split("_")[-1]) for i in ids])
    test = np.flatnonzero(take <= 4)
    train = np.flatnonzero(take > 4)
    rng = np.random.default_rng(seed)
    labeled = np.sort(np.concatenate([rng.choice(train[digit[train] == d], per_class, replace=False)
                                      for d in range(10)]))

    def items(rows, suffix=""):
        for r in rows:
            yield {"id": ids[r] + suffix, "features": feats[offs[r]:offs[r + 1]], "duration": float(fs.durations[r])}

    def write(name, rows_with_suffix, clean_fn):
        fpath, lpath = work / f"{name}_feats.h5", work / f"{name}_labels.h5"
        all_items = [it for rows, suf in rows_with_suffix for it in items(rows, suf)]
        write_feature_store(fpath, fs.config, all_items)
        lid = [it["id"] for it in all_items]
        clean = [clean_fn(i) for i in lid]
        write_label_store(lpath, LabelData.new(lid, CLASSES, clean=clean), {"bench": name})
        return fpath, lpath

    lab_set = {ids[r] for r in labeled}
    base = lambda i: i.split("#")[0]  # noqa: E731
    dig = lambda i: int(i.split("_")[0])  # noqa: E731
    out = {
        "test": write("test", [(test, "")], lambda i: dig(i)),
        "full": write("full", [(train, "")], lambda i: dig(i)),
        "few": write("few", [(labeled, "")], lambda i: dig(i)),
        "semi": write("semi", [(train, "")] + [(labeled, f"#{k}") for k in range(1, replicate)],
                      lambda i: dig(i) if base(i) in lab_set else -1),
        "unlab": write("unlab", [(train, "")], lambda i: -1),
    }
    return out, {"train": len(train), "test": len(test), "labeled": len(labeled)}


def accuracy(ckpt: Path, test_feats: Path) -> float:
    import torch
    from pllcli.checkpoint import load_model
    from pllcli.features.store import FeatureStore
    model, meta = load_model(ckpt)
    fs = FeatureStore(test_feats)
    y = np.array([int(str(i).split("_")[0]) for i in fs.ids])
    order = np.argsort(fs.num_frames)
    pred = np.zeros(len(fs), np.int64)
    with torch.no_grad():
        for s in range(0, len(order), 128):
            rows = order[s:s + 128]
            xs = [fs[r] for r in rows]
            ln = torch.tensor([len(x) for x in xs])
            x = torch.zeros(len(xs), int(ln.max()), xs[0].shape[1])
            fill = model.encoder.norm.mean
            x[:] = fill
            for k, a in enumerate(xs):
                x[k, :len(a)] = torch.from_numpy(a)
            pred[rows] = model(x, ln)["logits"].argmax(1).numpy()
    classes = [int(c) for c in meta["classes"]]
    return float((np.asarray(classes)[pred] == y).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="FSDD recordings folder ({digit}_{speaker}_{take}.wav)")
    ap.add_argument("--work", default="/work/runs/ssl")
    ap.add_argument("--json", default=None)
    ap.add_argument("--epochs", type=int, default=12, help="epochs of the semi-supervised runs")
    ap.add_argument("--sup-epochs", type=int, default=150, help="epochs of the 50-label supervised runs")
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--replicate", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--methods", default="all", help="comma list or 'all'")
    ap.add_argument("--model-opt", default="width=16,rnn_hidden=64,proj=96")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from pllcli.features.config import FeatureConfig
    from pllcli.features.extract import featurize
    from pllcli.models import parse_model_options
    from pllcli.pretrain import PretrainConfig, pretrain
    from pllcli.training.trainer import TrainConfig, train
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "fsdd.h5"
    if not store.exists():
        featurize(args.data, store, FeatureConfig.preset("speech8k", n_mels=40), jobs=2, progress=False)
    paths, sizes = split_stores(work, store, args.per_class, args.replicate, args.seed)
    mopt = parse_model_options([args.model_opt])
    E, SE = args.epochs, args.sup_epochs
    results, timings = {}, {}
    enc = work / "enc_contrastive.pt"

    def need_encoder():
        if not enc.exists():
            t = time.time()
            pretrain([paths["unlab"][0]], enc, PretrainConfig(objective="contrastive", model_options=mopt,
                     epochs=args.pretrain_epochs, batch_size=128, lr=2e-3, crop_frames=80, seed=args.seed),
                     progress=False)
            timings["pretrain"] = round(time.time() - t, 1)
        return str(enc)

    ramp = f"schedule=sigmoid,start=0,end={E / 3:g}"
    runs = {
        "supervised": ("few", ["ce"], SE, {}),
        "mean-teacher": ("semi", ["ce", f"mean-teacher:weight=10,{ramp}"], E, {"ema": 0.99}),
        "vat": ("semi", ["ce", f"vat:weight=1,eps=0.5,{ramp}"], E, {}),
        "mixup": ("few", ["ce", "mixup:alpha=0.4"], SE, {}),
        "mixmatch": ("semi", [f"mixmatch:k=2,t=0.5,lambda_u=25,{ramp}"], E, {}),
        "fixmatch": ("semi", ["ce", f"fixmatch:threshold=0.9,{ramp}"], E, {}),
        "pretrain+finetune": ("few", ["ce"], SE, {"init": "enc"}),
        "pretrain+linear": ("few", ["ce"], SE, {"init": "enc", "freeze": True}),
        "best: pretrain+fixmatch": ("semi", ["ce", f"fixmatch:threshold=0.9,{ramp}"], E, {"init": "enc"}),
        "full labels": ("full", ["ce"], max(E, 15), {}),
    }
    wanted = list(runs) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    for name in wanted:
        if name not in runs:
            sys.exit(f"unknown method {name!r}; choose from {', '.join(runs)}")
        split, objs, epochs, extra = runs[name]
        extra = dict(extra)
        if extra.get("init") == "enc":
            extra["init"] = need_encoder()
        outdir = work / ("run_" + name.replace(" ", "_").replace(":", "").replace("+", "_"))
        t = time.time()
        cfg = TrainConfig(features=str(paths[split][0]), labels=str(paths[split][1]), outdir=str(outdir),
                          model="convgru", model_options=mopt, objectives=objs, epochs=epochs, batch_size=64,
                          valid_fraction=0.0, seed=args.seed, device="cpu", progress=False, threads=args.threads,
                          lr=3e-3, **extra)
        train(cfg)
        acc = accuracy(outdir / "last.pt", paths["test"][0])
        timings[name] = round(time.time() - t, 1)
        results[name] = acc
        print(f"{name:28s} acc {acc:.4f}  ({timings[name]:.0f}s)", file=sys.stderr, flush=True)

    full = results.get("full labels")
    print(f"\nFSDD few labels ({args.per_class}/class, {sizes['labeled']} labeled of {sizes['train']} train; "
          f"{sizes['test']} test clips, takes 0-4)")
    print(f"{'method':28s} {'test acc':>9s} {'/ full':>7s} {'seconds':>8s}")
    for k, v in results.items():
        rel = f"{v / full:7.3f}" if full else "      -"
        print(f"{k:28s} {v:9.4f} {rel} {timings.get(k, 0):8.0f}")
    semi_keys = [k for k in results if k != "full labels"]
    best = max(semi_keys, key=results.get) if semi_keys else None
    if best and full:
        print(f"best few-label: {best} {results[best]:.4f}; best/full = {results[best] / full:.3f} (target >= 0.95)")
    report = {"results": results, "seconds": timings, "sizes": sizes, "args": vars(args),
              "best": best, "best_over_full": (results[best] / full) if best and full else None}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
