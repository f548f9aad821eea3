"""A light head for pretrained-encoder frames (`featurize --encoder`): no conv trunk, no time
stride; per-frame projection (optional), optional BiGRU, then masked mean+max (or attention)
pooling and a linear head.

With the defaults (`hidden=0`, `rnn_hidden=0`) it is a linear classifier on the mean and max of
the standardised frames, the model behind the logistic-regression rows of
`examples/bench_encoder.py`; `hidden=H` adds a per-frame Linear + LayerNorm + GELU (a small MLP).
Speech_embedding frames come at 12.5 Hz, so an FSDD digit is only ~10 frames: the convgru stem's
x4 time stride leaves 2-3.
"""
from __future__ import annotations

from torch import nn

from pllcli.models.registry import register_model
from pllcli.models.base import Classifier, Encoder


@register_model("pooled", "for encoder frames: optional per-frame MLP / BiGRU + mean+max pooling + linear head")
def pooled(n_mels: int, num_classes: int, hidden: int = 0, rnn_hidden: int = 0, pool: str = "stats",
           dropout: float = 0.1, utt_norm: bool = False):
    """`hidden` > 0: per-frame Linear(n_mels, hidden) + LayerNorm + GELU; `rnn_hidden` > 0: a BiGRU;
    `pool`: stats (masked mean + max) or attention (attention + mean); `utt_norm`: subtract each
    clip's mean frame (see `Encoder`)."""
    if pool not in ("stats", "attention"):
        raise TypeError(f"pool must be stats or attention, got {pool!r}")
    if hidden < 0 or rnn_hidden < 0:
        raise TypeError("hidden and rnn_hidden must be >= 0")
    enc = Encoder(n_mels, nn.Identity(), stride=1, rnn_hidden=rnn_hidden, proj=hidden, pool=pool,
                  dropout=dropout, utt_norm=utt_norm)
    return Classifier(enc, num_classes, dropout=dropout)
