"""Frame scores -> events, strong-label tables and their validation."""
import numpy as np
import pytest

from pllcli.errors import InputError, UsageError
from pllcli.events import (Event, binarize, decode_events, events_to_frames, median_filter,
                           read_events_tsv, write_events_tsv, write_frame_scores_tsv)


def test_median_filter_removes_single_frame_blips():
    x = np.array([0, 0, 1, 0, 0, 1, 1, 1, 0, 0], float)
    assert median_filter(x, 3).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert median_filter(x, 1).tolist() == x.tolist()
    with pytest.raises(UsageError, match="odd"):
        median_filter(x, 4)


def test_decode_events_threshold_gap_duration():
    # hop 0.1 s; class a active frames 2-4 and 6-7; class b a 1-frame blip at frame 9
    s = np.zeros((10, 2))
    s[2:5, 0] = 0.9
    s[6:8, 0] = 0.8
    s[9, 1] = 0.7
    ev = decode_events(s, ["a", "b"], hop=0.1, threshold=0.5)
    assert ev == [Event(0.2, 0.5, "a"), Event(0.6, 0.8, "a"), Event(0.9, 1.0, "b")]
    ev = decode_events(s, ["a", "b"], hop=0.1, threshold=0.5, min_gap=0.15, min_duration=0.2)
    assert ev == [Event(0.2, 0.8, "a")]
    # per-class thresholds and clip end
    ev = decode_events(s, ["a", "b"], hop=0.1, threshold=[0.85, 0.5], duration=0.95)
    assert ev == [Event(0.2, 0.5, "a"), Event(0.9, 0.95, "b")]
    with pytest.raises(UsageError, match="threshold"):
        decode_events(s, ["a", "b"], hop=0.1, threshold=[0.5, 0.5, 0.5])
    with pytest.raises(UsageError, match="2 classes"):
        decode_events(s, ["a"], hop=0.1)


def test_hysteresis():
    x = np.array([0.1, 0.4, 0.6, 0.4, 0.1, 0.4, 0.45, 0.1])
    assert binarize(x, 0.5, low=0.3)[:, 0].tolist() == [False, True, True, True, False, False, False, False]


def test_events_to_frames():
    m = events_to_frames([(0.2, 0.5, "a"), (0.9, 1.0, "b")], ["a", "b"], 10, 0.1)
    assert np.flatnonzero(m[:, 0]).tolist() == [2, 3, 4]
    assert np.flatnonzero(m[:, 1]).tolist() == [9]


def test_tsv_roundtrip_and_validation(tmp_path):
    p = tmp_path / "ev.tsv"
    write_events_tsv(p, [("c1", 0.25, 1.5, "dog"), ("c2", 0.0, 0.1234, "cat")])
    assert p.read_text().splitlines() == ["id\tonset\toffset\tlabel", "c1\t0.250\t1.500\tdog",
                                          "c2\t0.000\t0.123\tcat"]
    got = read_events_tsv(p, classes=["cat", "dog"], durations={"c1": 2.0, "c2": 1.0})
    assert got == {"c1": [Event(0.25, 1.5, "dog")], "c2": [Event(0.0, 0.123, "cat")]}
    # an event past the clip's end
    with pytest.raises(InputError, match=r"ev.tsv:2: event 0.250-1.500 s of 'c1' lies outside the clip"):
        read_events_tsv(p, durations={"c1": 1.0, "c2": 1.0})
    with pytest.raises(InputError, match=r":3 \[label\]: unknown class 'cat'"):
        read_events_tsv(p, classes=["dog"])
    with pytest.raises(InputError, match="not in the feature store"):
        read_events_tsv(p, durations={"c1": 2.0})
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tonset\toffset\tlabel\nc1\t1.0\t0.5\tdog\n")
    with pytest.raises(InputError, match="need 0 <= onset < offset"):
        read_events_tsv(bad)
    bad.write_text("id\tonset\toffset\tlabel\nc1\tx\t0.5\tdog\n")
    with pytest.raises(InputError, match="must be numbers"):
        read_events_tsv(bad)


def test_frame_scores_tsv(tmp_path):
    p = tmp_path / "fs.tsv"
    write_frame_scores_tsv(p, [("c1", np.array([[0.1, 0.9], [0.2, 0.8]]))], ["a", "b"], hop=0.5)
    assert p.read_text().splitlines() == ["id\tonset\toffset\ta\tb", "c1\t0.000\t0.500\t0.1000\t0.9000",
                                          "c1\t0.500\t1.000\t0.2000\t0.8000"]


def test_decode_items_rows():
    from pllcli.events import decode_items
    s = np.zeros((4, 1))
    s[1:3, 0] = 0.9
    assert decode_items([("x", s), ("y", np.zeros((4, 1)))], ["a"], 0.5) == [("x", 0.5, 1.5, "a")]


# ---------------------------------------------------------------- decoding options

def test_parse_thresholds_forms_and_errors():
    from pllcli.events import parse_thresholds
    cls = ["cat", "dog", "owl"]
    assert parse_thresholds("0.4", cls).tolist() == [0.4, 0.4, 0.4]
    assert parse_thresholds("dog=0.3,cat=0.6,owl=0.5", cls).tolist() == [0.6, 0.3, 0.5]
    assert parse_thresholds("0.5,dog=0.25", cls).tolist() == [0.5, 0.25, 0.5]
    assert parse_thresholds(0.7, cls).tolist() == [0.7] * 3
    assert parse_thresholds([0.1, 0.2, 0.3], cls).tolist() == [0.1, 0.2, 0.3]
    with pytest.raises(UsageError, match="no value for cat, owl; add a default"):
        parse_thresholds("dog=0.3", cls)
    with pytest.raises(UsageError, match="unknown class 'emu'"):
        parse_thresholds("0.5,emu=0.3", cls)
    with pytest.raises(UsageError, match=r"must be in \(0, 1\)"):
        parse_thresholds("0.5,dog=1.5", cls)
    with pytest.raises(UsageError, match="cannot read 'x'"):
        parse_thresholds("dog=x", cls)


def test_median_in_frames_or_seconds():
    from pllcli.events import median_frames
    assert median_frames(5, 0.1) == 5 and median_frames("5", 0.1) == 5
    assert median_frames("300ms", 0.1) == 3 and median_frames("0.2s", 0.1) == 3  # 2 frames -> odd 3
    assert median_frames(0.5, 0.1) == 5 and median_frames("10ms", 0.1) == 1
    # decode_events with a median in seconds equals the same median in frames
    s = np.zeros((20, 1))
    s[[3, 8, 9, 10, 11, 15]] = 0.9
    assert decode_events(s, ["a"], 0.1, median="300ms") == decode_events(s, ["a"], 0.1, median=3) \
        == [Event(0.8, 1.2, "a")]


def test_hysteresis_min_duration_and_gap_merge_in_decode():
    # hop 0.1 s. Class a: 0.6 at frames 2-3 reaches the on threshold 0.5; the run continues while
    # >= 0.3 (frames 1-5); frames 8-9 (0.4) never reach 0.5 -> dropped. Class b: two 0.2 s runs
    # 0.1 s apart merge with min_gap 0.15; a 0.1 s blip at frame 18 is dropped by min_duration.
    s = np.zeros((20, 2))
    s[:, 0] = [0.1, 0.35, 0.6, 0.6, 0.4, 0.3, 0.1, 0.1, 0.4, 0.4] + [0.0] * 10
    s[[11, 12, 14, 15, 18], 1] = 0.9
    got = decode_events(s, ["a", "b"], 0.1, threshold=[0.5, 0.5], low=[0.3, 0.5], min_gap=0.15, min_duration=0.2)
    assert got == [Event(0.1, 0.6, "a"), Event(1.1, 1.6, "b")]
    no_hyst = decode_events(s, ["a", "b"], 0.1, threshold=0.5)
    assert [e for e in no_hyst if e.label == "a"] == [Event(0.2, 0.4, "a")]
    assert [e for e in no_hyst if e.label == "b"] == [Event(1.1, 1.3, "b"), Event(1.4, 1.6, "b"), Event(1.8, 1.9, "b")]


def test_tune_thresholds_picks_best_f1_per_class():
    from pllcli.events import tune_thresholds
    # background 0.1. Class a: true event 1-2 s scores 0.8, a false bump 3-4 s 0.55: thresholds
    # 0.6 .. 0.8 give F1 1 (the lowest, 0.6, is kept). Class b: its true event 0.5-1.5 s scores only
    # 0.3: 0.15 .. 0.3 give F1 1; <= 0.1 makes the whole clip one event.
    hop = 0.1
    s = np.full((50, 3), 0.1)
    s[10:20, 0] = 0.8
    s[30:40, 0] = 0.55
    s[5:15, 1] = 0.3
    ref = {"u": [(1.0, 2.0, "a"), (0.5, 1.5, "b")]}
    thr, f1 = tune_thresholds([("u", s, hop, 5.0)], ref, ["a", "b", "c"])
    assert thr[0] == pytest.approx(0.6) and thr[1] == pytest.approx(0.15)
    assert f1[0] == 1.0 and f1[1] == 1.0
    assert thr[2] == 0.5 and np.isnan(f1[2])  # no truth events for c: the default stays


# ---------------------------------------------------------------- WHEN/WHO events

def test_when_segments_and_per_event_classes():
    from pllcli.events import events_at_peaks, label_segments, segment_means, when_segments
    hop = 0.1
    when = np.zeros(30)
    when[2:6] = 0.9   # segment 0.2-0.6 s
    when[15:22] = 0.8  # segment 1.5-2.2 s
    segs = when_segments(when, hop, 0.5)
    assert segs == [(0.2, 0.6), (1.5, 2.2)]
    classes = ["three", "seven", "nine"]
    evidence = np.zeros((30, 3))
    evidence[2:6, 0] = 0.7    # "three" sounds in the first segment
    evidence[15:22, 1] = 0.6  # "seven" in the second
    evidence[15:22, 2] = 0.65  # "nine" scores higher there, but it is not a tag of the clip
    means = segment_means(evidence, segs, hop)
    np.testing.assert_allclose(means, [[0.7, 0, 0], [0, 0.6, 0.65]])
    tags = ["three", "seven"]
    assert label_segments(segs, means, classes, tags) == [Event(0.2, 0.6, "three"), Event(1.5, 2.2, "seven")]
    assert label_segments(segs, means, classes) == [Event(0.2, 0.6, "three"), Event(1.5, 2.2, "nine")]
    # the WHEN x WHO baseline: every tag on every segment (4 events, 2 of them wrong)
    assert len(label_segments(segs, means, classes, tags, mode="all")) == 4
    assert label_segments(segs, means, classes, []) == []
    # one event per tag where its evidence peaks
    assert events_at_peaks(segs, evidence, hop, classes, [1, 0]) == [Event(0.2, 0.6, "three"),
                                                                     Event(1.5, 2.2, "seven")]
    assert events_at_peaks([], evidence, hop, classes, tags) == []


def test_sliding_windows_cover_the_clip_and_overlap_average_reference():
    from pllcli.events import overlap_average, sliding_windows
    assert sliding_windows(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert sliding_windows(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (7, 11)]   # last window ends at the clip end
    assert sliding_windows(3, 4, 2) == [(0, 3)]                                # short clip: one window
    assert sliding_windows(8, 4, 4) == [(0, 4), (4, 8)]
    with pytest.raises(UsageError, match=">= 1 frame"):
        sliding_windows(8, 0, 1)
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    out = overlap_average(scores, [(0, 4), (3, 7), (6, 10)], 10)
    assert np.allclose(out[:, 0], [1, 1, 1, 0.5, 0, 0, 0.25, 0.5, 0.5, 0.5])
    assert np.allclose(out[:, 1], [0, 0, 0, 0.5, 1, 1, 0.75, 0.5, 0.5, 0.5])
    # decoded like any frame scores (>= 0.5): class a on frames 0-3 and 7-9, class b on frames 3-9
    ev = decode_events(out, ["a", "b"], 0.1, 0.5)
    assert [(e.label, e.onset, e.offset) for e in ev] == [("a", 0.0, 0.4), ("b", 0.3, 1.0), ("a", 0.7, 1.0)]
    assert overlap_average(np.zeros((0, 2)), [], 3).tolist() == [[0, 0]] * 3     # no window: zeros


def test_extend_events_stops_at_the_gap_middle_and_the_clip():
    from pllcli.events import extend_events
    evs = [(1.0, 1.5, "a"), (1.7, 2.0, "a"), (1.6, 1.8, "b")]
    # a1: onset 1.0 - 0.2; offset 1.5 + 0.3 capped at the middle of the 1.5-1.7 gap (1.6);
    # a2: onset 1.7 - 0.2 capped at 1.6, offset 2.3 capped at the clip end 2.1; b has no neighbour
    assert extend_events(evs, 0.2, 0.3, duration=2.1) == [
        Event(0.8, 1.6, "a"), Event(1.4, 2.1, "b"), Event(1.6, 2.1, "a")]
    assert extend_events([(0.1, 0.5, "a")], 0.3, 0.0) == [Event(0.0, 0.5, "a")]    # not before 0
    assert extend_events([(0.1, 0.5, "a")], -0.1, -0.1) == [Event(0.2, 0.4, "a")]  # negative: inwards
    assert extend_events([(0.1, 0.3, "a")], -0.1, -0.1) == []                      # shrunk to nothing
    assert extend_events(evs, 0.0, 0.0) == [Event(*e) for e in evs]
    from pllcli.events import widen_spans
    # index for index: the short middle span shifted 0.2 s later with its end kept is gone (None)
    assert widen_spans([(0.0, 0.5), (1.0, 1.1), (1.5, 2.0)], -0.2, 0.0) == [(0.2, 0.5), None, (1.7, 2.0)]


def test_decode_events_extend_and_dilate_agree():
    from pllcli.events import dilate
    p = np.array([0, 0, 0.9, 0.9, 0, 0, 0, 0.8, 0, 0.])      # runs: frames 2-3 and 7
    # frames of 0.1 s: [0.2, 0.4) and [0.7, 0.8), widened 0.1 before / 0.2 after; the first stops at
    # the middle of the 0.4-0.7 gap (0.55), the second's onset 0.6 lies after it, its offset 1.0 is the clip end
    ev = decode_events(p[:, None], ["x"], 0.1, 0.5, extend=(0.1, 0.2))
    assert [(e.onset, e.offset) for e in ev] == [(0.1, 0.55), (0.6, 1.0)]
    d = dilate(p, 1, 2)    # out[t] = max p[t-2 .. t+1]
    assert np.allclose(d, [0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8])
    assert decode_events(d[:, None], ["x"], 0.1, 0.5) == [Event(0.1, 1.0, "x")]  # merged: scores overlap
    assert np.array_equal(dilate(p, 0, 0), p)
    assert np.allclose(dilate(p, -1, 1), [0, 0, 0, 0.9, 0.9, 0, 0, 0, 0.8, 0])  # one frame later
    ev = decode_events(p[:, None], ["x"], 0.1, 0.5, extend=(-0.1, 0.1))          # events alike
    assert [(e.onset, e.offset) for e in ev] == [(0.3, 0.5), (0.8, 0.9)]
    assert np.allclose(dilate(np.eye(3), 0, 1), [[1, 0, 0], [1, 1, 0], [0, 1, 1]])   # (T, C): per class


def test_label_segments_cover_names_every_tag_once_at_least():
    from pllcli.events import label_segments
    sc = np.array([[0.9, 0.8, 0.1], [0.95, 0.3, 0.1], [0.2, 0.1, 0.9]])   # 3 segments x classes a, b, c
    segs = [(0, 1), (1, 2), (2, 3)]
    # "best" names all three a (c is no tag); "cover" gives b the segment that loses least by it
    # (segment 0: 0.9 - 0.8), a keeps segment 1, segment 2 takes its best tag
    assert [e.label for e in label_segments(segs, sc, ["a", "b", "c"], ["a", "b"])] == ["a", "a", "a"]
    assert [e.label for e in label_segments(segs, sc, ["a", "b", "c"], ["a", "b"], "cover")] == ["b", "a", "a"]
    # fewer segments than tags: as "best"
    assert [e.label for e in label_segments(segs[:1], sc[:1], ["a", "b", "c"], ["a", "b", "c"], "cover")] == ["a"]
    with pytest.raises(UsageError, match="best, cover or all"):
        label_segments(segs, sc, ["a", "b", "c"], None, "most")


def test_on_clip_timeline_moves_frames_to_where_they_start():
    from pllcli.events import on_clip_timeline, segment_frame_ranges
    s = np.arange(5.0)[:, None]
    assert on_clip_timeline(s, 0.1, 0.0, 0.5) is s                                   # the log-mel grid: unchanged
    # frames start 0.2 s into a 0.7 s clip: cells before frame 0 repeat it
    assert on_clip_timeline(s, 0.1, 0.2, 0.7)[:, 0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    # frames start 0.1 s before the clip (a clip centred in padding): the clip begins at frame 1
    assert on_clip_timeline(s, 0.1, -0.1, 0.3)[:, 0].tolist() == [1, 2, 3]
    assert on_clip_timeline(s, 0.1, 0.0, 0.8)[:, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    with pytest.raises(ValueError):
        on_clip_timeline(s, 0.0, 0.0, 1.0)
    # and back: a segment on the clip's timeline -> the input frames under it
    assert segment_frame_ranges([(0.4, 0.6)], 0.1, 10, min_frames=1) == [(4, 6)]
    assert segment_frame_ranges([(0.4, 0.6)], 0.1, 10, min_frames=1, offset=0.2) == [(2, 4)]
