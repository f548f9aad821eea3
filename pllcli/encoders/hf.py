"""Hugging Face `transformers` speech encoders (wav2vec2, HuBERT, WavLM, data2vec-audio, ...).

`hf:REPO[,layer=N]` (e.g. `hf:microsoft/wavlm-base-plus,layer=6`) loads the model from the Hugging
Face cache (`$HF_HOME/hub`), downloading it there once when the machine has network;
`hf:DIR` loads a local `save_pretrained` folder. `layer` is the hidden state taken: 0 is the
transformer's input (the projected conv features), N the output of transformer layer N (default
the last). The feature extractor's `do_normalize` (zero mean, unit variance per clip) is applied
when the model's preprocessor config asks for it. Needs the `hf` extra (`pip install
'pllcli[hf]'`). Frames are (T', D) at sample_rate / prod(conv_stride).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pllcli.encoders import TorchModelEncoder, file_sha256, register
from pllcli.errors import CheckpointError, InputError, MissingExtraError, UsageError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("transformers", "hf", "a Hugging Face encoder (--encoder hf:...)") from None
    return transformers


def resolve_source(source: str) -> Path:
    """A local folder holding config.json and the weights: `source` itself, or the snapshot of repo
    `source` in the Hugging Face cache (downloaded there if missing and the network allows)."""
    p = Path(source)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError("not a saved transformers model (no config.json)", str(p))
        return p
    if source.count("/") > 1 or source.startswith((".", "/", "~")):   # a path, not an owner/name repo id
        raise InputError("encoder model folder not found", str(p))
    _transformers()
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the network once
        pass
    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", *WEIGHT_FILES]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, ...
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise InputError(f"cannot fetch Hugging Face model {source} ({reason}); pre-fetch it on a machine "
                         f"with network (`hf download {source}`) and copy the cache ($HF_HOME/hub) here, "
                         f"or give its save_pretrained folder (hf:DIR)") from None


def _conv_geometry(config) -> tuple[int, int]:
    """(receptive field, hop) in samples of the conv feature extractor."""
    rf, hop = 1, 1
    for k, s in zip(config.conv_kernel, config.conv_stride):
        rf += (int(k) - 1) * hop
        hop *= int(s)
    return rf, hop


@register("hf")
class HFEncoder(TorchModelEncoder):
    """A transformers audio model with a wav2vec2-style conv feature extractor."""

    positional_help = "REPO|DIR"

    def __init__(self, source: str | None = None, *, layer: int | None = None, name: str | None = None,
                 device: str = "cpu", **padding):
        import torch
        super().__init__(**padding)
        if source is None:
            raise UsageError("--encoder hf: give a model (hf:microsoft/wavlm-base-plus) or a save_pretrained "
                             "folder (hf:DIR)")
        tf = _transformers()
        tf.utils.logging.set_verbosity_error()      # no loading progress bars or notices in pllcli's output
        tf.utils.logging.disable_progress_bar()
        folder = resolve_source(source)
        weights = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
        if not weights:
            raise InputError(f"no weights ({' or '.join(WEIGHT_FILES)}) in the model folder", str(folder))
        try:
            config = tf.AutoConfig.from_pretrained(str(folder))
            model = tf.AutoModel.from_pretrained(str(folder))
        except Exception as e:  # noqa: BLE001 - unknown model type, bad weights, ...
            raise CheckpointError(f"{folder}: cannot load the transformers model: "
                                  f"{str(e).splitlines()[0][:160]}") from None
        if not hasattr(config, "conv_kernel") or not hasattr(config, "conv_stride"):
            raise UsageError(f"--encoder hf: {config.model_type} has no wav2vec2-style conv feature extractor "
                             f"(supported: wav2vec2, hubert, wavlm, data2vec-audio, ...)")
        self.num_layers = int(config.num_hidden_layers)
        if layer is not None and not 0 <= layer <= self.num_layers:
            raise UsageError(f"--encoder hf: layer must be 0..{self.num_layers} for {source}, got {layer}")
        self.layer = self.num_layers if layer is None else int(layer)
        pre = folder / "preprocessor_config.json"
        self.normalize_waveform, self.sample_rate = False, 16000
        if pre.is_file():
            import json
            pc = json.loads(pre.read_text())
            self.normalize_waveform = bool(pc.get("do_normalize", False))
            self.sample_rate = int(pc.get("sampling_rate", 16000))
        self.model_type = str(config.model_type)
        self.name = name or (Path(source).name if Path(source).is_dir() else source)
        self.weights_sha256 = file_sha256(weights[0])
        self.model = model.eval().to(device)
        self.device = device
        self.min_samples, self.hop = _conv_geometry(config)
        with torch.inference_mode():
            self.dim = int(self._embed_padded(np.zeros(self.min_samples, np.float32)).shape[1])

    def _declared(self) -> dict:
        return {"sha256": {"weights": self.weights_sha256}, "layer": int(self.layer),
                "num_layers": int(self.num_layers), "model_type": self.model_type,
                "normalisation": "per_clip_zero_mean_unit_var" if self.normalize_waveform else "none"}

    def _forward(self, x):
        """(B, S) tensor -> (B, T', D): hidden state `self.layer`."""
        if self.normalize_waveform:
            x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + 1e-7).sqrt()
        out = self.model(x, output_hidden_states=True)
        return out.hidden_states[self.layer]
