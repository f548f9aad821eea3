"""What limits chat-fsdd on unseen voices with a pretrained encoder (issue 15 analysis).

    python examples/chat_unseen_ceiling.py ../shared/data/fsdd/recordings \
        --encoder onnx:DIR/speech_embedding,min_duration=1s \
        --fold jackson,theo --fold george,lucas --fold nicolas,yweweler \
        --corpus /work/data/chat_unseen --json chat_unseen_ceiling.json

For each fold (two voices held out, as `make_chat_corpus.py --test-speakers` does), a linear probe
(logistic regression on the mean+max pooled frames, `bench_encoder.py`'s) is trained on every
single digit of the four other voices and scored per held-out voice:
- clean: the FSDD recordings as they are;
- noisy: each recording passed through the chat corpus's message noise (gain, lead and tail
  silence, white noise at the source rate; the constants of `make_chat_corpus.py`), training and
  test alike;
- the voice's speech level and the SNR that noise gives it.
A two-word message needs both words right, so a fold's pair ceiling is the mean over its voices of
the word accuracy squared. `--voices-curve` trains the clean probe on 1..5 of the other voices
(every subset) for each held-out voice: how word accuracy on a new voice grows with the number of
training voices.

`--split-stores CORPUS OUT` writes OUT/train.h5 and OUT/test.h5 of the corpus with every message cut
at its pauses and each part embedded alone (frames concatenated; `--encoder` as given, 2 processes);
`bench_chat.py CORPUS OUT ...` then trains on them as it would on its own stores: the design
"embed each word alone" measured end to end.

`--snr-bands CORPUS CHECKPOINT STORE` scores a trained model (e.g. bench_chat's run's model.pt on its
test.h5) per test message and groups the accuracy by the message's SNR (speech level over the
quietest tenth of its 20 ms windows): where on unseen voices the errors are.

`--corpus DIR` adds the message check: every message cut at its silences (an energy detector;
cut at the middle of each pause), and the messages with two parts give a per-word probe, trained
on training messages (truth labels) and scored on test messages, next to the same probe on the
middle frames of the whole-message embedding: whether embedding each word alone gains anything.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import list_fsdd, logreg_accuracy, pooled  # noqa: E402

# make_chat_corpus.py's message: each word x gain, pauses, lead and tail of zeros, then white
# noise of one standard deviation drawn per message, at the recordings' own rate.
GAIN = (0.6, 1.0)
LEAD_TAIL_S = (0.0, 0.3)
NOISE_STD = (0.0005, 0.005)
WORDS = "zero one two three four five six seven eight nine".split()


def _window_powers(x: np.ndarray, sr: int) -> np.ndarray:
    """Mean power of every 20 ms window (one per sample), sorted."""
    w = max(1, int(0.02 * sr))
    return np.sort(np.convolve(x.astype(np.float64) ** 2, np.ones(w) / w, "valid"))


def speech_level(x: np.ndarray, sr: int) -> float:
    """RMS of the loudest quarter of 20 ms windows: the level of the voiced part."""
    e = _window_powers(x, sr)
    return float(np.sqrt(e[-max(1, len(e) // 4):].mean())) if len(e) else 0.0


def corpus_noise(x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One recording as a message word: gain, silence before and after, the corpus's noise."""
    y = x * rng.uniform(*GAIN)
    lead, tail = (np.zeros(int(sr * rng.uniform(*LEAD_TAIL_S)), np.float32) for _ in range(2))
    y = np.concatenate([lead, y.astype(np.float32), tail])
    return y + rng.normal(0, rng.uniform(*NOISE_STD), size=y.shape).astype(np.float32)


def fsdd_embeddings(files, enc, seed: int) -> dict:
    """Pooled embeddings of every recording, clean and through the corpus noise, plus levels."""
    from pllcli.audio import load_audio, resample
    rng = np.random.default_rng(seed)
    clean, noisy, level, native = [], [], [], None
    for f in files:
        a = load_audio(str(f))
        native = native or a.sample_rate
        x = a.samples
        level.append(speech_level(x, a.sample_rate))
        clean.append(enc.embed(resample(x, a.sample_rate, enc.sample_rate)))
        noisy.append(enc.embed(resample(corpus_noise(x, a.sample_rate, rng), a.sample_rate, enc.sample_rate)))
    return {"clean": pooled(clean), "noisy": pooled(noisy), "level": np.array(level), "source_rate": native}


def fold_rows(fold: list[str], emb: dict, digit, speaker) -> list[dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    train = ~np.isin(speaker, fold)
    # mean gain and mean noise std of the corpus: the typical SNR of a voice's messages
    noise = float(np.mean(NOISE_STD))
    rows = []
    preds = {}
    for cond in ("clean", "noisy"):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        clf.fit(emb[cond][train], digit[train])
        preds[cond] = clf.predict(emb[cond])
    for spk in fold:
        rows_s = speaker == spk
        level = float(np.median(emb["level"][rows_s]))
        r = {"fold": ",".join(fold), "voice": spk, "speech_rms": round(level, 4),
             "corpus_snr_db": round(20 * np.log10(level * np.mean(GAIN) / noise), 1)}
        for cond in ("clean", "noisy"):
            acc = float((preds[cond][rows_s] == digit[rows_s]).mean())
            r[f"word_{cond}"] = round(acc, 3)
            r[f"pair_{cond}"] = round(acc ** 2, 3)
        rows.append(r)
    return rows


def voices_curve(emb: dict, digit, speaker) -> list[dict]:
    """Mean clean word accuracy on each held-out voice, trained on every k-subset of the others."""
    from itertools import combinations
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    voices = sorted(set(speaker))
    rows = []
    for k in range(1, len(voices)):
        accs = []
        for held in voices:
            others = [v for v in voices if v != held]
            for subset in combinations(others, k):
                fit = np.isin(speaker, subset)
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
                clf.fit(emb["clean"][fit], digit[fit])
                test = speaker == held
                accs.append(float((clf.predict(emb["clean"][test]) == digit[test]).mean()))
        rows.append({"training_voices": k, "runs": len(accs), "word_clean": round(float(np.mean(accs)), 3),
                     "worst": round(float(np.min(accs)), 3), "pair_clean": round(float(np.mean(np.square(accs))), 3)})
        print(f"{k} training voice(s): word accuracy on a new voice {rows[-1]['word_clean']} "
              f"(worst {rows[-1]['worst']}, {len(accs)} runs), two-word {rows[-1]['pair_clean']}", flush=True)
    return rows


# ---------------------------------------------------------------------- the messages

def voiced_parts(x: np.ndarray, sr: int, rel_db: float = 35.0, floor_db: float = 10.0,
                 min_pause: float = 0.04, min_part: float = 0.08) -> list[tuple[int, int]]:
    """Sample ranges of a message split at the middle of each pause: 20 ms windows louder than
    max(loudest - rel_db, quietest tenth + floor_db) are voiced; pauses shorter than min_pause and
    parts shorter than min_part do not count."""
    w, h = int(0.02 * sr), int(0.01 * sr)
    n = max(1, 1 + (len(x) - w) // h)
    fr = np.lib.stride_tricks.sliding_window_view(np.pad(x, (0, max(0, w - len(x)))), w)[::h][:n]
    db = 10 * np.log10((fr.astype(np.float64) ** 2).mean(1) + 1e-12)
    on = np.flatnonzero(db > max(db.max() - rel_db, np.percentile(db, 10) + floor_db))
    if not len(on):
        return [(0, len(x))]
    runs, start, end = [], on[0], on[0]
    for i in on[1:]:
        if (i - end - 1) * h < min_pause * sr:
            end = i
        else:
            runs.append((start, end))
            start = end = i
    runs.append((start, end))
    runs = [r for r in runs if (r[1] - r[0] + 1) * h >= min_part * sr] or runs
    cuts = [0] + [((a[1] * h + w) + b[0] * h) // 2 for a, b in zip(runs, runs[1:])] + [len(x)]
    return list(zip(cuts[:-1], cuts[1:]))


def message_rows(corpus: Path, enc, n_train: int, seed: int) -> dict:
    """Per-word probes on two-part messages: each word embedded alone vs the whole message's
    frames over that word."""
    from pllcli.audio import load_audio
    truth = {r["id"]: r["label"] for r in csv.DictReader(open(corpus / "truth.csv"))}
    voice = list(csv.DictReader(open(corpus / "voice.csv")))
    test = list(csv.DictReader(open(corpus / "test.csv")))
    rng = np.random.default_rng(seed)
    train = [voice[i] for i in rng.choice(len(voice), min(n_train, len(voice)), replace=False)]
    out = {}
    for split, rows in (("train", train), ("test", test)):
        alone, inside, y, parts = [], [], [], []
        for r in rows:
            x = load_audio(str(corpus / r["path"]), enc.sample_rate).samples
            cuts = voiced_parts(x, enc.sample_rate)
            parts.append(len(cuts))
            words = truth[r["id"]].split()
            if len(cuts) != 2 or len(words) != 2:
                continue
            whole, pad = enc.embed(x, with_padding=True)
            left = enc.padding_split(len(x))[0]
            for (a, b), word in zip(cuts, words):
                alone.append(enc.embed(x[a:b]))
                # frames whose window centre lies inside this word's part (nearest one if none)
                centre = (np.arange(len(whole)) * enc.hop + enc.min_samples / 2 - left)
                k = np.flatnonzero((centre >= a) & (centre < b))
                inside.append(whole[k] if len(k) else whole[[int(np.argmin(np.abs(centre - (a + b) / 2)))]])
                y.append(WORDS.index(word) if word in WORDS else int(word))
        out[split] = {"alone": pooled(alone), "inside": pooled(inside), "y": np.array(y),
                      "parts": np.bincount(parts).tolist()}
    n = len(out["train"]["y"])
    x = {k: np.concatenate([out["train"][k], out["test"][k]]) for k in ("alone", "inside")}
    y = np.concatenate([out["train"]["y"], out["test"]["y"]])
    fit, score = np.arange(n), np.arange(n, len(y))
    return {"train_messages": len(train), "parts_train": out["train"]["parts"], "parts_test": out["test"]["parts"],
            "test_words": int(len(score)),
            "word_alone": round(logreg_accuracy(x["alone"], y, fit, score), 3),
            "word_inside_message": round(logreg_accuracy(x["inside"], y, fit, score), 3)}


def _split_embed(job: tuple) -> list[tuple]:
    """Worker (a fresh process: onnxruntime is not fork-safe): [(id, frames, duration, parts)]."""
    rows, corpus, spec = job
    import torch
    torch.set_num_threads(1)
    from pllcli.audio import load_audio
    from pllcli.encoders import build_encoder
    enc = build_encoder(spec)
    out = []
    for r in rows:
        x = load_audio(str(Path(corpus) / r["path"]), enc.sample_rate).samples
        cuts = voiced_parts(x, enc.sample_rate)
        out.append((r["id"], np.concatenate([enc.embed(x[a:b]) for a, b in cuts]), len(x) / enc.sample_rate, len(cuts)))
    return out


def write_split_stores(corpus: Path, out: Path, spec: str, jobs: int = 2) -> dict:
    """OUT/train.h5 (voice.csv) and OUT/test.h5 (test.csv), each message's parts embedded alone.
    The identity gains `split` so that these stores never pass for whole-message ones."""
    import dataclasses
    import multiprocessing as mp
    from pllcli.features import write_feature_store
    from pllcli.features.config import encoder_config
    cfg = encoder_config(spec)
    ident = json.loads(cfg.encoder) | {"split": "pauses (examples/chat_unseen_ceiling.py voiced_parts)"}
    cfg = dataclasses.replace(cfg, encoder=json.dumps(ident, sort_keys=True))
    out.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, manifest in (("train", "voice.csv"), ("test", "test.csv")):
        rows = list(csv.DictReader(open(corpus / manifest)))
        tasks = [(rows[i::jobs], str(corpus), spec) for i in range(jobs)]
        if jobs == 1:
            done = _split_embed(tasks[0])
        else:
            with mp.get_context("spawn").Pool(jobs) as pool:
                done = [x for part in pool.map(_split_embed, tasks) for x in part]
        order = {r["id"]: k for k, r in enumerate(rows)}
        done.sort(key=lambda t: order[t[0]])
        write_feature_store(out / f"{split}.h5", cfg, ({"id": i, "features": f, "duration": d} for i, f, d, _ in done))
        info[f"parts_{split}"] = np.bincount([t[3] for t in done]).tolist()
        print(f"{out / f'{split}.h5'}: {len(done)} messages, parts per message {info[f'parts_{split}']}", flush=True)
    return info


def noise_level(x: np.ndarray, sr: int) -> float:
    """RMS of the quietest tenth of 20 ms windows: the message's noise floor."""
    e = _window_powers(x, sr)
    return float(np.sqrt(e[:max(1, len(e) // 10)].mean())) if len(e) else 0.0


SNR_BANDS = (-np.inf, 10.0, 15.0, 20.0, 25.0, np.inf)


def snr_band_rows(corpus: Path, checkpoint: Path, store: Path) -> list[dict]:
    """Test accuracy of `checkpoint` on `store` grouped by each message's SNR band."""
    from pllcli.audio import load_audio
    from pllcli.checkpoint import load_model
    from pllcli.features import FeatureStore
    from pllcli.predict import infer
    from pllcli.training.data import InMemoryFeatures
    model, meta = load_model(checkpoint)
    fs = FeatureStore(store)
    f, o = fs.load_all()
    pred = infer(model, InMemoryFeatures(f, o), None, "cpu", 128)["logits"].argmax(1)
    classes = [str(c) for c in meta["classes"]]
    test = {r["id"]: r for r in csv.DictReader(open(corpus / "test.csv"))}
    snr, ok = [], []
    for i, item in enumerate(fs.ids.tolist()):
        r = test[str(item)]
        a = load_audio(str(corpus / r["path"]))
        snr.append(20 * np.log10(max(speech_level(a.samples, a.sample_rate), 1e-9)
                                 / max(noise_level(a.samples, a.sample_rate), 1e-9)))
        ok.append(classes[pred[i]] == r["label"])
    snr, ok = np.array(snr), np.array(ok)
    rows = []
    for lo, hi in zip(SNR_BANDS[:-1], SNR_BANDS[1:]):
        m = (snr >= lo) & (snr < hi)
        if m.any():
            band = (f"< {hi:g} dB" if lo == -np.inf else f">= {lo:g} dB" if hi == np.inf else f"{lo:g}-{hi:g} dB")
            rows.append({"snr": band, "messages": int(m.sum()), "accuracy": round(float(ok[m].mean()), 3)})
    rows.append({"snr": "all", "messages": int(len(ok)), "accuracy": round(float(ok.mean()), 3)})
    print("| message SNR | messages | test accuracy |\n|---|---|---|")
    for r in rows:
        print(f"| {r['snr']} | {r['messages']} | {r['accuracy']} |")
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["fold", "voice", "speech_rms", "corpus_snr_db", "word_clean", "word_noisy", "pair_clean", "pair_noisy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?", help="FSDD recordings folder (not with --split-stores)")
    ap.add_argument("--encoder", help="encoder spec, as featurize --encoder takes it (not with --snr-bands)")
    ap.add_argument("--fold", action="append", default=None,
                    help="two held-out voices, comma-separated (repeatable; default jackson,theo)")
    ap.add_argument("--corpus", type=Path, help="a chat corpus folder: also the message check")
    ap.add_argument("--split-stores", nargs=2, type=Path, metavar=("CORPUS", "OUT"),
                    help="only write the cut-at-pauses train/test stores of CORPUS into OUT (for bench_chat.py)")
    ap.add_argument("--train-messages", type=int, default=1500, help="training messages of the message check")
    ap.add_argument("--voices-curve", action="store_true", help="also the clean probe on 1..5 training voices")
    ap.add_argument("--cache", type=Path, help="an .npz keeping the FSDD embeddings between runs")
    ap.add_argument("--snr-bands", nargs=3, type=Path, metavar=("CORPUS", "CHECKPOINT", "STORE"),
                    help="only the accuracy of CHECKPOINT on STORE (CORPUS's test.csv) by message SNR")
    ap.add_argument("--jobs", type=int, default=2, help="processes of --split-stores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.split_stores:
        if a.encoder is None:
            ap.error("--split-stores needs --encoder")
        write_split_stores(*a.split_stores, a.encoder, a.jobs)
        return
    if a.snr_bands:
        rows = snr_band_rows(*a.snr_bands)
        if a.json:
            a.json.write_text(json.dumps({"command": " ".join(sys.argv), "snr_bands": rows}, indent=2))
        return
    if a.data is None or a.encoder is None:
        ap.error("give the FSDD recordings folder and --encoder")
    from pllcli.encoders import build_encoder
    enc = build_encoder(a.encoder)
    files, digit, _take = list_fsdd(a.data)
    speaker = np.array([f.stem.split("_")[1] for f in files])
    folds = [f.split(",") for f in (a.fold or ["jackson,theo"])]
    for fold in folds:
        missing = [s for s in fold if s not in set(speaker)]
        if missing:
            sys.exit(f"--fold: no recordings of {', '.join(missing)} in {a.data}")
    t0 = time.perf_counter()
    if a.cache and a.cache.exists():
        z = np.load(a.cache)
        emb = {k: z[k] for k in ("clean", "noisy", "level")} | {"source_rate": int(z["source_rate"])}
    else:
        emb = fsdd_embeddings(files, enc, a.seed)
        if a.cache:
            np.savez(a.cache, **emb)
    rows = [r for fold in folds for r in fold_rows(fold, emb, digit, speaker)]
    print_table(rows)
    summary = []
    for fold in folds:
        fr = [r for r in rows if r["fold"] == ",".join(fold)]
        s = {"fold": ",".join(fold), "pair_clean": round(float(np.mean([r["pair_clean"] for r in fr])), 3),
             "pair_noisy": round(float(np.mean([r["pair_noisy"] for r in fr])), 3)}
        summary.append(s)
        print(f"fold {s['fold']}: two-word ceiling clean {s['pair_clean']}, with the corpus noise {s['pair_noisy']}")
    result = {"command": " ".join(sys.argv), "encoder": enc.identity(), "source_rate": emb["source_rate"],
              "voices": rows, "folds": summary}
    if a.voices_curve:
        result["voices_curve"] = voices_curve(emb, digit, speaker)
    if a.corpus:
        m = message_rows(a.corpus, enc, a.train_messages, a.seed)
        result["messages"] = m
        print(f"messages ({a.corpus.name}): per-word probe, each word embedded alone {m['word_alone']}, "
              f"its frames inside the whole message {m['word_inside_message']} "
              f"({m['test_words']} test words; parts per test message {m['parts_test']})")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
