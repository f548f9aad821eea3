"""Audio decoding with explicit failure reasons: soundfile decode, mono mix-down, resampling.

`load_audio(path, target_sr)` -> `Audio(samples (S,) float32 mono at target_sr, orig_sr, duration)`
or raises `AudioSkip(reason, detail)` with a stable reason code (see `SKIP_REASONS`).
"""
from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
MAX_CHANNELS = 2

SKIP_REASONS = {
    "missing_file": "file does not exist",
    "empty_file": "file is 0 bytes",
    "not_audio": "not an audio file (e.g. text named .wav)",
    "corrupt": "cannot be decoded",
    "truncated": "shorter than its header declares",
    "no_samples": "decodes to zero samples",
    "non_finite": "contains NaN or inf samples",
    "too_many_channels": f"more than {MAX_CHANNELS} channels",
    "duplicate_id": "id already used on an earlier line",
}

# Leading bytes of the containers libsndfile reads.
_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b".snd", b"caff", b"BW64")


class AudioSkip(Exception):
    """An input that cannot be used; `reason` is a key of SKIP_REASONS, `detail` a one-line note."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Audio:
    samples: np.ndarray      # (S,) float32 mono at `sample_rate`
    sample_rate: int
    orig_sample_rate: int
    orig_channels: int
    duration: float          # seconds (of the decoded source)
    silent: bool


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        s = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in s.rstrip("\x00"))


def parse_wav(data: bytes) -> tuple[np.ndarray | None, int, int] | str | None:
    """Parse a RIFF/WAVE file held in memory.

    Returns (samples (S, C) float32 or None if the encoding is not handled here, sample rate,
    channels) for a well-formed file, a message string if the data chunk is truncated, or
    None when `data` is not RIFF/WAVE. Handles PCM 16/32-bit and IEEE float32 (plain or
    WAVE_FORMAT_EXTENSIBLE) with libsndfile's scaling (x / 2**15, x / 2**31).
    """
    size = len(data)
    if size < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= size:
        cid, clen = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt " and clen >= 16 and pos + 8 + clen <= size:
            tag, ch, sr, _, _, bits = struct.unpack_from("<HHIIHH", data, pos + 8)
            if tag == 0xFFFE and clen >= 40:
                tag = struct.unpack_from("<H", data, pos + 8 + 24)[0]
            fmt = (tag, ch, sr, bits)
        elif cid == b"data":
            if clen in (0, 0xFFFFFFFF):  # streaming writers leave the size open
                return (None, 0, 0)
            have = size - (pos + 8)
            if have < clen:
                return f"data chunk declares {clen} bytes, file holds {have}"
            if fmt is None:
                return (None, 0, 0)
            tag, ch, sr, bits = fmt
            dtype = {(1, 16): "<i2", (1, 32): "<i4", (3, 32): "<f4"}.get((tag, bits))
            if dtype is None or ch < 1:
                return (None, sr, ch)
            n = clen // (ch * bits // 8)
            raw = np.frombuffer(data, dtype=dtype, count=n * ch, offset=pos + 8).reshape(n, ch)
            scale = {"<i2": 1 / 32768.0, "<i4": 1 / 2147483648.0}.get(dtype)
            x = raw.astype(np.float32) if scale is None else raw.astype(np.float32) * np.float32(scale)
            return (x, sr, ch)
        pos += 8 + clen + (clen & 1)
    return "no data chunk before end of file"


_RESAMPLERS: dict[tuple[int, int], object] = {}


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """(S,) float32 at orig_sr -> (S',) float32 at target_sr, one cached kernel per rate pair."""
    if orig_sr == target_sr:
        return x
    import torch
    import torchaudio
    key = (int(orig_sr), int(target_sr))
    rs = _RESAMPLERS.get(key)
    if rs is None:
        rs = _RESAMPLERS[key] = torchaudio.transforms.Resample(orig_sr, target_sr)
    with torch.inference_mode():
        return rs(torch.from_numpy(np.ascontiguousarray(x))[None])[0].numpy()


def load_audio(path: str | os.PathLike, target_sr: int | None = None) -> Audio:
    """Decode `path`, check it, mix to mono, resample to `target_sr` (None keeps the source rate).

    Common WAV encodings are decoded directly from the file bytes (one read); everything
    else goes through soundfile.
    """
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise AudioSkip("missing_file", "no such file") from None
    except IsADirectoryError:
        raise AudioSkip("not_audio", "is a directory") from None
    except OSError as e:
        raise AudioSkip("missing_file", e.strerror or str(e)) from None
    if not blob:
        raise AudioSkip("empty_file", "0 bytes")
    head = blob[:64]
    if not head.startswith(_MAGIC) and _looks_like_text(head):
        raise AudioSkip("not_audio", "text, not audio")
    parsed = parse_wav(blob)
    if isinstance(parsed, str):
        raise AudioSkip("truncated", parsed)
    if parsed is not None and parsed[0] is not None:
        data, sr, _ = parsed
    else:
        import soundfile as sf
        try:
            data, sr = sf.read(io.BytesIO(blob), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            msg = re.sub(r"^Error opening <[^>]*>: ", "", msg)
            if not head.startswith(_MAGIC) and ("not recognised" in msg.lower() or "unknown format" in msg.lower()):
                raise AudioSkip("not_audio", msg[-120:]) from None
            raise AudioSkip("corrupt", msg[-120:]) from None
    frames, channels = data.shape
    if channels > MAX_CHANNELS:
        raise AudioSkip("too_many_channels", f"{channels} channels")
    if frames == 0:
        raise AudioSkip("no_samples", "0 samples")
    x = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioSkip("non_finite", f"{bad} NaN/inf sample(s)")
    silent = not bool(np.any(x))
    duration = frames / float(sr)
    if target_sr is not None and sr != target_sr:
        x = resample(np.ascontiguousarray(x, dtype=np.float32), sr, target_sr)
    return Audio(np.ascontiguousarray(x, dtype=np.float32), int(target_sr or sr), int(sr), int(channels),
                 duration, silent)
