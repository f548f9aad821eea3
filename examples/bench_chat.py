"""chat-fsdd benchmark for `pllcli train`: raw audio -> features -> candidate sets -> model -> scores.

    flock /tmp/pllcli-bench.lock python examples/bench_chat.py /work/data/chat /work/runs/train/bench \
        --json /work/runs/train/bench/bench.json [--only a,b,c,d] [--quick] [--epochs N] [--seed N] \
        [--threads N] [--featurize-opt=--encoder --featurize-opt=onnx:DIR/speech_embedding,min_duration=1.5s]

With --seed N the run folders are run_KEY_sN (JSON keys KEY_sN), so seeds of one store sit side by side.

Labels: `build-candidates --next 10 --weights delay-prior --vocab VOCAB` with the closed
100-class vocabulary "zero zero" .. "nine nine" (the task's known label space, generated from
the ten digit words; not read from truth.csv), so chatter ("lol", ...) is off-vocabulary.

Runs (same model, epochs, batch size and batching; every run but (a)/(c) sees the same label store):
  a       oracle: truth.csv labels as clean labels for every typed message (scoring only otherwise)
  b       the default recipe of `pllcli train` (no --objective: trainer.DEFAULT_OBJECTIVES)
  b_eps0  the default recipe with eps=0 (no mass outside the candidate set; the default itself)
  b_eps01 the default recipe with eps=0.01 outside the set
  c       clean labels only (ce on the 325 clean items; 260 after the validation hold-out)
  c_steps clean labels only, epochs multiplied so that it runs about as many steps as b
  d       naive baseline: sigmoid outputs + MSE to the multi-hot candidate vector, + ce on clean
  cc, proden, lws, pico, cr: each PLL loss from the start (no warm-up), + ce on clean
  proden_w  PRODEN with the default's clean warm start (start=3), + ce on clean
Scores: test accuracy (test.csv); disambiguation accuracy on typed training items (argmax of the
model restricted to the item's candidate set vs truth.csv), split into items whose truth is in
the set and items whose truth is missing (late typing; for those: the unrestricted argmax, i.e.
whether the model still recognises the message); train wall time, epoch time, data-wait share.
Each run's best.pt, last.pt and averaged.pt are scored (and which of them model.pt is, when the run
writes one); the top-level figures of a run are averaged.pt's. Table + JSON, written after every
run. Default runs: FULL (~40 min on 2 quiet cores);
`--quick`: 8 epochs, runs a,b,c_steps,d; `--only LIST` picks runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIGITS = "zero one two three four five six seven eight nine".split()


def _with_eps(spec: str, eps: float) -> str:
    name, _, opts = spec.partition(":")
    kv = [p for p in opts.split(",") if p and not p.startswith("eps=")]
    return f"{name}:{','.join(kv + [f'eps={eps:g}'])}" if name in ("proden", "rc", "cc", "cr") else spec


def runs_table():
    from pllcli.training.trainer import DEFAULT_OBJECTIVES
    eps0, eps01 = [], []
    for s in DEFAULT_OBJECTIVES:
        eps0 += ["--objective", _with_eps(s, 0)]
        eps01 += ["--objective", _with_eps(s, 0.01)]
    return {
        "a": ("oracle (true labels)", "oracle.h5", ["--objective", "ce"]),
        "b": ("default recipe", "labels.h5", []),
        "b_eps0": ("default recipe, eps=0", "labels.h5", eps0),
        "b_eps01": ("default recipe, eps=0.01", "labels.h5", eps01),
        "c": ("clean labels only", "clean.h5", ["--objective", "ce"]),
        "c_steps": ("clean only, as many steps as b", "clean.h5", ["--objective", "ce"]),
        "d": ("naive sigmoid+MSE", "labels.h5", ["--objective", "mse", "--objective", "ce"]),
        "cc": ("CC + prior", "labels.h5", ["--objective", "cc:eps=0.01", "--objective", "ce"]),
        "proden": ("PRODEN + prior (no warm-up)", "labels.h5", ["--objective", "proden:eps=0.01", "--objective", "ce"]),
        "proden_w": ("PRODEN + prior, clean warm start", "labels.h5",
                     ["--objective", "proden:eps=0.01,start=3", "--objective", "ce"]),
        "lws": ("LWS", "labels.h5", ["--objective", "lws", "--objective", "ce"]),
        "pico": ("PiCO-style", "labels.h5", ["--objective", "pico", "--objective", "ce"]),
        "cr": ("CR-DPLL", "labels.h5", ["--objective", "cr:eps=0.01", "--objective", "ce"]),
    }


# the full benchmark (~40 min on 2 quiet cores at 20 epochs); c, b_eps0 (= b while the default
# has eps=0) and proden_w with --only
FULL = "a,b,b_eps01,c_steps,d,cc,proden,lws,pico,cr"


CKPTS = ("best", "last", "averaged")


def cli(*args):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pllcli", "-q", *map(str, args)], capture_output=True, text=True,
                       env=os.environ)
    if r.returncode != 0:
        sys.exit(f"pllcli {' '.join(map(str, args[:2]))} failed: {r.stderr.strip()[-800:]}")
    return r, time.perf_counter() - t


def read_csv(path, key="id", val="label"):
    with open(path, newline="") as f:
        return {r[key]: r[val] for r in csv.DictReader(f)}


def score(ckpt, train_h5, test_h5, lab, lrows, y_train, y_test, typed, in_set):
    """(test accuracy, disambiguation figures) of a checkpoint, via the library (one pass each)."""
    from pllcli.checkpoint import load_model
    from pllcli.features import FeatureStore
    from pllcli.predict import infer
    from pllcli.training.data import InMemoryFeatures
    model, _ = load_model(ckpt)
    out = {}
    for name, path in (("test", test_h5), ("train", train_h5)):
        f, o = FeatureStore(path).load_all()
        out[name] = infer(model, InMemoryFeatures(f, o), None, "cpu", 128)["logits"]
    test_acc = float((out["test"].argmax(1) == y_test).mean())
    lg = out["train"]
    cand = lab.candidate_matrix(lrows)
    restricted = np.where(cand > 0, lg, -np.inf).argmax(1)
    free = lg.argmax(1)
    ok_r, ok_f = restricted == y_train, free == y_train
    present, missing = typed & in_set, typed & ~in_set
    return test_acc, {
        "disambiguation_accuracy": float(ok_r[typed].mean()),
        "disamb_truth_in_set": float(ok_r[present].mean()),
        "unrestricted_truth_in_set": float(ok_f[present].mean()),
        "unrestricted_truth_missing": float(ok_f[missing].mean()) if missing.any() else None,
        "items_truth_missing": int(missing.sum()),
    }


def _log(rd: Path) -> list[dict]:
    p = rd / "log.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def _model_pt_source(rd: Path) -> str | None:
    """Which run file the run's model.pt was deployed from (its meta; None without model.pt)."""
    from pllcli.checkpoint import load_checkpoint
    return load_checkpoint(rd / "model.pt")[1].get("deployed_from", "?") if (rd / "model.pt").exists() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=None, help="default: the train default (--quick: 8)")
    ap.add_argument("--only", "--runs", dest="only", default=None,
                    help=f"comma list of runs (default: {FULL})")
    ap.add_argument("--quick", action="store_true", help="8 epochs, runs a,b,c_steps,d")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--train-opt", action="append", default=[], help="extra `pllcli train` argument (repeatable)")
    ap.add_argument("--featurize-opt", action="append", default=[],
                    help="extra `pllcli featurize` argument for both stores (repeatable), e.g. "
                         "--featurize-opt=--encoder --featurize-opt=onnx:DIR,min_duration=1.5s")
    ap.add_argument("--seed", type=int, default=None, help="train --seed N; run folders run_KEY_sN")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of train and scoring (train --threads N, OMP_NUM_THREADS=N)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    table = runs_table()
    only = (args.only or ("a,b,c_steps,d" if args.quick else FULL)).split(",")
    bad = [k for k in only if k not in table]
    if bad:
        ap.error(f"unknown run(s) {bad}; choose from {', '.join(table)}")
    from pllcli.training.trainer import TrainConfig
    epochs = args.epochs or (8 if args.quick else TrainConfig.epochs)
    out, data = args.out, args.data
    out.mkdir(parents=True, exist_ok=True)
    res = {"data": str(data), "epochs": epochs, "cpu_count": os.cpu_count(), "train_opts": args.train_opt,
           "featurize_opts": args.featurize_opt, "seed": args.seed, "threads": args.threads,
           "stages": {}, "runs": {}}
    if os.path.exists(out / "bench_args.json"):  # the stores in `out` must come from the same featurize options
        old = json.loads((out / "bench_args.json").read_text())
        if old.get("featurize_opts") != args.featurize_opt:
            sys.exit(f"{out}: its stores were made with --featurize-opt {old.get('featurize_opts')}; use another OUT")
    train_extra = [*(["--seed", args.seed] if args.seed is not None else []),
                   *(["--threads", args.threads] if args.threads is not None else [])]

    def save():
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")

    t0 = time.perf_counter()
    for split, manifest in (("train", "voice.csv"), ("test", "test.csv")):
        if not (out / f"{split}.h5").exists():
            _, res["stages"][f"featurize_{split}_s"] = cli("featurize", data / manifest, "-o", out / f"{split}.h5",
                                                           "-j", args.jobs, *args.featurize_opt)
    (out / "bench_args.json").write_text(json.dumps({"featurize_opts": args.featurize_opt}) + "\n")
    (out / "vocab.txt").write_text("".join(f"{a} {b}\n" for a in DIGITS for b in DIGITS))
    build = ["build-candidates", "-o", out / "labels.h5", "--voice", data / "voice.csv", "--chat", data / "chat.csv",
             "--next", "10", "--clean", data / "clean.csv", "--weights", "delay-prior", "--vocab",
             out / "vocab.txt", "--overwrite"]
    if (data / "unlabeled.csv").exists():
        build += ["--unlabeled", data / "unlabeled.csv"]
    _, res["stages"]["build_candidates_s"] = cli(*build)
    prep_s = time.perf_counter() - t0

    from pllcli.features import FeatureStore
    from pllcli.labels.store import LabelData, align_ids, read_label_store, write_label_store
    lab = read_label_store(out / "labels.h5")
    truth = read_csv(data / "truth.csv")
    ci = {c: i for i, c in enumerate(lab.classes)}
    train_ids = FeatureStore(out / "train.h5").ids
    lrows = align_ids(train_ids, lab.ids)
    y_train = np.array([ci.get(truth[i], -1) for i in train_ids])
    cand = lab.candidate_matrix(lrows)
    typed = (cand > 0).any(1) & (lab.clean[lrows] < 0)
    in_set = cand[np.arange(len(y_train)), np.maximum(y_train, 0)] > 0
    test_truth = read_csv(data / "test.csv")
    test_ids = FeatureStore(out / "test.h5").ids
    y_test = np.array([ci.get(test_truth[i], -1) for i in test_ids])
    res["labels"] = {"items": int(len(lab.ids)), "classes": int(len(lab.classes)),
                     "clean": int((lab.clean[lrows] >= 0).sum()), "typed": int(typed.sum()),
                     "truth_in_set_share": float(in_set[typed].mean()),
                     "mean_set_size": float((cand[typed] > 0).sum(1).mean())}
    # oracle / clean-only label stores (truth is used for the oracle and for scoring only)
    y_all = np.array([ci.get(truth.get(i, ""), -1) for i in lab.ids])
    write_label_store(out / "oracle.h5", LabelData.new(lab.ids, lab.classes, clean=np.where(
        lab.has_candidates | (lab.clean >= 0), y_all, -1)), {"bench": "oracle"})
    write_label_store(out / "clean.h5", LabelData.new(lab.ids, lab.classes, clean=lab.clean), {"bench": "clean"})
    save()

    for key in only:
        desc, labels, extra = table[key]
        name = key if args.seed is None else f"{key}_s{args.seed}"
        rd = out / f"run_{name}"
        shutil.rmtree(rd, ignore_errors=True)
        t = time.perf_counter()
        ep = epochs
        if key == "c_steps":  # clean items are few: repeat epochs so that c sees as many batches as b
            n_clean = int(round(res["labels"]["clean"] * 0.8))  # minus the 20% validation hold-out
            steps_b = int(np.ceil(typed.sum() / (64 - round(0.25 * 64))))
            ep = epochs * max(1, int(round(steps_b / np.ceil(n_clean / 64))))
        _, train_s = cli("train", out / "train.h5", "--labels", out / labels, "-o", rd, "--epochs", ep,
                         "--device", "cpu", *train_extra, *extra, *args.train_opt)
        summ = json.loads((rd / "summary.json").read_text())
        scored = {}
        for c in CKPTS:
            if (rd / f"{c}.pt").exists():
                acc, dis = score(rd / f"{c}.pt", out / "train.h5", out / "test.h5", lab, lrows, y_train, y_test,
                                 typed, in_set)
                scored[c] = {"test_accuracy": acc, **dis}
        main_ck = scored.get("averaged") or scored.get("best") or scored["last"]
        eval_s = time.perf_counter() - t
        res["runs"][name] = {
            "key": key, "desc": desc, "args": [str(a) for a in extra], "seed": args.seed, "epochs": ep, **main_ck,
            "checkpoints": scored, "model_pt": _model_pt_source(rd),
            "train_s": round(train_s, 1), "train_and_eval_s": round(eval_s, 1),
            "epoch_time_s": summ["epoch_time_s"], "data_wait_share": summ["data_wait_share"],
            "best_val": summ["best"], "averaged_val": summ["averaged"],
            "val_curve": [h.get("monitor_value") for h in _log(rd)],
        }
        if key == "b":
            res["audio_to_evaluated_model_s"] = round(
                sum(res["stages"].values()) + eval_s, 1) if "featurize_train_s" in res["stages"] else None
            res["labels_to_evaluated_model_s"] = round(prep_s + eval_s, 1)
        accs = "/".join(f"{scored[c]['test_accuracy']:.3f}" if c in scored else "-" for c in CKPTS)
        print(f"{name:9s} {desc:28s} test best/last/avg {accs}  disamb {main_ck['disambiguation_accuracy']:.3f}  "
              f"train {train_s:6.1f}s  epoch {summ['epoch_time_s']:.1f}s  wait {100 * summ['data_wait_share']:.2f}%",
              flush=True)
        save()

    r = res["runs"]
    sfx = "" if args.seed is None else f"_s{args.seed}"
    ra, rb, rc = (r.get(k + sfx) for k in "abc")
    tg = {}
    if ra and rb:
        tg["b_over_a"] = rb["test_accuracy"] / max(1e-9, ra["test_accuracy"])
        tg["b_over_a_by_checkpoint"] = {
            c: rb["checkpoints"][c]["test_accuracy"] / max(1e-9, ra["checkpoints"][c]["test_accuracy"])
            for c in CKPTS if c in rb["checkpoints"] and c in ra["checkpoints"]}
    if rb and rc:
        tg["b_minus_c_points"] = 100 * (rb["test_accuracy"] - rc["test_accuracy"])
    res["targets"] = tg
    save()
    print(f"\nepochs {epochs}; labels {json.dumps(res['labels'])}")
    print("| run | what | test acc best | last | averaged | disamb. best | last | averaged | truth in set (avg) | "
          "truth missing, free (avg) | model.pt | train s | epoch s | data wait |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, v in r.items():
        miss = v["unrestricted_truth_missing"]
        ck = v["checkpoints"]
        acc = " | ".join(f"{ck[c]['test_accuracy']:.3f}" if c in ck else "-" for c in CKPTS)
        dis = " | ".join(f"{ck[c]['disambiguation_accuracy']:.3f}" if c in ck else "-" for c in CKPTS)
        print(f"| {k} | {v['desc']} | {acc} | {dis} | {v['disamb_truth_in_set']:.3f} | "
              f"{'-' if miss is None else f'{miss:.3f}'} | {v['model_pt'] or '-'} | {v['train_s']} | "
              f"{v['epoch_time_s']:.1f} | {100 * v['data_wait_share']:.2f}% |")
    print(json.dumps({"stages": res["stages"], "targets": tg,
                      "audio_to_evaluated_model_s": res.get("audio_to_evaluated_model_s")}, indent=1))


if __name__ == "__main__":
    main()
