"""`pllcli train`: a classifier trained by the engine on a feature store and a label store.

    train(TrainConfig(features=..., labels=..., outdir=...)) -> summary dict

Data (`--data`): the feature store is loaded into memory once (`FeatureStore.load_all`) and
batched with a vectorised gather (random crops, padding), or streamed from disk with bounded
memory (`pllcli.training.stream`: other batch compositions, the same crops of the same items);
`auto` streams when the store exceeds `--max-memory`. Labels come from the label store joined
by id (feature ids the store lacks count as unlabeled). Loss: the sum of objectives (see
`objectives`), each weighted by its schedule; the default recipe is DEFAULT_OBJECTIVES with
`clean_share` of every batch drawn from the clean items (the README has its figures).

Outputs in OUTDIR: best.pt, last.pt (with the resume state), averaged.pt (top-k checkpoint
average), log.jsonl (one line per epoch), summary.json. Under `torchrun` (WORLD_SIZE > 1) it
runs data-parallel (see `distributed`); only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pllcli.errors import CheckpointError, InputError, TrainingError, UsageError
from pllcli.training.config import (DEFAULT_CLEAN_SHARE, DEFAULT_OBJECTIVES,  # noqa: F401 (re-exported)
                                    DEFAULT_OBJECTIVES_NO_CLEAN, LR_SCHEDULES, OPTIMIZERS, TrainConfig)

log = logging.getLogger(__name__)


def default_ema(objectives, decay: float = 0.99) -> float:
    """EMA decay to use when --ema is not given: `decay` if any objective needs an EMA teacher
    (objective attribute `needs_teacher`, e.g. mean-teacher), else 0 (off)."""
    from pllcli.training.objectives import build_objective
    return decay if any(getattr(build_objective(o), "needs_teacher", False) for o in objectives) else 0.0


def engine_config(cfg: TrainConfig, **kw):
    """The engine settings of a TrainConfig (also used by `train --when-who`)."""
    from pllcli.training.engine import EngineConfig
    from pllcli.training.schedules import Schedule
    sched = Schedule(str(cfg.lr_schedule), cfg.epochs, cfg.warmup_epochs, cfg.restart_epochs, cfg.restart_mult,
                     cfg.poly_power)
    return EngineConfig(epochs=cfg.epochs, lr=cfg.lr, optimizer=str(cfg.optimizer), weight_decay=cfg.weight_decay,
                        momentum=cfg.momentum, schedule=sched, grad_clip=cfg.grad_clip, ema=cfg.ema, amp=cfg.amp,
                        patience=cfg.patience, seed=cfg.seed, progress=cfg.progress, prefetch=cfg.prefetch,
                        resume=cfg.resume, resume_config=cfg.semantic(), save_every_steps=cfg.save_every_steps,
                        save_every_seconds=cfg.save_every_seconds, **kw)


def load_labels(features_ids, path, what: str = "label store"):
    """(labels, label_rows) for feature ids: ids missing from the store are added as unlabeled."""
    from pllcli.labels.store import cover_features, read_label_store
    if not Path(path).exists():
        raise InputError(f"no such {what}", str(path))
    lab, rows, added = cover_features(read_label_store(path), features_ids, where=what)
    return lab, rows, added


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a classifier; returns the summary (also written to OUTDIR/summary.json)."""
    from pllcli.runtime import set_torch_threads
    from pllcli.training.checkpoints import Checkpoints
    from pllcli.training.classify import ClassifierTask
    from pllcli.training.distributed import start
    from pllcli.training.engine import Engine

    t_start = time.perf_counter()
    set_torch_threads(cfg.threads)
    dist, device = start(cfg.device, cfg.seed)
    outdir = Path(cfg.outdir)
    inp = _Inputs(cfg, device)
    cfg, objectives = inp.cfg, inp.objectives
    model = _build_model(cfg, inp, device)
    dist.broadcast_module(model)
    augment = _augment(cfg, model, inp.fs.config)
    loader = _stream_loader(cfg, inp, model, dist, device) if inp.path == "stream" else None
    task = ClassifierTask(model, inp.mem, inp.labels_t, inp.item_ids, objectives, augment,
                          loader.epoch if loader is not None else _batches(cfg, inp, dist),
                          seed=cfg.seed, epochs=cfg.epochs, num_classes=inp.C, task=inp.task, device=device,
                          dist=dist, max_frames=cfg.max_frames, freeze=cfg.freeze,
                          valid=inp.valid, loader=loader)
    _setup_objectives(objectives, inp, device, dist)
    meta = _meta(cfg, inp, model, objectives)
    ckpt = Checkpoints(outdir / "last.pt", outdir / "best.pt", outdir / "topk", cfg.top_k, meta)
    if dist.main:
        outdir.mkdir(parents=True, exist_ok=True)
    engine = Engine(task, engine_config(cfg), ckpt, outdir / "log.jsonl", device, dist)
    engine.fit()
    summary: dict[str, Any] = {}
    if dist.main:
        summary = _finish(engine, task, outdir, meta, inp, time.perf_counter() - t_start)
    dist.barrier()
    dist.close()
    return summary


def data_path(cfg, fs, unsupported: dict) -> tuple[str, str]:
    """("memory" | "stream", reason) for cfg.data / cfg.max_memory on store `fs` (or a list of
    stores, together); `unsupported`
    {flag: on} lists what the stream path cannot do yet: under `auto` they keep the store in
    memory, under `--data stream` they are a UsageError. Every local rank decides the same."""
    from pllcli.training.stream import choose_data_path, in_memory_bytes
    flags = [f for f, on in unsupported.items() if on]
    if flags and cfg.data == "stream":
        raise UsageError(f"--data stream does not support {' or '.join(flags)} yet; use --data memory (or auto)")
    if flags and cfg.data == "auto":
        return "memory", f"data path: memory (--data auto: {' and '.join(flags)} need(s) the store in memory)"
    need = sum(in_memory_bytes(f) for f in (fs if isinstance(fs, (list, tuple)) else [fs]))
    return choose_data_path(need, cfg.max_memory, cfg.data,
                            procs=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class _Inputs:
    """Feature store (in memory or streamed), labels joined by id, objectives, training and validation rows."""

    def __init__(self, cfg: TrainConfig, device):
        from pllcli.features import FeatureStore
        from pllcli.training.data import InMemoryFeatures, LabelTensors
        from pllcli.training.objectives import build_objective
        from pllcli.training.selection import select_rows
        if not Path(cfg.features).exists():
            raise InputError("no such feature store", str(cfg.features))
        fs = FeatureStore(cfg.features)
        lab, label_rows, self.added = load_labels(fs.ids, cfg.labels)
        self.fs, self.item_ids, self.seg_info = fs, fs.ids, None
        self.path, self.path_reason = data_path(cfg, fs, {"--segment-labels": cfg.segment_labels,
                                                          "--sampler balanced": cfg.sampler == "balanced"})
        log.info("%s", self.path_reason)
        feats, offsets = fs.load_all() if self.path == "memory" else (None, fs.offsets)
        if cfg.segment_labels:  # PSL: every labelled segment becomes an item of its own
            from pllcli.training.segments import expand_segments
            feats, offsets, self.item_ids, lab, label_rows, self.seg_info = expand_segments(
                feats, offsets, fs.ids, lab, label_rows, fs.config.hop_length / fs.config.sample_rate,
                where=cfg.labels)
            si = self.seg_info
            log.info("segment labels: %d segments from %d clips (+%d whole clips), median %.2fs",
                     si["segments"], si["clips_split"], si["clips_whole"], si["segment_seconds"] or 0.0)
        self.C, self.task = lab.num_classes, lab.task
        if self.C < 2:
            raise TrainingError(f"{cfg.labels}: the label store has {self.C} class(es); training needs at least 2")
        if list(cfg.objectives) == list(DEFAULT_OBJECTIVES) and not (lab.clean[label_rows] >= 0).any():
            log.info("no clean labels: the default recipe trains on the candidate sets alone")
            cfg = dataclasses.replace(cfg, objectives=list(DEFAULT_OBJECTIVES_NO_CLEAN))
        self.cfg, self.lab, self.label_rows = cfg, lab, label_rows
        self.objectives = [build_objective(s) for s in cfg.objectives]
        rows = select_rows(self.objectives, lab, label_rows)
        if self.path == "memory":
            _check_finite(feats, offsets, self.item_ids, cfg.features)
            self.mem = InMemoryFeatures(feats, offsets, device)
            del feats
        else:  # NaN/inf: the input statistics (_build_model) read every training frame and name it
            from pllcli.training.data import nonfinite_error
            from pllcli.training.stream import StoreFeatures, nonfinite_rows
            self.mem = StoreFeatures(fs)
            if cfg.init and len(bad := nonfinite_rows(fs, rows)):
                raise nonfinite_error(fs.ids, bad, cfg.features)
        self.rows, self.valid = _validation(cfg, self, rows, device)
        if len(self.rows) == 0:
            kinds = sorted({k for o in self.objectives for k in o.items})
            raise TrainingError(f"empty training set: no item of {cfg.features} has what the objectives need "
                                f"({', '.join(kinds)}) in {cfg.labels}")
        self.labels_t = LabelTensors(lab, label_rows)


def _check_finite(feats, offsets, item_ids, where) -> None:
    from pllcli.training.data import nonfinite_error, nonfinite_items
    bad = nonfinite_items(feats, offsets)
    if len(bad):
        raise nonfinite_error(item_ids, bad, where)


def _validation(cfg: TrainConfig, inp: _Inputs, rows, device):
    """(training rows, Validation or None): --valid stores, else a --valid-fraction of the rows."""
    from pllcli.checkpoint import check_feature_config
    from pllcli.training.classify import Validation
    from pllcli.training.data import InMemoryFeatures
    lab, label_rows, task = inp.lab, inp.label_rows, inp.task
    if cfg.valid:
        from pllcli.features import FeatureStore
        vfs = FeatureStore(cfg.valid)
        check_feature_config({"feature_config": inp.fs.config.to_dict()}, vfs.config,
                             f"--valid {cfg.valid} vs {cfg.features}")
        vlab, vrows, _ = load_labels(vfs.ids, cfg.valid_labels or cfg.labels, "validation label store")
        if list(vlab.classes) != list(lab.classes):
            raise InputError("validation label store has other classes than the training one",
                             cfg.valid_labels or cfg.labels, field="classes")
        ok = vlab.has_tags[vrows] if task == "multi" else vlab.clean[vrows] >= 0
        if not ok.any():
            raise InputError("the validation set has no items with a clean label" +
                             (" or tags" if task == "multi" else ""), cfg.valid)
        if inp.path == "memory":
            vmem = InMemoryFeatures(*vfs.load_all(), device)
        else:
            from pllcli.training.stream import StoreFeatures
            vmem = StoreFeatures(vfs)
        return rows, Validation(vmem, np.flatnonzero(ok), vlab, vrows, task, device)
    if cfg.valid_fraction > 0:
        lrows = label_rows[rows]
        cand_rows = rows[lab.has_tags[lrows] if task == "multi" else lab.clean[lrows] >= 0]
        n_val = int(round(len(cand_rows) * cfg.valid_fraction))
        if n_val >= 1 and len(cand_rows) - n_val >= 1:
            rng = np.random.default_rng([cfg.seed, 99])
            valid_rows = np.sort(rng.choice(cand_rows, n_val, replace=False))
            return np.setdiff1d(rows, valid_rows), Validation(inp.mem, valid_rows, lab, label_rows, task, device)
    return rows, None


def _build_model(cfg: TrainConfig, inp: _Inputs, device):
    """The model, with --init encoder weights (or input statistics of the training rows), --freeze."""
    from pllcli.checkpoint import check_feature_config, encoder_state, load_checkpoint
    from pllcli.models import build_model
    model = build_model(cfg.model, inp.mem.dim, inp.C, **cfg.model_options)
    if cfg.init:
        state, init_meta = load_checkpoint(cfg.init)
        check_feature_config(init_meta, inp.fs.config, f"{cfg.features} vs --init {cfg.init}")
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
        mean, std = inp.mem.stats(inp.rows)
        model.encoder.norm.set_stats(mean, std)
    if cfg.freeze:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    return model.to(device)


def _augment(cfg: TrainConfig, model, features):
    """--augment over the defaults for the store's frames (`AugmentConfig.for_features`)."""
    import dataclasses

    from pllcli.training.augment import Augment, AugmentConfig
    from pllcli.spec import coerce
    base = AugmentConfig.for_features(features.frontend, features.sample_rate / features.hop_length)
    aug = dataclasses.replace(base, **coerce(AugmentConfig, cfg.augment, "--augment"))
    return Augment(aug, fill=model.encoder.norm.mean.detach())


def _batches(cfg: TrainConfig, inp: _Inputs, dist):
    """epoch -> this rank's batches of training rows (class-balanced, or grouped by --clean-share etc.)."""
    from pllcli.training.data import epoch_batches
    from pllcli.training.selection import balanced_batches, batch_groups
    balanced = balanced_batches(cfg, inp.rows, inp.lab, inp.label_rows, dist)
    if balanced is not None:
        return balanced
    groups = batch_groups(cfg, inp.rows, inp.lab, inp.label_rows)
    lengths = inp.mem.num_frames

    def for_epoch(epoch):
        return epoch_batches(inp.rows, lengths, cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world, groups=groups)
    return for_epoch


def _stream_loader(cfg: TrainConfig, inp: _Inputs, model, dist, device):
    """The StreamLoader of the training rows (batch groups as `_batches`; pad value = the input mean)."""
    from pllcli.training.selection import batch_groups
    from pllcli.training.stream import make_loader
    loader = make_loader(inp.fs, inp.rows, batch_size=cfg.batch_size, max_memory=cfg.max_memory,
                         workers=cfg.loader_workers, device=device, procs=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                         max_frames=cfg.max_frames, seed=cfg.seed, pad_value=model.encoder.norm.mean,
                         labels=inp.labels_t, rank=dist.rank, world=dist.world, x_key="x_raw",
                         groups=batch_groups(cfg, inp.rows, inp.lab, inp.label_rows))
    log.info("%s", loader.describe())
    return loader


def _setup_objectives(objectives, inp: _Inputs, device, dist) -> None:
    from pllcli.training.objectives import SetupContext
    setup = SetupContext(num_items=len(inp.item_ids), num_classes=inp.C, device=device, task=inp.task,
                         classes=list(inp.lab.classes), dist=dist)
    for o in objectives:
        o.setup(setup)


def _meta(cfg: TrainConfig, inp: _Inputs, model, objectives) -> dict:
    from pllcli import __version__
    meta = {
        "kind": "classifier", "model": model.config, "classes": list(map(str, inp.lab.classes)), "task": inp.task,
        "feature_config": inp.fs.config.to_dict(), "feature_config_hash": inp.fs.config_hash,
        "train": {**cfg.semantic(), "objectives": [o.describe() for o in objectives]},
        "train_config": cfg.semantic(), "pllcli_version": __version__,
    }
    if inp.seg_info is not None:
        # predict/evaluate average the probabilities of chunks of this length (PSL step 4)
        meta["segment_seconds"] = inp.seg_info["segment_seconds"]
        meta["segments"] = inp.seg_info
    return meta


def _finish(engine, task, outdir: Path, meta: dict, inp: _Inputs, wall: float) -> dict:
    """averaged.pt (top-k average, validated) and summary.json."""
    from pllcli.io import write_json
    st = engine.state
    averaged = engine.save_average(outdir / "averaged.pt", meta)
    hist = st.history
    times = [h["time_s"] for h in hist]
    waits = [h["data_wait_share"] * h["time_s"] for h in hist]
    summary = {
        "outdir": str(outdir), "epochs_run": len(hist), "stopped_early": engine.stopped_early,
        "train_items": int(len(inp.rows)), "valid_items": int(len(inp.valid)) if inp.valid is not None else 0,
        "features_not_in_labels": int(inp.added), "monitor": task.monitor,
        "best": {"value": st.best_val,
                 "epoch": next((h["epoch"] for h in hist if h["monitor_value"] == st.best_val), None)},
        "averaged": averaged, "averaged_from": [r["epoch"] for r in st.topk],
        "last": hist[-1] if hist else None,
        "epoch_time_s": float(np.mean(times)) if times else None,
        "data_wait_share": float(sum(waits) / max(1e-9, sum(times))) if times else None,
        "wall_s": round(wall, 2), "device": str(engine.device),
        "data": {"path": inp.path, "reason": inp.path_reason},
        "checkpoints": {k: str(outdir / f"{k}.pt") for k in ("model", "best", "last", "averaged")
                        if (outdir / f"{k}.pt").exists()},
    }
    write_json(summary, outdir / "summary.json")
    return summary
