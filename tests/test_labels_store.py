"""Label store: round trips, CSR views, soft labels, merge, align_ids, errors."""
import h5py
import numpy as np
import pytest

from pllcli.errors import InputError
from pllcli.labels.store import (LabelData, align_ids, cover_features, describe, merge_label_stores,
                                 read_label_store, write_label_store)


def _data():
    return LabelData.new(
        ["a", "b", "c", "d", "e"], ["zero", "one", "two"],
        candidates=[[0, 2], None, [1], [], [2, 1, 0]],
        weights=[[0.75, 0.25], None, [1.0], None, [0.5, 0.3, 0.2]],
        clean=[-1, 1, -1, -1, -1],
        provenance={"command": ["x"]})


def test_round_trip_and_candidate_matrix(tmp_path):
    d = _data()
    assert d.unlabeled.tolist() == [False, False, False, True, False]
    p = tmp_path / "l.h5"
    write_label_store(p, d, {"command": ["build"], "params": {"k": 1}})
    e = read_label_store(p)
    assert e.ids.tolist() == ["a", "b", "c", "d", "e"] and e.classes.tolist() == ["zero", "one", "two"]
    m = e.candidate_matrix([0, 3, 4])
    np.testing.assert_allclose(m, [[0.75, 0, 0.25], [0, 0, 0], [0.2, 0.3, 0.5]])
    assert e.clean.tolist() == [-1, 1, -1, -1, -1]
    assert e.has_candidates.tolist() == [True, False, True, False, True]
    assert e.provenance["params"] == {"k": 1}
    assert describe(p)["mean_set_size"] == pytest.approx(2.0)
    assert describe(p)["unlabeled"] == 1


def test_plain_h5py_layout(tmp_path):
    p = tmp_path / "l.h5"
    write_label_store(p, _data())
    with h5py.File(p, "r") as f:
        assert f.attrs["format"] == "pllcli-labels" and f.attrs["task"] == "single"
        ip, ix = f["candidates/indptr"][()], f["candidates/indices"][()]
        assert ip.tolist() == [0, 2, 2, 3, 3, 6] and ix.tolist() == [0, 2, 1, 2, 1, 0]
        assert f["ids"].asstr()[()].tolist()[4] == "e"
        assert f["candidates/weights"].dtype == np.float32 and f["clean"].dtype == np.int32


def test_unweighted_matrix_is_membership():
    d = LabelData.new(["a"], ["x", "y", "z"], candidates=[[2, 0]])
    assert d.candidate_weights(0).tolist() == [1, 1]
    np.testing.assert_array_equal(d.candidate_matrix([0]), [[1, 0, 1]])


def test_set_soft_replace_and_threshold(tmp_path):
    d = _data()
    d.set_soft([3, 1], [[0.1, 0.6, 0.3], [0.9, 0.05, 0.05]], threshold=0.2)
    np.testing.assert_allclose(d.soft_matrix([1, 3, 0]), [[0.9, 0, 0], [0, 0.6, 0.3], [0, 0, 0]])
    assert d.has_soft.tolist() == [False, True, False, True, False]
    assert not d.unlabeled.any()
    d.set_soft([3], np.array([[0.5]]), indices=np.array([[2]]))   # replace one row, top-k style
    np.testing.assert_allclose(d.soft_matrix([1, 3]), [[0.9, 0, 0], [0, 0, 0.5]])
    d.set_soft([4], [[0.5, 0.3, 0.2]], top_k=1)
    np.testing.assert_allclose(d.soft_matrix([4]), [[0.5, 0, 0]])
    p = tmp_path / "s.h5"
    write_label_store(p, d)
    np.testing.assert_allclose(read_label_store(p).soft_matrix([1, 3, 4]), d.soft_matrix([1, 3, 4]))
    with pytest.raises(InputError, match="columns"):
        d.set_soft([0], [[1.0, 0.0]])


def test_set_segments_round_trip(tmp_path):
    d = _data()
    d.set_segments([2], [([0.0, 1.0], [1.0, 2.0], [[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])], threshold=0.15)
    d.set_segments([0], [([0.5], [0.7], [[0, 1.0, 0]])])
    d.set_segments([2], [([3.0], [4.0], [[1.0, 0, 0]])])  # replaces item 2's segments
    p = tmp_path / "g.h5"
    write_label_store(p, d)
    e = read_label_store(p)
    on, off, v = e.segments_of(2)
    assert on.tolist() == [3.0] and off.tolist() == [4.0]
    np.testing.assert_allclose(v, [[1, 0, 0]])
    on, off, v = e.segments_of(0)
    np.testing.assert_allclose(v, [[0, 1, 0]])
    sub = e.subset([2, 0])
    assert sub.segments_item.tolist() == [0, 1] and sub.ids.tolist() == ["c", "a"]
    with pytest.raises(InputError, match="offset before onset"):
        d.set_segments([1], [([2.0], [1.0], [[1, 0, 0]])])


def test_merge_round_trip(tmp_path):
    d = _data()
    d.set_soft([0, 4], [[0.2, 0.3, 0.5], [1, 0, 0]])
    parts = [d.subset([0, 1, 2]), d.subset([3, 4])]
    parts[1].candidates_weights = None  # unweighted part gets uniform weights
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"p{i}.h5")
        write_label_store(paths[-1], part, {"command": [f"part{i}"]})
    m = merge_label_stores(tmp_path / "m.h5", paths)
    e = read_label_store(tmp_path / "m.h5")
    assert e.ids.tolist() == d.ids.tolist() and len(e.provenance["merged_from"]) == 2
    np.testing.assert_allclose(e.candidate_matrix([0, 1, 2]), d.candidate_matrix([0, 1, 2]))
    np.testing.assert_allclose(e.candidate_matrix([4]), [[1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(e.soft_matrix(range(5)), d.soft_matrix(range(5)))
    assert m.clean.tolist() == d.clean.tolist()


def test_merge_refuses_overlap_and_class_mismatch(tmp_path):
    d = _data()
    write_label_store(tmp_path / "a.h5", d.subset([0, 1]))
    write_label_store(tmp_path / "b.h5", d.subset([1, 2]))
    with pytest.raises(InputError, match="'b'.*disjoint"):
        merge_label_stores(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])
    other = LabelData.new(["z"], ["zero", "one", "three"])
    write_label_store(tmp_path / "c.h5", other)
    with pytest.raises(InputError, match="classes differ"):
        merge_label_stores(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "c.h5"])
    assert not (tmp_path / "m.h5").exists()


def test_align_ids():
    assert align_ids(["c", "a"], ["a", "b", "c"]).tolist() == [2, 0]
    with pytest.raises(InputError, match=r"2 of 3 feature ids .*'x', 'y'"):
        align_ids(["x", "a", "y"], ["a", "b"])
    assert align_ids(["x", "a"], ["a"], allow_missing=True).tolist() == [-1, 0]


def test_cover_features_appends_missing_ids_as_unlabeled(tmp_path, caplog):
    import logging
    d = _data()
    d.set_soft([0], np.array([[0.2, 0.3, 0.5]]))
    d.set_segments([4], [([0.0], [1.0], np.array([[0.1, 0.8, 0.1]]))])
    fids = ["e", "x", "a", "y", "c"]
    with caplog.at_level(logging.INFO, logger="pllcli.labels.store"):
        cov, rows, added = cover_features(d, fids, "label store l.h5")
    assert added == 2 and "2 of 5 feature ids are not in the label store l.h5" in caplog.text
    assert list(cov.ids[rows]) == fids and len(d) == 5  # the input is not changed
    assert rows.tolist()[::2] == [4, 0, 2] and sorted(rows[[1, 3]].tolist()) == [5, 6]
    # the labelled rows keep everything; the appended ones have nothing and are unlabeled
    np.testing.assert_allclose(cov.candidate_matrix(rows[[0, 2, 4]]), d.candidate_matrix([4, 0, 2]))
    np.testing.assert_allclose(cov.soft_matrix([rows[2]]), d.soft_matrix([0]))
    assert cov.segments_item.tolist() == [4] and cov.clean.tolist() == d.clean.tolist() + [-1, -1]
    assert cov.unlabeled[rows].tolist() == [False, True, False, True, False]
    assert not cov.candidate_matrix(rows[[1, 3]]).any() and not cov.has_tags[rows[[1, 3]]].any()
    cov.validate()
    write_label_store(tmp_path / "c.h5", cov)  # still a valid store
    assert read_label_store(tmp_path / "c.h5").ids.tolist() == cov.ids.tolist()
    same, rows2, n = cover_features(d, ["c", "a"])
    assert same is d and rows2.tolist() == [2, 0] and n == 0
    with pytest.raises(InputError, match=r"none of the 2 feature ids are in the label store l\.h5"):
        cover_features(d, ["x", "y"], "label store l.h5")


def test_read_rejects_other_files(tmp_path):
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as f:
        f.attrs["format"] = "pllcli-features"
    with pytest.raises(InputError, match="not a label store"):
        read_label_store(p)
    (tmp_path / "t.h5").write_text("hello")
    with pytest.raises(InputError, match="not an HDF5 file"):
        read_label_store(tmp_path / "t.h5")
    with pytest.raises(InputError, match="no such file"):
        read_label_store(tmp_path / "none.h5")


def test_validate_catches_bad_arrays(tmp_path):
    with pytest.raises(InputError, match="duplicate id 'a'"):
        LabelData.new(["a", "a"], ["x"])
    with pytest.raises(InputError, match="class index outside"):
        LabelData.new(["a"], ["x"], candidates=[[3]])
    p = tmp_path / "l.h5"
    write_label_store(p, _data())
    with h5py.File(p, "r+") as f:
        del f["candidates/indices"]
        f["candidates/indices"] = np.array([0, 1], np.int32)
    with pytest.raises(InputError, match=r"l\.h5 \[candidates/indptr\]"):
        read_label_store(p)


def test_doc_snippet_reads_store(tmp_path):
    import re
    from pathlib import Path
    doc = (Path(__file__).parent.parent / "docs" / "label_store.md").read_text()
    code = re.search(r"## Reading it with plain h5py\n\n```python\n(.*?)```", doc, re.S).group(1)
    ns = {}
    exec(code, ns)
    p = tmp_path / "l.h5"
    write_label_store(p, _data())
    sets, clean = ns["read_candidates"](p)
    assert sets["a"] == [("zero", 0.75), ("two", 0.25)] and sets["d"] == []
    assert clean == {"b": "one"}
    write_label_store(p, LabelData.new(["a"], ["x", "y"], candidates=[[1, 0]]))
    assert ns["read_candidates"](p)[0]["a"] == [("y", 0.5), ("x", 0.5)]
