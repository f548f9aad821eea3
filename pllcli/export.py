"""Export a classifier checkpoint with its feature frontend to TorchScript or ONNX.

The exported graph maps waveform samples (B, S) float32 at the checkpoint's sample rate to
`logits` (B, C) and `probs` (B, C) (softmax for single-label, sigmoid for multi-label
checkpoints). The time axis (S) and the batch axis are dynamic; S must be at least
`min_samples` (one analysis frame) — callers zero-pad shorter clips.

Frontend: `FeatureConfig.make_frontend()` is put in front of the model. For TorchScript it is
traced as is. ONNX has no complex tensors, so the known frontends (`LogMel`, `KaldiFbank`)
are rewritten as a strided conv1d whose kernels are the window (and, for Kaldi, the DC
removal and pre-emphasis, which are linear per frame) times a real DFT; the mel filterbank and
log are the frontend's own buffers. The rewrite is checked against the original frontend
before export (`FRONTEND_PARITY_TOL`). An unknown frontend is exported as is; when it cannot
be, the error names the part (frontend or model) and the operator.

Metadata: ONNX `metadata_props` and TorchScript `_extra_files["pllcli.json"]` hold the same
JSON-able fields: classes, sample_rate, task, min_samples, feature_config,
feature_config_hash, outputs, pllcli_version (each ONNX value is a JSON string).
"""
from __future__ import annotations

import builtins
import json
import logging
import math
import os
from pathlib import Path

from pllcli.errors import InputError, PllcliError, UsageError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
FRONTEND_PARITY_TOL = 1e-3  # max abs diff (log-mel units) between the rewrite and the frontend
EXTRA_FILE = "pllcli.json"


class ExportError(PllcliError):
    """The model (or a part of it) cannot be exported, or the exported model disagrees."""


SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".jit", ".torchscript")}


def format_from_path(path: str | os.PathLike, fmt: str | None) -> str:
    """'onnx' or 'torchscript' from `fmt` or else the suffix; a suffix that does not fit is a UsageError."""
    suffix = Path(path).suffix.lower()
    if fmt:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if suffix not in SUFFIXES[fmt]:
            raise UsageError(f"{Path(path).name}: a {fmt} file must end in {' or '.join(SUFFIXES[fmt])}")
        return fmt
    for name, suffixes in SUFFIXES.items():
        if suffix in suffixes:
            return name
    raise UsageError(f"{Path(path).name}: export writes .onnx (ONNX) or {', '.join(SUFFIXES['torchscript'])} "
                     "(TorchScript) files; give one of those suffixes")


# ---------------------------------------------------------------- graph pieces

def _torch():
    import torch
    return torch


def dft_kernels(frame: int, n_fft: int, pre=None):
    """(2 * n_freq, frame) float64 real/imag DFT rows (n_fft points, frame zero-padded) @ pre."""
    import numpy as np
    n_freq = n_fft // 2 + 1
    k = np.arange(n_freq)[:, None]
    n = np.arange(frame)[None, :]
    ang = 2 * np.pi * k * n / n_fft
    K = np.concatenate([np.cos(ang), -np.sin(ang)], axis=0)
    return K @ pre if pre is not None else K


def _make_conv_frontend():
    torch = _torch()
    nn = torch.nn

    class ConvSTFTFrontend(nn.Module):
        """waveform (B, S) -> log mel (B, T, F) with framing + linear per-frame ops + DFT as one conv1d.

        power = re^2 + im^2, mel = power @ fb, then log(mel + offset) ("add") or
        log(max(mel, offset)) ("clamp").
        """

        def __init__(self, kernel, fb, hop: int, log_offset: float, log_mode: str):
            super().__init__()
            self.n_freq = kernel.shape[0] // 2
            self.hop = int(hop)
            self.log_offset = float(log_offset)
            self.log_mode = log_mode
            self.register_buffer("kernel", torch.as_tensor(kernel, dtype=torch.float32)[:, None, :])
            self.register_buffer("fb", fb.detach().to(torch.float32).clone())

        def forward(self, waveform):
            x = waveform.to(torch.float32).unsqueeze(1)                     # (B, 1, S)
            spec = nn.functional.conv1d(x, self.kernel, stride=self.hop)    # (B, 2F, T)
            re, im = spec[:, :self.n_freq], spec[:, self.n_freq:]
            power = (re * re + im * im).transpose(1, 2)                     # (B, T, F)
            mel = torch.matmul(power, self.fb)
            if self.log_mode == "add":
                return torch.log(mel + self.log_offset)
            return torch.log(torch.clamp(mel, min=self.log_offset))

    return ConvSTFTFrontend


def onnx_frontend(frontend):
    """An ONNX-exportable equivalent of a known frontend module, or None if unknown."""
    import numpy as np
    name = type(frontend).__name__
    Conv = _make_conv_frontend()
    if name == "LogMel":
        window = frontend.window.detach().double().numpy()
        K = dft_kernels(frontend.n_fft, frontend.n_fft, np.diag(window))
        return Conv(K, frontend.fb, frontend.hop, frontend.log_offset, "add")
    if name == "KaldiFbank":
        w = frontend.win
        remove_dc = np.eye(w) - np.full((w, w), 1.0 / w)
        pre = np.eye(w)
        pre[np.arange(1, w), np.arange(w - 1)] = -frontend.preemph
        pre[0, 0] = 1.0 - frontend.preemph                     # first sample: x0 - 0.97 * x0
        window = frontend.window.detach().double().numpy()
        linear = np.diag(window) @ pre @ remove_dc
        K = dft_kernels(w, frontend.n_fft, linear)
        return Conv(K, frontend.fb, frontend.hop, frontend.floor, "clamp")
    return None


def _make_wrapper():
    torch = _torch()

    class Exported(torch.nn.Module):
        """waveform (B, S) -> (logits (B, C), probs (B, C))."""

        def __init__(self, frontend, model, multi_label: bool):
            super().__init__()
            self.frontend = frontend
            self.model = model
            self.multi_label = bool(multi_label)

        def forward(self, waveform):
            feats = self.frontend(waveform)
            logits = self.model(feats, None)["logits"]
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            return logits, probs

    return Exported


def load_for_export(checkpoint: str | os.PathLike):
    """(model, meta, FeatureConfig, frontend) from a classifier checkpoint."""
    from pllcli.checkpoint import load_model
    from pllcli.errors import CheckpointError
    from pllcli.features.config import FeatureConfig
    model, meta = load_model(checkpoint, device="cpu")
    if not meta.get("feature_config"):
        raise CheckpointError(f"{checkpoint}: checkpoint has no feature_config; cannot build the frontend")
    if not meta.get("classes"):
        raise CheckpointError(f"{checkpoint}: checkpoint has no class list")
    config = FeatureConfig.from_dict(meta["feature_config"])
    frontend = config.make_frontend().eval()
    return model.eval(), meta, config, frontend


def eager_module(model, meta, frontend):
    """The torch eager reference: original frontend + model (+ softmax/sigmoid)."""
    return _make_wrapper()(frontend, model, meta.get("task") == "multi").eval()


def export_metadata(meta: dict, config) -> dict:
    from pllcli import __version__
    return {
        "classes": list(meta["classes"]),
        "sample_rate": int(config.sample_rate),
        "task": meta.get("task", "single"),
        "min_samples": int(config.frame_length),
        "feature_config": config.to_dict(),
        "feature_config_hash": config.hash(),
        "outputs": ["logits", "probs"],
        "input": "waveform (batch, samples) float32 in [-1, 1]",
        "pllcli_version": __version__,
    }


def synthetic_clip(sample_rate: int, seconds: float = 1.0, freq: float = 440.0):
    """A deterministic test signal: a tone with a little noise, float32 (S,)."""
    import numpy as np
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    rng = np.random.default_rng(0)
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)
    return x.astype(np.float32)


def _first_line(e: BaseException, limit: int = 200) -> str:
    s = str(e).strip()
    line = s.splitlines()[0] if s else type(e).__name__
    return line[:limit]


def _attribute_failure(export_part, frontend, model, example, fmt: str, err: BaseException):
    """Export the frontend and the model separately to say which one breaks; raise ExportError."""
    torch = _torch()
    with torch.no_grad():
        feats = frontend(example)
    parts = [("frontend", frontend, (example,)), ("model", _ModelOnly(model), (feats,))]
    for part, mod, args in parts:
        try:
            export_part(mod, args)
        except Exception as e:  # noqa: BLE001 - turned into a one-line message
            raise ExportError(f"cannot export to {fmt}: the {part} ({type(getattr(mod, 'model', mod)).__name__}) "
                              f"is not traceable: {_first_line(e)}") from None
    raise ExportError(f"cannot export to {fmt}: {_first_line(err)}") from None


def _ModelOnly(model):  # noqa: N802 - factory returning a module
    torch = _torch()

    class ModelOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, x):
            return self.model(x, None)["logits"]

    return ModelOnly(model).eval()


# ---------------------------------------------------------------- export

def export(checkpoint: str | os.PathLike, output: str | os.PathLike, fmt: str | None = None, *,
           frontend=None, check_frontend: bool = True, verify=None) -> dict:
    """Export `checkpoint` to `output`; returns the metadata written (plus path and size).

    `verify(tmp_path, fmt)` (e.g. a parity check) runs on the finished file before it is renamed
    onto `output`: if it raises, nothing is left at `output`. `frontend` overrides the
    checkpoint's frontend module (used in tests).
    """
    torch = _torch()
    from pllcli.io import atomic_path
    fmt = format_from_path(output, fmt)
    model, meta, config, default_frontend = load_for_export(checkpoint)
    frontend = (frontend if frontend is not None else default_frontend).eval()
    md = export_metadata(meta, config)
    example = torch.as_tensor(synthetic_clip(config.sample_rate))[None]
    multi = md["task"] == "multi"
    Wrapper = _make_wrapper()
    if getattr(config, "frontend", None) == "encoder":
        from pllcli.encoders import cached_encoder
        enc = cached_encoder(getattr(config, "encoder_spec", None), getattr(config, "encoder", None),
                             what=f"export {checkpoint}")
        if fmt == "onnx":
            _require_onnx()
            md = export_encoder_onnx(enc, model, md, output, multi, verify)
            return dict(md, path=str(output), format=fmt, size_bytes=Path(output).stat().st_size)
        if enc.kind == "onnx":
            raise ExportError("an ONNX encoder exports to ONNX only: use a .onnx output")
        # a torchaudio encoder to TorchScript: its frontend module (enc.as_module()) is traced as any other

    if fmt == "onnx":
        _require_onnx()
        graph_frontend = onnx_frontend(frontend) if type(frontend).__name__ in ("LogMel", "KaldiFbank") else None
        if graph_frontend is not None and check_frontend:
            with torch.no_grad():
                ref = frontend(example)
                got = graph_frontend(example)
            diff = float((ref - got).abs().max()) if ref.shape == got.shape else math.inf
            if not diff <= FRONTEND_PARITY_TOL:
                raise ExportError(f"frontend {type(frontend).__name__}: DFT-conv rewrite differs from the "
                                  f"torch frontend by {diff:.3g} (> {FRONTEND_PARITY_TOL})")
            md["frontend_rewrite_max_abs_diff"] = diff
        graph_frontend = graph_frontend if graph_frontend is not None else frontend
        wrapper = Wrapper(graph_frontend, model, multi).eval()

        def export_part(mod, args, path=None):
            import io
            target = path if path is not None else io.BytesIO()
            with torch.no_grad():
                torch.onnx.export(mod, args, target, dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=["input"], dynamic_axes={"input": {0: "batch", 1: "time"}})

        with atomic_path(output, suffix=".onnx") as tmp:
            try:
                with torch.no_grad(), _quiet(native=True):
                    torch.onnx.export(
                        wrapper, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                        input_names=["waveform"], output_names=["logits", "probs"],
                        dynamic_axes={"waveform": {0: "batch", 1: "samples"},
                                      "logits": {0: "batch"}, "probs": {0: "batch"}})
            except Exception as e:  # noqa: BLE001
                with _quiet(native=True):
                    _attribute_failure(export_part, graph_frontend, model, example, "ONNX", e)
            import onnx
            proto = onnx.load(str(tmp))
            del proto.metadata_props[:]
            for k, v in md.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = k, json.dumps(v)
            proto.producer_name = "pllcli"
            onnx.save(proto, str(tmp))
            if verify is not None:
                verify(tmp, fmt)
    else:
        wrapper = Wrapper(frontend, model, multi).eval()
        with atomic_path(output, suffix=".pt") as tmp:
            try:
                with torch.no_grad(), _quiet():
                    traced = torch.jit.trace(wrapper, (example,), check_trace=False)
            except Exception as e:  # noqa: BLE001
                def export_part(mod, args):
                    with torch.no_grad():
                        torch.jit.trace(mod, args, check_trace=False)
                with _quiet():
                    _attribute_failure(export_part, frontend, model, example, "TorchScript", e)
            with _quiet():
                torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(md)})
            if verify is not None:
                verify(tmp, fmt)
    md = dict(md, path=str(output), format=fmt, size_bytes=Path(output).stat().st_size)
    return md


# Warnings torch gives on every export of a working model: (category name, message regex, module regex).
# Anything else (e.g. a tracer warning raised in pllcli's own model code) stays visible.
_HARMLESS_WARNINGS = (
    ("DeprecationWarning", r"You are using the legacy TorchScript-based ONNX export", r""),
    ("DeprecationWarning", r"The feature will be removed", r"torch\."),
    ("UserWarning", r"Exporting a model to ONNX with a batch_size other than 1", r"torch\."),
    ("FutureWarning", r"`torch\.jit\.(trace|trace_method|save|load)` is deprecated", r""),
    ("TracerWarning", r"Converting a tensor to a Python (boolean|integer|index|float)", r"torch\."),
)
# ...and lines the ONNX exporter's C++ shape inference prints on stderr itself (not Python warnings)
_HARMLESS_NATIVE = (r"shape inference of prim::(PackPadded|PadPacked) type is missing",)


def export_encoder_onnx(enc, model, md: dict, output, multi: bool, verify=None) -> dict:
    """Encoder + classifier as one ONNX graph, waveform (B, S) -> logits, probs (B, C): the classifier
    alone (features (B, T', D) -> logits, probs) composed behind the encoder by
    `pllcli.encoders.onnx.compose_onnx` (which pads short clips in-graph as featurize does).
    Returns the metadata written; `verify` as in `export`."""
    import io

    import onnx

    from pllcli.encoders.onnx import compose_onnx
    from pllcli.io import atomic_path
    torch = _torch()
    head = _make_wrapper()(torch.nn.Identity(), model, multi).eval()  # (B, T', D) -> logits, probs
    buf = io.BytesIO()
    example = torch.zeros(1, max(1, enc.num_frames(enc.sample_rate)), enc.dim)
    with torch.no_grad(), _quiet(native=True):
        torch.onnx.export(head, (example,), buf, dynamo=False, opset_version=ONNX_OPSET, input_names=["features"],
                          output_names=["logits", "probs"],
                          dynamic_axes={"features": {0: "batch", 1: "frames"}, "logits": {0: "batch"},
                                        "probs": {0: "batch"}})
    proto = compose_onnx(enc, onnx.load_from_string(buf.getvalue()), "features", opset=ONNX_OPSET)
    md = dict(md, encoder=enc.identity(), min_samples=1)  # the graph pads short clips itself
    del proto.metadata_props[:]
    for k, v in md.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    proto.producer_name = "pllcli"
    with atomic_path(output, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
        if verify is not None:
            verify(tmp, "onnx")
    return md


class _quiet:
    """Filter the known-harmless exporter warnings (`_HARMLESS_WARNINGS`) inside export only; with
    `native=True` also the C++ shape-inference lines (`_HARMLESS_NATIVE`) written to fd 2, other
    lines pass through."""

    def __init__(self, native: bool = False):
        self.native = native

    def __enter__(self):
        import warnings
        torch = _torch()
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        cats = {"TracerWarning": torch.jit.TracerWarning}
        for cat, msg, mod in _HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=msg, category=cats.get(cat) or getattr(builtins, cat),
                                    module=mod)
        self._fd = _StderrFilter(_HARMLESS_NATIVE).__enter__() if self.native else None
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            self._fd.__exit__(*exc)
        return self._cm.__exit__(*exc)


class _StderrFilter:
    """Capture file descriptor 2 and write back every line that matches none of `patterns`."""

    def __init__(self, patterns):
        import re
        self.patterns = [re.compile(p) for p in patterns]

    def __enter__(self):
        import sys
        import tempfile
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._buf = tempfile.TemporaryFile()
        os.dup2(self._buf.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import sys
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._buf.seek(0)
        text = self._buf.read().decode("utf-8", "replace")
        self._buf.close()
        kept = [ln for ln in text.splitlines(keepends=True) if not any(p.search(ln) for p in self.patterns)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
        return False


def _require_onnx():
    from pllcli.errors import MissingExtraError
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingExtraError("onnx", "export", "ONNX export") from None


# ---------------------------------------------------------------- loading / running exported files

def read_metadata(path: str | os.PathLike) -> dict:
    """The pllcli metadata of an exported file (ONNX or TorchScript)."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", str(path))
    if path.suffix.lower() == ".onnx":
        import onnx
        proto = onnx.load(str(path), load_external_data=False)
        out = {}
        for p in proto.metadata_props:
            try:
                out[p.key] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key] = p.value
        return out
    torch = _torch()
    files = {EXTRA_FILE: ""}
    with _quiet():
        torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[EXTRA_FILE])


class Runner:
    """Run an exported file on float32 waveforms (B, S) -> (logits, probs) numpy arrays."""

    def __init__(self, path: str | os.PathLike, fmt: str | None = None):
        self.path = str(path)
        self.format = format_from_path(path, fmt)
        if self.format == "onnx":
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        else:
            with _quiet():
                self.module = _torch().jit.load(self.path).eval()

    def __call__(self, waveform):
        import numpy as np
        x = np.asarray(waveform, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if self.format == "onnx":
            logits, probs = self.session.run(["logits", "probs"], {"waveform": x})
            return logits, probs
        torch = _torch()
        with torch.no_grad():
            logits, probs = self.module(torch.from_numpy(x))
        return logits.numpy(), probs.numpy()


def load_clips(paths, sample_rate: int, min_samples: int):
    """[(name, float32 (S,))] read and resampled to `sample_rate`; none -> the synthetic tone."""
    import numpy as np
    if not paths:
        return [("synthetic-tone-1s", synthetic_clip(sample_rate)),
                ("synthetic-tone-2.3s", synthetic_clip(sample_rate, 2.3, 1000.0))]
    out = []
    for p in paths:
        x = _read_audio(p, sample_rate)
        if len(x) < min_samples:
            x = np.pad(x, (0, min_samples - len(x)))
        out.append((str(p), x))
    return out


def _read_audio(path, sample_rate: int):
    """(S,) float32 mono at `sample_rate` via pllcli.audio; unreadable files are InputErrors."""
    import numpy as np
    from pllcli.audio import AudioSkip, load_audio
    try:
        audio = load_audio(path, sample_rate)
    except AudioSkip as e:
        raise InputError(f"cannot read audio ({e})", str(path)) from None
    return np.asarray(audio.samples, dtype=np.float32)


def check(checkpoint: str | os.PathLike, exported: str | os.PathLike, clips=None,
          tolerance: float = 1e-3, fmt: str | None = None) -> dict:
    """Run the exported file and the torch eager model on clips; max abs diff of logits and probs.

    Raises ExportError when the difference exceeds `tolerance`.
    """
    torch = _torch()
    import numpy as np
    model, meta, config, frontend = load_for_export(checkpoint)
    eager = eager_module(model, meta, frontend)
    runner = Runner(exported, fmt)
    rows = []
    for name, x in load_clips(clips, config.sample_rate, config.frame_length):
        with torch.no_grad():
            ref_l, ref_p = (t.numpy() for t in eager(torch.from_numpy(x)[None]))
        got_l, got_p = runner(x[None])
        rows.append({"clip": name, "seconds": len(x) / config.sample_rate,
                     "logits_max_abs_diff": float(np.abs(ref_l - got_l).max()),
                     "probs_max_abs_diff": float(np.abs(ref_p - got_p).max()),
                     "same_top1": bool(ref_p.argmax() == got_p.argmax())})
    worst = max(max(r["logits_max_abs_diff"], r["probs_max_abs_diff"]) for r in rows)
    result = {"exported": str(exported), "format": runner.format, "tolerance": tolerance,
              "max_abs_diff": worst, "clips": rows, "ok": worst <= tolerance}
    return result
