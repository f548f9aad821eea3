#!/usr/bin/env python
"""Whole-process benchmark of `pllcli featurize` (start-up, imports, decode, features, HDF5) against
a naive torch script, each run a fresh process timed from outside like /usr/bin/time.

    flock /tmp/pllcli-bench.lock python examples/bench_featurize_process.py /work/shared/data/fsdd/recordings \
        --work /work/runs/features/bench_process --json /work/runs/features/bench_process.json

Rows (`--rows`, default all):
- naive:    `python naive.py DIR OUT.npz`: import torch, torchaudio, soundfile; per file soundfile.read ->
            (torchaudio resample if needed) -> MelSpectrogram (the preset's geometry, center=False) -> log;
            one .npz written at the end (the script is written into --work; 1 torch thread);
- jobs1, jobs2: `pllcli featurize DIR -o OUT.h5 --preset P --jobs N --overwrite`;
- one, naive_one: the same two on a single file (`pllcli featurize ONE.wav -o x.h5`);
- jobs1_x4, jobs2_x4: featurize on a manifest listing every file 4 times with distinct ids.
Wall time is time.perf_counter around the child; CPU (user + system) and peak RSS come from
os.wait4 on that child (peak RSS: the largest single process of the run, workers included).
The runs go in rounds (every row once per round, `--repeats` rounds, order rotated each round)
so that a busy spell of the shared machine hits every row alike; the table gives each row's best
and median wall, and ratios are also taken within each round (median and range). The environment
is passed through unchanged (no thread settings) for every row.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("naive", "jobs1", "jobs2", "one", "naive_one", "jobs1_x4", "jobs2_x4")
EXTS = (".wav", ".flac", ".ogg", ".mp3")

NAIVE = '''"""Naive featurizer: torch + torchaudio + soundfile, one file at a time, features to one .npz."""
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

torch.set_num_threads(1)  # one thread, like featurize's processes (more threads only spin on a busy machine)
src, out, sr_t, n_fft, win, hop, n_mels, fmin, fmax, off = sys.argv[1:11]
sr_t, n_fft, win, hop, n_mels = int(sr_t), int(n_fft), int(win), int(hop), int(n_mels)
p = Path(src)
files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix.lower() in {EXTS!r})
mel = torchaudio.transforms.MelSpectrogram(sr_t, n_fft=n_fft, win_length=win, hop_length=hop, f_min=float(fmin),
                                           f_max=float(fmax), n_mels=n_mels, center=False)
feats, ids = [], []
with torch.inference_mode():
    for f in files:
        x, sr = sf.read(f, dtype="float32", always_2d=True)
        w = torch.from_numpy(x.mean(axis=1))[None]
        if sr != sr_t:
            w = torchaudio.functional.resample(w, sr, sr_t)
        if w.shape[-1] < n_fft:
            w = torch.nn.functional.pad(w, (0, n_fft - w.shape[-1]))
        feats.append(torch.log(mel(w)[0] + float(off)).T.numpy())
        ids.append(f.stem)
lengths = np.array([len(a) for a in feats])
np.savez(out, features=np.concatenate(feats), lengths=lengths, ids=np.array(ids))
print(len(files))
'''.replace("{EXTS!r}", repr(EXTS))


def _pllcli() -> list[str]:
    """The console script next to this interpreter (as a user runs it), else `python -m pllcli`."""
    exe = Path(sys.executable).parent / "pllcli"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pllcli"]


def _timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` in a fresh process: wall s (perf_counter), cpu s and peak RSS MB (os.wait4)."""
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{log.read_text()[-2000:]}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024.0}


def _commands(args, work: Path, one: Path, m4: Path) -> dict[str, list[str]]:
    from pllcli.features.config import FeatureConfig
    c = FeatureConfig.preset(args.preset)
    geom = [str(v) for v in (c.sample_rate, c.n_fft, c.win_length, c.hop_length, c.n_mels, c.fmin, c.fmax_hz,
                             c.log_offset)]
    naive = work / "naive.py"
    fz = [*_pllcli(), "featurize"]
    common = ["--preset", args.preset, "--overwrite"]
    return {
        "naive": [sys.executable, str(naive), args.data, str(work / "naive.npz"), *geom],
        "jobs1": [*fz, args.data, "-o", str(work / "jobs1.h5"), "--jobs", "1", *common],
        "jobs2": [*fz, args.data, "-o", str(work / "jobs2.h5"), "--jobs", "2", *common],
        "one": [*fz, str(one), "-o", str(work / "one.h5"), *common],
        "naive_one": [sys.executable, str(naive), str(one), str(work / "naive_one.npz"), *geom],
        "jobs1_x4": [*fz, str(m4), "-o", str(work / "jobs1_x4.h5"), "--jobs", "1", *common],
        "jobs2_x4": [*fz, str(m4), "-o", str(work / "jobs2_x4.h5"), "--jobs", "2", *common],
    }


RATIOS = (  # key, slower row, faster row, label: per round, wall(slower) / wall(faster)
    ("speedup_jobs1_vs_naive", "naive", "jobs1", "naive / jobs1"),
    ("speedup_jobs2_vs_naive", "naive", "jobs2", "naive / jobs2"),
    ("scaling_1_to_2_jobs", "jobs1", "jobs2", "jobs1 / jobs2"),
    ("scaling_1_to_2_jobs_x4", "jobs1_x4", "jobs2_x4", "jobs1 / jobs2 (x4)"),
    ("speedup_one_vs_naive_one", "naive_one", "one", "naive / pllcli, one file"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder of audio files (e.g. /work/shared/data/fsdd/recordings)")
    ap.add_argument("--work", help="scratch folder for outputs (default: a temporary folder)")
    ap.add_argument("--json", help="write the figures as JSON here")
    ap.add_argument("--preset", default="speech8k")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (each row once per round)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="measurements to run")
    args = ap.parse_args()
    files = sorted(str(p.resolve()) for p in Path(args.data).rglob("*") if p.suffix.lower() in EXTS)
    if not files:
        raise SystemExit(f"{args.data}: no audio files")
    args.data = str(Path(args.data).resolve())
    tmp = None if args.work else tempfile.mkdtemp(prefix="bench_featurize_process_")
    work = Path(args.work or tmp)
    work.mkdir(parents=True, exist_ok=True)
    (work / "naive.py").write_text(NAIVE)
    m4 = work / "corpus_x4.csv"
    m4.write_text("id,path\n" + "".join(f"r{r}_{Path(f).stem},{f}\n" for r in range(4) for f in files))
    cmds = _commands(args, work, Path(files[0]), m4)
    res: dict = {"data": args.data, "files": len(files), "one_file": files[0], "preset": args.preset,
                 "repeats": args.repeats, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                 "commands": {r: " ".join(cmds[r]) for r in args.rows}}
    runs: dict[str, list[dict]] = {r: [] for r in args.rows}
    for k in range(args.repeats):
        order = args.rows[k % len(args.rows):] + args.rows[:k % len(args.rows)]
        for row in order:
            runs[row].append(_timed(cmds[row], work / f"{row}.log"))
    res["loadavg_end"] = os.getloadavg()
    for row, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        res[row] = {"best_wall_s": min(walls), "median_wall_s": statistics.median(walls),
                    "best_cpu_s": min(r["cpu_s"] for r in rs), "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                    "runs_wall_s": [round(w, 3) for w in walls]}
    for key, slow, fast, _ in RATIOS:
        if slow in runs and fast in runs:
            per = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[slow], runs[fast])]
            res[key] = {"best": res[slow]["best_wall_s"] / res[fast]["best_wall_s"],
                        "per_round_median": statistics.median(per), "per_round": [round(x, 3) for x in per]}
    print(f"{len(files)} files in {args.data}, preset {args.preset}, {args.repeats} rounds; load average (1 min) "
          f"{res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end on {os.cpu_count()} CPUs")
    print(f"{'row':<11}{'best s':>9}{'median s':>10}{'cpu s':>8}{'peak RSS MB':>13}  wall s of each round")
    for row in args.rows:
        r = res[row]
        print(f"{row:<11}{r['best_wall_s']:>9.3f}{r['median_wall_s']:>10.3f}{r['best_cpu_s']:>8.2f}"
              f"{r['peak_rss_mb']:>13.0f}  {' '.join(f'{w:.3f}' for w in r['runs_wall_s'])}")
    for key, _, _, label in RATIOS:
        if key in res:
            per = res[key]["per_round"]
            print(f"{label:<26} best/best {res[key]['best']:.2f}x, per round median {res[key]['per_round_median']:.2f}x "
                  f"({min(per):.2f}-{max(per):.2f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
