"""Self-supervised pretraining of an encoder on feature stores (labeled or not).

Objectives (`pllcli pretrain --objective ...`):

- ``contrastive``: SimCLR. Two augmented views of each clip (independent random crops,
  SpecAugment time/frequency masks, gain, added noise, mixing with another clip of the batch)
  -> encoder embedding -> 2-layer projection head -> NT-Xent (`pllcli.losses.semi.nt_xent`).
- ``masked``: spans of frames are replaced by the per-bin mean (0 after the encoder's input
  normalisation); a linear decoder on the encoder's frame outputs reconstructs the normalised
  input; MSE on the hidden frames only (`masked_reconstruction_loss`).
- ``apc``: future-frame prediction. The default encoders are bidirectional, so frame-wise APC
  would see the answer; instead every clip is cut at a random frame c (frames >= c hidden and
  excluded by `lengths`) and a linear head on the prefix embedding predicts the next `shift`
  frames: L1 (`prefix_apc_loss`).

The output is an encoder checkpoint (`meta.kind == "encoder"`) for `train --init CKPT [--freeze]`.
The encoder's input normalisation is set from the pretraining data. A loss curve goes to a
JSONL log; `resume=True` continues from `<out>.resume.pt` written after every epoch. With
`cfg.data` stream (or auto over budget) one store is streamed from disk (`pllcli.training.stream`):
the same crops of the same clips, other batch compositions.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pllcli.errors import CheckpointError, InputError, UsageError
from pllcli.training.augment import AugmentConfig, augment_batch  # noqa: F401  (re-exported)
from pllcli.training.checkpoints import Checkpoints
from pllcli.training.config import PRETRAIN_OBJECTIVES as OBJECTIVES, PretrainConfig  # noqa: F401
from pllcli.training.data import InMemoryFeatures, rank_slice, crop_batch  # noqa: F401  (re-exported)
from pllcli.training.distributed import Dist
from pllcli.training.engine import Engine, EngineConfig, Phase, Step, Task
from pllcli.training.schedules import Schedule

log = logging.getLogger(__name__)



# ------------------------------------------------------------------ data

@dataclass
class ClipBank:
    """All clips of one or more feature stores in memory: features (sumT, F), offsets (N+1,)."""

    features: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    config: object  # FeatureConfig
    paths: list[str]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_frames(self) -> np.ndarray:
        return np.diff(self.offsets)


def load_clip_bank(paths: Sequence[str | Path]) -> ClipBank:
    """Load feature stores; all must share one feature config (ConfigMismatchError otherwise)."""
    from pllcli.features.config import check_compatible
    from pllcli.features.store import FeatureStore
    if not paths:
        raise UsageError("need at least one feature store")
    feats, offs, ids, config = [], [0], [], None
    for p in paths:
        if not Path(p).exists():
            raise InputError("no such file", str(p))
        fs = FeatureStore(p)
        if config is None:
            config = fs.config
        else:
            check_compatible(config, fs.config, f"feature store {p} vs {paths[0]}")
        x, o = fs.load_all()
        feats.append(x)
        offs.extend((o[1:] + offs[-1]).tolist())
        ids.extend(fs.ids.tolist())
        fs.close()
    if len(ids) == 0:
        raise InputError("the feature stores hold no clips", str(paths[0]))
    return ClipBank(np.concatenate(feats, 0), np.asarray(offs, np.int64), np.asarray(ids, dtype=object),
                    config, [str(p) for p in paths])


def span_mask(lengths: torch.Tensor, t: int, ratio: float, span: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T) bool: about `ratio` of each clip's valid frames hidden in spans of `span` frames."""
    b = lengths.shape[0]
    m = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        n = int(lengths[i])
        k = max(1, round(ratio * n / span))
        starts = torch.randint(0, max(1, n - span + 1), (k,), generator=generator)
        for s in starts.tolist():
            m[i, s: min(n, s + span)] = True
    return m


# ------------------------------------------------------------------ model pieces

class PretrainHeads(nn.Module):
    def __init__(self, objective: str, emb_dim: int, frame_dim: int, n_mels: int, stride: int,
                 proj_dim: int = 128, apc_shift: int = 5):
        super().__init__()
        self.objective = objective
        if objective == "contrastive":
            self.net = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.ReLU(inplace=True), nn.Linear(emb_dim, proj_dim))
        elif objective == "masked":
            self.net = nn.Sequential(nn.Linear(frame_dim, frame_dim), nn.GELU(), nn.Linear(frame_dim, stride * n_mels))
        else:
            self.net = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, apc_shift * n_mels))
        self.stride, self.n_mels, self.apc_shift = stride, n_mels, apc_shift


def _encoder_stats(encoder: nn.Module, bank: ClipBank, mem=None) -> None:
    """Input normalisation from the bank's frames (a subsample), or from `mem.stats()` when the
    bank is streamed (features None)."""
    norm = getattr(encoder, "norm", None)
    if norm is not None and hasattr(norm, "set_stats"):
        if bank.features is None:
            norm.set_stats(*mem.stats())
            return
        x = bank.features
        sub = x[:: max(1, len(x) // 200_000)]
        norm.set_stats(sub.mean(0), sub.std(0))


def _fill_value(encoder: nn.Module, f: int) -> torch.Tensor:
    norm = getattr(encoder, "norm", None)
    return norm.mean.detach().clone() if norm is not None and hasattr(norm, "mean") else torch.zeros(f)


def _normalised(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    norm = getattr(encoder, "norm", None)
    return norm(x).detach() if norm is not None else x


def pretrain_step_loss(objective: str, encoder: nn.Module, heads: PretrainHeads, x: torch.Tensor,
                       lengths: torch.Tensor, *, x2: torch.Tensor | None = None,
                       lengths2: torch.Tensor | None = None, temperature: float = 0.2,
                       mask_ratio: float = 0.3, mask_span: int = 8,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One batch's self-supervised loss. For contrastive, (x, lengths) and (x2, lengths2) are the views."""
    from pllcli.losses.semi import masked_reconstruction_loss, nt_xent, prefix_apc_loss
    if objective == "contrastive":
        z1 = heads.net(encoder(x, lengths)["embedding"])
        z2 = heads.net(encoder(x2, lengths2)["embedding"])
        return nt_xent(z1, z2, temperature)
    b, t, f = x.shape
    fill = _fill_value(encoder, f).to(x.device)
    target = _normalised(encoder, x)
    if objective == "masked":
        m = span_mask(lengths, t, mask_ratio, mask_span, generator).to(x.device)
        xin = torch.where(m[..., None], fill, x)
        enc = encoder(xin, lengths)
        h = enc["frames"]
        rec = heads.net(h).reshape(b, h.shape[1] * heads.stride, f)
        tt = min(t, rec.shape[1])
        return masked_reconstruction_loss(rec[:, :tt], target[:, :tt], m[:, :tt])
    if objective == "apc":
        k = heads.apc_shift
        lo = torch.clamp(lengths // 4, min=1)
        hi = torch.clamp(lengths - 1, min=1)
        u = torch.rand(b, generator=generator).to(x.device)
        cut = torch.minimum(lo + (u * (hi - lo + 1).to(u.dtype)).long(), hi)
        hidden = torch.arange(t, device=x.device)[None, :] >= cut[:, None]
        xin = torch.where(hidden[..., None], fill, x)
        emb = encoder(xin, cut)["embedding"]
        pred = heads.net(emb).reshape(b, k, f)
        return prefix_apc_loss(pred, target, cut, lengths)
    raise UsageError(f"unknown pretraining objective {objective!r} (choose from {', '.join(OBJECTIVES)})")


# ------------------------------------------------------------------ checkpoint

def encoder_meta(model_cfg: dict, config, objective: str, params: dict, epoch: int, loss: float,
                 provenance: dict | None = None) -> dict:
    return {
        "kind": "encoder",
        "model": model_cfg,
        "classes": [],
        "task": None,
        "feature_config": config.to_dict(),
        "feature_config_hash": config.hash(),
        "objective": objective,
        "args": params,
        "epoch": epoch,
        "metrics": {"pretrain_loss": loss},
        "provenance": provenance or {},
    }


def save_encoder_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Save `model.encoder`'s weights (keys prefixed "encoder.") as a kind "encoder" checkpoint.

    `pllcli.checkpoint.encoder_state` strips the prefix, so `train --init` loads them into a fresh
    model's encoder; the pretraining heads (projection, decoder) are not saved.
    """
    from pllcli.checkpoint import save_checkpoint
    state = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    save_checkpoint(path, state, meta)


def load_encoder_into(model: nn.Module, path: str | Path) -> dict:
    """Load an encoder (or classifier) checkpoint's encoder weights into `model.encoder`; return meta."""
    from pllcli.checkpoint import encoder_state, load_checkpoint
    state, meta = load_checkpoint(path)
    try:
        model.encoder.load_state_dict(encoder_state(state, meta))
    except RuntimeError as e:
        raise CheckpointError(f"{path}: encoder weights do not fit model {model.config.get('name')!r} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return meta


# ------------------------------------------------------------------ the engine task

class PretrainNet(nn.Module):
    """The encoder (inside the full model) and the pretraining heads; forward returns the batch's
    loss, so that the whole step runs inside one forward pass (as DistributedDataParallel needs)."""

    def __init__(self, model: nn.Module, heads: PretrainHeads, cfg: PretrainConfig):
        super().__init__()
        self.model, self.heads, self.cfg = model, heads, cfg

    def forward(self, x, lengths, x2=None, lengths2=None, generator=None):
        c = self.cfg
        return pretrain_step_loss(str(c.objective), self.model.encoder, self.heads, x, lengths, x2=x2,
                                  lengths2=lengths2, temperature=c.temperature, mask_ratio=c.mask_ratio,
                                  mask_span=c.mask_span, generator=generator)


def crop_views(mem, rows, seed: int, epoch: int, i: int, crop_frames: int, min_frac: float, two: bool) -> dict:
    """Batch `i` of `epoch`: random crops of `rows` of `mem` ({x, lengths[, x2, lengths2], seed, n});
    `two` views (contrastive) of `min_frac`..1 of the crop length."""
    rng = np.random.default_rng([seed, epoch, i, 1])
    b = {"seed": (seed * 1_000_003 + epoch * 7919 + i) % (2**62), "n": len(rows)}
    for k in (("x", "lengths"), ("x2", "lengths2")) if two else (("x", "lengths"),):
        b[k[0]], b[k[1]] = mem.gather(rows, crop_frames, rng, None, min_frac)
    return b


class StreamViews:
    """`StreamDataset(batch_fn=...)` of pretraining: `crop_views` of the batch's own clips (picklable)."""

    def __init__(self, cfg: PretrainConfig):
        two = cfg.objective == "contrastive"
        self.args = (cfg.seed, cfg.crop_frames, cfg.crop_min_frac if two else 1.0, two)

    def __call__(self, mem, rows, epoch: int, number: int) -> dict:
        seed, crop, mf, two = self.args
        return crop_views(mem, np.arange(len(rows)), seed, epoch, number, crop, mf, two)


class PretrainTask(Task):
    """Random crops of the clips of a ClipBank (two augmented views for contrastive), or the
    batches of a StreamLoader (`loader`)."""

    def __init__(self, net: PretrainNet, mem, cfg: PretrainConfig, augment: AugmentConfig, device, dist: Dist,
                 loader=None):
        self.model, self.mem, self.cfg, self.aug, self.device, self.dist = net, mem, cfg, augment, device, dist
        self.loader = loader
        n = len(mem.num_frames)
        steps = math.ceil(n / cfg.batch_size)
        if cfg.objective == "contrastive" and n % cfg.batch_size == 1:
            steps -= 1  # the last batch would hold a single clip
        self.steps = min(steps, cfg.max_batches_per_epoch) if cfg.max_batches_per_epoch else steps

    def phases(self) -> list[Phase]:
        params = list(self.model.model.encoder.parameters()) + list(self.model.heads.parameters())
        if self.loader is not None:
            return [Phase("pretrain", params, self.loader.epoch, self.loader)]
        return [Phase("pretrain", params, self._batches)]

    def _batches(self, epoch: int) -> list:
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.mem.num_frames))
        bs = self.cfg.batch_size
        out = [order[s * bs:(s + 1) * bs] for s in range(self.steps)]
        return rank_slice([(i, b) for i, b in enumerate(out) if len(b) >= 2], self.dist.rank, self.dist.world)

    def batch(self, phase, key, epoch: int) -> dict:
        if isinstance(key, dict):  # streamed: built by StreamViews, on the device
            return key
        i, rows = key
        c = self.cfg
        two = c.objective == "contrastive"
        b = crop_views(self.mem, rows, c.seed, epoch, i, c.crop_frames, c.crop_min_frac if two else 1.0, two)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}

    def loss(self, phase, b: dict, step: Step):
        gen = torch.Generator().manual_seed(int(b["seed"]))
        if self.cfg.objective == "contrastive":
            loss = step.forward(augment_batch(b["x"], b["lengths"], self.aug, gen), b["lengths"],
                                x2=augment_batch(b["x2"], b["lengths2"], self.aug, gen), lengths2=b["lengths2"])
        else:
            loss = step.forward(b["x"], b["lengths"], generator=gen)
        if b["n"] < 2 and self.cfg.objective == "contrastive":  # a streamed last batch of one clip
            loss = 0.0 * loss
        return loss, {}, b["n"]

    def end_epoch(self, epoch: int) -> dict:
        return {"objective": str(self.cfg.objective)}

    def describe(self, b: dict) -> str:
        return f"{b['n']} clips"


_RESUME_KEYS = ("objective", "model", "model_options", "batch_size", "crop_frames")


def pretrain(stores: Sequence[str | Path], out: str | Path, cfg: PretrainConfig, *, log_path: str | Path | None = None,
             resume: bool = False, device: str = "cpu", augment: AugmentConfig | None = None,
             progress: bool = True) -> dict:
    """Pretrain an encoder; write the checkpoint to `out`; return a summary dict.

    The resume state goes to `<out>.resume.pt` after every epoch (removed at the end); with
    `resume=True` a run continues from it (ConfigMismatchError if it was made with other settings).
    """
    from pllcli.io import provenance
    from pllcli.models import build_model
    from pllcli.training.distributed import start

    dist, dev = start(device, cfg.seed)
    bank, mem, why = _open_bank(stores, cfg)
    n = len(bank)
    if cfg.objective == "contrastive" and n < 2:
        raise InputError(f"contrastive pretraining needs at least 2 clips, the stores hold {n}", str(stores[0]))
    f = mem.dim
    model = build_model(cfg.model, n_mels=f, num_classes=1, **cfg.model_options)
    _encoder_stats(model.encoder, bank, mem)
    net = PretrainNet(model, _heads(model.encoder, cfg, f), cfg).to(dev)
    loader = None
    if bank.features is None:
        import os

        from pllcli.training.stream import make_loader
        loader = make_loader(mem.store, batch_size=cfg.batch_size, max_memory=cfg.max_memory,
                             workers=cfg.loader_workers, device=dev, max_frames=cfg.crop_frames,
                             procs=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), seed=cfg.seed, rank=dist.rank,
                             world=dist.world, batch_fn=StreamViews(cfg))
        log.info("%s", loader.describe())
    task = PretrainTask(net, mem, cfg, augment or AugmentConfig.views(), dev, dist, loader=loader)

    out = Path(out)
    resume_path = out.with_name(out.name + ".resume.pt")
    log_path = Path(log_path) if log_path is not None else out.with_name(out.stem + ".log.jsonl")
    params = {k: _plain(v) for k, v in asdict(cfg).items()}
    resume_config = {k: params[k] for k in _RESUME_KEYS}
    resuming = resume and resume_path.exists()
    if dist.main:
        out.parent.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not resuming:
            log_path.unlink(missing_ok=True)
    state_meta = {"kind": "pretrain-state", "model": model.config, "feature_config": bank.config.to_dict(),
                  "feature_config_hash": bank.config.hash(), "train_config": resume_config}
    ecfg = EngineConfig(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
                        schedule=Schedule("cosine", cfg.epochs, warmup_epochs=0.05 * cfg.epochs), grad_clip=5.0,
                        progress=progress, desc="pretrain", resume=str(resume_path) if resuming else None,
                        resume_config=resume_config)
    t0 = time.time()
    engine = Engine(task, ecfg, Checkpoints(resume_path, meta=state_meta), log_path, dev, dist)
    history = engine.fit().history
    last = history[-1]["loss"] if history else float("nan")
    if dist.main:
        model.to("cpu")
        meta = encoder_meta(model.config, bank.config, str(cfg.objective), params, cfg.epochs, last,
                            provenance(inputs={f"features{i}": p for i, p in enumerate(bank.paths)}, params=params))
        save_encoder_checkpoint(out, model, meta)
        resume_path.unlink(missing_ok=True)
    dist.barrier()
    dist.close()
    return {"output": str(out), "objective": str(cfg.objective), "clips": n, "epochs": cfg.epochs,
            "final_loss": last, "log": str(log_path), "seconds": round(time.time() - t0, 2),
            "data": {"path": "memory" if loader is None else "stream", "reason": why}}


def _open_bank(stores, cfg: PretrainConfig):
    """(ClipBank, its InMemoryFeatures or StoreFeatures, data-path reason) for `cfg.data`; a streamed
    bank (one store) has features None."""
    from pllcli.features.store import FeatureStore
    from pllcli.training.stream import StoreFeatures
    from pllcli.training.trainer import data_path
    from pllcli.features.config import check_compatible
    for p in stores:
        if not Path(p).exists():
            raise InputError("no such file", str(p))
    opened = [FeatureStore(p) for p in stores]
    for p, fs in zip(stores[1:], opened[1:]):
        check_compatible(opened[0].config, fs.config, f"feature store {p} vs {stores[0]}")
    path, why = data_path(cfg, opened,
                          {"several feature stores (pllcli merge them first)": len(stores) > 1,
                           "max_batches_per_epoch": cfg.max_batches_per_epoch > 0})
    log.info("%s", why)
    if path == "memory":
        bank = load_clip_bank(stores)
        return bank, InMemoryFeatures(bank.features, bank.offsets), why
    fs = FeatureStore(stores[0])
    if len(fs.ids) == 0:
        raise InputError("the feature stores hold no clips", str(stores[0]))
    return ClipBank(None, fs.offsets, fs.ids, fs.config, [str(stores[0])]), StoreFeatures(fs), why


def _heads(encoder: nn.Module, cfg: PretrainConfig, f: int) -> PretrainHeads:
    emb_dim = getattr(encoder, "out_dim", None)
    frame_dim = getattr(encoder, "frame_dim", None)
    if emb_dim is None or frame_dim is None:
        with torch.no_grad():
            o = encoder(torch.zeros(2, 32, f), torch.tensor([32, 32]))
        emb_dim, frame_dim = o["embedding"].shape[-1], o["frames"].shape[-1]
    return PretrainHeads(str(cfg.objective), emb_dim, frame_dim, f, int(getattr(encoder, "stride", 1)),
                         apc_shift=cfg.apc_shift)


def _plain(v):
    return v.value if hasattr(v, "value") else v
