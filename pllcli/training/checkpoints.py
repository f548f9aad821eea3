"""Checkpoints of a run: last (with the resume state), best, top-k and their average; early stopping.

`model.pt` is the checkpoint to deploy: at the end of a run, the first of `DEPLOY_ORDER` that the
run wrote (averaged.pt, else best.pt, else last.pt), saved again weights-only (no resume state)
with meta "deployed_from" naming it.

`RunState` is the JSON-able bookkeeping of a run (epoch, step, best monitored value, epochs
without improvement, the log history, the top-k list); the engine stores it in `last.pt` next to
the optimiser, scheduler, scaler, EMA and task state, so `--resume` continues exactly.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pllcli.errors import CheckpointError, ConfigMismatchError

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
# which run file model.pt is: the top-k average scored highest on held-out takes and on unseen
# speakers (examples/bench_chat.py); best.pt when there is no average (--top-k 0)
DEPLOY_ORDER = ("averaged.pt", "best.pt", "last.pt")


@dataclass
class RunState:
    """What the engine has done so far; `update` applies one epoch's monitored value."""

    epoch: int = 0
    step: int = 0
    best_val: float | None = None
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    topk: list = field(default_factory=list)

    def update(self, value: float, higher: bool) -> bool:
        """Record the epoch's monitored value; True when it improves on the best so far."""
        improved = self.best_val is None or (value > self.best_val if higher else value < self.best_val)
        if improved:
            self.best_val, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return improved

    def stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs in a row without improvement (0 = never)."""
        return patience > 0 and self.bad_epochs >= patience

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "RunState":
        return cls(**json.loads(s))


class Checkpoints:
    """Where a run writes: `last` (weights + resume state), optional `best` and `topk_dir/epochN.pt`.

    `meta` is the checkpoint metadata shared by every file (weights-only, JSON meta: see
    pllcli.checkpoint). Only the main rank writes.
    """

    def __init__(self, last: Path, best: Path | None = None, topk_dir: Path | None = None, top_k: int = 0,
                 meta: dict | None = None):
        self.last, self.best, self.topk_dir = Path(last), best and Path(best), topk_dir and Path(topk_dir)
        self.top_k = top_k if topk_dir is not None else 0
        self.meta = dict(meta or {})

    def save_epoch(self, model, state: RunState, rec: dict, improved: bool, rank_value: float, rank_higher: bool,
                   trainer_state: dict) -> None:
        """After an epoch: best.pt when improved, the top-k list, then last.pt with the resume state."""
        from pllcli.checkpoint import save_checkpoint
        metrics = {k: v for k, v in rec.items() if k.startswith("val_") or k in ("loss", "epoch")}
        meta = {**self.meta, "epoch": state.epoch, "metrics": metrics}
        if improved and self.best is not None:
            save_checkpoint(self.best, model, meta)
        if self.top_k > 0:
            path = self.topk_dir / f"epoch{state.epoch:04d}.pt"
            state.topk.append({"epoch": state.epoch, "value": rank_value, "path": str(path)})
            state.topk.sort(key=lambda r: -r["value"] if rank_higher else r["value"])
            save_checkpoint(path, model, meta)
            for r in state.topk[self.top_k:]:
                Path(r["path"]).unlink(missing_ok=True)
            state.topk = state.topk[:self.top_k]
        trainer_state = {**trainer_state, "state": state.to_json()}
        save_checkpoint(self.last, model, meta, extra={"trainer": trainer_state})

    def save_interrupted(self, model, state: RunState, trainer_state: dict, where: str,
                         why: str = "interrupted") -> None:
        """last.pt of a run stopped (why="interrupted") or saved by --save-every (why="saved")
        mid-epoch: `trainer_state` holds its position; meta[why] says where."""
        from pllcli.checkpoint import save_checkpoint
        meta = {**self.meta, "epoch": state.epoch, why: where}
        save_checkpoint(self.last, model, meta, extra={"trainer": {**trainer_state, "state": state.to_json()}})

    def save_model(self) -> Path | None:
        """Write model.pt beside last.pt from the first file of DEPLOY_ORDER that exists; its path (None without)."""
        from pllcli.checkpoint import load_checkpoint, save_checkpoint
        folder = self.last.parent
        src = next((folder / n for n in DEPLOY_ORDER if (folder / n).exists()), None)
        if src is None:
            return None
        state, meta = load_checkpoint(src)
        out = folder / MODEL_FILE
        save_checkpoint(out, state, {**meta, "deployed_from": src.name})
        return out

    def last_good(self) -> str:
        return str(self.last) if self.last.exists() else "none"


def load_resume(path: str | Path, config: dict) -> tuple[dict, dict]:
    """(trainer state, meta) from a last.pt (or the run folder holding it); the run's `config`
    must equal the saved one (ConfigMismatchError naming the differing keys otherwise)."""
    from pllcli.checkpoint import load_checkpoint
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    _, meta, extra = load_checkpoint(p, with_extra=True)
    if "trainer" not in extra:
        raise CheckpointError(f"{p}: has no trainer state (resume from OUTDIR/last.pt)")
    old = meta.get("train_config", {})
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        raise ConfigMismatchError(
            f"--resume {p}: it was trained with other settings; differing: "
            + ", ".join(f"{k} ({old.get(k)!r} -> {config.get(k)!r})" for k in diff[:4])
            + (f" and {len(diff) - 4} more" if len(diff) > 4 else ""))
    log.info("resuming from %s at epoch %d", p, meta.get("epoch", 0))
    return extra["trainer"], meta


def average_states(paths) -> dict:
    """The mean of the floating-point tensors of several checkpoints (others from the first)."""
    from pllcli.checkpoint import load_checkpoint
    states = [load_checkpoint(p)[0] for p in paths]
    avg = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            avg[k] = sum(s[k].double() for s in states).div(len(states)).to(v.dtype)
        else:
            avg[k] = v
    return avg
