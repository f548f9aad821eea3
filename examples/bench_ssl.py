"""Benchmark: FSDD spoken digits with few labels (issue 6).

Conventional split: takes 0-4 of every speaker/digit are the test set; of the training takes,
`--per-class` clips per class keep their label and the rest are unlabeled. Reports test accuracy of:
supervised-only, each semi-supervised objective (mean teacher, VAT, mixup, MixMatch, FixMatch),
contrastive and masked pretrain + fine-tune / + linear probe (frozen encoder), pretrain + FixMatch,
a pseudo-label round (teacher ensemble -> `pseudo_label --threshold` -> student), curriculum
self-training (6 rounds of top-N-per-class pseudo labels, fresh students, per-clip mean
normalisation), and full labels. Every run uses SpecAugment masks plus frequency warping (a cheap
vocal-tract-length perturbation) and time warping.

    flock /tmp/pllcli-bench.lock python examples/bench_ssl.py /work/shared/data/fsdd/recordings \
        --work /work/runs/ssl2 --json /work/runs/ssl2/bench_ssl.json

    # issue 15: the same rows on a pretrained encoder's frames (speech_embedding, 96-dim at 12.5 Hz;
    # `pllcli featurize --encoder SPEC`), a light model without the x4 time stride, no pretraining
    python examples/bench_ssl.py /work/shared/data/fsdd/recordings --work /work/runs/ssl_enc \
        --encoder onnx:/work/data/enc/speech_embedding,min_duration=1.5s --model pooled \
        --model-opt hidden=128 --student-init none --self-training-opt '' --threads 1 \
        --epochs 25 --sup-epochs 100 --full-epochs 15 --json /work/runs/ssl_enc/bench_ssl.json \
        --methods "supervised,fixmatch,pseudo-label student,self-training (6 rounds),full labels"

Notes
- Batches: the semi-supervised runs train on one store holding every training clip (50 with a
  clean label, the rest unlabeled); `TrainConfig.clean_share` (`pllcli train --clean-share`) puts
  `--clean-share` of every batch on the labelled clips (oversampled), so no replication is needed.
- Reuse: the feature store, the split stores and the contrastive encoder (pretrained once on all
  training audio, labelled + unlabeled, never the test takes) are kept in `--work` and reused by
  later invocations; rows already in `--json` are skipped unless `--redo`. The JSON is rewritten
  after every row.
- `--encoder SPEC`: the store holds the encoder's frames (`encoder_config(SPEC)`, file
  `fsdd_<config hash>.h5` in `--work`) instead of 40-bin log-mel; the default augmentation then
  drops the mel-axis warp and the 10-frame shift (a digit is ~10 frames at 12.5 Hz), see
  ENCODER_AUGMENT; `--augment KEY=VALUE,...` overrides either default. `--model` picks the
  registry model (`pooled`: mean+max pooled frames, optional MLP, no time stride).
  `--student-init none` trains the pseudo-label student from scratch instead of from the
  contrastive encoder (a `pooled` model with `hidden=0` has no encoder weights to pretrain);
  `--self-training-opt ''` drops the per-clip mean normalisation of the self-training rounds (on
  ~10 encoder frames the clip mean is most of the content).
- Evaluation uses last.pt (EMA weights where an EMA is on); there is no validation split (50 labels).
Everything goes through the library: pllcli.features (featurize), pllcli.training.trainer.train,
pllcli.pretrain.pretrain, pllcli.pseudo_label.pseudo_label.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = [str(d) for d in range(10)]
# augmentation of every run (`--augment` overrides keys): log-mel / encoder frames. On encoder
# frames a warp of the feature axis means nothing and a 10-frame shift drops most of a digit.
LOGMEL_AUGMENT = {"time_masks": 2, "time_width": 0.15, "freq_masks": 2, "freq_width": 8, "freq_warp": 0.1,
                  "time_warp": 0.2}
ENCODER_AUGMENT = {"time_masks": 2, "time_width": 0.15, "freq_masks": 2, "freq_width": 8, "freq_warp": 0.0,
                   "time_warp": 0.2, "shift": 1, "gain_db": 0.0}


def split_stores(work: Path, src_store: Path, per_class: int, seed: int):
    from pllcli.features.store import FeatureStore, write_feature_store
    from pllcli.labels.store import LabelData, write_label_store
    fs = FeatureStore(src_store)
    ids = [str(i) for i in fs.ids]
    digit = np.array([int(i.split("_")[0]) for i in ids])
    take = np.array([int(i.split("_")[-1]) for i in ids])
    test = np.flatnonzero(take <= 4)
    train = np.flatnonzero(take > 4)
    rng = np.random.default_rng(seed)
    labeled = np.sort(np.concatenate([rng.choice(train[digit[train] == d], per_class, replace=False)
                                      for d in range(10)]))
    sizes = {"train": len(train), "test": len(test), "labeled": len(labeled),
             "labeled_speakers": sorted({ids[r].split("_")[1] for r in labeled})}
    tag = f"pc{per_class}_s{seed}"
    lab_set = {ids[r] for r in labeled}
    dig = lambda i: int(i.split("_")[0])  # noqa: E731
    specs = {
        "test": (test, lambda i: dig(i)),
        "full": (train, lambda i: dig(i)),
        "few": (labeled, lambda i: dig(i)),
        "semi": (train, lambda i: dig(i) if i in lab_set else -1),
    }
    out = {}
    feats = offs = None
    for name, (rows, clean_fn) in specs.items():
        fpath = work / (f"{name}_feats.h5" if name in ("test", "full") else f"{name}_{tag}_feats.h5")
        lpath = work / (f"{name}_labels.h5" if name in ("test", "full") else f"{name}_{tag}_labels.h5")
        if not (fpath.exists() and lpath.exists()):
            if feats is None:
                feats, offs = fs.load_all()
            items = [{"id": ids[r], "features": feats[offs[r]:offs[r + 1]], "duration": float(fs.durations[r])}
                     for r in rows]
            write_feature_store(fpath, fs.config, items)
            lid = [it["id"] for it in items]
            write_label_store(lpath, LabelData.new(lid, CLASSES, clean=[clean_fn(i) for i in lid]), {"bench": name})
        out[name] = (fpath, lpath)
    return out, sizes


def kept_pseudo_labels(path) -> tuple[int, float | None]:
    """(items with a soft label, accuracy of their argmax) in a pseudo-label store; scoring only:
    the digit is the first field of an FSDD id."""
    from pllcli.labels.store import read_label_store
    d = read_label_store(path)
    rows = np.flatnonzero(d.has_soft)
    if len(rows) == 0:
        return 0, None
    pred = np.asarray(d.classes)[d.soft_matrix(rows).argmax(1)].astype(int)
    truth = np.array([int(str(d.ids[r]).split("_")[0]) for r in rows])
    return int(len(rows)), float((pred == truth).mean())


def accuracy(ckpt: Path, test_feats: Path) -> float:
    import torch
    from pllcli.checkpoint import load_model
    from pllcli.features.store import FeatureStore
    model, meta = load_model(ckpt)
    model.eval()
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
            x[:] = model.encoder.norm.mean
            for k, a in enumerate(xs):
                x[k, :len(a)] = torch.from_numpy(a)
            pred[rows] = model(x, ln)["logits"].argmax(1).numpy()
    classes = [int(c) for c in meta["classes"]]
    return float((np.asarray(classes)[pred] == y).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="FSDD recordings folder ({digit}_{speaker}_{take}.wav)")
    ap.add_argument("--work", default="/work/runs/ssl2")
    ap.add_argument("--json", default=None, help="results JSON (rewritten after every row; rows in it are skipped)")
    ap.add_argument("--redo", action="store_true", help="rerun rows already in --json")
    ap.add_argument("--redo-methods", default="", help="comma list of rows to rerun even if in --json")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of the semi-supervised runs (1 epoch = 1 pass over the unlabeled clips)")
    ap.add_argument("--sup-epochs", type=int, default=60, help="epochs of the 50-label supervised runs (batch 16)")
    ap.add_argument("--full-epochs", type=int, default=12)
    ap.add_argument("--student-epochs", type=int, default=15, help="epochs of each self-training student")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--clean-share", type=float, default=0.25, help="labelled share of every semi-supervised batch")
    ap.add_argument("--threshold", type=float, default=0.9, help="pseudo-label confidence threshold")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--methods", default="all", help="comma list or 'all'")
    ap.add_argument("--model", default="convgru", help="registry model of every run")
    ap.add_argument("--model-opt", default=None,
                    help="KEY=VALUE,... model options (default for convgru: width=16,rnn_hidden=64,proj=96)")
    ap.add_argument("--encoder", default=None, metavar="SPEC",
                    help="featurize with a pretrained encoder (`pllcli featurize --encoder SPEC`) instead of log-mel")
    ap.add_argument("--augment", default="", help="KEY=VALUE,... overriding the default augmentation")
    ap.add_argument("--self-training-opt", default="utt_norm=true",
                    help="KEY=VALUE,... model options added for the self-training rounds (per-clip mean "
                         "normalisation by default; '' for none)")
    ap.add_argument("--student-init", choices=("enc", "none"), default="enc",
                    help="pseudo-label student: from the contrastive encoder (enc) or from scratch (none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from pllcli.features.config import FeatureConfig
    from pllcli.features.extract import featurize
    from pllcli import spec
    from pllcli.models import model_builder
    from pllcli.pretrain import PretrainConfig, pretrain
    from pllcli.pseudo_label import pseudo_label
    from pllcli.training.trainer import TrainConfig, train
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    if args.encoder:
        from pllcli.features.config import encoder_config
        fcfg = encoder_config(args.encoder)
        store = work / f"fsdd_{fcfg.hash()}.h5"
    else:
        fcfg, store = FeatureConfig.preset("speech8k", n_mels=40), work / "fsdd.h5"
    if not store.exists():
        t = time.time()
        featurize(args.data, store, fcfg, jobs=1 if args.encoder else 2, progress=False)
        print(f"featurized {store} in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    paths, sizes = split_stores(work, store, args.per_class, args.seed)
    model_opt = args.model_opt if args.model_opt is not None else (
        "width=16,rnn_hidden=64,proj=96" if args.model == "convgru" else "")
    mopt = spec.coerce(model_builder(args.model), spec.parse_pairs(model_opt, "--model-opt"), "--model-opt",
                       skip=("n_mels", "num_classes"), what=f"model {args.model}")
    E, SE = args.epochs, args.sup_epochs
    jpath = Path(args.json) if args.json else None
    prev = json.loads(jpath.read_text()) if jpath and jpath.exists() and not args.redo else {}
    results, timings, extra_info = dict(prev.get("results", {})), dict(prev.get("seconds", {})), dict(prev.get("info", {}))
    commands = dict(prev.get("commands", {}))
    for m in filter(None, (x.strip() for x in args.redo_methods.split(","))):
        results.pop(m, None)
    encs = {obj: work / f"enc_{obj}_e{args.pretrain_epochs}_v2.pt" for obj in ("contrastive", "masked")}

    def outdir_of(name):
        return work / ("run_" + name.replace(" ", "_").replace(":", "").replace("+", "_"))

    def need_encoder(objective="contrastive"):
        enc = encs[objective]
        if not enc.exists():
            t = time.time()
            pretrain([paths["semi"][0]], enc, PretrainConfig(objective=objective, model=args.model,
                     model_options=mopt,
                     epochs=args.pretrain_epochs, batch_size=128, lr=2e-3, crop_frames=80, seed=args.seed),
                     progress=False)
            timings[f"({objective} pretrain)"] = round(time.time() - t, 1)
            commands[f"({objective} pretrain)"] = (f"pllcli pretrain {paths['semi'][0]} -o {enc} --objective {objective} "
                                                   f"--epochs {args.pretrain_epochs} --crop 0.8 --model {args.model} "
                                                   + " ".join(f"--model-opt {k}={v}" for k, v in mopt.items()))
        return str(enc)

    def need_pseudo():
        """Teacher ensemble (the two FixMatch runs) -> soft labels on the unlabeled clips above --threshold."""
        out = work / f"pseudo_t{args.threshold:g}.h5"
        teachers = [outdir_of(n) / "last.pt" for n in ("pretrain+fixmatch", "fixmatch")]
        teachers = [t for t in teachers if t.exists()]
        if not teachers:
            sys.exit("pseudo-label rows need the fixmatch / pretrain+fixmatch rows first")
        s = pseudo_label(paths["semi"][0], teachers, paths["semi"][1], out, threshold=args.threshold,
                         only_unlabeled=True, device="cpu")
        extra_info["pseudo_label"] = {k: v for k, v in s.items() if isinstance(v, (int, float, str))}
        commands["(pseudo-label)"] = (f"pllcli pseudo-label {paths['semi'][0]} -l {paths['semi'][1]} -o {out} "
                                      + " ".join(f"-t {t}" for t in teachers)
                                      + f" --threshold {args.threshold:g} --only-unlabeled")
        # accuracy of the kept pseudo labels (scoring only: digit is in the id)
        extra_info["pseudo_kept"], extra_info["pseudo_kept_acc"] = kept_pseudo_labels(out)
        return str(out)

    ramp = f"schedule=sigmoid,start=0,end={max(1, E // 3)}"
    from pllcli.training.augment import AugmentConfig
    strong = {**(ENCODER_AUGMENT if args.encoder else LOGMEL_AUGMENT),
              **spec.coerce(AugmentConfig, spec.parse_pairs(args.augment, "--augment"), "--augment")}
    fm = f"fixmatch:threshold=0.9,{ramp}"
    # name: (store, objectives, epochs, TrainConfig extras)
    runs = {
        "supervised": ("few", ["ce"], SE, {"batch_size": 16, "clean_share": 0.0}),
        "mean-teacher": ("semi", ["ce", f"mean-teacher:weight=10,{ramp}"], E, {"ema": 0.99}),
        "vat": ("semi", ["ce", f"vat:weight=1,eps=0.5,{ramp}"], E, {}),
        "mixup": ("few", ["ce", "mixup:alpha=0.4"], SE, {"batch_size": 16, "clean_share": 0.0}),
        "mixmatch": ("semi", [f"mixmatch:k=2,t=0.5,lambda_u=25,{ramp}"], E, {}),
        "fixmatch": ("semi", ["ce", fm], E, {}),
        "pretrain+finetune": ("few", ["ce"], SE, {"batch_size": 16, "clean_share": 0.0, "init": "enc"}),
        "pretrain+linear": ("few", ["ce"], SE, {"batch_size": 16, "clean_share": 0.0, "init": "enc", "freeze": True}),
        "masked pretrain+finetune": ("few", ["ce"], SE, {"batch_size": 16, "clean_share": 0.0, "init": "enc:masked"}),
        "masked pretrain+linear": ("few", ["ce"], SE, {"batch_size": 16, "clean_share": 0.0, "init": "enc:masked",
                                                       "freeze": True}),
        # curriculum self-training (see self_training below)
        "self-training (6 rounds)": ("rounds", ["ce", "distill:alpha=1", "fixmatch:threshold=0.9"],
                                     args.student_epochs, {}),
        "pretrain+fixmatch": ("semi", ["ce", fm], E, {"init": "enc"}),
        # self-training: soft labels from the FixMatch teachers, student from the pretrained encoder
        "pseudo-label student": ("pseudo", ["ce", "distill:alpha=1", fm], E,
                                 {"init": "enc"} if args.student_init == "enc" else {}),
        "full labels": ("full", ["ce"], args.full_epochs, {"clean_share": 0.0}),
    }
    wanted = list(runs) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]

    def dump():
        full = results.get("full labels")
        few = {k: v for k, v in results.items() if k != "full labels"}
        best = max(few, key=few.get) if few else None
        report = {"results": results, "seconds": timings, "sizes": sizes, "args": vars(args), "info": extra_info,
                  "features": fcfg.summary(), "augment": strong, "model": {"name": args.model, **mopt},
                  "commands": commands, "best": best,
                  "best_over_full": (results[best] / full) if best and full else None,
                  "total_seconds_this_invocation": round(time.time() - t_all, 1)}
        if jpath:
            jpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = jpath.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(jpath)
        return best, full

    opts_of_rounds: dict = {}

    def self_training(name, objs, epochs, extra):
        """Curriculum self-training with per-clip mean normalisation (`--model-opt utt_norm=true`):
        a supervised teacher on the 50 labels, then rounds of `pseudo-label --top-n-per-class N
        --only-unlabeled` (N = 25/50/75/100/100/100% of a class's share of the unlabeled clips)
        and a fresh student (`ce` + `distill:alpha=1` + `fixmatch`) that teaches the next round."""
        import shutil
        opts = {**mopt, **spec.coerce(model_builder(args.model), spec.parse_pairs(args.self_training_opt,
                "--self-training-opt"), "--self-training-opt", skip=("n_mels", "num_classes"), what=f"model {args.model}")}
        opts_of_rounds.update(opts)
        common = dict(model=args.model, model_options=opts, valid_fraction=0.0, seed=args.seed, device="cpu",
                      progress=False, threads=args.threads, lr=3e-3, top_k=0, augment=strong)
        outdir = work / "run_selftrain_r0"
        shutil.rmtree(outdir, ignore_errors=True)
        train(TrainConfig(features=str(paths["few"][0]), labels=str(paths["few"][1]), outdir=str(outdir),
                          objectives=["ce"], epochs=SE, batch_size=16, clean_share=0.0, **common))
        teacher = outdir / "last.pt"
        rounds = [{"round": 0, "student_acc": round(accuracy(teacher, paths["test"][0]), 4)}]
        n_unl = sizes["train"] - sizes["labeled"]
        for r, frac in enumerate((0.25, 0.5, 0.75, 1.0, 1.0, 1.0), 1):
            pl = work / f"selftrain_r{r}.h5"
            pl.unlink(missing_ok=True)
            pseudo_label(paths["semi"][0], [teacher], paths["semi"][1], pl, only_unlabeled=True,
                         top_n_per_class=int(round(frac * n_unl / len(CLASSES))), device="cpu")
            n_kept, ok = kept_pseudo_labels(pl)
            outdir = work / f"run_selftrain_r{r}"
            shutil.rmtree(outdir, ignore_errors=True)
            train(TrainConfig(features=str(paths["semi"][0]), labels=str(pl), outdir=str(outdir), objectives=objs,
                              epochs=epochs, batch_size=64, clean_share=args.clean_share, **common))
            teacher = outdir / "last.pt"
            acc = accuracy(teacher, paths["test"][0])
            rounds.append({"round": r, "pseudo_labels": n_kept, "pseudo_label_acc": round(float(ok), 4),
                           "student_acc": round(acc, 4)})
            print(f"  self-training round {r}: {n_kept} pseudo labels (acc {ok:.3f}) -> student {acc:.4f}",
                  file=sys.stderr, flush=True)
        return acc, rounds

    for name in wanted:
        if name not in runs:
            sys.exit(f"unknown method {name!r}; choose from {', '.join(runs)}")
        if name in results:
            print(f"{name:24s} acc {results[name]:.4f}  (from {jpath})", file=sys.stderr, flush=True)
            continue
        split, objs, epochs, extra = runs[name]
        extra = dict(extra)
        if str(extra.get("init", "")).startswith("enc"):
            extra["init"] = need_encoder(extra["init"].partition(":")[2] or "contrastive")
        t = time.time()
        if split == "rounds":
            acc, info = self_training(name, objs, epochs, extra)
            timings[name], results[name] = round(time.time() - t, 1), acc
            extra_info["self_training"] = info
            commands[name] = ("see self_training() in examples/bench_ssl.py: pllcli pseudo-label --top-n-per-class N "
                              "--only-unlabeled, then pllcli train --objective ce --objective distill:alpha=1 "
                              "--objective fixmatch:threshold=0.9 "
                              + " ".join(f"--augment {k}={v}" for k, v in strong.items()) + f" --model {args.model} "
                              + " ".join(f"--model-opt {k}={v}" for k, v in opts_of_rounds.items()) + ", 6 rounds")
            print(f"{name:24s} acc {acc:.4f}  ({timings[name]:.0f}s)", file=sys.stderr, flush=True)
            dump()
            continue
        if split == "pseudo":
            feats, labels = str(paths["semi"][0]), need_pseudo()
        else:
            feats, labels = str(paths[split][0]), str(paths[split][1])
        outdir = outdir_of(name)
        cfg = TrainConfig(features=feats, labels=labels, outdir=str(outdir), model=args.model, model_options=mopt,
                          objectives=objs, epochs=epochs, valid_fraction=0.0, seed=args.seed, device="cpu",
                          progress=False, threads=args.threads, lr=3e-3, top_k=0, augment=strong,
                          **{"batch_size": 64, "clean_share": args.clean_share, **extra})
        import shutil
        shutil.rmtree(outdir, ignore_errors=True)
        train(cfg)
        acc = accuracy(outdir / "last.pt", paths["test"][0])
        timings[name] = round(time.time() - t, 1)
        results[name] = acc
        commands[name] = (f"pllcli train {feats} -l {labels} -o {outdir} --epochs {epochs} -b {cfg.batch_size} "
                          f"--clean-share {cfg.clean_share:g} --valid-fraction 0 --top-k 0 "
                          + " ".join(f"--objective {o}" for o in objs)
                          + " " + " ".join(f"--augment {k}={v}" for k, v in strong.items())
                          + (f" --ema {cfg.ema:g}" if cfg.ema else "") + (f" --init {cfg.init}" if cfg.init else "")
                          + (" --freeze" if cfg.freeze else "") + f" --model {args.model}"
                          + " " + " ".join(f"--model-opt {k}={v}" for k, v in mopt.items()))
        print(f"{name:24s} acc {acc:.4f}  ({timings[name]:.0f}s)", file=sys.stderr, flush=True)
        dump()

    best, full = dump()
    print(f"\nFSDD few labels ({args.per_class}/class, {sizes['labeled']} labeled of {sizes['train']} train; "
          f"{sizes['test']} test clips, takes 0-4)")
    print(f"{'method':24s} {'test acc':>9s} {'/ full':>7s} {'seconds':>8s}")
    for k, v in results.items():
        rel = f"{v / full:7.3f}" if full else "      -"
        print(f"{k:24s} {v:9.4f} {rel} {timings.get(k, 0):8.0f}")
    for obj in ("contrastive", "masked"):
        if f"({obj} pretrain)" in timings:
            print(f"{f'({obj} pretrain)':24s} {'':9s} {'':7s} {timings[f'({obj} pretrain)']:8.0f}")
    if best and full:
        print(f"best few-label: {best} {results[best]:.4f}; best/full = {results[best] / full:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
