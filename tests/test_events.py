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
