"""chat-fsdd benchmark for `pllcli train`: raw audio -> features -> candidate sets -> model -> scores.

    flock /tmp/pllcli-bench.lock python examples/bench_chat.py /work/data/chat /work/runs/train/bench \
        --epochs 15 --json /work/runs/train/bench/bench.json [--runs b,a,c,d,cc,lws,pico,cr]

Runs (same model and budget): a = oracle (truth.csv labels for every typed message), b = default
PLL recipe, c = clean labels only, d = naive sigmoid+MSE, and each PLL loss. Scores: test accuracy
(test.csv) and disambiguation accuracy on typed training items (prediction restricted to the
candidate set vs truth.csv; truth is used only for scoring and for the oracle). Prints a table and
writes JSON after every run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNS = {
    "b": ("default PLL recipe", []),
    "a": ("oracle (true labels)", ["--objective", "ce"]),
    "c": ("clean labels only", ["--objective", "ce"]),
    "d": ("naive sigmoid+MSE", ["--objective", "mse"]),
    "cc": ("CC", ["--objective", "cc"]),
    "proden0": ("PRODEN (eps=0, no ce)", ["--objective", "proden"]),
    "lws": ("LWS", ["--objective", "lws"]),
    "pico": ("PiCO-style", ["--objective", "pico"]),
    "cr": ("CR-DPLL", ["--objective", "cr"]),
}


def cli(*args, log=None):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pllcli", "-q", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"pllcli {' '.join(map(str, args[:2]))} failed: {r.stderr.strip()[-800:]}")
    return r, time.perf_counter() - t


def read_csv(path, key="id", val="label"):
    with open(path, newline="") as f:
        return {r[key]: r[val] for r in csv.DictReader(f)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--runs", default="b,a,c,d,cc,proden0,lws,pico,cr")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = args.data
    res = {"data": str(data), "epochs": args.epochs, "cpu_count": os.cpu_count(), "stages": {}, "runs": {}}

    def save():
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")

    t0 = time.perf_counter()
    if not (out / "train.h5").exists():
        _, res["stages"]["featurize_train_s"] = cli("featurize", data / "voice.csv", out / "train.h5", "-j", args.jobs)
        _, res["stages"]["featurize_test_s"] = cli("featurize", data / "test.csv", out / "test.h5", "-j", args.jobs)
    _, res["stages"]["build_candidates_s"] = cli(
        "build-candidates", out / "labels.h5", "--voice", data / "voice.csv", "--chat", data / "chat.csv",
        "--next", "10", "--clean", data / "clean.csv", "--overwrite")
    prep_s = time.perf_counter() - t0

    from pllcli.labels.store import LabelData, read_label_store, write_label_store
    lab = read_label_store(out / "labels.h5")
    truth = read_csv(data / "truth.csv")
    ci = {c: i for i, c in enumerate(lab.classes)}
    y = np.array([ci.get(truth[i], -1) for i in lab.ids])
    typed = lab.has_candidates & (lab.clean < 0)
    in_set = np.array([y[r] in lab.candidates(r) for r in range(len(y))])
    res["labels"] = {"items": int(len(y)), "classes": int(len(lab.classes)), "clean": int((lab.clean >= 0).sum()),
                     "typed": int(typed.sum()), "truth_in_set_share": float(in_set[typed].mean()),
                     "mean_set_size": float(lab.set_sizes[typed].mean())}
    write_label_store(out / "oracle.h5", LabelData.new(lab.ids, lab.classes, clean=y), {"bench": "oracle"})
    clean_only = np.where(lab.clean >= 0, lab.clean, -1)
    write_label_store(out / "clean.h5", LabelData.new(lab.ids, lab.classes, clean=clean_only), {"bench": "clean"})
    test_truth = read_csv(data / "test.csv")
    save()

    for key in args.runs.split(","):
        desc, extra = RUNS[key]
        labels = {"a": "oracle.h5", "c": "clean.h5"}.get(key, "labels.h5")
        rd = out / f"run_{key}"
        if rd.exists():
            import shutil
            shutil.rmtree(rd)
        t = time.perf_counter()
        _, train_s = cli("train", out / "train.h5", "--labels", out / labels, "-o", rd, "--epochs", args.epochs,
                         "--device", "cpu", *extra)
        summ = json.loads((rd / "summary.json").read_text())
        ck = rd / "averaged.pt"
        cli("predict", ck, out / "test.h5", "-o", rd / "test_pred.csv")
        pred = read_csv(rd / "test_pred.csv")
        test_acc = float(np.mean([pred[i] == test_truth[i] for i in test_truth]))
        eval_s = time.perf_counter() - t
        cli("predict", ck, out / "train.h5", "-o", rd / "train_pred.csv", "--restrict-candidates", out / "labels.h5")
        tp = read_csv(rd / "train_pred.csv")
        idx = np.flatnonzero(typed)
        dis = float(np.mean([tp[lab.ids[i]] == truth[lab.ids[i]] for i in idx]))
        dis_in = float(np.mean([tp[lab.ids[i]] == truth[lab.ids[i]] for i in idx if in_set[i]]))
        res["runs"][key] = {
            "desc": desc, "args": extra, "test_accuracy": test_acc, "disambiguation_accuracy": dis,
            "disambiguation_accuracy_truth_in_set": dis_in, "train_s": round(train_s, 1),
            "epoch_time_s": summ["epoch_time_s"], "data_wait_share": summ["data_wait_share"],
            "best_val": summ["best"], "averaged_val": summ["averaged"],
            "audio_to_evaluated_model_s": round(prep_s + eval_s, 1) if key == "b" else None,
        }
        print(f"{key:8s} {desc:26s} test {test_acc:.3f}  disamb {dis:.3f}  train {train_s:6.1f}s  "
              f"epoch {summ['epoch_time_s']:.1f}s  wait {100 * summ['data_wait_share']:.2f}%", flush=True)
        save()

    r = res["runs"]
    if "a" in r and "b" in r:
        res["targets"] = {"b_over_a": r["b"]["test_accuracy"] / max(1e-9, r["a"]["test_accuracy"]),
                          "b_minus_c_points": 100 * (r["b"]["test_accuracy"] - r.get("c", {}).get("test_accuracy", 0.0))
                          if "c" in r else None}
    print("\n| run | what | test acc | disamb. acc | train s | epoch s | data wait |")
    print("|---|---|---|---|---|---|---|")
    for k, v in r.items():
        print(f"| {k} | {v['desc']} | {v['test_accuracy']:.3f} | {v['disambiguation_accuracy']:.3f} | "
              f"{v['train_s']} | {v['epoch_time_s']:.1f} | {100 * v['data_wait_share']:.2f}% |")
    print(json.dumps({"labels": res["labels"], "stages": res["stages"], "targets": res.get("targets")}, indent=1))
    save()


if __name__ == "__main__":
    main()
