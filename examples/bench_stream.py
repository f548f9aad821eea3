"""Streaming vs in-memory batching of a feature store larger than --max-memory.

    python examples/bench_stream.py runs/bench_stream.h5 --items 100000 --max-memory 256M \
        --json runs/bench_stream.json

Writes (or reuses) a synthetic store in the feature-store layout: --items clips of 8-80 frames
x 64 bins, float16 (FSDD-like lengths). Each mode then runs one epoch of batches (batch 64,
random crops of --max-frames, as `train` builds them) in a fresh process:

- memory: `FeatureStore.load_all` + `InMemoryFeatures.gather` over `epoch_batches` (the path
  every stage uses today);
- stream, 0 and 2 DataLoader workers: `StreamDataset` with the per-worker buffer that keeps
  the feature data within --max-memory (`stream_buffer_frames`).

Reported per mode: items/s over the epoch (store open and load included), CPU seconds of the
process (what a training step competes with) and of its workers, peak RSS of the process
(VmHWM) and of its largest DataLoader worker (ru_maxrss of the children: a forked worker also
counts the parent's anonymous pages it inherited), and the RSS after the imports (torch alone
is a few hundred MB). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BATCH = 64
F = 64


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_store(path: Path, items: int, seed: int = 0) -> None:
    import numpy as np
    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import FeatureStoreWriter
    rng = np.random.default_rng(seed)
    cfg = FeatureConfig.preset("speech8k").replace(n_mels=F, dtype="float16")
    with FeatureStoreWriter(path, cfg) as w:
        for s in range(0, items, 4096):
            k = min(4096, items - s)
            nf = rng.integers(8, 81, k)
            x = rng.standard_normal((int(nf.sum()), F), dtype=np.float32).astype(np.float16)
            w.add_block([f"c{i:08d}" for i in range(s, s + k)], x, nf, nf * 0.01, [""] * k)


def run_memory(store: str, max_frames: int) -> int:
    import numpy as np
    from pllcli.features import FeatureStore
    from pllcli.training.data import InMemoryFeatures, epoch_batches
    fs = FeatureStore(store)
    mem = InMemoryFeatures(*fs.load_all())
    n = 0
    for rows in epoch_batches(np.arange(len(fs)), mem.num_frames, BATCH, 0, 0):
        x, _ = mem.gather(rows, max_frames, np.random.default_rng([0, int(rows[0]), 0, 0]))
        n += len(rows)
    return n


def run_stream(store: str, max_frames: int, workers: int, max_memory: int) -> int:
    from pllcli.features import FeatureStore
    from pllcli.training.stream import StreamDataset, StreamLoader, stream_buffer_frames
    fs = FeatureStore(store)
    buf = stream_buffer_frames(max_memory, fs, BATCH, workers, max_frames)
    ld = StreamLoader(StreamDataset(fs, batch_size=BATCH, max_frames=max_frames, buffer_frames=buf), workers)
    n = 0
    for b in ld.epoch(0):
        n += len(b["index"])
    return n


def child(args) -> None:
    import torch
    torch.set_num_threads(1)
    base = vm_kib("VmRSS")
    me = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = me.ru_utime + me.ru_stime
    t = time.perf_counter()
    if args.run == "memory":
        n = run_memory(args.store, args.max_frames)
    else:
        n = run_stream(args.store, args.max_frames, args.workers, args.max_memory_bytes)
    dt = time.perf_counter() - t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"mode": args.run, "workers": args.workers, "items": n, "seconds": dt,
                      "main_cpu_seconds": me.ru_utime + me.ru_stime - cpu0,
                      "worker_cpu_seconds": kids.ru_utime + kids.ru_stime,
                      "items_per_s": n / dt, "rss_after_imports_mb": base / 1024, "peak_rss_mb": vm_kib("VmHWM") / 1024,
                      "worker_peak_rss_mb": kids.ru_maxrss / 1024 if args.workers else 0.0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="feature store to write (if absent) and read")
    ap.add_argument("--items", type=int, default=100_000, help="clips in the synthetic store")
    ap.add_argument("--max-memory", default="256M", help="budget for the streamed feature data (8G, 512M, ...)")
    ap.add_argument("--max-frames", type=int, default=64, help="crop length of a batch item")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--run", choices=["memory", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-memory-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        return child(args)
    from pllcli.features import FeatureStore
    from pllcli.training.stream import in_memory_bytes, parse_memory
    store = Path(args.store)
    if not store.exists():
        t = time.perf_counter()
        make_store(store, args.items)
        print(f"wrote {store} ({store.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    budget = parse_memory(args.max_memory)
    fs = FeatureStore(store)
    need = in_memory_bytes(fs)
    print(f"{len(fs)} items, {int(fs.offsets[-1])} frames x {fs.feature_dim} {fs.dtype}: file "
          f"{store.stat().st_size / 2**20:.0f} MiB, in memory {need / 2**20:.0f} MiB; --max-memory "
          f"{budget / 2**20:.0f} MiB")
    rows = []
    for mode, workers in (("memory", 0), ("stream", 0), ("stream", 2)):
        cmd = [sys.executable, __file__, str(store), "--run", mode, "--workers", str(workers),
               "--max-frames", str(args.max_frames), "--max-memory-bytes", str(budget)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n| mode | workers | items | epoch s | main CPU s | workers CPU s | items/s | peak RSS MB "
          "| worker peak MB | RSS after imports MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['items']:,} | {r['seconds']:.2f} | {r['main_cpu_seconds']:.2f} | "
              f"{r['worker_cpu_seconds']:.2f} | "
              f"{r['items_per_s']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} | {r['rss_after_imports_mb']:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"store": str(store), "items": len(fs), "store_bytes": need,
                                               "max_memory": budget, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
