"""Metrics against sklearn / brute-force references (1e-6) and hand-made cases."""
import itertools
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pllcli.metrics import event_based, frame_based, multi_label, pll, segment_based, single_label

RNG = np.random.default_rng(0)


def _single(n=200, c=6, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c))
    y = rng.integers(0, c, size=n)
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def _multi(n=150, c=7, seed=1, quantize=None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    s = rng.random((n, c)) + 0.5 * y
    if quantize:
        s = np.round(s * quantize) / quantize  # many ties
    return y, s


# ---------------------------------------------------------------- single-label

def test_single_label_matches_sklearn():
    y, p = _single()
    pred = p.argmax(1)
    C = p.shape[1]
    assert single_label.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-6)
    for k in (2, 3):
        assert single_label.top_k_accuracy(y, p, k) == pytest.approx(
            skm.top_k_accuracy_score(y, p, k=k, labels=range(C)), abs=1e-6)
    np.testing.assert_array_equal(single_label.confusion_matrix(y, pred, C),
                                  skm.confusion_matrix(y, pred, labels=range(C)))
    prec, rec, f, sup = single_label.precision_recall_per_class(y, pred, C)
    sp, sr, sf, ss = skm.precision_recall_fscore_support(y, pred, labels=range(C), zero_division=0)
    np.testing.assert_allclose(prec, sp, atol=1e-6)
    np.testing.assert_allclose(rec, sr, atol=1e-6)
    np.testing.assert_allclose(f, sf, atol=1e-6)
    np.testing.assert_array_equal(sup, ss)
    f1 = single_label.f1_scores(y, pred, C)
    assert f1["macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-6)
    assert f1["micro"] == pytest.approx(skm.f1_score(y, pred, average="micro"), abs=1e-6)


def test_macro_f1_skips_classes_without_support():
    y = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 2, 1, 1, 0])  # class 2 predicted but never true, class 3 never seen
    f1 = single_label.f1_scores(y, pred, 4)
    ref = skm.f1_score(y, pred, labels=[0, 1], average="macro", zero_division=0)
    assert f1["macro"] == pytest.approx(ref, abs=1e-6)
    assert f1["per_class"][2] == 0.0 and f1["per_class"][3] == 0.0
    # hand value: class 0 p=1/2 r=1/2 f=1/2; class 1 p=1 r=2/3 f=0.8
    assert f1["macro"] == pytest.approx((0.5 + 0.8) / 2)


def test_top_k_ties_count_for_true_class():
    s = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4]])
    y = np.array([1, 0])
    assert single_label.top_k_accuracy(y, s, 1) == 0.5  # row 0 tie with the true class: hit
    assert single_label.top_k_accuracy(y, s, 2) == 0.5  # row 1: two classes strictly higher


def _ece_reference(y, p, n_bins):
    conf = p.max(1)
    correct = p.argmax(1) == y
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return total


def test_ece_matches_loop_reference_and_hand_case():
    y, p = _single(seed=3)
    for nb in (5, 15):
        assert single_label.expected_calibration_error(y, p, nb) == pytest.approx(
            _ece_reference(y, p, nb), abs=1e-9)
    # two items at confidence 0.9 one right one wrong: |0.5 - 0.9| = 0.4
    p = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert single_label.expected_calibration_error([0, 1], p, 10) == pytest.approx(0.4)
    # perfectly calibrated one-hot predictions that are right: 0
    assert single_label.expected_calibration_error([0, 1], np.eye(2), 10) == 0.0


# ---------------------------------------------------------------- multi-label

@pytest.mark.parametrize("quantize", [None, 4])
def test_ap_auc_match_sklearn_with_and_without_ties(quantize):
    y, s = _multi(quantize=quantize)
    ap = multi_label.average_precision(y, s)
    auc = multi_label.roc_auc(y, s)
    for c in range(y.shape[1]):
        assert ap[c] == pytest.approx(skm.average_precision_score(y[:, c], s[:, c]), abs=1e-6)
        assert auc[c] == pytest.approx(skm.roc_auc_score(y[:, c], s[:, c]), abs=1e-6)
    assert multi_label.mean_average_precision(y, s) == pytest.approx(
        skm.average_precision_score(y, s, average="macro"), abs=1e-6)
    assert multi_label.mean_average_precision(y, s, "micro") == pytest.approx(
        skm.average_precision_score(y, s, average="micro"), abs=1e-6)
    assert multi_label.roc_auc_micro(y, s) == pytest.approx(
        skm.roc_auc_score(y, s, average="micro"), abs=1e-6)


@pytest.mark.parametrize("quantize", [None, 3])
def test_lwlrap_equals_weighted_lrap(quantize):
    y, s = _multi(n=120, c=9, seed=5, quantize=quantize)
    y[0] = 0  # a clip without positives contributes nothing
    w = y.sum(1)
    ref = skm.label_ranking_average_precision_score(y, s, sample_weight=w)
    assert multi_label.lwlrap(y, s) == pytest.approx(ref, abs=1e-6)


def test_lwlrap_hand_case_with_ties_and_empty_class():
    # clip 0: positives {0}; scores tie 0 and 1 -> precision 1/2 (pessimistic ties)
    # clip 1: positives {1, 2}; ranking 2 > 1 > 0 -> class 2: 1/1, class 1: 2/2
    y = np.array([[1, 0, 0, 0], [0, 1, 1, 0]])
    s = np.array([[0.7, 0.7, 0.1, 0.0], [0.1, 0.5, 0.9, 0.0]])
    per, w = multi_label.lwlrap_per_class(y, s)
    np.testing.assert_allclose(per[:3], [0.5, 1.0, 1.0])
    assert math.isnan(per[3])
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 0])
    assert multi_label.lwlrap(y, s) == pytest.approx(2.5 / 3)


def test_classes_without_positives_are_skipped_in_macro():
    y, s = _multi(c=5, seed=7)
    y[:, 2] = 0
    ap = multi_label.average_precision(y, s)
    auc = multi_label.roc_auc(y, s)
    assert math.isnan(ap[2]) and math.isnan(auc[2])
    keep = [0, 1, 3, 4]
    assert multi_label.mean_average_precision(y, s) == pytest.approx(
        skm.average_precision_score(y[:, keep], s[:, keep], average="macro"), abs=1e-6)
    out = multi_label.summary(y, s, list("abcde"))
    assert out["classes_without_positives"] == ["c"]
    assert out["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, keep], s[:, keep]), abs=1e-6)


def test_ap_hand_case_with_tie():
    # scores 0.9(+) 0.5(+) 0.5(-) 0.1(-): thresholds .9 -> P=1 R=.5, .5 -> P=2/3 R=1
    ap = multi_label.average_precision(np.array([[1], [1], [0], [0]]),
                                       np.array([[0.9], [0.5], [0.5], [0.1]]))
    assert ap[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_d_prime():
    from scipy.stats import norm
    for auc in (0.5, 0.75, 0.9, 0.99):
        assert multi_label.d_prime(auc) == pytest.approx(math.sqrt(2) * norm.ppf(auc), abs=1e-6)
    assert multi_label.d_prime(0.5) == 0.0
    assert multi_label.d_prime(1.0) == math.inf
    assert math.isnan(multi_label.d_prime(float("nan")))


# ---------------------------------------------------------------- segment / event / frame

def _brute_event_tp(ref, est, collar, pct):
    """Maximum matching by trying every assignment (tiny inputs only)."""
    best = 0
    for perm in itertools.permutations(range(len(est)), min(len(ref), len(est))):
        n = 0
        for (r_on, r_off, _), j in zip(ref, perm):
            e_on, e_off, _ = est[j]
            if abs(r_on - e_on) <= collar and abs(r_off - e_off) <= max(collar, pct * (r_off - r_on)):
                n += 1
        best = max(best, n)
    return best


def test_event_based_hand_case():
    ref = {"a": [(1.0, 2.0, "dog"), (3.0, 6.0, "dog"), (0.5, 1.5, "cat")],
           "b": [(0.0, 1.0, "cat")]}
    est = {"a": [(1.1, 2.15, "dog"),   # onset 0.1 ok, offset 0.15 <= 0.2 ok
                 (3.3, 6.0, "dog"),    # onset off by 0.3 > 0.2: miss
                 (0.5, 2.4, "cat")],   # offset 0.9 > max(0.2, 0.5*1.0): miss
           "b": [(0.0, 1.4, "cat"), (0.05, 1.0, "cat")]}  # one of the two matches
    F, P, R, S = event_based.fscore(est, ref)
    assert S["dog"] == {"tp": 1, "fp": 1, "fn": 1, "n_ref": 2}
    assert S["cat"] == {"tp": 1, "fp": 2, "fn": 1, "n_ref": 2}
    assert F["micro_average"] == pytest.approx(2 * 2 / (5 + 4))
    assert F["macro_average"] == pytest.approx((0.5 + 2 * 1 / (3 + 2)) / 2)
    # with a larger collar the shifted onset is accepted
    F2, *_ = event_based.fscore(est, ref, t_collar=0.35)
    assert F2["dog"] == 1.0
    # onset only: the long cat estimate in "a" now matches
    _, _, _, S3 = event_based.fscore(est, ref, evaluate_offset=False)
    assert S3["cat"]["tp"] == 2


def test_event_based_matches_brute_force_matching():
    rng = np.random.default_rng(11)
    for _ in range(30):
        ref = [(o, o + d, "x") for o, d in zip(rng.uniform(0, 3, 4), rng.uniform(0.1, 1, 4))]
        est = [(o, o + d, "x") for o, d in zip(rng.uniform(0, 3, 4), rng.uniform(0.1, 1, 4))]
        ref = [(r[0], r[1], "x") for r in ref]
        _, _, _, S = event_based.fscore({"i": est}, {"i": ref}, t_collar=0.3)
        assert S["x"]["tp"] == _brute_event_tp(ref, est, 0.3, 0.5)


def _segment_reference(est, ref, classes, res):
    tp = fp = fn = 0
    for item in set(est) | set(ref):
        evs = est.get(item, []) + ref.get(item, [])
        n = int(math.ceil(max(e[1] for e in evs) / res - 1e-9))
        for t in range(n):
            lo, hi = t * res, (t + 1) * res
            for c in classes:
                a = any(e[2] == c and e[0] < hi and e[1] > lo for e in ref.get(item, []))
                b = any(e[2] == c and e[0] < hi and e[1] > lo for e in est.get(item, []))
                tp += a and b
                fp += b and not a
                fn += a and not b
    return tp, fp, fn


def test_segment_based_matches_overlap_reference():
    ref = {"a": [(0.2, 2.5, "dog"), (3.0, 3.4, "cat")], "b": [(0.0, 1.0, "cat")]}
    est = {"a": [(0.9, 1.2, "dog"), (2.6, 4.1, "dog"), (3.1, 3.2, "cat")], "b": [(1.2, 1.9, "cat")]}
    F, P, R, S = segment_based.fscore(est, ref, time_resolution=1.0)
    tp, fp, fn = _segment_reference(est, ref, ["cat", "dog"], 1.0)
    m = S["micro_average"]
    assert (m["tp"], m["fp"], m["fn"]) == (tp, fp, fn)
    # hand counts: dog ref segs {0,1,2}, est {0,1,2,3,4}: tp3 fp2; cat a: seg3 both; b: ref 0 est 1
    assert S["dog"] == {"tp": 3, "fp": 2, "fn": 0, "n_ref": 3}
    assert S["cat"] == {"tp": 1, "fp": 1, "fn": 1, "n_ref": 2}
    assert F["micro_average"] == pytest.approx(2 * 4 / (2 * 4 + 3 + 1))


def test_frame_auc_and_f1_match_sklearn():
    rng = np.random.default_rng(2)
    ref = {"a": [(0.0, 0.5, "x"), (0.3, 0.9, "y")], "b": [(0.2, 0.4, "x")]}
    scores = {"a": rng.random((10, 2)), "b": rng.random((8, 2))}
    y = np.zeros((18, 2), int)
    y[0:5, 0] = 1
    y[3:9, 1] = 1
    y[10 + 2:10 + 4, 0] = 1
    s = np.concatenate([scores["a"], scores["b"]])
    out = frame_based.auc(scores, ref, ["x", "y"], 0.1)
    assert out["per_class"]["x"] == pytest.approx(skm.roc_auc_score(y[:, 0], s[:, 0]), abs=1e-6)
    F, *_ = frame_based.fscore(scores, ref, ["x", "y"], 0.1, threshold=0.5)
    assert F["micro_average"] == pytest.approx(skm.f1_score(y, s >= 0.5, average="micro"), abs=1e-6)
    assert F["y"] == pytest.approx(skm.f1_score(y[:, 1], s[:, 1] >= 0.5), abs=1e-6)


# ---------------------------------------------------------------- PLL

def test_pll_metrics_hand_case():
    cand = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    y = np.array([1, 0, 0, 2, -1])  # item 3 has no set, item 4 no truth
    cov = pll.candidate_coverage(cand, y)
    assert cov["n_items"] == 3 and cov["coverage"] == pytest.approx(2 / 3)
    assert cov["mean_set_size"] == pytest.approx(5 / 3)
    s = np.array([[0.5, 0.2, 0.3], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0, 0, 1], [1, 0, 0]])
    acc = pll.disambiguation_accuracy(s, cand, y)
    # restricted argmax: item0 -> 0 (wrong), item1 -> 1 or 2 (wrong), item2 -> 0 (right)
    assert acc["restricted"] == pytest.approx(1 / 3)
    assert acc["unrestricted"] == pytest.approx(1 / 3)  # 0 wrong, 0 right, 1 wrong
