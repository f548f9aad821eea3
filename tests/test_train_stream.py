"""`--data memory|stream|auto` in train and pretrain: the streamed path through the engine,
mid-epoch resume, the auto decision, inference on StoreFeatures, one body on cpu (and cuda)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.test_train import CLASSES, make_features, make_labels, run_inproc

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MOPT = {"width": 4, "rnn_hidden": 16, "proj": 16}
_STOP = {"step": None}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    y = make_features(d / "f.h5")
    make_labels(d / "l.h5", y)
    return d, y


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _cfg(d, out, **kw):
    from pllcli.training.config import TrainConfig
    base = dict(features=str(d / "f.h5"), labels=str(d / "l.h5"), outdir=str(out), epochs=2, batch_size=32,
                model_options=MOPT, lr=0.01, device="cpu", progress=False, top_k=2)
    base.update(kw)
    return TrainConfig(**base)


def _log(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _stop_objective():
    from pllcli.training.objectives import register_objective
    from pllcli.training.pll_objectives import Proden

    @register_objective("test-stop-step")
    class StopAtStep(Proden):
        """Test: PRODEN that raises KeyboardInterrupt at global step _STOP['step']."""

        def loss(self, ctx):
            if _STOP["step"] is not None and ctx.step == _STOP["step"]:
                raise KeyboardInterrupt
            return super().loss(ctx)


def test_memory_and_stream_write_the_same_files_keys_and_summary(data, tmp_path, device):
    """Batch compositions differ (block shuffle + buffer vs a permutation), so the figures are
    only alike; the files, log keys, summary keys and steps are the same; a streamed run is
    deterministic (twice: identical weights)."""
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.trainer import train
    d, _ = data
    runs = {}
    for name, mode in (("mem", "memory"), ("s1", "stream"), ("s2", "stream")):
        runs[name] = train(_cfg(d, tmp_path / name, data=mode, device=device))
    files = {k: sorted(p.name for p in (tmp_path / k).iterdir()) for k in runs}
    assert files["mem"] == files["s1"] and "last.pt" in files["mem"]
    lm, ls = _log(tmp_path / "mem"), _log(tmp_path / "s1")
    assert [set(r) for r in lm] == [set(r) for r in ls] and [r["step"] for r in lm] == [r["step"] for r in ls]
    assert set(runs["mem"]) == set(runs["s1"])
    assert runs["mem"]["data"]["path"] == "memory" and runs["s1"]["data"]["path"] == "stream"
    assert all(np.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in lm + ls)
    a, ma = load_checkpoint(tmp_path / "mem" / "last.pt")
    b, mb = load_checkpoint(tmp_path / "s1" / "last.pt")
    c, _ = load_checkpoint(tmp_path / "s2" / "last.pt")
    assert set(a) == set(b) and ma["train_config"] == mb["train_config"]  # --data is not part of the run
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert not all(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("mode,workers", [("stream", 0), ("stream", 2), ("memory", None)])
def test_resume_mid_epoch_is_exact_and_says_so(data, tmp_path, mode, workers, caplog):
    """Interrupted at step 5 (epoch 2 of 3, batch 2 of 4): last.pt holds the position; --resume
    gives the weights and log of the uninterrupted run."""
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.trainer import train
    _stop_objective()
    d, _ = data
    kw = dict(objectives=["test-stop-step"], epochs=3, data=mode, ema=0.9, loader_workers=workers)
    _STOP["step"] = None
    train(_cfg(d, tmp_path / "full", **kw))
    _STOP["step"] = 5
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(d, tmp_path / "part", **kw))
    _STOP["step"] = None
    _, meta, extra = load_checkpoint(tmp_path / "part" / "last.pt", with_extra=True)
    pos = extra["trainer"]["position"]
    assert meta["epoch"] == 1 and (pos["epoch"], pos["batches"]) == (1, 1) and "interrupted" in meta
    if mode == "stream":
        assert extra["trainer"]["data"]["main"]["batches"] == 1
    with caplog.at_level(logging.INFO):
        train(_cfg(d, tmp_path / "part", resume=str(tmp_path / "part"), **kw))
    assert "resume: mid-epoch, epoch 2 at main batch 2" in caplog.text
    a, _ = load_checkpoint(tmp_path / "full" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "part" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = _log(tmp_path / "full"), _log(tmp_path / "part")
    assert [r["step"] for r in lb] == [4, 8, 12]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-9)


def test_resume_at_an_epoch_boundary_says_so(data, tmp_path, caplog):
    from pllcli.training.trainer import train
    _stop_objective()
    d, _ = data
    kw = dict(objectives=["test-stop-step"], data="stream")
    _STOP["step"] = 4  # the first batch of epoch 2: last.pt of epoch 1 is the place to resume from
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(d, tmp_path / "r", **kw))
    _STOP["step"] = None
    with caplog.at_level(logging.INFO):
        train(_cfg(d, tmp_path / "r", resume=str(tmp_path / "r"), **kw))
    assert "resume: at the epoch boundary, epoch 2 of 2" in caplog.text
    assert "resuming epoch 2 at batch 1" in caplog.text  # the loader's own line
    assert [r["epoch"] for r in _log(tmp_path / "r")] == [1, 2]


def test_auto_streams_over_max_memory_and_logs_why(tmp_path, capsys):
    y = make_features(tmp_path / "f.h5", n=400)                 # 1.2 MiB in memory
    make_labels(tmp_path / "l.h5", y, n_clean=40)
    args = ["train", tmp_path / "f.h5", "-l", tmp_path / "l.h5", "--epochs", "1", "--batch-size", "8",
            "--model-opt", "width=4,rnn_hidden=16,proj=16", "--device", "cpu", "--max-frames", "40"]
    r = run_inproc(capsys, *args, "-o", tmp_path / "a", "--max-memory", "2M")
    assert r.returncode == 0, r.stderr
    assert "data path: memory (--data auto: the store needs 1.2 MiB <= 2.0 MiB, --max-memory)" in r.stderr
    r = run_inproc(capsys, *args, "-o", tmp_path / "b", "--max-memory", "800K", "--json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert "data path: stream (--data auto: the store needs 1.2 MiB > 800.0 KiB, --max-memory)" in r.stderr
    assert "streaming " in r.stderr and "resume: mid-epoch" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["data"]["path"] == "stream"


def test_max_memory_below_one_batch_is_a_usage_error(data, tmp_path, capsys):
    d, _ = data
    r = run_inproc(capsys, "train", d / "f.h5", "-l", d / "l.h5", "-o", tmp_path / "a", "--data", "stream",
                   "--max-memory", "10K", "--device", "cpu")
    assert r.returncode == 2 and "error: --max-memory 10.0 KiB is below what streaming one batch needs" in r.stderr
    r = run_inproc(capsys, "train", d / "f.h5", "-l", d / "l.h5", "-o", tmp_path / "a", "--max-memory", "lots")
    assert r.returncode == 2 and "error: --max-memory: expected a size such as 8G" in r.stderr


def test_stream_refuses_what_it_cannot_do_and_auto_falls_back(data, tmp_path, caplog):
    from pllcli.errors import UsageError
    from pllcli.training.trainer import train
    d, _ = data
    with pytest.raises(UsageError, match=r"--data stream does not support --sampler balanced yet; use --data memory"):
        train(_cfg(d, tmp_path / "a", data="stream", sampler="balanced"))
    with pytest.raises(UsageError, match=r"--data stream does not support --segment-labels"):
        train(_cfg(d, tmp_path / "a", data="stream", segment_labels=True))
    from pllcli.training.trainer import data_path
    from pllcli.features import FeatureStore
    path, why = data_path(_cfg(d, tmp_path, max_memory=1000), FeatureStore(d / "f.h5"),
                          {"--sampler balanced": True})
    assert path == "memory" and why == ("data path: memory (--data auto: --sampler balanced need(s) the store "
                                        "in memory)")
    assert data_path(_cfg(d, tmp_path, max_memory=1000), FeatureStore(d / "f.h5"), {})[0] == "stream"


def test_a_fully_labelled_store_streams_with_the_default_clean_share(data, tmp_path):
    """Every item clean (the whole store is the --clean-share group): stream trains one pass per
    epoch as memory does, where it used to refuse."""
    from pllcli.labels.store import LabelData, write_label_store
    from pllcli.training.trainer import train
    d, y = data
    write_label_store(tmp_path / "all.h5", LabelData.new([f"u{i:04d}" for i in range(len(y))], CLASSES,
                                                          clean=[int(t) for t in y]), {"test": True})
    got = {}
    for mode in ("memory", "stream"):
        s = train(_cfg(d, tmp_path / mode, labels=str(tmp_path / "all.h5"), data=mode, objectives=["ce"]))
        got[mode] = (s["data"]["path"], s["train_items"], [h["step"] for h in _log(tmp_path / mode)])
    assert got["stream"][0] == "stream" and got["memory"][0] == "memory"
    assert got["stream"][1:] == got["memory"][1:]  # same items, same steps per epoch


def test_float16_store_streams_float16_until_the_batch(tmp_path):
    from pllcli.features import FeatureStore
    from pllcli.training.stream import make_loader
    from pllcli.training.trainer import train
    y = make_features(tmp_path / "f.h5", n=40)
    make_labels(tmp_path / "l.h5", y, n_clean=8)
    fs = FeatureStore(tmp_path / "f.h5")
    import h5py
    with h5py.File(tmp_path / "f.h5", "r") as f, h5py.File(tmp_path / "h.h5", "w") as g:
        for k in f:
            f.copy(k, g)
        for k, v in f.attrs.items():
            g.attrs[k] = v
        x = g["features"][()]
        del g["features"]
        g.create_dataset("features", data=x.astype(np.float16), chunks=f["features"].chunks)
    h = FeatureStore(tmp_path / "h.h5")
    assert np.dtype(h.dtype) == np.float16 and len(h.ids) == len(fs.ids)
    ld = make_loader(h, batch_size=8, max_memory=None, workers=0, device="cpu", max_frames=20)
    b = next(iter(ld.epoch(0)))
    assert ld.dataset.counters["dtype"] == "float16" and b["x"].dtype == torch.float32
    s = train(_cfg(tmp_path, tmp_path / "r", features=str(tmp_path / "h.h5"), data="stream", epochs=1))
    assert s["data"]["path"] == "stream" and s["epochs_run"] == 1


def test_pretrain_streams_one_store_and_refuses_several(tmp_path, device):
    from pllcli.errors import UsageError
    from pllcli.pretrain import PretrainConfig, pretrain
    make_features(tmp_path / "a.h5", n=21)
    make_features(tmp_path / "b.h5", n=6, seed=1)
    cfg = PretrainConfig(model_options=MOPT, epochs=2, batch_size=8, crop_frames=30, data="stream")
    s = pretrain([tmp_path / "a.h5"], tmp_path / "enc.pt", cfg, device=device, progress=False)
    log = [json.loads(x) for x in (tmp_path / "enc.log.jsonl").read_text().splitlines()]
    assert s["data"]["path"] == "stream" and len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)
    assert log[0]["step"] == 3  # 21 clips, batches of 8: 8 + 8 + 5
    with pytest.raises(UsageError, match="does not support several feature stores"):
        pretrain([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "e2.pt", cfg, progress=False)
    import dataclasses
    s = pretrain([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "e3.pt", dataclasses.replace(cfg, data="auto"),
                 progress=False)
    assert s["data"]["path"] == "memory" and "several feature stores" in s["data"]["reason"]


def test_infer_on_store_features_equals_in_memory(data, device):
    """StoreFeatures (bounded memory, block-wise reads) gives the in-memory outputs; open_features
    picks the reader from --data/--max-memory."""
    from pllcli.features import FeatureStore
    from pllcli.models import build_model
    from pllcli.training.data import InMemoryFeatures
    from pllcli.training.inference import chunk_probabilities, infer
    from pllcli.training.stream import StoreFeatures, open_features
    d, _ = data
    fs = FeatureStore(d / "f.h5")
    mem, sf = InMemoryFeatures(*fs.load_all()), StoreFeatures(fs)
    torch.manual_seed(0)
    model = build_model("crnn", fs.feature_dim, 4, width=4).to(device)
    rows = np.array([5, 3, 90, 4, 17])
    for r in (None, rows):
        a = infer(model, mem, r, device, batch_size=7, outputs=("logits", "frame_logits"))
        b = infer(model, sf, r, device, batch_size=7, outputs=("logits", "frame_logits"))
        np.testing.assert_array_equal(a["frame_lengths"], b["frame_lengths"])
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
        for i, n in enumerate(a["frame_lengths"]):  # beyond its length a row is padding (-30 or other)
            np.testing.assert_allclose(a["frame_logits"][i, :n], b["frame_logits"][i, :n], atol=1e-5)
    np.testing.assert_allclose(chunk_probabilities(model, mem, 16, "single", device),
                               chunk_probabilities(model, sf, 16, "single", device), atol=1e-5)
    assert isinstance(open_features(fs, "auto", max_memory=1000), StoreFeatures)
    assert isinstance(open_features(fs, "auto"), InMemoryFeatures)
    assert isinstance(open_features(fs, "stream"), StoreFeatures)


def test_when_who_streams_the_same_batches(tmp_path):
    """train --when-who on the stream path reads each batch's clips from the store: the batch
    order is the memory path's, so the run matches it (up to the float64 input statistics)."""
    import dataclasses

    from pllcli.training import weak
    from pllcli.training.config import TrainConfig
    from tests.test_weak import _tag_store
    _tag_store(tmp_path)
    cfg = TrainConfig(features=str(tmp_path / "f.h5"), labels=str(tmp_path / "t.h5"), outdir=str(tmp_path / "m"),
                      epochs=2, batch_size=8, lr=1e-2, model_options={"width": 4, "depth": 2, "rnn_hidden": 4},
                      top_k=0, valid_fraction=0.25, progress=False, data="memory")
    weak.train_when_who(cfg, mode="joint")
    weak.train_when_who(dataclasses.replace(cfg, outdir=str(tmp_path / "s"), data="stream"), mode="joint")
    a, b = _log(tmp_path / "m"), _log(tmp_path / "s")
    assert [set(r) for r in a] == [set(r) for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4) and ra["val_mAP"] == pytest.approx(rb["val_mAP"])


def test_stream_path_names_an_item_with_nan_features(tmp_path):
    from pllcli.errors import InputError
    from pllcli.training.trainer import train
    y = make_features(tmp_path / "f.h5", n=24, nan_item=7)
    make_labels(tmp_path / "l.h5", y, n_clean=8)
    with pytest.raises(InputError, match="features of item 'u0007' contain NaN/inf"):
        train(_cfg(tmp_path, tmp_path / "r", data="stream", valid_fraction=0))


def test_pseudo_label_streams_the_same_soft_labels(data, tmp_path, capsys):
    """pseudo-label --data stream (StoreFeatures, read in windows) writes the soft labels (whole
    clips and --segment chunks) of the in-memory path."""
    from pllcli.labels.store import read_label_store
    from pllcli.pseudo_label import pseudo_label
    from pllcli.training.trainer import train
    d, _ = data
    train(_cfg(d, tmp_path / "t", epochs=1, top_k=0))
    teacher = [tmp_path / "t" / "last.pt"]
    for seg in (None, 0.2):
        outs = {}
        for mode in ("memory", "stream"):
            outs[mode] = tmp_path / f"{mode}{seg}.h5"
            pseudo_label(d / "f.h5", teacher, d / "l.h5", outs[mode], segment=seg, data_path=mode, device="cpu")
        a, b = (read_label_store(outs[m]) for m in ("memory", "stream"))
        np.testing.assert_allclose(a.soft_matrix(np.arange(len(a))), b.soft_matrix(np.arange(len(b))), atol=1e-5)
        if seg:
            assert [len(a.segments_of(i)[0]) for i in range(5)] == [len(b.segments_of(i)[0]) for i in range(5)]
    r = run_inproc(capsys, "pseudo-label", d / "f.h5", "-t", teacher[0], "-l", d / "l.h5", "-o", tmp_path / "c.h5",
                   "--data", "auto", "--max-memory", "100K")
    assert r.returncode == 0, r.stderr
    assert "data path: stream (--data auto: the store needs 285.7 KiB > 100.0 KiB, --max-memory)" in r.stderr


def test_sliding_chunk_frames_of_a_clip_level_model(data):
    """A clip-level model's frame scores: the overlap-averaged probabilities of its windows (each
    window run alone as the reference), the same from a lazily read store; score_clips uses them
    for frames="required" with chunk averaging."""
    from pllcli.events import overlap_average, sliding_windows
    from pllcli.features import FeatureStore
    from pllcli.models import build_model
    from pllcli.training.data import InMemoryFeatures
    from pllcli.training.inference import infer, probabilities, score_clips, sliding_chunk_frames
    from pllcli.training.stream import StoreFeatures
    d, _ = data
    fs = FeatureStore(d / "f.h5")
    mem, sf = InMemoryFeatures(*fs.load_all()), StoreFeatures(fs)
    torch.manual_seed(0)
    model = build_model("convgru", fs.feature_dim, 4, **MOPT)
    assert not model.frame_level
    got = sliding_chunk_frames(model, mem, 20, 5, "single", "cpu", batch_size=16)
    assert got["frame_lengths"].tolist() == mem.num_frames.tolist()
    for i in (0, 7, 95):
        n = int(mem.num_frames[i])
        clip = mem.feats[mem.offsets[i]:mem.offsets[i + 1]].numpy()
        spans = sliding_windows(n, 20, 5)
        p = np.stack([probabilities(infer(model, InMemoryFeatures.from_clips([clip[a:b]]), None, "cpu")["logits"],
                                    "single")[0] for a, b in spans])
        fp = np.clip(overlap_average(p, spans, n), 1e-6, 1 - 1e-6)
        np.testing.assert_allclose(got["frame_logits"][i, :n], np.log(fp / (1 - fp)), atol=1e-4)
        assert (got["frame_logits"][i, n:] == -30).all()
    lazy = sliding_chunk_frames(model, sf, 20, 5, "single", "cpu", batch_size=16)
    np.testing.assert_allclose(lazy["frame_logits"], got["frame_logits"], atol=1e-5)
    _, res, chunk = score_clips(model, {"task": "single", "segment_seconds": 0.2}, mem, fs.config, "cpu", 16,
                                frames="required")
    assert chunk == 20 and res["frame_logits"].shape == got["frame_logits"].shape
    np.testing.assert_allclose(res["frame_logits"], sliding_chunk_frames(model, mem, 20, 1, "single", "cpu", 16)
                               ["frame_logits"], atol=1e-5)
