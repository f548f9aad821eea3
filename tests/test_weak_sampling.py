"""Half-and-half and class-balanced samplers, including the DDP rank split."""
from collections import Counter

import numpy as np
import pytest

from pllcli.errors import UsageError
from pllcli.sampling import ClassBalancedSampler, HalfAndHalfSampler


def test_hnh_balances_and_duplicates_rarer_kind():
    positive = np.array([1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)  # 6 positive, 2 negative
    s = HalfAndHalfSampler(positive, batch_size=4, seed=1)
    batches = list(s)
    assert len(s) == len(batches) == 3  # ceil(6 / 2)
    for b in batches:
        assert len(b) == 4
        assert sum(positive[i] for i in b) == 2
    seen = Counter(i for b in batches for i in b)
    assert all(seen[i] == 1 for i in range(6))  # each positive once per epoch
    assert seen[6] == seen[7] == 3  # negatives duplicated to match
    s.set_epoch(1)
    assert list(s) != batches  # reshuffled per epoch
    s.set_epoch(0)
    assert list(s) == batches  # deterministic


def test_hnh_without_negatives_says_so():
    with pytest.raises(UsageError, match="need negative clips.*leave half-and-half"):
        HalfAndHalfSampler(np.ones(5, bool), batch_size=4)
    with pytest.raises(UsageError, match="need positive clips"):
        HalfAndHalfSampler(np.zeros(5, bool), batch_size=4)
    with pytest.raises(UsageError, match="even batch size"):
        HalfAndHalfSampler(np.array([1, 0], bool), batch_size=3)


def test_hnh_ranks_are_disjoint_and_equal_length():
    positive = np.array([1] * 7 + [0] * 3, dtype=bool)
    parts = [list(HalfAndHalfSampler(positive, 2, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 4  # 7 batches needed, padded to 8 = 2 x 4
    # rank r takes global batches r, r+2, ...: interleaving them gives the one-process sequence
    full = list(HalfAndHalfSampler(positive, 2, num_batches=8, seed=3))
    assert [b for pair in zip(*parts) for b in pair] == full
    with pytest.raises(UsageError, match="rank"):
        HalfAndHalfSampler(positive, 2, num_replicas=2, rank=2)


def test_class_balanced_sampler_equalises_classes():
    # class 0 common (8 clips), class 1 rare (1 clip), one negative clip
    labels = np.zeros((10, 2))
    labels[:8, 0] = 1
    labels[8, 1] = 1
    s = ClassBalancedSampler(labels, num_samples=300, seed=0)
    idx = list(s)
    assert len(idx) == 300
    c = Counter(idx)
    assert c[8] == 100 and c[9] == 100  # rare class and negative bucket: 1/3 each
    assert sum(c[i] for i in range(8)) == 100
    s2 = ClassBalancedSampler(labels, num_samples=300, include_negatives=False, seed=0)
    assert 9 not in set(s2) and Counter(s2)[8] == 150
    # list-of-lists input gives the same buckets
    s3 = ClassBalancedSampler([[0]] * 8 + [[1], []], num_classes=2, num_samples=300, seed=0)
    assert list(s3) == idx


def test_class_balanced_ranks_partition_the_global_sequence():
    labels = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    g = ClassBalancedSampler(labels, num_samples=11, num_replicas=2, rank=0, seed=5).global_sequence()
    r0 = list(ClassBalancedSampler(labels, num_samples=11, num_replicas=2, rank=0, seed=5))
    r1 = list(ClassBalancedSampler(labels, num_samples=11, num_replicas=2, rank=1, seed=5))
    assert len(r0) == len(r1) == 6 and len(g) == 12
    assert r0 == g[0::2].tolist() and r1 == g[1::2].tolist()
    with pytest.raises(UsageError, match="class index"):
        ClassBalancedSampler([[5]], num_classes=3)
