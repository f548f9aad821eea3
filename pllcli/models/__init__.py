"""Model registry.

Every model maps log-mel features `x` (B, T, F) and `lengths` (B,) (frames, or None for
all-full) to a dict with `"logits"` (B, C), `"embedding"` (B, D) and, for frame-level models,
`"frame_logits"` (B, T', C). Each model has `.encoder` (everything before the head; its
forward returns `{"embedding": (B, D), "frames": (B, T', D'), "frame_lengths": (B,)}`),
`.head` and `.config` (a JSON-able dict: `build_model(**model.config)` rebuilds it).

    build_model("convgru", n_mels=64, num_classes=100, width=32)
"""
from __future__ import annotations

from pllcli.models.registry import (  # noqa: F401
    build_model, list_models, model_builder, register_model)
from pllcli.models import convgru, crnn, densenet, mobilenet, pooled, whenwho  # noqa: E402,F401  (builtin models)
