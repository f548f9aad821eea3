"""The classifier task of the engine: batches of feature-store rows, the objectives' loss, validation.

A batch (see `pllcli.training.objectives`) is a dict of tensors on the device: x_raw (B, T, F),
x (the augmented view), lengths, index and the label tensors of `LabelTensors.batch`.
"""
from __future__ import annotations

import numpy as np

from pllcli.training.engine import Phase, Step, Task


class ClassifierTask(Task):
    """`pllcli train`: the sum of weighted objectives on augmented batches of `rows`."""

    def __init__(self, model, mem, labels_t, item_ids, objectives, augment, batches, *, seed: int, epochs: int,
                 num_classes: int, task: str, device, dist, max_frames: int | None = None, freeze: bool = False,
                 valid=None, loader=None):
        self.model, self.mem, self.labels_t, self.item_ids = model, mem, labels_t, item_ids
        self.objectives, self.augment, self._batches = objectives, augment, batches
        self.seed, self.epochs, self.C, self.task, self.device, self.dist = seed, epochs, num_classes, task, device, dist
        self.max_frames, self.freeze, self.valid, self.loader = max_frames, freeze, valid, loader
        self.pad_value = model.encoder.norm.mean.detach().to(mem.device)
        self.prefetch_thread = mem.device.type == "cpu"
        metric = "mAP" if task == "multi" else "accuracy"
        self.monitor, self.higher = ("val_" + metric, True) if valid is not None else ("loss", False)

    def phases(self) -> list[Phase]:
        return [Phase("main", [p for p in self.model.parameters() if p.requires_grad], self._batches, self.loader)]

    def train_mode(self, model) -> None:
        model.train()
        if self.freeze:
            model.encoder.eval()

    def batch(self, phase, rows, epoch: int) -> dict:
        if isinstance(rows, dict):  # streamed: built by the loader, already on the device
            return rows
        rng = np.random.default_rng([self.seed, int(rows[0]), epoch, self.dist.rank])
        x, lens = self.mem.gather(rows, self.max_frames, rng, self.pad_value)
        b = self.labels_t.batch(rows)
        b["x_raw"], b["lengths"] = x, lens
        if self.device.type == "cuda":
            b = {k: (v.pin_memory() if v.device.type == "cpu" else v) for k, v in b.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    def loss(self, phase, batch: dict, step: Step):
        import torch
        from pllcli.training.objectives import StepContext
        batch["x"] = self.augment(batch["x_raw"], batch["lengths"])
        out = step.forward(batch["x"], batch["lengths"])
        ctx = StepContext(self.model, batch, out, epoch=step.epoch, step=step.step, progress=step.progress,
                          epochs=self.epochs, num_classes=self.C, task=self.task, device=self.device,
                          forward=step.forward, augment=self.augment, teacher=step.teacher, dist=step.dist)
        total, parts = None, {}
        for o in self.objectives:
            w = o.weight(step.progress)
            if w == 0:
                with torch.no_grad():
                    o.observe(ctx)
                continue
            lo = o.loss(ctx)
            if lo is None:
                continue
            parts[o.name] = float(lo.detach())
            total = w * lo if total is None else total + w * lo
        if total is None and step.dist.enabled:  # join the all-reduce with a zero connected to the graph
            total = 0.0 * out["logits"].float().sum()
        return total, parts, int(batch["index"].numel())

    def end_epoch(self, epoch: int) -> dict:
        rec = {}
        for o in self.objectives:
            o.end_epoch(epoch)
            rec["weight_" + o.name] = o.weight(epoch + 1 - 1e-9)
            rec.update(o.metrics())
        return rec

    def validate(self, model) -> dict:
        if self.valid is None:
            return {}
        return {"val_" + k: v for k, v in self.valid(model).items()}

    def describe(self, batch: dict) -> str:
        ids = [str(self.item_ids[i]) for i in batch["index"][:3].tolist()]
        return f"items {', '.join(ids)}, ..."

    def state_dict(self) -> dict:
        return {f"{o.name}/{k}": v for o in self.objectives for k, v in o.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for o in self.objectives:
            o.load_state_dict({k.split("/", 1)[1]: v.to(self.device) for k, v in state.items()
                               if k.split("/", 1)[0] == o.name})


class Validation:
    """Validation figures of a model on store rows: accuracy (single) or mAP (multi) and the loss."""

    def __init__(self, mem, rows, labels, label_rows, task: str, device, batch_size: int = 128):
        self.mem, self.rows, self.labels, self.label_rows = mem, rows, labels, label_rows
        self.task, self.device, self.batch_size = task, device, batch_size

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, model) -> dict[str, float]:
        from pllcli.metrics.multi_label import mean_average_precision
        from pllcli.training.inference import infer, probabilities
        logits = infer(model, self.mem, self.rows, self.device, self.batch_size)["logits"]
        lrows = self.label_rows[self.rows]
        if self.task == "multi":
            p = probabilities(logits, "multi")
            y = self.labels.tag_matrix(lrows)
            pc = np.clip(p, 1e-7, 1 - 1e-7)
            bce = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
            m = mean_average_precision(y, p) if y.any() else 0.0
            return {"mAP": float(m), "loss": float(bce)}
        y = self.labels.clean[lrows].astype(np.int64)
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return {"accuracy": float((logits.argmax(1) == y).mean()), "loss": float(-logp[np.arange(len(y)), y].mean())}
