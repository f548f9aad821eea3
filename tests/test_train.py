"""Trainer, CLI train/predict, checkpoints: behaviour on tiny synthetic stores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli

N_MELS = 16
CLASSES = ["a b", "b a", "c d", "d c"]


def make_features(path, n=96, seed=0, n_mels=N_MELS, config=None, nan_item=None):
    """Store of n items; class k = (n mod 4): bands of word 1 then word 2 ("a b" != "b a").
    Returns the true class per item."""
    from pllcli.features import FeatureConfig, write_feature_store
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    bands = {"a": 0, "b": 4, "c": 8, "d": 12}
    items = []
    for i in range(n):
        T = int(rng.integers(36, 60))
        x = rng.normal(0, 0.3, (T, n_mels)).astype(np.float32)
        w1, w2 = CLASSES[y[i]].split()
        h = T // 2
        x[2:h - 2, bands[w1]:bands[w1] + 4] += 2.0
        x[h + 2:T - 2, bands[w2]:bands[w2] + 4] += 1.0
        if nan_item is not None and i == nan_item:
            x[3, 3] = np.nan
        items.append({"id": f"u{i:04d}", "features": x, "duration": T / 100})
    cfg = config or FeatureConfig.preset("speech8k", n_mels=n_mels)
    write_feature_store(path, cfg, items)
    return y


def make_labels(path, y, n_clean=16, set_size=2, seed=0, classes=CLASSES, ids=None, drop_truth=0.0):
    """Candidate sets of `set_size` (truth + random others), the first n_clean items clean."""
    from pllcli.labels.store import LabelData, write_label_store
    rng = np.random.default_rng(seed)
    C = len(classes)
    cands, clean = [], []
    for i, t in enumerate(y):
        others = [c for c in range(C) if c != t]
        s = list(rng.choice(others, set_size - 1, replace=False)) + [int(t)]
        if rng.random() < drop_truth:
            s = [c for c in s if c != t] + [int(rng.choice([c for c in others if c not in s]))]
        cands.append(sorted(int(v) for v in s))
        clean.append(int(t) if i < n_clean else -1)
    ids = ids if ids is not None else [f"u{i:04d}" for i in range(len(y))]
    write_label_store(path, LabelData.new(ids, classes, candidates=cands, clean=clean), {"test": True})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    y = make_features(d / "f.h5")
    make_labels(d / "l.h5", y)
    return d, y


FAST = ["--epochs", "3", "--batch-size", "32", "--model-opt", "width=4,rnn_hidden=16,proj=16",
        "--lr", "0.01", "--device", "cpu"]
