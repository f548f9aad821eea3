"""Semi-supervised objectives for `pllcli train` (formulas in `pllcli.losses.semi`).

Registered names (use with `--objective NAME[:KEY=VALUE,...]`, combinable with `ce` and the
PLL objectives in one run):

- ``mean-teacher``: consistency between the student on the augmented batch and the EMA teacher
  on the clean batch (`kind=mse|kl`, `on=unlabeled|all`). Needs the trainer's EMA teacher.
- ``vat``: virtual adversarial training (`xi`, `eps` = perturbation RMS per feature value in
  log-mel units, `power_iterations`, `on`).
- ``mixup``: mixup over labelled items; targets are the clean one-hot, normalised candidate
  weights (PLL), tag vectors (multi-label) or soft labels (`alpha`).
- ``mixmatch``: K augmentations of the unlabeled items, averaged and sharpened (`k`, `t`,
  `alpha`, `lambda_u`); multi-label uses per-class sigmoid sharpening.
- ``fixmatch``: pseudo-label from a weak view (optionally the EMA teacher), CE on a strong
  view where the confidence reaches `threshold`; PLL items' guesses are restricted to their
  candidate set.
- ``distill``: soft (pseudo) labels from `pllcli pseudo-label`: target
  alpha * soft + (1 - alpha) * original label (clean one-hot / normalised candidates / tags),
  teacher-student style; `train --alpha A` should add `distill:alpha=A`.

Every objective here also takes ``final_weight``, ``decay_start`` and ``decay_end`` (epochs): after
the normal ramp-up the weight moves linearly to `final_weight` between the two ("strong
unsupervised guidance first": e.g. `fixmatch:weight=10,final_weight=1,decay_start=5,decay_end=20`
with `ce:schedule=sigmoid,end=10`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pllcli.errors import UsageError
from pllcli.losses import semi as L
from pllcli.training.augment import AugmentConfig, augment_batch
from pllcli.training.objective_base import Objective, register_objective

ON_CHOICES = ("unlabeled", "all")


class _SemiObjective(Objective):
    """Common options: `on`, and the curriculum decay of the weight."""

    def __init__(self, on: str = "unlabeled", final_weight: float | None = None, decay_start: float = 0.0,
                 decay_end: float = 0.0, **kw):
        super().__init__(**kw)
        if on not in ON_CHOICES:
            raise UsageError(f"objective {self.name}: on must be one of {', '.join(ON_CHOICES)}, got {on!r}")
        if final_weight is not None and decay_end <= decay_start:
            raise UsageError(f"objective {self.name}: final_weight needs decay_end > decay_start")
        self.on = on
        self.final_weight = None if final_weight is None else float(final_weight)
        self.decay_start, self.decay_end = float(decay_start), float(decay_end)
        if on == "all":
            self.items = tuple(dict.fromkeys(self.items + ("unlabeled", "clean", "candidates")))

    def weight(self, progress: float) -> float:
        w = super().weight(progress)
        if self.final_weight is None or progress <= self.decay_start:
            return w
        t = min(1.0, (progress - self.decay_start) / (self.decay_end - self.decay_start))
        return (1 - t) * w + t * self.final_weight

    def _mask(self, ctx):
        return ctx.mask("all") if self.on == "all" else ctx.mask("unlabeled")


class frozen_bn_stats:
    """Context manager: extra forward passes (augmented views, adversarial probes) still normalise with
    their batch statistics but do not move the BatchNorm running statistics (momentum 0).

    Without it every view (weak, strong, perturbed, mixed) overwrote the running statistics that
    eval mode uses; FSDD 5 labels/class FixMatch: train-mode accuracy 0.55, eval-mode 0.10."""

    def __init__(self, model):
        self.bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] \
            if model is not None else []

    def __enter__(self):
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, mom in zip(self.bns, self.saved):
            m.momentum = mom
        return False


def _extra_forward(ctx):
    """ctx.forward whose passes leave the BatchNorm running statistics alone."""
    def f(x, lengths):
        with frozen_bn_stats(getattr(ctx, "model", None)):
            return ctx.forward(x, lengths)
    return f


def _as_bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _multi(ctx) -> bool:
    return getattr(ctx, "task", "single") == "multi"


def _valid_mask(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    b, t, _ = x.shape
    if lengths is None:
        return torch.ones(b, t, 1, dtype=x.dtype, device=x.device)
    return (torch.arange(t, device=x.device)[None, :] < lengths.to(x.device)[:, None]).to(x.dtype)[..., None]


def label_targets(batch: dict, multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (B, C), mask (B,)) from a batch: clean one-hot > candidates (normalised) > tags > soft."""
    cand = batch["candidates"].float()
    b, c = cand.shape
    tgt = torch.zeros(b, c, device=cand.device)
    has = torch.zeros(b, dtype=torch.bool, device=cand.device)
    if multi_label and "tags" in batch:
        m = batch["has_tags"].bool()
        tgt[m] = batch["tags"].float()[m]
        has |= m
    else:
        m = batch["has_candidates"].bool() & (cand.sum(1) > 0)
        tgt[m] = cand[m] / cand[m].sum(1, keepdim=True)
        has |= m
        clean = batch["clean"].long()
        mc = clean >= 0
        if mc.any():
            tgt[mc] = F.one_hot(clean[mc], c).float()
            has |= mc
    if "soft" in batch:
        ms = batch["has_soft"].bool() & ~has
        tgt[ms] = batch["soft"].float()[ms]
        has |= ms
    return tgt, has


# ------------------------------------------------------------------ objectives

@register_objective("mean-teacher")
class MeanTeacher(_SemiObjective):
    """Mean teacher: consistency of the student (augmented) with the EMA teacher (clean batch)."""

    items = ("unlabeled",)
    needs_teacher = True

    def __init__(self, kind: str = "mse", **kw):
        super().__init__(**kw)
        if kind not in ("mse", "kl"):
            raise UsageError(f"mean-teacher: kind must be mse or kl, got {kind!r}")
        self.kind = kind

    def loss(self, ctx):
        m = self._mask(ctx)
        if not m.any():
            return None
        t = ctx.teacher_out()["logits"][m]
        return L.consistency_loss(ctx.out["logits"][m].float(), t.float(), self.kind, _multi(ctx))


@register_objective("vat")
class VAT(_SemiObjective):
    """VAT: KL between predictions on x and on x + the virtual adversarial perturbation."""

    items = ("unlabeled",)

    def __init__(self, xi: float = 1e-6, eps: float = 0.5, power_iterations: int = 1, **kw):
        super().__init__(**kw)
        if xi <= 0 or eps <= 0 or int(power_iterations) < 1:
            raise UsageError("vat: need xi > 0, eps > 0 and power_iterations >= 1")
        self.xi, self.eps, self.power_iterations = float(xi), float(eps), int(power_iterations)

    def loss(self, ctx):
        m = self._mask(ctx)
        if not m.any():
            return None
        x = ctx.batch["x_raw"][m]
        lengths = ctx.batch["lengths"][m]
        vm = _valid_mask(x, lengths)
        eps = self.eps * (vm.sum((1, 2), keepdim=True) * x.shape[-1]).sqrt()   # RMS eps per value
        fwd = _extra_forward(ctx)
        f = lambda z: fwd(z, lengths)["logits"].float()  # noqa: E731
        return L.vat_loss(f, x, xi=self.xi, eps=eps, power_iterations=self.power_iterations,
                          multi_label=_multi(ctx), mask=vm.expand_as(x))


@register_objective("mixup")
class Mixup(_SemiObjective):
    """Mixup over labelled items (clean, candidate, tag or soft targets), soft CE / BCE."""

    items = ("clean", "candidates", "tags", "soft")

    def __init__(self, alpha: float = 0.4, **kw):
        super().__init__(**kw)
        if alpha <= 0:
            raise UsageError("mixup: alpha must be > 0")
        self.alpha = float(alpha)

    def loss(self, ctx):
        multi = _multi(ctx)
        tgt, has = label_targets(ctx.batch, multi)
        if has.sum() < 2:
            return None
        x = ctx.augment(ctx.batch["x_raw"][has], ctx.batch["lengths"][has])
        lam = float(L.sample_lambda(self.alpha))
        xm, ym, lm, _ = L.mixup(x, tgt[has], lam, lengths=ctx.batch["lengths"][has])
        logits = _extra_forward(ctx)(xm, lm)["logits"].float()
        return L.soft_cross_entropy(logits, ym, multi)


@register_objective("mixmatch")
class MixMatch(_SemiObjective):
    """MixMatch: K-view averaged, sharpened guesses; mixup of labelled + unlabeled; L_x + lambda_u L_u."""

    items = ("unlabeled", "clean", "candidates", "tags")

    def __init__(self, k: int = 2, t: float = 0.5, alpha: float = 0.75, lambda_u: float = 25.0, **kw):
        super().__init__(**kw)
        if int(k) < 1 or t <= 0 or alpha <= 0 or lambda_u < 0:
            raise UsageError("mixmatch: need k >= 1, t > 0, alpha > 0, lambda_u >= 0")
        self.k, self.t, self.alpha, self.lambda_u = int(k), float(t), float(alpha), float(lambda_u)

    def loss(self, ctx):
        multi = _multi(ctx)
        tgt, has = label_targets(ctx.batch, multi)
        mu = self._mask(ctx)
        if not has.any() or not mu.any():
            return None
        b = ctx.batch
        xl, ll = ctx.augment(b["x_raw"][has], b["lengths"][has]), b["lengths"][has]
        xu_raw, lu = b["x_raw"][mu], b["lengths"][mu]
        views = [ctx.augment(xu_raw, lu) for _ in range(self.k)]
        fwd = _extra_forward(ctx)
        f = lambda z, ln: fwd(z, ln)["logits"].float()  # noqa: E731
        lx, lu_loss, _ = L.mixmatch_loss(f, xl, tgt[has], views, self.t, self.alpha, multi, ll, lu)
        self._last = {"mixmatch_lx": float(lx.detach()), "mixmatch_lu": float(lu_loss.detach())}
        return lx + self.lambda_u * lu_loss

    def metrics(self):
        return dict(getattr(self, "_last", {}))


def strong_augment(x, lengths, generator=None):
    """The FixMatch strong view: SpecAugment masks, warps, gain and noise (no clip mixing)."""
    cfg = AugmentConfig(time_masks=2, time_width=0.2, freq_masks=2, freq_width=12, gain_db=6.0, shift=0,
                        noise_std=0.3, freq_warp=0.1, time_warp=0.2, fill="clip")
    return augment_batch(x, lengths, cfg, generator)


def weak_augment(x, lengths, generator=None):
    return augment_batch(x, lengths, AugmentConfig.weak(), generator)


@register_objective("fixmatch")
class FixMatch(_SemiObjective):
    """FixMatch: weak-view pseudo-label kept above `threshold`, CE on a strong view."""

    items = ("unlabeled",)

    def __init__(self, threshold: float = 0.95, teacher: bool = False, restrict: bool = True, align: bool = True,
                 align_momentum: float = 0.99, **kw):
        super().__init__(**kw)
        if not 0 < threshold <= 1:
            raise UsageError("fixmatch: threshold must be in (0, 1]")
        if not 0 <= align_momentum < 1:
            raise UsageError("fixmatch: align_momentum must be in [0, 1)")
        self.threshold, self.use_teacher, self.restrict = float(threshold), bool(teacher), bool(restrict)
        self.align, self.align_momentum = _as_bool(align), float(align_momentum)
        self.needs_teacher = self.use_teacher
        self._frac = []
        self._pbar = None   # running mean of the weak-view class probabilities (distribution alignment)

    def _aligned(self, weak: torch.Tensor) -> torch.Tensor:
        """Distribution alignment (ReMixMatch): p <- normalise(p * uniform / running mean of p).

        Without it FixMatch can collapse with few labels: the labelled clips are memorised and every
        unlabeled clip confidently gets one class, so both losses reach 0 (FSDD, 5 labels/class:
        test accuracy 0.10). Returns log-probabilities (usable as logits)."""
        p = torch.softmax(weak, -1)
        mean = p.mean(0)
        if self._pbar is None or self._pbar.shape != mean.shape or self._pbar.device != mean.device:
            self._pbar = torch.full_like(mean, 1.0 / mean.numel())
        self._pbar = self.align_momentum * self._pbar + (1 - self.align_momentum) * mean
        q = p / self._pbar.clamp_min(1e-6)
        q = q / q.sum(-1, keepdim=True)
        return q.clamp_min(1e-12).log()

    def loss(self, ctx):
        m = self._mask(ctx)
        if not m.any():
            return None
        b = ctx.batch
        x, ln = b["x_raw"][m], b["lengths"][m]
        with torch.no_grad():
            if self.use_teacher:
                weak = ctx.teacher_out()["logits"][m].float()
            else:
                weak = _extra_forward(ctx)(weak_augment(x, ln), ln)["logits"].float()
            if self.restrict and not _multi(ctx) and "has_candidates" in b:
                hc = b["has_candidates"][m].bool()
                cand = b["candidates"][m].float()
                weak = torch.where(hc[:, None] & (cand <= 0), torch.full_like(weak, -1e4), weak)
            if self.align and not _multi(ctx):
                weak = self._aligned(weak)
        strong = _extra_forward(ctx)(strong_augment(x, ln), ln)["logits"].float()
        loss, frac = L.fixmatch_loss(weak, strong, self.threshold, _multi(ctx))
        self._frac.append(float(frac))
        return loss

    def end_epoch(self, epoch):
        self._last = sum(self._frac) / len(self._frac) if self._frac else float("nan")
        self._frac = []

    def metrics(self):
        v = getattr(self, "_last", None)
        return {} if v is None or math.isnan(v) else {"fixmatch_mask": v}


@register_objective("distill")
class Distill(_SemiObjective):
    """Soft (pseudo) labels mixed with the original labels: alpha * soft + (1 - alpha) * original."""

    items = ("soft",)

    def __init__(self, alpha: float = 1.0, **kw):
        super().__init__(**kw)
        if not 0 <= alpha <= 1:
            raise UsageError("distill: alpha must be in [0, 1]")
        self.alpha = float(alpha)

    def loss(self, ctx):
        b = ctx.batch
        m = b["has_soft"].bool()
        if not m.any():
            return None
        multi = _multi(ctx)
        soft = b["soft"].float()
        orig, has = label_targets({k: v for k, v in b.items() if k not in ("soft", "has_soft")}, multi)
        tgt = torch.where(has[:, None], self.alpha * soft + (1 - self.alpha) * orig, soft)
        return L.soft_cross_entropy(ctx.out["logits"][m].float(), tgt[m], multi)


# the objectives this module registers
SEMI_OBJECTIVES = ("mean-teacher", "vat", "mixup", "mixmatch", "fixmatch", "distill")
