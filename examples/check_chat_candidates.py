#!/usr/bin/env python3
"""Check `build-candidates` on a chat-fsdd corpus (make_chat_corpus.py output).

  python examples/check_chat_candidates.py /work/data/chat --out /work/runs/labels --json FILE

Builds candidates with --next K from voice.csv, chat.csv and clean.csv (the builder never sees
truth.csv); this script reads truth.csv only to score:
  * coverage of the true text with plain lower-casing over the raw next K messages (the baseline),
  * the same with pllcli's normalisation (NFKC, casefold, punctuation, digits -> words),
  * coverage of the built sets (open vocabulary, and closed vocabulary from test.csv's labels),
  * the delay prior estimated from clean.csv vs the position histogram of the truth.
It also runs the real CLI once and checks that the store it writes matches the library's sets.
"""
import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pllcli.labels.build import ChatOptions, build_from_chat, read_vocab
from pllcli.labels.store import read_label_store
from pllcli.labels.text import normalize_text


def raw_coverage(voice, chat, truth, k, norm):
    times = np.array([float(r["time"]) for r in chat])
    texts = [norm(r["text"]) for r in chat]
    hit = 0
    for r in voice:
        lo = int(np.searchsorted(times, float(r["time"]), side="left"))
        hit += norm(truth[r["id"]]) in texts[lo:lo + k]
    return hit / len(voice)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--next", type=int, default=10, dest="k")
    ap.add_argument("--out", default="/work/runs/labels")
    ap.add_argument("--json")
    a = ap.parse_args()
    d = Path(a.data)
    read = lambda n: list(csv.DictReader(open(d / n, encoding="utf-8")))  # noqa: E731
    voice, chat = read("voice.csv"), read("chat.csv")
    truth = {r["id"]: r["label"] for r in read("truth.csv")}
    clean_ids = {r["id"] for r in read("clean.csv")}
    res = {"voice_messages": len(voice), "k": a.k}
    res["coverage_plain_lowercase"] = raw_coverage(voice, chat, truth, a.k, lambda s: s.lower())
    res["coverage_lowercase_strip"] = raw_coverage(voice, chat, truth, a.k, lambda s: s.lower().strip())
    res["coverage_normalised_raw_next_k"] = raw_coverage(voice, chat, truth, a.k, normalize_text)

    runs = {"open_vocab": None, "closed_vocab_test_labels": read_vocab(str(d / "test.csv"))}
    for name, vocab in runs.items():
        t0 = time.perf_counter()
        b = build_from_chat(str(d / "voice.csv"), str(d / "chat.csv"), ChatOptions(next_k=a.k, vocab=vocab),
                            clean_path=str(d / "clean.csv"), unlabeled_path=str(d / "unlabeled.csv"))
        dt = time.perf_counter() - t0
        ci = b.data.class_index()
        hist = np.zeros(a.k, np.int64)
        hit = hit_nc = n_nc = 0
        for r, row in enumerate(voice):
            y = ci.get(normalize_text(truth[row["id"]]), -1)
            s, p = b.sets[r], b.positions[r]
            if y in s:
                hit += 1
                hist[p[s.index(y)]] += 1
            if row["id"] not in clean_ids:
                n_nc += 1
                hit_nc += y in s
        st = b.stats
        res[name] = {
            "classes": st["classes"], "mean_set_size": st["mean_set_size"], "q_eff": st["q_eff"],
            "off_vocabulary_messages": st["off_vocabulary_messages"], "seconds": round(dt, 2),
            "coverage_truth_all_voice": hit / len(voice), "coverage_truth_nonclean": hit_nc / n_nc,
            "coverage_estimate_from_clean": st["coverage_estimate"],
            "position_hist_clean": st["position_histogram"],
            "delay_prior_clean": st["delay_prior"],
            "position_dist_truth": (hist / hist.sum()).tolist(),
            "position_hist_truth": hist.tolist(),
        }
        pc = np.asarray(st["position_histogram"], float)
        res[name]["tv_distance_clean_vs_truth"] = float(0.5 * np.abs(pc / pc.sum() - hist / hist.sum()).sum())
        res[name]["tv_distance_prior_vs_truth"] = float(
            0.5 * np.abs(np.asarray(st["delay_prior"]) - hist / hist.sum()).sum())

    # the real command (closed vocabulary, delay-prior weights); truth.csv is not an input
    out = Path(a.out) / "chat_next10_prior.h5"
    cmd = [sys.executable, "-m", "pllcli", "-q", "build-candidates", "-o", str(out), "--overwrite",
           "--voice", str(d / "voice.csv"), "--chat", str(d / "chat.csv"), "--clean", str(d / "clean.csv"),
           "--unlabeled", str(d / "unlabeled.csv"), "--vocab", str(d / "test.csv"), "--next", str(a.k),
           "--weights", "delay-prior", "--json", "-"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    store = read_label_store(out)
    ci = store.class_index()
    hits = [ci.get(normalize_text(truth[r["id"]]), -1) in store.candidates(i).tolist()
            for i, r in enumerate(voice) if r["id"] not in clean_ids]
    res["cli"] = {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 2),
                  "classes": store.num_classes, "items": len(store), "unlabeled": int(store.unlabeled.sum()),
                  "coverage_truth_nonclean": float(np.mean(hits)),
                  "truth_weight_mean": float(np.mean([
                      store.candidate_weights(i)[store.candidates(i).tolist().index(ci[normalize_text(truth[r["id"]])])]
                      for i, r in enumerate(voice) if r["id"] not in clean_ids
                      and ci.get(normalize_text(truth[r["id"]]), -1) in store.candidates(i).tolist()]))}

    print(f"{'figure':44s} value")
    print(f"{'coverage, plain lower-casing (raw next K)':44s} {res['coverage_plain_lowercase']:.4f}")
    print(f"{'coverage, lower-casing + strip (raw next K)':44s} {res['coverage_lowercase_strip']:.4f}")
    print(f"{'coverage, normalised (raw next K)':44s} {res['coverage_normalised_raw_next_k']:.4f}")
    for name in runs:
        r = res[name]
        print(f"--- {name}: {r['classes']} classes, mean set {r['mean_set_size']:.2f}, q_eff {r['q_eff']:.4f}")
        print(f"{'  coverage of built sets (truth, non-clean)':44s} {r['coverage_truth_nonclean']:.4f}")
        print(f"{'  coverage estimate from clean.csv':44s} {r['coverage_estimate_from_clean']:.4f}")
        print(f"  {'pos':>4s} {'clean n':>8s} {'prior':>7s} {'truth n':>8s} {'truth p':>8s}")
        for j in range(a.k):
            print(f"  {j:4d} {r['position_hist_clean'][j]:8d} {r['delay_prior_clean'][j]:7.3f} "
                  f"{r['position_hist_truth'][j]:8d} {r['position_dist_truth'][j]:8.3f}")
        print(f"  TV(clean hist, truth) {r['tv_distance_clean_vs_truth']:.3f}   "
              f"TV(smoothed prior, truth) {r['tv_distance_prior_vs_truth']:.3f}")
    c = res["cli"]
    print(f"--- CLI: {c['classes']} classes, {c['items']} items, coverage {c['coverage_truth_nonclean']:.4f}, "
          f"mean weight on truth {c['truth_weight_mean']:.3f}, {c['seconds']} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
