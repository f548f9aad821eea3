"""Which feature-store rows train, and how they are batched (clean share, half-and-half, balanced)."""
from __future__ import annotations

import numpy as np

from pllcli.errors import UsageError
from pllcli.training.data import rank_slice


def select_rows(objectives, lab, label_rows) -> np.ndarray:
    """Feature-store rows holding what at least one objective reads (its `items`)."""
    kinds = set()
    for o in objectives:
        kinds.update(o.items)
    rows_ = label_rows
    m = np.zeros(len(rows_), bool)
    if "clean" in kinds:
        m |= lab.clean[rows_] >= 0
    if "candidates" in kinds:
        m |= lab.has_candidates[rows_] | (lab.clean[rows_] >= 0)
    if "tags" in kinds:
        m |= lab.has_tags[rows_]
    if "soft" in kinds:
        m |= lab.has_soft[rows_]
    if "unlabeled" in kinds:
        m |= lab.unlabeled[rows_]
    return np.flatnonzero(m)


def batch_groups(cfg, rows, lab, label_rows):
    """[(rows, share)] for epoch_batches: clean items (--clean-share), unlabeled (--unlabeled-share)."""
    lrows = label_rows[rows]
    groups = []
    if cfg.sampler == "hnh":
        groups.append((_hnh_group(rows, lab, lrows), 0.5))
    if cfg.clean_share > 0:
        groups.append((rows[lab.clean[lrows] >= 0], cfg.clean_share))
    if cfg.unlabeled_share > 0:
        groups.append((rows[lab.unlabeled[lrows] & (lab.clean[lrows] < 0)], cfg.unlabeled_share))
    groups = [g for g in groups if len(g[0])]
    return groups or None


def _hnh_group(rows, lab, lrows):
    """Half-and-half batches (Morfi & Stowell): the rarer of positive clips (some tag) and negative
    clips (an empty tag list) as a group filling half of every batch, oversampled; the other kind
    fills the rest, so each epoch is one pass over the commoner kind."""
    if lab.task != "multi" or not lab.has_tags[lrows].any():
        raise UsageError("--sampler hnh needs weak tags (a label store built with build-candidates --tags)")
    n_tags = np.diff(lab.tags_indptr)[lrows]
    pos = rows[lab.has_tags[lrows] & (n_tags > 0)]
    neg = rows[lab.has_tags[lrows] & (n_tags == 0)]
    if len(neg) == 0:
        raise UsageError(f"--sampler hnh: all {len(pos)} tagged training clips are positive (none has an empty "
                         f"tag list), so half-and-half batches cannot be formed; leave --sampler hnh off")
    if len(pos) == 0:
        raise UsageError(f"--sampler hnh: all {len(neg)} tagged training clips are negative; leave --sampler hnh off")
    return neg if len(neg) <= len(pos) else pos


def balanced_batches(cfg, rows, lab, label_rows, dist):
    """Class-balanced (PANNs) batches over the tagged rows, or None unless --sampler balanced."""
    if cfg.sampler != "balanced":
        return None
    from pllcli.sampling import ClassBalancedSampler
    lrows = label_rows[rows]
    if lab.task != "multi" or not lab.has_tags[lrows].any():
        raise UsageError("--sampler balanced needs weak tags (a label store built with build-candidates --tags)")
    tagged = rows[lab.has_tags[lrows]]
    tl = label_rows[tagged]
    lists = [lab.tags(i) for i in tl]
    sampler = ClassBalancedSampler(lists, len(lab.classes), num_samples=len(rows), seed=cfg.seed)

    def for_epoch(epoch):
        sampler.set_epoch(epoch)
        seq = tagged[sampler.global_sequence()]
        out = [seq[i:i + cfg.batch_size] for i in range(0, len(seq), cfg.batch_size)]
        return rank_slice(out, dist.rank, dist.world)
    return for_epoch
