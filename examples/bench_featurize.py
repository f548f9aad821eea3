#!/usr/bin/env python
"""Benchmark `pllcli featurize` end to end (decode + features + HDF5 write) against a naive loop.

    flock /tmp/pllcli-bench.lock python examples/bench_featurize.py /work/shared/data/fsdd/recordings \
        --work /work/runs/features/bench --json /work/runs/features/bench.json

Every measurement runs in a fresh subprocess (so peak RSS is per measurement) with its heavy
imports done before the clock starts (torch for the naive loop; featurize's log-mel path imports
no torch, and this child does not either, so its workers fork from a torch-free parent):
- naive: per file soundfile.read -> torchaudio.functional.resample -> MelSpectrogram -> log,
  one file at a time, 1 torch thread, features not written (a conservative baseline);
- featurize --jobs 1 and --jobs 2 on the corpus (manifest), HDF5 written;
- featurize --jobs 1 and --jobs 2 on the corpus listed 4 times with distinct ids (scaling
  on a longer run; peak RSS vs corpus size).
The runs go in rounds (one run of each measurement per round, --repeats rounds) and the best
run of each counts; ratios are also given per round (median and range), since the runs of
one round share the machine's state (other tenants make whole minutes slower or faster). `--rows` picks the measurements (default all); `cpu s` counts the CPU time of the
measured process and its workers, a steadier figure than wall time on a shared machine.
`--layout N` adds the storage-layout comparison (ragged vs one dataset per clip) for N clips.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("naive", "jobs1", "jobs2", "jobs1_x4", "jobs2_x4")

def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def _cpu_split() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its finished child processes."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime, b.ru_utime + b.ru_stime


def _cpu_s() -> float:
    return sum(_cpu_split())


def _child(args) -> dict:
    from pllcli.features.config import FeatureConfig
    cfg = FeatureConfig.preset(args.preset)
    if args.child == "naive":
        import torch
        import torchaudio  # imported before the clock
        del torchaudio
        torch.set_num_threads(1)
        import soundfile as sf
        import torchaudio.functional as AF
        import torchaudio.transforms as T
        files = [ln.split(",", 1)[1] for ln in Path(args.manifest).read_text().splitlines()[1:]]
        mel = T.MelSpectrogram(cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
                               hop_length=cfg.hop_length, f_min=cfg.fmin, f_max=cfg.fmax_hz, n_mels=cfg.n_mels)
        t0, c0 = time.perf_counter(), _cpu_s()
        audio = 0.0
        with torch.inference_mode():
            for f in files:
                x, sr = sf.read(f, dtype="float32", always_2d=True)
                audio += x.shape[0] / sr
                w = torch.from_numpy(x.mean(1))[None]
                w = AF.resample(w, sr, cfg.sample_rate)
                torch.log(mel(w) + cfg.log_offset)
        wall = time.perf_counter() - t0
        return {"mode": "naive", "files": len(files), "audio_s": audio, "wall_s": wall,
                "cpu_s": _cpu_s() - c0, "x_rt": audio / wall, "peak_rss_mb": _peak_rss_mb()}
    from pllcli.features.extract import featurize
    out = Path(args.work) / f"{args.child}.h5"
    t0, (p0, w0) = time.perf_counter(), _cpu_split()
    s = featurize(args.manifest, out, cfg, jobs=args.jobs, overwrite=True, progress=False,
                  chunk_size=args.chunk_size)
    wall = time.perf_counter() - t0
    p1, w1 = _cpu_split()
    size = out.stat().st_size
    out.unlink()
    return {"mode": args.child, "jobs": args.jobs, "files": s["files_done"], "audio_s": s["audio_seconds"],
            "wall_s": wall, "cpu_s": p1 + w1 - p0 - w0, "cpu_parent_s": p1 - p0, "cpu_workers_s": w1 - w0,
            "x_rt": s["audio_seconds"] / wall, "store_mb": size / 2**20,
            "peak_rss_mb": _peak_rss_mb()}


def _run_child(mode: str, manifest: Path, args, jobs: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--manifest", str(manifest), "--work", str(args.work),
           "--preset", args.preset, "--jobs", str(jobs), "--chunk-size", str(args.chunk_size), "x"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{p.stderr}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if not r["files"]:
        raise SystemExit(f"{mode}: no file was featurized (check the paths in {manifest})")
    return r


def _layout(n: int, work: Path, seed: int = 0) -> list[dict]:
    """Ragged (features + offsets) vs one dataset per clip, n clips of ~38 x 64 float32."""
    import h5py
    import numpy as np

    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import FeatureStore, FeatureStoreWriter
    rng = np.random.default_rng(seed)
    lens = rng.integers(8, 80, n)
    ids = [f"clip{i:07d}" for i in range(n)]
    block = rng.standard_normal((int(lens.max()), 64)).astype(np.float32)
    q = rng.choice(n, size=min(n, 2000), replace=False)
    rows = []
    # ragged
    p = work / "layout_ragged.h5"
    t0 = time.perf_counter()
    with FeatureStoreWriter(p, FeatureConfig.preset("speech8k")) as w:
        for i in range(n):
            w.add(ids[i], block[:lens[i]], 0.1, "")
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs = FeatureStore(p)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in q:
        fs.get(ids[i])
    t_rand = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs.load_all()
    t_all = time.perf_counter() - t0
    fs.close()
    rows.append({"layout": "ragged", "clips": n, "write_s": t_write, "open_s": t_open,
                 "random_read_ms": 1000 * t_rand / len(q), "read_all_s": t_all, "mb": p.stat().st_size / 2**20})
    # one dataset per clip (lhotse numpy_hdf5 style)
    p = work / "layout_perclip.h5"
    t0 = time.perf_counter()
    with h5py.File(p, "w") as f:
        for i in range(n):
            f.create_dataset(ids[i], data=block[:lens[i]])
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    f = h5py.File(p, "r")
    keys = np.asarray(list(f.keys()))
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in q:
        f[ids[i]][()]
    t_rand = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in keys:
        f[k][()]
    t_all = time.perf_counter() - t0
    f.close()
    rows.append({"layout": "per-clip", "clips": n, "write_s": t_write, "open_s": t_open,
                 "random_read_ms": 1000 * t_rand / len(q), "read_all_s": t_all, "mb": p.stat().st_size / 2**20})
    for name in ("layout_ragged.h5", "layout_perclip.h5"):
        (work / name).unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder of audio files (e.g. ../shared/data/fsdd/recordings)")
    ap.add_argument("--work", default="/work/runs/features/bench", help="scratch folder for stores")
    ap.add_argument("--json", help="write the figures as JSON here")
    ap.add_argument("--preset", default="speech8k")
    ap.add_argument("--chunk-size", type=int, default=None, help="files per chunk (default: featurize's)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is reported)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="measurements to run")
    ap.add_argument("--layout", type=int, nargs="*", default=[], help="clip counts for the layout comparison")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk_size is None:
        from pllcli.features.extract import DEFAULT_CHUNK
        args.chunk_size = DEFAULT_CHUNK
    if args.child:
        print(json.dumps(_child(args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.work = work
    exts = (".wav", ".flac", ".ogg", ".mp3")
    files = sorted(str(p.resolve()) for p in Path(args.data).rglob("*") if p.suffix.lower() in exts)
    if not files:
        raise SystemExit(f"{args.data}: no audio files")
    m1, m4 = work / "corpus.csv", work / "corpus_x4.csv"
    m1.write_text("id,path\n" + "".join(f"{Path(f).stem},{f}\n" for f in files))
    m4.write_text("id,path\n" + "".join(f"r{r}_{Path(f).stem},{f}\n" for r in range(4) for f in files))

    res = {"data": args.data, "files": len(files), "preset": args.preset, "chunk_size": args.chunk_size,
           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    # rounds of one run per measurement, so that a slow spell of the machine (other tenants)
    # hits every row alike instead of all repeats of one row; the best run of each row counts
    runs: dict[str, list[dict]] = {row: [] for row in args.rows}
    for _ in range(args.repeats):
        for row in args.rows:
            mode, _, x4 = row.partition("_")
            runs[row].append(_run_child(row, m4 if x4 else m1, args, 2 if mode == "jobs2" else 1))
    for row, rs in runs.items():
        res[row] = min(rs, key=lambda r: r["wall_s"])
        res[row]["runs_wall_s"] = [round(x["wall_s"], 3) for x in rs]
    res["loadavg_end"] = os.getloadavg()
    ratios = [("speedup_vs_naive", "jobs1", "naive", "jobs1 / naive"),
              ("scaling_1_to_2_jobs", "jobs2", "jobs1", "jobs2 / jobs1"),
              ("scaling_1_to_2_jobs_x4", "jobs2_x4", "jobs1_x4", "jobs2 / jobs1 (x4)")]
    for key, a, b, _ in ratios:
        if a in res and b in res:
            res[key] = res[a]["x_rt"] / res[b]["x_rt"]
            # the same ratio within each round (runs a minute apart share the machine's state)
            res[key + "_per_round"] = [rb["wall_s"] / ra["wall_s"] for ra, rb in zip(runs[a], runs[b])]
    if "jobs1" in res and "jobs1_x4" in res:
        res["rss_ratio_x4"] = res["jobs1_x4"]["peak_rss_mb"] / res["jobs1"]["peak_rss_mb"]
    print(f"load average (1 min) at start {res['loadavg_start'][0]:.2f}, at end {res['loadavg_end'][0]:.2f} "
          f"on {os.cpu_count()} CPUs (other users' jobs compete for the cores); chunk size {args.chunk_size}")
    print(f"{'run':<12}{'files':>7}{'audio s':>10}{'wall s':>9}{'cpu s':>8}{'parent/workers':>16}{'x RT':>8}"
          f"{'peak RSS MB':>13}  wall s of each run")
    for k in args.rows:
        r = res[k]
        split = f"{r['cpu_parent_s']:.3f}/{r['cpu_workers_s']:.3f}" if "cpu_parent_s" in r else "-"
        print(f"{k:<12}{r['files']:>7}{r['audio_s']:>10.1f}{r['wall_s']:>9.3f}{r['cpu_s']:>8.3f}{split:>16}"
              f"{r['x_rt']:>8.0f}{r['peak_rss_mb']:>13.0f}  {' '.join(f'{w:.3f}' for w in r['runs_wall_s'])}")
    line = [f"{label} = {res[key]:.2f}x (per round: median {statistics.median(res[key + '_per_round']):.2f}, "
            f"{min(res[key + '_per_round']):.2f}-{max(res[key + '_per_round']):.2f})"
            for key, _, _, label in ratios if key in res]
    if "rss_ratio_x4" in res:
        line.append(f"RSS x4 corpus / corpus = {res['rss_ratio_x4']:.2f}")
    print("\n".join(line))
    if args.layout:
        res["layout"] = []
        print(f"\n{'layout':<10}{'clips':>8}{'write s':>9}{'open s':>9}{'rand ms':>9}{'all s':>8}{'MB':>8}")
        for n in args.layout:
            for r in _layout(n, work):
                res["layout"].append(r)
                print(f"{r['layout']:<10}{r['clips']:>8}{r['write_s']:>9.3f}{r['open_s']:>9.3f}"
                      f"{r['random_read_ms']:>9.3f}{r['read_all_s']:>8.3f}{r['mb']:>8.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
