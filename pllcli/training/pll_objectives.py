"""Built-in objectives: supervised CE on clean items and the partial-label losses of
`pllcli.losses.pll` (formulas there). Candidate items include clean items as singleton sets
(batch["candidates"] holds their one-hot), so a PLL objective alone uses every labelled item.

The confidence-based objectives (proden/rc, lws, cr, pico) initialise an item's confidences on
first sight from its candidate weights (the prior), and keep re-estimating them at every step
while their weight is still 0 (`observe`, e.g. `proden:start=3`): the default recipe's warm
start (see `pllcli.training.trainer`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pllcli.losses import pll
from pllcli.training.objective_base import Objective, register_objective


def _mean(per_item, mask):
    return per_item[mask].mean()


class ConfidenceBuffer:
    """Per-item confidences (N, C) for the PLL losses, initialised lazily from each item's
    candidate weights on first sight; updates are gathered across DDP ranks."""

    def __init__(self, num_items: int, num_classes: int, device, init=pll.uniform_confidence):
        self.conf = torch.zeros(num_items, num_classes, device=device)
        self.seen = torch.zeros(num_items, dtype=torch.bool, device=device)
        self.init = init

    def get(self, index, cand):
        fresh = ~self.seen[index]
        if fresh.any():
            self.conf[index[fresh]] = self.init(cand[fresh]).to(self.conf.dtype)
            self.seen[index[fresh]] = True
        return self.conf[index]

    def set(self, index, rows, dist=None):
        if dist is not None:
            index, rows = dist.gather_rows(index, rows)
        self.conf[index] = rows.to(self.conf.dtype)
        self.seen[index] = True

    def state_dict(self):
        return {"conf": self.conf.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, s):
        self.conf.copy_(s["conf"].to(self.conf.device))
        self.seen.copy_(s["seen"].to(self.seen.device))


class _BufferedPLL(Objective):
    items = ("candidates",)
    init = staticmethod(pll.uniform_confidence)

    def setup(self, setup):
        super().setup(setup)
        self.buf = ConfidenceBuffer(setup.num_items, setup.num_classes, setup.device, self.init)
        self._dist = setup.dist

    def state_dict(self):
        return self.buf.state_dict()

    def load_state_dict(self, state):
        if state:
            self.buf.load_state_dict(state)

    def metrics(self):
        """Share of seen items whose confidence argmax lies outside the candidate set is not
        knowable here; report the mean max-confidence (how decided the disambiguation is)."""
        s = self.buf.seen
        if not s.any():
            return {}
        return {f"{self.name}_conf_max": float(self.buf.conf[s].max(1).values.mean())}


class _ReestimatedPLL(_BufferedPLL):
    """A loss on (logits, candidates, confidences) whose confidences are re-estimated from the
    model after each step (PRODEN, LWS): subclasses define `item_loss` and `new_confidence`."""

    def item_loss(self, logits, cand, conf):
        """(B,) loss of candidate items given their current confidences."""
        raise NotImplementedError

    def new_confidence(self, logits, cand):
        """(B, C) confidences re-estimated from the model's (detached) logits."""
        raise NotImplementedError

    def loss(self, ctx):
        m = ctx.mask("candidates")
        if not m.any():
            return None
        idx, cand, logits = ctx.batch["index"][m], ctx.batch["candidates"][m], ctx.out["logits"][m]
        out = self.item_loss(logits, cand, self.buf.get(idx, cand)).mean()
        self.buf.set(idx, self.new_confidence(logits.detach(), cand), self._dist)
        return out

    def observe(self, ctx):
        """Warm-up (weight 0): confidences still follow the model, restricted to the candidates."""
        m = ctx.mask("candidates")
        if m.any():
            idx, cand = ctx.batch["index"][m], ctx.batch["candidates"][m]
            self.buf.set(idx, self.new_confidence(ctx.out["logits"][m].detach(), cand), self._dist)


@register_objective("ce")
class CrossEntropy(Objective):
    """Cross-entropy on items with a clean label (label smoothing, mixup=alpha optional)."""

    items = ("clean",)

    def __init__(self, smoothing: float = 0.0, mixup: float = 0.0, **kw):
        super().__init__(**kw)
        self.smoothing, self.mixup = float(smoothing), float(mixup)

    def loss(self, ctx):
        m = ctx.mask("clean")
        if not m.any():
            return None
        y = ctx.batch["clean"][m].long()
        if self.mixup > 0 and int(m.sum()) > 1:
            from pllcli.training.augment import mixup
            onehot = F.one_hot(y, ctx.num_classes).float()
            x, t = mixup(ctx.batch["x"][m], onehot, self.mixup)
            t = t * (1 - self.smoothing) + self.smoothing / ctx.num_classes
            lengths = ctx.batch["lengths"][m]
            return pll.soft_ce(ctx.forward(x, lengths)["logits"], t).mean()
        return F.cross_entropy(ctx.out["logits"][m].float(), y, label_smoothing=self.smoothing)


@register_objective("cc")
class CC(Objective):
    """CC: -log of the (prior-weighted) summed candidate probability."""

    items = ("candidates",)

    def __init__(self, eps: float = 0.0, **kw):
        super().__init__(**kw)
        self.eps = float(eps)

    def loss(self, ctx):
        m = ctx.mask("candidates")
        if not m.any():
            return None
        return _mean(pll.cc_loss(ctx.out["logits"], ctx.batch["candidates"], self.eps), m)


@register_objective("proden")
class Proden(_ReestimatedPLL):
    """PRODEN/RC: confidence-weighted CE, confidences re-estimated from the model (x prior, eps outside)."""

    def __init__(self, eps: float = 0.0, **kw):
        super().__init__(**kw)
        self.eps = float(eps)

    def item_loss(self, logits, cand, conf):
        return pll.soft_ce(logits, conf)

    def new_confidence(self, logits, cand):
        return pll.proden_confidence(logits, cand, self.eps)


register_objective("rc")(type("RC", (Proden,), {"__doc__": "RC: same as proden (alias)."}))
register_objective("proden")(Proden)


@register_objective("lws")
class LWS(_ReestimatedPLL):
    """LWS: leveraged weighted sigmoid loss (beta weighs the non-candidate term)."""

    init = staticmethod(pll.lws_initial_confidence)

    def __init__(self, beta: float = 1.0, **kw):
        super().__init__(**kw)
        self.beta = float(beta)

    def item_loss(self, logits, cand, conf):
        return pll.lws_loss(logits, cand, conf, self.beta)

    def new_confidence(self, logits, cand):
        return pll.lws_confidence(logits, cand)


@register_objective("pico")
class PiCO(_BufferedPLL):
    """PiCO-style: confidence CE + supervised contrastive term; confidences move towards the
    candidate whose class prototype is nearest."""

    def __init__(self, lam: float = 0.5, phi: float = 0.9, proto_m: float = 0.99, temperature: float = 0.1,
                 warmup: float = 1.0, **kw):
        super().__init__(**kw)
        self.lam, self.phi, self.proto_m, self.temperature, self.warmup = (
            float(lam), float(phi), float(proto_m), float(temperature), float(warmup))
        self.prototypes = None

    def loss(self, ctx):
        m = ctx.mask("candidates")
        if not m.any():
            return None
        idx, cand = ctx.batch["index"][m], ctx.batch["candidates"][m]
        logits, z1 = ctx.out["logits"][m], ctx.out["embedding"][m]
        z2 = ctx.view(1)["embedding"][m]
        conf = self.buf.get(idx, cand)
        cls = pll.soft_ce(logits, conf).mean()
        with torch.no_grad():
            p = F.softmax(logits.float(), 1) * (cand > 0)
            pseudo = p.argmax(1)
            zn = F.normalize(z1.detach().float(), dim=1)
            if self.prototypes is None:
                self.prototypes = torch.zeros(self.num_classes, zn.shape[1], device=zn.device)
            for c in pseudo.unique():  # EMA prototype update
                mu = zn[pseudo == c].mean(0)
                self.prototypes[c] = F.normalize(self.proto_m * self.prototypes[c] + (1 - self.proto_m) * mu, dim=0)
            if ctx.progress >= self.warmup:
                onehot = pll.pico_pseudo_target(z1.detach(), self.prototypes, cand)
                self.buf.set(idx, self.phi * conf + (1 - self.phi) * onehot, self._dist)
        con = pll.supcon_loss(z1, z2, pseudo, self.temperature).mean()
        return cls + self.lam * con

    def state_dict(self):
        s = super().state_dict()
        if self.prototypes is not None:
            s["prototypes"] = self.prototypes.cpu()
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state and "prototypes" in state:
            self.prototypes = state["prototypes"].to(self.device)


@register_objective("cr")
class CRDPLL(_BufferedPLL):
    """CR-DPLL: complementary loss + KL of two augmented views to confidences from both views
    (lam ramps up linearly over `ramp` epochs)."""

    def __init__(self, lam: float = 1.0, ramp: float = 5.0, eps: float = 0.0, **kw):
        super().__init__(**kw)
        self.lam, self.ramp, self.eps = float(lam), float(ramp), float(eps)

    def loss(self, ctx):
        m = ctx.mask("candidates")
        if not m.any():
            return None
        idx, cand = ctx.batch["index"][m], ctx.batch["candidates"][m]
        l1, l2 = ctx.out["logits"][m], ctx.view(1)["logits"][m]
        conf = self.buf.get(idx, cand)
        lam = self.lam * min(1.0, ctx.progress / self.ramp) if self.ramp > 0 else self.lam
        out = pll.complementary_loss(l1, cand).mean() + lam * (
            pll.kl_to_target(l1, conf) + pll.kl_to_target(l2, conf)).mean()
        self.buf.set(idx, pll.cr_confidence([l1.detach(), l2.detach()], cand, self.eps), self._dist)
        return out

    def observe(self, ctx):
        m = ctx.mask("candidates")
        if m.any():
            idx, cand = ctx.batch["index"][m], ctx.batch["candidates"][m]
            self.buf.set(idx, pll.cr_confidence([ctx.out["logits"][m].detach()], cand, self.eps), self._dist)


@register_objective("mse")
class NaiveMSE(Objective):
    """Naive baseline: sigmoid outputs, MSE against the multi-hot candidate vector."""

    items = ("candidates",)

    def loss(self, ctx):
        m = ctx.mask("candidates")
        if not m.any():
            return None
        return _mean(pll.mse_loss(ctx.out["logits"], ctx.batch["candidates"]), m)
