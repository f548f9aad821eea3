#!/usr/bin/env python
"""Where the time of a 2-job `featurize` run goes, and the best 1 -> 2 job scaling it allows.

    flock /tmp/pllcli-bench.lock python examples/featurize_timeline.py ../shared/data/fsdd/recordings \
        --repeat 4 --json /work/runs/features/timeline.json

Runs `featurize --jobs 1` and `--jobs 2` in fresh processes (no torch: featurize's log-mel path
does not import it, as in bench_featurize.py) with timers wrapped around the pipeline's functions, and prints, for the
median run:
- the parent's serial work before the fork (reading the input list, preparing the journal,
  building the frontend), the fork itself, and when the worker starts its first chunk;
- the first chunk of each process against their median chunk ("cold start": page faults and
  caches of a fresh process);
- the tail: from the worker's last chunk to the end (last writes, closing and renaming the
  store, removing the journal).
From these it derives a ceiling for the scaling: T2 >= (T1 + W) / 2, where W is the work a
2-job run cannot avoid on top of a 1-job run (the worker idles during the parent's pre-fork
work and the fork, then pays its own cold start), i.e. scaling <= 2 T1 / (T1 + W).
`--copies 4` lists the corpus 4 times (12,000 files for FSDD).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _child(manifest: str, jobs: int, log_dir: str) -> dict:
    # no torch: featurize's log-mel path does not import it (the workers fork from a torch-free parent)
    from pllcli.features import extract as X
    from pllcli.features import journal as J
    from pllcli.features import pool as P
    from pllcli.features import store as S
    from pllcli.features.config import FeatureConfig
    main = os.getpid()
    events: list[tuple] = []

    def wrap(owner, name):
        f = getattr(owner, name)

        @functools.wraps(f)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                ev = ("P" if os.getpid() == main else "W", name, t0, time.perf_counter())
                if ev[0] == "W":  # the worker's events go to a file the parent reads at the end
                    with open(Path(log_dir) / f"w{os.getpid()}.jsonl", "a") as fh:
                        fh.write(json.dumps(ev) + "\n")
                else:
                    events.append(ev)
        setattr(owner, name, timed)

    for name in ("resolve_inputs", "open_journal", "warm_up", "process_chunk", "load_part", "finish_workers"):
        wrap(X, name)
    wrap(P, "fork_worker")
    wrap(J.shutil, "rmtree")
    for name in ("__init__", "add_blocks", "close"):
        wrap(S.FeatureStoreWriter, name)
    out = Path(log_dir) / "out.h5"
    t0 = time.perf_counter()
    X.featurize(manifest, out, FeatureConfig.preset("speech8k"), jobs=jobs, overwrite=True, progress=False)
    t1 = time.perf_counter()
    out.unlink()
    for p in Path(log_dir).glob("w*.jsonl"):
        events += [tuple(json.loads(line)) for line in p.read_text().splitlines()]
        p.unlink()
    return {"wall": t1 - t0, "events": [(w, n, s - t0, e - t0) for w, n, s, e in events]}


def _analyse(run: dict) -> dict:
    ev = run["events"]
    chunks = {w: [(s, e) for ww, n, s, e in ev if ww == w and n == "process_chunk"] for w in ("P", "W")}

    def first(name, who="P"):
        return next(((s, e) for w, n, s, e in ev if w == who and n == name), None)

    r = {"wall": run["wall"], "chunks_parent": len(chunks["P"]), "chunks_worker": len(chunks["W"])}
    med = statistics.median(e - s for w in chunks for s, e in chunks[w][1:] if e - s > 0) if ev else 0
    r["median_chunk"] = med
    r["cold_parent"] = chunks["P"][0][1] - chunks["P"][0][0] - med if chunks["P"] else 0.0
    fork = first("fork_worker")
    if fork and chunks["W"]:  # (a tiny input may leave the worker without a chunk)
        r["pre_fork"] = fork[0]
        r["fork"] = fork[1] - fork[0]
        r["worker_first_chunk_at"] = chunks["W"][0][0]
        r["cold_worker"] = chunks["W"][0][1] - chunks["W"][0][0] - med
        r["worker_done_at"] = chunks["W"][-1][1]
        r["tail_after_worker"] = run["wall"] - r["worker_done_at"]
    r["readback"] = sum(e - s for w, n, s, e in ev if n == "load_part")
    r["writes"] = sum(e - s for w, n, s, e in ev if n == "add_blocks")
    r["open_output"] = sum(e - s for w, n, s, e in ev if n == "__init__")
    r["close"] = sum(e - s for w, n, s, e in ev if n == "close")
    r["remove_journal"] = sum(e - s for w, n, s, e in ev if n == "rmtree")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder of audio files (e.g. ../shared/data/fsdd/recordings)")
    ap.add_argument("--work", default="/tmp/pllcli-timeline")
    ap.add_argument("--copies", type=int, default=1, help="list the corpus this many times")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of (1 job, 2 jobs); the median round is shown")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.child[2])))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.resolve()) for p in Path(args.data).rglob("*")
                   if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
    if not files:
        raise SystemExit(f"{args.data}: no audio files")
    man = work / "corpus.csv"
    man.write_text("id,path\n" + "".join(f"r{r}_{Path(f).stem},{f}\n" for r in range(args.copies) for f in files))
    rounds = []
    for _ in range(args.repeat):
        got = {}
        for jobs in (1, 2):
            p = subprocess.run([sys.executable, __file__, "-", "--child", str(man), str(jobs), str(work)],
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if p.returncode:
                raise SystemExit(p.stderr)
            got[jobs] = _analyse(json.loads(p.stdout.strip().splitlines()[-1]))
        rounds.append(got)
    rounds.sort(key=lambda g: g[1]["wall"] / g[2]["wall"])
    g = rounds[len(rounds) // 2]
    one, two = g[1], g[2]
    if "fork" not in two:
        raise SystemExit("the 2-job run forked no worker that took a chunk: the input is too small")
    unavoidable = two["pre_fork"] + 2 * two["fork"] + (two["worker_first_chunk_at"] - two["pre_fork"] - two["fork"]) \
        + max(0.0, two["cold_worker"])
    ceiling = 2 * one["wall"] / (one["wall"] + unavoidable)
    ms = lambda x: f"{1000 * x:7.1f} ms"  # noqa: E731
    per_round = ", ".join(f"{r[1]['wall'] / r[2]['wall']:.2f}" for r in rounds)
    print(f"{len(files) * args.copies} files, median of {args.repeat} rounds (scaling per round: {per_round})")
    print(f"  1 job wall                                {ms(one['wall'])}   (first chunk {ms(one['cold_parent'])} "
          f"over the median {ms(one['median_chunk'])})")
    print(f"  2 jobs wall                               {ms(two['wall'])}   scaling {one['wall'] / two['wall']:.2f}x")
    print(f"  parent's work before the fork             {ms(two['pre_fork'])}   (worker not yet there)")
    print(f"  fork (parent blocked)                     {ms(two['fork'])}")
    print(f"  worker starts its first chunk at          {ms(two['worker_first_chunk_at'])}")
    print(f"  worker's cold start (first chunk - median){ms(two['cold_worker'])}")
    print(f"  parent reads back worker parts            {ms(two['readback'])}   ({two['chunks_worker']} parts)")
    print(f"  parent writes to HDF5 (2 jobs / 1 job)    {ms(two['writes'])} / {ms(one['writes'])}")
    print(f"  worker done at                            {ms(two['worker_done_at'])}; "
          f"tail after it {ms(two['tail_after_worker'])} (close {ms(two['close'])}, "
          f"journal removal {ms(two['remove_journal'])})")
    print(f"  unavoidable extra work W (idle worker before its first chunk + fork + cold start) {ms(unavoidable)}")
    print(f"  => ceiling on the scaling: 2 T1 / (T1 + W) = {ceiling:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"files": len(files) * args.copies, "rounds": rounds,
                                               "median_round": g, "unavoidable_s": unavoidable,
                                               "scaling_ceiling": ceiling}, indent=2) + "\n")


if __name__ == "__main__":
    main()
