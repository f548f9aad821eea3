"""PSL steps 3-4: training items from segment soft labels, chunk-averaged scoring; warps."""
import numpy as np
import pytest
import torch

from pllcli.errors import InputError
from pllcli.labels.store import LabelData
from pllcli.training.segments import chunk_probabilities, chunk_view, expand_segments

CLASSES = ["a", "b", "c"]


def _clips(lens, f=4):
    feats = np.concatenate([np.full((t, f), i, np.float32) + np.arange(t, dtype=np.float32)[:, None] / 100
                            for i, t in enumerate(lens)])
    return feats, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def test_expand_segments_slices_frames_and_sets_soft_labels():
    feats, offs = _clips([30, 25, 40])
    lab = LabelData.new(["x", "y", "z"], CLASSES, clean=[1, -1, -1])
    # label rows are in another order than the feature rows: z, x, y
    lab = lab.subset(np.array([2, 0, 1]))
    lab.set_segments(np.array([2]), [(np.array([0.0, 0.2]), np.array([0.2, 0.4]),
                                      np.array([[0.9, 0.1, 0.0], [0.2, 0.0, 0.8]], np.float32))])  # y
    lab.set_soft(np.array([0]), np.array([[0.0, 0.0, 1.0]], np.float32))  # z: clip-level soft label
    label_rows = np.array([1, 2, 0])  # feature rows x, y, z -> label rows
    f2, o2, ids, lab2, lr2, info = expand_segments(feats, offs, ["x", "y", "z"], lab, label_rows, 0.01)
    assert list(ids) == ["x", "y@0.000-0.200", "y@0.200-0.400", "z"]
    assert np.diff(o2).tolist() == [30, 20, 5, 40]  # the second segment is cut at the clip's end (25 frames)
    np.testing.assert_array_equal(f2[o2[1]:o2[2]], feats[offs[1]:offs[1] + 20])
    np.testing.assert_array_equal(f2[o2[2]:o2[3]], feats[offs[1] + 20:offs[2]])
    assert lr2.tolist() == [0, 1, 2, 3] and list(lab2.ids) == list(ids)
    assert lab2.clean.tolist() == [1, -1, -1, -1]
    assert lab2.has_soft.tolist() == [False, True, True, True]
    np.testing.assert_allclose(lab2.soft_matrix([1, 2, 3]), [[0.9, 0.1, 0], [0.2, 0, 0.8], [0, 0, 1]])
    assert len(lab2.segments_item) == 0
    assert info == {"segments": 2, "clips_split": 1, "clips_whole": 2, "segment_seconds": pytest.approx(0.2)}


def test_expand_segments_needs_segment_labels():
    feats, offs = _clips([10])
    with pytest.raises(InputError, match="pseudo-label --segment"):
        expand_segments(feats, offs, ["x"], LabelData.new(["x"], CLASSES), np.array([0]), 0.01)


def test_chunk_view_tiles_clips_and_averages():
    from pllcli.training.data import InMemoryFeatures
    feats, offs = _clips([7, 3, 10])
    mem = InMemoryFeatures(feats, offs)
    view, parent = chunk_view(mem, 4)
    assert view.num_frames.tolist() == [4, 3, 3, 4, 4, 2] and parent.tolist() == [0, 0, 1, 2, 2, 2]
    x, ln = view.gather(np.array([1]))
    np.testing.assert_array_equal(x[0, :3].numpy(), feats[4:7])

    class MeanModel(torch.nn.Module):
        """Logits = log of (mean of frame values, 1): a chunk's probability of class 0 is known."""
        def forward(self, x, lengths):
            m = torch.stack([x[b, :int(lengths[b]), 0].mean() for b in range(len(x))])
            return {"logits": torch.stack([torch.log(m + 1e-9), torch.zeros_like(m)], 1)}

    p = chunk_probabilities(MeanModel(), mem, 4, "single", "cpu")
    expect = []
    for r in range(3):
        chunks = [feats[a:min(a + 4, offs[r + 1]), 0] for a in range(offs[r], offs[r + 1], 4)]
        p0 = [c.mean() / (c.mean() + 1) for c in chunks]
        expect.append(np.mean(p0))
    np.testing.assert_allclose(p[:, 0], expect, rtol=1e-5)


def test_freq_and_time_warp_keep_shape_lengths_and_padding():
    from pllcli.training.augment import freq_warp, time_warp
    torch.manual_seed(0)
    x = torch.randn(3, 12, 8)
    lengths = torch.tensor([12, 7, 3])
    assert torch.equal(freq_warp(x, 0.0), x)
    torch.testing.assert_close(time_warp(x, lengths, 0.0), x)
    y = time_warp(x, lengths, 0.3)
    assert y.shape == x.shape
    torch.testing.assert_close(y[1, 7:], x[1, 7:])  # padding untouched
    for b, n in enumerate(lengths.tolist()):  # end points of the valid part stay
        torch.testing.assert_close(y[b, 0], x[b, 0])
        torch.testing.assert_close(y[b, n - 1], x[b, n - 1])
    ramp = torch.arange(8, dtype=torch.float32).expand(2, 5, 8).clone()
    z = freq_warp(ramp, 0.2)
    d = z[:, 0, 1:] - z[:, 0, :-1]  # a linear ramp stays linear up to the clamped top bins
    assert torch.all(d >= -1e-6) and torch.all(z[:, :, 0] == 0)


def test_train_on_segment_labels_then_predict_averages_chunks(tmp_path):
    """pseudo-label --segment -> train --segment-labels -> predict/evaluate average chunk scores."""
    from pllcli.checkpoint import load_checkpoint
    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import write_feature_store
    from pllcli.labels.store import write_label_store
    from pllcli.predict import predict
    from pllcli.pseudo_label import pseudo_label
    from pllcli.training.trainer import TrainConfig, train
    rng = np.random.default_rng(0)
    cfg = FeatureConfig(n_mels=8)
    items, clean = [], []
    for i in range(24):
        k = i % 3
        x = rng.normal(size=(60, 8)).astype(np.float32)
        x[:, 2 * k:2 * k + 2] += 3.0
        items.append({"id": f"c{i}", "features": x, "duration": 0.6})
        clean.append(k if i < 6 else -1)
    write_feature_store(tmp_path / "f.h5", cfg, items)
    write_label_store(tmp_path / "l.h5", LabelData.new([f"c{i}" for i in range(24)], CLASSES, clean=clean), {})
    mopt = {"width": 4, "rnn_hidden": 8, "proj": 16}
    common = dict(features=str(tmp_path / "f.h5"), model_options=mopt, valid_fraction=0.0, device="cpu",
                  progress=False, top_k=0, batch_size=8, clean_share=0.0, lr=1e-2)
    train(TrainConfig(labels=str(tmp_path / "l.h5"), outdir=str(tmp_path / "t"), objectives=["ce"], epochs=15,
                      **common))
    s = pseudo_label(tmp_path / "f.h5", [tmp_path / "t" / "last.pt"], tmp_path / "l.h5", tmp_path / "seg.h5",
                     segment=0.2, only_unlabeled=True)
    assert s["segments"] == 18 * 3
    summ = train(TrainConfig(labels=str(tmp_path / "seg.h5"), outdir=str(tmp_path / "s"),
                             objectives=["ce", "distill:alpha=1"], epochs=3, segment_labels=True, **common))
    assert summ["epochs_run"] == 3 and summ["checkpoints"]["last"].endswith("last.pt")
    _, meta = load_checkpoint(tmp_path / "s" / "last.pt")
    assert meta["segment_seconds"] == pytest.approx(0.2)
    assert meta["segments"]["segments"] == 54 and meta["segments"]["clips_whole"] == 6
    out = predict(tmp_path / "s" / "last.pt", tmp_path / "f.h5", tmp_path / "p.csv", device="cpu")
    assert out["chunk_seconds"] == pytest.approx(0.2)
    whole = predict(tmp_path / "s" / "last.pt", tmp_path / "f.h5", tmp_path / "p0.csv", device="cpu", chunk=0)
    assert "chunk_seconds" not in whole
    with pytest.raises(InputError, match="segment"):
        train(TrainConfig(labels=str(tmp_path / "l.h5"), outdir=str(tmp_path / "bad"), objectives=["ce"],
                          epochs=1, segment_labels=True, **common))
