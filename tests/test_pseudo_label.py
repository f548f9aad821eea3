"""pllcli.pseudo_label and `pllcli pseudo-label`: ensemble, restriction, filtering, segments, shards, errors."""
import numpy as np
import pytest
import torch

from pllcli.errors import ConfigMismatchError, UsageError
from pllcli.pseudo_label import confidence_filter, postprocess, pseudo_label
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


def test_one_duration_parser():
    """pseudo-label reads --segment with the shared pllcli.io.parse_duration (no copy of its own)."""
    import pllcli.pseudo_label as pl
    assert not hasattr(pl, "parse_duration") and not hasattr(pl, "_padded")


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
    pseudo_label(d / "f.h5", t[:2], d / "l.h5", tmp_path / "r.h5", restrict_candidates=d / "l.h5", batch_size=1)
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


def test_restrict_candidates_takes_a_label_store_path(setup, tmp_path):
    """--restrict-candidates LABELS, like predict: the candidate sets come from that store (here one
    that differs from --labels); items it lacks stay unrestricted."""
    from pllcli.labels.store import LabelData, read_label_store, write_label_store
    d, t = setup
    other = LabelData.new(["u1", "u0"], CLASSES, candidates=[[0], [2]], clean=[-1, -1])
    write_label_store(tmp_path / "restrict.h5", other, {})
    r = run_cli("pseudo-label", d / "f.h5", "-t", t[0], "-l", d / "l.h5", "-o", tmp_path / "o.h5",
                "--restrict-candidates", tmp_path / "restrict.h5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    soft = read_label_store(tmp_path / "o.h5").soft_matrix(np.arange(3))
    free = _direct_probs(d, t[:1], ["u2"])[0]
    assert soft[0].tolist() == pytest.approx([0, 0, 1], abs=1e-6)      # u0: restricted to {c}
    assert soft[1].tolist() == pytest.approx([1, 0, 0], abs=1e-6)      # u1: {a} (l.h5 says {c})
    np.testing.assert_allclose(soft[2], free, atol=1e-4)               # u2: not in the store
    r = run_cli("pseudo-label", d / "f.h5", "-t", t[0], "-l", d / "l.h5", "-o", tmp_path / "x.h5",
                "--restrict-candidates", tmp_path / "missing.h5")
    assert r.returncode == 1 and "missing.h5" in r.stderr and "Traceback" not in r.stderr
    # the old flag spelling swallows the next option: say so instead of "missing option -o"
    r = run_cli("pseudo-label", d / "f.h5", "-t", t[0], "-l", d / "l.h5", "--restrict-candidates", "-o",
                tmp_path / "x.h5")
    assert r.returncode == 2 and "'--restrict-candidates': takes a label store path" in r.stderr


def test_cli_grammar_of_pseudo_label(setup, tmp_path):
    """-o is required; --segment accepts 500ms (the shared parser) and names the flag on errors;
    the path written is printed on stdout."""
    d, t = setup
    r = run_cli("pseudo-label", d / "f.h5", "-t", t[0], "-l", d / "l.h5")
    assert r.returncode == 2 and r.stderr.startswith("error: missing option '-o' / '--output'")
    r = run_cli("pseudo-label", d / "f.h5", "-t", t[0], "-l", d / "l.h5", "-o", tmp_path / "s.h5",
                "--segment", "200ms")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 's.h5'}: soft labels for 15 segments" in r.stdout
    r = run_cli("pseudo-label", d / "f.h5", "-t", t[0], "-l", d / "l.h5", "-o", tmp_path / "b.h5",
                "--segment", "two seconds")
    assert r.returncode == 2 and r.stderr.startswith("error: --segment") and len(r.stderr.splitlines()) == 1


def test_redirected_progress_is_one_line_per_tenth(setup, tmp_path):
    """stderr not a terminal: no tqdm bar, one log line per ~10% of the items."""
    d, t = setup
    r = run_cli("pseudo-label", d / "f.h5", "-t", t[0], "-l", d / "l.h5", "-o", tmp_path / "o.h5",
                "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("pseudo-label:")]
    # 6 items, one per batch: the tenths crossed are 1/6 -> 10%, 2/6 -> 30%, 3/6 -> 50%, ...
    assert lines == [f"pseudo-label: {p}% ({k}/6)" for k, p in ((1, 10), (2, 30), (3, 50), (4, 60), (5, 80),
                                                                  (6, 100))], r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr


def test_terminal_keeps_the_live_bar(setup, tmp_path):
    """stderr a terminal: the tqdm bar, not the per-tenth lines."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    d, t = setup
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing in 0 columns
    p = subprocess.Popen([sys.executable, "-m", "pllcli", "pseudo-label", str(d / "f.h5"), "-t", str(t[0]),
                          "-l", str(d / "l.h5"), "-o", str(tmp_path / "o.h5"), "--batch-size", "1"],
                         stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not b:
            break
        chunks.append(b)
    assert p.wait(timeout=600) == 0
    err = b"".join(chunks).decode(errors="replace")
    assert "pseudo-label:" in err and "it/s" in err and "pseudo-label: 10% (1/6)" not in err, err[-500:]
