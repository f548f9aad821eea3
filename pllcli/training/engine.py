"""The training engine: the one loop in pllcli that steps an optimiser.

A *task* (classifier training, WHEN/WHO, pretraining) supplies the model, its batches, the
step loss and validation; the engine does the rest: optimisers and LR schedules, AMP, EMA,
DDP, gradient clipping, NaN checks, checkpoints with the resume state, top-k averaging, early
stopping, progress and `log.jsonl`.

    engine = Engine(task, EngineConfig(epochs=10, lr=3e-3), Checkpoints(out / "last.pt", ...),
                    log_path=out / "log.jsonl")
    state = engine.fit()            # a RunState: history, best value, top-k list
    engine.save_average(out / "averaged.pt", meta)   # the top-k average, validated (None without top-k)
                                                     # then model.pt, the file to deploy (Checkpoints.save_model)

Per epoch, each `Phase` of the task (one optimiser over some parameters, e.g. WHEN then WHO)
runs its batches: `task.batch(phase, key, epoch)` (in a prefetch thread) -> `task.loss(phase,
batch, step)` -> backward, clip, step, schedule, EMA. Then the task validates the evaluation
model (the EMA when on) and the checkpoints are written.

A phase whose batches come from a `pllcli.training.stream.StreamLoader` (`Phase.loader`) is
iterated directly (its DataLoader workers prefetch; data wait is the loader's), and the loader's
position is part of the resume state. A run stopped by KeyboardInterrupt between two steps (one
process) writes last.pt with its position in the epoch; `--resume` then continues at the next
batch, exactly as the uninterrupted run would have. `save_every_steps` / `save_every_seconds`
write the same mid-epoch last.pt periodically (under torchrun too, with every rank's RNG and
BatchNorm statistics). The log says whether a resume is mid-epoch or at an epoch boundary.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pllcli.errors import CheckpointError, TrainingError
from pllcli.training.checkpoints import Checkpoints, RunState, average_states, load_resume
from pllcli.training.distributed import Dist
from pllcli.training.progress import Progress
from pllcli.training.schedules import Schedule, make_optimizer

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    epochs: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Schedule = field(default_factory=lambda: Schedule("constant"))
    grad_clip: float = 5.0
    ema: float = 0.0             # EMA decay of the evaluation model (0 = off)
    amp: bool = False            # CUDA only: bf16 where supported, else fp16 with a GradScaler
    patience: int = 0            # early stopping on the task's monitored value (0 = off)
    seed: int = 0
    progress: bool = True
    prefetch: bool = True
    desc: str = "train"
    resume: str | None = None    # a last.pt (or its folder) to continue from
    resume_config: dict = field(default_factory=dict)  # must match the saved run's
    save_every_steps: int = 0      # also write last.pt mid-epoch every N steps (one process; 0 = off)
    save_every_seconds: float = 0.0  # ... or every so many seconds of training


@dataclass
class Phase:
    """One optimiser over `params`, fed each epoch by `batches(epoch)` (keys for `task.batch`)."""

    name: str
    params: list
    batches: Callable[[int], Sequence]
    loader: Any = None         # a StreamLoader when `batches` is its `epoch` (streamed data)


@dataclass
class Step:
    """What `task.loss` gets besides the batch."""

    epoch: int
    step: int                  # global step
    index: int                 # batch number in this phase's epoch
    progress: float            # fractional epoch
    forward: Callable          # forward(x, lengths, model=None, **kw): autocast, through DDP
    teacher: Any               # EMA model (no grad) or None
    dist: Dist


class Task:
    """Hooks the engine calls; see the module docstring. `model` is trained, checkpointed, averaged."""

    model: Any
    monitor: str = "loss"     # a key of the epoch record (e.g. "val_accuracy"); see `Engine._judge`
    higher: bool = False
    prefetch_thread: bool = True  # build batches in a thread (off when they are gathered on the GPU)

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def batch(self, phase: Phase, key, epoch: int) -> dict:
        raise NotImplementedError

    def loss(self, phase: Phase, batch: dict, step: Step):
        """-> (loss tensor or None, {part: float}, number of items)."""
        raise NotImplementedError

    def train_mode(self, model) -> None:
        model.train()

    def validate(self, model) -> dict:
        """Validation figures ({"val_...": float}); {} when the task has no validation split."""
        return {}

    def end_epoch(self, epoch: int) -> dict:
        """Extra figures for the epoch record."""
        return {}

    def describe(self, batch: dict) -> str:
        """Which items a batch holds (for the NaN error)."""
        return "?"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Engine:
    def __init__(self, task: Task, cfg: EngineConfig, checkpoints: Checkpoints | None = None,
                 log_path: str | Path | None = None, device=None, dist: Dist | None = None):
        import torch
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        self.task, self.cfg, self.ckpt = task, cfg, checkpoints
        self.log_path = Path(log_path) if log_path else None
        self.dist = dist or Dist()
        self.device = device or torch.device("cpu")
        self.model = task.model
        self.net = self.dist.wrap(self.model)
        self.phases = task.phases()
        self.opts = [make_optimizer(cfg.optimizer, p.params, cfg.lr, cfg.weight_decay, cfg.momentum)
                     for p in self.phases]
        self.steps_per_epoch = [max(1, len(p.loader) if p.loader is not None else len(p.batches(0)))
                                for p in self.phases]
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, _factor(cfg.schedule, n))
                       for o, n in zip(self.opts, self.steps_per_epoch)]
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema > 0 else None
        self.use_amp = bool(cfg.amp) and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.state = RunState()
        self.stopped_early = False
        self._last_lr = cfg.lr
        self._pos: dict | None = None     # where the epoch is (for a save on interrupt)
        self._mutating = False            # inside an optimiser step: no consistent state to save
        self._saved_at = (0, time.perf_counter())  # (step, time) of the last mid-epoch save

    @property
    def eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------ the loop
    def fit(self) -> RunState:
        at = self._resume(self.cfg.resume) if self.cfg.resume else None
        st, cfg = self.state, self.cfg
        bar = Progress(sum(self.steps_per_epoch) * cfg.epochs, st.step, cfg.desc, cfg.progress and self.dist.main)
        try:
            for epoch in range(st.epoch, cfg.epochs):
                _seed_epoch(cfg.seed, epoch, self.dist.rank)
                self.task.train_mode(self.model)
                t0, sums, waits, first, skip = time.perf_counter(), {}, 0.0, 0, 0
                if at is not None:  # resumed mid-epoch: its first batches are done
                    first, skip, sums, waits, t0 = at["phase"], at["batches"], at["sums"], at["wait"], t0 - at["time"]
                    _set_rng(at["rng"])
                    at = None
                for pi in range(first, len(self.phases)):
                    self._pos = {"epoch": epoch, "phase": pi, "batches": skip if pi == first else 0, "sums": sums,
                                 "wait": waits, "t0": t0, **self._snapshot()}
                    waits += self._run_phase(pi, epoch, sums, bar, skip if pi == first else 0, waits)
                self._pos = None
                rec = self._end_epoch(epoch, sums, time.perf_counter() - t0, waits)
                bar.epoch(_epoch_line(rec, cfg.epochs))
                if st.stop(cfg.patience):
                    self.stopped_early = True
                    log.info("early stopping: no improvement of %s for %d epochs", self.task.monitor, cfg.patience)
                    break
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        finally:
            bar.close()
        return st

    def _run_phase(self, pi: int, epoch: int, sums: dict, bar, skip: int = 0, wait0: float = 0.0) -> float:
        """One phase's batches of `epoch` (after the first `skip`, done before a resume); -> data wait (s)."""
        from pllcli.training.data import Prefetcher
        phase, opt, sched = self.phases[pi], self.opts[pi], self.scheds[pi]
        keys = phase.batches(epoch)
        streamed = hasattr(keys, "wait")
        if streamed:  # a StreamEpoch: its workers prefetch (or, without any, a thread)
            skip, total = keys.start, keys.total   # it skipped what a resume consumed
            src = keys if keys.loader.num_workers else Prefetcher(
                lambda b: b, keys, thread=self.cfg.prefetch and self.task.prefetch_thread, lazy=True)
        else:
            total = len(keys)
            src = Prefetcher(lambda k: self.task.batch(phase, k, epoch), list(keys)[skip:],
                             thread=self.cfg.prefetch and self.task.prefetch_thread)
        for bi, batch in enumerate(src, start=skip):
            if streamed:  # the loader built it; the task may pass it through or finish it
                batch = self.task.batch(phase, batch, epoch)
            step = Step(epoch, self.state.step, bi, epoch + bi / max(1, total), self._forward,
                        self.ema.module if self.ema is not None else None, self.dist)
            loss, parts, n = self.task.loss(phase, batch, step)
            self._mutating = True
            self._optimize(opt, phase, loss, parts, batch, epoch, bi)
            self._last_lr = opt.param_groups[0]["lr"]
            sched.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.state.step += 1
            _accumulate(sums, phase, loss, parts, n)
            self._mutating = False
            self._pos.update(batches=bi + 1, wait=wait0 + src.wait, **self._snapshot())
            if bi + 1 < total and self._save_due():
                self._save_mid_epoch()
            bar.step(epoch=f"{epoch + 1}/{self.cfg.epochs}", loss=f"{sums['loss'][0] / max(1, sums['loss'][1]):.3f}")
        return src.wait

    def _forward(self, *args, model=None, **kw):
        import torch
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            return (self.net if model is None else model)(*args, **kw)

    def _optimize(self, opt, phase, loss, parts, batch, epoch, bi) -> None:
        import torch
        bad = loss is not None and not bool(torch.isfinite(loss.detach()))
        if self.dist.any_flag(bad):
            last = self.ckpt.last_good() if self.ckpt is not None else "none"
            raise TrainingError(f"loss became NaN/inf at epoch {epoch + 1}, batch {bi + 1} "
                                f"({self.task.describe(batch)}; parts {parts}); last good checkpoint: {last}; "
                                f"try a lower --lr")
        opt.zero_grad(set_to_none=True)
        if loss is None and self.dist.enabled:
            # every rank must join DDP's all-reduce, which only a backward through the wrapped
            # forward does: a task returns a zero built from its outputs (ClassifierTask does)
            raise TrainingError(f"task {type(self.task).__name__} gave no loss under torchrun "
                                f"(epoch {epoch + 1}, batch {bi + 1}); it must return a zero loss from its outputs")
        if loss is None:
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(phase.params, self.cfg.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self, epoch, sums, train_time, waits) -> dict:
        st, task = self.state, self.task
        self.dist.broadcast_module(self.model)
        if self.ema is not None:
            self.dist.broadcast_module(self.ema.module)
        st.epoch = epoch + 1
        n = sums.get("loss", [0.0, 0])[1]
        rec: dict[str, Any] = {"epoch": epoch + 1, "step": st.step, "lr": self._last_lr}
        rec.update({k: v / max(1, c) for k, (v, c) in sums.items()})
        rec.update(task.end_epoch(epoch))
        rec.update(task.validate(self.eval_model))
        improved, rank_value, rank_higher = self._judge(rec)
        rec["time_s"] = round(train_time, 3)
        rec["data_wait_share"] = round(waits / max(1e-9, train_time), 4)
        rec["items_per_s"] = round(n * self.dist.world / max(1e-9, train_time), 1)
        st.history.append(rec)
        if self.dist.main:
            if self.ckpt is not None:
                self.ckpt.save_epoch(self.eval_model, st, rec, improved, rank_value, rank_higher, self._trainer_state())
            if self.log_path is not None:
                import json
                with open(self.log_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
        return rec

    def _judge(self, rec) -> tuple[bool, float, bool]:
        """(improved, value to rank top-k by, higher is better) for this epoch.

        With a validation figure the task's monitor decides. Without one, training losses of
        epochs with different objective mixes (warm starts, ramp-ups) are not comparable, so the
        latest epoch is the best one.
        """
        mon = self.task.monitor
        if mon.startswith("val_") and mon in rec:
            value = rec[mon]
            rec["monitor"], rec["monitor_value"] = mon, value
            return self.state.update(value, self.task.higher), value, self.task.higher
        value = rec.get(mon, rec.get("loss", 0.0))
        rec["monitor"], rec["monitor_value"] = mon, value
        self.state.best_val, self.state.bad_epochs = value, 0
        return True, float(rec["epoch"]), True

    # ------------------------------------------------------------------ resume state
    def _trainer_state(self, pos: dict | None = None) -> dict:
        """The resume state; `pos` (mid-epoch) = where the epoch stopped, else at the epoch's end."""
        import torch
        st = {"model": self.model.state_dict(),
              "optimizers": {p.name: o.state_dict() for p, o in zip(self.phases, self.opts)},
              "schedulers": {p.name: s.state_dict() for p, s in zip(self.phases, self.scheds)},
              "task": self.task.state_dict(), "rng": {"torch": torch.get_rng_state()},
              "data": {p.name: p.loader.state_dict(_consumed(pos, i)) for i, p in enumerate(self.phases)
                       if p.loader is not None}}
        if pos is not None:
            st["model"] = {**st["model"], **{k: v for k, v in pos["buffers"].items() if k in st["model"]}}
            st["position"] = {"epoch": pos["epoch"], "phase": pos["phase"], "batches": pos["batches"],
                              "wait": pos["wait"], "time": time.perf_counter() - pos["t0"], "world": self.dist.world,
                              "sums": {k: [float(v), int(c)] for k, (v, c) in pos["sums"].items()}}
            st["rng"] = pos["rng"]
            if "ranks" in pos:
                st["rank_states"] = pos["ranks"]
        if self.ema is not None:
            st["ema"] = self.ema.state_dict()
        if self.scaler.is_enabled():
            st["scaler"] = self.scaler.state_dict()
        return st

    def _snapshot(self) -> dict:
        """What a step's forward changes besides the optimiser's work (RNG states, BatchNorm
        statistics), taken between steps so that an interrupt inside one can be undone."""
        if self.ckpt is None or self.dist.enabled:
            return {}
        return {"rng": _get_rng(), "buffers": {k: b.detach().clone() for k, b in self.model.named_buffers()}}

    def _save_due(self) -> bool:
        """--save-every: N steps or S seconds since the last mid-epoch save (or the start)."""
        step, t = self._saved_at
        c = self.cfg
        due = bool((c.save_every_steps and self.state.step - step >= c.save_every_steps)
                   or (c.save_every_seconds and time.perf_counter() - t >= c.save_every_seconds))
        if c.save_every_seconds and self.dist.enabled:
            due = self.dist.any_flag(due)  # the ranks' clocks differ: all save, or none
        return due

    def _save_mid_epoch(self) -> None:
        """--save-every: last.pt at the current position (between two steps), as an interrupt writes it.
        Under torchrun every rank is at the same step: rank 0 gathers each rank's RNG states and
        BatchNorm statistics (they differ per rank) and writes them beside its own."""
        self._saved_at = (self.state.step, time.perf_counter())
        pos = self._pos
        if self.ckpt is None:
            return
        if self.dist.enabled:
            ranks = self.dist.gather_objects(
                {"rng": _get_rng(), "buffers": {k: b.detach().cpu().clone() for k, b in self.model.named_buffers()}})
            pos = {**pos, **ranks[0], "ranks": ranks}
        if not self.dist.main:
            return
        where = f"epoch {pos['epoch'] + 1}, {self.phases[pos['phase']].name} batch {pos['batches']}"
        self.ckpt.save_interrupted(self.eval_model, self.state, self._trainer_state(pos), where, why="saved")
        log.debug("--save-every: wrote %s at %s", self.ckpt.last, where)

    def _save_interrupted(self) -> None:
        """On KeyboardInterrupt between two steps: last.pt with the position in the epoch."""
        pos = self._pos
        if pos is None or self.ckpt is None or not self.dist.main:
            return
        where = f"epoch {pos['epoch'] + 1}, {self.phases[pos['phase']].name} batch {pos['batches']}"
        if self._mutating or "rng" not in pos:  # inside a step, or under torchrun (no snapshots)
            log.warning("interrupted at %s; %s: --resume continues from the last epoch boundary", where,
                        "under torchrun" if self.dist.enabled else "inside an optimiser step")
            return
        if pos["phase"] == 0 and pos["batches"] == 0:
            return  # last.pt of the previous epoch is this position
        self.ckpt.save_interrupted(self.eval_model, self.state, self._trainer_state(pos), where)
        log.warning("interrupted at %s: wrote %s; --resume continues mid-epoch", where, self.ckpt.last)

    def _resume(self, path) -> dict | None:
        """Load the resume state; -> the position in the epoch when it stopped mid-epoch, else None."""
        tr, _ = load_resume(path, self.cfg.resume_config)
        self.model.load_state_dict(tr["model"])
        for p, o, s in zip(self.phases, self.opts, self.scheds):
            o.load_state_dict(tr["optimizers"][p.name])
            s.load_state_dict(tr["schedulers"][p.name])
        if self.ema is not None and "ema" in tr:
            self.ema.load_state_dict(tr["ema"])
        if "scaler" in tr and self.scaler.is_enabled():
            self.scaler.load_state_dict(tr["scaler"])
        self.task.load_state_dict(tr.get("task", {}))
        self.state = RunState.from_json(tr["state"])
        for p in self.phases:
            if p.loader is not None and p.name in tr.get("data", {}):
                log.info("%s", p.loader.load_state_dict(tr["data"][p.name]))
        pos = tr.get("position")
        if pos is None:
            log.info("resume: at the epoch boundary, epoch %d of %d", self.state.epoch + 1, self.cfg.epochs)
            return None
        if pos["world"] != self.dist.world:
            raise CheckpointError(f"{path}: stopped mid-epoch with {pos['world']} process(es); resume it with "
                                  f"the same number (this run has {self.dist.world})")
        log.info("resume: mid-epoch, epoch %d at %s batch %d", pos["epoch"] + 1, self.phases[pos["phase"]].name,
                 pos["batches"] + 1)
        rng = tr["rng"]
        if "rank_states" in tr:  # a torchrun save: this rank's own RNG and BatchNorm statistics
            mine = tr["rank_states"][self.dist.rank]
            rng = mine["rng"]
            for k, b in self.model.named_buffers():
                if k in mine["buffers"]:
                    b.copy_(mine["buffers"][k].to(b.device))
        return {**pos, "sums": {k: list(v) for k, v in pos["sums"].items()}, "rng": rng}

    # ------------------------------------------------------------------ after the run
    def average_topk(self):
        """The evaluation model with the mean weights of the top-k checkpoints (None without them)."""
        if not self.state.topk:
            return None
        m = copy.deepcopy(self.eval_model).cpu()
        m.load_state_dict(average_states([r["path"] for r in self.state.topk]))
        return m.to(self.device)

    def save_average(self, path: str | Path, meta: dict) -> dict | None:
        """Write the top-k average to `path` (with its validation figures in meta["metrics"]), then
        the run's model.pt (`Checkpoints.save_model`); returns those figures, or None without top-k
        checkpoints."""
        from pllcli.checkpoint import save_checkpoint
        m = self.average_topk()
        metrics = None
        if m is not None:
            metrics = self.task.validate(m)
            save_checkpoint(path, m, {**meta, "epoch": self.state.epoch, "metrics": metrics,
                                      "averaged_from": [r["epoch"] for r in self.state.topk]})
        if self.ckpt is not None and self.dist.main:
            self.ckpt.save_model()
        return metrics


def _factor(schedule: Schedule, steps_per_epoch: int) -> Callable[[int], float]:
    """LambdaLR's multiplier. A plain function, so the scheduler's state_dict stays tensors and numbers."""
    def f(step: int) -> float:
        return schedule.factor(step, steps_per_epoch)
    return f


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch and random from (seed, epoch, rank), so a resumed epoch draws what it drew."""
    import torch
    s = (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63)
    torch.manual_seed(s)
    random.seed(s)


def _consumed(pos: dict | None, phase: int) -> int | None:
    """Batches of phase `phase` done at `pos` (None: the whole epoch, as the loader counts)."""
    if pos is None or pos["phase"] < phase:
        return None if pos is None else 0
    return pos["batches"] if pos["phase"] == phase else None


def _get_rng() -> dict:
    import torch
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    v, state, gauss = random.getstate()
    st["random"] = [v, list(state), gauss]
    return st


def _set_rng(st: dict) -> None:
    import torch
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if "random" in st:
        v, state, gauss = st["random"]
        random.setstate((v, tuple(state), gauss))


def _accumulate(sums: dict, phase: Phase, loss, parts: dict, n: int) -> None:
    """Item-weighted sums {key: [sum, items]} of the loss and its parts."""
    vals = {"loss": float(loss.detach()) if loss is not None else 0.0, **{"loss_" + k: v for k, v in parts.items()}}
    for k, v in vals.items():
        acc = sums.setdefault(k, [0.0, 0])
        acc[0] += v * n
        acc[1] += n


def _epoch_line(rec: dict, epochs: int) -> str:
    extra = "".join(f" {k} {rec[k]:.4f}" for k in rec if k.startswith("val_") and isinstance(rec[k], float))
    return (f"epoch {rec['epoch']}/{epochs} loss {rec.get('loss', float('nan')):.4f}{extra} "
            f"({rec['time_s']:.1f}s, data wait {100 * rec['data_wait_share']:.1f}%)")
