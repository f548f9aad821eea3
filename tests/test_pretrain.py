"""pllcli.pretrain and `pllcli pretrain`: views, objectives, encoder checkpoint, resume, bad input."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from pllcli.errors import ConfigMismatchError, UsageError
from pllcli.pretrain import (AugmentConfig, PretrainConfig, augment_batch, crop_batch, load_encoder_into, pretrain,
                             span_mask)
from tests.conftest import run_cli

MOPT = {"width": 4, "rnn_hidden": 8, "proj": 16}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import write_feature_store
    d = tmp_path_factory.mktemp("pt")
    rng = np.random.default_rng(0)
    items = [{"id": f"c{i}", "features": (rng.normal(size=(int(rng.integers(20, 50)), 16)) + i % 3).astype(np.float32),
              "duration": 0.4} for i in range(20)]
    write_feature_store(d / "a.h5", FeatureConfig(n_mels=16), items[:12])
    write_feature_store(d / "b.h5", FeatureConfig(n_mels=16), [dict(it, id="b" + it["id"]) for it in items[12:]])
    write_feature_store(d / "other.h5", FeatureConfig(n_mels=16, fmin=50.0), items[:4])
    return d


def test_crop_batch_lengths_and_content():
    feats = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    offsets = np.array([0, 3, 10])
    x, ln = crop_batch(feats, offsets, np.array([0, 1]), crop=4, rng=np.random.default_rng(0))
    assert ln.tolist() == [3, 4] and x.shape == (2, 4, 2)
    assert x[0, :3].flatten().tolist() == feats[:3].flatten().tolist() and x[0, 3].abs().sum() == 0
    start = int(x[1, 0, 0].item()) // 2
    assert 3 <= start <= 6 and x[1, :, 0].tolist() == [2.0 * (start + k) for k in range(4)]


def test_crop_batch_min_frac_varies_view_lengths():
    feats = np.zeros((100, 2), np.float32)
    offsets = np.array([0, 100])
    rng = np.random.default_rng(0)
    lens = [int(crop_batch(feats, offsets, np.array([0]), 50, rng, min_frac=0.6)[1][0]) for _ in range(40)]
    assert min(lens) >= 30 and max(lens) <= 50 and len(set(lens)) > 5
    assert int(crop_batch(feats, offsets, np.array([0]), 50, rng, random=False, min_frac=0.6)[1][0]) == 50


def test_augment_leaves_padding_and_mixes_in_power_domain():
    x = torch.zeros(2, 6, 4)
    x[1] = math.log(3.0)
    lengths = torch.tensor([4, 6])
    off = AugmentConfig.none()
    cfg = dataclasses.replace(off, mix_prob=1.0, mix_max=0.5)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, lengths, cfg, g)
    assert torch.all(y[0, 4:] == 0)                       # padding untouched
    # clip 0 (power 1) mixed with clip 1 (power 3) at weight w: log((1-w) + 3w) = log(1 + 2w), w in [0, .5]
    v = y[0, 0, 0].item()
    assert 0 <= v <= math.log(2.0) + 1e-6 and torch.allclose(y[0, :4], torch.full((4, 4), v))
    assert torch.equal(augment_batch(x, lengths, off), x)  # nothing enabled: identity


def test_augment_masks_fill_with_clip_mean():
    x = torch.arange(40.0).reshape(1, 10, 4)
    cfg = dataclasses.replace(AugmentConfig.none(), time_masks=1, time_width=0.5, fill="clip")
    torch.manual_seed(1)
    y = augment_batch(x, None, cfg, torch.Generator().manual_seed(3))
    changed = (y != x).any(-1)[0]
    assert changed.sum() <= 5
    if changed.any():
        assert torch.allclose(y[0, changed], torch.full_like(y[0, changed], x.mean()))


def test_span_mask_ratio():
    m = span_mask(torch.tensor([100, 40]), 100, 0.3, 5, torch.Generator().manual_seed(0))
    assert not m[1, 40:].any()
    assert 10 <= int(m[0].sum()) <= 30 and int(m[1].sum()) >= 5


@pytest.mark.parametrize("objective", ["contrastive", "masked", "apc"])
def test_pretrain_writes_encoder_checkpoint_loadable_by_model(stores, tmp_path, objective):
    from pllcli.checkpoint import load_checkpoint
    from pllcli.models import build_model
    out = tmp_path / "new" / "dir" / "enc.pt"  # missing folders are created
    s = pretrain([stores / "a.h5", stores / "b.h5"], out,
                 PretrainConfig(objective=objective, epochs=2, batch_size=8, model_options=MOPT), progress=False)
    assert s["clips"] == 20 and math.isfinite(s["final_loss"])
    state, meta = load_checkpoint(out)
    assert meta["kind"] == "encoder" and meta["model"]["name"] == "convgru" and meta["objective"] == objective
    assert meta["feature_config"]["n_mels"] == 16 and all(k.startswith("encoder.") for k in state)
    model = build_model("convgru", 16, 10, **MOPT)  # any number of classes: the head is not in the file
    load_encoder_into(model, out)
    assert torch.equal(model.encoder.norm.mean, state["encoder.norm.mean"])
    assert model.encoder.norm.std.min() > 0.5              # stats were set from the data
    lines = [json.loads(ln) for ln in (out.parent / "enc.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all("loss" in r for r in lines)


def test_contrastive_loss_decreases(stores, tmp_path):
    s = pretrain([stores / "a.h5", stores / "b.h5"], tmp_path / "e.pt",
                 PretrainConfig(objective="masked", epochs=8, batch_size=10, lr=3e-3, model_options=MOPT), progress=False)
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "e.log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert s["final_loss"] == pytest.approx(losses[-1], abs=1e-5)


def test_resume_continues_and_refuses_other_settings(stores, tmp_path, monkeypatch):
    import pllcli.pretrain as P
    out = tmp_path / "r.pt"
    cfg = PretrainConfig(objective="masked", epochs=3, batch_size=8, model_options=MOPT)  # 12 clips: 2 steps/epoch
    real, calls = P.pretrain_step_loss, [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == 5:                                  # first step of epoch 3
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(P, "pretrain_step_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain([stores / "a.h5"], out, cfg, progress=False)
    resume_file = tmp_path / "r.pt.resume.pt"
    assert resume_file.exists() and not out.exists()
    other = PretrainConfig(**{**cfg.__dict__, "batch_size": 4})
    with pytest.raises(ConfigMismatchError, match="other settings; differing: batch_size"):
        pretrain([stores / "a.h5"], out, other, resume=True, progress=False)
    monkeypatch.setattr(P, "pretrain_step_loss", real)
    calls[0] = 0
    pretrain([stores / "a.h5"], out, cfg, resume=True, progress=False)
    epochs = [json.loads(ln)["epoch"] for ln in (tmp_path / "r.log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3] and out.exists() and not resume_file.exists()


def test_bad_inputs(stores, tmp_path):
    with pytest.raises(ConfigMismatchError, match="fmin"):
        pretrain([stores / "a.h5", stores / "other.h5"], tmp_path / "x.pt", PretrainConfig(epochs=1), progress=False)
    with pytest.raises(UsageError):
        pretrain([stores / "a.h5"], tmp_path / "x.pt", PretrainConfig(objective="bert"), progress=False)
    r = run_cli("pretrain", stores / "a.h5", stores / "other.h5", "-o", tmp_path / "x.pt", "--epochs", "1")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "fmin" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("pretrain", stores / "a.h5", "-o", tmp_path / "x.pt", "--objective", "nope")
    assert r.returncode == 2 and "contrastive" in r.stderr
