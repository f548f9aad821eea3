"""Numpy frontends for featurize: waveform (B, S) -> features (B, T, F), without torch.

The torch modules in `pllcli.features.frontend` stay the definition (export puts them in
front of the model); these compute the same numbers to float32 rounding (max abs difference
<= 1e-4 on log-mel / log-fbank, tests/test_np_frontend.py) so that `pllcli featurize` need
not import torch. Same two-step split: `power(batch) -> (B, T, n_freq)` on a padded batch,
then `mel_into(power (T, n_freq), out (T, F))` per clip on its own frames, so a clip's numbers
do not depend on which clips share its batch (`mel_into` = `project_into`, the per-clip matmul,
then `log_`, elementwise, which featurize runs once over a whole chunk). The filterbanks re-derive torchaudio's
`melscale_fbanks` (HTK, norm None) and `compliance.kaldi.get_mel_banks` in float64.
Framing is snip-edges (see `pllcli.features.config`).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _as_batch(waveform: np.ndarray, frame: int) -> np.ndarray:
    """(B, S) float32, zero-padded on the right to at least `frame` samples."""
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.shape[-1] < frame:
        x = np.pad(x, ((0, 0), (0, frame - x.shape[-1])))
    return x


def _power_of(spec: np.ndarray) -> np.ndarray:
    """|spec|^2 of a complex (..., n) array as re*re + im*im in float32 -> (..., n) float32."""
    ri = spec.astype(np.complex64).view(np.float32)  # (..., 2 n): re, im interleaved
    np.square(ri, out=ri)
    return ri[..., 0::2] + ri[..., 1::2]


def hann_window(n: int, periodic: bool) -> np.ndarray:
    """(n,) float64 Hann window as torch.hann_window (periodic: denominator n, else n - 1)."""
    if n == 1:
        return np.ones(1)
    d = n if periodic else n - 1
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / d)


def melscale_fbanks(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> np.ndarray:
    """(n_freqs, n_mels) float64 triangular HTK-mel filters, as torchaudio.functional.melscale_fbanks
    (norm=None, mel_scale="htk")."""
    all_freqs = np.linspace(0, sample_rate // 2, n_freqs)
    m_min, m_max = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    f_pts = 700.0 * (10.0 ** (np.linspace(m_min, m_max, n_mels + 2) / 2595.0) - 1.0)
    f_diff = np.diff(f_pts)  # (n_mels + 1,)
    slopes = f_pts[None, :] - all_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up))


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float) -> np.ndarray:
    """(n_mels, n_fft // 2) float64 Kaldi mel filters, as torchaudio.compliance.kaldi.get_mel_banks
    without VTLN warping; high_freq <= 0 means Nyquist + high_freq."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    mel_lo, mel_hi = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, high_freq))
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    b = np.arange(n_mels, dtype=np.float64)[:, None]
    left, center, right = mel_lo + b * delta, mel_lo + (b + 1.0) * delta, mel_lo + (b + 2.0) * delta
    mel = 1127.0 * np.log(1.0 + (sample_rate / n_fft) * np.arange(n_fft // 2) / 700.0)[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return np.maximum(0.0, np.minimum(up, down))


class _MelSteps:
    """The steps both frontends share: `power` (theirs), then per clip the mel projection
    (`project_into`, a matmul with `fb`) and the log (`log_`, theirs)."""

    fb: np.ndarray

    def mel_into(self, power: np.ndarray, out: np.ndarray) -> None:
        """log-mel / log-fbank of one clip's contiguous (T, n_freq) power written into `out` (T, n_mels)."""
        self.project_into(power, out)
        self.log_(out)

    def project_into(self, power: np.ndarray, out: np.ndarray) -> None:
        """Mel energies (no log) of one clip's contiguous (T, n_freq) power into `out` (T, n_mels)."""
        np.matmul(power, self.fb, out=out)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        return _per_clip(self, self.power(waveform))


class LogMel(_MelSteps):
    """Power mel spectrogram + log, as `pllcli.features.frontend.LogMel` (torchaudio
    MelSpectrogram(center=False), periodic Hann of win_length centred in n_fft, HTK mel, no norm).

    __call__(waveform (B, S)) -> (B, T, n_mels) float32 with T = config.num_frames(S).
    """

    def __init__(self, config):
        c = config
        self.n_fft, self.win, self.hop, self.n_mels = c.n_fft, c.win_length, c.hop_length, c.n_mels
        self.frame = c.n_fft
        self.left = (c.n_fft - c.win_length) // 2
        self.window = hann_window(c.win_length, periodic=True)  # float64
        self.offset = np.float32(c.log_offset)
        self.fb = np.ascontiguousarray(melscale_fbanks(c.n_fft // 2 + 1, float(c.fmin), float(c.fmax_hz),
                                                       c.n_mels, c.sample_rate), dtype=np.float32)

    def power(self, waveform: np.ndarray) -> np.ndarray:
        """(B, S) -> power spectrum (B, T, n_fft//2 + 1) float32."""
        x = _as_batch(waveform, self.n_fft)
        t = 1 + (x.shape[-1] - self.n_fft) // self.hop
        # frame t is x[t*hop : t*hop + n_fft] times a window that is zero outside [left, left + win):
        # only those win samples are taken and zero-padded to n_fft (a circular shift of the
        # frame: the same power spectrum)
        seg = x[:, self.left:self.left + (t - 1) * self.hop + self.win]
        frames = sliding_window_view(seg, self.win, axis=-1)[:, ::self.hop]  # (B, T, win), a view
        return _power_of(np.fft.rfft(frames * self.window, n=self.n_fft, axis=-1))


    def log_(self, out: np.ndarray) -> None:
        """log(x + log_offset) in place, elementwise (any shape: many clips at once give the same numbers)."""
        out += self.offset
        np.log(out, out=out)



class KaldiFbank(_MelSteps):
    """Kaldi fbank as `pllcli.features.frontend.KaldiFbank` (torchaudio.compliance.kaldi.fbank with
    dither 0, povey window, pre-emphasis 0.97, DC removal, snip_edges, power, log floor log_offset).

    __call__(waveform (B, S)) -> (B, T, n_mels) float32.
    """

    preemph = 0.97

    def __init__(self, config):
        c = config
        self.win, self.hop, self.n_fft, self.n_mels = c.win_length, c.hop_length, c.n_fft, c.n_mels
        self.frame = c.win_length
        self.floor = np.float32(c.log_offset)
        self.window = hann_window(c.win_length, periodic=False) ** 0.85  # float64
        banks = kaldi_mel_banks(c.n_mels, c.n_fft, float(c.sample_rate), float(c.fmin), float(c.fmax))
        fb = np.zeros((c.n_fft // 2 + 1, c.n_mels), dtype=np.float32)  # the Nyquist bin gets no weight
        fb[:-1] = banks.T
        self.fb = fb

    def power(self, waveform: np.ndarray) -> np.ndarray:
        """(B, S) -> power spectrum (B, T, n_fft//2 + 1) float32."""
        x = _as_batch(waveform, self.win)
        frames = sliding_window_view(x, self.win, axis=-1)[:, ::self.hop]  # (B, T, win), a view
        f = frames - frames.mean(axis=-1, keepdims=True, dtype=np.float64)  # remove DC: a float64 copy
        g = np.empty_like(f)  # pre-emphasis, the first sample against itself
        np.multiply(f[..., :-1], -self.preemph, out=g[..., 1:])
        g[..., 1:] += f[..., 1:]
        g[..., 0] = f[..., 0] * (1.0 - self.preemph)
        g *= self.window
        return _power_of(np.fft.rfft(g, n=self.n_fft, axis=-1))


    def log_(self, out: np.ndarray) -> None:
        """log(max(x, floor)) in place, elementwise (any shape: many clips at once give the same numbers)."""
        np.maximum(out, self.floor, out=out)
        np.log(out, out=out)



def _per_clip(fe, power: np.ndarray) -> np.ndarray:
    """(B, T, F) features of a batch's power, the mel step run per clip as featurize does."""
    out = np.empty(power.shape[:2] + (fe.n_mels,), dtype=np.float32)
    for r in range(len(power)):
        fe.mel_into(power[r], out[r])
    return out


def build_np_frontend(config) -> LogMel | KaldiFbank:
    """The numpy frontend for a "logmel" or "fbank" `FeatureConfig`."""
    if config.frontend == "logmel":
        return LogMel(config)
    if config.frontend == "fbank":
        return KaldiFbank(config)
    raise ValueError(f"no numpy frontend for {config.frontend!r}")
