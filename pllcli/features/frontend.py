"""Torch frontends: waveform (B, S) -> features (B, T, F).

These modules are the definition of the features (export puts them in front of the model);
`pllcli featurize` computes the same numbers without torch in `pllcli.features.np_frontend`
(parity tested in tests/test_np_frontend.py). Both modules split into `power(waveform) ->
(B, T, n_freq)` and `mel(power) -> (B, T, F)`, applied per clip on the clip's own frames so
that a clip's numbers do not depend on which clips share its batch (GEMM kernels vary with
the matrix size).
While torch.onnx / torch.export trace them (or with `module.export_mode = True`) both
modules switch to export-friendly ops: framing and DFT as conv1d / matmul with a windowed
real DFT basis, so the exported graph has no stft, unfold or complex tensors; the numbers
agree with the FFT path to float32 rounding (tests/test_features.py). Both modules hold their window and filterbank as buffers, so a saved or exported module
needs no torchaudio at run time. Framing is snip-edges (see `pllcli.features.config`).
"""
from __future__ import annotations

import sys
from typing import Protocol

import torch
from torch import nn


class FrontendConfig(Protocol):
    """The fields of `pllcli.features.config.FeatureConfig` a frontend reads (this module does not
    import it: config builds frontends, so config -> frontend is the one direction)."""
    frontend: str
    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax: float
    log_offset: float

    @property
    def fmax_hz(self) -> float: ...


def _exporting() -> bool:
    """True while torch.onnx / torch.jit tracing / torch.export captures the graph.

    torch.onnx is looked up in sys.modules, not imported: an ONNX export can only be running
    if it is imported already, and importing it here would cost every process.
    """
    onnx = sys.modules.get("torch.onnx")
    checks = (getattr(onnx, "is_in_onnx_export", None), getattr(torch.jit, "is_tracing", None),
              getattr(getattr(torch, "compiler", None), "is_exporting", None))
    return any(f is not None and f() for f in checks)


def _dft_basis(n_fft: int, n: int, window: torch.Tensor) -> torch.Tensor:
    """Real DFT basis (n, 2 * (n_fft//2 + 1)) for frames of n samples (zero-padded to n_fft), window folded in."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    f = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[None, :]
    ang = 2 * torch.pi * k * f / n_fft
    w = window.to(torch.float64)[:, None]
    return torch.cat([torch.cos(ang) * w, -torch.sin(ang) * w], dim=1).to(torch.float32)


def _power_of(spec: torch.Tensor) -> torch.Tensor:
    """|spec|^2 as re*re + im*im (not abs(): hypot rounds differently), squaring in place on
    the FFT output: the same numbers as spec.real.square() + spec.imag.square(), with fewer temporaries."""
    if spec.requires_grad:  # no in-place op on a tensor autograd tracks
        return spec.real.square() + spec.imag.square()
    ri = torch.view_as_real(spec).square_()
    return ri[..., 0] + ri[..., 1]


class LogMel(nn.Module):
    """Power mel spectrogram + log, as torchaudio.transforms.MelSpectrogram(center=False).

    forward(waveform (B, S)) -> (B, T, n_mels) with T = config.num_frames(S).
    """

    def __init__(self, config: FrontendConfig):
        super().__init__()
        import torchaudio.functional as AF
        c = config
        self.export_mode = False  # True: export-friendly ops (also switched on while exporting)
        self.n_fft, self.hop = c.n_fft, c.hop_length
        self.log_offset = float(c.log_offset)
        self._offset: torch.Tensor | None = None  # log_offset as a tensor, for mel_into
        win = torch.hann_window(c.win_length, periodic=True, dtype=torch.float32)
        left = (c.n_fft - c.win_length) // 2
        window = torch.zeros(c.n_fft)
        window[left:left + c.win_length] = win
        self.register_buffer("window", window, persistent=False)
        fb = AF.melscale_fbanks(c.n_fft // 2 + 1, float(c.fmin), float(c.fmax_hz), c.n_mels,
                                c.sample_rate, norm=None, mel_scale="htk")
        self.register_buffer("fb", fb.to(torch.float32), persistent=False)  # (n_freq, n_mels)

    def power(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, S) -> power spectrum (B, T, n_freq)."""
        x = waveform.to(torch.float32)
        if self.export_mode or _exporting():
            return self._power_export(x)
        if x.shape[-1] < self.n_fft:
            x = nn.functional.pad(x, (0, self.n_fft - x.shape[-1]))
        # frames x window -> real FFT: same numbers as torch.stft(center=False), ~10% faster, and
        # already (B, T, n_freq) so the per-clip mel projection reads contiguous memory
        spec = torch.fft.rfft(x.unfold(-1, self.n_fft, self.hop) * self.window)  # (B, T, n_freq)
        return _power_of(spec)

    def _power_export(self, x: torch.Tensor) -> torch.Tensor:
        """Export-friendly power spectrum: conv1d with a windowed DFT basis (no complex, no stft op).
        Needs S >= n_fft (export a graph, then feed clips of at least one frame)."""
        basis = _dft_basis(self.n_fft, self.n_fft, self.window).T.unsqueeze(1)  # (2 n_freq, 1, n_fft)
        y = nn.functional.conv1d(x.unsqueeze(1), basis, stride=self.hop)  # (B, 2 n_freq, T)
        nf = self.n_fft // 2 + 1
        re, im = y[:, :nf], y[:, nf:]
        return (re * re + im * im).transpose(1, 2)

    def mel(self, power: torch.Tensor) -> torch.Tensor:
        """(B, T, n_freq) -> (B, T, n_mels)."""
        return torch.log(torch.matmul(power.contiguous(), self.fb) + self.log_offset)

    def mel_into(self, power: torch.Tensor, out: torch.Tensor) -> None:
        """mel() of one clip's contiguous (T, n_freq) power written into `out` (T, n_mels):
        the same numbers, no temporaries."""
        torch.mm(power, self.fb, out=out)
        if self._offset is None or self._offset.device != out.device:
            # a 0-d float32 tensor adds the same float32 value as the float, ~2 us faster per call
            self._offset = torch.tensor(self.log_offset, dtype=torch.float32, device=out.device)
        out.add_(self._offset).log_()

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.mel(self.power(waveform))


class KaldiFbank(nn.Module):
    """Kaldi fbank as torchaudio.compliance.kaldi.fbank(dither=0, window_type="povey",
    preemphasis 0.97, remove_dc_offset, snip_edges, use_power, use_log_fbank), batched.

    forward(waveform (B, S)) -> (B, T, n_mels); log floor = config.log_offset.
    """

    preemph = 0.97

    def __init__(self, config: FrontendConfig):
        super().__init__()
        from torchaudio.compliance.kaldi import get_mel_banks
        c = config
        self.export_mode = False  # True: export-friendly ops (also switched on while exporting)
        self.win, self.hop, self.n_fft = c.win_length, c.hop_length, c.n_fft
        self.floor = float(c.log_offset)
        window = torch.hann_window(c.win_length, periodic=False, dtype=torch.float32).pow(0.85)
        self.register_buffer("window", window, persistent=False)
        banks, _ = get_mel_banks(c.n_mels, c.n_fft, float(c.sample_rate), float(c.fmin), float(c.fmax),
                                 100.0, -500.0, 1.0)
        banks = nn.functional.pad(banks.to(torch.float32), (0, 1))  # (n_mels, n_fft//2 + 1)
        self.register_buffer("fb", banks.T.contiguous(), persistent=False)  # (n_freq, n_mels)

    def power(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, S) -> power spectrum (B, T, n_fft//2 + 1)."""
        x = waveform.to(torch.float32)
        export = self.export_mode or _exporting()
        if export:  # framing by an identity conv instead of unfold (not exportable)
            eye = torch.eye(self.win, dtype=torch.float32).unsqueeze(1)  # (win, 1, win)
            frames = nn.functional.conv1d(x.unsqueeze(1), eye, stride=self.hop).transpose(1, 2)
        else:
            if x.shape[-1] < self.win:
                x = nn.functional.pad(x, (0, self.win - x.shape[-1]))
            frames = x.unfold(-1, self.win, self.hop)  # (B, T, win)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - self.preemph * prev) * self.window
        if export:
            y = torch.matmul(frames, _dft_basis(self.n_fft, self.win, torch.ones(self.win)))
            nf = self.n_fft // 2 + 1
            return y[..., :nf].square() + y[..., nf:].square()
        spec = torch.fft.rfft(frames, n=self.n_fft)  # zero-pads to n_fft
        return _power_of(spec)

    def mel(self, power: torch.Tensor) -> torch.Tensor:
        """(B, T, n_freq) -> (B, T, n_mels)."""
        return torch.clamp(torch.matmul(power.contiguous(), self.fb), min=self.floor).log()

    def mel_into(self, power: torch.Tensor, out: torch.Tensor) -> None:
        """mel() of one clip's contiguous (T, n_freq) power written into `out` (T, n_mels):
        the same numbers, no temporaries."""
        torch.mm(power, self.fb, out=out)
        out.clamp_min_(self.floor).log_()

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.mel(self.power(waveform))


def build_frontend(config: FrontendConfig) -> nn.Module:
    """The frontend module for `config` (eval mode)."""
    mod = LogMel(config) if config.frontend == "logmel" else KaldiFbank(config)
    return mod.eval()
