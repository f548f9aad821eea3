"""Pretrained audio encoders: waveform (S,) at `sample_rate` -> frame embeddings (T', D).

    enc = build_encoder("onnx:models/")                       # speech_embedding pair in a folder
    enc = build_encoder("onnx:embedding=E.onnx,melspec=M.onnx,mel_scale=0.1,mel_offset=2")
    enc = build_encoder("onnx:frames.onnx,hop=320")           # one waveform -> frames graph
    enc = build_encoder("torchaudio:WAV2VEC2_BASE,layer=6")   # weights from the torch hub cache
    enc = build_encoder("hf:microsoft/wavlm-base-plus,layer=6")  # transformers, the HF cache (pllcli[hf])
    frames = enc.embed(wave)                                  # (T', D) float32
    frames, padded = enc.embed(wave, with_padding=True)       # samples of zero padding added

A spec is `KIND:[POSITIONAL,]KEY=VALUE,...`; the keys are the encoder class's keyword
arguments (coerced by `pllcli.spec`). `identity()` is a JSON-able dict that names what makes
the numbers (kind, name, file sha256s, layer, rates, dim, normalisation) and holds no paths:
it is what a feature config hashes. Clips shorter than `min_samples` (the receptive field), or
than `min_duration=` when given, are zero-padded (`pad=centre`, the default, puts half the zeros
before the clip; `pad=end` all after); `padding(S)` says how many samples that adds. Both keys
are in the identity: they change the numbers of short clips.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import numpy as np

from pllcli.errors import ConfigMismatchError, UsageError

FLAG = "--encoder"
PAD_MODES = ("centre", "end")
_KINDS: dict[str, Callable[[], type]] = {}


def register(kind: str):
    """Class decorator: make `kind:` specs build this class."""
    def deco(cls):
        _KINDS[kind] = lambda: cls
        cls.kind = kind
        return cls
    return deco


def _lazy(kind: str, module: str, name: str) -> None:
    def load():
        import importlib
        return getattr(importlib.import_module(module), name)
    _KINDS.setdefault(kind, load)


_lazy("onnx", "pllcli.encoders.onnx", "OnnxEncoder")
_lazy("torchaudio", "pllcli.encoders.torchaudio_bundle", "TorchaudioEncoder")
_lazy("hf", "pllcli.encoders.hf", "HFEncoder")


def list_kinds() -> list[str]:
    return sorted(_KINDS)


class Encoder:
    """Base class. Subclasses set `name`, `sample_rate`, `hop` (samples per output frame),
    `min_samples`, `dim` and implement `_embed_padded(wave (S>=min_samples,)) -> (T', D)`."""

    kind = "base"
    name = ""
    sample_rate = 16000
    hop = 1
    min_samples = 1
    dim = 0
    spec = ""   # the spec string this encoder was built from (paths included; not hashed)

    pad = "centre"
    min_duration = None    # seconds every clip is padded to at least (None: the receptive field)

    def __init__(self, pad: str = "centre", min_duration: "float | str | None" = None):
        """pad: where short clips get their zeros, "centre" (both sides) or "end";
        min_duration: pad every clip to at least this long (2s, 500ms or seconds)."""
        if pad not in PAD_MODES:
            raise UsageError(f"{FLAG}: pad must be one of {', '.join(PAD_MODES)}, got {pad!r}")
        self.pad = pad
        if min_duration is not None:
            from pllcli.io import parse_duration
            min_duration = parse_duration(min_duration, f"{FLAG} min_duration")
        self.min_duration = min_duration

    # ------------------------------------------------------------------ geometry
    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def target_samples(self) -> int:
        """Clips shorter than this are zero-padded to it (>= min_samples)."""
        return _target_samples(self.min_samples, self.min_duration, self.sample_rate)

    def padding_split(self, num_samples: int) -> tuple[int, int]:
        """(zeros before, zeros after) a clip of `num_samples` gets before encoding."""
        return _padding_split(self.target_samples, num_samples, self.pad)

    def padding(self, num_samples: int) -> int:
        """Zero samples added to a clip of `num_samples` before encoding."""
        return sum(self.padding_split(num_samples))

    def num_frames(self, num_samples: int) -> int:
        """T' for a clip of `num_samples` (after padding)."""
        s = max(int(num_samples), self.target_samples)
        return 1 + (s - self.min_samples) // self.hop

    # ------------------------------------------------------------------ identity
    def _declared(self) -> dict[str, Any]:
        """Kind-specific identity fields (files' sha256, layer, normalisation)."""
        return {}

    def identity(self) -> dict[str, Any]:
        d = {"kind": self.kind, "name": self.name, "sample_rate": int(self.sample_rate),
             "hop": int(self.hop), "frame_rate": float(self.frame_rate),
             "min_samples": int(self.min_samples), "dim": int(self.dim), "pad": self.pad,
             "min_duration": self.min_duration}
        d.update(self._declared())
        return d

    def describe(self) -> str:
        return (f"{self.kind} {self.name}: {self.sample_rate} Hz in, {self.dim}-dim frames at "
                f"{self.frame_rate:g} Hz, receptive field {self.min_samples / self.sample_rate:.3f} s")

    # ------------------------------------------------------------------ compute
    def _embed_padded(self, wave: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed(self, wave: np.ndarray, with_padding: bool = False):
        """(S,) float32 at sample_rate -> (T', D) float32 [, samples of padding added]."""
        x = np.asarray(wave, dtype=np.float32).reshape(-1)
        left, right = self.padding_split(len(x))
        if left or right:
            x = np.pad(x, (left, right))
        out = np.ascontiguousarray(self._embed_padded(x), dtype=np.float32)
        if out.shape[0] != self.num_frames(len(x)):
            raise UsageError(f"{FLAG} {self.kind}: the encoder gave {out.shape[0]} frames for {len(x)} samples, "
                             f"its declared framing says {self.num_frames(len(x))} (check hop, min_samples, "
                             f"mel_hop, mel_frame)")
        return (out, left + right) if with_padding else out

    def embed_many(self, waves: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
        """Many clips: ([(T'_i, D)], [padding_i]). Each clip is encoded on its own samples only,
        so a clip's numbers do not depend on which clips share its batch."""
        outs, pads = [], []
        for w in waves:
            o, p = self.embed(w, with_padding=True)
            outs.append(o)
            pads.append(p)
        return outs, pads

    def as_module(self):
        """torch nn.Module: waveform (B, S) float at sample_rate -> (B, T', D) (no padding added)."""
        raise NotImplementedError


class TorchModelEncoder(Encoder):
    """An encoder that is a torch model: subclasses set `model` and `device` and implement
    `_forward(waveform (B, S) tensor) -> (B, T', D)`; embedding, the export module and its ONNX
    graph follow from it."""

    model = None
    device = "cpu"

    def _forward(self, x):
        raise NotImplementedError

    def _embed_padded(self, x: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            out = self._forward(torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device))
        return out[0].float().cpu().numpy()

    def as_module(self):
        """torch module (B, S) -> (B, T', D) running `_forward`; traceable for export."""
        import torch

        enc = self

        class EncoderFrames(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = enc.model

            def forward(self, waveform):
                return enc._forward(waveform)

        return EncoderFrames().eval()

    def onnx_graph(self, opset: int = 17):
        """ONNX ModelProto of `as_module()` through torch: waveform (B, S) -> frames (B, T', D) (no
        padding); `export` composes it with the model (ONNX encoders use their own files)."""
        import io
        import warnings

        import onnx
        import torch
        buf = io.BytesIO()
        example = torch.zeros(1, max(self.target_samples, self.sample_rate))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(self.as_module(), (example,), buf, dynamo=False, opset_version=opset,
                              input_names=["waveform"], output_names=["frames"],
                              dynamic_axes={"waveform": {0: "batch", 1: "samples"},
                                            "frames": {0: "batch", 1: "frames"}})
        return onnx.load_from_string(buf.getvalue())


def _target_samples(min_samples: int, min_duration: "float | None", sample_rate: int) -> int:
    want = 0 if min_duration is None else int(round(min_duration * sample_rate))
    return max(int(min_samples), want)


def _padding_split(target: int, num_samples: int, pad: str) -> tuple[int, int]:
    total = max(0, int(target) - int(num_samples))
    left = total // 2 if pad == "centre" else 0
    return left, total - left


# ---------------------------------------------------------------------- geometry of a stored identity

def identity_padding(identity: dict, num_samples: int) -> tuple[int, int]:
    """(zeros before, zeros after) the encoder of `identity` adds to a clip of `num_samples`."""
    target = _target_samples(identity["min_samples"], identity.get("min_duration"), identity["sample_rate"])
    return _padding_split(target, num_samples, identity.get("pad", "centre"))


def identity_num_frames(identity: dict, num_samples: int) -> int:
    """T' the encoder of `identity` gives for a clip of `num_samples` (padding included)."""
    s = int(num_samples) + sum(identity_padding(identity, num_samples))
    return 1 + max(0, s - int(identity["min_samples"])) // int(identity["hop"])


def identity_frame_offset(identity: dict, num_samples: int) -> float:
    """Seconds from the clip's start to where frame 0's cell begins. Frame k sees samples
    [k hop, k hop + min_samples) of the padded clip, so its centre lies at
    (k hop + min_samples / 2 - zeros before) / rate on the clip's own timeline; its cell is the
    hop around that centre. Usually positive (half a receptive field late), negative for clips
    centred in padding."""
    left = identity_padding(identity, num_samples)[0]
    return (int(identity["min_samples"]) / 2 - int(identity["hop"]) / 2 - left) / float(identity["sample_rate"])


# ---------------------------------------------------------------------- specs

def split_spec(spec: str, flag: str = FLAG) -> tuple[str, str | None, dict[str, str]]:
    """'kind:POS,k=v,...' -> (kind, POS or None, {k: v}); POS is the one part without '='."""
    from pllcli.spec import _split_top, parse_pairs
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep or not kind:
        raise UsageError(f"{flag}: expected KIND:[PATH|NAME,]KEY=VALUE,... with KIND one of "
                         f"{', '.join(list_kinds())}, got {spec!r}")
    positional = [p.strip() for p in _split_top(rest) if p.strip() and "=" not in p]
    if len(positional) > 1:
        raise UsageError(f"{flag} {kind}: only one value without KEY= is allowed, got "
                         f"{', '.join(map(repr, positional))}")
    pairs = parse_pairs([p for p in _split_top(rest) if "=" in p], f"{flag} {kind}")
    return kind, (positional[0] if positional else None), pairs


def build_encoder(spec: "str | Encoder", flag: str = FLAG) -> Encoder:
    """An encoder from a spec string (an Encoder passes through)."""
    if isinstance(spec, Encoder):
        return spec
    from pllcli.spec import coerce
    kind, pos, raw = split_spec(spec, flag)
    if kind not in _KINDS:
        raise UsageError(f"{flag}: unknown encoder kind {kind!r} (choose from {', '.join(list_kinds())})")
    cls = _KINDS[kind]()
    kwargs = coerce(cls, raw, flag, skip=("source", "model"), what=f"encoder {kind}")
    if pos is not None:
        kwargs["source"] = pos
    enc = cls(**kwargs)
    enc.spec = str(spec)
    return enc


def encoder_help() -> str:
    """One line per kind with its keys, for --help / error messages."""
    from pllcli.spec import describe
    lines = []
    for kind in list_kinds():
        cls = _KINDS[kind]()
        keys = ", ".join(f"{k}={d}" for k, _, d in describe(cls, skip=("source", "model")))
        lines.append(f"{kind}:{cls.positional_help}  keys: {keys}")
    return "\n".join(lines)


def check_identity(expected: dict | None, actual: dict | None, what: str) -> None:
    """ConfigMismatchError naming the differing identity fields (None = the log-mel frontend)."""
    e, a = expected or {}, actual or {}
    if not e and not a:
        return
    if not e or not a:
        raise ConfigMismatchError(f"{what}: encoder differs: expected "
                                  f"{e.get('name') or 'none'} got {a.get('name') or 'none'}")
    diffs = [f"{k} expected {e.get(k)!r} got {a.get(k)!r}" for k in sorted(set(e) | set(a))
             if e.get(k) != a.get(k)]
    if diffs:
        raise ConfigMismatchError(f"{what}: encoder differs: " + "; ".join(diffs))


def identity_hash(identity: dict | None) -> str | None:
    """16 hex chars of sha256 over the identity's JSON (None for no encoder)."""
    if not identity:
        return None
    import hashlib
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path) -> str:
    from pllcli.io import sha256_file
    return sha256_file(path)


# ---------------------------------------------------------------------- for the feature config

_CACHE: dict[str, Encoder] = {}


def cached_encoder(spec: str, identity: "dict | str | None" = None, what: str = "encoder") -> Encoder:
    """One encoder per spec in this process (built once, reused by every chunk and forked worker);
    with `identity` (a dict or its JSON), refuses an encoder whose identity differs (ConfigMismatchError)."""
    if not spec:
        raise UsageError(f"{FLAG}: this feature config names an encoder but not how to build it; "
                         f"give {FLAG} SPEC")
    enc = _CACHE.get(spec)
    if enc is None:
        enc = _CACHE[spec] = build_encoder(spec)
    if identity:
        check_identity(json.loads(identity) if isinstance(identity, str) else identity, enc.identity(), what)
    return enc


def identity_json(identity: dict) -> str:
    """The canonical JSON string of an identity (what a FeatureConfig stores and hashes)."""
    return json.dumps(identity, sort_keys=True)


def feature_fields(enc: Encoder) -> dict[str, Any]:
    """The FeatureConfig fields of a store of `enc`'s frames: frames of `min_samples` every `hop`
    samples, so `FeatureConfig.num_frames(S) == enc.num_frames(S)` for S >= 1."""
    return {"frontend": "encoder", "sample_rate": int(enc.sample_rate), "n_fft": int(enc.min_samples),
            "win_length": int(enc.min_samples), "hop_length": int(enc.hop), "n_mels": int(enc.dim),
            "fmin": 0.0, "fmax": enc.sample_rate / 2, "encoder": identity_json(enc.identity()),
            "encoder_spec": enc.spec}
