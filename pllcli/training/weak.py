"""WHEN/WHO training on weak tags: the engine task, `fit_when_who`, `train --when-who`, prediction.

The network is `pllcli.models.whenwho.WhenWhoNet`, tag tables are read by
`pllcli.labels.weak_tags`, the losses and weak-tag objectives are in `weak_objectives`.

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

import dataclasses
import math
from pathlib import Path
import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pllcli.errors import InputError, TrainingError, UsageError
from pllcli.labels.weak_tags import positive_clips, read_tags, tags_matrix  # noqa: F401  (re-exported)
from pllcli.models.whenwho import Trunk, WhenWhoNet, transcription, transcription_logits  # noqa: F401
from pllcli.sampling import ClassBalancedSampler, HalfAndHalfSampler
from pllcli.training.checkpoints import Checkpoints
from pllcli.training.config import WHEN_LOSSES, WHEN_WHO_MODES, WHO_LOSSES, TrainConfig, WeakConfig  # noqa: F401
from pllcli.training.data import InMemoryFeatures, rank_slice, pad_clips, unpad
from pllcli.training.distributed import Dist
from pllcli.training.engine import Engine, EngineConfig, Phase, Step, Task
from pllcli.training.schedules import Schedule
from pllcli.training.weak_objectives import when_clip_probs, when_loss, who_loss  # noqa: F401  (re-exported)

MODES = WHEN_WHO_MODES
log = logging.getLogger(__name__)


# ------------------------------------------------------------------ training

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
    return pad_clips(feats)


class WhenWhoTask(Task):
    """The engine task of WHEN/WHO training on clip tags (N, C): one phase per trained task
    (separate/tied: WHEN then WHO, each with its own optimiser and sampler) or one joint phase.

    `mem` holds the clips (InMemoryFeatures), `rows` the clip of each tag row; `valid` is None
    or (mem, rows, tags) of held-out clips, scored by WHO mAP.
    """

    monitor, higher = "loss", False

    def __init__(self, model: WhenWhoNet, mem, rows: np.ndarray, tags: np.ndarray, cfg: WeakConfig, device,
                 max_frames: int | None = None, valid=None, dist: Dist | None = None):
        if (cfg.mode == "separate") == model.shared:
            raise UsageError(f"mode {cfg.mode} needs a WhenWhoNet with shared={cfg.mode != 'separate'}")
        self.model, self.mem, self.rows, self.cfg, self.device = model, mem, np.asarray(rows), cfg, device
        self.max_frames, self.valid, self.dist = max_frames, valid, dist or Dist()
        self.prefetch_thread = mem.device.type == "cpu"
        self.Y = torch.from_numpy(np.asarray(tags, dtype=np.float32))
        self.P = torch.from_numpy(positive_clips(tags).astype(np.float32))
        if valid is not None:
            self.monitor, self.higher = "val_mAP", True

    def phases(self) -> list[Phase]:
        cfg, tags, groups = self.cfg, self.Y.numpy(), self.model.param_groups()

        def plan(kind, seed):
            b = make_batches(kind, tags, cfg.batch_size, seed, "training set")

            def for_epoch(epoch):
                b.set_epoch(epoch)
                return rank_slice([list(i) for i in b], self.dist.rank, self.dist.world)
            return for_epoch
        if cfg.mode == "joint":
            return [Phase("joint", list(self.model.parameters()),
                          plan("hnh" if cfg.joint_hnh else cfg.who_sampler, cfg.seed))]
        phases = [Phase("when", groups["when"], plan("hnh" if cfg.when_hnh else "random", cfg.seed)),
                  Phase("who", groups["who"], plan(cfg.who_sampler, cfg.seed + 1))]
        return [p for p in phases if p.name in cfg.tasks]

    def batch(self, phase, idx, epoch: int) -> dict:
        idx = np.asarray(idx, np.int64)
        rng = np.random.default_rng([self.cfg.seed, int(idx[0]), epoch]) if self.max_frames else None
        x, lens = self.mem.gather(self.rows[idx], self.max_frames, rng)
        return {"x": x.to(self.device), "lengths": lens.to(self.device), "idx": torch.from_numpy(idx),
                "positive": self.P[idx].to(self.device), "tags": self.Y[idx].to(self.device)}

    def loss(self, phase, b: dict, step: Step):
        cfg = self.cfg
        if phase.name == "when":
            loss = when_loss(step.forward(b["x"], b["lengths"], part="when"), b["positive"], cfg.when_pooling,
                             self.model)
        elif phase.name == "who":
            loss = who_loss(step.forward(b["x"], b["lengths"], part="who"), b["tags"], cfg.who_loss)
        else:
            out = step.forward(b["x"], b["lengths"])
            loss = (cfg.joint_weights[0] * when_loss(out, b["positive"], cfg.when_pooling, self.model)
                    + cfg.joint_weights[1] * who_loss(out, b["tags"], cfg.who_loss))
        return loss, {phase.name: float(loss.detach())}, len(b["idx"])

    def validate(self, model) -> dict:
        if self.valid is None:
            return {}
        from pllcli.metrics.multi_label import mean_average_precision
        mem, rows, Y = self.valid
        x, lens = mem.gather(rows)
        who = predict_when_who(model, x, lens, when_pooling=self.cfg.when_pooling, device=self.device)["who"]
        return {"val_mAP": float(mean_average_precision(Y, who)) if Y.any() else 0.0}

    def describe(self, b: dict) -> str:
        return f"clips {', '.join(str(int(i)) for i in b['idx'][:3])}, ..."


def set_input_stats(model: WhenWhoNet, mem, rows) -> None:
    """Input normalisation from the frames of the training clips."""
    mean, std = mem.stats(rows)
    model.set_input_stats(torch.from_numpy(mean), torch.from_numpy(std))


def fit_when_who(model: WhenWhoNet, X: torch.Tensor, lengths: torch.Tensor, tags: np.ndarray,
                 cfg: WeakConfig, device: str | torch.device = "cpu", engine_cfg: EngineConfig | None = None,
                 **engine_kw) -> list[dict]:
    """Train WHEN and WHO on padded clips X (N, T, F), lengths (N,) and tags (N, C) with
    `cfg.mode`; returns the per-epoch records (loss_when, loss_who or loss_joint, ...).

    `engine_cfg` (default: AdamW, one-cycle LR, clip 5) and `engine_kw` (checkpoints, log_path)
    go to the engine.
    """
    tags = np.asarray(tags, dtype=np.float32)
    if len(tags) != len(X):
        raise TrainingError(f"{len(X)} clips but {len(tags)} tag rows")
    torch.manual_seed(cfg.seed)
    device = torch.device(device)
    mem = unpad(X, lengths)
    rows = np.arange(len(X))
    set_input_stats(model, mem, rows)
    model.to(device)
    task = WhenWhoTask(model, mem, rows, tags, cfg, device)
    ecfg = engine_cfg or EngineConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
                                      schedule=Schedule("onecycle", cfg.epochs, pct=0.15), grad_clip=5.0,
                                      progress=False, desc="when-who")
    engine = Engine(task, ecfg, device=device, **engine_kw)
    return engine.fit().history


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


# ------------------------------------------------------------------ `pllcli train --when-who MODE`

# train flags --when-who does not use, with the reason shown in the error
_NOT_FOR_WHEN_WHO = {
    "objectives": "--objective", "augment": "--augment", "init": "--init", "freeze": "--freeze",
    "segment_labels": "--segment-labels", "clean_share": "--clean-share", "unlabeled_share": "--unlabeled-share",
    "sampler": "--sampler", "valid": "--valid", "valid_labels": "--valid-labels", "max_frames": "--max-frames",
}


def check_when_who_flags(cfg: TrainConfig) -> None:
    """UsageError naming the train flags set away from their default that --when-who cannot honour."""
    default = TrainConfig(features=cfg.features, labels=cfg.labels, outdir=cfg.outdir)
    bad = [flag for k, flag in _NOT_FOR_WHEN_WHO.items() if getattr(cfg, k) != getattr(default, k)]
    if cfg.model not in (default.model, "whenwho"):
        bad.append("--model")
    if bad:
        raise UsageError(f"--when-who does not use {', '.join(bad)}: it trains the whenwho model on whole clips "
                         f"with its own WHEN/WHO losses and samplers (--when-pooling etc.); drop "
                         f"{'it' if len(bad) == 1 else 'them'}")


def train_when_who(cfg: TrainConfig, mode: str = "separate", when_pooling: str = "attention",
                   who_loss: str = "bce", who_sampler: str = "balanced", overwrite: bool = False) -> dict:
    """Train a WHEN/WHO model (separate, joint or tied) on the weak tags of a label store.

    The engine options of `cfg` apply (epochs, batch size, optimiser, LR schedule, EMA, AMP,
    top-k, patience, --valid-fraction of the tagged clips scored by WHO mAP, --resume); flags
    it cannot honour are refused (`check_when_who_flags`). Writes OUTDIR/model.pt (to deploy),
    best.pt, last.pt, averaged.pt, log.jsonl and summary.json; returns the summary. The checkpoint's frame_logits
    are the transcription logit(P_WHEN(t) x P_WHO(c)), so `pllcli predict --events` and
    `pllcli evaluate` work on it as on any frame-level model.
    """
    from pllcli.features import FeatureStore
    from pllcli.io import provenance, write_json
    from pllcli.models import build_model
    from pllcli.training.distributed import start
    from pllcli.training.trainer import data_path, engine_config, load_labels

    check_when_who_flags(cfg)
    out = Path(cfg.outdir)
    if cfg.resume is None and (out / "last.pt").exists() and not overwrite:
        raise UsageError(f"{out} already holds a training run (last.pt); use --resume {out} or another -o")
    dist, dev = start(cfg.device, cfg.seed)
    fs = FeatureStore(cfg.features)
    lab, label_rows, added = load_labels(fs.ids, cfg.labels)
    if lab.task != "multi" or not lab.has_tags.any():
        raise InputError("--when-who needs weak tags (a label store built with build-candidates --tags)",
                         str(cfg.labels), field="tags")
    keep = np.flatnonzero(lab.has_tags[label_rows])
    Y = lab.tag_matrix(label_rows[keep])
    path, why = data_path(cfg, fs, {})
    log.info("%s%s", why, "; WHEN/WHO reads each batch's clips from the store" if path == "stream" else "")
    if path == "stream":  # bounded memory; the samplers' random clips are read batch by batch
        from pllcli.training.stream import StoreFeatures
        mem = StoreFeatures(fs)
    else:
        mem = InMemoryFeatures(*fs.load_all(), dev)
    train_i, valid_i = _split(len(keep), cfg.valid_fraction, cfg.seed)
    weak = WeakConfig(mode=mode, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, when_pooling=when_pooling,
                      who_loss=who_loss, who_sampler=who_sampler, seed=cfg.seed, weight_decay=cfg.weight_decay)
    model = build_model("whenwho", fs.feature_dim, lab.num_classes, shared=mode != "separate", **cfg.model_options)
    set_input_stats(model, mem, keep[train_i])
    model.to(dev)
    valid = (mem, keep[valid_i], Y[valid_i]) if len(valid_i) else None
    task = WhenWhoTask(model, mem, keep[train_i], Y[train_i], weak, dev, valid=valid, dist=dist)
    resume_config = {**cfg.semantic(), "when_who": dataclasses_asdict(weak)}
    meta = {"kind": "classifier", "model": model.config, "classes": list(map(str, lab.classes)), "task": "multi",
            "feature_config": fs.config.to_dict(), "feature_config_hash": fs.config_hash,
            "train": {"when_who": dataclasses_asdict(weak), "clips": int(len(train_i))},
            "train_config": resume_config,
            "provenance": provenance(inputs={"features": cfg.features, "labels": cfg.labels})}
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    engine = Engine(task, dataclasses.replace(engine_config(cfg, desc="when-who"), resume_config=resume_config),
                    Checkpoints(out / "last.pt", out / "best.pt", out / "topk", cfg.top_k, meta),
                    out / "log.jsonl", dev, dist)
    history = engine.fit().history
    summary: dict = {}
    if dist.main:
        engine.save_average(out / "averaged.pt", meta)
        summary = {"outdir": str(out), "mode": str(mode), "clips": int(len(train_i)), "valid_clips": int(len(valid_i)),
                   "features_not_in_labels": int(added), "epochs": len(history), "final": history[-1] if history else {},
                   "checkpoint": str(out / "model.pt")}
        write_json(summary, out / "summary.json")
    dist.barrier()
    dist.close()
    return summary


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) positions of n tagged clips; none held out unless both sides are non-empty."""
    n_val = int(round(n * fraction))
    if n_val < 1 or n - n_val < 1:
        return np.arange(n), np.zeros(0, np.int64)
    valid = np.sort(np.random.default_rng([seed, 99]).choice(n, n_val, replace=False))
    return np.setdiff1d(np.arange(n), valid), valid


def dataclasses_asdict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["mode"] = str(d["mode"])
    d["joint_weights"] = list(d["joint_weights"])
    d["tasks"] = list(d["tasks"])
    return d
