"""chat-fsdd: what pretraining, semi-supervised losses and a pseudo-label round add to the PLL default
recipe of `pllcli train` (issue 6), on the same epochs.

    flock /tmp/pllcli-bench.lock python examples/bench_chat_ssl.py /work/data/chat /work/runs/ssl2/chat \
        --json /work/runs/ssl2/chat/bench_chat_ssl.json [--epochs 10] [--only b,fixmatch,...] \
        [--reuse /work/runs/train/bench]

Labels: `build-candidates --voice --chat --next 10 --clean --weights delay-prior --unlabeled --vocab VOCAB`
with the closed 100-class vocabulary "zero zero" .. "nine nine". Features: train.h5/test.h5 are
reused from `--reuse` when present (same feature config), the unlabeled clips are featurized once
and merged with the voice clips into all.h5 (every run trains on all.h5; the default recipe ignores
items without candidates/clean label, the semi-supervised objectives use them).

Runs (all: the default objectives of `pllcli train` (trainer.DEFAULT_OBJECTIVES), same epochs,
batch size, clean share and validation split; scored on averaged.pt):
  b             default recipe
  fixmatch      + fixmatch on the unlabeled messages
  mean-teacher  + mean-teacher on the unlabeled messages (EMA teacher)
  pretrain      default recipe, encoder from `pllcli pretrain --objective contrastive` on all.h5
  student       pseudo-label round: teacher = run b -> `pseudo-label --only-unlabeled --threshold`
                -> default recipe + distill (soft labels of the confident unlabeled messages)
Scores: test accuracy (test.csv), disambiguation accuracy on typed items (argmax restricted to the
candidate set vs truth.csv, scoring only). Table + JSON written after every run.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_chat  # noqa: E402  (the scoring shared with the PLL benchmark)
from bench_chat import read_csv  # noqa: E402,F401

DIGITS = "zero one two three four five six seven eight nine".split()


def cli(*args):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pllcli", "-q", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"pllcli {' '.join(map(str, args[:2]))} failed: {r.stderr.strip()[-800:]}")
    return time.perf_counter() - t


def merge_stores(parts, out):
    from pllcli.features.store import merge_feature_stores
    merge_feature_stores(out, parts, order_by_shard=False)


def score(ckpt, train_h5, test_h5, lab, lrows, y_train, y_test, typed):
    """(test accuracy, disambiguation accuracy): bench_chat.score without the missing-truth split."""
    test_acc, figs = bench_chat.score(ckpt, train_h5, test_h5, lab, lrows, y_train, y_test, typed,
                                      np.ones_like(typed))
    return test_acc, figs["disambiguation_accuracy"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--reuse", type=Path, default=Path("/work/runs/train/bench"),
                    help="folder with train.h5/test.h5 feature stores to reuse")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--pretrain-epochs", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--only", default="b,fixmatch,student,pretrain,mean-teacher")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="an existing default-recipe run folder (same data, labels and --epochs) to score as run b "
                         "instead of training it again (e.g. examples/bench_chat.py's run_b)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    skip = args.out / "SKIP_ONCE"   # lets a queued invocation be skipped (the file is removed)
    if skip.exists():
        skip.unlink()
        sys.exit(f"skipped ({skip} was present)")
    from pllcli.training.trainer import DEFAULT_OBJECTIVES
    out, data = args.out, args.data
    out.mkdir(parents=True, exist_ok=True)
    res = {"data": str(data), "epochs": args.epochs, "default_objectives": list(DEFAULT_OBJECTIVES),
           "stages": {}, "runs": {}, "commands": {}}
    if args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        if old.get("epochs") == args.epochs and old.get("default_objectives") == list(DEFAULT_OBJECTIVES):
            res = old

    def save():
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")

    feats = {}
    for name, manifest in (("train", "voice.csv"), ("test", "test.csv"), ("unl", "unlabeled.csv")):
        p = args.reuse / f"{name}.h5" if args.reuse else None
        if p is None or not p.exists():
            p = out / f"{name}.h5"
            if not p.exists():
                res["stages"][f"featurize_{name}_s"] = cli("featurize", data / manifest, "-o", p, "-j", 2)
        feats[name] = p
    all_h5 = out / "all.h5"
    if not all_h5.exists():
        merge_stores([feats["train"], feats["unl"]], all_h5)
    (out / "vocab.txt").write_text("".join(f"{a} {b}\n" for a in DIGITS for b in DIGITS))
    labels = out / "labels.h5"
    res["stages"]["build_candidates_s"] = cli(
        "build-candidates", "-o", labels, "--voice", data / "voice.csv", "--chat", data / "chat.csv", "--next", "10",
        "--clean", data / "clean.csv", "--weights", "delay-prior", "--unlabeled", data / "unlabeled.csv",
        "--vocab", out / "vocab.txt", "--overwrite")

    from pllcli.features import FeatureStore
    from pllcli.labels.store import align_ids, read_label_store
    lab = read_label_store(labels)
    truth = read_csv(data / "truth.csv")
    ci = {c: i for i, c in enumerate(lab.classes)}
    train_ids = FeatureStore(feats["train"]).ids
    lrows = align_ids(train_ids, lab.ids)
    y_train = np.array([ci.get(truth[i], -1) for i in train_ids])
    typed = (lab.candidate_matrix(lrows) > 0).any(1) & (lab.clean[lrows] < 0)
    test_truth = read_csv(data / "test.csv")
    y_test = np.array([ci.get(test_truth[i], -1) for i in FeatureStore(feats["test"]).ids])
    res["labels"] = {"items": int(len(lab.ids)), "classes": int(len(lab.classes)),
                     "clean": int((lab.clean >= 0).sum()), "typed": int(typed.sum()),
                     "unlabeled": int(lab.unlabeled.sum())}
    save()

    base = []
    for s in DEFAULT_OBJECTIVES:
        base += ["--objective", s]
    ramp = "schedule=sigmoid,start=3,end=6"
    enc = out / f"enc_contrastive_e{args.pretrain_epochs}.pt"

    def need_encoder():
        if not enc.exists():
            cmd = ["pretrain", all_h5, "-o", enc, "--objective", "contrastive", "--epochs", args.pretrain_epochs,
                   "--device", "cpu", "--overwrite"]
            res["stages"]["pretrain_s"] = round(cli(*cmd), 1)
            res["commands"]["(pretrain)"] = "pllcli " + " ".join(map(str, cmd))
        return ["--init", enc]

    def need_pseudo():
        teacher = (args.baseline or out / "run_b") / "averaged.pt"
        if not teacher.exists():
            sys.exit("student needs run b first")
        pl = out / f"pseudo_t{args.threshold:g}.h5"
        cmd = ["pseudo-label", all_h5, "-t", teacher, "-l", labels, "-o", pl, "--only-unlabeled",
               "--threshold", args.threshold, "--device", "cpu", "--overwrite", "--json", out / "pseudo.json"]
        res["stages"]["pseudo_label_s"] = round(cli(*cmd), 1)
        res["commands"]["(pseudo-label)"] = "pllcli " + " ".join(map(str, cmd))
        res["pseudo_label"] = json.loads((out / "pseudo.json").read_text())
        d = read_label_store(pl)
        rows = np.flatnonzero(d.has_soft)
        ok = [d.classes[d.soft(r)[0][np.argmax(d.soft(r)[1])]] == truth.get(str(d.ids[r])) for r in rows]
        res["pseudo_label"].update({"kept": int(len(rows)), "kept_accuracy": float(np.mean(ok)) if ok else None})
        return pl

    table = {
        "b": ("default recipe", lambda: (labels, base)),
        "fixmatch": ("+ fixmatch (unlabeled)", lambda: (labels, base + ["--objective", f"fixmatch:threshold=0.95,{ramp}"])),
        "mean-teacher": ("+ mean-teacher (unlabeled)",
                         lambda: (labels, base + ["--objective", f"mean-teacher:weight=10,{ramp}"])),
        "pretrain": ("contrastive pretrain + default", lambda: (labels, base + need_encoder())),
        "student": ("pseudo-label student", lambda: (need_pseudo(), base + ["--objective", "distill:alpha=1"])),
    }
    for key in args.only.split(","):
        if key in res["runs"]:
            continue
        desc, make = table[key]
        lpath, extra = make()
        rd = out / f"run_{key}"
        cmd = ["train", all_h5, "--labels", lpath, "-o", rd, "--epochs", args.epochs, "--device", "cpu", *extra]
        if key == "b" and args.baseline:
            rd = args.baseline
            summ = json.loads((rd / "summary.json").read_text())
            train_s = float(summ.get("train_s") or summ.get("wall_s") or 0)
            cmd = [f"(reused {rd})"]
        else:
            shutil.rmtree(rd, ignore_errors=True)
            train_s = cli(*cmd)
        summ = json.loads((rd / "summary.json").read_text())
        test_acc, dis = score(rd / "averaged.pt", feats["train"], feats["test"], lab, lrows, y_train, y_test, typed)
        res["runs"][key] = {"desc": desc, "test_accuracy": test_acc, "disambiguation_accuracy": dis,
                            "train_s": round(train_s, 1), "epoch_time_s": summ.get("epoch_time_s")}
        res["commands"][key] = "pllcli " + " ".join(map(str, cmd))
        print(f"{key:13s} {desc:32s} test {test_acc:.3f}  disamb {dis:.3f}  train {train_s:6.1f}s", flush=True)
        save()
    print(f"\nchat-fsdd, {args.epochs} epochs, default objectives {list(DEFAULT_OBJECTIVES)}")
    print("| run | what | test acc | disamb acc | train s |\n|---|---|---|---|---|")
    for k, v in res["runs"].items():
        print(f"| {k} | {v['desc']} | {v['test_accuracy']:.3f} | {v['disambiguation_accuracy']:.3f} | {v['train_s']:.0f} |")


if __name__ == "__main__":
    main()
