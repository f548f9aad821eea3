"""The model registry: `register_model`, `build_model`, `list_models` (see pllcli.models)."""
from __future__ import annotations

from typing import Callable

from pllcli.errors import UsageError

_REGISTRY: dict[str, tuple[Callable, str]] = {}


def register_model(name: str, help: str = ""):
    """Class/function decorator: `@register_model("name")` adds a model builder."""
    def deco(fn):
        _REGISTRY[name] = (fn, help)
        return fn
    return deco


def model_builder(name: str) -> Callable:
    """The builder registered under `name` (UsageError listing the names otherwise)."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r} (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name][0]


def list_models() -> dict[str, str]:
    """{name: one-line description} of the registered models."""
    return {k: v[1] for k, v in sorted(_REGISTRY.items())}


def build_model(name: str, n_mels: int, num_classes: int, **kwargs):
    """Build a registered model; unknown names or options are a UsageError."""
    builder = model_builder(name)
    if int(num_classes) < 1 or int(n_mels) < 1:
        raise UsageError(f"model {name}: need n_mels >= 1 and num_classes >= 1")
    try:
        model = builder(n_mels=int(n_mels), num_classes=int(num_classes), **kwargs)
    except TypeError as e:
        raise UsageError(f"model {name}: bad option ({e})") from None
    model.config = {"name": name, "n_mels": int(n_mels), "num_classes": int(num_classes), **kwargs}
    return model
