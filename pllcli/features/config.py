"""Feature configuration: presets, hashing, compatibility checks and the torch frontend.

A `FeatureConfig` fully describes how a waveform becomes a (T, F) feature matrix.
`make_frontend()` builds the torch module that defines the numbers and that export puts in
front of the model; `pllcli featurize` computes the same numbers with numpy
(`pllcli.features.np_frontend`, no torch import; tests/test_np_frontend.py holds the two
within 1e-4 of each other on every preset).

Framing is "snip edges" (no centre padding) for both frontends: frame t covers samples
[t*hop, t*hop + frame) where frame = n_fft (logmel) or win_length (fbank). A clip of S
samples therefore has `num_frames(S) = 1 + (S - frame) // hop` frames (1 if S < frame,
the clip being zero-padded), and zero-padding a clip for batching never changes its
first `num_frames(S)` frames.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from pllcli.errors import ConfigMismatchError, UsageError

FRONTENDS = ("logmel", "fbank", "encoder")
DTYPES = ("float32", "float16")
# float32 machine epsilon: Kaldi's floor for log mel energies.
KALDI_EPS = 1.1920928955078125e-07

# Fields that change the numbers a model sees. `dtype` is only the storage precision
# and is left out of the hash and of compatibility checks.
_SEMANTIC_FIELDS = ("frontend", "sample_rate", "n_fft", "win_length", "hop_length", "n_mels",
                    "fmin", "fmax", "log_offset")


@dataclass(frozen=True)
class FeatureConfig:
    """How a waveform becomes features.

    frontend: "logmel" (torchaudio-style power mel spectrogram, periodic Hann window of
    `win_length` centred in `n_fft`, HTK mel scale, no filter normalisation, then
    log(x + log_offset)) or "fbank" (Kaldi fbank as torchaudio.compliance.kaldi.fbank with
    dither 0, povey window, pre-emphasis 0.97, DC removal, snip_edges, then
    log(max(x, log_offset))). Lengths are in samples at `sample_rate`; fmax <= 0 means
    Nyquist + fmax (Kaldi convention, 0 = Nyquist).
    """

    frontend: str = "logmel"
    sample_rate: int = 8000
    n_fft: int = 512
    win_length: int = 200
    hop_length: int = 80
    n_mels: int = 64
    fmin: float = 20.0
    fmax: float = 4000.0
    log_offset: float = 1e-6
    dtype: str = "float32"
    # frontend "encoder": the encoder's identity (canonical JSON, hashed) and the spec it was
    # built from (paths; not hashed). Empty for log-mel / fbank: their hashes stay as they were.
    encoder: str = ""
    encoder_spec: str = ""

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------ presets / dicts
    @classmethod
    def preset(cls, name: str, **overrides) -> "FeatureConfig":
        """A named preset (see `PRESETS`), with field overrides (None values ignored)."""
        if name not in PRESETS:
            raise UsageError(f"unknown feature preset {name!r} (choose from {', '.join(PRESETS)})")
        d = dict(PRESETS[name])
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> "FeatureConfig":
        """From a dict (or its JSON string); unknown keys are an error, missing keys take defaults."""
        if isinstance(d, (str, bytes)):
            d = json.loads(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigMismatchError(f"unknown feature config field(s): {', '.join(unknown)}")
        types = {"frontend": str, "dtype": str, "encoder": str, "encoder_spec": str, "sample_rate": int,
                 "n_fft": int, "win_length": int, "hop_length": int, "n_mels": int, "fmin": float,
                 "fmax": float, "log_offset": float}
        try:
            return cls(**{k: types[k](v) for k, v in d.items()})
        except (TypeError, ValueError) as e:
            raise UsageError(f"bad feature config value: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def hash(self) -> str:
        """16 hex chars of sha256 over the fields that change the features (not `dtype`)."""
        d = {k: getattr(self, k) for k in _SEMANTIC_FIELDS}
        for k in ("fmin", "fmax", "log_offset"):
            d[k] = float(d[k])
        if self.encoder:
            d["encoder"] = json.loads(self.encoder)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes) -> "FeatureConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_encoder(self, spec: str) -> "FeatureConfig":
        """This encoder config built from `spec` instead of its stored one (the same files at other
        paths, e.g. `predict --encoder SPEC` on another machine): the identity, file sha256s
        included, must be the stored one, else ConfigMismatchError."""
        if self.frontend != "encoder":
            raise UsageError(f"--encoder {spec}: these features are {self.frontend}, not an encoder's")
        from pllcli.encoders import cached_encoder
        cached_encoder(spec, self.encoder, what=f"--encoder {spec} vs the stored encoder")
        return dataclasses.replace(self, encoder_spec=spec)

    # ------------------------------------------------------------ geometry
    def validate(self) -> None:
        if self.frontend not in FRONTENDS:
            raise UsageError(f"feature frontend must be one of {', '.join(FRONTENDS)}, got {self.frontend!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"feature dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for k in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            if getattr(self, k) < 1:
                raise UsageError(f"feature config {k} must be >= 1, got {getattr(self, k)}")
        if (self.frontend == "encoder") != bool(self.encoder):
            raise UsageError("feature config: frontend 'encoder' goes with an encoder identity, and only it")
        if self.frontend == "logmel" and self.win_length > self.n_fft:
            raise UsageError(f"win_length {self.win_length} > n_fft {self.n_fft}")
        if self.frontend == "fbank" and self.n_fft != _pow2(self.win_length):
            raise UsageError(f"fbank: n_fft must be the next power of two of win_length "
                             f"({_pow2(self.win_length)}), got {self.n_fft}")
        if not self.log_offset > 0:
            raise UsageError(f"log_offset must be > 0, got {self.log_offset}")
        hi = self.fmax_hz
        if not 0 <= self.fmin < hi <= self.sample_rate / 2 + 1e-6:
            raise UsageError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin} "
                             f"fmax={self.fmax} at {self.sample_rate} Hz")

    @property
    def fmax_hz(self) -> float:
        return self.fmax if self.fmax > 0 else self.sample_rate / 2 + self.fmax

    @property
    def frame_length(self) -> int:
        """Samples covered by one frame (n_fft for logmel, win_length for fbank)."""
        return self.n_fft if self.frontend == "logmel" else self.win_length

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a clip of `num_samples` samples (>= 1 for any non-empty clip)."""
        if self.frontend == "encoder":
            from pllcli.encoders import identity_num_frames
            return identity_num_frames(_identity(self.encoder), num_samples)
        if num_samples <= self.frame_length:
            return 1
        return 1 + (num_samples - self.frame_length) // self.hop_length

    def frame_timeline(self, duration: float, num_out: int) -> tuple[float, float]:
        """(hop, offset) in seconds of a model's `num_out` output frames over a clip of `duration`
        seconds: output frame j covers [offset + j hop, offset + (j + 1) hop) of the clip.

        Log-mel and fbank frames keep the convention of `pllcli.events` (hop = duration / num_out,
        offset 0; their true offset, half a window, is under one frame). Encoder frames are placed
        where their windows are: a model that strides r input frames into one output frame has
        hop = r x the encoder hop, and frame 0 starts `identity_frame_offset` into the clip, half
        a receptive field late for speech_embedding (see `pllcli.events.on_clip_timeline`)."""
        num_out = max(1, int(num_out))
        if self.frontend != "encoder":
            return float(duration) / num_out, 0.0
        from pllcli.encoders import identity_frame_offset
        samples = max(1, int(round(float(duration) * self.sample_rate)))
        stride = self.num_frames(samples) / num_out
        return stride * self.hop_length / self.sample_rate, identity_frame_offset(_identity(self.encoder), samples)

    def make_frontend(self):
        """torch nn.Module: waveform (B, S) float at `sample_rate` -> features (B, T, n_mels) float32."""
        if self.frontend == "encoder":
            from pllcli.encoders import cached_encoder
            return cached_encoder(self.encoder_spec, self.encoder).as_module()
        from pllcli.features.frontend import build_frontend
        return build_frontend(self)

    def summary(self) -> str:
        if self.frontend == "encoder":
            e = json.loads(self.encoder)
            return (f"encoder {e['kind']} {e['name']}" + (f" layer {e['layer']}" if e.get("layer") else "")
                    + f": {self.sample_rate} Hz, {self.n_mels}-dim frames at {e['frame_rate']:g} Hz, {self.dtype}")
        return (f"{self.frontend} {self.sample_rate} Hz, {self.n_mels} mels, "
                f"win {self.win_length}/hop {self.hop_length} (n_fft {self.n_fft}), "
                f"{self.fmin:g}-{self.fmax_hz:g} Hz, {self.dtype}")


@functools.lru_cache(maxsize=8)
def _identity(encoder_json: str) -> dict:
    """An encoder identity parsed once (frame geometry is asked per item); do not mutate it."""
    return json.loads(encoder_json)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


PRESETS: dict[str, dict[str, Any]] = {
    # 8 kHz speech (FSDD, chat-fsdd): 25 ms / 10 ms, 64 mels up to Nyquist. n_fft 512 so that
    # the lowest mel filters still cover at least one FFT bin.
    "speech8k": dict(frontend="logmel", sample_rate=8000, n_fft=512, win_length=200, hop_length=80,
                     n_mels=64, fmin=20.0, fmax=4000.0, log_offset=1e-6),
    # 16 kHz speech: 64 mels, 25 ms / 10 ms.
    "speech16k": dict(frontend="logmel", sample_rate=16000, n_fft=512, win_length=400, hop_length=160,
                      n_mels=64, fmin=20.0, fmax=8000.0, log_offset=1e-6),
    # Kaldi-style fbank variants (40 bins, the usual Kaldi choice at these rates).
    "fbank8k": dict(frontend="fbank", sample_rate=8000, n_fft=256, win_length=200, hop_length=80,
                    n_mels=40, fmin=20.0, fmax=0.0, log_offset=KALDI_EPS),
    "fbank16k": dict(frontend="fbank", sample_rate=16000, n_fft=512, win_length=400, hop_length=160,
                     n_mels=64, fmin=20.0, fmax=0.0, log_offset=KALDI_EPS),
}
AUTO_PRESET = "auto"   # featurize's default: speech16k or speech8k by the rates of the first files
AUTO_FILES = 16        # files whose header rates --preset auto reads


@dataclass(frozen=True)
class AutoPreset:
    """featurize's `--preset auto`: the preset is chosen from the input's first AUTO_FILES files
    (`choose`), then `overrides` (config_from_options keywords, None = keep) apply to it."""
    overrides: dict = dataclasses.field(default_factory=dict)

    def choose(self, rates: "list[int | None]") -> tuple[FeatureConfig, str, str]:
        """(config, preset name, one-line notice) for the header rates of the first files (None = unreadable)."""
        name, notice = auto_preset(rates)
        return config_from_options(name, **self.overrides), name, notice


def auto_preset(rates: "list[int | None]") -> tuple[str, str]:
    """(preset, notice): speech16k if every readable rate is >= 16 kHz, else speech8k."""
    seen = [r for r in rates if r]
    counts: dict[int, int] = {}
    for r in seen:
        counts[r] = counts.get(r, 0) + 1
    listed = ", ".join(f"{r} Hz" + (f" x{n}" if len(counts) > 1 else "") for r, n in sorted(counts.items()))
    many = len(rates) > 1
    what = f"the first {len(rates)} files" if many else "the input file"
    if seen and min(seen) >= 16000:
        name, why = "speech16k", f"{what} {'are all' if many else 'is'} >= 16 kHz ({listed})"
    elif seen and max(seen) < 16000:
        name, why = "speech8k", f"{what} {'are all' if many else 'is'} below 16 kHz ({listed})"
    elif seen:
        name, why = "speech8k", f"{what} include rates below 16 kHz ({listed}); higher rates are resampled to 8 kHz"
    else:
        name, why = "speech8k", f"no sample rate could be read from {what}"
    return name, f"featurize: preset {name} (auto: {why}); pass --preset {'|'.join(PRESETS)} to choose"


def config_from_options(preset: str, **overrides) -> FeatureConfig:
    """The preset with featurize's command-line overrides (None = keep the preset's), where an
    override implies others: an fbank window sets n_fft to its next power of two, and a lower
    sample rate pulls the preset's fmax down to Nyquist."""
    base = FeatureConfig.preset(preset)
    o = {k: v for k, v in overrides.items() if v is not None}
    if o.get("frontend", base.frontend) == "fbank" and "n_fft" not in o and ("win_length" in o or "frontend" in o):
        o["n_fft"] = _pow2(o.get("win_length", base.win_length))
    sr = o.get("sample_rate")
    if sr is not None and "fmax" not in o and base.fmax > sr / 2:
        o["fmax"] = sr / 2
    return FeatureConfig.preset(preset, **o)


def encoder_config(spec: str, dtype: str | None = None) -> FeatureConfig:
    """The config of a store of an encoder's frames (featurize --encoder SPEC); the encoder is
    built once here and reused by every chunk of the run."""
    from pllcli.encoders import cached_encoder, feature_fields
    return FeatureConfig(**feature_fields(cached_encoder(spec)), dtype=dtype or "float32")


def _as_dict(c: "dict | FeatureConfig | str") -> dict[str, Any]:
    if isinstance(c, FeatureConfig):
        return c.to_dict()
    if isinstance(c, (str, bytes)):
        return json.loads(c)
    return dict(c)


def check_compatible(expected: "dict | FeatureConfig", actual: "dict | FeatureConfig", what: str) -> None:
    """Raise ConfigMismatchError naming every differing field (dtype, the storage precision, is ignored).

    `what` names the thing being checked, e.g. "feature store runs/x.h5 vs checkpoint m.pt".
    """
    e, a = _as_dict(expected), _as_dict(actual)
    diffs = []
    for k in _SEMANTIC_FIELDS:
        ev, av = e.get(k, getattr(FeatureConfig, k, None)), a.get(k, getattr(FeatureConfig, k, None))
        if isinstance(ev, (int, float)) and isinstance(av, (int, float)) and not isinstance(ev, bool):
            same = math.isclose(float(ev), float(av), rel_tol=1e-6, abs_tol=1e-12)
        else:
            same = ev == av
        if not same:
            diffs.append(f"{k} expected {ev!r} got {av!r}")
    if diffs:
        raise ConfigMismatchError(f"{what}: feature config differs: " + "; ".join(diffs))
    if (e.get("encoder") or "") != (a.get("encoder") or ""):
        from pllcli.encoders import check_identity
        check_identity(json.loads(e.get("encoder") or "null"), json.loads(a.get("encoder") or "null"), what)
