"""CNN with DenseNet-style skip concatenations (FAT2019 write-up): dense blocks of 3x3 convs whose
outputs are concatenated, average-pool transitions, and masked mean+max pooling (optionally a BiGRU
before pooling for order-aware tasks)."""
from __future__ import annotations

import torch
from torch import nn

from pllcli.models.registry import register_model
from pllcli.models.base import Classifier, Encoder, FrameMask, conv_bn, run_masked


class DenseBlock(nn.Module):
    """(B, C, T, F) -> (B, C + n*growth, T, F): each layer sees the concatenation of all before."""

    def __init__(self, cin: int, growth: int, n: int):
        super().__init__()
        self.layers = nn.ModuleList(conv_bn(cin + i * growth, growth) for i in range(n))
        self.out_channels = cin + n * growth

    def forward(self, x):
        return self.forward_masked(x, None)

    def forward_masked(self, x, fm: FrameMask | None):
        for layer in self.layers:
            x = torch.cat([x, layer(x) if fm is None else run_masked(layer, x, fm)], dim=1)
        return x


@register_model("densenet", "CNN with DenseNet-style concatenations (FAT2019), x4 in time")
def densenet(n_mels: int, num_classes: int, width: int = 16, growth: int = 16, blocks: int = 3,
             layers_per_block: int = 3, rnn_hidden: int = 0, dropout: float = 0.1):
    mods = [conv_bn(1, width, stride=(2, 2))]
    c = width
    for b in range(blocks):
        blk = DenseBlock(c, growth, layers_per_block)
        c = blk.out_channels
        mods += [blk, conv_bn(c, c // 2, k=1), nn.AvgPool2d((2, 2) if b == 0 else (1, 2))]
        c //= 2
    enc = Encoder(n_mels, nn.Sequential(*mods), stride=4, rnn_hidden=rnn_hidden, proj=0,
                  pool="attention" if rnn_hidden else "stats", dropout=dropout)
    return Classifier(enc, num_classes, dropout=dropout)
