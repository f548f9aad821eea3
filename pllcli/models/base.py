"""Building blocks shared by the models: input normalisation, masks, pooling, the wrapper."""
from __future__ import annotations

import torch
from torch import nn


def length_mask(lengths: torch.Tensor | None, T: int, B: int, device) -> torch.Tensor:
    """(B, T) bool, True on valid frames."""
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    return torch.arange(T, device=device)[None, :] < lengths.to(device)[:, None]


def downsampled_lengths(lengths: torch.Tensor | None, factor: int, T_out: int, B: int, device):
    """Frame counts after a total time stride `factor` (ceil), clamped to [1, T_out]."""
    if lengths is None:
        return torch.full((B,), T_out, dtype=torch.long, device=device)
    return torch.div(lengths.to(device) + factor - 1, factor, rounding_mode="floor").clamp(1, T_out)


class InputNorm(nn.Module):
    """Per-mel-bin standardisation with buffers set from training data: (B, T, F) -> (B, T, F)."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))

    @torch.no_grad()
    def set_stats(self, mean, std) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-5))

    def forward(self, x):
        return (x - self.mean) / self.std


class AttentionPool(nn.Module):
    """Masked attention pooling (B, T, D) -> (B, D), concatenated with the masked mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.att = nn.Linear(dim, 1)

    def forward(self, h, mask):
        a = self.att(h).squeeze(-1).float().masked_fill(~mask, -1e4)
        w = torch.softmax(a, dim=1).to(h.dtype)
        att = torch.einsum("bt,btd->bd", w, h)
        m = mask.to(h.dtype)
        mean = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        return torch.cat([att, mean], dim=-1)


def masked_stats_pool(h, mask):
    """(B, T, D) -> (B, 2D): masked mean and masked max."""
    m = mask.to(h.dtype)[..., None]
    mean = (h * m).sum(1) / m.sum(1).clamp_min(1)
    mx = h.masked_fill(~mask[..., None], -1e4).amax(1)
    return torch.cat([mean, mx], dim=-1)


class Encoder(nn.Module):
    """Generic encoder: norm -> 2-D conv trunk (time stride `stride`) -> optional BiGRU -> pooling.

    `utt_norm`: also subtract each clip's own mean over its valid frames after the global
    normalisation (cepstral-mean-style normalisation): removes the channel and much of the
    speaker's long-term spectral envelope, which helps across speakers and microphones.

    forward(x (B, T, F), lengths) -> {"embedding": (B, D), "frames": (B, T', H), "frame_lengths": (B,)}
    """

    def __init__(self, n_mels: int, trunk: nn.Module, stride: int,
                 rnn_hidden: int = 0, rnn_layers: int = 1, proj: int = 0, pool: str = "attention",
                 dropout: float = 0.0, utt_norm: bool = False):
        super().__init__()
        self.norm = InputNorm(n_mels)
        self.utt_norm = bool(utt_norm)
        self.trunk = trunk
        self.stride = stride
        with torch.no_grad():
            was = trunk.training
            trunk.eval()
            c, f = trunk(torch.zeros(1, 1, 8 * stride, n_mels)).shape[1::2]
            trunk.train(was)
        d = c * f
        self.proj = nn.Sequential(nn.Linear(d, proj), nn.LayerNorm(proj), nn.GELU()) if proj else None
        d = proj or d
        self.rnn = None
        if rnn_hidden:
            self.rnn = nn.GRU(d, rnn_hidden, num_layers=rnn_layers, batch_first=True, bidirectional=True,
                              dropout=dropout if rnn_layers > 1 else 0.0)
            d = 2 * rnn_hidden
        self.frame_dim = d
        self.pool_kind = pool
        self.pool = AttentionPool(d) if pool == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.out_dim = 2 * d

    def forward(self, x, lengths=None):
        B, T, _ = x.shape
        x = self.norm(x)
        if self.utt_norm:
            m = length_mask(lengths, T, B, x.device)[..., None].to(x.dtype)
            x = (x - (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)) * m
        h = self.trunk(x.unsqueeze(1))                      # (B, C, T', F')
        Bc, C, Tp, Fp = h.shape
        h = h.permute(0, 2, 1, 3).reshape(B, Tp, C * Fp)   # (B, T', C*F')
        if self.proj is not None:
            h = self.proj(h)
        lens = downsampled_lengths(lengths, self.stride, Tp, B, h.device)
        if self.rnn is not None:
            packed = nn.utils.rnn.pack_padded_sequence(h, lens.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=Tp)
        mask = length_mask(lens, Tp, B, h.device)
        h = self.dropout(h)
        emb = self.pool(h, mask) if self.pool is not None else masked_stats_pool(h, mask)
        return {"embedding": emb, "frames": h, "frame_lengths": lens}


class Classifier(nn.Module):
    """encoder + linear head. Frame-level (`frame_level=True`): the head is applied to every frame
    (time-distributed dense) and clip logits are attention-pooled frame logits."""

    def __init__(self, encoder: Encoder, num_classes: int, frame_level: bool = False, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.frame_level = frame_level
        self.drop = nn.Dropout(dropout)
        if frame_level:
            self.head = nn.Linear(encoder.frame_dim, num_classes)
            self.frame_att = nn.Linear(encoder.frame_dim, num_classes)
        else:
            self.head = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, x, lengths=None):
        enc = self.encoder(x, lengths)
        out = {"embedding": enc["embedding"]}
        if self.frame_level:
            h = enc["frames"]
            fl = self.head(self.drop(h))                                  # (B, T', C)
            mask = length_mask(enc["frame_lengths"], h.shape[1], h.shape[0], h.device)
            a = self.frame_att(h).float().masked_fill(~mask[..., None], -1e4)
            w = torch.softmax(a, dim=1).to(fl.dtype)
            out["logits"] = (w * fl).sum(1)
            out["frame_logits"] = fl
            out["frame_lengths"] = enc["frame_lengths"]
        else:
            out["logits"] = self.head(self.drop(enc["embedding"]))
        return out


def conv_bn(cin, cout, stride=(1, 1), k=3, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


