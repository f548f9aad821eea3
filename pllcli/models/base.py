"""Building blocks shared by the models: input normalisation, masks, pooling, the wrapper."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def length_mask(lengths: torch.Tensor | None, T: int, B: int, device) -> torch.Tensor:
    """(B, T) bool, True on valid frames."""
    if lengths is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    return torch.arange(T, device=device)[None, :] < lengths.to(device)[:, None]


# ------------------------------------------------------------------ padding-exact conv trunks
#
# A clip alone and the same clip padded in a batch must give the same outputs. The trunk input is
# padded to a multiple of the total time stride, and every conv and pooling layer sees zeros past
# each clip's end (`run_masked`), so a clip is always processed as "its frames, then zeros", whatever
# the batch's padding holds. In train mode BatchNorm statistics count valid frames only.

_ZEROED_BEFORE = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


class FrameMask:
    """Valid frames of trunk activations (B, C, T, F) at every time resolution of one forward pass.

    `lengths` (B,) count valid frames of the trunk input, whose time axis has `t0` frames (a
    multiple of every time stride inside the trunk): an activation with T frames has time stride
    t0 // T and ceil(lengths / stride) valid frames.
    """

    def __init__(self, lengths: torch.Tensor, t0: int):
        self.lengths, self.t0 = lengths, t0

    def lengths_at(self, T: int) -> torch.Tensor:
        s = self.t0 // T
        return torch.div(self.lengths + s - 1, s, rounding_mode="floor").clamp(1, T)

    def valid(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, 1) bool for an activation h (B, C, T, F)."""
        T = h.shape[2]
        return (torch.arange(T, device=h.device)[None, :] < self.lengths_at(T)[:, None])[:, None, :, None]

    def zero(self, h: torch.Tensor) -> torch.Tensor:
        return h.masked_fill(~self.valid(h), 0.0)


def masked_batch_norm(bn: nn.BatchNorm2d, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Train-mode BatchNorm2d of h (B, C, T, F) whose batch statistics (and running averages)
    count the valid frames `valid` (B, 1, T, 1) only; honours momentum (0 = frozen, None = cumulative)."""
    dtype, h = h.dtype, h.float()  # statistics in float32, as BatchNorm does under autocast
    hm = h.masked_fill(~valid, 0.0)
    n = (valid.sum() * h.shape[3]).clamp_min(1)
    mean = hm.sum((0, 2, 3)) / n
    var = ((hm * hm).sum((0, 2, 3)) / n - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), f)
            unbiased = var.detach() * (n / (n - 1).clamp_min(1))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), f)
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -mean * scale + (bn.bias if bn.affine else 0.0)
    return (h * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)


def run_masked(module: nn.Module, h: torch.Tensor, fm: FrameMask) -> torch.Tensor:
    """Run a trunk module on h (B, C, T, F), zeroing padded frames before every conv and pooling
    layer. Containers are walked (nn.Sequential); a custom block defines `forward_masked(h, fm)`."""
    if isinstance(module, nn.Sequential):
        for m in module:
            h = run_masked(m, h, fm)
        return h
    if hasattr(module, "forward_masked"):
        return module.forward_masked(h, fm)
    if isinstance(module, _ZEROED_BEFORE):
        return module(fm.zero(h))
    if isinstance(module, nn.BatchNorm2d) and module.training:
        return masked_batch_norm(module, h, fm.valid(h))
    return module(h)


def run_trunk(trunk: nn.Module, x: torch.Tensor, lengths: torch.Tensor | None, stride: int):
    """Padding-exact conv trunk: x (B, T, F), lengths (B,) | None -> (h (B, C, T', F'), lens (B,)).

    T is zero-padded to a multiple of the total time stride `stride` (T' = ceil(T / stride));
    lens = ceil(lengths / stride) valid output frames.
    """
    B, T, _ = x.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
    lengths = lengths.to(x.device).long().clamp(1, T)
    x = F.pad(x, (0, 0, 0, (-T) % stride))
    fm = FrameMask(lengths, x.shape[1])
    if trunk.training and T % stride == 0 and bool((lengths == T).all()):
        h = trunk(x.unsqueeze(1))  # no padded frame anywhere: the same result, with the faster BatchNorm
    else:
        h = run_masked(trunk, x.unsqueeze(1), fm)
    return h, fm.lengths_at(h.shape[2])


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
    """Generic encoder: norm -> 2-D conv trunk (total time stride `stride`, run by `run_trunk` so
    padding never leaks into valid frames) -> optional BiGRU -> pooling.

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
            m = length_mask(lengths, T, B, x.device)[..., None]
            xm = x.masked_fill(~m, 0.0)
            x = xm - xm.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        h, lens = run_trunk(self.trunk, x, lengths, self.stride)   # (B, C, T', F')
        Bc, C, Tp, Fp = h.shape
        h = h.permute(0, 2, 1, 3).reshape(B, Tp, C * Fp)   # (B, T', C*F')
        if self.proj is not None:
            h = self.proj(h)
        if self.rnn is not None:
            packed = nn.utils.rnn.pack_padded_sequence(h, lens.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=Tp)
        mask = length_mask(lens, Tp, B, h.device)
        h = self.dropout(h).masked_fill(~mask[..., None], 0.0)
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


