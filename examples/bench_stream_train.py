"""`pllcli train` on streamed feature stores: memory flat in store size, and streaming vs
in-memory on chat-fsdd.

    # peak RSS of train --data stream on FSDD stores of 1x, 4x and 16x the corpus (distinct ids, float16)
    python examples/bench_stream_train.py scale ../shared/data/fsdd/recordings --work runs/stream \
        --factors 1 4 16 --max-memory 64M --json runs/stream/scale.json
    # the default recipe on chat-fsdd, --data memory vs --data stream, same seed and epochs
    python examples/bench_stream_train.py chat runs/stream/chat_train.h5 runs/stream/chat_labels.h5 \
        runs/stream/chat_test.h5 CHAT/test.csv --work runs/stream --epochs 10 --speed-rounds 3 \
        --json runs/stream/chat.json

`scale` featurizes the recordings once (speech8k, float16), writes stores of K copies of every
clip (ids `ID~rK`, so every item is distinct to the trainer) with the digit of the file name as a
clean label, and trains each in a fresh process for the same number of steps (the 1x store
16 epochs when the 16x one trains 1): `--data stream --max-memory M` for every factor,
and `--data memory` at the smallest factor as the reference. Peak RSS is the process's own
(os.wait4 ru_maxrss). `chat` trains the default recipe twice on one label store and reports
epoch time, items/s, the data-wait share of the step time (log.jsonl) and test accuracy
(`pllcli evaluate` on the deployed checkpoint). Each prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_measured(args: list, env: dict | None = None) -> tuple[float, float, str]:
    """Run `python -m pllcli -q ARGS` in a fresh process: (wall s, peak RSS MiB of that process, stderr)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pllcli", "-q", *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"pllcli {' '.join(map(str, args[:2]))} failed ({p.returncode}): {err.strip()[-800:]}")
    return wall, ru.ru_maxrss / 1024, err


def deployed(run: Path) -> Path:
    """The checkpoint a run deploys: model.pt where train writes it, else averaged.pt."""
    return run / "model.pt" if (run / "model.pt").exists() else run / "averaged.pt"


def epoch_figures(run: Path) -> dict:
    """Mean epoch time, items/s and data-wait share over a run's log.jsonl."""
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    t = sum(r["time_s"] for r in recs)
    return {"epochs": len(recs), "epoch_s": t / len(recs), "items_per_s": sum(r["items_per_s"] for r in recs) / len(recs),
            "data_wait_share": sum(r["data_wait_share"] * r["time_s"] for r in recs) / t}


def replicate(src: Path, dst: Path, factor: int) -> None:
    """A store of `factor` copies of every clip of `src`, ids `ID~rK`, same config and dtype."""
    import numpy as np
    from pllcli.features import FeatureStore
    from pllcli.features.store import FeatureStoreWriter
    fs = FeatureStore(src)
    feats, offsets = fs.load_all()
    feats = feats.astype(fs.dtype, copy=False)
    nf = np.diff(offsets)
    tmp = dst.with_name(dst.name + ".tmp")
    with FeatureStoreWriter(tmp, fs.config) as w:
        for k in range(factor):
            w.add_block([f"{i}~r{k}" for i in fs.ids], feats, nf, fs.durations, [""] * len(fs))
    os.replace(tmp, dst)


def digit_labels(store: Path, out: Path) -> None:
    """A label store with the FSDD digit (the file name's first field) as every item's clean label."""
    import numpy as np
    from pllcli.features import FeatureStore
    from pllcli.labels.store import LabelData, write_label_store
    ids = FeatureStore(store).ids
    clean = np.array([int(str(i).split("_", 1)[0]) for i in ids], dtype=np.int32)
    write_label_store(out, LabelData.new(ids, [str(d) for d in range(10)], clean=clean), {"bench": "digits"})


def scale(args) -> dict:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = work / "fsdd1x.h5"
    if not base.exists():
        run_measured(["featurize", args.recordings, "-o", base, "--preset", "speech8k", "--dtype", "float16"])
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for i, f in enumerate(sorted(args.factors)):
        store = base if f == 1 else work / f"fsdd{f}x.h5"
        if not store.exists():
            replicate(base, store, f)
        labels = work / f"fsdd{f}x_labels.h5"
        if not labels.exists():
            digit_labels(store, labels)
        modes = ["memory", "stream"] if i == 0 else ["stream"]
        # as many steps for every store: memory use may grow with steps (allocator), not with the store
        epochs = args.epochs * max(args.factors) // f if args.equal_steps else args.epochs
        for mode in modes:
            run = work / f"scale_{f}x_{mode}"
            shutil.rmtree(run, ignore_errors=True)
            extra = ["--max-memory", args.max_memory] if mode == "stream" else []
            wall, rss, _ = run_measured(["train", store, "--labels", labels, "-o", run, "--epochs", epochs,
                                         "--objective", "ce", "--data", mode, *extra, "--device", "cpu",
                                         "--threads", args.threads, "--seed", 0], env)
            from pllcli.features import FeatureStore
            fs = FeatureStore(store)
            row = {"factor": f, "mode": mode, "items": len(fs), "store_mib": store.stat().st_size / 2**20,
                   "float32_mib": int(fs.offsets[-1]) * fs.feature_dim * 4 / 2**20,
                   "max_memory": args.max_memory if mode == "stream" else None, "wall_s": wall, "peak_rss_mib": rss,
                   **epoch_figures(run)}
            rows.append(row)
            print(f"{f:>3}x {mode:6s} {row['items']:>6} items  store {row['store_mib']:6.1f} MiB  "
                  f"peak RSS {rss:6.0f} MiB  {row['items_per_s']:7.0f} items/s", flush=True)
    ref = next(r for r in rows if r["mode"] == "stream")
    for r in rows:
        r["rss_vs_smallest_stream"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
    print("\n| store | items | file MiB | as float32 MiB | data | epochs | peak RSS MiB | vs 1x stream | items/s | data wait |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        data = f"stream, --max-memory {r['max_memory']}" if r["mode"] == "stream" else "memory"
        print(f"| {r['factor']}x | {r['items']:,} | {r['store_mib']:.0f} | {r['float32_mib']:.0f} | {data} | {r['epochs']} | "
              f"{r['peak_rss_mib']:.0f} | {r['rss_vs_smallest_stream']:.3f} | {r['items_per_s']:,.0f} | "
              f"{100 * r['data_wait_share']:.1f}% |")
    return {"rows": rows, "max_memory": args.max_memory, "epochs_largest": args.epochs, "equal_steps": args.equal_steps}


def chat(args) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for mode in ("memory", "stream"):
        run = args.work / f"chat_{mode}"
        if args.reuse and (run / "summary.json").exists():  # a finished run: its figures, no peak RSS
            wall, rss = json.loads((run / "summary.json").read_text())["wall_s"], float("nan")
        else:
            shutil.rmtree(run, ignore_errors=True)
            extra = ["--max-memory", args.max_memory] if mode == "stream" and args.max_memory else []
            wall, rss, _ = run_measured(["train", args.train, "--labels", args.labels, "-o", run, "--epochs",
                                         args.epochs, "--data", mode, *extra, "--device", "cpu", "--threads",
                                         args.threads, "--seed", args.seed], env)
        rep = run / "test.json"
        run_measured(["evaluate", deployed(run), args.test, args.truth, "--json", rep, "--device", "cpu"], env)
        acc = json.loads(rep.read_text())["clip"]["accuracy"]
        row = {"mode": mode, "wall_s": wall, "peak_rss_mib": rss, "test_accuracy": acc,
               "checkpoint": deployed(run).name, **epoch_figures(run)}
        rows.append(row)
        print(f"{mode:6s} test {acc:.3f}  epoch {row['epoch_s']:.1f}s  {row['items_per_s']:.0f} items/s  "
              f"wait {100 * row['data_wait_share']:.2f}%  RSS {rss:.0f} MiB", flush=True)
    mem, st = rows
    ratio = st["items_per_s"] / mem["items_per_s"]
    rounds = []
    for k in range(args.speed_rounds):  # interleaved 1-epoch runs: both paths under the same load
        r = {}
        for mode in ("memory", "stream"):
            run = args.work / f"chat_speed_{mode}"
            shutil.rmtree(run, ignore_errors=True)
            run_measured(["train", args.train, "--labels", args.labels, "-o", run, "--epochs", 1, "--data", mode,
                          "--device", "cpu", "--threads", args.threads, "--seed", args.seed], env)
            r[mode] = epoch_figures(run)
        r["ratio"] = r["stream"]["items_per_s"] / r["memory"]["items_per_s"]
        rounds.append(r)
        print(f"round {k + 1}: memory {r['memory']['items_per_s']:.0f} items/s, stream "
              f"{r['stream']['items_per_s']:.0f} items/s (wait {100 * r['stream']['data_wait_share']:.2f}%), "
              f"ratio {r['ratio']:.3f}", flush=True)
    print(f"\n| data | test acc ({mem['checkpoint']}) | epoch s | items/s | stream / memory | data wait | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{ratio:.2f}" if r is st else "1"
        print(f"| {r['mode']} | {r['test_accuracy']:.3f} | {r['epoch_s']:.1f} | {r['items_per_s']:.0f} | {rel} | "
              f"{100 * r['data_wait_share']:.2f}% | {r['peak_rss_mib']:.0f} |")
    if rounds:
        ratios = sorted(r["ratio"] for r in rounds)
        print(f"interleaved 1-epoch rounds: stream / memory items/s median {ratios[len(ratios) // 2]:.3f} "
              f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    return {"rows": rows, "stream_over_memory_items_per_s": ratio, "epochs": args.epochs, "seed": args.seed,
            "speed_rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scale", help="peak RSS of streamed training vs store size")
    s.add_argument("recordings", type=Path, help="FSDD recordings folder ({digit}_{speaker}_{take}.wav)")
    s.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    s.add_argument("--max-memory", default="64M")
    s.add_argument("--epochs", type=int, default=1, help="epochs of the largest store")
    s.add_argument("--equal-steps", action=argparse.BooleanOptionalAction, default=True,
                   help="smaller stores train proportionally more epochs (the same number of steps)")
    c = sub.add_parser("chat", help="memory vs stream on chat-fsdd")
    c.add_argument("train", type=Path, help="feature store of the training messages")
    c.add_argument("labels", type=Path, help="label store (build-candidates)")
    c.add_argument("test", type=Path, help="feature store of the test messages")
    c.add_argument("truth", type=Path, help="test.csv (id,path,label)")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--max-memory", default=None, help="budget of the stream run (default: train's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--reuse", action="store_true", help="keep finished runs (their peak RSS is then unknown)")
    c.add_argument("--speed-rounds", type=int, default=0,
                   help="then N rounds of 1-epoch runs, memory and stream in turn (speed under equal load)")
    for p in (s, c):
        p.add_argument("--work", type=Path, default=Path("runs/stream"))
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = {"what": args.what, "cpu_count": os.cpu_count(), **(scale(args) if args.what == "scale" else chat(args))}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
