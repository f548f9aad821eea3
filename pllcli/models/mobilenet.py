"""MobileNetV2-style encoder (PSL paper): inverted residual blocks (1x1 expand, 3x3 depthwise,
1x1 linear projection) with a width multiplier; x4 in time; attention pooling."""
from __future__ import annotations

from torch import nn

from pllcli.models.registry import register_model
from pllcli.models.base import Classifier, Encoder, FrameMask, conv_bn, run_masked


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride, expand: int):
        super().__init__()
        hid = cin * expand
        self.use_res = stride == (1, 1) and cin == cout
        self.block = nn.Sequential(conv_bn(cin, hid, k=1), conv_bn(hid, hid, stride=stride, groups=hid),
                                   conv_bn(hid, cout, k=1, act=False))

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)

    def forward_masked(self, x, fm: FrameMask):
        y = run_masked(self.block, x, fm)
        return x + y if self.use_res else y


@register_model("mobilenetv2", "MobileNetV2-style inverted residuals (PSL paper), x4 in time")
def mobilenetv2(n_mels: int, num_classes: int, width: int = 16, expand: int = 4, depth: int = 2,
                rnn_hidden: int = 0, dropout: float = 0.1):
    """Stages (channels, first stride): (w, 2x2), (1.5w, 2x2), (2w, 1x2), (4w, 1x2); `depth` blocks each."""
    mods = [conv_bn(1, width, stride=(2, 2))]
    c = width
    for mult, stride in ((1, (1, 1)), (1.5, (2, 2)), (2, (1, 2)), (4, (1, 2))):
        cout = int(width * mult)
        for i in range(depth):
            mods.append(InvertedResidual(c, cout, stride if i == 0 else (1, 1), expand))
            c = cout
    enc = Encoder(n_mels, nn.Sequential(*mods), stride=4, rnn_hidden=rnn_hidden, proj=0,
                  pool="attention", dropout=dropout)
    return Classifier(enc, num_classes, dropout=dropout)
