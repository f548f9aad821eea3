"""Weak tags: tag tables, the WHEN/WHO network, its losses, training modes and transcription.

Morfi & Stowell factorise transcription into WHEN (class-agnostic frame-level event detection,
trained from "the clip has some event" with a MIL loss, MMM by default, and half-and-half
batches) and WHO (clip-level tagging with BCE or hinge). Training modes:

- ``separate``: two networks (own conv trunk each); each epoch trains WHEN on its sampler
  (HnH or plain) and WHO on its own (plain or class-balanced), each with its own optimiser.
- ``joint``: one shared trunk, both heads, one sampler, loss = w_when * L_when + w_who * L_who
  (default weights 0.5 / 5.0, the paper's best).
- ``tied``: one shared trunk; epochs alternate: a WHEN epoch (its sampler, its optimiser over
  trunk + WHEN head) then a WHO epoch (its sampler, its optimiser over trunk + WHO head).

The transcription (what `predict` should output as frame scores) is
``P(class c active at frame t) = P_WHEN(t) * P_WHO(c)``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pllcli.errors import InputError, TrainingError, UsageError
from pllcli.losses import mil
from pllcli.sampling import ClassBalancedSampler, HalfAndHalfSampler
from pllcli.models.base import InputNorm

log = logging.getLogger(__name__)

MODES = ("separate", "joint", "tied")
WHEN_LOSSES = ("mmm", "max", "mean", "noisy_or", "linear_softmax", "attention")
WHO_LOSSES = ("bce", "hinge")


# ------------------------------------------------------------------ tags

def read_tags(path, classes: Sequence[str] | None = None, sep: str = ";",
              column: str = "labels") -> tuple[list[str], np.ndarray, list[str]]:
    """Read `id,labels` ('a;b', empty = no event) -> (ids, multi-hot (N, C) float32, classes).

    With `classes` given, a tag naming another class is an InputError naming the line;
    otherwise the classes are the sorted union of the tags. Duplicate ids are an error.
    """
    from pllcli.io import Table
    t = Table(path, required=["id", column])
    rows = []
    for ln, row in t.unique_rows("id"):
        cid = row["id"]
        tags = [x.strip() for x in row[column].split(sep) if x.strip()]
        rows.append((ln, cid, tags))
    if classes is None:
        classes = sorted({x for _, _, tags in rows for x in tags})
    classes = [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    Y = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for r, (ln, cid, tags) in enumerate(rows):
        for x in tags:
            if x not in index:
                shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
                raise InputError(f"tag {x!r} of {cid!r} is not a known class (classes: {shown})",
                                 t.name, line=ln, field=column)
            Y[r, index[x]] = 1.0
    return [cid for _, cid, _ in rows], Y, classes


def tags_matrix(indptr: np.ndarray, indices: np.ndarray, num_classes: int,
                rows: Sequence[int] | None = None) -> np.ndarray:
    """CSR tags (a label store's tags/indptr, tags/indices) -> multi-hot (N or len(rows), C)."""
    indptr = np.asarray(indptr)
    rows = np.arange(len(indptr) - 1) if rows is None else np.asarray(rows)
    out = np.zeros((len(rows), num_classes), dtype=np.float32)
    for k, r in enumerate(rows):
        out[k, np.asarray(indices[indptr[r]:indptr[r + 1]], dtype=np.int64)] = 1.0
    return out


def positive_clips(tags: np.ndarray) -> np.ndarray:
    """WHEN targets: a clip is positive when it has any tag."""
    return np.asarray(tags).reshape(len(tags), -1).max(axis=1) > 0.5


# ------------------------------------------------------------------ network

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
        self.conv, self.out_dim = _trunk(n_mels, width, depth, time_stride)

    def forward(self, x):
        h = self.conv(self.norm(x).unsqueeze(1))  # (B, W, T', F')
        B, W, T, Fp = h.shape
        return h.permute(0, 2, 1, 3).reshape(B, T, W * Fp)


class WhenWhoNet(nn.Module):
    """WHEN (BiGRU + time-distributed dense -> 1 frame logit) and WHO (BiGRU, masked mean+max
    pooling over time, dense -> C clip logits; the paper's WHO is conv + GAP, the GRU adds the
    ~0.5 s context a spoken word needs) over one shared conv trunk (`shared=True`, joint/tied) or two.

    forward(x (B, T, F), lengths) -> dict:
      logits (B, C) WHO clip logits; when_frame_logits (B, T'); when_frames (B, T', H) (the
      WHEN frame embeddings attention pooling reads); frame_lengths (B,); frame_logits (B, T', C)
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

    def _lens(self, lengths, T, B, device):
        if lengths is None:
            return torch.full((B,), T, dtype=torch.long, device=device)
        return torch.div(lengths.to(device) + self.time_stride - 1, self.time_stride,
                         rounding_mode="floor").clamp(1, T)

    def forward_when(self, x, lengths=None):
        h = self.trunk_when(x)
        B, T, _ = h.shape
        lens = self._lens(lengths, T, B, h.device)
        e = self.when_dense(_run_rnn(self.rnn, h, lens))
        return {"when_frame_logits": self.when_out(e).squeeze(-1), "when_frames": e, "frame_lengths": lens,
                "when_embedding": h}

    def forward_who(self, x, lengths=None):
        h = self.trunk_who(x)
        B, T, _ = h.shape
        lens = self._lens(lengths, T, B, h.device)
        r = _run_rnn(self.who_rnn, h, lens)
        mask = mil.lengths_to_mask(lens, T)
        emb = torch.cat([mil.mean_pool(r, mask), mil.max_pool(r, mask)], dim=-1)
        return {"logits": self.who_out(emb), "embedding": emb, "frame_lengths": lens}

    def forward(self, x, lengths=None):
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


def _register():
    try:
        from pllcli.models import register_model
    except ImportError:  # pragma: no cover - models not written yet
        return

    @register_model("whenwho", "WHEN/WHO (Morfi & Stowell): conv trunk, BiGRU WHEN detector + GAP WHO tagger")
    def whenwho(n_mels: int, num_classes: int, **kw):
        return WhenWhoNet(n_mels, num_classes, **kw)


_register()


# ------------------------------------------------------------------ losses

def when_loss(out: dict, positive: torch.Tensor, pooling: str = "mmm", model: WhenWhoNet | None = None) -> torch.Tensor:
    """MIL loss of the WHEN frame logits against clip positivity (any event)."""
    z = out["when_frame_logits"]
    mask = mil.lengths_to_mask(out["frame_lengths"], z.shape[1])
    if pooling == "attention":
        if model is None:
            raise UsageError("attention pooling for WHEN needs the model (its attention weights)")
        return mil.mil_loss(z, positive, "attention", mask, attention=model.when_att, features=out["when_frames"])
    return mil.mil_loss(z, positive, pooling, mask)


def who_loss(out: dict, tags: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    return mil.multilabel_loss(loss, out["logits"], tags)


def when_clip_probs(out: dict, pooling: str, model: WhenWhoNet | None = None) -> torch.Tensor:
    """Clip-level 'has an event' probability from WHEN frames (mmm scores with max)."""
    p = torch.sigmoid(out["when_frame_logits"])
    mask = mil.lengths_to_mask(out["frame_lengths"], p.shape[1])
    if pooling == "attention" and model is not None:
        return model.when_att(p, out["when_frames"], mask)
    return mil.pool(p, "max" if pooling == "mmm" else pooling, mask)


# ------------------------------------------------------------------ training

@dataclass
class WeakConfig:
    mode: str = "separate"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    when_pooling: str = "mmm"
    who_loss: str = "bce"
    when_hnh: bool = True
    who_sampler: str = "random"          # random | balanced | hnh
    joint_weights: tuple[float, float] = (0.5, 5.0)
    joint_hnh: bool = False
    tasks: tuple[str, ...] = ("when", "who")   # separate/tied: train only these
    seed: int = 0
    weight_decay: float = 1e-4
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown WHEN/WHO mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.when_pooling not in WHEN_LOSSES:
            raise UsageError(f"unknown WHEN loss {self.when_pooling!r} (choose from {', '.join(WHEN_LOSSES)})")
        if self.who_loss not in WHO_LOSSES:
            raise UsageError(f"unknown WHO loss {self.who_loss!r} (choose from {', '.join(WHO_LOSSES)})")
        if self.who_sampler not in ("random", "balanced", "hnh"):
            raise UsageError(f"unknown WHO sampler {self.who_sampler!r} (random, balanced or hnh)")
        if self.epochs < 1 or self.batch_size < 2:
            raise UsageError("need epochs >= 1 and batch size >= 2")


class _Random:
    def __init__(self, n, batch_size, seed):
        self.n, self.bs, self.seed, self.epoch = n, batch_size, seed, 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return math.ceil(self.n / self.bs)

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for i in range(0, self.n, self.bs):
            yield perm[i:i + self.bs].tolist()


class _Batched:
    """Batches from an index sampler."""

    def __init__(self, sampler, batch_size):
        self.s, self.bs = sampler, batch_size

    def set_epoch(self, e):
        self.s.set_epoch(e)

    def __len__(self):
        return math.ceil(len(self.s) / self.bs)

    def __iter__(self):
        idx = list(self.s)
        for i in range(0, len(idx), self.bs):
            yield idx[i:i + self.bs]


def make_batches(kind: str, tags: np.ndarray, batch_size: int, seed: int, what: str):
    """'random' | 'hnh' (positive = any tag) | 'balanced' batch iterators with set_epoch()."""
    n = len(tags)
    if kind == "hnh":
        bs = batch_size + (batch_size % 2)
        return HalfAndHalfSampler(positive_clips(tags), bs, num_batches=math.ceil(n / bs), seed=seed, what=what)
    if kind == "balanced":
        return _Batched(ClassBalancedSampler(tags, num_samples=n, seed=seed), batch_size)
    return _Random(n, batch_size, seed)


def pad_features(feats: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, F) arrays -> (N, T_max, F) float32 tensor (zero padded) and lengths (N,)."""
    if not len(feats):
        raise TrainingError("no training clips")
    T = max(len(f) for f in feats)
    X = np.zeros((len(feats), T, feats[0].shape[1]), dtype=np.float32)
    for i, f in enumerate(feats):
        X[i, :len(f)] = f
    return torch.from_numpy(X), torch.tensor([len(f) for f in feats], dtype=torch.long)


def fit_when_who(model: WhenWhoNet, X: torch.Tensor, lengths: torch.Tensor, tags: np.ndarray,
                 cfg: WeakConfig, on_epoch: Callable[[int, dict], None] | None = None,
                 device: str | torch.device = "cpu") -> list[dict]:
    """Train WHEN and WHO on clip tags (N, C) with `cfg.mode`; returns per-epoch loss history."""
    cfg.validate()
    if (cfg.mode == "separate") == model.shared:
        raise UsageError(f"mode {cfg.mode} needs a WhenWhoNet with shared={cfg.mode != 'separate'}")
    tags = np.asarray(tags, dtype=np.float32)
    if len(tags) != len(X):
        raise TrainingError(f"{len(X)} clips but {len(tags)} tag rows")
    torch.manual_seed(cfg.seed)
    m = mil.lengths_to_mask(lengths, X.shape[1]).unsqueeze(-1).float()
    mean = (X * m).sum((0, 1)) / m.sum((0, 1))
    std = (((X - mean) ** 2) * m).sum((0, 1)).div(m.sum((0, 1))).sqrt()
    model.set_input_stats(mean, std)
    model.to(device)
    Y = torch.from_numpy(tags)
    P = torch.from_numpy(positive_clips(tags).astype(np.float32))
    groups = model.param_groups()

    def opt(params):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    if cfg.mode == "joint":
        plan = [("joint", make_batches("hnh" if cfg.joint_hnh else cfg.who_sampler, tags, cfg.batch_size,
                                       cfg.seed, "training set"), opt(list(model.parameters())))]
    else:
        if not cfg.tasks or set(cfg.tasks) - {"when", "who"}:
            raise UsageError(f"tasks must be a non-empty subset of when, who; got {cfg.tasks}")
        plan = [("when", make_batches("hnh" if cfg.when_hnh else "random", tags, cfg.batch_size, cfg.seed,
                                      "training set"), opt(groups["when"])),
                ("who", make_batches(cfg.who_sampler, tags, cfg.batch_size, cfg.seed + 1, "training set"),
                 opt(groups["who"]))]
        plan = [p for p in plan if p[0] in cfg.tasks]
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=cfg.lr, total_steps=cfg.epochs * len(b),
                                                  pct_start=0.15) for _, b, o in plan]
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        t0, rec = time.perf_counter(), {"epoch": epoch + 1}
        for (task, batches, optim), sched in zip(plan, scheds):
            batches.set_epoch(epoch)
            tot, n = 0.0, 0
            for idx in batches:
                idx_t = torch.as_tensor(idx)
                xb, lb = X[idx_t].to(device), lengths[idx_t].to(device)
                optim.zero_grad(set_to_none=True)
                if task == "when":
                    loss = when_loss(model.forward_when(xb, lb), P[idx_t].to(device), cfg.when_pooling, model)
                elif task == "who":
                    loss = who_loss(model.forward_who(xb, lb), Y[idx_t].to(device), cfg.who_loss)
                else:
                    out = model(xb, lb)
                    loss = (cfg.joint_weights[0] * when_loss(out, P[idx_t].to(device), cfg.when_pooling, model)
                            + cfg.joint_weights[1] * who_loss(out, Y[idx_t].to(device), cfg.who_loss))
                if not torch.isfinite(loss):
                    raise TrainingError(f"{task} loss is {loss.item()} at epoch {epoch + 1}; lower the learning rate")
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optim.step()
                sched.step()
                tot, n = tot + loss.item() * len(idx), n + len(idx)
            rec[f"{task}_loss"] = tot / max(1, n)
        rec["seconds"] = time.perf_counter() - t0
        history.append(rec)
        log.info("epoch %d %s", epoch + 1, {k: round(v, 4) for k, v in rec.items() if k != "epoch"})
        if on_epoch is not None:
            on_epoch(epoch, rec)
    return history


@torch.no_grad()
def predict_when_who(model: WhenWhoNet, X: torch.Tensor, lengths: torch.Tensor, batch_size: int = 64,
                     when_pooling: str = "mmm", device="cpu") -> dict[str, np.ndarray]:
    """-> who (N, C) clip probs, when (N, T') frame probs, when_clip (N,), frame_lengths (N,)."""
    model.eval().to(device)
    who, when, clip, lens = [], [], [], []
    for i in range(0, len(X), batch_size):
        out = model(X[i:i + batch_size].to(device), lengths[i:i + batch_size].to(device))
        who.append(torch.sigmoid(out["logits"]).cpu())
        when.append(torch.sigmoid(out["when_frame_logits"]).cpu())
        clip.append(when_clip_probs(out, when_pooling, model).cpu())
        lens.append(out["frame_lengths"].cpu())
    return {"who": torch.cat(who).numpy(), "when": torch.cat(when).numpy(), "when_clip": torch.cat(clip).numpy(),
            "frame_lengths": torch.cat(lens).numpy()}


# ------------------------------------------------------------------ pseudo strong labels

def segment_views(X: torch.Tensor, lengths: torch.Tensor, seg_frames: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Cut clips into non-overlapping segments of `seg_frames` input frames (the last one padded).

    -> (S, seg_frames, F) segments, (S,) lengths, (S,) clip row of each segment.
    """
    if seg_frames < 1:
        raise UsageError("segment length must be >= 1 frame")
    segs, lens, owner = [], [], []
    for i in range(len(X)):
        L = int(lengths[i])
        for s in range(0, L, seg_frames):
            n = min(seg_frames, L - s)
            seg = X[i, s:s + n]
            if seg.shape[0] < seg_frames:
                seg = F.pad(seg, (0, 0, 0, seg_frames - seg.shape[0]))
            segs.append(seg)
            lens.append(n)
            owner.append(i)
    return torch.stack(segs), torch.tensor(lens, dtype=torch.long), np.asarray(owner)


__all__ = ["read_tags", "tags_matrix", "positive_clips", "WhenWhoNet", "Trunk", "transcription",
           "transcription_logits", "when_loss", "who_loss", "when_clip_probs", "WeakConfig", "fit_when_who",
           "predict_when_who", "pad_features", "make_batches", "segment_views", "MODES"]


# ------------------------------------------------------------------ trainer objectives

def _register_objectives():
    try:
        from pllcli.training.objectives import Objective, register_objective
    except ImportError:  # pragma: no cover - trainer not written yet
        return

    def _tag_targets(ctx, use_soft):
        b = ctx.batch
        m = b["has_tags"].bool()
        y = b["tags"].float()
        if use_soft and "has_soft" in b:
            soft = b["has_soft"].bool() & ~m
            y = torch.where(soft[:, None], b["soft"].float(), y)
            m = m | soft
        return m, y

    @register_objective("multilabel-bce")
    class MultiLabelBCE(Objective):
        """Multi-label BCE on clip logits vs weak tags (use_soft=true adds soft/PSL labels)."""
        items = ("tags", "soft")

        def __init__(self, use_soft: bool = False, **kw):
            super().__init__(**kw)
            self.use_soft = bool(use_soft)
            self.params = {"use_soft": self.use_soft}

        def loss(self, ctx):
            m, y = _tag_targets(ctx, self.use_soft)
            if not m.any():
                return None
            return mil.bce_loss(ctx.out["logits"][m], y[m])

    @register_objective("multilabel-hinge")
    class MultiLabelHinge(Objective):
        """Multi-label hinge (MultiLabelMarginLoss) on clip logits vs weak tags."""
        items = ("tags",)

        def loss(self, ctx):
            m, y = _tag_targets(ctx, False)
            if not m.any():
                return None
            return mil.hinge_loss(ctx.out["logits"][m], y[m])

    @register_objective("mil")
    class MILObjective(Objective):
        """MIL on frame_logits vs weak tags: pooling=max|mean|noisy_or|linear_softmax|mmm."""
        items = ("tags",)

        def __init__(self, pooling: str = "max", **kw):
            super().__init__(**kw)
            pooling = str(pooling).replace("-", "_")
            if pooling == "attention":
                raise UsageError("mil:pooling=attention needs learnable weights; frame-level models already "
                                 "attention-pool their clip logits, so use multilabel-bce")
            if pooling != "mmm":
                mil.check_pooling(pooling)
            self.pooling = pooling
            self.params = {"pooling": pooling}

        def loss(self, ctx):
            if "frame_logits" not in ctx.out:
                raise UsageError("the mil objective needs a frame-level model (one with frame_logits, e.g. crnn)")
            m, y = _tag_targets(ctx, False)
            if not m.any():
                return None
            z = ctx.out["frame_logits"]
            lens = ctx.out.get("frame_lengths")
            mask = mil.lengths_to_mask(lens, z.shape[1]) if lens is not None else None
            return mil.mil_loss(z[m], y[m], self.pooling, None if mask is None else mask[m])

    @register_objective("when-mmm")
    class WhenObjective(Objective):
        """WHEN: class-agnostic MIL (pooling=mmm default) on the whenwho model's WHEN frames; positive = any tag."""
        items = ("tags",)

        def __init__(self, pooling: str = "mmm", **kw):
            super().__init__(**kw)
            pooling = str(pooling).replace("-", "_")
            if pooling not in WHEN_LOSSES:
                raise UsageError(f"unknown WHEN loss {pooling!r} (choose from {', '.join(WHEN_LOSSES)})")
            self.pooling = pooling
            self.params = {"pooling": pooling}

        def loss(self, ctx):
            if "when_frame_logits" not in ctx.out:
                raise UsageError("the when-mmm objective needs the whenwho model (--model whenwho)")
            m, y = _tag_targets(ctx, False)
            if not m.any():
                return None
            out = {k: v[m] for k, v in ctx.out.items() if k in ("when_frame_logits", "when_frames", "frame_lengths")}
            return when_loss(out, (y[m].amax(dim=1) > 0.5).float(), self.pooling, ctx.model)


_register_objectives()


# ------------------------------------------------------------------ `pllcli train --when-who MODE`

def train_when_who(features, labels, outdir, mode: str = "separate", epochs: int = 10, batch_size: int = 16,
                   lr: float = 2e-3, when_pooling: str = "attention", who_loss: str = "bce",
                   who_sampler: str = "balanced", seed: int = 0, device: str = "auto",
                   model_options: dict | None = None, overwrite: bool = False) -> dict:
    """Train a WHEN/WHO model (separate, joint or tied) on the weak tags of a label store.

    Writes OUTDIR/best.pt (= the final weights; there is no tag-level validation split),
    OUTDIR/log.jsonl (per-epoch losses) and OUTDIR/summary.json; returns the summary.
    The checkpoint's frame_logits are the transcription logit(P_WHEN(t) x P_WHO(c)), so
    `pllcli predict --events` and `pllcli evaluate` work on it as on any frame-level model.
    """
    import json
    from pathlib import Path

    from pllcli.checkpoint import save_checkpoint
    from pllcli.features import FeatureStore
    from pllcli.io import atomic_path, provenance, write_json
    from pllcli.labels.store import align_ids, read_label_store
    from pllcli.models import build_model
    from pllcli.runtime import resolve_device, set_seed

    out = Path(outdir)
    if (out / "best.pt").exists() and not overwrite:
        raise UsageError(f"{out} already holds a training run (best.pt); use another -o")
    fs = FeatureStore(features)
    lab = read_label_store(labels)
    if lab.task != "multi" or not lab.has_tags.any():
        raise InputError("--when-who needs weak tags (a label store built with build-candidates --tags)",
                         str(labels), field="tags")
    lr_rows = align_ids(fs.ids, lab.ids, what=f"label store {labels}")
    keep = np.flatnonzero(lab.has_tags[lr_rows])
    C = len(lab.classes)
    Y = tags_matrix(lab.tags_indptr, lab.tags_indices, C, rows=lr_rows[keep])
    feats, offsets = fs.load_all()  # one read, not one per clip
    X, lengths = pad_features([feats[offsets[i]:offsets[i + 1]] for i in keep])
    set_seed(seed)
    dev = resolve_device(device)
    model = build_model("whenwho", fs.feature_dim, C, shared=mode != "separate", **(model_options or {}))
    cfg = WeakConfig(mode=mode, epochs=epochs, batch_size=batch_size, lr=lr, when_pooling=when_pooling,
                     who_loss=who_loss, who_sampler=who_sampler, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    history = fit_when_who(model, X, lengths, Y, cfg, device=dev)
    meta = {"kind": "classifier", "model": model.config, "classes": list(map(str, lab.classes)), "task": "multi",
            "feature_config": fs.config.to_dict(), "feature_config_hash": fs.config_hash,
            "train": {"when_who": dataclasses_asdict(cfg), "clips": int(len(keep))},
            "epoch": epochs, "metrics": history[-1] if history else {},
            "provenance": provenance(inputs={"features": features, "labels": labels})}
    model.to("cpu")
    save_checkpoint(out / "best.pt", model, meta)
    with atomic_path(out / "log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    summary = {"outdir": str(out), "mode": mode, "clips": int(len(keep)), "epochs": epochs,
               "final": history[-1] if history else {}, "checkpoint": str(out / "best.pt")}
    write_json(summary, out / "summary.json")
    return summary


def dataclasses_asdict(cfg) -> dict:
    from dataclasses import asdict
    d = asdict(cfg)
    d["joint_weights"] = list(d["joint_weights"])
    d["tasks"] = list(d["tasks"])
    return d
