"""The streaming data path (pllcli.training.stream): coverage per epoch across ranks x workers,
equality with the in-memory path, determinism, contiguous block reads, the bounded buffer,
float16 storage, mid-epoch resume and the --data memory|stream|auto decision."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

from pllcli.errors import InputError, TrainingError, UsageError
from pllcli.features.config import FeatureConfig
from pllcli.features.store import FeatureStore, write_feature_store
from pllcli.training.data import InMemoryFeatures
from pllcli.training import stream as st
from pllcli.training.stream import StreamDataset, StreamLoader, choose_data_path

F = 8


def _store(path, n=300, dtype="float32", seed=0, bad_item=None):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        x = rng.standard_normal((3 + (7 * i) % 41, F)).astype(np.float32)
        if i == bad_item:
            x[1, 2] = np.nan
        items.append(dict(id=f"u{i:04d}", features=x, duration=0.1))
    cfg = FeatureConfig.preset("speech8k").replace(n_mels=F, dtype=dtype)
    return FeatureStore(write_feature_store(path, cfg, items))


@pytest.fixture
def fs(tmp_path):
    return _store(tmp_path / "s.h5")


def _ds(fs, **kw):
    kw = {"batch_size": 16, "block_frames": 1024, "buffer_frames": 3000, **kw}
    return StreamDataset(fs, **kw)


def _epoch(fs, epoch=0, workers=0, **kw):
    ld = StreamLoader(_ds(fs, **kw), num_workers=workers)
    return [b for b in ld.epoch(epoch)], ld


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (3, 2)])
def test_every_item_once_per_epoch_across_ranks_and_workers(fs, world, workers):
    seen, counts = collections.Counter(), []
    for r in range(world):
        batches, ld = _epoch(fs, workers=workers, rank=r, world=world)
        counts.append(len(batches))
        assert len(batches) == len(ld) and all(1 <= len(b["index"]) <= 16 for b in batches)
        seen.update(int(i) for b in batches for i in b["index"])
    assert len(set(counts)) == 1                      # every rank runs the same number of steps
    assert sorted(seen) == list(range(len(fs))) and set(seen.values()) == {1}


def test_ranks_balanced_and_short_rank_repeats_one_item():
    nb, sizes = st.rank_sizes(300, 16, 3)
    assert nb == 7 and sum(sizes) == 300 and max(sizes) - min(sizes) <= 1
    nb, sizes = st.rank_sizes(33, 16, 3)             # 33 = 2 full batches + one left for 3 ranks... 1 each
    assert nb == 1 and sizes == [11, 11, 11]
    nb, sizes = st.rank_sizes(2, 16, 3)               # fewer items than ranks: rank 2 gets a repeated one
    assert nb == 1 and sizes == [1, 1, 0]


def test_fewer_items_than_ranks_still_equal_steps(tmp_path):
    fs = _store(tmp_path / "t.h5", n=2)
    got = [[int(i) for b in _epoch(fs, rank=r, world=3)[0] for i in b["index"]] for r in range(3)]
    assert [len(g) for g in got] == [1, 1, 1] and sorted(set(sum(got, []))) == [0, 1]


def test_features_equal_in_memory_path(fs):
    mem = InMemoryFeatures(*fs.load_all())
    pad = torch.full((F,), 0.5)
    batches, ld = _epoch(fs, epoch=3, max_frames=10, pad_value=pad, seed=5, rank=1, world=2)
    for b in batches:
        rows = b["index"].numpy()
        rng = np.random.default_rng([5, int(rows[0]), 3, 1])   # the classifier task's crop generator
        x, lens = mem.gather(rows, 10, rng, pad)
        torch.testing.assert_close(b["x"], x, rtol=0, atol=0)
        assert torch.equal(b["lengths"], lens)
    whole, _ = _epoch(fs, crops=False)
    for b in whole:
        for k, r in enumerate(b["index"].tolist()):
            n = int(b["lengths"][k])
            assert n == fs.num_frames[r]
            np.testing.assert_array_equal(b["x"][k, :n].numpy(), fs[r])
            assert not b["x"][k, n:].any()


def test_same_seed_and_epoch_same_order_other_epoch_other_order(fs):
    def order(**kw):
        return [b["index"].tolist() for b in _epoch(fs, **kw)[0]]
    a = order(epoch=1, seed=3)
    assert a == order(epoch=1, seed=3)
    assert a != order(epoch=2, seed=3) and a != order(epoch=1, seed=4)
    assert order(epoch=1, seed=3, workers=2) == order(epoch=1, seed=3, workers=2)


def test_block_reads_are_contiguous_slices_one_h5py_call_each(fs, monkeypatch):
    calls = []

    class Counting:
        def __init__(self, d):
            self.d = d

        def __getitem__(self, key):
            calls.append(key)
            return self.d[key]

    real = st.StoreHandle.features
    monkeypatch.setattr(st.StoreHandle, "features", lambda self: Counting(real(self)))
    ds = _ds(fs)
    ds.counters["read_log"] = []
    for _ in StreamLoader(ds).epoch(0):
        pass
    blocks = ds.blocks
    assert len(blocks) == int(np.ceil(fs.offsets[-1] / 1024)) > 3
    spans = sorted((int(fs.offsets[b[0]]), int(fs.offsets[b[-1] + 1])) for b in blocks)
    assert sorted(ds.counters["read_log"]) == spans             # one read per block, the block's span
    assert len(calls) == len(blocks) and all(isinstance(k, slice) and k.step is None for k in calls)
    assert ds.counters["frames_read"] == fs.offsets[-1]         # every frame read once
    for b in blocks:                                            # a block = rows starting in one 1024-frame window
        assert np.all(np.diff(b) == 1) and len(set(fs.offsets[b] // 1024)) == 1

    def read_order(epoch, **kw):
        d = _ds(fs, **kw)
        d.counters["read_log"] = []
        for _ in StreamLoader(d).epoch(epoch):
            pass
        return d.counters["read_log"]
    e0 = read_order(0)
    assert e0 != sorted(e0) and e0 != read_order(1) and e0 == read_order(0)   # blocks shuffled per epoch
    assert read_order(0, shuffle=False) == spans                                # inference: store order


def test_batches_are_length_bucketed_like_the_memory_path(fs):
    """Draws of 32 batches sorted by length: padding as small as epoch_batches' (bucket=1: the
    old random draws pad far more); every item still once per epoch, in a seed-dependent order."""
    from pllcli.training.data import epoch_batches
    nf = np.diff(fs.offsets)

    def padding(batches):
        return sum(len(b) * nf[b].max() for b in batches) / sum(nf[b].sum() for b in batches)

    def stream_batches(**kw):
        p = _ds(fs, buffer_frames=20000, **kw).plan(0, 1)[0]
        return [p.rows[b] for b in p.batches]
    bucketed, single = stream_batches(), stream_batches(bucket=1)
    mem = padding(epoch_batches(np.arange(len(fs)), nf, 16, 0, 0))
    assert padding(bucketed) <= 1.1 * mem < padding(single)
    assert sorted(np.concatenate(bucketed).tolist()) == list(range(len(fs)))
    assert not np.array_equal(np.concatenate(bucketed), np.concatenate(stream_batches(seed=1)))


def test_shuffle_buffer_never_holds_more_than_its_size(fs):
    for buf in (1800, 3000):
        ds = _ds(fs, buffer_frames=buf)
        n = sum(len(b["index"]) for b in StreamLoader(ds).epoch(0))
        c = ds.counters
        assert n == len(fs) and 0 < c["peak_frames"] <= buf and c["held_frames"] == c["held_items"] == 0
        assert c["peak_frames"] == max(p.peak_frames for p in ds.plan(0))
    with pytest.raises(UsageError, match="below what one batch needs"):
        _ds(fs, buffer_frames=500)


def test_float16_store_stays_float16_until_the_batch(tmp_path):
    fs = _store(tmp_path / "h.h5", dtype="float16")
    assert fs.dtype == "float16"
    batches, ld = _epoch(fs, crops=False)
    assert ld.dataset.counters["dtype"] == "float16"           # what the reads and the buffer hold
    b = batches[0]
    assert b["x"].dtype == torch.float32
    r = int(b["index"][0])
    np.testing.assert_array_equal(b["x"][0, :fs.num_frames[r]].numpy(), fs[r])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_remaining_batches(fs, workers):
    full, _ = _epoch(fs, epoch=2, workers=workers, max_frames=12)
    ld = StreamLoader(_ds(fs, max_frames=12), num_workers=workers)
    it = iter(ld.epoch(2))
    head = [next(it) for _ in range(5)]
    state = ld.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 5 and state["granularity"] == "batch"
    assert "resume: mid-epoch" in ld.describe() and "\n" not in ld.describe()
    del it
    ld2 = StreamLoader(_ds(fs, max_frames=12), num_workers=workers)
    assert len(ld2.epoch(0)) == len(full)                      # asking an earlier epoch's length keeps the state
    assert "batch 6" in ld2.load_state_dict(state)
    assert len(ld2.epoch(1)) == len(full)
    ep = ld2.epoch(2)
    rest = list(ep)
    assert len(ep) == len(full) - 5 and ep.start == 5 and ep.total == len(full)
    for a, b in zip(head + rest, full, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])
    assert ld2.state_dict()["epoch"] == 3 and ld2.state_dict()["batches"] == 0


def test_resume_skips_reads_and_refuses_a_changed_store(fs, tmp_path):
    ds = _ds(fs)
    ld = StreamLoader(ds)
    batches = list(ld.epoch(0))
    ld2 = StreamLoader(_ds(fs))
    ld2.load_state_dict({**ld.state_dict(), "epoch": 0, "batches": len(batches) - 1})
    assert len(list(ld2.epoch(0))) == 1 and ld2.dataset.counters["frames_read"] < ds.counters["frames_read"]
    other = StreamLoader(_ds(_store(tmp_path / "o.h5", n=299)))
    with pytest.raises(InputError, match="differs from the one the run started on"):
        other.load_state_dict(ld.state_dict())
    ld3 = StreamLoader(_ds(fs), num_workers=2)                 # another plan: back to the epoch start
    assert "start of epoch" in ld3.load_state_dict({**ld.state_dict(), "epoch": 0, "batches": 3})


@pytest.mark.parametrize("workers", [0, 2])
def test_store_changed_during_run_is_named(tmp_path, workers, monkeypatch):
    fs = _store(tmp_path / "c.h5")
    ld = StreamLoader(_ds(fs), num_workers=workers)
    list(ld.epoch(0))
    _store(tmp_path / "c.h5", n=200)                            # rewritten between epochs
    changed = r"c\.h5: the feature store changed since the run started"
    with pytest.raises(InputError, match=changed):
        ld.epoch(1)
    check = st.StoreHandle.check                                # where the reader opens the file
    monkeypatch.setattr(st.StoreHandle, "check", lambda self, f=None: None if f is None else check(self, f))
    with pytest.raises(InputError, match=changed):
        list(StreamLoader(_ds(fs), num_workers=workers).epoch(0))


def test_labels_of_the_batch_rows(fs):
    from pllcli.labels.store import LabelData
    from pllcli.training.data import LabelTensors
    lab = LabelData.new(list(fs.ids), ["a", "b", "c"], candidates=[[i % 3, (i + 1) % 3] for i in range(len(fs))],
                        clean=[i % 3 if i % 5 == 0 else -1 for i in range(len(fs))])
    lt = LabelTensors(lab, np.arange(len(fs)))
    for b in _epoch(fs, labels=lt, x_key="x_raw")[0][:3]:
        ref = lt.batch(b["index"].numpy())
        assert set(ref) | {"x_raw", "lengths"} == set(b)
        assert all(torch.equal(ref[k], b[k]) for k in ref)


def test_inference_order_each_item_once_shortest_first(fs):
    batches, _ = _epoch(fs, shuffle=False, crops=False, batch_size=32)
    rows = [int(i) for b in batches for i in b["index"]]
    assert sorted(rows) == list(range(len(fs)))
    first = batches[0]["lengths"].numpy()
    assert np.all(np.diff(first) >= 0)


def test_store_features_and_stats_equal_in_memory(tmp_path, fs):
    mem = InMemoryFeatures(*fs.load_all())
    sf = st.StoreFeatures(fs)
    rows = np.array([5, 6, 7, 100, 3, 250])
    for mf in (None, 9):
        a = sf.gather(rows, mf, np.random.default_rng(1), None)
        b = mem.gather(rows, mf, np.random.default_rng(1), None)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for r in (None, np.arange(0, 300, 7)):
        m1, s1 = st.feature_stats(fs, r, block_frames=1024)
        m2, s2 = mem.stats(r)
        np.testing.assert_allclose(m1, m2, atol=1e-6)
        np.testing.assert_allclose(s1, s2, atol=1e-6)
    bad = _store(tmp_path / "nan.h5", bad_item=123)
    with pytest.raises(InputError, match="'u0123' contain NaN/inf"):
        st.feature_stats(bad, block_frames=1024)
    assert st.nonfinite_rows(bad, block_frames=1024).tolist() == [123]
    assert st.nonfinite_rows(bad, np.arange(124, 300)).tolist() == [] and not len(st.nonfinite_rows(fs))


def test_choose_data_path_decisions(fs, tmp_path):
    gib = 1 << 30
    assert choose_data_path(5 * gib, 4 * gib)[0] == "stream"
    assert choose_data_path(3 * gib, 4 * gib)[0] == "memory"
    choice, why = choose_data_path(5 * gib, 4 * gib, "auto")
    assert "5.0 GiB > 4.0 GiB" in why and "--max-memory" in why and "\n" not in why
    assert choose_data_path(5 * gib, 4 * gib, "memory")[0] == "memory"
    choice, why = choose_data_path(3 * gib, 4 * gib, procs=2)       # torchrun: every local rank holds a copy
    assert choice == "stream" and "6.0 GiB (2 processes) > 4.0 GiB" in why
    assert choose_data_path(1, None, "stream")[0] == "stream"
    assert choose_data_path(1, None)[0] == "memory" and "of RAM" in choose_data_path(1, None)[1]
    assert choose_data_path(st.total_memory(), None)[0] == "stream"     # default budget < all of RAM
    with pytest.raises(UsageError):
        choose_data_path(1, None, "disk")
    assert st.parse_memory("8G") == 8 * gib and st.parse_memory("512MiB") == 512 << 20
    assert st.parse_memory("2e9") == 2_000_000_000 and st.parse_memory(None) is None
    assert st.parse_memory("50%") == st.total_memory() // 2
    for bad in ("lots", "-1G", "0", "inf", "nan", "G", "10%%"):
        with pytest.raises(UsageError, match="--max-memory"):
            st.parse_memory(bad)
    f16 = _store(tmp_path / "h.h5", dtype="float16")
    assert st.in_memory_bytes(fs) == fs.offsets[-1] * F * 4
    assert st.in_memory_bytes(f16) == f16.offsets[-1] * F * 6      # float32 copy + the float16 read
    with pytest.raises(UsageError, match="below what streaming one batch needs"):
        st.stream_buffer_frames(1 << 16, fs, batch_size=64, num_workers=2)
    frames = st.stream_buffer_frames(64 << 20, fs, batch_size=16)
    assert frames > 0 and len(_ds(fs, buffer_frames=frames)) == 19


def test_worker_skips_follow_round_robin():
    assert st.worker_skips([3, 2], 0) == [0, 0]
    assert st.worker_skips([3, 2], 3) == [2, 1]
    assert st.worker_skips([3, 2], 5) == [3, 2]
    assert st.worker_skips([1, 1, 0], 2) == [1, 1, 0]
    assert st.loader_order([3, 2, 2]) == [0, 1, 2, 0, 1, 2, 0]


def test_a_dying_worker_names_the_store_and_its_items(fs, monkeypatch):
    def die(self, *args):
        os._exit(3)
    monkeypatch.setattr(StreamDataset, "_make_batch", die)
    with pytest.raises(TrainingError, match=r"s\.h5: a data loader worker failed in epoch 1 \(worker 0, items \d+-\d+"):
        list(StreamLoader(_ds(fs), num_workers=2).epoch(0))


def test_bench_stream_script_runs_and_writes_json(tmp_path):
    import json
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "bench_stream.py")
    out = subprocess.run([sys.executable, script, str(tmp_path / "b.h5"), "--items", "300", "--max-memory", "16M",
                          "--json", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["mode"], r["workers"]) for r in rows] == [("memory", 0), ("stream", 0), ("stream", 2)]
    assert all(r["items"] == 300 for r in rows) and "| stream | 2 | 300 |" in out.stdout


def test_bench_stream_train_scale_writes_distinct_copies_and_rows(tmp_path):
    """bench_stream_train.py scale on 20 generated 8 kHz clips named like FSDD: the 2x store holds
    every clip twice under distinct ids with the same frames, and one row per store and mode."""
    import json
    import subprocess
    import sys

    import soundfile as sf
    rec = tmp_path / "rec"
    rec.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        sf.write(rec / f"{i % 10}_spk_{i // 10}.wav", (0.1 * rng.standard_normal(2400)).astype(np.float32), 8000)
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "bench_stream_train.py")
    out = subprocess.run([sys.executable, script, "scale", str(rec), "--work", str(tmp_path / "w"), "--factors", "1",
                          "2", "--max-memory", "24M", "--json", str(tmp_path / "s.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(r["factor"], r["mode"], r["items"], r["epochs"]) for r in rows] == [
        (1, "memory", 20, 2), (1, "stream", 20, 2), (2, "stream", 40, 1)]  # the same steps for each store
    one, two = FeatureStore(tmp_path / "w" / "fsdd1x.h5"), FeatureStore(tmp_path / "w" / "fsdd2x.h5")
    assert sorted(two.ids) == sorted([f"{i}~r{k}" for i in one.ids for k in range(2)])
    assert np.array_equal(two.get(f"{one.ids[3]}~r1"), one[3])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_batches_arrive_on_the_device_pinned_on_cuda(fs, device):
    ref = next(iter(StreamLoader(_ds(fs, max_frames=9)).epoch(1)))
    ep = StreamLoader(_ds(fs, max_frames=9), device=device).epoch(1)
    assert ep.dl.pin_memory == (device == "cuda")
    b = next(iter(ep))
    assert {v.device.type for v in b.values()} == {device}
    assert all(torch.equal(b[k].cpu(), ref[k]) for k in ref)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_groups_fill_their_share_of_every_batch_rest_once(fs, world, workers):
    clean = np.arange(0, len(fs), 10)                           # 30 "clean" items, a quarter of each batch
    rest, counts, uses = collections.Counter(), [], collections.Counter()
    for r in range(world):
        ds = _ds(fs, groups=[(clean, 0.25)], rank=r, world=world, buffer_frames=4000)
        batches = list(StreamLoader(ds, num_workers=workers).epoch(0))
        counts.append(len(batches))
        for b in batches:
            idx = b["index"].numpy()
            g = np.isin(idx, clean)
            assert g.sum() == 4 and not g[:len(idx) - 4].any()  # the rest first, then the group's 4
            rest.update(idx[~g].tolist())
            uses.update(idx[g].tolist())
        assert len(batches) == len(ds) and ds.caps[0] + ds.caps[1] <= 4000
        if workers == 0:
            assert ds.counters["peak_frames"] <= 4000
    assert len(set(counts)) == 1
    assert sorted(rest) == sorted(set(range(len(fs))) - set(clean.tolist())) and set(rest.values()) == {1}
    assert set(uses) == set(clean.tolist()) and max(uses.values()) - min(uses.values()) <= 1  # cycled evenly


@pytest.mark.parametrize("workers", [0, 2])
def test_groups_that_fill_the_store_share_the_whole_batch_like_the_memory_path(fs, workers):
    from pllcli.training.data import epoch_batches
    every = np.arange(len(fs))                                   # a fully labelled store, --clean-share 0.25
    ds = _ds(fs, groups=[(every, 0.25)])
    batches = list(StreamLoader(ds, num_workers=workers).epoch(0))
    idx = np.concatenate([b["index"].numpy() for b in batches])
    mem = epoch_batches(every, np.diff(fs.offsets), 16, 0, 0, groups=[(every, 0.25)])
    assert sorted(idx.tolist()) == list(range(len(fs)))        # one pass, each item once, as in memory
    assert len(batches) == len(mem) == len(ds)
    assert sum(len(b["index"]) < 16 for b in batches) <= max(1, workers)  # a short last batch per worker
    clean, unl = np.arange(0, 100), np.arange(100, len(fs))      # two groups, nothing else: 1:3 of every batch
    ds = _ds(fs, groups=[(clean, 0.1), (unl, 0.3)])
    batches = list(StreamLoader(ds, num_workers=workers).epoch(0))
    for b in batches:
        i = b["index"].numpy()
        assert np.isin(i, clean).sum() == 4 and np.isin(i, unl).sum() == len(i) - 4
    assert sorted(np.concatenate([b["index"].numpy() for b in batches]).tolist()).count(150) == 1
    with pytest.raises(UsageError, match="--batch-size 2 is too small for 3 batch groups"):
        _ds(fs, batch_size=2, groups=[(np.arange(100), .2), (np.arange(100, 200), .2), (np.arange(200, 300), .2)])


def _two_views(mem, rows, epoch, number):
    rng = np.random.default_rng([0, epoch, number, 1])
    x, ln = mem.gather(np.arange(len(rows)), 6, rng, None, 0.5)
    x2, ln2 = mem.gather(np.arange(len(rows)), 6, rng, None, 0.5)
    return {"x": x, "lengths": ln, "x2": x2, "lengths2": ln2, "rows": torch.from_numpy(rows),
            "number": torch.tensor(number)}


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_fn_builds_batches_from_the_items_with_their_number(fs, workers):
    mem = InMemoryFeatures(*fs.load_all())
    batches = list(StreamLoader(_ds(fs, batch_fn=_two_views), num_workers=workers).epoch(4))
    assert [int(b["number"]) for b in batches] == list(range(len(batches)))
    for b in batches:
        rows = b["rows"].numpy()
        rng = np.random.default_rng([0, 4, int(b["number"]), 1])
        for k, n in (("x", "lengths"), ("x2", "lengths2")):
            x, ln = mem.gather(rows, 6, rng, None, 0.5)
            assert torch.equal(b[k], x) and torch.equal(b[n], ln)


def test_a_subset_of_rows_streams_each_selected_item_once(fs):
    rows = np.flatnonzero(np.arange(len(fs)) % 3 != 1)          # e.g. training rows without validation
    mem = InMemoryFeatures(*fs.load_all())
    ds = _ds(fs, rows=rows, crops=False)
    got = []
    for b in StreamLoader(ds).epoch(0):
        x, _ = mem.gather(b["index"].numpy())
        assert torch.equal(b["x"], x)
        got += b["index"].tolist()
    assert sorted(got) == rows.tolist()
    assert ds.counters["reads"] == len(ds.blocks) and ds.counters["frames_read"] <= fs.offsets[-1]


def test_store_features_work_under_chunk_view(fs):
    from pllcli.training.inference import chunk_view
    a, pa = chunk_view(st.StoreFeatures(fs), 7)
    b, pb = chunk_view(InMemoryFeatures(*fs.load_all()), 7)
    assert np.array_equal(pa, pb)
    rows = np.arange(0, len(pa), 5)
    assert all(torch.equal(u, v) for u, v in zip(a.gather(rows), b.gather(rows)))
