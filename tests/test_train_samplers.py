"""`train --sampler hnh|balanced` on weak tags: batch composition and error paths."""
from types import SimpleNamespace

import numpy as np
import pytest

from pllcli.errors import UsageError
from pllcli.labels.store import LabelData
from pllcli.training.data import epoch_batches
from pllcli.training.config import TrainConfig
from pllcli.training.selection import balanced_batches as _balanced_batches, batch_groups as _batch_groups
from tests.conftest import run_cli
from tests.test_train import make_features


def _tags(n_pos, n_neg, classes=("x", "y", "z")):
    ids = [f"u{i:04d}" for i in range(n_pos + n_neg)]
    tags = [[i % len(classes)] for i in range(n_pos)] + [[] for _ in range(n_neg)]
    return LabelData.new(ids, list(classes), task="multi", tags=tags)


def test_hnh_batches_are_half_positive_half_negative():
    lab = _tags(40, 8)
    rows = np.arange(48)
    cfg = TrainConfig(features="f", labels="l", outdir="o", sampler="hnh", clean_share=0.0, batch_size=16)
    groups = _batch_groups(cfg, rows, lab, rows)
    assert len(groups) == 1 and set(groups[0][0]) == set(range(40, 48)) and groups[0][1] == 0.5
    batches = epoch_batches(rows, np.full(48, 10), 16, 0, 0, groups=groups)
    assert len(batches) == 5  # one pass over the 40 positives, 8 per batch
    for b in batches:
        assert len(b) == 16 and (b >= 40).sum() == 8  # negatives duplicated to fill half
    seen_pos = np.concatenate([b[b < 40] for b in batches])
    assert sorted(seen_pos) == list(range(40))


def test_hnh_without_negatives_says_so():
    lab = _tags(10, 0)
    cfg = TrainConfig(features="f", labels="l", outdir="o", sampler="hnh", clean_share=0.0)
    with pytest.raises(UsageError, match="all 10 tagged training clips are positive.*leave --sampler hnh off"):
        _batch_groups(cfg, np.arange(10), lab, np.arange(10))


def test_balanced_sampler_draws_classes_evenly():
    # class x is 8x more frequent than y and z
    ids = [f"u{i}" for i in range(50)]
    tags = [[0]] * 40 + [[1]] * 5 + [[2]] * 5
    lab = LabelData.new(ids, ["x", "y", "z"], task="multi", tags=tags)
    cfg = TrainConfig(features="f", labels="l", outdir="o", sampler="balanced", batch_size=10)
    rows = np.arange(50)
    f = _balanced_batches(cfg, rows, lab, rows, SimpleNamespace(rank=0, world=1))
    seq = np.concatenate(f(0))
    counts = np.bincount([tags[i][0] for i in seq], minlength=3)
    assert len(seq) == 50 and counts.min() >= 15  # ~1/3 each instead of 80% x
    single = LabelData.new(ids, ["x", "y", "z"], candidates=[[0]] * 50)
    with pytest.raises(UsageError, match="needs weak tags"):
        _balanced_batches(cfg, rows, single, rows, SimpleNamespace(rank=0, world=1))


def test_cli_train_with_hnh_runs_and_rejects_unknown_sampler(tmp_path):
    from pllcli.labels.store import write_label_store
    make_features(tmp_path / "f.h5", n=32)
    lab = _tags(24, 8)
    write_label_store(tmp_path / "t.h5", lab, {"test": True})
    r = run_cli("train", tmp_path / "f.h5", "--labels", tmp_path / "t.h5", "-o", tmp_path / "run", "--model", "crnn",
                "--objective", "multilabel-bce", "--sampler", "hnh", "--epochs", "1", "--batch-size", "8",
                "--clean-share", "0", "--valid-fraction", "0")
    assert r.returncode == 0, r.stderr[-1500:]
    assert (tmp_path / "run" / "last.pt").exists()
    r = run_cli("train", tmp_path / "f.h5", "--labels", tmp_path / "t.h5", "-o", tmp_path / "run2",
                "--objective", "multilabel-bce", "--sampler", "bogus", "--epochs", "1")
    assert r.returncode == 2 and "'--sampler'" in r.stderr and "'bogus' is not one of" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_train_when_who_tied_then_predict_events(tmp_path):
    from pllcli.labels.store import write_label_store
    make_features(tmp_path / "f.h5", n=24)
    write_label_store(tmp_path / "t.h5", _tags(18, 6), {"test": True})
    r = run_cli("train", tmp_path / "f.h5", "--labels", tmp_path / "t.h5", "-o", tmp_path / "ww",
                "--when-who", "tied", "--epochs", "2", "--batch-size", "8", "--model-opt", "width=8")
    assert r.returncode == 0, r.stderr[-1500:]
    log = (tmp_path / "ww" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and "loss_when" in log[0] and "loss_who" in log[0]
    r = run_cli("predict", tmp_path / "ww" / "best.pt", tmp_path / "f.h5", "-o", tmp_path / "p.csv",
                "--events", tmp_path / "ev.tsv", "--threshold", "0.05")
    assert r.returncode == 0, r.stderr[-1500:]
    assert (tmp_path / "ev.tsv").read_text().startswith("id\tonset\toffset\tlabel")
    r = run_cli("train", tmp_path / "f.h5", "--labels", tmp_path / "t.h5", "-o", tmp_path / "w2", "--when-who", "both")
    assert r.returncode == 2 and "'--when-who'" in r.stderr and "'both' is not one of" in r.stderr
