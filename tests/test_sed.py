"""SED metrics: the hand-written event / segment F1 against sed_scores_eval, PSDS in `evaluate`
equal to sed_scores_eval called directly, frame-score files, intersection F1 by hand."""
import json
import warnings

import numpy as np
import pytest

from pllcli.metrics import event_based, sed, segment_based
from tests.conftest import run_cli

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    sse = pytest.importorskip("sed_scores_eval")

CLASSES = ["a", "b", "c"]


def _random_lists(seed, n_items=8, dur=6.0):
    rng = np.random.default_rng(seed)
    ref, est = {}, {}
    for k in range(n_items):
        evs = []
        for c in CLASSES:
            t = 0.0
            while True:
                on = t + rng.uniform(0.05, 1.0)
                off = on + rng.uniform(0.1, 1.5)
                if off > dur:
                    break
                evs.append((round(on, 3), round(off, 3), c))
                t = off + 0.01
        ref[f"x{k}"] = evs
        est[f"x{k}"] = [(max(0.0, round(on + rng.normal(0, 0.15), 3)), min(dur, round(off + rng.normal(0, 0.3), 3)),
                         lab if rng.random() < 0.9 else CLASSES[(CLASSES.index(lab) + 1) % 3])
                        for on, off, lab in evs if rng.random() < 0.8]
    est = {i: [e for e in evs if e[1] > e[0]] for i, evs in est.items()}
    est, _ = sed.merge_overlaps(est)
    return ref, est, {i: dur for i in ref}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hand_written_event_and_segment_f1_equal_sed_scores_eval(seed):
    ref, est, dur = _random_lists(seed)
    df = sed.event_dataframes(est, dur, CLASSES)
    f, p, r, s = sse.collar_based.fscore(df, ref, 0.5, onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2)
    F, P, R, S = event_based.fscore(est, ref, CLASSES, t_collar=0.2, percentage_of_length=0.2)
    for c in CLASSES:
        assert (S[c]["tp"], S[c]["fp"], S[c]["n_ref"]) == (s[c]["tps"], s[c]["fps"], s[c]["n_ref"])
        assert F[c] == pytest.approx(f[c])
    assert F["micro_average"] == pytest.approx(f["micro_average"])
    assert F["macro_average"] == pytest.approx(f["macro_average"])
    f, p, r, s = sse.segment_based.fscore(df, ref, dur, 0.5, segment_length=1.0)
    F, P, R, S = segment_based.fscore(est, ref, CLASSES, time_resolution=1.0, durations=dur)
    for c in CLASSES:
        assert (S[c]["tp"], S[c]["fp"]) == (s[c]["tps"], s[c]["fps"])
    assert F["micro_average"] == pytest.approx(f["micro_average"])


def test_intersection_f1_hand_case():
    # dog truth 1-2 s; estimate 1.2-2.2 s: 0.8 s of its 1.0 s lie inside (DTC 0.8 >= 0.7) and it
    # covers 0.8 of the truth (GTC 0.8 >= 0.7): a hit. cat truth 0-1 s, estimate 0.5-2.5 s:
    # only 0.25 of it inside the truth (< 0.7): a false positive, the cat truth is missed.
    ref = {"u": [(1.0, 2.0, "dog"), (0.0, 1.0, "cat")]}
    est = {"u": [(1.2, 2.2, "dog"), (0.5, 2.5, "cat")]}
    df = sed.event_dataframes(est, {"u": 3.0}, ["cat", "dog"])
    f, p, r, s = sed.intersection_fscore(df, ref, 0.5)
    assert f["dog"] == 1.0 and f["cat"] == 0.0
    assert f["micro_average"] == pytest.approx(2 * 1 / (2 + 2))
    # with a looser DTC (PSDS2's 0.1) the cat estimate counts as well
    f2, *_ = sed.intersection_fscore(df, ref, 0.5, dtc_threshold=0.1, gtc_threshold=0.1)
    assert f2["cat"] == 1.0


def _frame_scores(seed=0, n=6, T=50, hop=0.1, noise=0.5):
    rng = np.random.default_rng(seed)
    ref, scores = {}, {}
    for k in range(n):
        on = rng.uniform(0, 2.5)
        ref[f"c{k}"] = [(round(on, 2), round(on + rng.uniform(0.5, 2.0), 2), CLASSES[k % 3])]
        s = rng.random((T, 3)) * noise
        a, b = int(ref[f"c{k}"][0][0] / hop), int(ref[f"c{k}"][0][1] / hop)
        s[a:b, k % 3] += 1 - noise
        scores[f"c{k}"] = np.round(s, 4)
    return ref, scores, hop, T


def _write_dir(path, scores, hop, classes):
    path.mkdir()
    for cid, s in scores.items():
        lines = ["\t".join(["onset", "offset", *classes])]
        lines += ["\t".join([f"{t * hop:.3f}", f"{(t + 1) * hop:.3f}", *(f"{v:.4f}" for v in row)])
                  for t, row in enumerate(s)]
        (path / f"{cid}.tsv").write_text("\n".join(lines) + "\n")


def test_evaluate_psds_equals_sed_scores_eval(tmp_path):
    from pllcli.evaluate import evaluate
    ref, scores, hop, T = _frame_scores()
    _write_dir(tmp_path / "fs", scores, hop, CLASSES)
    truth = tmp_path / "strong.tsv"
    truth.write_text("id\tonset\toffset\tlabel\n" + "".join(f"{i}\t{e[0]}\t{e[1]}\t{e[2]}\n"
                                                           for i, evs in ref.items() for e in evs))
    res = evaluate(truth, frame_scores=tmp_path / "fs")
    rep = res.report
    from sed_scores_eval.base_modules.scores import create_score_dataframe
    dfs = {i: create_score_dataframe(s, np.arange(T + 1) * hop, CLASSES) for i, s in scores.items()}
    dur = {i: T * hop for i in scores}
    p1 = sse.intersection_based.psds(dfs, ref, dur, dtc_threshold=0.7, gtc_threshold=0.7, alpha_ct=0.0,
                                     alpha_st=1.0, max_efpr=100.0)[0]
    p2 = sse.intersection_based.psds(dfs, ref, dur, dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3,
                                     alpha_ct=0.5, alpha_st=1.0, max_efpr=100.0)[0]
    assert rep["psds"]["psds1"]["value"] == pytest.approx(p1, abs=1e-9)
    assert rep["psds"]["psds2"]["value"] == pytest.approx(p2, abs=1e-9)
    assert 0 < p1 <= 1 and 0 < p2 <= 1
    assert rep["psds"]["psds2"]["alpha_ct"] == 0.5 and rep["psds"]["psds1"]["dtc_threshold"] == 0.7
    # collar F1 of the events decoded at 0.5 equals sed_scores_eval's collar F1 at 0.5
    f = sse.collar_based.fscore(dfs, ref, 0.5, onset_collar=0.2, offset_collar=0.2, offset_collar_rate=0.2)[0]
    assert rep["event"]["micro_f1"] == pytest.approx(f["micro_average"])
    i_f = sse.intersection_based.fscore(dfs, ref, 0.5, dtc_threshold=0.7, gtc_threshold=0.7)[0]
    assert rep["intersection"]["micro_f1"] == pytest.approx(i_f["micro_average"])
    seg = sse.segment_based.fscore(dfs, ref, dur, 0.5, segment_length=1.0)[0]
    assert rep["segment"]["micro_f1"] == pytest.approx(seg["micro_average"])
    # the one-table layout gives the same figures
    tab = tmp_path / "fs.tsv"
    tab.write_text("id\tonset\toffset\t" + "\t".join(CLASSES) + "\n" + "".join(
        f"{i}\t{t * hop:.3f}\t{(t + 1) * hop:.3f}\t" + "\t".join(f"{v:.4f}" for v in row) + "\n"
        for i, s in scores.items() for t, row in enumerate(s)))
    assert evaluate(truth, frame_scores=tab).report["psds"] == rep["psds"]


def test_cli_frame_scores_plots_and_class_mismatch(tmp_path):
    ref, scores, hop, T = _frame_scores(1)
    _write_dir(tmp_path / "fs", scores, hop, CLASSES)
    truth = tmp_path / "strong.tsv"
    truth.write_text("id\tonset\toffset\tlabel\n" + "".join(f"{i}\t{e[0]}\t{e[1]}\t{e[2]}\n"
                                                           for i, evs in ref.items() for e in evs))
    r = run_cli("evaluate", "--frame-scores", tmp_path / "fs", truth, "--segment", "500ms", "--json",
                tmp_path / "r.json", "--plots", tmp_path / "pl")
    assert r.returncode == 0, r.stderr
    assert "PSDS1" in r.stdout and "PSDS2" in r.stdout and "intersection micro F1" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["segment"]["time_resolution"] == 0.5
    for name in ("psd_roc.png", "per_class_f1.png"):
        assert (tmp_path / "pl" / name).read_bytes()[:4] == b"\x89PNG"
    # frame scores whose classes differ from the truth's
    _write_dir(tmp_path / "fs2", {i: s[:, :2] for i, s in scores.items()}, hop, ["a", "b"])
    r = run_cli("evaluate", "--frame-scores", tmp_path / "fs2", truth)
    assert r.returncode == 1 and "frame-score classes differ from the truth's (missing: 'c'" in r.stderr
    assert "fs2" in r.stderr and "Traceback" not in r.stderr
    # -p is no longer --predictions
    r = run_cli("evaluate", "-p", tmp_path / "x.csv", truth)
    assert r.returncode == 2


def test_overlapping_truth_events_warn_with_line(tmp_path, caplog):
    from pllcli.evaluate import read_truth
    t = tmp_path / "s.tsv"
    t.write_text("id\tonset\toffset\tlabel\nu\t0.0\t1.0\tdog\nu\t0.5\t1.5\tdog\nu\t0.5\t1.5\tcat\n")
    with caplog.at_level("WARNING"):
        read_truth(t)
    assert f"{t}:3: event 0.5-1.5 s of 'u' overlaps its earlier 'dog' event 0-1 s" in caplog.text
    assert ":4:" not in caplog.text
    assert sed.merge_overlaps(read_truth(t).events) == ({"u": [(0.0, 1.5, "dog"), (0.5, 1.5, "cat")]}, 1)


def test_truth_events_outside_their_clip_warn_with_line(tmp_path, caplog):
    from pllcli.evaluate import evaluate
    ref, scores, hop, T = _frame_scores(2, n=3)
    _write_dir(tmp_path / "fs", scores, hop, CLASSES)  # clips of T * hop = 5 s
    truth = tmp_path / "strong.tsv"
    truth.write_text("id\tonset\toffset\tlabel\nc0\t1.0\t2.0\ta\nc1\t4.0\t6.5\tb\nc2\t0.5\t1.0\tc\n")
    with caplog.at_level("WARNING"):
        evaluate(truth, frame_scores=tmp_path / "fs")
    assert f"{truth}:3: event 4-6.5 s (b) of 'c1' lies outside the clip (duration 5.000 s)" in caplog.text
    assert ":2:" not in caplog.text and ":4:" not in caplog.text


def test_median_filter_applies_to_psds_scores(tmp_path):
    from pllcli.evaluate import evaluate
    from pllcli.events import median_filter
    ref, scores, hop, T = _frame_scores(3, n=9, noise=0.6)
    _write_dir(tmp_path / "fs", scores, hop, CLASSES)
    truth = tmp_path / "strong.tsv"
    truth.write_text("id\tonset\toffset\tlabel\n" + "".join(f"{i}\t{e[0]}\t{e[1]}\t{e[2]}\n"
                                                           for i, evs in ref.items() for e in evs))
    rep = evaluate(truth, frame_scores=tmp_path / "fs", median="500ms").report  # 5 frames of 0.1 s
    from sed_scores_eval.base_modules.scores import create_score_dataframe
    dfs = {i: create_score_dataframe(median_filter(s, 5), np.arange(T + 1) * hop, CLASSES) for i, s in scores.items()}
    p1 = sse.intersection_based.psds(dfs, ref, {i: T * hop for i in scores}, dtc_threshold=0.7, gtc_threshold=0.7,
                                     alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0)[0]
    assert rep["psds"]["psds1"]["value"] == pytest.approx(p1, abs=1e-9)
    raw = evaluate(truth, frame_scores=tmp_path / "fs").report["psds"]["psds1"]["value"]
    assert p1 > raw + 0.2  # the filter removes the noise blips


def test_psds2_is_skipped_not_a_crash_when_one_class_has_truth_events(tmp_path):
    """sed_scores_eval's cross-trigger scenario fails with one scored class; PSDS1 still equals it."""
    from pllcli.evaluate import evaluate
    ref, scores, hop, T = _frame_scores()
    first = CLASSES[0]
    ref = {i: [e for e in evs if e[2] == first] for i, evs in ref.items()}
    _write_dir(tmp_path / "fs", scores, hop, CLASSES)
    truth = tmp_path / "strong.tsv"
    truth.write_text("id\tonset\toffset\tlabel\n" + "".join(f"{i}\t{e[0]}\t{e[1]}\t{e[2]}\n"
                                                           for i, evs in ref.items() for e in evs))
    rep = evaluate(truth, frame_scores=tmp_path / "fs").report
    assert rep["psds"]["psds2"]["value"] is None and "2 classes" in rep["psds"]["psds2"]["skipped"]
    from sed_scores_eval.base_modules.scores import create_score_dataframe
    dfs = {i: create_score_dataframe(s[:, :1], np.arange(T + 1) * hop, [first]) for i, s in scores.items()}
    p1 = sse.intersection_based.psds(dfs, ref, {i: T * hop for i in scores}, dtc_threshold=0.7, gtc_threshold=0.7,
                                     alpha_ct=0.0, alpha_st=1.0, max_efpr=100.0)[0]
    assert rep["psds"]["psds1"]["value"] == pytest.approx(p1, abs=1e-9)
