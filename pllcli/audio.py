"""Audio decoding with explicit failure reasons: soundfile decode, mono mix-down, resampling
(torchaudio's sinc resampler re-done in numpy: decoding imports no torch).

`load_audio(path, target_sr)` -> `Audio(samples (S,) float32 mono at target_sr, orig_sr, duration)`
or raises `AudioSkip(reason, detail)` with a stable reason code (see `SKIP_REASONS`).
"""
from __future__ import annotations

import io
import math
import os
import re
import stat
import struct
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
    "not_regular": "not a regular file (a device, FIFO or socket)",
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
    duration: float          # seconds (of the decoded samples)
    silent: bool
    cut_from: float | None = None  # seconds the source holds when it was cut to max_seconds


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        s = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in s.rstrip("\x00"))


# (format tag, bits) -> (numpy dtype, scale to [-1, 1)), as libsndfile scales (x / 2**15, x / 2**31)
_WAV_DTYPES = {(1, 16): ("<i2", 1 / 32768.0), (1, 32): ("<i4", 1 / 2147483648.0), (3, 32): ("<f4", None)}


def _wav_layout(data: bytes) -> tuple | str | None:
    """Where the samples of a RIFF/WAVE file held in memory are.

    Returns (dtype, scale, sample rate, channels, data offset, frames) for an encoding handled
    here (dtype None otherwise), a message string if the data chunk is truncated, or None
    when `data` is not RIFF/WAVE.
    """
    size = len(data)
    if size < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    unpack = struct.unpack_from
    while pos + 8 <= size:
        cid, clen = data[pos:pos + 4], unpack("<I", data, pos + 4)[0]
        if cid == b"fmt " and clen >= 16 and pos + 8 + clen <= size:
            tag, ch, sr, _, _, bits = unpack("<HHIIHH", data, pos + 8)
            if tag == 0xFFFE and clen >= 40:
                tag = unpack("<H", data, pos + 8 + 24)[0]
            fmt = (tag, ch, sr, bits)
        elif cid == b"data":
            if clen in (0, 0xFFFFFFFF) or fmt is None:  # streaming writers leave the size open
                return (None, None, 0, 0, 0, 0)
            have = size - (pos + 8)
            if have < clen:
                return f"data chunk declares {clen} bytes, file holds {have}"
            tag, ch, sr, bits = fmt
            enc = _WAV_DTYPES.get((tag, bits))
            if enc is None or ch < 1:
                return (None, None, sr, ch, 0, 0)
            return (enc[0], enc[1], sr, ch, pos + 8, clen // (ch * bits // 8))
        pos += 8 + clen + (clen & 1)
    return "no data chunk before end of file"


def _wav_samples(data: bytes, dtype: str, scale: float | None, ch: int, offset: int, n: int) -> np.ndarray:
    """The (n, ch) float32 samples of a parsed WAV."""
    raw = np.frombuffer(data, dtype=dtype, count=n * ch, offset=offset).reshape(n, ch)
    if scale is None:
        return raw.astype(np.float32)
    x = raw.astype(np.float32)
    x *= np.float32(scale)  # x 2**-k is exact: the numbers of raw.astype(float32) * scale, no temporary
    return x


def parse_wav(data: bytes) -> tuple[np.ndarray | None, int, int] | str | None:
    """Parse a RIFF/WAVE file held in memory.

    Returns (samples (S, C) float32 or None if the encoding is not handled here, sample rate,
    channels) for a well-formed file, a message string if the data chunk is truncated, or
    None when `data` is not RIFF/WAVE. Handles PCM 16/32-bit and IEEE float32 (plain or
    WAVE_FORMAT_EXTENSIBLE) with libsndfile's scaling (x / 2**15, x / 2**31).
    """
    lay = _wav_layout(data)
    if lay is None or isinstance(lay, str):
        return lay
    dtype, scale, sr, ch, offset, n = lay
    if dtype is None:
        return (None, sr, ch)
    return (_wav_samples(data, dtype, scale, ch, offset, n), sr, ch)


def peek_sample_rate(path: str | os.PathLike) -> int | None:
    """The sample rate a regular audio file's header declares, None if it cannot be read: the
    `fmt ` chunk of a RIFF/RF64/BW64 WAVE file from its first 64 KiB, else soundfile.info."""
    try:  # O_NONBLOCK and a regular-file check: a FIFO among the inputs must not block the run
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            head = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        pos = 12
        while pos + 8 <= len(head):
            cid, clen = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
            if cid == b"fmt " and pos + 16 <= len(head):
                sr = struct.unpack_from("<I", head, pos + 12)[0]
                return sr if sr > 0 else None
            if cid == b"data":
                break
            pos += 8 + clen + (clen & 1)
    try:
        import soundfile as sf
        sr = sf.info(str(path)).samplerate
    except Exception:  # noqa: BLE001 - not audio, corrupt, ...: no rate
        return None
    return int(sr) if sr > 0 else None


def _read_bytes(path: str | os.PathLike, stat_out: list | None = None) -> bytes:
    """The whole file in (usually) one read(2): cheaper than open().read() for small files.
    A device, FIFO or socket is refused (AudioSkip not_regular): it could be read without end.
    `stat_out` gets [size, mtime_ns] of the file read (from the open file: no second stat)."""
    # O_NONBLOCK: opening a FIFO does not wait for a writer (no effect on regular files)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if stat_out is not None:
            stat_out.append([st.st_size, st.st_mtime_ns])
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):
            raise AudioSkip("not_regular", "not a regular file")
        size = st.st_size
        data = os.read(fd, size + 1)
        if len(data) != size:  # grown, shrunk or not a regular file: read on to the end
            chunks = [data]
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    finally:
        os.close(fd)


_RESAMPLERS: dict[tuple[int, int], tuple[np.ndarray, int, int, int]] = {}
_RESAMPLE_ROWS = 4096  # output rows (of `new` samples) per matmul


def sinc_resample_kernel(orig_sr: int, target_sr: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """(kernel (new, 2 * width + orig) float32, width) of torchaudio's "sinc_interp_hann" resampler
    (`torchaudio.functional.functional._get_sinc_resample_kernel`, computed in float64 as
    torchaudio.transforms.Resample does), for the gcd-reduced rates orig = orig_sr / g, new = target_sr / g."""
    g = math.gcd(int(orig_sr), int(target_sr))
    orig, new = int(orig_sr) // g, int(target_sr) // g
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    # torchaudio divides an int64 arange there: the phase offsets are float32 values
    t = (np.arange(0, -new, -1) / new).astype(np.float32).astype(np.float64)[:, None] + idx
    t *= base
    np.clip(t, -lowpass_filter_width, lowpass_filter_width, out=t)
    window = np.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t)
    kernel *= window * (base / orig)
    return kernel.astype(np.float32), width


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """(S,) float32 at orig_sr -> (ceil(S * target_sr / orig_sr),) float32 at target_sr: torchaudio's
    Resample (sinc_interp_hann, lowpass_filter_width 6, rolloff 0.99) in numpy, one cached kernel per rate pair."""
    if orig_sr == target_sr:
        return x
    key = (int(orig_sr), int(target_sr))
    got = _RESAMPLERS.get(key)
    if got is None:
        g = math.gcd(*key)
        kernel, width = sinc_resample_kernel(*key)
        got = _RESAMPLERS[key] = (np.ascontiguousarray(kernel.T), width, key[0] // g, key[1] // g)
    kernel_t, width, orig, new = got  # kernel_t: (2 * width + orig, new)
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    xp = np.zeros(n + 2 * width + orig, dtype=np.float32)
    xp[width:width + n] = x
    # output j * new + p = kernel[p] . xp[j * orig : j * orig + K]: conv1d with stride orig, phases interleaved
    frames = sliding_window_view(xp, len(kernel_t))[::orig]  # (n // orig + 1, K), a view
    y = np.empty((len(frames), new), dtype=np.float32)
    for a in range(0, len(frames), _RESAMPLE_ROWS):  # blocks: matmul copies its strided input
        np.matmul(frames[a:a + _RESAMPLE_ROWS], kernel_t, out=y[a:a + _RESAMPLE_ROWS])
    # torchaudio: ceil of new * n / orig computed in float64, held as a float32 tensor
    target = int(np.ceil(np.float32(new * n / orig)))
    return y.reshape(-1)[:target]


def _check_rate(sr: int) -> None:
    if not sr > 0:
        raise AudioSkip("corrupt", f"sample rate {sr} in the header")


def _cap(frames: int, sr: int, max_seconds: float | None) -> int:
    """Frames to decode: all, or the first `max_seconds` worth."""
    return frames if max_seconds is None else min(frames, max(1, int(max_seconds * sr)))


def _soundfile_decode(blob: bytes, head: bytes, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """(samples (S, C) float32 capped to max_seconds, sample rate, frames in the source) via soundfile."""
    import soundfile as sf
    try:
        with sf.SoundFile(io.BytesIO(blob)) as f:
            sr, total = f.samplerate, f.frames
            _check_rate(sr)
            data = f.read(_cap(total, sr, max_seconds) if total > 0 else -1, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = re.sub(r"^Error opening <[^>]*>: ", "", msg)
        if not head.startswith(_MAGIC) and ("not recognised" in msg.lower() or "unknown format" in msg.lower()):
            raise AudioSkip("not_audio", msg[-120:]) from None
        raise AudioSkip("corrupt", msg[-120:]) from None
    return data, sr, max(total, len(data))


def load_audio(path: str | os.PathLike, target_sr: int | None = None, max_seconds: float | None = None,
               stat_out: list | None = None) -> Audio:
    """Decode `path`, check it, mix to mono, resample to `target_sr` (None keeps the source rate).

    Common WAV encodings are decoded directly from the file bytes (one read); everything
    else goes through soundfile. A source longer than `max_seconds` is cut to its first
    `max_seconds` (`Audio.cut_from` then holds the source's duration). `stat_out`, if given,
    gets the [size, mtime_ns] of the file once it is open (also when it is then skipped).
    """
    try:
        blob = _read_bytes(path, stat_out)
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
    lay = _wav_layout(blob)
    if isinstance(lay, str):
        raise AudioSkip("truncated", lay)
    if lay is not None and lay[0] is not None:
        dtype, scale, sr, channels, offset, total = lay
        _check_rate(sr)
        if channels > MAX_CHANNELS:
            raise AudioSkip("too_many_channels", f"{channels} channels")
        if total == 0:
            raise AudioSkip("no_samples", "0 samples")
        frames = _cap(total, sr, max_seconds)
        data = _wav_samples(blob, dtype, scale, channels, offset, frames)
        check_finite = scale is None  # integer PCM is always finite
    else:
        data, sr, total = _soundfile_decode(blob, head, max_seconds)
        frames, channels = data.shape
        if channels > MAX_CHANNELS:
            raise AudioSkip("too_many_channels", f"{channels} channels")
        if frames == 0:
            raise AudioSkip("no_samples", "0 samples")
        check_finite = True
    x = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
    if check_finite and not np.isfinite(x).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioSkip("non_finite", f"{bad} NaN/inf sample(s)")
    silent = not x.any()
    duration = frames / float(sr)
    cut_from = total / float(sr) if total > frames else None
    if target_sr is not None and sr != target_sr:
        x = resample(np.ascontiguousarray(x, dtype=np.float32), sr, target_sr)
    elif channels == 1:
        x = data.reshape(frames)  # the (frames, 1) array itself: contiguous, no copy
    return Audio(np.ascontiguousarray(x, dtype=np.float32), int(target_sr or sr), int(sr), int(channels),
                 duration, silent, cut_from)
