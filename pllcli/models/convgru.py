"""Default model: a cheap strided conv stem (time stride 4: 100 -> 25 frames/s) + BiGRU + attention pooling.

About 0.1 M parameters at width 8 (channels 8-16-32); ~8 s per epoch of 4.8k 2-s clips on 2 CPU cores; order-aware ("four seven" != "seven four") through the GRU.
"""
from __future__ import annotations

from torch import nn

from pllcli.models.registry import register_model
from pllcli.models.base import Classifier, Encoder, conv_bn


@register_model("convgru", "default: strided conv stem (x4 in time) + BiGRU + attention pooling; cheap on CPU")
def convgru(n_mels: int, num_classes: int, width: int = 8, depth: int = 3, rnn_hidden: int = 64,
            rnn_layers: int = 1, proj: int = 64, dropout: float = 0.1, utt_norm: bool = False):
    """Channels width, 2*width, 4*width, ...; the first two convs stride (2, 2), the rest (1, 2).
    `utt_norm=true` subtracts each clip's mean (see `Encoder`)."""
    if depth < 2:
        raise TypeError("depth must be >= 2")
    layers, cin = [], 1
    for i in range(depth):
        cout = width * 2 ** min(i, 3)
        layers.append(conv_bn(cin, cout, stride=(2, 2) if i < 2 else (1, 2)))
        cin = cout
    enc = Encoder(n_mels, nn.Sequential(*layers), stride=4, rnn_hidden=rnn_hidden, rnn_layers=rnn_layers,
                  proj=proj, pool="attention", dropout=dropout, utt_norm=utt_norm)
    return Classifier(enc, num_classes, dropout=dropout)
