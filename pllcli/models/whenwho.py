"""The WHEN/WHO network (Morfi & Stowell) and its transcription.

WHEN is class-agnostic frame-level event detection; WHO is clip-level tagging. The
transcription (what `predict` outputs as frame scores) is
``P(class c active at frame t) = P_WHEN(t) * P_WHO(c)``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pllcli.losses import mil
from pllcli.models.registry import register_model
from pllcli.models.base import InputNorm, run_trunk


def _trunk(n_mels: int, width: int, depth: int, time_stride: int) -> tuple[nn.Sequential, int]:
    """Conv blocks (3x3 conv, BN, ReLU) pooling frequency by 2 (time by `time_stride` once)."""
    layers, cin, f = [], 1, n_mels
    for i in range(depth):
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                   nn.MaxPool2d((time_stride if i == 0 else 1, 2 if f >= 2 else 1))]
        f = f // 2 if f >= 2 else f
        cin = width
    return nn.Sequential(*layers), width * f


class Trunk(nn.Module):
    """Input norm + conv trunk: (B, T, F) -> (B, T', D)."""

    def __init__(self, n_mels: int, width: int, depth: int, time_stride: int):
        super().__init__()
        self.norm = InputNorm(n_mels)
        self.time_stride = int(time_stride)
        self.conv, self.out_dim = _trunk(n_mels, width, depth, time_stride)

    def forward(self, x, lengths=None):
        return self.forward_lengths(x, lengths)[0]

    def forward_lengths(self, x, lengths=None):
        """-> (h (B, T', D), frame lengths (B,)); padded frames never reach valid ones (`run_trunk`)."""
        h, lens = run_trunk(self.conv, self.norm(x), lengths, self.time_stride)  # (B, W, T', F')
        B, W, T, Fp = h.shape
        return h.permute(0, 2, 1, 3).reshape(B, T, W * Fp), lens


class WhenWhoNet(nn.Module):
    """WHEN (BiGRU + time-distributed dense -> 1 frame logit) and WHO (BiGRU, masked mean+max
    pooling over time, dense -> C clip logits; the paper's WHO is conv + GAP, the GRU adds the
    context a spoken word needs) over one shared conv trunk (`shared=True`, joint/tied) or two.

    forward(x (B, T, F), lengths) -> dict:
      logits (B, C) WHO clip logits; when_frame_logits (B, T'); when_frames (B, T', H) (the
      WHEN frame embeddings attention pooling reads); when_clip_attention (B,) (the WHEN clip
      probability by attention pooling); frame_lengths (B,); frame_logits (B, T', C)
      = logit(sigmoid(when) * sigmoid(who)), the transcription; embedding (B, D).
    """

    def __init__(self, n_mels: int, num_classes: int, width: int = 32, depth: int = 3,
                 rnn_hidden: int = 32, time_stride: int = 2, shared: bool = True, dropout: float = 0.1):
        super().__init__()
        self.n_mels, self.num_classes, self.shared = n_mels, num_classes, bool(shared)
        self.time_stride = int(time_stride)
        self.trunk_when = Trunk(n_mels, width, depth, time_stride)
        self.trunk_who = self.trunk_when if shared else Trunk(n_mels, width, depth, time_stride)
        d = self.trunk_when.out_dim
        self.rnn = nn.GRU(d, rnn_hidden, batch_first=True, bidirectional=True)
        self.when_dense = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * rnn_hidden, 32), nn.ReLU(inplace=True))
        self.when_out = nn.Linear(32, 1)
        self.when_att = mil.AttentionPool(32, 1)
        self.who_rnn = nn.GRU(d, rnn_hidden, batch_first=True, bidirectional=True)
        self.who_out = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * rnn_hidden, num_classes))
        self.encoder = self.trunk_when if shared else nn.ModuleDict({"when": self.trunk_when, "who": self.trunk_who})
        self.head = nn.ModuleDict({"when": nn.ModuleList([self.rnn, self.when_dense, self.when_out]),
                                   "who": nn.ModuleList([self.who_rnn, self.who_out])})
        self.config = {"name": "whenwho", "n_mels": n_mels, "num_classes": num_classes, "width": width,
                       "depth": depth, "rnn_hidden": rnn_hidden, "time_stride": time_stride,
                       "shared": bool(shared), "dropout": dropout}

    def set_input_stats(self, mean, std) -> None:
        self.trunk_when.norm.set_stats(mean, std)
        if not self.shared:
            self.trunk_who.norm.set_stats(mean, std)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters each task trains: WHEN = its trunk + GRU/dense; WHO = its trunk + dense."""
        when = list(self.trunk_when.parameters()) + list(self.rnn.parameters()) + \
            list(self.when_dense.parameters()) + list(self.when_out.parameters()) + list(self.when_att.parameters())
        who = list(self.trunk_who.parameters()) + list(self.who_rnn.parameters()) + list(self.who_out.parameters())
        return {"when": when, "who": who}

    def forward_when(self, x, lengths=None):
        h, lens = self.trunk_when.forward_lengths(x, lengths)
        e = self.when_dense(_run_rnn(self.rnn, h, lens))
        z = self.when_out(e).squeeze(-1)
        # the attention-pooled clip probability, inside forward so that DDP sees when_att used
        att = self.when_att(torch.sigmoid(z), e, mil.lengths_to_mask(lens, z.shape[1]))
        return {"when_frame_logits": z, "when_frames": e, "frame_lengths": lens, "when_clip_attention": att,
                "when_embedding": h}

    def forward_who(self, x, lengths=None):
        h, lens = self.trunk_who.forward_lengths(x, lengths)
        T = h.shape[1]
        r = _run_rnn(self.who_rnn, h, lens)
        mask = mil.lengths_to_mask(lens, T)
        emb = torch.cat([mil.mean_pool(r, mask), mil.max_pool(r, mask)], dim=-1)
        return {"logits": self.who_out(emb), "embedding": emb, "frame_lengths": lens}

    def forward(self, x, lengths=None, part: str | None = None):
        """Both heads and the transcription; `part="when"|"who"` runs only that branch (so a
        training step on one task still goes through `forward`, as DistributedDataParallel needs)."""
        if part == "when":
            return self.forward_when(x, lengths)
        if part == "who":
            return self.forward_who(x, lengths)
        out = self.forward_when(x, lengths)
        out.update(self.forward_who(x, lengths))
        out.pop("when_embedding")
        out["frame_logits"] = transcription_logits(out["when_frame_logits"], out["logits"])
        return out


def _run_rnn(rnn: nn.GRU, h: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    packed = nn.utils.rnn.pack_padded_sequence(h, lens.cpu(), batch_first=True, enforce_sorted=False)
    r, _ = rnn(packed)
    return nn.utils.rnn.pad_packed_sequence(r, batch_first=True, total_length=h.shape[1])[0]


def transcription_logits(when_frame_logits: torch.Tensor, who_logits: torch.Tensor) -> torch.Tensor:
    """logit(sigmoid(when_t) * sigmoid(who_c)): (B, T'), (B, C) -> (B, T', C), computed in log space."""
    logp = F.logsigmoid(when_frame_logits).unsqueeze(-1) + F.logsigmoid(who_logits).unsqueeze(1)
    logp = logp.clamp(max=-1e-7)
    return logp - torch.log(-torch.expm1(logp))


def transcription(when_probs: np.ndarray, who_probs: np.ndarray) -> np.ndarray:
    """Frame-by-class transcription: WHEN frame prob (T,) or (N, T) x WHO clip prob (C,) or (N, C)."""
    w, c = np.asarray(when_probs), np.asarray(who_probs)
    return w[..., :, None] * c[..., None, :]


@register_model("whenwho", "WHEN/WHO (Morfi & Stowell): conv trunk, BiGRU WHEN detector + GAP WHO tagger")
def whenwho(n_mels: int, num_classes: int, **kw):
    return WhenWhoNet(n_mels, num_classes, **kw)


whenwho.__spec_target__ = WhenWhoNet  # pllcli.spec reads the option keys and types from the class
