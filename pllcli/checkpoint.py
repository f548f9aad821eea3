"""Checkpoints: a `torch.save`d dict of tensors plus a JSON string `meta`, loaded with
`torch.load(..., weights_only=True)` so that a file carrying a pickle payload is refused.

Layout: {"format": "pllcli-checkpoint", "meta": "<json>", "state": {name: tensor}, **extra}
where `extra` holds only tensors, numbers, strings, lists and dicts (optimizer state, RNG
state, objective buffers for --resume).

meta: kind ("classifier" | "encoder"), model ({"name", "n_mels", "num_classes", **kwargs}),
classes, task, feature_config, feature_config_hash, train (args), epoch, metrics.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pllcli.errors import CheckpointError, ConfigMismatchError

FORMAT = "pllcli-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, model, meta: dict, extra: dict | None = None) -> None:
    """Atomically write `model`'s state dict (a module or a state dict) with `meta` (JSON-able)."""
    import torch
    from pllcli.io import _json_default, atomic_path
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu() for k, v in state.items()}
    meta = dict(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    if not isinstance(model, dict) and "model" not in meta and hasattr(model, "config"):
        meta["model"] = model.config
    obj = {"format": FORMAT, "meta": json.dumps(meta, default=_json_default), "state": state}
    for k, v in (extra or {}).items():
        if k in obj:
            raise ValueError(f"extra key {k!r} is reserved")
        _check_plain(v, k)
        obj[k] = v
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)


_PLAIN = (int, float, str, bool, type(None))


def _check_plain(obj, where: str) -> None:
    """TypeError naming the key path of anything `torch.load(weights_only=True)` would refuse
    (so a checkpoint that cannot be loaded is never written)."""
    import torch
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, _PLAIN):
                raise TypeError(f"checkpoint extra {where}: key of type {type(k).__name__} is not plain")
            _check_plain(v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, (torch.Tensor, torch.dtype, torch.device, torch.Size) + _PLAIN) or (
            isinstance(obj, _PLAIN) and type(obj) not in _PLAIN):  # e.g. an Enum that subclasses str
        raise TypeError(f"checkpoint extra {where}: a {type(obj).__module__}.{type(obj).__name__} would be "
                        "pickled; store plain tensors, numbers, strings, lists and dicts only")


def load_checkpoint(path: str | os.PathLike, with_extra: bool = False):
    """(state, meta) — or (state, meta, extra) with `with_extra`. Refuses pickles and foreign files."""
    import pickle
    import torch
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory (give best.pt, last.pt or averaged.pt inside it)")
    import zipfile
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive; anything else is foreign
        raise CheckpointError(f"{p}: not a pllcli checkpoint (not a torch.save archive)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{p}: refused to load: not a plain-tensor checkpoint "
                              f"(it carries pickled objects; {first[:120]})") from None
    except Exception as e:  # noqa: BLE001 - the restricted unpickler fails in many ways on foreign bytes
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint ({msg[:160]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "meta" not in obj or "state" not in obj:
        raise CheckpointError(f"{p}: not a pllcli checkpoint (no 'format'/'meta'/'state' entries)")
    try:
        meta = json.loads(obj["meta"])
    except (TypeError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: checkpoint metadata is not valid JSON") from None
    if int(meta.get("format_version", 1)) > FORMAT_VERSION:
        raise CheckpointError(f"{p}: checkpoint format version {meta['format_version']} is newer than "
                              f"this pllcli supports ({FORMAT_VERSION}); upgrade pllcli")
    state = obj["state"]
    if with_extra:
        extra = {k: v for k, v in obj.items() if k not in ("format", "meta", "state")}
        return state, meta, extra
    return state, meta


def model_from_meta(meta: dict, path: str | os.PathLike = "<checkpoint>"):
    from pllcli.models import build_model
    cfg = dict(meta.get("model") or {})
    try:
        name, n_mels, nc = cfg.pop("name"), cfg.pop("n_mels"), cfg.pop("num_classes")
    except KeyError as e:
        raise CheckpointError(f"{path}: checkpoint metadata lacks model field {e.args[0]!r}") from None
    from pllcli.errors import UsageError
    try:
        return build_model(name, n_mels, nc, **cfg)
    except UsageError as e:  # unknown model name or options: a property of this file, not of the command
        raise CheckpointError(f"{path}: cannot rebuild the checkpoint's model: {e}") from None


def load_model(path: str | os.PathLike, device: str = "cpu", kind: str | None = "classifier"):
    """(model in eval mode on `device`, meta). `kind` (if given) must match meta['kind']."""
    state, meta = load_checkpoint(path)
    if kind is not None and meta.get("kind", "classifier") != kind:
        raise CheckpointError(f"{path}: is a {meta.get('kind')!r} checkpoint, need a {kind!r} one"
                              + (" (train a classifier from it with `pllcli train --init`)"
                                 if meta.get("kind") == "encoder" else ""))
    model = model_from_meta(meta, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {meta['model'].get('name')!r} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval(), meta


def encoder_state(state: dict, meta: dict) -> dict:
    """Encoder weights from a classifier or encoder checkpoint (keys without the 'encoder.' prefix)."""
    if meta.get("kind") == "encoder":
        return {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state.items()}
    return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}


def check_feature_config(meta: dict, actual, what: str, path=None) -> None:
    """Raise ConfigMismatchError if the store's feature config differs from the checkpoint's."""
    expected = meta.get("feature_config")
    if not expected:
        return
    try:
        from pllcli.features.config import check_compatible
    except ImportError:  # pragma: no cover - features area not there yet
        check_compatible = None
    actual_d = actual.to_dict() if hasattr(actual, "to_dict") else dict(actual)
    if check_compatible is not None:
        check_compatible(expected, actual_d, what)
        return
    diff = sorted(k for k in set(expected) | set(actual_d) if expected.get(k) != actual_d.get(k))
    if diff:
        raise ConfigMismatchError(f"{what}: feature config differs from the checkpoint's in "
                                  + ", ".join(f"{k} ({expected.get(k)!r} vs {actual_d.get(k)!r})" for k in diff[:5]))


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Summary for `pllcli info`: kind, model, parameter count, classes, task, epoch, metrics."""
    state, meta = load_checkpoint(path)
    n_params = int(sum(v.numel() for k, v in state.items()
                       if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                       and not k.endswith(("norm.mean", "norm.std"))))
    classes = meta.get("classes") or []
    return {
        "path": str(path), "format": FORMAT, "kind": meta.get("kind", "classifier"),
        "model": meta.get("model"), "parameters": n_params, "num_classes": len(classes),
        "classes": classes[:20] + (["..."] if len(classes) > 20 else []), "task": meta.get("task"),
        "feature_config_hash": meta.get("feature_config_hash"), "epoch": meta.get("epoch"),
        "metrics": meta.get("metrics", {}), "averaged_from": meta.get("averaged_from"),
        "deployed_from": meta.get("deployed_from"), "pllcli_version": meta.get("pllcli_version"),
    }
