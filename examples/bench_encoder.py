"""Benchmark: pretrained encoder frames on FSDD with few labels (issue 15).

FSDD names are `{digit}_{speaker}_{take}.wav`; takes 0-4 are the test set, the rest train.
Rows: logistic regression (sklearn, standardised) on mean+max pooled frames with `--per-class`
labels per class (`--draws` random draws) and with all training labels, for the encoder and,
with `--baseline`, for the speech8k log-mel frontend pooled the same way. With `--train WORK`,
also `pllcli train` (default recipe) on an encoder feature store with the same splits.

    # setup (the only download: the openwakeword 0.4.0 wheel, for Google's speech_embedding;
    # only its melspectrogram.onnx and embedding_model.onnx are used, checked by sha256)
    python examples/bench_encoder.py --fetch /work/runs/encoders
    D=/work/runs/encoders/speech_embedding
    flock /tmp/pllcli-bench.lock timeout 900 python examples/bench_encoder.py \
        ../shared/data/fsdd/recordings --encoder onnx:$D,min_duration=1.5s --encoder onnx:$D \
        --encoder onnx:$D,pad=end --baseline --train /work/runs/encoders/train \
        --json /work/runs/encoders/bench_encoder.json

Cost on another corpus (`--cost MANIFEST --cost-dir DIR`, no FSDD folder needed): `featurize`
(library call, `--jobs`) of every clip of MANIFEST with each `--encoder` and, with `--baseline`,
the speech8k log-mel preset and bench_weak.py's log-mel (hop 256, 40 mels); rows: seconds,
x real time, store size, frames per second of audio, dim. The stores are named as bench_weak.py
names them (`feats_<config hash>.h5` / `feats_h256_m40.h5`), so `bench_weak.py --out DIR` reuses them:

    python examples/bench_encoder.py --cost /work/data/weak/clips.csv --cost-dir /work/runs/weak_enc \
        --encoder onnx:$D,min_duration=1.5s --baseline --json /work/runs/weak_enc/cost.json

Short FSDD clips are zero-padded to the encoder's receptive field (0.78 s): `pad=end` vs the
default `pad=centre`, and `min_duration=1.5s` (several windows per clip) are separate rows.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WHEEL = "openwakeword==0.4.0"


def fetch(folder: Path) -> Path:
    """pip download the wheel (no deps) into `folder`, extract the two speech_embedding files."""
    from pllcli.encoders.onnx import extract_speech_embedding
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("openwakeword-0.4.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(folder)],
                       check=True)
        wheels = sorted(folder.glob("openwakeword-0.4.0-*.whl"))
    return extract_speech_embedding(wheels[0], folder / "speech_embedding")


def list_fsdd(data: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    files = sorted(data.glob("*_*_*.wav"))
    if not files:
        sys.exit(f"no {{digit}}_{{speaker}}_{{take}}.wav files in {data}")
    digit = np.array([int(f.stem.split("_")[0]) for f in files])
    take = np.array([int(f.stem.split("_")[-1]) for f in files])
    return files, digit, take


def pooled(frames: list[np.ndarray]) -> np.ndarray:
    """[(T_i, D)] -> (N, 2D): mean and max over frames."""
    return np.stack([np.concatenate([f.mean(0), f.max(0)]) for f in frames]).astype(np.float64)


def encoder_frames(files, spec: str) -> tuple[list[np.ndarray], dict]:
    from pllcli.audio import load_audio
    from pllcli.encoders import build_encoder
    enc = build_encoder(spec)
    waves = [load_audio(str(f), enc.sample_rate).samples for f in files]
    t0 = time.perf_counter()
    frames, pads = enc.embed_many(waves)
    wall = time.perf_counter() - t0
    audio = sum(len(w) for w in waves) / enc.sample_rate
    info = {"encoder": enc.identity(), "describe": enc.describe(), "embed_seconds": round(wall, 2),
            "x_real_time": round(audio / wall, 1), "clips_padded": int(sum(p > 0 for p in pads)),
            "frames_per_clip": round(float(np.mean([len(f) for f in frames])), 2)}
    return frames, info


def logmel_frames(files) -> tuple[list[np.ndarray], dict]:
    from pllcli.audio import load_audio
    from pllcli.features.compute import compute_features
    from pllcli.features.config import FeatureConfig
    cfg = FeatureConfig.preset("speech8k")
    t0 = time.perf_counter()
    frames = compute_features([load_audio(str(f), cfg.sample_rate).samples for f in files], cfg)
    return frames, {"describe": cfg.summary(), "embed_seconds": round(time.perf_counter() - t0, 2)}


def draws(digit, train, per_class: int, n: int) -> list[np.ndarray]:
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        out.append(np.sort(np.concatenate([rng.choice(train[digit[train] == d], per_class, replace=False)
                                           for d in range(10)])))
    return out


def logreg_accuracy(x, y, fit_rows, test_rows) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    clf.fit(x[fit_rows], y[fit_rows])
    return float((clf.predict(x[test_rows]) == y[test_rows]).mean())


def rows_for(name: str, x, digit, train, test, few: list[np.ndarray]) -> list[dict]:
    rows = [{"features": name, "labels": f"{len(r) // 10}/class", "draw": i,
             "accuracy": logreg_accuracy(x, digit, r, test)} for i, r in enumerate(few)]
    rows.append({"features": name, "labels": "all", "draw": None,
                 "accuracy": logreg_accuracy(x, digit, train, test)})
    return rows


def train_rows(name: str, spec: str, data: Path, work: Path, per_class: int, n_draws: int,
               sup_epochs: int, full_epochs: int) -> list[dict]:
    """`pllcli train` (convgru, CE, library API) on an encoder feature store: few-label draws
    and all labels, test accuracy of last.pt. Splits and scoring are bench_ssl.py's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ssl import accuracy, split_stores
    from pllcli.features.config import encoder_config
    from pllcli.features.extract import featurize
    from pllcli.training.trainer import TrainConfig, train
    cfg = encoder_config(spec)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"fsdd_{cfg.hash()}.h5"
    if not store.exists():
        featurize(str(data), store, cfg, jobs=1, progress=False)
    rows = []
    for seed in range(n_draws):
        paths, _ = split_stores(work / f"{cfg.hash()}_splits", store, per_class, seed)
        runs = [("few", sup_epochs, 16, seed)] + ([("full", full_epochs, 64, None)] if seed == 0 else [])
        for split, epochs, bs, draw in runs:
            out = work / f"run_{cfg.hash()}_{split}_{seed}"
            t0 = time.perf_counter()
            train(TrainConfig(features=str(paths[split][0]), labels=str(paths[split][1]), outdir=str(out),
                              objectives=["ce"], epochs=epochs, batch_size=bs, clean_share=0.0,
                              valid_fraction=0.0, top_k=0, seed=0, device="cpu", progress=False, threads=1))
            rows.append({"features": f"{name} +train convgru", "labels": "all" if split == "full" else
                         f"{per_class}/class", "draw": draw, "seconds": round(time.perf_counter() - t0, 1),
                         "accuracy": accuracy(out / "last.pt", paths["test"][0])})
    return rows


def cost_rows(manifest: Path, folder: Path, specs: list[str], baseline: bool, jobs: int) -> list[dict]:
    """Featurize `manifest` into `folder` once per feature config (an existing store is reused:
    its row then says so and has no timing); one row per config."""
    from pllcli.features.config import FeatureConfig, encoder_config
    from pllcli.features.extract import featurize
    from pllcli.features.store import FeatureStore
    configs = [(f"encoder {s}", encoder_config(s), None) for s in specs]
    if baseline:
        configs += [("logmel speech8k (64 mels, 10 ms hop)", FeatureConfig.preset("speech8k"), None),
                    ("logmel bench_weak (40 mels, 32 ms hop)", FeatureConfig.preset(
                        "speech8k", hop_length=256, win_length=256, n_fft=512, n_mels=40), "feats_h256_m40.h5")]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cfg, fname in configs:
        store = folder / (fname or f"feats_{cfg.hash()}.h5")
        row = {"features": name, "store": str(store), "config": cfg.summary(), "jobs": jobs}
        if store.exists():
            row["reused"] = True
        else:
            summary = featurize(str(manifest), store, cfg, jobs=jobs, progress=False)
            row.update({k: summary.get(k) for k in ("wall_seconds", "audio_seconds", "x_real_time")})
        with FeatureStore(store) as fs:
            audio = float(np.sum(fs.durations))
            row.update({"clips": len(fs), "audio_seconds": round(audio, 1), "dim": int(fs.config.n_mels),
                        "frames_per_second": round(float(np.sum(fs.num_frames)) / audio, 2)})
        row["store_mb"] = round(store.stat().st_size / 1e6, 1)
        rows.append(row)
        print(f"# cost {name}: {row.get('x_real_time', 'reused')}x real time, {row['store_mb']} MB", file=sys.stderr)
    return rows


def print_cost(rows: list[dict]) -> None:
    print(f"{'features':<48} {'clips':>6} {'audio h':>8} {'seconds':>8} {'x real':>8} {'store MB':>9} {'frames/s':>9} {'dim':>4}")
    for r in rows:
        sec = f"{r['wall_seconds']:8.1f}" if r.get("wall_seconds") else f"{'reused':>8}"
        xrt = f"{r['x_real_time']:8.1f}" if r.get("x_real_time") else f"{'-':>8}"
        print(f"{r['features'][:48]:<48} {r['clips']:>6} {r['audio_seconds'] / 3600:8.2f} {sec} {xrt} "
              f"{r['store_mb']:9.1f} {r['frames_per_second']:9.2f} {r['dim']:>4}")


def print_table(rows: list[dict]) -> None:
    print(f"{'features':<38} {'labels':<10} {'draws':<22} {'mean':>6}")
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["features"], r["labels"]), []).append(r["accuracy"])
    for (feat, labels), accs in groups.items():
        print(f"{feat:<38} {labels:<10} {' '.join(f'{a:.3f}' for a in accs):<22} {np.mean(accs):>6.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", type=Path, help="FSDD recordings folder")
    ap.add_argument("--encoder", action="append", help=(
        "encoder spec, repeatable (default with --fetch: onnx:FETCH/speech_embedding, as is and with "
        "min_duration=1.5s)"))
    ap.add_argument("--fetch", type=Path, help="folder for the openwakeword wheel and the two files")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--baseline", action="store_true", help="also the speech8k log-mel row")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--train", type=Path, metavar="WORK", help=(
        "also pllcli train (convgru, CE) on an encoder store of the first --encoder, in WORK"))
    ap.add_argument("--sup-epochs", type=int, default=60, help="epochs of the few-label runs (batch 16)")
    ap.add_argument("--full-epochs", type=int, default=12, help="epochs of the all-label run (batch 64)")
    ap.add_argument("--cost", type=Path, metavar="MANIFEST",
                    help="featurize cost rows on this manifest (x real time, store size) instead of FSDD rows")
    ap.add_argument("--cost-dir", type=Path, default=None, help="folder of the --cost stores (required with --cost)")
    ap.add_argument("--jobs", type=int, default=1, help="featurize jobs of the --cost rows")
    a = ap.parse_args(argv)
    specs = a.encoder or []
    if a.cost is not None:
        if a.cost_dir is None:
            sys.exit("--cost needs --cost-dir DIR")
        rows = cost_rows(a.cost, a.cost_dir, specs, a.baseline, a.jobs)
        print_cost(rows)
        if a.json:
            from pllcli.io import write_json
            write_json({"manifest": str(a.cost), "cost": rows}, a.json)
            print(f"wrote {a.json}")
        return
    if a.fetch is not None:
        folder = fetch(a.fetch)
        print(f"speech_embedding files in {folder}", file=sys.stderr)
        specs = specs or [f"onnx:{folder}", f"onnx:{folder},min_duration=1.5s"]
    if a.data is None:
        return
    if not specs:
        sys.exit("give --encoder SPEC or --fetch DIR")
    files, digit, take = list_fsdd(a.data)
    test, train = np.flatnonzero(take <= 4), np.flatnonzero(take > 4)
    few = draws(digit, train, a.per_class, a.draws)
    out = {"data": str(a.data), "n_train": len(train), "n_test": len(test), "encoders": []}
    rows = []
    for spec in specs:
        frames, info = encoder_frames(files, spec)
        e = info["encoder"]
        name = e["name"] + (f" pad {e['pad']}" if e["pad"] != "centre" else "") + (
            f" min {e['min_duration']:g}s" if e["min_duration"] else "")
        rows += rows_for(name, pooled(frames), digit, train, test, few)
        out["encoders"].append({"name": name, "spec": spec, **info})
        print(f"# {name}: {info['describe']}; embed {info['embed_seconds']} s ({info['x_real_time']}x real time), "
              f"{info['clips_padded']}/{len(files)} clips padded, {info['frames_per_clip']} frames/clip")
    if a.baseline:
        lm, out["logmel"] = logmel_frames(files)
        rows += rows_for("logmel speech8k", pooled(lm), digit, train, test, few)
    if a.train is not None:
        rows += train_rows(out["encoders"][0]["name"], specs[0], a.data, a.train, a.per_class, a.draws,
                           a.sup_epochs, a.full_epochs)
    out["rows"] = rows
    print(f"# FSDD: train {len(train)} (takes 5+), test {len(test)} (takes 0-4); logistic regression on "
          f"mean+max pooled frames")
    print_table(rows)
    if a.json:
        from pllcli.io import write_json
        write_json(out, a.json)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
