"""CRNN with frame-level outputs (Morfi & Stowell): conv blocks pooling mostly in frequency,
a BiGRU, and a time-distributed dense head -> frame_logits (B, T', C); clip logits are
attention-pooled frame logits."""
from __future__ import annotations

from torch import nn

from pllcli.models.registry import register_model
from pllcli.models.base import Classifier, Encoder, conv_bn


@register_model("crnn", "conv (freq pooling, x2 in time) + BiGRU + time-distributed dense; frame_logits")
def crnn(n_mels: int, num_classes: int, width: int = 32, depth: int = 3, rnn_hidden: int = 64,
         rnn_layers: int = 1, dropout: float = 0.1, time_stride: int = 2):
    layers, cin = [], 1
    for i in range(depth):
        ts = time_stride if i == 0 else 1
        layers += [conv_bn(cin, width, stride=(1, 1)), nn.MaxPool2d((ts, 2 if i < 2 else 2))]
        cin = width
    enc = Encoder(n_mels, nn.Sequential(*layers), stride=time_stride, rnn_hidden=rnn_hidden,
                  rnn_layers=rnn_layers, proj=0, pool="stats", dropout=dropout)
    return Classifier(enc, num_classes, frame_level=True, dropout=dropout)
