"""Which epochs should averaged.pt keep when validation figures tie? (last wave's open question)

    python examples/topk_ties.py runs/ties/chat_unseen/run_b_s0 ... --json topk_ties.json

Each RUN is a `pllcli train` folder trained with `--top-k` >= its epochs (so topk/ holds every
epoch) whose log.jsonl has `monitor_value` per epoch, beside the run's test.h5, in a
`bench_chat.py` output folder (its `../test.h5`; the labels from `--corpus`'s test.csv, default
read from bench_args.json's sibling data folder). For k in --k, the top-k epochs are chosen by the
monitored value with ties broken towards the earliest epochs (pllcli's rule: a stable sort) or
towards the latest, their weights averaged (`average_states`), and the averaged model scored on
the test set. It prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def chosen(values: dict[int, float], k: int, prefer: str) -> list[int]:
    """The k epochs with the highest value; ties to the earliest ("earliest") or latest epochs."""
    key = (lambda e: (-values[e], e)) if prefer == "earliest" else (lambda e: (-values[e], -e))
    return sorted(sorted(values, key=key)[:k])


def test_accuracy(state: dict, meta: dict, store: Path, labels: dict[str, str]) -> float:
    from pllcli.features import FeatureStore
    from pllcli.models import build_model
    from pllcli.predict import infer
    from pllcli.training.data import InMemoryFeatures
    cfg = dict(meta["model"])
    model = build_model(**cfg)
    model.load_state_dict(state)
    fs = FeatureStore(store)
    f, o = fs.load_all()
    pred = infer(model.eval(), InMemoryFeatures(f, o), None, "cpu", 128)["logits"].argmax(1)
    classes = [str(c) for c in meta["classes"]]
    return float(np.mean([classes[p] == labels[str(i)] for p, i in zip(pred, fs.ids)]))


def run_rows(run: Path, corpus: Path, ks: list[int]) -> list[dict]:
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.checkpoints import average_states
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    values = {int(r["epoch"]): float(r["monitor_value"]) for r in log}
    files = {e: run / "topk" / f"epoch{e:04d}.pt" for e in values}
    missing = [e for e, p in files.items() if not p.exists()]
    if missing:
        sys.exit(f"{run}: topk/ lacks epochs {missing[:5]}: train with --top-k >= the number of epochs")
    labels = {r["id"]: r["label"] for r in csv.DictReader(open(corpus / "test.csv"))}
    meta = load_checkpoint(files[max(values)])[1]
    rows = []
    for k in ks:
        picks = {p: chosen(values, k, p) for p in ("earliest", "latest")}
        row = {"run": str(run), "k": k, "distinct_values": len(set(values.values())), "epochs": len(values)}
        for p, eps in picks.items():
            row[f"{p}_epochs"] = eps
            row[f"{p}_test_accuracy"] = round(test_accuracy(average_states([files[e] for e in eps]), meta,
                                                            run.parent / "test.h5", labels), 4)
        rows.append(row)
        print(f"{run.parent.name:32s} k={k}: earliest {picks['earliest']} {row['earliest_test_accuracy']:.4f}   "
              f"latest {picks['latest']} {row['latest_test_accuracy']:.4f}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--corpus", type=Path, action="append",
                    help="the chat corpus of each run, in order (default: /work/data/<bench folder name>)")
    ap.add_argument("--k", default="3,5", help="top-k sizes, comma-separated")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    corpora = a.corpus or [Path("/work/data") / r.parent.name for r in a.runs]
    if len(corpora) != len(a.runs):
        sys.exit("--corpus: give one per run")
    rows = [r for run, c in zip(a.runs, corpora) for r in run_rows(run, c, ks)]
    for k in ks:
        kr = [r for r in rows if r["k"] == k]
        e, lt = (float(np.mean([r[f"{p}_test_accuracy"] for r in kr])) for p in ("earliest", "latest"))
        print(f"k={k}: mean test accuracy, ties to the earliest epochs {e:.4f}, to the latest {lt:.4f} "
              f"({len(kr)} runs)")
    if a.json:
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
