"""torchaudio pipeline bundles (WAV2VEC2_BASE, HUBERT_BASE, WAVLM_BASE, ...) as encoders.

`torchaudio:BUNDLE[,layer=N]` downloads the bundle's weights once into the torch hub cache
(`$TORCH_HOME/hub/checkpoints/`, default ~/.cache/torch/hub) and runs offline afterwards.
`weights=PATH` loads the bundle's architecture with a local state file instead.
`torchaudio:PATH.pt` is a local model file: a weights-only `torch.save` dict of tensors plus a
`meta` JSON string {"model_type": "Wav2Vec2"|"WavLM", "params": {wav2vec2_model kwargs},
"sample_rate": 16000} (see `save_local_model`). `layer` is the transformer layer whose output
is taken (1-based; default the last). Frames are (T', D) at sample_rate / 320 for the usual
conv stack.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pllcli.encoders import TorchModelEncoder, file_sha256, register
from pllcli.errors import CheckpointError, InputError, UsageError

TORCHAUDIO_URL = "https://download.pytorch.org/torchaudio/models/"


def hub_checkpoint_dir() -> Path:
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints"


def _bundle(name: str):
    from torchaudio import pipelines
    b = getattr(pipelines, name, None) if name.isupper() else None
    if b is not None and hasattr(b, "get_labels"):
        raise UsageError(f"--encoder torchaudio: {name} is a fine-tuned ASR bundle; use a pretrained one "
                         f"(e.g. WAV2VEC2_BASE, HUBERT_BASE, WAVLM_BASE)")
    if b is None or not hasattr(b, "get_model") or not hasattr(b, "_params"):
        known = sorted(n for n in dir(pipelines) if n.isupper() and hasattr(getattr(pipelines, n), "_params")
                       and not hasattr(getattr(pipelines, n), "get_labels"))
        raise UsageError(f"--encoder torchaudio: unknown bundle {name!r} (e.g. {', '.join(known[:8])}, ...)")
    return b


def fetch_bundle_weights(name: str) -> Path:
    """The cached weight file of bundle `name`, downloaded into the torch hub cache if missing.

    Offline, raises one InputError line saying where to put the file.
    """
    import torch
    url = _bundle(name)._path
    url = url if url.startswith("https") else TORCHAUDIO_URL + url
    dst = hub_checkpoint_dir() / os.path.basename(url)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=False)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        reason = str(getattr(e, "reason", None) or e).splitlines()[0][:120]
        raise InputError(f"cannot download the weights of torchaudio bundle {name} ({reason}); "
                         f"pre-fetch them: run once with network, or copy {url} to {dst} "
                         f"(the torch hub cache, $TORCH_HOME/hub/checkpoints/)") from None
    return dst


def save_local_model(path, model, params: dict, model_type: str = "Wav2Vec2", sample_rate: int = 16000) -> None:
    """Write a local model file for `torchaudio:PATH.pt` (weights-only loadable)."""
    import torch
    from pllcli.io import atomic_path
    meta = {"model_type": model_type, "params": params, "sample_rate": int(sample_rate)}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": json.dumps(meta)}, str(tmp))


def _load_state(path: Path) -> tuple[dict, dict]:
    import torch
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with code, truncated files, ...
        raise CheckpointError(f"{path}: cannot load encoder weights safely: {str(e).splitlines()[0][:160]}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = json.loads(obj.get("meta") or "{}")
        return obj["state_dict"], meta
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj, {}


def _factory(model_type: str):
    from torchaudio.models import wav2vec2_model, wavlm_model
    factories = {"Wav2Vec2": wav2vec2_model, "WavLM": wavlm_model}
    if model_type not in factories:
        raise CheckpointError(f"unknown encoder model_type {model_type!r} (choose from {', '.join(factories)})")
    return factories[model_type]


def _receptive_field(model) -> tuple[int, int]:
    """(min_samples, hop) of the conv feature extractor."""
    rf, hop = 1, 1
    for layer in model.feature_extractor.conv_layers:
        k, s = int(layer.conv.kernel_size[0]), int(layer.conv.stride[0])
        rf += (k - 1) * hop
        hop *= s
    return rf, hop


@register("torchaudio")
class TorchaudioEncoder(TorchModelEncoder):
    """A wav2vec2-family model; `source` is a bundle name or a local model file (.pt)."""

    positional_help = "BUNDLE|PATH.pt"

    def __init__(self, source: str | None = None, *, layer: int | None = None, weights: str | None = None,
                 model=None, sample_rate: int = 16000, name: str | None = None, device: str = "cpu",
                 **padding):
        import torch
        super().__init__(**padding)
        self.normalize_waveform, self.weights_sha256 = False, None
        if model is not None:           # a model object (tests, library use)
            self.name = name or type(model).__name__
        elif source is None:
            raise UsageError("--encoder torchaudio: give a bundle name (torchaudio:WAV2VEC2_BASE) or a "
                             "local model file (torchaudio:PATH.pt)")
        elif source.isupper() and not Path(source).exists():
            model = self._from_bundle(source, weights)
        else:
            model = self._from_file(Path(source))
            sample_rate = self._meta_rate or sample_rate
        self.name = name or self.name
        self.model = model.eval().to(device)
        self.device = device
        self.sample_rate = int(sample_rate)
        core = getattr(model, "model", model)  # _extend_model wraps the waveform normalisation
        self.num_layers = len(core.encoder.transformer.layers)
        if layer is not None and not 1 <= layer <= self.num_layers:
            raise UsageError(f"--encoder torchaudio: layer must be 1..{self.num_layers} for {self.name}, got {layer}")
        self.layer = layer or self.num_layers
        self.min_samples, self.hop = _receptive_field(core)
        with torch.inference_mode():
            self.dim = int(self._embed_padded(np.zeros(self.min_samples, np.float32)).shape[1])

    def _from_bundle(self, name: str, weights: str | None):
        b = _bundle(name)
        path = Path(weights) if weights else fetch_bundle_weights(name)
        if not path.is_file():
            raise InputError("encoder weights file not found", str(path))
        state, _ = _load_state(path)
        model = _factory(b._model_type)(**b._params)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit bundle {name}: {str(e).splitlines()[0][:160]}") from None
        if getattr(b, "_normalize_waveform", False):
            from torchaudio.pipelines._wav2vec2 import utils
            model = utils._extend_model(model, normalize_waveform=True)
            self.normalize_waveform = True
        self.name, self.weights_sha256 = name, file_sha256(path)
        return model

    def _from_file(self, path: Path):
        if not path.is_file():
            raise InputError("encoder model file not found", str(path))
        state, meta = _load_state(path)
        if "params" not in meta:
            raise CheckpointError(f"{path}: local encoder file has no meta.params (write it with "
                                  f"pllcli.encoders.torchaudio_bundle.save_local_model)")
        model = _factory(meta.get("model_type", "Wav2Vec2"))(**meta["params"])
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit meta.params: {str(e).splitlines()[0][:160]}") from None
        self._meta_rate = meta.get("sample_rate")
        self.name, self.weights_sha256 = path.stem, file_sha256(path)
        return model

    _meta_rate = None

    def _declared(self) -> dict:
        return {"sha256": {"weights": self.weights_sha256}, "layer": int(self.layer),
                "num_layers": int(self.num_layers),
                "normalisation": "waveform_layer_norm" if self.normalize_waveform else "none"}

    def _forward(self, x):
        """(B, S) tensor -> (B, T', D) output of transformer layer `self.layer`."""
        feats, _ = self.model.extract_features(x, num_layers=self.layer)
        return feats[-1]
