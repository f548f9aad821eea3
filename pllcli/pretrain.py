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
JSONL log; `resume=True` continues from `<out>.resume.pt` written after every epoch.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pllcli.errors import CheckpointError, InputError, TrainingError, UsageError

log = logging.getLogger(__name__)

OBJECTIVES = ("contrastive", "masked", "apc")


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


def crop_batch(bank_features: np.ndarray, offsets: np.ndarray, rows: np.ndarray, crop: int,
               rng: np.random.Generator, random: bool = True, min_frac: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (or centred) crops of at most `crop` frames: (B, T, F) zero-padded, lengths (B,).

    With `min_frac` < 1 (random crops only) each crop keeps a random fraction in [min_frac, 1] of
    min(clip, crop) frames, so that two views of one clip never share their length (a shortcut
    for the contrastive task when clips are shorter than the crop).
    """
    lens = np.minimum(offsets[rows + 1] - offsets[rows], crop)
    if random and min_frac < 1.0:
        lens = np.maximum(1, np.round(lens * rng.uniform(min_frac, 1.0, len(rows)))).astype(np.int64)
    t = max(int(lens.max()), 1)
    out = np.zeros((len(rows), t, bank_features.shape[1]), np.float32)
    for b, r in enumerate(rows):
        n = int(offsets[r + 1] - offsets[r])
        ln = int(lens[b])
        start = int(rng.integers(0, n - ln + 1)) if random and n > ln else max(0, (n - ln) // 2)
        out[b, :ln] = bank_features[offsets[r] + start: offsets[r] + start + ln]
    return torch.from_numpy(out), torch.from_numpy(lens.astype(np.int64))


@dataclass
class AugmentConfig:
    """Views for contrastive learning and consistency objectives (log-mel domain)."""

    time_masks: int = 2
    time_mask_frac: float = 0.15   # each mask up to this fraction of the clip
    freq_masks: int = 2
    freq_mask_bins: int = 8
    gain_db: float = 6.0           # uniform in [-gain_db, gain_db]; log-power shift by gain*ln(10)/10
    noise_std: float = 0.2         # Gaussian noise added in the log domain (x std of the clip)
    mix_prob: float = 0.5          # probability of mixing with another clip of the batch
    mix_max: float = 0.35          # its weight in the power domain, uniform in [0, mix_max]
    freq_warp: float = 0.1         # mel axis scaled by a factor in [1 - a, 1 + a] (other speakers)
    time_warp: float = 0.2         # one anchor frame moved by up to this fraction of the clip

    @classmethod
    def weak(cls) -> "AugmentConfig":
        return cls(time_masks=0, freq_masks=0, gain_db=3.0, noise_std=0.05, mix_prob=0.0, freq_warp=0.0,
                   time_warp=0.0)


def augment_batch(x: torch.Tensor, lengths: torch.Tensor | None, cfg: AugmentConfig | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A random view of a log-mel batch (B, T, F); padding stays untouched. Not differentiable w.r.t. cfg.

    Mixing: log(a e^x + w e^x_other) with the other clip of the batch (roll by one), weights
    (1 - w, w), done in the power domain as audio mixing would; masks fill with the clip mean.
    """
    cfg = cfg or AugmentConfig()
    g = generator
    b, t, f = x.shape
    dev = x.device
    valid = (torch.arange(t, device=dev)[None, :] < lengths.to(dev)[:, None]) if lengths is not None \
        else torch.ones(b, t, dtype=torch.bool, device=dev)
    vm = valid[..., None].to(x.dtype)
    n_valid = vm.sum((1, 2)).clamp_min(1) / f
    mean = (x * vm).sum((1, 2)) / (n_valid * f)                                  # (B,)
    std = (((x - mean[:, None, None]) ** 2 * vm).sum((1, 2)) / (n_valid * f)).sqrt()
    y = x.clone()
    if cfg.freq_warp > 0 or cfg.time_warp > 0:
        from pllcli.training.augment import freq_warp, time_warp
        if cfg.freq_warp > 0:
            y = freq_warp(y, cfg.freq_warp, g)
        if cfg.time_warp > 0:
            y = time_warp(y, lengths if lengths is not None else torch.full((b,), t), cfg.time_warp, g)

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(dev)

    if cfg.mix_prob > 0 and b > 1:
        w = rand(b) * cfg.mix_max * (rand(b) < cfg.mix_prob).to(x.dtype)
        other = torch.roll(x, 1, 0)
        other_valid = torch.roll(vm, 1, 0)
        w_t = w[:, None, None] * other_valid
        y = torch.logaddexp(y + torch.log1p(-w_t), other + torch.log(w_t.clamp_min(1e-12)))
        y = torch.where(w_t > 0, y, x)
    if cfg.gain_db > 0:
        gain = (rand(b) * 2 - 1) * cfg.gain_db * math.log(10) / 10
        y = y + gain[:, None, None]
    if cfg.noise_std > 0:
        y = y + torch.randn(y.shape, generator=g).to(dev) * cfg.noise_std * std[:, None, None]
    lens = lengths.to(dev) if lengths is not None else torch.full((b,), t, device=dev)
    fill = mean[:, None]
    for _ in range(cfg.time_masks):
        width = (rand(b) * cfg.time_mask_frac * lens).long()
        start = (rand(b) * (lens - width).clamp_min(0)).long()
        ar = torch.arange(t, device=dev)[None, :]
        m = (ar >= start[:, None]) & (ar < (start + width)[:, None])
        y = torch.where(m[..., None], fill[..., None], y)
    for _ in range(cfg.freq_masks):
        width = (rand(b) * cfg.freq_mask_bins).long()
        start = (rand(b) * (f - width)).long()
        ar = torch.arange(f, device=dev)[None, :]
        m = (ar >= start[:, None]) & (ar < (start + width)[:, None])
        y = torch.where(m[:, None, :], fill[..., None], y)
    return y * vm + x * (1 - vm)


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


def _encoder_stats(encoder: nn.Module, bank: ClipBank) -> None:
    norm = getattr(encoder, "norm", None)
    if norm is not None and hasattr(norm, "set_stats"):
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


# ------------------------------------------------------------------ loop

@dataclass
class PretrainConfig:
    objective: str = "contrastive"
    model: str = "convgru"
    model_options: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    crop_frames: int = 100
    crop_min_frac: float = 0.6
    temperature: float = 0.2
    mask_ratio: float = 0.3
    mask_span: int = 8
    apc_shift: int = 5
    seed: int = 0
    max_batches_per_epoch: int = 0  # 0 = all


def pretrain(stores: Sequence[str | Path], out: str | Path, cfg: PretrainConfig, *, log_path: str | Path | None = None,
             resume: bool = False, device: str = "cpu", augment: AugmentConfig | None = None,
             progress: bool = True) -> dict:
    """Pretrain an encoder; write the checkpoint to `out`; return a summary dict."""
    from pllcli.io import provenance
    from pllcli.models import build_model
    from pllcli.runtime import resolve_device, set_seed

    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"unknown pretraining objective {cfg.objective!r} (choose from {', '.join(OBJECTIVES)})")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise UsageError("pretrain needs --epochs >= 1 and --batch-size >= 2")
    dev = resolve_device(device)
    set_seed(cfg.seed)
    bank = load_clip_bank(stores)
    n = len(bank)
    if cfg.objective == "contrastive" and n < 2:
        raise InputError(f"contrastive pretraining needs at least 2 clips, the stores hold {n}", str(stores[0]))
    f = bank.features.shape[1]
    model = build_model(cfg.model, n_mels=f, num_classes=1, **cfg.model_options)
    encoder = model.encoder
    _encoder_stats(encoder, bank)
    emb_dim = getattr(encoder, "out_dim", None)
    frame_dim = getattr(encoder, "frame_dim", None)
    stride = int(getattr(encoder, "stride", 1))
    if emb_dim is None or frame_dim is None:
        with torch.no_grad():
            o = encoder(torch.zeros(2, 32, f), torch.tensor([32, 32]))
        emb_dim, frame_dim = o["embedding"].shape[-1], o["frames"].shape[-1]
    heads = PretrainHeads(cfg.objective, emb_dim, frame_dim, f, stride, apc_shift=cfg.apc_shift)
    model.to(dev)
    heads.to(dev)
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    if cfg.objective == "contrastive" and n % cfg.batch_size == 1:
        steps_per_epoch -= 1  # the last batch would hold a single clip
    if cfg.max_batches_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_batches_per_epoch)
    total = cfg.epochs * steps_per_epoch
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total)))))

    out = Path(out)
    resume_path = out.with_name(out.name + ".resume.pt")
    log_path = Path(log_path) if log_path is not None else out.with_name(out.stem + ".log.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    params_dict = {k: v for k, v in asdict(cfg).items()}
    start_epoch = 0
    if resume and resume_path.exists():
        try:
            st = torch.load(resume_path, map_location="cpu", weights_only=True)
            saved = json.loads(st["config"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{resume_path}: cannot resume ({type(e).__name__}: {e})") from None
        diff = {k for k in ("objective", "model", "model_options", "batch_size", "crop_frames")
                if saved.get(k) != params_dict.get(k)}
        if diff:
            raise UsageError(f"{resume_path}: resume state was made with other settings ({', '.join(sorted(diff))})")
        model.load_state_dict(st["model"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start_epoch = int(st["epoch"])
        log.info("resuming from %s at epoch %d", resume_path, start_epoch)
    elif log_path.exists() and not resume:
        log_path.unlink()

    rng = np.random.default_rng(cfg.seed + 7919 * start_epoch)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * start_epoch)
    aug = augment or AugmentConfig()
    last = float("nan")
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        heads.train()
        order = rng.permutation(n)
        tot, cnt = 0.0, 0
        it = range(steps_per_epoch)
        if progress:
            try:
                from tqdm import tqdm
                it = tqdm(it, desc=f"pretrain {epoch + 1}/{cfg.epochs}", leave=False, file=__import__("sys").stderr)
            except ImportError:  # pragma: no cover
                pass
        for s in it:
            rows = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            if len(rows) < 2:
                continue
            mf = cfg.crop_min_frac if cfg.objective == "contrastive" else 1.0
            x, ln = crop_batch(bank.features, bank.offsets, rows, cfg.crop_frames, rng, min_frac=mf)
            x, ln = x.to(dev), ln.to(dev)
            if cfg.objective == "contrastive":
                x2, ln2 = crop_batch(bank.features, bank.offsets, rows, cfg.crop_frames, rng, min_frac=mf)
                x2, ln2 = x2.to(dev), ln2.to(dev)
                loss = pretrain_step_loss("contrastive", encoder, heads, augment_batch(x, ln, aug, gen), ln,
                                          x2=augment_batch(x2, ln2, aug, gen), lengths2=ln2,
                                          temperature=cfg.temperature)
            else:
                loss = pretrain_step_loss(cfg.objective, encoder, heads, x, ln, mask_ratio=cfg.mask_ratio,
                                          mask_span=cfg.mask_span, generator=gen)
            if not torch.isfinite(loss):
                raise TrainingError(f"pretraining loss became {loss.item()} at epoch {epoch + 1}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(rows)
            cnt += len(rows)
        last = tot / max(cnt, 1)
        rec = {"epoch": epoch + 1, "loss": round(last, 6), "lr": sched.get_last_lr()[0],
               "objective": cfg.objective, "seconds": round(time.time() - t0, 2)}
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        log.info("epoch %d/%d  %s loss %.4f", epoch + 1, cfg.epochs, cfg.objective, last)
        from pllcli.io import atomic_path
        with atomic_path(resume_path) as tmp:
            torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "epoch": epoch + 1, "config": json.dumps(params_dict)}, tmp)
    model.to("cpu")
    meta = encoder_meta(model.config, bank.config, cfg.objective, params_dict, cfg.epochs, last,
                        provenance(inputs={f"features{i}": p for i, p in enumerate(bank.paths)}, params=params_dict))
    save_encoder_checkpoint(out, model, meta)
    if resume_path.exists():
        resume_path.unlink()
    return {"output": str(out), "objective": cfg.objective, "clips": n, "epochs": cfg.epochs,
            "final_loss": last, "log": str(log_path), "seconds": round(time.time() - t0, 2)}
