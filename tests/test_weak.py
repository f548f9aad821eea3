"""WHEN/WHO: tag tables, the network, transcription, training modes and their errors."""
import numpy as np
import pytest
import torch

from pllcli.errors import InputError, UsageError
from pllcli.training import weak


def test_read_tags_and_unknown_class(tmp_path):
    p = tmp_path / "tags.csv"
    p.write_text("id,labels\na,dog;cat\nb,\nc,cat\n")
    ids, Y, classes = weak.read_tags(p)
    assert ids == ["a", "b", "c"] and classes == ["cat", "dog"]
    assert Y.tolist() == [[1, 1], [0, 0], [1, 0]]
    assert weak.positive_clips(Y).tolist() == [True, False, True]
    p.write_text("id,labels\na,dog\nb,cow;dog\n")
    with pytest.raises(InputError, match=r"tags.csv:3 \[labels\]: tag 'cow' of 'b' is not a known class"):
        weak.read_tags(p, classes=["cat", "dog"])
    p.write_text("id,labels\na,dog\na,cat\n")
    with pytest.raises(InputError, match="duplicate id 'a'"):
        weak.read_tags(p)


def test_tags_matrix_from_csr():
    Y = weak.tags_matrix(np.array([0, 2, 2, 3]), np.array([0, 2, 1]), 3)
    assert Y.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert weak.tags_matrix(np.array([0, 2, 2, 3]), np.array([0, 2, 1]), 3, rows=[2]).tolist() == [[0, 1, 0]]


def test_transcription_is_when_times_who():
    when = np.array([0.1, 0.9])
    who = np.array([0.5, 1.0, 0.0])
    assert np.allclose(weak.transcription(when, who), [[0.05, 0.1, 0.0], [0.45, 0.9, 0.0]])
    zw = torch.logit(torch.tensor([[0.1, 0.9]], dtype=torch.float64))
    zc = torch.logit(torch.tensor([[0.5, 0.8]], dtype=torch.float64))
    p = torch.sigmoid(weak.transcription_logits(zw, zc))
    assert np.allclose(p[0].numpy(), [[0.05, 0.08], [0.45, 0.72]], rtol=1e-6)


def test_network_shapes_sharing_and_lengths():
    torch.manual_seed(0)
    net = weak.WhenWhoNet(8, 3, width=4, depth=2, rnn_hidden=4, shared=True)
    x = torch.randn(2, 10, 8)
    out = net(x, torch.tensor([10, 5]))
    assert out["logits"].shape == (2, 3) and out["when_frame_logits"].shape == (2, 5)
    assert out["frame_logits"].shape == (2, 5, 3)
    assert out["frame_lengths"].tolist() == [5, 3]
    assert net.trunk_who is net.trunk_when
    sep = weak.WhenWhoNet(8, 3, width=4, depth=2, rnn_hidden=4, shared=False)
    assert sep.trunk_who is not sep.trunk_when
    g = sep.param_groups()
    assert not {id(p) for p in g["when"]} & {id(p) for p in g["who"]}
    # the model registry can rebuild it from its config
    from pllcli.models import build_model
    cfg = dict(net.config)
    again = build_model(cfg.pop("name"), **cfg)
    assert isinstance(again, weak.WhenWhoNet) and again.shared


def _toy(n=24, T=20, F=6, seed=0):
    """Class 0 = a loud bump in band 0-2, class 1 in band 3-5, somewhere in the clip; a third empty."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 0.3, (n, T, F)).astype(np.float32)
    Y = np.zeros((n, 2), np.float32)
    for i in range(n):
        for c in range(2):
            if i % 3 != 0 and rng.random() < 0.6:
                t = rng.integers(0, T - 5)
                X[i, t:t + 5, 3 * c:3 * c + 3] += 3.0
                Y[i, c] = 1
    return torch.from_numpy(X), torch.full((n,), T), Y


@pytest.mark.parametrize("mode", ["separate", "joint", "tied"])
def test_training_modes_reduce_loss(mode):
    torch.manual_seed(0)
    X, L, Y = _toy()
    net = weak.WhenWhoNet(6, 2, width=4, depth=2, rnn_hidden=4, shared=mode != "separate")
    cfg = weak.WeakConfig(mode=mode, epochs=6, batch_size=8, lr=1e-2)
    hist = weak.fit_when_who(net, X, L, Y, cfg)
    key = "loss_joint" if mode == "joint" else "loss_who"
    assert hist[-1][key] < hist[0][key]
    pred = weak.predict_when_who(net, X, L)
    assert pred["who"].shape == (24, 2) and pred["when"].shape == (24, 10)
    assert ((pred["when"] >= 0) & (pred["when"] <= 1)).all()


def test_tied_only_updates_the_task_being_trained():
    torch.manual_seed(0)
    X, L, Y = _toy(n=8)
    net = weak.WhenWhoNet(6, 2, width=4, depth=2, rnn_hidden=4, shared=True)
    who_before = net.who_out[1].weight.detach().clone()
    when_before = net.when_out.weight.detach().clone()
    weak.fit_when_who(net, X, L, Y, weak.WeakConfig(mode="tied", epochs=1, batch_size=4, tasks=("when",)))
    assert torch.equal(net.who_out[1].weight, who_before)
    assert not torch.equal(net.when_out.weight, when_before)


def test_hnh_without_negatives_and_bad_config():
    X, L, _ = _toy(n=8)
    Y = np.ones((8, 2), np.float32)  # every clip positive
    net = weak.WhenWhoNet(6, 2, width=4, depth=2, rnn_hidden=4, shared=False)
    with pytest.raises(UsageError, match="need negative clips.*leave half-and-half"):
        weak.fit_when_who(net, X, L, Y, weak.WeakConfig(mode="separate", epochs=1, batch_size=4))
    with pytest.raises(UsageError, match="shared=True"):
        weak.fit_when_who(net, X, L, Y, weak.WeakConfig(mode="joint", epochs=1))
    with pytest.raises(UsageError, match="unknown WHEN loss"):
        weak.fit_when_who(net, X, L, Y, weak.WeakConfig(when_pooling="median"))
    with pytest.raises(UsageError, match="unknown WHEN/WHO mode"):
        weak.WeakConfig(mode="stacked").validate()


def test_segment_views():
    X = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    segs, lens, owner = weak.segment_views(X, torch.tensor([5, 3]), 2)
    assert lens.tolist() == [2, 2, 1, 2, 1] and owner.tolist() == [0, 0, 0, 1, 1]
    assert segs[2, :, 0].tolist() == [4.0, 0.0] and segs[4, :, 0].tolist() == [7.0, 0.0]


def test_registered_objectives_compute_the_library_losses():
    from types import SimpleNamespace

    from pllcli.losses import mil
    from pllcli.training.objectives import build_objective
    torch.manual_seed(0)
    logits = torch.randn(3, 2)
    frame = torch.randn(3, 4, 2)
    tags = torch.tensor([[1.0, 0], [0, 0], [0, 1]])
    batch = {"tags": tags, "has_tags": torch.tensor([True, True, False]),
             "soft": torch.full((3, 2), 0.5), "has_soft": torch.tensor([False, False, True])}
    ctx = SimpleNamespace(batch=batch, out={"logits": logits, "frame_logits": frame,
                                            "frame_lengths": torch.tensor([4, 2, 4])}, model=None)
    bce = build_objective("multilabel-bce").loss(ctx)
    assert bce.item() == pytest.approx(mil.bce_loss(logits[:2], tags[:2]).item())
    soft = build_objective("multilabel-bce:use_soft=true").loss(ctx)
    y = torch.cat([tags[:2], torch.full((1, 2), 0.5)])
    assert soft.item() == pytest.approx(mil.bce_loss(logits, y).item())
    hinge = build_objective("multilabel-hinge").loss(ctx)
    assert hinge.item() == pytest.approx(mil.hinge_loss(logits[:2], tags[:2]).item())
    m = build_objective("mil:pooling=mmm").loss(ctx)
    mask = mil.lengths_to_mask(torch.tensor([4, 2]), 4)
    assert m.item() == pytest.approx(mil.mmm_loss(frame[:2], tags[:2], mask).item())
    with pytest.raises(UsageError, match="learnable"):
        build_objective("mil:pooling=attention")
    with pytest.raises(UsageError, match="whenwho"):
        build_objective("when-mmm").loss(ctx)
    net = weak.WhenWhoNet(6, 2, width=4, depth=2, rnn_hidden=4)
    out = net(torch.randn(3, 8, 6), torch.tensor([8, 8, 4]))
    ctx.out, ctx.model = out, net
    w = build_objective("when-mmm").loss(ctx)
    sub = {k: out[k][:2] for k in ("when_frame_logits", "when_frames", "frame_lengths")}
    assert w.item() == pytest.approx(weak.when_loss(sub, torch.tensor([1.0, 0.0])).item())


def _tag_store(tmp_path, n=24):
    """Feature store of n clips (6 mels) and a tag store: clips i % 3 == 0 have no tag."""
    from pllcli.features import FeatureConfig, write_feature_store
    from pllcli.labels.store import LabelData, write_label_store
    X, L, Y = _toy(n=n)
    items = [{"id": f"c{i}", "features": X[i].numpy(), "duration": 0.2} for i in range(n)]
    write_feature_store(tmp_path / "f.h5", FeatureConfig(n_mels=6), items)
    tags = [[c for c in range(2) if Y[i, c]] for i in range(n)]
    write_label_store(tmp_path / "t.h5", LabelData.new([f"c{i}" for i in range(n)], ["x", "y"], task="multi",
                                                       tags=tags), {"test": True})


def test_when_who_honours_engine_flags_and_refuses_the_others(tmp_path):
    import json

    from pllcli.training.config import TrainConfig
    _tag_store(tmp_path)
    mopt = {"width": 4, "depth": 2, "rnn_hidden": 4}
    cfg = TrainConfig(features=str(tmp_path / "f.h5"), labels=str(tmp_path / "t.h5"), outdir=str(tmp_path / "r"),
                      epochs=3, batch_size=8, lr=1e-2, model_options=mopt, top_k=2, valid_fraction=0.25,
                      lr_schedule="constant", warmup_epochs=0, ema=0.5, progress=False)
    s = weak.train_when_who(cfg, mode="joint")
    assert s["clips"] == 18 and s["valid_clips"] == 6
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and all("val_mAP" in r and "loss_joint" in r for r in log)
    assert all(r["lr"] == pytest.approx(1e-2) for r in log)  # --lr-schedule constant is used
    for name in ("best.pt", "last.pt", "averaged.pt"):
        assert (tmp_path / "r" / name).exists()
    # --resume checks the run's settings like train does
    import dataclasses

    from pllcli.errors import ConfigMismatchError
    with pytest.raises(ConfigMismatchError, match="differing: lr"):
        weak.train_when_who(dataclasses.replace(cfg, lr=0.5, resume=str(tmp_path / "r")), mode="joint")
    with pytest.raises(UsageError, match=r"--when-who does not use --augment, --sampler, --max-frames"):
        weak.check_when_who_flags(dataclasses.replace(cfg, augment={"gain_db": 1.0}, sampler="hnh", max_frames=50))
