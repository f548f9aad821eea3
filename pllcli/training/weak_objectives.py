"""WHEN/WHO losses and the weak-tag objectives of `pllcli train` (multilabel-bce, multilabel-hinge,
mil, when-mmm)."""
from __future__ import annotations

import torch

from pllcli.errors import UsageError
from pllcli.losses import mil
from pllcli.models.whenwho import WhenWhoNet
from pllcli.training.config import WHEN_LOSSES
from pllcli.training.objective_base import Objective, register_objective


def when_loss(out: dict, positive: torch.Tensor, pooling: str = "mmm", model: WhenWhoNet | None = None) -> torch.Tensor:
    """MIL loss of the WHEN frame logits against clip positivity (any event)."""
    z = out["when_frame_logits"]
    mask = mil.lengths_to_mask(out["frame_lengths"], z.shape[1])
    if pooling == "attention":
        if "when_clip_attention" in out:  # pooled inside the model's forward
            return mil.prob_bce_loss(out["when_clip_attention"], positive)
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
    if pooling == "attention" and "when_clip_attention" in out:
        return out["when_clip_attention"]
    if pooling == "attention" and model is not None:
        return model.when_att(p, out["when_frames"], mask)
    return mil.pool(p, "max" if pooling == "mmm" else pooling, mask)


# ------------------------------------------------------------------ trainer objectives

def _tag_targets(ctx, use_soft):
    b = ctx.batch
    m = b["has_tags"].bool()
    y = b["tags"].float()
    if use_soft and "has_soft" in b:
        soft = b["has_soft"].bool() & ~m
        y = torch.where(soft[:, None], b["soft"].float(), y)
        m = m | soft
    return m, y


class _TagObjective(Objective):
    """An objective on the batch items with weak tags: `tag_loss(ctx, m, y)` gets their mask (B,)
    and targets (B, C); a batch without tagged items gives no loss."""
    use_soft = False
    requires_output: tuple[str, str] | None = None  # (ctx.out key, error when the model lacks it)

    def loss(self, ctx):
        if self.requires_output is not None and self.requires_output[0] not in ctx.out:
            raise UsageError(self.requires_output[1])
        m, y = _tag_targets(ctx, self.use_soft)
        return self.tag_loss(ctx, m, y) if m.any() else None

    def tag_loss(self, ctx, m, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _keep_pooling(self, pooling) -> str:
        """`pooling` with '-' read as '_', kept as self.pooling (and in params)."""
        self.pooling = str(pooling).replace("-", "_")
        self.params = {"pooling": self.pooling}
        return self.pooling

@register_objective("multilabel-bce")
class MultiLabelBCE(_TagObjective):
    """Multi-label BCE on clip logits vs weak tags (use_soft=true adds soft/PSL labels)."""
    items = ("tags", "soft")

    def __init__(self, use_soft: bool = False, **kw):
        super().__init__(**kw)
        self.use_soft = bool(use_soft)
        self.params = {"use_soft": self.use_soft}

    def tag_loss(self, ctx, m, y):
        return mil.bce_loss(ctx.out["logits"][m], y[m])

@register_objective("multilabel-hinge")
class MultiLabelHinge(_TagObjective):
    """Multi-label hinge (MultiLabelMarginLoss) on clip logits vs weak tags."""
    items = ("tags",)

    def tag_loss(self, ctx, m, y):
        return mil.hinge_loss(ctx.out["logits"][m], y[m])

@register_objective("mil")
class MILObjective(_TagObjective):
    """MIL on frame_logits vs weak tags: pooling=max|mean|noisy_or|linear_softmax|mmm."""
    items = ("tags",)
    requires_output = ("frame_logits", "the mil objective needs a frame-level model (one with frame_logits, "
                       "e.g. crnn)")

    def __init__(self, pooling: str = "max", **kw):
        super().__init__(**kw)
        pooling = self._keep_pooling(pooling)
        if pooling == "attention":
            raise UsageError("mil:pooling=attention needs learnable weights; frame-level models already "
                             "attention-pool their clip logits, so use multilabel-bce")
        if pooling != "mmm":
            mil.check_pooling(pooling)

    def tag_loss(self, ctx, m, y):
        z = ctx.out["frame_logits"]
        lens = ctx.out.get("frame_lengths")
        mask = mil.lengths_to_mask(lens, z.shape[1]) if lens is not None else None
        return mil.mil_loss(z[m], y[m], self.pooling, None if mask is None else mask[m])

@register_objective("when-mmm")
class WhenObjective(_TagObjective):
    """WHEN: class-agnostic MIL (pooling=mmm default) on the whenwho model's WHEN frames; positive = any tag."""
    items = ("tags",)
    requires_output = ("when_frame_logits", "the when-mmm objective needs the whenwho model (--model whenwho)")

    def __init__(self, pooling: str = "mmm", **kw):
        super().__init__(**kw)
        pooling = self._keep_pooling(pooling)
        if pooling not in WHEN_LOSSES:
            raise UsageError(f"unknown WHEN loss {pooling!r} (choose from {', '.join(WHEN_LOSSES)})")

    def tag_loss(self, ctx, m, y):
        keys = ("when_frame_logits", "when_frames", "frame_lengths", "when_clip_attention")
        out = {k: v[m] for k, v in ctx.out.items() if k in keys}
        return when_loss(out, (y[m].amax(dim=1) > 0.5).float(), self.pooling, ctx.model)
