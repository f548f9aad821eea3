#!/usr/bin/env python3
"""How far can a voice-activity-based detector get on the weak corpus? (issue 17 ceiling)

    python examples/sed_ceiling.py /work/data/weak --source /work/shared/data/fsdd/recordings \
        --json /work/runs/sed/ceiling.json

strong.tsv marks each event as the whole FSDD recording placed in the clip, leading and
trailing silence included. Per test event this measures the share of its extent that is
voiced:
- `clip`: frames (32 ms) of the clip whose energy lies `--margin-db` above the clip's noise
  floor (median energy of the frames outside every true event; 10th percentile when fewer
  than 10 such frames), what a perfect voice-activity detector could see;
- `source` (with --source): the generator is replayed (make_weak_corpus.py defaults, same seed)
  to recover each event's recording and noise level; frames where the clean recording's energy
  reaches the noise energy (local SNR >= 0 dB), and frames within 30 dB of the recording's
  loudest frame (voiced regardless of the noise).
and scores, with the bench's code (bench_weak.sed_metrics: collar F1 200 ms / 20 %, segment
F1 1 s, PSDS1 / PSDS2 by sed_scores_eval on frame scores at the WHEN frame rate):
- `oracle_energy_*`: per true event, the span from its first to its last voiced frame (the
  `clip` or `source` measure), with the true class;
- `oracle_extent`: the true events rasterised at the WHEN frame rate (--hop), onset and
  offset each moved by one frame (random sign), median filtered and decoded as bench_weak
  does (DECODE); `oracle_extent_exact`: not moved;
- `oracle_energy_clip_padded`: the `clip` spans widened by the median leading / trailing
  silence of the training events; `oracle_energy_clip_extend_<s>`: widened by s seconds at both
  ends (a detection may be up to 1 / 0.7 = 1.43 times the truth and still pass PSDS1's DTC);
- `oracle_extent_shrunk` / `_grown`: the truth with both boundaries moved one frame inwards /
  outwards.
Frame scores are 0/1, so PSDS is one operating point. Also reported: the gap to the previous
event (a class-agnostic segmenter merges events closer than its min-gap).
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import wave
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

FRAME = 256  # samples per energy frame (32 ms at 8 kHz)


def read_wav(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        return x, w.getframerate()


def frame_energy(x: np.ndarray) -> np.ndarray:
    """Mean square per FRAME samples (n // FRAME,)."""
    n = len(x) // FRAME
    return (x[:n * FRAME].reshape(n, FRAME).astype(np.float64) ** 2).mean(1)


def replay(source: Path, data: Path) -> dict:
    """{clip id: [(onset_s, offset_s, label, recording path, noise rms)]}, the placements of
    make_weak_corpus.py with the parameters of DATA/README.md (the generator's random calls in
    order; noise samples are not drawn, the noise rms is 0.1 * 10^(-snr/20))."""
    import json
    params = json.loads((data / "README.md").read_text().split("```json")[1].split("```")[0])
    rng = random.Random(params["seed"])
    pat = re.compile(r"^(?P<word>[^_]+)_(?P<speaker>[^_]+)_(?P<take>\d+)\.wav$")
    pools = {"train": defaultdict(list), "test": defaultdict(list)}
    for p in sorted(source.glob("*.wav")):
        m = pat.match(p.name)
        if m:
            pools["test" if int(m["take"]) < params["test_takes"] else "train"][m["word"]].append(p)
    vocab = sorted(pools["train"])
    sr = read_wav(pools["train"][vocab[0]][0])[1]
    n = int(params["duration"] * sr)
    lengths: dict = {}
    out = {}
    for split, count in (("train", params["train_clips"]), ("test", params["test_clips"])):
        for i in range(count):
            cid = f"{split}_{i:06d}"
            rng.uniform(0.0, 1.5)  # noise colour
            noise_rms = 0.1 * 10 ** (-rng.uniform(*params["snr_db"]) / 20)
            k = 0 if rng.random() < params["empty_share"] else rng.randint(1, params["max_events"])
            placed = []
            for _ in range(k):
                word = rng.choice(vocab)
                path = rng.choice(pools[split][word])
                if path not in lengths:
                    lengths[path] = len(read_wav(path)[0])
                for _try in range(20):
                    on = rng.randrange(0, max(1, n - lengths[path]))
                    off = on + lengths[path]
                    if all(off <= s or on >= e for s, e, *_ in placed):
                        placed.append((on, off, word, path))
                        break
            placed.sort()
            if split == "train":
                rng.random()  # unlabeled draw
            out[cid] = [(on / sr, min(off, n) / sr, w, p, noise_rms) for on, off, w, p in placed]
    return out


def voiced_span(active: np.ndarray, a: int, b: int) -> tuple[int, int] | None:
    """First and last+1 active frame in [a, b), or None."""
    idx = np.flatnonzero(active[a:b])
    return (a + int(idx[0]), a + int(idx[-1]) + 1) if len(idx) else None


def clip_measure(path: Path, events, margin_db: float, fhop: float):
    """-> per event (voiced share, span (on, off) seconds or None) from the clip's own energy."""
    x, _ = read_wav(path)
    e = frame_energy(x)
    inside = np.zeros(len(e), bool)
    for on, off, *_ in events:
        inside[int(on / fhop):int(np.ceil(off / fhop))] = True
    floor = np.median(e[~inside]) if (~inside).sum() >= 10 else np.percentile(e, 10)
    active = e > floor * 10 ** (margin_db / 10)
    out = []
    for on, off, *_ in events:
        a, b = int(round(on / fhop)), max(int(round(on / fhop)) + 1, int(round(off / fhop)))
        span = voiced_span(active, a, b)
        share = active[a:b].mean() if b > a else 0.0
        out.append((float(share), None if span is None else (span[0] * fhop, min(off, span[1] * fhop))))
    return out


def source_measure(event, fhop: float):
    """-> (share with local SNR >= 0 dB, share within 30 dB of the loudest frame, span of the
    first (seconds, clip time), span of the second) of one replayed event."""
    on, off, _, path, noise_rms = event
    x, _ = read_wav(path)
    x = x / (np.abs(x).max() + 1e-9) * 0.5
    e = frame_energy(np.concatenate([x, np.zeros(FRAME)]))
    snr_ok = e >= noise_rms ** 2
    loud = e >= e.max() * 1e-3
    res = []
    for act in (snr_ok, loud):
        span = voiced_span(act, 0, len(act))
        res.append(None if span is None else (on + span[0] * fhop, min(off, on + span[1] * fhop)))
    return float(snr_ok.mean()), float(loud.mean()), res[0], res[1]


def spans_to_frames(events, classes, n: int, hop: float) -> np.ndarray:
    from pllcli.events import events_to_frames
    return events_to_frames(events, classes, n, hop).astype(np.float64)


def score(D, est_events: dict, hop: float, decode: dict | None = None, shift: int = 0, seed: int = 0,
          signs: bool = True):
    """Rasterise {id: [(on, off, label)]} at `hop` (boundaries moved by `shift` frames, at random
    sign per boundary, or outwards (shift > 0) / inwards (< 0) with signs=False), decode (median
    etc. of `decode`) and score with bench_weak.sed_metrics."""
    from bench_weak import sed_metrics
    from pllcli.events import decode_events
    rng = np.random.default_rng(seed)
    frames, est = {}, {}
    for cid in D["te_ids"]:
        n = int(np.ceil(D["durations"][cid] / hop - 1e-9))
        evs = []
        for on, off, lab in est_events.get(cid, []):
            if shift:
                s_on, s_off = (rng.choice([-1, 1]), rng.choice([-1, 1])) if signs else (-1, 1)
                on = max(0.0, on + hop * shift * s_on)
                off = min(D["durations"][cid], off + hop * shift * s_off)
            if off > on:
                evs.append((on, off, lab))
        f = spans_to_frames(evs, D["classes"], n, hop)
        frames[cid] = f
        if decode is None:
            est[cid] = evs
        else:
            est[cid] = [tuple(e) for e in decode_events(f, D["classes"], hop, 0.5, duration=D["durations"][cid],
                                                         **decode)]
    res = sed_metrics(D, est, frames, hop)
    res.update(intersection_stats(D, frames, hop))
    return res


def intersection_stats(D, frames: dict, hop: float) -> dict:
    """Recall, precision and false positives per hour of the 0/1 `frames` under PSDS1's
    intersection criteria (DTC = GTC = 0.7): the one operating point of a 0/1 detector; PSDS1
    counts only up to 100 false positives per hour."""
    from pllcli.metrics import sed
    ref, _ = sed.merge_overlaps({cid: [tuple(e) for e in D["strong"].get(cid, [])] for cid in D["te_ids"]})
    cols = sed.scored_classes(D["classes"], ref)
    names = [D["classes"][k] for k in cols]
    dfs = sed.score_dataframes({c: f[:, cols] for c, f in frames.items()}, hop, names, D["durations"])
    f, p, r, st = sed.intersection_fscore(dfs, ref, 0.5)
    fp = sum(v["fps"] for k, v in st.items() if k in names)
    hours = sum(D["durations"][c] for c in D["te_ids"]) / 3600
    return {"psds1_recall": float(r["micro_average"]), "psds1_precision": float(p["micro_average"]),
            "psds1_fp_per_hour": float(fp / hours)}


def summary(v) -> dict:
    v = np.asarray(v, float)
    return {"n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)),
            "p10": float(np.percentile(v, 10)), "share_below_0.7": float((v < 0.7).mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--source", type=Path, default=None, help="the FSDD recordings (replays the generator)")
    ap.add_argument("--hop", type=float, default=0.064, help="WHEN output frame (s) for the oracle-extent rows")
    ap.add_argument("--margin-db", type=float, default=3.0, help="voiced: frame energy this far above the noise floor")
    ap.add_argument("--extend", type=float, nargs="*", default=[0.064, 0.128, 0.192],
                    help="seconds added at both ends of the oracle_energy_clip spans (one row each)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from bench_weak import DECODE
    from pllcli.events import read_events_tsv
    from pllcli.io import Table, write_json

    split = {row["id"]: row["split"] for _, row in Table(a.data / "clips.csv", required=["id", "split"])}
    paths = {row["id"]: a.data / row["path"] for _, row in Table(a.data / "clips.csv")}
    classes = sorted({x for _, r in Table(a.data / "truth_tags.csv") for x in r["labels"].split(";") if x})
    strong = read_events_tsv(a.data / "strong.tsv", classes=classes)
    te_ids = sorted(c for c, s in split.items() if s == "test")
    tr_ids = sorted(c for c, s in split.items() if s != "test")
    sr = read_wav(paths[te_ids[0]])[1]
    fhop = FRAME / sr
    durations = {c: len(read_wav(paths[c])[0]) / sr for c in te_ids}
    D = {"te_ids": te_ids, "classes": classes, "strong": strong, "durations": durations}
    report: dict = {"data": str(a.data), "energy_frame_s": fhop, "when_hop_s": a.hop, "margin_db": a.margin_db,
                    "test_events": int(sum(len(strong.get(c, [])) for c in te_ids))}

    # ---- voiced share per true event (clip energy)
    shares, spans, lead, trail = [], defaultdict(list), [], []
    for cid in te_ids + tr_ids:
        evs = strong.get(cid, [])
        if not evs:
            continue
        for (on, off, lab), (share, span) in zip(evs, clip_measure(paths[cid], evs, a.margin_db, fhop)):
            if cid in durations:
                shares.append(share)
                if span is not None:
                    spans[cid].append((span[0], span[1], lab))
            elif span is not None:
                lead.append(span[0] - on)
                trail.append(off - span[1])
    ext = [(span_off - span_on) / (off - on) for cid in te_ids for (on, off, _), (span_on, span_off, _)
           in zip(strong.get(cid, []), spans.get(cid, [])) if len(spans.get(cid, [])) == len(strong.get(cid, []))]
    report["voiced_share_clip"] = summary(shares)
    report["voiced_span_share_clip"] = summary(ext)
    pad = (float(np.median(lead)), float(np.median(trail)))
    report["train_silence_median_s"] = {"leading": pad[0], "trailing": pad[1]}
    gaps = [evs[k][0] - evs[k - 1][1] for cid in te_ids for evs in [sorted(strong.get(cid, []))]
            for k in range(1, len(evs))]
    report["gap_to_previous_event_s"] = {"n": len(gaps), "share_below_0.1": float(np.mean(np.array(gaps) < 0.1)),
                                         "share_below_0.2": float(np.mean(np.array(gaps) < 0.2)),
                                         "median": float(np.median(gaps))}
    rows = {}
    rows["oracle_energy_clip"] = score(D, spans, a.hop)
    padded = {cid: [(max(0.0, on - pad[0]), min(durations[cid], off + pad[1]), lab) for on, off, lab in evs]
              for cid, evs in spans.items()}
    rows["oracle_energy_clip_padded"] = score(D, padded, a.hop)
    for ext in a.extend:
        wide = {cid: [(max(0.0, on - ext), min(durations[cid], off + ext), lab) for on, off, lab in evs]
                for cid, evs in spans.items()}
        rows[f"oracle_energy_clip_extend_{ext:g}"] = score(D, wide, a.hop)

    # ---- replayed sources
    if a.source is not None:
        rep = replay(a.source, a.data)
        mism = sum(1 for cid in te_ids for r, s in zip(rep[cid], strong.get(cid, []))
                   if abs(r[0] - s[0]) > 1e-3 or abs(r[1] - s[1]) > 1e-3 or r[2] != s[2])
        mism += sum(abs(len(rep[cid]) - len(strong.get(cid, []))) for cid in te_ids)
        report["replay_mismatched_events"] = int(mism)
        snr_share, loud_share, snr_spans, loud_spans = [], [], defaultdict(list), defaultdict(list)
        for cid in te_ids:
            for ev in rep[cid]:
                s1, s2, sp1, sp2 = source_measure(ev, fhop)
                snr_share.append(s1)
                loud_share.append(s2)
                if sp1:
                    snr_spans[cid].append((sp1[0], sp1[1], ev[2]))
                if sp2:
                    loud_spans[cid].append((sp2[0], sp2[1], ev[2]))
        report["voiced_share_source_snr0"] = summary(snr_share)
        report["voiced_share_source_30db"] = summary(loud_share)
        rows["oracle_energy_source_snr0"] = score(D, snr_spans, a.hop)
        rows["oracle_energy_source_30db"] = score(D, loud_spans, a.hop)

    truth = {cid: [tuple(e) for e in strong.get(cid, [])] for cid in te_ids}
    rows["oracle_extent_exact"] = score(D, truth, a.hop, DECODE)
    rows["oracle_extent"] = score(D, truth, a.hop, DECODE, shift=1)
    rows["oracle_extent_shrunk"] = score(D, truth, a.hop, DECODE, shift=-1, signs=False)
    rows["oracle_extent_grown"] = score(D, truth, a.hop, DECODE, shift=1, signs=False)
    report["rows"] = rows

    for k in [k for k in report if k.startswith("voiced_")]:
        s = report[k]
        print(f"{k:28s} mean {s['mean']:.3f}  median {s['median']:.3f}  p10 {s['p10']:.3f}  "
              f"< 0.7: {s['share_below_0.7']:.1%}  (n={s['n']})")
    print(f"training events' median silence: leading {pad[0]:.3f} s, trailing {pad[1]:.3f} s; "
          f"gaps < 0.1 s: {report['gap_to_previous_event_s']['share_below_0.1']:.1%}")
    cols = ["event_f1_micro", "segment_f1_micro", "psds1", "psds2", "psds1_recall", "psds1_fp_per_hour"]
    print(f"{'detector':28s} " + " ".join(f"{c:>16s}" for c in cols))
    for name, r in rows.items():
        print(f"{name:28s} " + " ".join(f"{r[c]:16.3f}" if c in r else f"{'-':>16s}" for c in cols))
    if a.json:
        write_json(report, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
