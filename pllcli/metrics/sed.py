"""Sound event detection metrics computed by `sed_scores_eval` (optional extra `sed`).

Inputs are plain dicts: frame scores {id: (T, C) array} with a frame hop (seconds per frame, one
for all items or {id: hop}), ground truth {id: [(onset, offset, label), ...]} (every scored id,
[] for a clip without events) and durations {id: seconds}. `score_dataframes` turns frame
scores into sed_scores_eval score DataFrames (onset, offset, one column per class);
`event_dataframes` turns a list of estimated events into 0/1 score DataFrames, so that the
threshold-based F-scores (at any threshold in (0, 1]) also score decoded events.

PSDS scenarios (DCASE 2021-2023 task 4): PSDS1 DTC = GTC = 0.7, alpha_ct 0, alpha_st 1;
PSDS2 DTC = GTC = 0.1, CTTC 0.3, alpha_ct 0.5, alpha_st 1; both up to an eFPR of 100 per hour.
F-score functions return sed_scores_eval's (f, p, r, stats) dicts keyed by class plus
"macro_average" and "micro_average".
"""
from __future__ import annotations

import warnings

import numpy as np

from pllcli.errors import MissingExtraError

PSDS_SCENARIOS = {
    "psds1": {"dtc_threshold": 0.7, "gtc_threshold": 0.7, "cttc_threshold": None, "alpha_ct": 0.0,
              "alpha_st": 1.0, "max_efpr": 100.0},
    "psds2": {"dtc_threshold": 0.1, "gtc_threshold": 0.1, "cttc_threshold": 0.3, "alpha_ct": 0.5,
              "alpha_st": 1.0, "max_efpr": 100.0},
}


def load(purpose: str = "PSDS and collar/intersection F1"):
    """The `sed_scores_eval` module, or MissingExtraError naming the extra `sed`."""
    try:
        with warnings.catch_warnings():  # dcase_util imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import sed_scores_eval
    except ImportError:
        raise MissingExtraError("sed-scores-eval-np2", "sed", purpose) from None
    return sed_scores_eval


def available() -> bool:
    try:
        load()
    except MissingExtraError:
        return False
    return True


def _hop(hops, item) -> float:
    return float(hops[item] if isinstance(hops, dict) else hops)


def score_dataframes(frame_scores: dict, hops, classes, durations: dict | None = None) -> dict:
    """{id: (T, C) scores} -> {id: DataFrame onset, offset, *classes}; frame t covers
    [t * hop, (t + 1) * hop), the last frame cut at the clip's duration when that is shorter."""
    create = load().base_modules.scores.create_score_dataframe
    out = {}
    for item, s in frame_scores.items():
        s = np.asarray(s, dtype=np.float64)
        s = s[:, None] if s.ndim == 1 else s
        ts = np.arange(s.shape[0] + 1) * _hop(hops, item)
        if durations is not None and item in durations and ts[-2] < durations[item] < ts[-1]:
            ts[-1] = float(durations[item])
        out[item] = create(s, ts, list(classes))
    return out


def event_dataframes(events: dict, durations: dict, classes) -> dict:
    """Estimated events {id: [(onset, offset, label)]} -> 0/1 score DataFrames (one row per
    stretch between consecutive event boundaries) for every id of `durations`."""
    create = load().base_modules.scores.create_score_dataframe
    index = {c: k for k, c in enumerate(classes)}
    out = {}
    for item, dur in durations.items():
        evs = [e for e in events.get(item, []) if e[2] in index]
        end = max([float(dur)] + [float(e[1]) for e in evs])
        ts = np.unique(np.round([0.0, end] + [float(x) for e in evs for x in e[:2]], 6))
        mids = (ts[:-1] + ts[1:]) / 2
        s = np.zeros((len(mids), len(classes)))
        for on, off, lab in evs:
            s[(mids > on) & (mids < off), index[lab]] = 1.0
        out[item] = create(s, ts, list(classes))
    return out


def merge_overlaps(events: dict) -> tuple[dict, int]:
    """Ground truth with overlapping or touching events of one class merged (sed_scores_eval
    refuses them) -> (events, number of merges)."""
    out, merges = {}, 0
    for item, evs in events.items():
        merged = []
        for on, off, lab in sorted(((float(e[0]), float(e[1]), str(e[2])) for e in evs), key=lambda e: (e[2], e[0])):
            if merged and merged[-1][2] == lab and on <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off)
                merges += 1
            else:
                merged.append([on, off, lab])
        out[item] = sorted((on, off, lab) for on, off, lab in merged)
    return out, merges


def psds(scores: dict, ground_truth: dict, durations: dict, scenario: str = "psds1") -> dict:
    """{"value", "per_class", "etpr", "efpr"} of one PSDS scenario (see PSDS_SCENARIOS)."""
    sse = load()
    kw = PSDS_SCENARIOS[scenario]
    value, per_class, (etpr, efpr), _ = sse.intersection_based.psds(
        scores=scores, ground_truth=ground_truth, audio_durations=durations, **kw)
    return {"value": float(value), "per_class": {c: float(v) for c, v in per_class.items()},
            "etpr": np.asarray(etpr), "efpr": np.asarray(efpr), **kw}


def scored_classes(classes, ground_truth: dict) -> list[int]:
    """Columns of `classes` that have truth events (sed_scores_eval scores only those)."""
    present = {e[2] for evs in ground_truth.values() for e in evs}
    return [k for k, c in enumerate(classes) if c in present]


def psds_from_frames(frame_scores: dict, hops, classes, ground_truth: dict, durations: dict) -> tuple[dict, dict]:
    """PSDS1 and PSDS2 of frame scores {id: (T, C)} over the classes with truth events ->
    ({scenario: {"value", "per_class", parameters}}, {scenario: (etpr, efpr)})."""
    cols = scored_classes(classes, ground_truth)
    names = [classes[k] for k in cols]
    dfs = score_dataframes({i: np.asarray(s)[:, cols] for i, s in frame_scores.items()}, hops, names, durations)
    report, curves = {}, {}
    for name in PSDS_SCENARIOS:
        if PSDS_SCENARIOS[name]["alpha_ct"] and len(cols) < 2:
            # cross-triggers need a second class with truth events (sed_scores_eval fails without one)
            report[name] = {"value": None, "per_class": {}, "skipped": "cross-trigger scenario: needs truth "
                            "events of at least 2 classes", **PSDS_SCENARIOS[name]}
            continue
        r = psds(dfs, ground_truth, durations, name)
        curves[name] = (r.pop("etpr"), r.pop("efpr"))
        report[name] = r
    return report, curves


def collar_fscore(scores: dict, ground_truth: dict, threshold=0.5, *, onset_collar: float = 0.2,
                  offset_collar: float = 0.2, offset_collar_rate: float = 0.2):
    """Collar-based (event-based) F-score at `threshold` (a float or {class: float})."""
    sse = load()
    return sse.collar_based.fscore(scores, ground_truth, threshold, onset_collar=onset_collar,
                                   offset_collar=offset_collar, offset_collar_rate=offset_collar_rate)


def segment_fscore(scores: dict, ground_truth: dict, durations: dict, threshold=0.5, *,
                   segment_length: float = 1.0):
    """Segment-based F-score at `threshold` over segments of `segment_length` seconds."""
    sse = load()
    return sse.segment_based.fscore(scores, ground_truth, durations, threshold, segment_length=segment_length)


def intersection_fscore(scores: dict, ground_truth: dict, threshold=0.5, *, dtc_threshold: float = 0.7,
                        gtc_threshold: float = 0.7):
    """Intersection-based F-score at `threshold` (DTC / GTC as in PSDS1 by default)."""
    sse = load()
    return sse.intersection_based.fscore(scores, ground_truth, threshold, dtc_threshold=dtc_threshold,
                                         gtc_threshold=gtc_threshold)


def stats_dict(f, p, r, s) -> dict:
    """sed_scores_eval F-score output -> {"macro_f1", "micro_f1", "micro_precision",
    "micro_recall", "per_class_f1"} (the report layout of `pllcli evaluate`)."""
    per = {c: float(v) for c, v in f.items() if c not in ("macro_average", "micro_average")}
    return {"macro_f1": float(f["macro_average"]), "micro_f1": float(f["micro_average"]),
            "micro_precision": float(p["micro_average"]), "micro_recall": float(r["micro_average"]),
            "per_class_f1": per}


__all__ = ["PSDS_SCENARIOS", "load", "available", "score_dataframes", "event_dataframes", "merge_overlaps",
           "psds", "scored_classes", "psds_from_frames", "collar_fscore", "segment_fscore", "intersection_fscore",
           "stats_dict"]
