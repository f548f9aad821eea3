"""featurize's compute step: decode a chunk of files, then features of many clips in
length-sorted, padded batches (bitwise the numbers of one clip at a time).

Log-mel and fbank go through the numpy frontends (`np_frontend`, no torch import; they agree
with the torch modules of `frontend`, the definition export uses, to float32 rounding);
`--encoder` frames go through the encoder (torch / onnxruntime)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pllcli.audio import Audio, AudioSkip, load_audio
from pllcli.features.config import FeatureConfig
from pllcli.features.items import Item

BATCH_SAMPLES = 1 << 15     # padded samples per frontend batch (~4 s at 8 kHz: its frames stay in L2 cache)
BATCH_MAX_ITEMS = 128

_FRONTENDS: dict[str, Any] = {}


def _frontend(config: FeatureConfig):
    """The numpy frontend of a log-mel / fbank config, built once per process."""
    key = config.to_json()
    fe = _FRONTENDS.get(key)
    if fe is None:
        from pllcli.features.np_frontend import build_np_frontend
        fe = _FRONTENDS[key] = build_np_frontend(config)
    return fe


def warm_up(config: FeatureConfig) -> None:
    """Build the frontend and run it once (filterbanks, FFT plans) so forked workers inherit it all."""
    compute_features([np.zeros(2 * config.frame_length, dtype=np.float32)], config)


def stacked_features(waves: Sequence[np.ndarray], config: FeatureConfig, batch_samples: int = BATCH_SAMPLES,
                     max_items: int = BATCH_MAX_ITEMS) -> tuple[np.ndarray, np.ndarray]:
    """Features of many clips stacked in input order: ((sum T_i, F) float32, T_i (N,) int64).

    Clips are sorted by length and zero-padded into batches of similar length; with
    snip-edges framing the padding never changes a clip's own frames.
    """
    if config.frontend == "encoder":
        return encoder_features(waves, config)[:2]
    fe = _frontend(config)
    lens = np.fromiter((len(w) for w in waves), dtype=np.int64, count=len(waves))
    fl, hop = config.frame_length, config.hop_length
    frames = np.where(lens <= fl, 1, 1 + (lens - fl) // hop)  # config.num_frames, vectorised
    starts = np.concatenate([[0], np.cumsum(frames)]).tolist()
    nfr = frames.tolist()
    out = np.empty((starts[-1], config.n_mels), dtype=np.float32)
    order = np.argsort(lens, kind="stable").tolist()
    padded = np.maximum(lens, fl).tolist()  # a batch is at least one frame long
    n, i = len(order), 0
    while i < n:
        # grow the batch while the padded size (count x longest) stays within budget
        j = min(n, i + max_items, i + max(1, batch_samples // padded[order[i]]))
        while j > i + 1 and (j - i) * padded[order[j - 1]] > batch_samples:
            j -= 1
        idx = order[i:j]
        batch = np.zeros((len(idx), padded[idx[-1]]), dtype=np.float32)
        for r, k in enumerate(idx):
            batch[r, :len(waves[k])] = waves[k]
        power = fe.power(batch)  # (b, T, n_freq)
        for r, k in enumerate(idx):
            # the mel matmul runs per clip on exactly its own frames: bitwise the same
            # result whatever batch the clip landed in (shards, chunk sizes, jobs)
            fe.project_into(power[r, :nfr[k]], out[starts[k]:starts[k + 1]])
        i = j
    fe.log_(out)  # elementwise: the numbers of a log per clip, in one call
    return out, frames


def encoder_features(waves: Sequence[np.ndarray], config: FeatureConfig) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Encoder frames of many clips stacked in input order: ((sum T_i, D) float32, T_i (N,) int64,
    zero samples appended to each clip to reach the encoder's receptive field)."""
    from pllcli.encoders import cached_encoder
    enc = cached_encoder(config.encoder_spec, config.encoder, what="featurize --encoder")
    outs, pads = enc.embed_many(waves)
    frames = np.array([len(o) for o in outs], dtype=np.int64)
    feats = np.concatenate(outs) if outs else np.zeros((0, config.n_mels), np.float32)
    return feats, frames, pads


def compute_features(waves: Sequence[np.ndarray], config: FeatureConfig,
                     batch_samples: int = BATCH_SAMPLES, max_items: int = BATCH_MAX_ITEMS) -> list[np.ndarray]:
    """Features for many clips: list of (S_i,) float32 -> list of (T_i, F) float32, T_i = num_frames(S_i)."""
    feats, frames = stacked_features(waves, config, batch_samples, max_items)
    return np.split(feats, np.cumsum(frames)[:-1]) if len(frames) else []


def _segment(a: Audio, it: Item) -> tuple[np.ndarray, float]:
    """(samples, duration) of the item's [onset, offset) segment of the decoded file."""
    if it.onset is None and it.offset is None:
        return a.samples, a.duration
    sr = a.sample_rate
    lo = int(round((it.onset or 0.0) * sr))
    hi = len(a.samples) if it.offset is None else int(round(it.offset * sr))
    if lo >= len(a.samples) or hi <= lo:
        raise AudioSkip("no_samples", f"segment {it.onset}-{it.offset} s is outside the file "
                                      f"({a.duration:.3f} s)")
    x = a.samples[lo:hi]
    return x, len(x) / float(sr)


def decode_chunk(chunk: Sequence[Item], config: FeatureConfig, max_seconds: float | None = None) -> dict[str, Any]:
    """Decode the files of a chunk at config.sample_rate: {waves [(S,) float32], ok [local idx],
    durations [s], skipped [(local idx, reason, detail)], warnings [(local idx, kind, detail)],
    stats [[size, mtime_ns] of each item's file as read, [-1, -1] if it could not be opened]}.

    Items that are segments of one file decode it once while they follow each other. A file
    the decoder fails on in any way is a per-file `corrupt` skip, never the end of the run.
    """
    waves, ok, durs, skipped, warns, stats = [], [], [], [], [], []
    last: tuple[str, Audio | AudioSkip, list] | None = None
    for li, it in enumerate(chunk):
        try:
            if last is None or last[0] != it.path:
                st: list = []
                try:
                    last = (it.path, load_audio(it.path, config.sample_rate, max_seconds, st), st)
                except AudioSkip as e:
                    last = (it.path, e, st)
                except Exception as e:  # noqa: BLE001 - a hostile file must not end the run
                    last = (it.path, AudioSkip("corrupt", f"{type(e).__name__}: {e}"[:160]), st)
            stats.append(last[2][0] if last[2] else [-1, -1])
            a = last[1]
            if isinstance(a, AudioSkip):
                raise a
            x, dur = _segment(a, it)
        except AudioSkip as e:
            skipped.append((li, e.reason, e.detail))
            continue
        if (a.silent if x is a.samples else not x.any()):
            warns.append((li, "silent", "all samples are zero"))
        if a.cut_from is not None:
            warns.append((li, "cut", f"cut to the first {a.duration:g} s of {a.cut_from:g} s (--max-duration)"))
        waves.append(x)
        ok.append(li)
        durs.append(dur)
    return {"waves": waves, "ok": ok, "durations": durs, "skipped": skipped, "warnings": warns, "stats": stats}
