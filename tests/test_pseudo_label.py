"""pllcli.pseudo_label and `pllcli pseudo-label`: ensemble, restriction, filtering, segments, shards, errors."""
import numpy as np
import pytest
import torch

from pllcli.errors import ConfigMismatchError, UsageError
from pllcli.pseudo_label import confidence_filter, parse_duration, postprocess, pseudo_label
from tests.conftest import run_cli

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pllcli.checkpoint import save_checkpoint
    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import write_feature_store
    from pllcli.labels.store import LabelData, write_label_store
    from pllcli.models import build_model
    d = tmp_path_factory.mktemp("pl")
    cfg = FeatureConfig(n_mels=16)
    rng = np.random.default_rng(0)
    lens = [30, 45, 60, 50, 35, 40]
    items = [{"id": f"u{i}", "features": rng.normal(size=(t, 16)).astype(np.float32), "duration": t / 100}
             for i, t in enumerate(lens)]
    write_feature_store(d / "f.h5", cfg, items)
    write_feature_store(d / "f_other.h5", FeatureConfig(n_mels=16, hop_length=160), items)
    ld = LabelData.new([f"u{i}" for i in range(6)] + ["extra"], CLASSES,
                       candidates=[[0, 1], [2], None, None, [1, 2], None, None], clean=[-1, 2, -1, -1, -1, -1, 0])
    write_label_store(d / "l.h5", ld, {})
    teachers = []
    for k, classes in enumerate([CLASSES, CLASSES, ["a", "b", "x"]]):
        torch.manual_seed(k)
        m = build_model("convgru", 16, 3, width=4, rnn_hidden=8, proj=16)
        meta = {"kind": "classifier", "model": m.config, "classes": classes, "task": "single",
                "feature_config": cfg.to_dict(), "feature_config_hash": cfg.hash()}
        save_checkpoint(d / f"t{k}.pt", m, meta)
        teachers.append(d / f"t{k}.pt")
    return d, teachers


def _direct_probs(d, teachers, ids):
    from pllcli.checkpoint import load_model
    from pllcli.features.store import FeatureStore
    fs = FeatureStore(d / "f.h5")
    out = []
    for i in ids:
        x = torch.from_numpy(fs.get(i))[None]
        ps = [torch.softmax(load_model(t)[0](x, torch.tensor([x.shape[1]]))["logits"], -1) for t in teachers]
        out.append(torch.stack(ps).mean(0)[0].detach().numpy())
    return np.stack(out)


def test_parse_duration():
    assert parse_duration("2s") == 2.0 and parse_duration("500ms") == 0.5 and parse_duration("1.5") == 1.5
    with pytest.raises(UsageError):
        parse_duration("two seconds")
    with pytest.raises(UsageError):
        parse_duration("0s")


def test_postprocess_restrict_and_sharpen():
    p = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]])
    cand = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0]], np.float32)
    has = np.array([True, False, True])
    q = postprocess(p, cand=cand, has_cand=has)
    assert q[0].tolist() == pytest.approx([0.625, 0.375, 0.0])
    assert q[1].tolist() == pytest.approx([0.2, 0.2, 0.6])           # no candidate set: untouched
    assert q[2].tolist() == pytest.approx([0.5, 0.5, 0.0])           # no mass on the set: uniform over it
    s = postprocess(np.array([[0.6, 0.4]]), temperature=0.5)
    assert s[0].tolist() == pytest.approx([0.36 / 0.52, 0.16 / 0.52])
    sm = postprocess(np.array([[0.6, 0.2]]), temperature=0.5, multi_label=True)
    assert sm[0].tolist() == pytest.approx([0.36 / 0.52, 0.04 / 0.68], abs=1e-6)


def test_confidence_filter():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.45, 0.55]])
    keep, _ = confidence_filter(p, threshold=0.7)
    assert keep.tolist() == [True, False, True, True, False]
    keep, _ = confidence_filter(p, top_n_per_class=1)
    assert keep.tolist() == [True, False, True, False, False]
    keep, q = confidence_filter(p, threshold=0.5, multi_label=True)
    assert keep.all() and q[1].tolist() == pytest.approx([0.6, 0.0])
    keep, q = confidence_filter(p, top_n_per_class=2, multi_label=True)
    assert (q[:, 0] > 0).sum() == 2 and q[1, 0] == pytest.approx(0.6)


def test_ensemble_values_roundtrip(setup, tmp_path):
    from pllcli.labels.store import read_label_store
    d, t = setup
    s = pseudo_label(d / "f.h5", t[:2], d / "l.h5", tmp_path / "o.h5", batch_size=1)  # no padding: exact
    assert s["soft_labels"] == 6
    out = read_label_store(tmp_path / "o.h5")
    ids = [f"u{i}" for i in range(6)]
    expected = _direct_probs(d, t[:2], ids)
    got = out.soft_matrix(np.arange(6))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert out.clean.tolist() == [-1, 2, -1, -1, -1, -1, 0]        # original labels kept
    assert out.has_soft.tolist() == [True] * 6 + [False]
    # restriction: item u0 has candidates {a, b}
    pseudo_label(d / "f.h5", t[:2], d / "l.h5", tmp_path / "r.h5", restrict_candidates=True, batch_size=1)
    r = read_label_store(tmp_path / "r.h5").soft_matrix([0])[0]
    assert r[2] == 0 and r[:2].tolist() == pytest.approx((expected[0, :2] / expected[0, :2].sum()).tolist(), abs=1e-5)


def test_threshold_filters_items(setup, tmp_path):
    from pllcli.labels.store import read_label_store
    d, t = setup
    s = pseudo_label(d / "f.h5", t[:1], d / "l.h5", tmp_path / "o.h5", threshold=0.99)
    assert s["soft_labels"] == 0 and s["filtered_out"] == 6
    assert not read_label_store(tmp_path / "o.h5").has_soft.any()


def test_segments(setup, tmp_path):
    from pllcli.labels.store import read_label_store
    d, t = setup
    s = pseudo_label(d / "f.h5", t[:1], d / "l.h5", tmp_path / "s.h5", segment=0.2)
    out = read_label_store(tmp_path / "s.h5")
    # frames 30,45,60,50,35,40 at 10 ms, 20-frame chunks: 2+3+3+3+2+2
    assert s["segments"] == 15 == len(out.segments_item)
    on, off, vals = out.segments_of(2)
    assert on.tolist() == pytest.approx([0.0, 0.2, 0.4]) and off.tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert vals.sum(1) == pytest.approx(np.ones(3), abs=1e-5)
    with pytest.raises(UsageError, match="longer than the clips"):
        pseudo_label(d / "f.h5", t[:1], d / "l.h5", tmp_path / "x.h5", segment=1.0)


def test_shards_merge_to_the_whole(setup, tmp_path):
    from pllcli.labels.store import merge_label_stores, read_label_store
    d, t = setup
    pseudo_label(d / "f.h5", t[:1], d / "l.h5", tmp_path / "full.h5", batch_size=1)
    parts = []
    for i in range(2):
        pseudo_label(d / "f.h5", t[:1], d / "l.h5", tmp_path / f"p{i}.h5", shard=(i, 2), batch_size=1)
        parts.append(tmp_path / f"p{i}.h5")
    merged = merge_label_stores(tmp_path / "m.h5", parts)
    full = read_label_store(tmp_path / "full.h5")
    order = [list(merged.ids).index(i) for i in full.ids]
    np.testing.assert_allclose(merged.soft_matrix(order), full.soft_matrix(np.arange(len(full))), atol=1e-6)
    assert sorted(merged.ids) == sorted(full.ids)


def test_bad_inputs(setup, tmp_path):
    d, t = setup
    with pytest.raises(ConfigMismatchError, match="other classes"):
        pseudo_label(d / "f.h5", [t[0], t[2]], d / "l.h5", tmp_path / "o.h5")
    with pytest.raises(ConfigMismatchError, match="hop_length"):
        pseudo_label(d / "f_other.h5", t[:1], d / "l.h5", tmp_path / "o.h5")
    with pytest.raises(ConfigMismatchError, match="other classes"):
        pseudo_label(d / "f.h5", t[2:], d / "l.h5", tmp_path / "o.h5")


def test_cli_errors_are_one_line(setup, tmp_path):
    d, t = setup
    r = run_cli("pseudo-label", d / "f.h5", "--teacher", t[0], "--teacher", t[2], "--labels", d / "l.h5",
                "-o", tmp_path / "o.h5")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_cli("pseudo-label", d / "f.h5", "--teacher", t[0], "--labels", d / "l.h5", "-o", tmp_path / "o.h5",
                "--segment", "5s")
    assert r.returncode == 2 and "longer than the clips" in r.stderr
    r = run_cli("pseudo-label", d / "f.h5", "--teacher", t[0], "--labels", d / "l.h5", "-o", tmp_path / "o.h5",
                "--shard", "1/3", "--json", "-")
    assert r.returncode == 0, r.stderr
    assert '"shard": "1/3"' in r.stdout and (tmp_path / "o.h5").exists()
