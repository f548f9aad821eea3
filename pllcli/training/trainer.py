"""The trainer behind `pllcli train`.

    train(TrainConfig(features=..., labels=..., outdir=...)) -> summary dict

Data: the feature store is loaded into memory once (`FeatureStore.load_all`) and batched with a
vectorised gather (random crops, padding); labels come from the label store joined by id.
Loss: the sum of objectives (see `objectives`), each weighted by its schedule.

Default recipe (DEFAULT_OBJECTIVES, clean_share; measured on chat-fsdd by examples/bench_chat.py):

  L = CE(clean items) + CR-DPLL(candidate items); every batch holds `clean_share` (25%) clean
  items, oversampled. CR-DPLL (Wu et al. 2022, formula in pllcli.losses.pll):
  -sum_{j not in S} log(1 - p_j) + lambda(t) * sum_v KL(c || p_v) over two augmented views v,
  with confidences c_ij ∝ prior_ij * prod_v p_vij^(1/V) inside the set (the label store's
  weights, e.g. the delay prior of build-candidates) and eps = 0.01 outside it; lambda ramps up
  over 5 epochs.
  chat-fsdd (100 classes, sets of ~9.6, truth missing from ~3% of sets, 325 clean of 4728),
  convgru, 20 epochs on 2 CPU cores, one seed: test accuracy 0.985 vs 0.979 for the oracle on
  true labels (ratio 1.006), disambiguation of the training items 0.969, 351 s of training.
  The same budget with other candidate losses (+ clean CE): CC with the prior 0.945, CC after a
  3-epoch clean warm start 0.943, PiCO-style 0.942, PRODEN with warm start 0.923, LWS 0.341,
  naive sigmoid+MSE 0.321; clean labels only 0.268 (as many steps). The two augmented views
  cost ~1.7x the training time of CC; `--objective cc:eps=0 --objective ce` is the faster choice.

Outputs in OUTDIR:
best.pt, last.pt (with optimiser/RNG/objective state for --resume), averaged.pt (top-k
checkpoint average), log.jsonl (one line per epoch), summary.json.
Under `torchrun` (WORLD_SIZE > 1) it runs data-parallel: rank-aware batch slicing, gradients
averaged with all_reduce (gloo on CPU, NCCL on GPU), only rank 0 writes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pllcli.errors import CheckpointError, ConfigMismatchError, InputError, TrainingError, UsageError

log = logging.getLogger(__name__)

DEFAULT_OBJECTIVES = ("cr:eps=0.01", "ce")  # see the module docstring
DEFAULT_OBJECTIVES_NO_CLEAN = ("cr:eps=0.01",)  # the default for a store without clean labels
DEFAULT_CLEAN_SHARE = 0.25
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("cosine", "cosine-restarts", "onecycle", "poly", "constant")
# config keys that may change between a run and its --resume
_RESUME_FREE = {"resume", "device", "progress", "outdir", "threads", "prefetch", "features", "labels",
                "valid", "valid_labels", "init"}


@dataclass
class TrainConfig:
    features: str
    labels: str
    outdir: str
    model: str = "convgru"
    model_options: dict = field(default_factory=dict)
    objectives: list = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    epochs: int = 20
    batch_size: int = 64
    clean_share: float = DEFAULT_CLEAN_SHARE
    sampler: str = "natural"  # natural | hnh (half-and-half positive/negative clips) | balanced (PANNs)
    unlabeled_share: float = 0.0
    max_frames: int | None = 300
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    warmup_epochs: float = 1.0
    restart_epochs: float = 10.0
    restart_mult: float = 1.0
    poly_power: float = 0.9
    grad_clip: float = 5.0
    ema: float = 0.0
    top_k: int = 3
    patience: int = 0
    valid: str | None = None
    valid_labels: str | None = None
    valid_fraction: float = 0.2
    augment: dict = field(default_factory=dict)
    init: str | None = None
    freeze: bool = False
    segment_labels: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: str | None = None
    progress: bool = True
    prefetch: bool = True
    threads: int | None = None

    def semantic(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUME_FREE}


# ------------------------------------------------------------------------------ distributed
class Dist:
    """Rank info and the few collectives the trainer and objectives need (no-ops when world == 1)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1

    def init(self, device_type: str) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def allreduce_grads(self, params) -> None:
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist
        params = [p for p in params if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        o = 0
        for p in params:
            n = p.numel()
            g = flat[o:o + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            o += n

    def gather_rows(self, index, rows):
        """All ranks' (index (n,), rows (n, C)) concatenated (variable n per rank)."""
        if not self.enabled:
            return index, rows
        import torch
        import torch.distributed as dist
        n = torch.tensor([index.numel()], device=index.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        pi = torch.full((m,), -1, dtype=index.dtype, device=index.device)
        pr = torch.zeros((m,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        pi[:index.numel()], pr[:index.numel()] = index, rows
        gi = [torch.empty_like(pi) for _ in range(self.world)]
        gr = [torch.empty_like(pr) for _ in range(self.world)]
        dist.all_gather(gi, pi)
        dist.all_gather(gr, pr)
        i, r = torch.cat(gi), torch.cat(gr)
        keep = i >= 0
        return i[keep], r[keep]

    def broadcast_module(self, module) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)

    def any_flag(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        import torch
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


# ------------------------------------------------------------------------------ schedules
def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """LR multiplier at a global step (stateless, so --resume is exact)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    e = step / max(1, steps_per_epoch)
    warm = cfg.warmup_epochs
    if cfg.lr_schedule == "onecycle":
        pct = 0.3
        t = step / total
        if t < pct:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * t / pct)) / 2
        t = (t - pct) / (1 - pct)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * min(t, 1.0))) / 2
    if warm > 0 and e < warm:
        return max(1e-3, e / warm)
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        t = (e - warm) / max(1e-9, cfg.epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if cfg.lr_schedule == "cosine-restarts":
        t, period = e - warm, cfg.restart_epochs
        while t >= period:
            t -= period
            period *= cfg.restart_mult
        return 0.5 * (1 + math.cos(math.pi * t / period))
    if cfg.lr_schedule == "poly":
        t = (e - warm) / max(1e-9, cfg.epochs - warm)
        return max(0.0, 1 - min(1.0, t)) ** cfg.poly_power
    raise UsageError(f"unknown --lr-schedule {cfg.lr_schedule!r} (choose from {', '.join(LR_SCHEDULES)})")


def make_optimizer(cfg: TrainConfig, params):
    import torch
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    raise UsageError(f"unknown --optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")


class EMA:
    """Exponential moving average of weights (buffers copied)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def update(self, model) -> None:
        import torch
        with torch.no_grad():
            for e, p in zip(self.model.parameters(), model.parameters()):
                e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
            for e, b in zip(self.model.buffers(), model.buffers()):
                e.copy_(b)


# ------------------------------------------------------------------------------ validation
def evaluate_split(model, mem, rows, labels, label_rows, task, device, batch_size=128) -> dict[str, float]:
    """Validation figures on store rows: accuracy (single) or mAP (multi) + loss."""
    from pllcli.predict import infer
    if len(rows) == 0:
        return {}
    logits = infer(model, mem, rows, device, batch_size)["logits"]
    lr = label_rows[rows]
    if task == "multi":
        y = labels.tag_matrix(lr)
        p = 1 / (1 + np.exp(-logits))
        bce = -np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
        aps = []
        for c in range(y.shape[1]):
            if y[:, c].any():
                order = np.argsort(-p[:, c])
                hits = y[order, c]
                prec = np.cumsum(hits) / (np.arange(len(hits)) + 1)
                aps.append(float((prec * hits).sum() / hits.sum()))
        return {"mAP": float(np.mean(aps)) if aps else 0.0, "loss": float(bce)}
    y = labels.clean[lr].astype(np.int64)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return {"accuracy": float((logits.argmax(1) == y).mean()), "loss": float(-logp[np.arange(len(y)), y].mean())}


# ------------------------------------------------------------------------------ training
def _load_inputs(cfg: TrainConfig):
    from pllcli.features import FeatureStore
    from pllcli.labels.store import align_ids, read_label_store
    for p, what in ((cfg.features, "feature store"), (cfg.labels, "label store")):
        if not Path(p).exists():
            raise InputError(f"no such {what}", str(p))
    fs = FeatureStore(cfg.features)
    lab = read_label_store(cfg.labels)
    label_rows = align_ids(fs.ids, lab.ids, what=f"label store {cfg.labels}")
    return fs, lab, label_rows


def _select_rows(objectives, lab, label_rows) -> np.ndarray:
    kinds = set()
    for o in objectives:
        kinds.update(o.items)
    lr = label_rows
    m = np.zeros(len(lr), bool)
    if "clean" in kinds:
        m |= lab.clean[lr] >= 0
    if "candidates" in kinds:
        m |= (np.diff(lab.candidates_indptr)[lr] > 0) | (lab.clean[lr] >= 0)
    if "tags" in kinds:
        m |= lab.has_tags[lr]
    if "soft" in kinds:
        m |= lab.has_soft[lr]
    if "unlabeled" in kinds:
        m |= lab.unlabeled[lr]
    return np.flatnonzero(m)


def default_ema(objectives, decay: float = 0.99) -> float:
    """EMA decay to use when --ema is not given: `decay` if any objective needs an EMA teacher
    (objective attribute `needs_teacher`, e.g. mean-teacher), else 0 (off)."""
    from pllcli.training.objectives import build_objective
    return decay if any(getattr(build_objective(o), "needs_teacher", False) for o in objectives) else 0.0


def _batch_groups(cfg: TrainConfig, rows, lab, label_rows):
    """[(rows, share)] for epoch_batches: clean items (--clean-share), unlabeled (--unlabeled-share)."""
    for k in ("clean_share", "unlabeled_share"):
        v = getattr(cfg, k)
        if not 0 <= v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be in [0, 1), got {v}")
    if cfg.clean_share + cfg.unlabeled_share >= 1:
        raise UsageError("--clean-share + --unlabeled-share must be < 1")
    lr = label_rows[rows]
    groups = []
    if cfg.sampler == "hnh":
        groups.append((_hnh_group(rows, lab, lr), 0.5))
    if cfg.clean_share > 0:
        groups.append((rows[lab.clean[lr] >= 0], cfg.clean_share))
    if cfg.unlabeled_share > 0:
        groups.append((rows[lab.unlabeled[lr] & (lab.clean[lr] < 0)], cfg.unlabeled_share))
    groups = [g for g in groups if len(g[0])]
    return groups or None


def _hnh_group(rows, lab, lr):
    """Half-and-half batches (Morfi & Stowell): the rarer of positive clips (some tag) and negative
    clips (an empty tag list) as a group filling half of every batch, oversampled; the other kind
    fills the rest, so each epoch is one pass over the commoner kind."""
    if lab.task != "multi" or not lab.has_tags[lr].any():
        raise UsageError("--sampler hnh needs weak tags (a label store built with build-candidates --tags)")
    n_tags = np.diff(lab.tags_indptr)[lr]
    pos = rows[lab.has_tags[lr] & (n_tags > 0)]
    neg = rows[lab.has_tags[lr] & (n_tags == 0)]
    if len(neg) == 0:
        raise UsageError(f"--sampler hnh: all {len(pos)} tagged training clips are positive (none has an empty "
                         f"tag list), so half-and-half batches cannot be formed; leave --sampler hnh off")
    if len(pos) == 0:
        raise UsageError(f"--sampler hnh: all {len(neg)} tagged training clips are negative; leave --sampler hnh off")
    return neg if len(neg) <= len(pos) else pos


def _balanced_batches(cfg, rows, lab, label_rows, dist):
    """Class-balanced (PANNs) batches over the tagged rows, or None unless --sampler balanced."""
    if cfg.sampler != "balanced":
        return None
    from pllcli.sampling import ClassBalancedSampler
    from pllcli.training.data import _rank_slice
    lr = label_rows[rows]
    if lab.task != "multi" or not lab.has_tags[lr].any():
        raise UsageError("--sampler balanced needs weak tags (a label store built with build-candidates --tags)")
    tagged = rows[lab.has_tags[lr]]
    tl = label_rows[tagged]
    lists = [lab.tags_indices[lab.tags_indptr[i]:lab.tags_indptr[i + 1]] for i in tl]
    sampler = ClassBalancedSampler(lists, len(lab.classes), num_samples=len(rows), seed=cfg.seed)

    def for_epoch(epoch):
        sampler.set_epoch(epoch)
        seq = tagged[sampler.global_sequence()]
        out = [seq[i:i + cfg.batch_size] for i in range(0, len(seq), cfg.batch_size)]
        return _rank_slice(out, dist.rank, dist.world)
    return for_epoch


def _rng_state() -> dict:
    import random
    import torch
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_epoch_seed(seed: int, epoch: int, rank: int) -> None:
    import random
    import torch
    s = (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63)
    torch.manual_seed(s)
    random.seed(s)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a classifier; returns the summary (also written to OUTDIR/summary.json)."""
    import torch
    from pllcli.checkpoint import (check_feature_config, encoder_state, load_checkpoint, save_checkpoint)
    from pllcli.models import build_model
    from pllcli.runtime import resolve_device, set_seed, set_torch_threads
    from pllcli.training.augment import Augment, AugmentConfig
    from pllcli.training.data import InMemoryFeatures, LabelTensors, Prefetcher, epoch_batches
    from pllcli.training.objectives import SetupContext, StepContext, build_objective

    t_start = time.perf_counter()
    dist = Dist()
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    dist.init(device.type)
    set_torch_threads(cfg.threads)
    set_seed(cfg.seed)
    if cfg.epochs < 1:
        raise UsageError("--epochs must be >= 1")
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UsageError(f"unknown --lr-schedule {cfg.lr_schedule!r} (choose from {', '.join(LR_SCHEDULES)})")
    if not cfg.objectives:
        raise UsageError("no objectives given")
    outdir = Path(cfg.outdir)
    try:
        aug_cfg = AugmentConfig(**cfg.augment)
    except TypeError as e:
        raise UsageError(f"--augment: {e}") from None

    fs, lab, label_rows = _load_inputs(cfg)
    item_ids, preloaded, seg_info = fs.ids, None, None
    if cfg.segment_labels:  # PSL: every labelled segment becomes an item of its own
        from pllcli.training.segments import expand_segments
        f0, o0 = fs.load_all()
        f0, o0, item_ids, lab, label_rows, seg_info = expand_segments(
            f0, o0, fs.ids, lab, label_rows, fs.config.hop_length / fs.config.sample_rate, where=cfg.labels)
        preloaded = (f0, o0)
        log.info("segment labels: %d segments from %d clips (+%d whole clips), median %.2fs",
                 seg_info["segments"], seg_info["clips_split"], seg_info["clips_whole"],
                 seg_info["segment_seconds"] or 0.0)
    C = lab.num_classes
    if C < 2:
        raise TrainingError(f"{cfg.labels}: the label store has {C} class(es); training needs at least 2")
    task = lab.task
    if list(cfg.objectives) == list(DEFAULT_OBJECTIVES) and not (lab.clean[label_rows] >= 0).any():
        log.info("no clean labels: the default recipe trains on the candidate sets alone")
        cfg = dataclasses.replace(cfg, objectives=list(DEFAULT_OBJECTIVES_NO_CLEAN))
    objectives = [build_objective(s) for s in cfg.objectives]

    # ---- rows: training, validation
    rows = _select_rows(objectives, lab, label_rows)
    valid_mem = None
    valid_rows = np.zeros(0, np.int64)
    valid_lab, valid_label_rows = lab, label_rows
    if cfg.valid:
        from pllcli.features import FeatureStore
        from pllcli.labels.store import align_ids, read_label_store
        vfs = FeatureStore(cfg.valid)
        check_feature_config({"feature_config": fs.config.to_dict()}, vfs.config,
                             f"--valid {cfg.valid} vs {cfg.features}")
        valid_lab = read_label_store(cfg.valid_labels or cfg.labels)
        if list(valid_lab.classes) != list(lab.classes):
            raise InputError("validation label store has other classes than the training one",
                             cfg.valid_labels or cfg.labels, field="classes")
        valid_label_rows = align_ids(vfs.ids, valid_lab.ids, what="validation label store")
        ok = (valid_lab.has_tags[valid_label_rows] if task == "multi" else valid_lab.clean[valid_label_rows] >= 0)
        valid_rows = np.flatnonzero(ok)
        if len(valid_rows) == 0:
            raise InputError("the validation set has no items with a clean label" +
                             (" or tags" if task == "multi" else ""), cfg.valid)
        vf, vo = vfs.load_all()
        valid_mem = InMemoryFeatures(vf, vo, device)
    elif cfg.valid_fraction > 0:
        lr = label_rows[rows]
        ok = (lab.has_tags[lr] if task == "multi" else lab.clean[lr] >= 0)
        cand_rows = rows[ok]
        n_val = int(round(len(cand_rows) * cfg.valid_fraction))
        if n_val >= 1 and len(cand_rows) - n_val >= 1:
            rng = np.random.default_rng([cfg.seed, 99])
            valid_rows = np.sort(rng.choice(cand_rows, n_val, replace=False))
            rows = np.setdiff1d(rows, valid_rows)
    if len(rows) == 0:
        kinds = sorted({k for o in objectives for k in o.items})
        raise TrainingError(f"empty training set: no item of {cfg.features} has what the objectives need "
                            f"({', '.join(kinds)}) in {cfg.labels}")

    feats, offsets = preloaded if preloaded is not None else fs.load_all()
    del preloaded
    if not np.isfinite(feats).all():
        bad = np.flatnonzero(~np.isfinite(feats).all(1))[0]
        item = int(np.searchsorted(offsets, bad, side="right") - 1)
        raise InputError(f"features of item {item_ids[item]!r} contain NaN/inf", cfg.features)
    mem = InMemoryFeatures(feats, offsets, device)
    if valid_mem is None:
        valid_mem = mem
    del feats
    n_mels = mem.dim
    labels_t = LabelTensors(lab, label_rows)

    # ---- model
    model = build_model(cfg.model, n_mels, C, **cfg.model_options)
    init_meta = None
    if cfg.init:
        state, init_meta = load_checkpoint(cfg.init)
        check_feature_config(init_meta, fs.config, f"{cfg.features} vs --init {cfg.init}")
        enc = encoder_state(state, init_meta)
        try:
            missing, unexpected = model.encoder.load_state_dict(enc, strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"{cfg.init}: encoder weights do not fit model {cfg.model!r} "
                                  f"({str(e).splitlines()[0][:160]}); use the same --model and options") from None
        if unexpected or len(missing) == len(model.encoder.state_dict()):
            raise CheckpointError(f"{cfg.init}: encoder weights do not fit model {cfg.model!r} "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    else:
        mean, std = mem.stats(rows)
        model.encoder.norm.set_stats(mean, std)
    if cfg.freeze:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    model.to(device)
    dist.broadcast_module(model)
    pad_value = model.encoder.norm.mean.detach().to(mem.device)
    augment = Augment(aug_cfg, fill=model.encoder.norm.mean.detach())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    setup = SetupContext(num_items=len(item_ids), num_classes=C, device=device, task=task,
                         classes=list(lab.classes), dist=dist)
    for o in objectives:
        o.setup(setup)

    meta_base = {
        "kind": "classifier", "model": model.config, "classes": list(map(str, lab.classes)), "task": task,
        "feature_config": fs.config.to_dict(), "feature_config_hash": fs.config_hash,
        "train": {**cfg.semantic(), "objectives": [o.describe() for o in objectives]},
        "train_config": cfg.semantic(),
    }
    if seg_info is not None:
        # predict/evaluate average the probabilities of chunks of this length (PSL step 4)
        meta_base["segment_seconds"] = seg_info["segment_seconds"]
        meta_base["segments"] = seg_info
    try:
        from pllcli import __version__
        meta_base["pllcli_version"] = __version__
    except ImportError:  # pragma: no cover
        pass

    # ---- resume
    start_epoch, step = 0, 0
    monitor = ("mAP" if task == "multi" else "accuracy") if len(valid_rows) else "train_loss"
    higher = monitor != "train_loss"
    best_val, bad_epochs, history, topk = None, 0, [], []
    if cfg.resume:
        rpath = Path(cfg.resume)
        if rpath.is_dir():
            rpath = rpath / "last.pt"
        state, rmeta, extra = load_checkpoint(rpath, with_extra=True)
        if "trainer" not in extra:
            raise CheckpointError(f"{rpath}: has no trainer state (resume from OUTDIR/last.pt)")
        old = rmeta.get("train_config", {})
        new = cfg.semantic()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigMismatchError(
                f"--resume {rpath}: it was trained with another configuration; differing: "
                + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diff[:4])
                + (f" and {len(diff) - 4} more" if len(diff) > 4 else ""))
        if rmeta.get("feature_config_hash") != fs.config_hash:
            raise ConfigMismatchError(f"--resume {rpath}: feature store {cfg.features} has another feature config")
        tr = extra["trainer"]
        model.load_state_dict(tr["model"])
        opt.load_state_dict(tr["optimizer"])
        if ema is not None and "ema" in tr:
            ema.model.load_state_dict(tr["ema"])
        if "scaler" in tr and scaler.is_enabled():
            scaler.load_state_dict(tr["scaler"])
        for o in objectives:
            o.load_state_dict({k.split("/", 1)[1]: v.to(device) for k, v in tr["objectives"].items()
                               if k.split("/", 1)[0] == o.name})
        st = json.loads(tr["state"])
        start_epoch, step = st["epoch"], st["step"]
        best_val, bad_epochs, history, topk = st["best_val"], st["bad_epochs"], st["history"], st["topk"]
        log.info("resuming from %s at epoch %d", rpath, start_epoch)

    if dist.main:
        outdir.mkdir(parents=True, exist_ok=True)
    lengths_all = mem.num_frames
    if cfg.sampler not in ("natural", "hnh", "balanced"):
        raise UsageError(f"--sampler must be natural, hnh or balanced, got {cfg.sampler!r}")
    groups = _batch_groups(cfg, rows, lab, label_rows)
    balanced = _balanced_batches(cfg, rows, lab, label_rows, dist)

    def batches_for(epoch):
        if balanced is not None:
            return balanced(epoch)
        return epoch_batches(rows, lengths_all, cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world,
                             groups=groups)
    steps_per_epoch = len(batches_for(0))
    total_steps = steps_per_epoch * cfg.epochs

    def fwd(x, lengths, model=model):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            return model(x, lengths)

    def make_batch(b):
        rng = np.random.default_rng([cfg.seed, int(b[0]), step_box[0], dist.rank])
        x, lens = mem.gather(b, cfg.max_frames, rng, pad_value)
        batch = labels_t.batch(b)
        batch["x_raw"], batch["lengths"] = x, lens
        if device.type == "cuda":
            batch = {k: (v.pin_memory() if v.device.type == "cpu" else v) for k, v in batch.items()}
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    step_box = [0]
    pbar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm
        pbar = tqdm(total=total_steps, initial=step, file=sys.stderr, unit="step", dynamic_ncols=True,
                    desc="train", mininterval=1.0 if sys.stderr.isatty() else 30.0)
    log_path = outdir / "log.jsonl"
    stopped_early = False
    last_good = None
    for epoch in range(start_epoch, cfg.epochs):
        _set_epoch_seed(cfg.seed, epoch, dist.rank)
        step_box[0] = epoch
        model.train()
        if cfg.freeze:
            model.encoder.eval()
        batches = batches_for(epoch)
        pf = Prefetcher(make_batch, batches, thread=cfg.prefetch and mem.device.type == "cpu")
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n_items = 0
        for bi, batch in enumerate(pf):
            progress = epoch + bi / max(1, len(batches))
            f = lr_factor(cfg, step, steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * f
            batch["x"] = augment(batch["x_raw"], batch["lengths"])
            out = fwd(batch["x"], batch["lengths"])
            ctx = StepContext(model, batch, out, epoch=epoch, step=step, progress=progress, epochs=cfg.epochs,
                              num_classes=C, task=task, device=device, forward=fwd, augment=augment,
                              teacher=ema.model if ema is not None else None, dist=dist)
            total = None
            parts = {}
            for o in objectives:
                w = o.weight(progress)
                if w == 0:
                    with torch.no_grad():
                        o.observe(ctx)
                    continue
                lo = o.loss(ctx)
                if lo is None:
                    continue
                parts[o.name] = float(lo.detach())
                total = w * lo if total is None else total + w * lo
            nonfinite = total is not None and not bool(torch.isfinite(total.detach()))
            if dist.any_flag(nonfinite):
                ids = [str(item_ids[i]) for i in batch["index"][:3].tolist()]
                raise TrainingError(
                    f"loss became NaN/inf at epoch {epoch + 1}, batch {bi + 1} (items {', '.join(ids)}, ...; "
                    f"parts {parts}); last good checkpoint: "
                    f"{last_good or (outdir / 'last.pt' if (outdir / 'last.pt').exists() else 'none')}; "
                    f"try a lower --lr")
            opt.zero_grad(set_to_none=True)
            if total is not None:
                scaler.scale(total).backward()
            dist.allreduce_grads(params)
            if total is not None or dist.enabled:
                scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
            if ema is not None:
                ema.update(model)
            bs = int(batch["index"].numel())
            n_items += bs
            sums["loss"] = sums.get("loss", 0.0) + (float(total.detach()) if total is not None else 0.0) * bs
            for k, v in parts.items():
                sums["loss_" + k] = sums.get("loss_" + k, 0.0) + v * bs
            step += 1
            if pbar is not None:
                pbar.update(1)
                if bi % 10 == 0 or bi == len(batches) - 1:
                    pbar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{sums['loss'] / n_items:.3f}",
                                     **({monitor: f"{best_val:.3f}"} if best_val is not None else {}),
                                     refresh=False)
        for o in objectives:
            o.end_epoch(epoch)
        train_time = time.perf_counter() - t0
        dist.broadcast_module(model)
        if ema is not None:
            dist.broadcast_module(ema.model)
        eval_model = ema.model if ema is not None else model
        rec: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": cfg.lr * lr_factor(cfg, step - 1, steps_per_epoch)}
        rec.update({k: v / max(1, n_items) for k, v in sums.items()})
        for o in objectives:
            rec["weight_" + o.name] = o.weight(epoch + 1 - 1e-9)
            rec.update(o.metrics())
        if len(valid_rows):
            vm = evaluate_split(eval_model, valid_mem, valid_rows, valid_lab, valid_label_rows, task, device)
            rec.update({"val_" + k: v for k, v in vm.items()})
            value = vm[monitor]
        else:
            value = rec.get("loss", 0.0)
        rec["monitor"], rec["monitor_value"] = ("val_" + monitor if len(valid_rows) else monitor), value
        rec["time_s"] = round(train_time, 3)
        rec["data_wait_share"] = round(pf.wait / max(1e-9, train_time), 4)
        rec["items_per_s"] = round(n_items * dist.world / max(1e-9, train_time), 1)
        if len(valid_rows):
            improved = best_val is None or (value > best_val if higher else value < best_val)
            rank_value, rank_higher = value, higher
        else:
            # No validation split: training losses of epochs with different objective mixes
            # (warm start, ramp-ups) are not comparable, so the latest epoch is the best one.
            improved, rank_value, rank_higher = True, float(epoch + 1), True
        if improved:
            best_val, bad_epochs = value, 0
        else:
            bad_epochs += 1
        history.append(rec)
        metrics = {k: v for k, v in rec.items() if k.startswith("val_") or k in ("loss", "epoch")}
        if dist.main:
            meta = {**meta_base, "epoch": epoch + 1, "metrics": metrics}
            if improved:
                save_checkpoint(outdir / "best.pt", eval_model, meta)
            # top-k checkpoints (by the monitored value) for weight averaging
            if cfg.top_k > 0:
                tk_path = outdir / "topk" / f"epoch{epoch + 1:04d}.pt"
                topk.append({"epoch": epoch + 1, "value": rank_value, "path": str(tk_path)})
                topk.sort(key=lambda r: -r["value"] if rank_higher else r["value"])
                save_checkpoint(tk_path, eval_model, meta)
                for r in topk[cfg.top_k:]:
                    Path(r["path"]).unlink(missing_ok=True)
                topk = topk[:cfg.top_k]
            trainer_state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "objectives": {f"{o.name}/{k}": v for o in objectives for k, v in o.state_dict().items()},
                "rng": _rng_state(),
                "state": json.dumps({"epoch": epoch + 1, "step": step, "best_val": best_val,
                                     "bad_epochs": bad_epochs, "history": history, "topk": topk}),
            }
            if ema is not None:
                trainer_state["ema"] = ema.model.state_dict()
            if scaler.is_enabled():
                trainer_state["scaler"] = scaler.state_dict()
            save_checkpoint(outdir / "last.pt", eval_model, meta, extra={"trainer": trainer_state})
            last_good = outdir / "last.pt"
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            log.info("epoch %d/%d loss %.4f %s %.4f (%.1fs, data wait %.1f%%)", epoch + 1, cfg.epochs,
                     rec.get("loss", float("nan")), rec["monitor"], value, train_time,
                     100 * rec["data_wait_share"])
        if cfg.patience > 0 and bad_epochs >= cfg.patience:
            stopped_early = True
            log.info("early stopping: no improvement of %s for %d epochs", monitor, cfg.patience)
            break
    if pbar is not None:
        pbar.close()

    summary: dict[str, Any] = {}
    if dist.main:
        summary = _finish(cfg, outdir, history, topk, meta_base, model, valid_mem, valid_rows, valid_lab,
                          valid_label_rows, task, device, monitor, higher, best_val, stopped_early,
                          len(rows), time.perf_counter() - t_start)
    dist.barrier()
    dist.close()
    return summary


def _finish(cfg, outdir, history, topk, meta_base, model, valid_mem, valid_rows, valid_lab, valid_label_rows,
            task, device, monitor, higher, best_val, stopped_early, n_train, wall):
    import torch
    from pllcli.checkpoint import load_checkpoint, save_checkpoint
    from pllcli.io import write_json
    averaged = None
    if topk:
        states = [load_checkpoint(r["path"])[0] for r in topk]
        avg = {}
        for k in states[0]:
            if states[0][k].is_floating_point():
                avg[k] = sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype)
            else:
                avg[k] = states[0][k]
        m = copy.deepcopy(model).cpu()
        m.load_state_dict(avg)
        m.to(device)
        metrics = {}
        if len(valid_rows):
            vm = evaluate_split(m, valid_mem, valid_rows, valid_lab, valid_label_rows, task, device)
            metrics = {"val_" + k: v for k, v in vm.items()}
        save_checkpoint(outdir / "averaged.pt", m, {**meta_base, "epoch": history[-1]["epoch"] if history else 0,
                                                    "metrics": metrics,
                                                    "averaged_from": [r["epoch"] for r in topk]})
        averaged = metrics
    times = [h["time_s"] for h in history]
    waits = [h["data_wait_share"] * h["time_s"] for h in history]
    summary = {
        "outdir": str(outdir), "epochs_run": len(history), "stopped_early": stopped_early,
        "train_items": int(n_train), "valid_items": int(len(valid_rows)), "monitor": monitor,
        "best": {"value": best_val, "epoch": next((h["epoch"] for h in history if h["monitor_value"] == best_val), None)},
        "averaged": averaged, "averaged_from": [r["epoch"] for r in topk],
        "last": history[-1] if history else None,
        "epoch_time_s": float(np.mean(times)) if times else None,
        "data_wait_share": float(sum(waits) / max(1e-9, sum(times))) if times else None,
        "wall_s": round(wall, 2), "device": str(device),
        "checkpoints": {k: str(outdir / f"{k}.pt") for k in ("best", "last", "averaged")
                        if (outdir / f"{k}.pt").exists()},
    }
    write_json(summary, outdir / "summary.json")
    del torch
    return summary
