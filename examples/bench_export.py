"""Export benchmark: parity, CPU latency per 1 s clip, size on disk (torch eager / TorchScript / ONNX).

    flock /tmp/pllcli-bench.lock python examples/bench_export.py CHECKPOINT DATA_DIR \
        [--clips 50] [--repeats 50] [--out-dir DIR] [--json FILE]

DATA_DIR holds WAV files (searched recursively); the first --clips (sorted) are used for the parity
figures at their full length, and each latency run feeds one clip cut or zero-padded to 1 s.
All timings use one CPU thread (torch.set_num_threads(1), onnxruntime intra_op_num_threads=1).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data_dir")
    ap.add_argument("--clips", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out-dir", default=None, help="keep the exported files here (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from pllcli import export as ex
    torch.set_num_threads(1)
    wavs = sorted(Path(args.data_dir).rglob("*.wav"))[: args.clips]
    if not wavs:
        sys.exit(f"no .wav files under {args.data_dir}")
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="bench_export_"))
    model, meta, cfg, frontend = ex.load_for_export(args.checkpoint)
    eager = ex.eager_module(model, meta, frontend)
    paths = {"onnx": out_dir / "model.onnx", "torchscript": out_dir / "model.ts.pt"}
    export_s = {}
    for fmt, p in paths.items():
        t0 = time.perf_counter()
        ex.export(args.checkpoint, p, fmt)
        export_s[fmt] = time.perf_counter() - t0
    runners = {fmt: ex.Runner(p, fmt) for fmt, p in paths.items()}
    clips = ex.load_clips([str(w) for w in wavs], cfg.sample_rate, cfg.frame_length)

    # parity at full clip length
    parity = {fmt: {"logits": 0.0, "probs": 0.0, "top1_agree": 0} for fmt in runners}
    for _, x in clips:
        with torch.no_grad():
            ref_l, ref_p = (t.numpy() for t in eager(torch.from_numpy(x)[None]))
        for fmt, run in runners.items():
            l, p = run(x[None])
            d = parity[fmt]
            d["logits"] = max(d["logits"], float(np.abs(l - ref_l).max()))
            d["probs"] = max(d["probs"], float(np.abs(p - ref_p).max()))
            d["top1_agree"] += int(l.argmax() == ref_l.argmax())

    # latency: batch 1, 1 s of audio
    one_s = [np.pad(x[: cfg.sample_rate], (0, max(0, cfg.sample_rate - len(x)))) for _, x in clips]

    def eager_call(x):
        with torch.no_grad():
            eager(torch.from_numpy(x)[None])
    calls = {"torch eager": eager_call,
             "torchscript": lambda x: runners["torchscript"](x[None]),
             "onnxruntime": lambda x: runners["onnx"](x[None])}
    latency = {}
    for name, fn in calls.items():
        for x in one_s[:5]:
            fn(x)  # warm-up
        ts = []
        for r in range(args.repeats):
            x = one_s[r % len(one_s)]
            t0 = time.perf_counter()
            fn(x)
            ts.append((time.perf_counter() - t0) * 1e3)
        latency[name] = {"median_ms": statistics.median(ts), "p90_ms": float(np.percentile(ts, 90)),
                         "mean_ms": statistics.fmean(ts)}
    sizes = {"checkpoint": Path(args.checkpoint).stat().st_size,
             "onnx": paths["onnx"].stat().st_size, "torchscript": paths["torchscript"].stat().st_size}
    report = {"checkpoint": str(args.checkpoint), "model": meta.get("model"), "classes": len(meta["classes"]),
              "sample_rate": cfg.sample_rate, "frontend": cfg.frontend, "clips": len(clips),
              "clip_seconds_mean": float(np.mean([len(x) for _, x in clips]) / cfg.sample_rate),
              "repeats": args.repeats, "threads": 1, "parity_max_abs_diff": parity,
              "latency_per_1s_clip": latency, "size_bytes": sizes, "export_seconds": export_s,
              "exported": {k: str(v) for k, v in paths.items()}}

    print(f"{len(clips)} clips from {args.data_dir}, {cfg.frontend} {cfg.sample_rate} Hz, "
          f"{len(meta['classes'])} classes, 1 thread")
    print(f"{'runtime':<14}{'max|dlogit|':>12}{'max|dprob|':>12}{'top1 agree':>12}{'median ms':>11}"
          f"{'p90 ms':>9}{'size MB':>9}")
    for name, fmt, size_key in (("torch eager", None, "checkpoint"), ("torchscript", "torchscript", "torchscript"),
                                ("onnxruntime", "onnx", "onnx")):
        par = parity.get(fmt) if fmt else None
        cols = (f"{par['logits']:>12.2e}{par['probs']:>12.2e}{par['top1_agree']:>8}/{len(clips):<3}" if par
                else f"{'(ref)':>12}{'(ref)':>12}{'':>12}")
        lat = latency[name]
        print(f"{name:<14}{cols}{lat['median_ms']:>11.2f}{lat['p90_ms']:>9.2f}{sizes[size_key] / 1e6:>9.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
