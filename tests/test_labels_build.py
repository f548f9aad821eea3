"""build-candidates: chat alignment, normalisation, clean labels, delay prior, tags, simulation, errors."""
import json

import numpy as np
import pytest

from pllcli.errors import InputError, UsageError
from pllcli.labels.build import ChatOptions, build_from_chat, build_from_tags, simulate
from pllcli.labels.store import read_label_store
from pllcli.labels.text import normalize_text, parse_duration, parse_time
from tests.conftest import run_cli

CHAT = """time,author,text
9,u0,early
10.5,u1,four seven
11,u2,lol
12,u3,Four seven!
13,u4,one two
14,u5,4 7
15,u6,one two
16,u7,three three
30,u8,one two
31,u9,four seven
"""
VOICE = "id,time,author\nv1,10,u1\nv2,12.5,u4\nv3,2024-01-01T00:00:00Z,u9\n"


def _write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def files(tmp_path):
    return {"voice": _write(tmp_path, "voice.csv", VOICE), "chat": _write(tmp_path, "chat.csv", CHAT),
            "clean": _write(tmp_path, "clean.csv", "id,label\nv2,one two\n"), "dir": tmp_path}


def test_normalisation_equivalences():
    for s in ["4 7", "four seven", "Four seven!", "FOUR  SEVEN.", "\uff14 \uff17", "47"]:
        assert normalize_text(s) == "four seven", s
    assert normalize_text("Four seven!", "digits") == "4 7"
    assert normalize_text("Who's on?!") == "whos on" and normalize_text("?") == ""
    assert parse_time("1970-01-01T00:01:00", "f", 2) == 60.0
    assert parse_time("1970-01-01T01:00:00+01:00", "f", 2) == 0.0
    assert parse_duration("30s") == 30 and parse_duration("500ms") == 0.5 and parse_duration("2m") == 120


def test_next_k_sets_merge_repeats_and_positions(files):
    b = build_from_chat(str(files["voice"]), str(files["chat"]), ChatOptions(next_k=4, min_count=2))
    cls = b.data.classes.tolist()
    # min-count 2: 'four seven' (x4 after normalisation) and 'one two' (x3) only
    assert cls == ["four seven", "one two"]
    assert b.stats["off_vocabulary_messages"] == 3  # early, lol, three three
    names = lambda r: [cls[c] for c in b.sets[r]]  # noqa: E731
    # v1 at t=10: kept stream from 10.5: four seven(0), Four seven!(1), one two(2), 4 7(3) -> merged
    assert names(0) == ["four seven", "one two"] and b.positions[0] == [0, 2]
    assert names(1) == ["one two", "four seven"] and b.positions[1] == [0, 1]
    assert b.stats["repeats_merged"] == 2 + 2
    assert names(2) == [] and b.stats["empty_set_share"] == pytest.approx(1 / 3)  # 2024 is after the chat


def test_window_same_author_and_exclusion(files):
    b = build_from_chat(str(files["voice"]), str(files["chat"]), ChatOptions(next_k=None, window=2.0))
    cls = b.data.classes.tolist()
    assert [cls[c] for c in b.sets[0]] == ["four seven", "lol"]  # t in [10, 12]: 10.5, 11, 12 (merged)
    b = build_from_chat(str(files["voice"]), str(files["chat"]),
                        ChatOptions(next_k=3, same_author=True))
    assert [b.data.classes[c] for c in b.sets[0]] == ["four seven"]  # only u1's own message
    assert [b.data.classes[c] for c in b.sets[1]] == ["one two"] and b.sets[2] == []
    b = build_from_chat(str(files["voice"]), str(files["chat"]),
                        ChatOptions(next_k=2, exclude_authors=["u1", "u2"]))
    assert [b.data.classes[c] for c in b.sets[0]] == ["four seven", "one two"]
    assert b.positions[0] == [0, 1] and b.stats["excluded_author_messages"] == 2


def test_clean_override_coverage_and_delay_prior(files):
    clean = _write(files["dir"], "c2.csv", "id,label\nv1,One two\nv2,four seven\nv3,lol\n")
    b = build_from_chat(str(files["voice"]), str(files["chat"]),
                        ChatOptions(next_k=4, weights="delay-prior", prior_alpha=1.0), clean_path=str(clean))
    st = b.stats
    # v1's set (kept stream at 10.5..): four seven@0, lol@1, one two@3 -> clean 'one two' at position 3
    # v2's set (13..): one two@0, four seven@1 -> clean at 1 ; v3 has an empty set -> not covered
    assert st["coverage_estimate"] == pytest.approx(2 / 3)
    assert st["position_histogram"] == [0, 1, 0, 1]
    np.testing.assert_allclose(st["delay_prior"], [1 / 6, 2 / 6, 1 / 6, 2 / 6])
    d = b.data
    ci = d.class_index()
    assert d.clean.tolist() == [ci["one two"], ci["four seven"], ci["lol"]]
    # clean items' sets are overridden with {clean}, weight 1
    np.testing.assert_allclose(d.candidate_matrix([0])[0], np.eye(len(ci))[ci["one two"]])
    # a non-clean item gets the normalised prior over its positions
    b2 = build_from_chat(str(files["voice"]), str(files["chat"]),
                         ChatOptions(next_k=4, weights="delay-prior"), clean_path=str(clean))
    assert b2.data.candidates_weights is not None and (b2.data.candidates_weights > 0).all()


def test_unlabeled_items_and_duplicates(files):
    unl = _write(files["dir"], "unl.csv", "id,path\nu1,a.wav\nu2,b.wav\n")
    b = build_from_chat(str(files["voice"]), str(files["chat"]), ChatOptions(next_k=3),
                        unlabeled_path=str(unl))
    assert b.data.ids.tolist()[-2:] == ["u1", "u2"]
    assert b.data.unlabeled.tolist() == [False, False, True, True, True]  # v3: empty set
    dup = _write(files["dir"], "unl2.csv", "id\nx\nv2\n")
    with pytest.raises(InputError, match=r"unl2\.csv:3 \[id\]: duplicate id 'v2'"):
        build_from_chat(str(files["voice"]), str(files["chat"]), ChatOptions(), unlabeled_path=str(dup))


@pytest.mark.parametrize("name,text,pattern", [
    ("voice", "id,time\nv1,10\nv2,yesterday\n", r"voice\.csv:3 \[time\]: unparseable timestamp 'yesterday'"),
    ("voice", "id,when\nv1,10\n", r"voice\.csv:1 \[time\]: missing column 'time'"),
    ("voice", "id,time\nv1,10\nv1,11\n", r"voice\.csv:3 \[id\]: duplicate id 'v1' \(first on line 2\)"),
    ("voice", b"id,time\nv1,10\nv\xff2,11\n", r"voice\.csv:3: not valid UTF-8"),
    ("chat", "time,author,text\n", r"chat\.csv:2: empty chat log"),
    ("chat", "time,author,text\n1,a,hi\nnoon,b,yo\n", r"chat\.csv:3 \[time\]: unparseable"),
    ("chat", "time,text\n1,hi\n", r"chat\.csv:1 \[author\]: missing column 'author'"),
    ("clean", "id,label\nv1,one two\nv2,nine nine\n", r"clean\.csv:3 \[label\]: clean label 'nine nine'"),
    ("clean", "id,label\nv1,one two\nv1,one two\n", r"clean\.csv:3 \[id\]: duplicate id"),
])
def test_bad_input_names_file_and_line(files, name, text, pattern):
    _write(files["dir"], f"{name}.csv", text)
    with pytest.raises(InputError, match=pattern):
        build_from_chat(str(files["voice"]), str(files["chat"]), ChatOptions(next_k=10),
                        clean_path=str(files["clean"]))


def test_add_clean_labels_adds_class(files):
    clean = _write(files["dir"], "c3.csv", "id,label\nv1,Nine nine\n")
    b = build_from_chat(str(files["voice"]), str(files["chat"]), ChatOptions(add_clean_labels=True),
                        clean_path=str(clean))
    assert b.data.classes[-1] == "nine nine" and b.stats["clean_labels_added"] == ["nine nine"]
    assert b.data.clean[0] == len(b.data.classes) - 1


def test_closed_vocab_drops_chatter(files):
    b = build_from_chat(str(files["voice"]), str(files["chat"]),
                        ChatOptions(next_k=3, vocab=["4 7", "one two", "three three"]))
    assert b.data.classes.tolist() == ["four seven", "one two", "three three"]
    # 'lol' and 'early' are off-vocabulary; K=3 counts kept messages
    assert [b.data.classes[c] for c in b.sets[0]] == ["four seven", "one two"]
    assert b.stats["off_vocabulary_examples"] == ["early", "lol"]


def test_tags_and_strong(tmp_path):
    tags = _write(tmp_path, "tags.csv", "id,labels\na,dog;cat\nb,\nc,cat\n")
    strong = _write(tmp_path, "strong.tsv", "id\tonset\toffset\tlabel\na\t0.5\t1.0\tdog\nd\t0\t0.2\tbird\n")
    durs = _write(tmp_path, "d.csv", "id,duration\na,2\nd,1\n")
    b = build_from_tags(str(tags), str(strong), {"a": 2.0, "d": 1.0})
    d = b.data
    assert d.task == "multi" and d.classes.tolist() == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(d.tag_matrix([0, 1, 2, 3]), [[0, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert d.has_tags.tolist() == [True, True, True, False] and b.stats["negative_clips"] == 1
    assert d.strong_item.tolist() == [0, 3] and d.strong_label.tolist() == [2, 0]
    assert d.unlabeled.tolist() == [False, False, False, True]
    bad = _write(tmp_path, "s2.tsv", "id\tonset\toffset\tlabel\na\t1.0\t0.5\tdog\n")
    with pytest.raises(InputError, match=r"s2\.tsv:2 \[offset\]: need 0 <= onset < offset"):
        build_from_tags(str(tags), str(bad))
    late = _write(tmp_path, "s3.tsv", "id\tonset\toffset\tlabel\na\t1.0\t2.5\tdog\n")
    build_from_tags(str(tags), str(late))  # no durations: the check is skipped
    with pytest.raises(InputError, match=r"s3\.tsv:2 \[offset\]: event ends at 2.5 s, after the clip"):
        build_from_tags(str(tags), str(late), {"a": 2.0})
    r = run_cli("build-candidates", tmp_path / "t.h5", "--tags", tags, "--strong", late, "--durations", durs)
    assert r.returncode == 1 and "s3.tsv:2 [offset]" in r.stderr and "Traceback" not in r.stderr


def test_simulation_uniform_fixed_missing_confusions(tmp_path):
    labels = _write(tmp_path, "lab.csv", "id,label\n" + "".join(f"i{i},c{i % 5}\n" for i in range(400)))
    b = simulate(str(labels), k=3, seed=1)
    sizes = b.data.set_sizes
    assert (sizes == 3).all() and b.stats["coverage"] == 1.0
    assert b.stats["q_eff"] == pytest.approx(2 / 4)
    b2 = simulate(str(labels), k=3, seed=1)
    np.testing.assert_array_equal(b.data.candidates_indices, b2.data.candidates_indices)  # seeded
    u = simulate(str(labels), q=0.3, seed=0)
    assert u.stats["q_eff"] == pytest.approx(0.3, abs=0.04)
    m = simulate(str(labels), k=2, missing=0.25, seed=0)
    assert m.stats["coverage"] == pytest.approx(0.75, abs=0.06) and (m.data.set_sizes == 2).all()
    unl = _write(tmp_path, "unl.csv", "id,path\nu0,a.wav\nu1,b.wav\n")
    w = simulate(str(labels), k=1, seed=0, unlabeled_path=str(unl))
    assert w.stats["items"] == 402 and w.stats["unlabeled"] == 2 and w.stats["coverage"] == 1.0
    assert list(w.data.ids[-2:]) == ["u0", "u1"] and w.data.unlabeled[-2:].all() and not w.data.unlabeled[:-2].any()
    dup = _write(tmp_path, "dup.csv", "id\ni3\n")
    with pytest.raises(InputError, match="duplicate id 'i3'"):
        simulate(str(labels), k=1, unlabeled_path=str(dup))
    conf = np.roll(np.eye(5), 1, axis=1)  # true class c -> only c+1 is confusable
    np.save(tmp_path / "conf.npy", conf)
    c = simulate(str(labels), k=2, confusions=str(tmp_path / "conf.npy"), seed=0)
    for r in range(10):
        t = r % 5
        assert sorted(c.data.candidates(r).tolist()) == sorted([t, (t + 1) % 5])
    np.save(tmp_path / "bad.npy", np.ones((4, 4)))
    with pytest.raises(InputError, match=r"bad\.npy: confusion matrix is \(4, 4\)"):
        simulate(str(labels), k=2, confusions=str(tmp_path / "bad.npy"))
    with pytest.raises(UsageError):
        simulate(str(labels), q=0.1, k=2)


def test_cli_end_to_end_json_and_store(files):
    out = files["dir"] / "l.h5"
    args = ["build-candidates", "-o", out, "--voice", files["voice"], "--chat", files["chat"],
            "--clean", files["clean"], "--next", "4", "--weights", "delay-prior", "--json", "-"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["items"] == 3 and st["clean"] == 1 and st["coverage_estimate"] == 1.0
    d = read_label_store(out)
    assert d.provenance["inputs"]["chat"]["sha256"] and d.provenance["stats"]["classes"] == st["classes"]
    assert d.candidates_weights is not None
    r = run_cli(*args)  # exists, no --overwrite
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("build-candidates", files["dir"] / "x.h5", "--voice", files["voice"])
    assert r.returncode == 2 and "both --voice and --chat" in r.stderr


def test_cli_simulate_and_window(files, tmp_path):
    labels = _write(tmp_path, "lab.csv", "id,label\n" + "".join(f"i{i},c{i % 4}\n" for i in range(40)))
    r = run_cli("-q", "build-candidates", "-o", tmp_path / "s.h5", "--simulate-from", labels, "--set-size", "2",
                "--missing-share", "0.5", "--seed", "3", "--json", "-")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    d = read_label_store(tmp_path / "s.h5")
    assert (d.set_sizes == 2).all() and st["mode"] == "uniform-k" and 0.2 < st["coverage"] < 0.8
    r = run_cli("-q", "build-candidates", "-o", tmp_path / "w.h5", "--voice", files["voice"], "--chat",
                files["chat"], "--window", "2s", "--json", "-")
    assert r.returncode == 0 and json.loads(r.stdout)["mean_set_size"] == pytest.approx((2 + 2) / 2)
    r = run_cli("build-candidates", tmp_path / "w2.h5", "--voice", files["voice"], "--chat", files["chat"],
                "--window", "soon")
    assert r.returncode == 2 and "--window" in r.stderr


def test_clean_labels_alone_with_unlabeled(tmp_path):
    clean = _write(tmp_path, "few.csv", "id,label\na,one\nb,two\nc,one\n")
    unl = _write(tmp_path, "rest.csv", "id,path\nd,d.wav\ne,e.wav\n")
    r = run_cli("build-candidates", "-o", tmp_path / "few.h5", "--clean", clean, "--unlabeled", unl, "--json", "-")
    assert r.returncode == 0, r.stderr
    d = read_label_store(tmp_path / "few.h5")
    assert list(d.ids) == ["a", "b", "c", "d", "e"] and list(d.classes) == ["one", "two"]
    assert list(d.clean) == [0, 1, 0, -1, -1] and list(d.unlabeled) == [False, False, False, True, True]
    assert json.loads(r.stdout)["source"] == "clean"
    r = run_cli("build-candidates", tmp_path / "x.h5", "--clean", clean, "--weights", "delay-prior")
    assert r.returncode == 2 and "--weights" in r.stderr


def test_clean_labels_of_a_single_class(tmp_path):
    from pllcli.labels.build import build_from_clean
    b = build_from_clean(str(_write(tmp_path, "one.csv", "id,label\na,x\nb,x\n")))
    assert list(b.data.classes) == ["x"] and list(b.data.clean) == [0, 0] and b.stats["items"] == 2
