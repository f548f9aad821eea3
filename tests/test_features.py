"""Feature config, frontends (vs independent references), audio decoding and the HDF5 store."""
from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sf = pytest.importorskip("soundfile")

from pllcli.errors import ConfigMismatchError, InputError, UsageError  # noqa: E402
from pllcli.features.config import PRESETS, FeatureConfig, check_compatible  # noqa: E402
from pllcli.features.store import (  # noqa: E402
    FeatureStore, FeatureStoreWriter, merge_feature_stores, write_feature_store,
)


def _tone(n, sr=8000, f=440.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


# ---------------------------------------------------------------- references

def _htk_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _numpy_logmel(x, c: FeatureConfig):
    """Independent reference: numpy framing + rfft + HTK triangular filters (float64)."""
    x = x.astype(np.float64)
    L = c.n_fft
    if len(x) < L:
        x = np.pad(x, (0, L - len(x)))
    T = 1 + (len(x) - L) // c.hop_length
    n = np.arange(c.win_length)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / c.win_length)  # periodic
    win = np.zeros(L)
    left = (L - c.win_length) // 2
    win[left:left + c.win_length] = hann
    frames = np.stack([x[t * c.hop_length:t * c.hop_length + L] * win for t in range(T)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (T, L/2+1)
    freqs = np.linspace(0, c.sample_rate / 2, L // 2 + 1)
    m = np.linspace(_htk_mel(c.fmin), _htk_mel(c.fmax_hz), c.n_mels + 2)
    hz = 700.0 * (10 ** (m / 2595.0) - 1.0)
    fb = np.zeros((L // 2 + 1, c.n_mels))
    for k in range(c.n_mels):
        lo, ce, hi = hz[k], hz[k + 1], hz[k + 2]
        up = (freqs - lo) / (ce - lo)
        down = (hi - freqs) / (hi - ce)
        fb[:, k] = np.maximum(0, np.minimum(up, down))
    return np.log(power @ fb + c.log_offset)


@pytest.mark.parametrize("preset", ["speech8k", "speech16k"])
def test_logmel_matches_numpy_reference(preset):
    c = FeatureConfig.preset(preset)
    x = _tone(c.sample_rate // 2 + 37, sr=c.sample_rate)
    got = c.make_frontend()(torch.from_numpy(x)[None])[0].numpy()
    ref = _numpy_logmel(x, c)
    assert got.shape == ref.shape == (c.num_frames(len(x)), c.n_mels)
    # float32 STFT vs float64: log-mel agrees to 1e-3 absolute (measured ~1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


def test_logmel_matches_torchaudio_melspectrogram():
    import torchaudio
    c = FeatureConfig.preset("speech8k")
    x = torch.from_numpy(_tone(3001))[None]
    ref = torchaudio.transforms.MelSpectrogram(
        c.sample_rate, n_fft=c.n_fft, win_length=c.win_length, hop_length=c.hop_length, f_min=c.fmin,
        f_max=c.fmax, n_mels=c.n_mels, center=False, power=2.0)(x)
    ref = torch.log(ref + c.log_offset).transpose(1, 2)
    torch.testing.assert_close(c.make_frontend()(x), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["fbank8k", "fbank16k"])
def test_fbank_matches_torchaudio_kaldi(preset):
    import torchaudio.compliance.kaldi as kaldi
    c = FeatureConfig.preset(preset)
    x = torch.from_numpy(_tone(int(c.sample_rate * 0.61), sr=c.sample_rate))[None]
    ref = kaldi.fbank(x, num_mel_bins=c.n_mels, frame_length=1000 * c.win_length / c.sample_rate,
                      frame_shift=1000 * c.hop_length / c.sample_rate, dither=0.0,
                      sample_frequency=c.sample_rate, low_freq=c.fmin, high_freq=c.fmax)
    got = c.make_frontend()(x)[0]
    assert got.shape == ref.shape == (c.num_frames(x.shape[1]), c.n_mels)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("preset", ["speech8k", "fbank8k"])
def test_batched_extraction_equals_one_at_a_time(preset):
    from pllcli.features.compute import compute_features
    from pllcli.features.np_frontend import build_np_frontend
    c = FeatureConfig.preset(preset)
    fe, nfe = c.make_frontend(), build_np_frontend(c)
    lens = [50, 512, 513, 592, 4000, 3999, 8000, 1234]
    waves = [_tone(n, seed=i) for i, n in enumerate(lens)]
    got = compute_features(waves, c, batch_samples=20000, max_items=3)
    for w, g in zip(waves, got):
        one = nfe(w[None])[0]
        assert g.shape == one.shape == (c.num_frames(len(w)), c.n_mels)
        np.testing.assert_array_equal(g, one)  # bitwise: batching must not change a clip's numbers
        ref = fe(torch.from_numpy(w)[None])[0].numpy()  # the torch frontend (export's definition)
        np.testing.assert_allclose(g, ref, atol=1e-4, rtol=0)
    if preset == "speech8k":  # frames = 1 + (S - n_fft) // hop, at least 1
        assert [g.shape[0] for g in got] == [1, 1, 1, 2, 44, 44, 94, 10]
    else:  # fbank frames use win_length 200
        assert [g.shape[0] for g in got] == [1, 4, 4, 5, 48, 48, 98, 13]


def test_stacked_features_equal_per_clip_list():
    from pllcli.features.compute import compute_features, stacked_features
    c = FeatureConfig.preset("speech8k")
    waves = [_tone(n, seed=i) for i, n in enumerate([700, 50, 3000])]
    feats, frames = stacked_features(waves, c)
    assert frames.tolist() == [c.num_frames(len(w)) for w in waves]
    np.testing.assert_array_equal(feats, np.concatenate(compute_features(waves, c)))
    assert stacked_features([], c)[0].shape == (0, c.n_mels) and compute_features([], c) == []


def test_parallel_run_reports_a_failing_worker():
    import multiprocessing as mp

    from pllcli.features import pool
    parent = os.getpid()
    started = mp.get_context("fork").Event()

    def fake_chunk(task):
        if os.getpid() != parent:
            started.set()
            raise ValueError(f"boom in chunk {task[0]}")
        assert started.wait(60)  # the parent leaves the worker a task, however loaded the machine
        return {"chunk": task[0]}

    with pytest.raises(RuntimeError, match="featurize worker failed") as e:
        pool.run_parallel([(k,) for k in range(50)], 2, fake_chunk, lambda res: None)
    assert str(e.value).startswith("featurize worker failed: ValueError: boom in chunk")
    assert "\n" not in str(e.value)  # one line for `error: ...` (the traceback goes to the debug log)
    assert _children() == []  # the workers are gone, and reaped (no zombie)


def _children() -> list[int]:
    """pids (zombies included) whose parent is this process."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                kids.append(int(d))
    return kids


def test_parallel_run_reports_a_killed_worker():
    import signal

    import multiprocessing as mp

    from pllcli.features import pool
    parent = os.getpid()
    started = mp.get_context("fork").Event()

    def fake_chunk(task):
        if os.getpid() != parent:
            started.set()
            os.kill(os.getpid(), signal.SIGKILL)
        assert started.wait(60)
        return {"chunk": task[0]}

    seen = []
    with pytest.raises(RuntimeError, match=f"featurize worker exited with code -{int(signal.SIGKILL)}"):
        pool.run_parallel([(k,) for k in range(50)], 2, fake_chunk, seen.append)
    assert len(seen) <= 49 and _children() == []  # the worker's task never came back


def test_parallel_run_returns_finished_workers_and_calls_idle():
    import multiprocessing as mp

    from pllcli.features import pool
    parent = os.getpid()
    ctx = mp.get_context("fork")
    in_task, go = ctx.Semaphore(0), ctx.Event()

    def fake_chunk(task):
        if os.getpid() != parent:  # each worker holds its first task until the parent is idle
            in_task.release()
            assert go.wait(60)
        else:
            for _ in range(0 if first else 2):  # the parent's first task waits for both workers
                assert in_task.acquire(timeout=60)
            first.append(task[0])
        return {"chunk": task[0], "pid": os.getpid(), "block": None}

    def on_idle():
        idle.append(1)
        go.set()

    seen, idle, first = [], [], []
    pids = pool.run_parallel([(k,) for k in range(40)], 3, fake_chunk, seen.append, idle=on_idle)
    assert sorted(r["chunk"] for r in seen) == list(range(40))  # each task once
    assert len({r["pid"] for r in seen}) == 3 and len(pids) == 2
    assert idle == [1]
    pool.finish_workers(pids)
    assert _children() == []


def test_no_empty_mel_filters_in_presets():
    for name in PRESETS:
        fe = FeatureConfig.preset(name).make_frontend()
        assert (fe.fb.sum(0) > 0).all(), name


# ---------------------------------------------------------------- config

def test_config_roundtrip_hash_and_overrides():
    c = FeatureConfig.preset("speech8k")
    assert FeatureConfig.from_dict(c.to_dict()) == c
    assert FeatureConfig.from_dict(c.to_json()) == c
    assert re.fullmatch(r"[0-9a-f]{16}", c.hash())
    assert c.hash() == FeatureConfig.preset("speech8k").hash()
    assert c.replace(dtype="float16").hash() == c.hash()       # storage dtype is not semantic
    assert c.replace(n_mels=40).hash() != c.hash()
    c2 = FeatureConfig.preset("speech8k", n_mels=40, hop_length=None)
    assert (c2.n_mels, c2.hop_length) == (40, 80)
    assert c.num_frames(512) == 1 and c.num_frames(592) == 2 and c.num_frames(10) == 1


def test_config_errors():
    with pytest.raises(UsageError, match="unknown feature preset"):
        FeatureConfig.preset("nope")
    with pytest.raises(UsageError, match="fmax"):
        FeatureConfig.preset("speech8k", fmax=6000.0)
    with pytest.raises(UsageError, match="win_length 600 > n_fft 512"):
        FeatureConfig.preset("speech8k", win_length=600)
    with pytest.raises(UsageError, match="power of two"):
        FeatureConfig.preset("fbank8k", n_fft=512)
    with pytest.raises(ConfigMismatchError, match="unknown feature config field"):
        FeatureConfig.from_dict({"n_mel": 3})


def test_check_compatible_names_fields():
    a = FeatureConfig.preset("speech8k")
    check_compatible(a, a.to_dict(), "x")
    check_compatible(a, a.replace(dtype="float16"), "x")
    with pytest.raises(ConfigMismatchError) as e:
        check_compatible(a, a.replace(n_mels=40, hop_length=160), "store s.h5 vs model m.pt")
    msg = str(e.value)
    assert "store s.h5 vs model m.pt" in msg and "n_mels expected 64 got 40" in msg and "hop_length" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- audio

@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT", "PCM_U8"])
def test_wav_decoding_equals_soundfile(tmp_path, subtype):
    from pllcli.audio import load_audio
    x = np.stack([_tone(1000), _tone(1000, seed=1)], 1) * 0.5
    p = tmp_path / "a.wav"
    sf.write(p, x, 8000, subtype=subtype)
    ref = sf.read(p, dtype="float32")[0].mean(1)
    a = load_audio(p, 8000)
    np.testing.assert_array_equal(a.samples, ref.astype(np.float32))
    assert (a.orig_channels, a.duration) == (2, 1000 / 8000)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_32", "FLOAT", "PCM_24"])
def test_mono_wav_decoding_equals_soundfile_and_checks(tmp_path, subtype):
    from pllcli.audio import AudioSkip, load_audio
    x = _tone(1000) * 0.5
    p = tmp_path / "a.wav"
    sf.write(p, x, 8000, subtype=subtype)
    a = load_audio(p, 8000)
    np.testing.assert_array_equal(a.samples, sf.read(p, dtype="float32")[0])
    assert a.samples.dtype == np.float32 and a.samples.flags.c_contiguous and a.samples.flags.writeable
    assert (a.orig_channels, a.duration, a.silent) == (1, 1000 / 8000, False)
    sf.write(p, np.zeros(800), 8000, subtype=subtype)
    assert load_audio(p, 8000).silent
    if subtype == "FLOAT":  # only float files can hold NaN/inf; integer PCM skips the check
        x[3] = np.inf
        sf.write(p, x, 8000, subtype=subtype)
        with pytest.raises(AudioSkip) as e:
            load_audio(p, 8000)
        assert e.value.reason == "non_finite" and e.value.detail == "1 NaN/inf sample(s)"
    with pytest.raises(AudioSkip) as e:
        load_audio(tmp_path, 8000)
    assert e.value.reason == "not_audio"


def test_manifest_rows_blank_lines_padding_and_line_numbers(tmp_path):
    from pllcli.features.inputs import read_manifest
    m = tmp_path / "m.tsv"
    m.write_text("id\tpath\tspk\n\n a \t x.wav \t s1\n\t\t\nb\t/abs/y.wav\n")
    items, cols = read_manifest(str(m))
    assert cols == ["spk"]
    assert [(it.id, it.path, it.line, it.meta) for it in items] == [
        ("a", str(tmp_path / "x.wav"), 3, {"spk": "s1"}), ("b", "/abs/y.wav", 5, {"spk": ""})]
    m = tmp_path / "m.csv"
    m.write_text("id,path\na,x.wav\n\nb,y.wav,extra\n")
    with pytest.raises(InputError, match="3 fields, header has 2") as e:
        read_manifest(str(m))
    assert ":4" in str(e.value)
    m.write_text("id,path\na,x.wav\n,y.wav\n")
    with pytest.raises(InputError, match="empty id") as e:
        read_manifest(str(m))
    assert ":3" in str(e.value)
    j = tmp_path / "m.jsonl"
    j.write_text('{"id": "a", "path": "x.wav", "n": 3}\n\n{"id": "b", "path": "y.wav"}\n')
    items, cols = read_manifest(str(j))
    assert cols == ["n"] and [(it.id, it.line, it.meta) for it in items] == [("a", 1, {"n": "3"}), ("b", 3, {"n": ""})]


def test_resample_matches_torchaudio_and_is_cached(tmp_path):
    import torchaudio.functional as AF

    import pllcli.audio as A
    x = _tone(4410, sr=44100)
    sf.write(tmp_path / "a.flac", x, 44100)
    a = A.load_audio(tmp_path / "a.flac", 8000)
    ref = AF.resample(torch.from_numpy(sf.read(tmp_path / "a.flac", dtype="float32")[0])[None], 44100, 8000)[0]
    np.testing.assert_allclose(a.samples, ref.numpy(), atol=1e-5)
    assert len(a.samples) == 800 and (44100, 8000) in A._RESAMPLERS
    k = A._RESAMPLERS[(44100, 8000)]
    A.load_audio(tmp_path / "a.flac", 8000)
    assert A._RESAMPLERS[(44100, 8000)] is k


# ---------------------------------------------------------------- store

def _items(n, F=64, seed=0, prefix="u"):
    rng = np.random.default_rng(seed)
    return [dict(id=f"{prefix}{i}", features=rng.standard_normal((1 + (7 * i) % 13, F)).astype(np.float32),
                 duration=0.01 * (i + 1), path=f"/a/{i}.wav", meta={"speaker": f"s{i % 3}"}) for i in range(n)]


def test_store_roundtrip_random_access_load_all(tmp_path):
    c = FeatureConfig.preset("speech8k")
    items = _items(20)
    p = write_feature_store(tmp_path / "s.h5", c, items, ["speaker"])
    fs = FeatureStore(p)
    assert len(fs) == 20 and isinstance(fs.ids, np.ndarray) and isinstance(fs.offsets, np.ndarray)
    assert fs.offsets.dtype == np.int64 and list(fs.ids[:3]) == ["u0", "u1", "u2"]
    for i in (0, 7, 19):
        np.testing.assert_array_equal(fs[i], items[i]["features"])
        np.testing.assert_array_equal(fs.get(f"u{i}"), items[i]["features"])
        assert fs.index(f"u{i}") == i
    np.testing.assert_array_equal(fs.indices(["u5", "u12", "u0"]), [5, 12, 0])
    with pytest.raises(KeyError):
        fs.index("nope")
    with pytest.raises(IndexError):
        fs[20]
    feats, offsets = fs.load_all()
    assert feats.shape == (sum(len(it["features"]) for it in items), 64)
    np.testing.assert_array_equal(feats[offsets[3]:offsets[4]], items[3]["features"])
    np.testing.assert_array_equal(fs.num_frames, [len(it["features"]) for it in items])
    np.testing.assert_allclose(fs.durations, [it["duration"] for it in items], rtol=1e-6)
    assert list(fs.meta("speaker")[:4]) == ["s0", "s1", "s2", "s0"]
    with pytest.raises(InputError, match="no metadata column 'spk'"):
        fs.meta("spk")
    assert fs.config == c and fs.config_hash == c.hash()
    assert fs.attrs["format"] == "pllcli-features" and fs.attrs["n_mels"] == 64
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_writer_blocks_equal_item_by_item(tmp_path, monkeypatch):
    """add_blocks writes features at once and gathers the per-item columns; the store must
    be the same as writing item by item, across several column flushes and an empty block."""
    import pllcli.features.store as S
    monkeypatch.setattr(S, "COLUMN_ITEMS", 7)
    c = FeatureConfig.preset("speech8k")
    items = _items(23)
    ref = write_feature_store(tmp_path / "ref.h5", c, items, ["speaker"])

    def block(its):
        return ([it["id"] for it in its], np.concatenate([it["features"] for it in its]) if its else
                np.zeros((0, 64), np.float32), np.array([len(it["features"]) for it in its], np.int64),
                np.array([it["duration"] for it in its]), np.array([it["path"] for it in its]),
                {"speaker": np.array([it["meta"]["speaker"] for it in its])})

    with FeatureStoreWriter(tmp_path / "b.h5", c, ["speaker"]) as w:
        w.add_blocks([block(items[:5]), block([]), block(items[5:6])])
        w.add_block(*block(items[6:17]))
        for it in items[17:20]:
            w.add(it["id"], it["features"], it["duration"], it["path"], it["meta"])
        w.add_blocks([block(items[20:])])
        with pytest.raises(ValueError, match="features block must be"):
            w.add_blocks([block(items[:2])[:1] + (np.zeros((3, 64), np.float32),) + block(items[:2])[2:]])
    a, b = FeatureStore(ref), FeatureStore(tmp_path / "b.h5")
    assert list(a.ids) == list(b.ids) and list(a.paths) == list(b.paths)
    for name in ("offsets", "num_frames", "durations"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.load_all()[0], b.load_all()[0])
    assert list(a.meta("speaker")) == list(b.meta("speaker")) and b.attrs["num_items"] == 23


def test_chunk_bounds_cover_the_input_and_shrink_at_the_end():
    from pllcli.features.inputs import MIN_TAIL_CHUNK, chunk_bounds
    assert [b - a for a, b in chunk_bounds(3000, 256)] == [256] * 10 + [147, 98, 65, 44, 29, 19, 16, 22]
    assert chunk_bounds(0, 4) == [] and chunk_bounds(5, 256) == [(0, 5)]
    assert [b - a for a, b in chunk_bounds(8, 2)] == [2, 2, 2, 2]  # no piece below a small chunk size
    for n in (1, 2, 17, 100, 513, 1000, 12345):
        for size in (1, 3, 16, 64, 256):
            b = chunk_bounds(n, size)
            assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
            sizes = [y - x for x, y in b]
            assert max(sizes) <= size and min(sizes) >= 1
            full = max(0, -(-(n - 2 * size) // size))  # chunks before the last 2 x size items
            assert sizes[:full] == [size] * full and sum(sizes[full:]) <= 2 * size
            tail = sizes[full:]
            assert all(s >= min(size, MIN_TAIL_CHUNK) for s in tail[:-1])
            assert all(x >= y for x, y in zip(tail[:-2], tail[1:-1]))  # shrinking (the last may take a crumb)


def test_part_records_read_without_copy_equal_numpy(tmp_path):
    from pllcli.features.journal import load_part as _load_part
    from pllcli.features.journal import map_records as _map_records
    arrays = [np.frombuffer(b'{"meta_columns": []}', np.uint8), np.array(["a", "bcd"]),
              np.arange(12, dtype=np.float32).reshape(4, 3), np.zeros((0, 64), np.float16),
              np.array([3, 1], np.int64), np.array(2.5), np.array(["x" * 300])]
    p = tmp_path / "part.npys"
    with open(p, "wb") as f:
        for a in arrays:
            np.lib.format.write_array(f, a, allow_pickle=False)
    got = _map_records(p)
    assert len(got) == len(arrays)
    for a, g in zip(arrays, got):
        assert g.dtype == a.dtype and g.shape == a.shape and np.array_equal(g, a)
        assert not g.flags.writeable  # a view of the mapped file
    # other header layouts numpy writes: big-endian is read, fortran order refused
    with open(tmp_path / "f.npys", "wb") as f:
        np.lib.format.write_array(f, np.arange(6, dtype=">i4").reshape(2, 3))
    assert _map_records(tmp_path / "f.npys")[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    with open(tmp_path / "g.npys", "wb") as f:
        np.lib.format.write_array(f, np.asfortranarray(np.ones((2, 3))))
    with pytest.raises(ValueError, match="unexpected record layout"):
        _map_records(tmp_path / "g.npys")
    data = p.read_bytes()
    (tmp_path / "cut.npys").write_bytes(data[:-5])
    (tmp_path / "empty.npys").write_bytes(b"")
    for bad in ("cut.npys", "empty.npys"):
        with pytest.raises(ValueError):
            _map_records(tmp_path / bad)
        assert _load_part(tmp_path / bad) is None  # a damaged part is redone


def test_store_reopens_after_pid_change_and_pickles(tmp_path):
    p = write_feature_store(tmp_path / "s.h5", FeatureConfig.preset("speech8k"), _items(5))
    fs = FeatureStore(p)
    a = fs[2]
    h = fs._h5
    fs._pid = -1  # as seen from a forked worker
    np.testing.assert_array_equal(fs[2], a)
    assert fs._h5 is not h
    fs2 = pickle.loads(pickle.dumps(fs))
    assert fs2._h5 is None
    np.testing.assert_array_equal(fs2.get("u2"), a)


def test_store_in_dataloader_workers(tmp_path):
    p = write_feature_store(tmp_path / "s.h5", FeatureConfig.preset("speech8k"), _items(8))
    fs = FeatureStore(p)
    fs[0]  # open in the parent first: workers must not share this handle

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(fs)

        def __getitem__(self, i):
            return torch.tensor([float(fs[i].sum()), float(os.getpid())])

    out = torch.cat(list(torch.utils.data.DataLoader(DS(), batch_size=4, num_workers=2)))
    np.testing.assert_allclose(out[:, 0].numpy(), [fs[i].sum() for i in range(8)], rtol=1e-5)
    assert os.getpid() not in set(out[:, 1].int().tolist())


def test_store_float16(tmp_path):
    c = FeatureConfig.preset("speech8k", dtype="float16")
    items = _items(4)
    fs = FeatureStore(write_feature_store(tmp_path / "h.h5", c, items))
    assert fs.dtype == "float16" and fs[1].dtype == np.float32
    np.testing.assert_allclose(fs[1], items[1]["features"], atol=2e-3)
    assert fs.load_all(dtype=None)[0].dtype == np.float16


def test_writer_discards_tmp_on_error(tmp_path):
    c = FeatureConfig.preset("speech8k")
    with pytest.raises(ValueError, match="features must be"):
        with FeatureStoreWriter(tmp_path / "x.h5", c) as w:
            w.add("a", np.zeros((3, 64)), 0.1)
            w.add("b", np.zeros((3, 10)), 0.1)
    assert list(tmp_path.iterdir()) == []


def test_reader_rejects_other_files(tmp_path):
    import h5py
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f.attrs["format"] = "pllcli-labels"
    with pytest.raises(InputError, match="this is a label store; pass it with --labels"):
        FeatureStore(tmp_path / "o.h5")
    with h5py.File(tmp_path / "q.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(InputError, match="not a pllcli feature store"):
        FeatureStore(tmp_path / "q.h5")
    (tmp_path / "t.h5").write_text("hello")
    with pytest.raises(InputError, match="t.h5: not a readable feature store"):
        FeatureStore(tmp_path / "t.h5")
    with pytest.raises(InputError, match="no such file"):
        FeatureStore(tmp_path / "missing.h5")


def test_merge_orders_shards_and_checks(tmp_path):
    c = FeatureConfig.preset("speech8k")
    items = _items(9)
    single = FeatureStore(write_feature_store(tmp_path / "all.h5", c, items, ["speaker"]))
    for i, sl in enumerate([slice(0, 3), slice(3, 6), slice(6, 9)]):
        write_feature_store(tmp_path / f"p{i}.h5", c, items[sl], ["speaker"], attrs={"shard": f"{i}/3"})
    m = FeatureStore(merge_feature_stores(tmp_path / "m.h5", [tmp_path / f"p{i}.h5" for i in (2, 0, 1)]))
    np.testing.assert_array_equal(m.ids, single.ids)
    np.testing.assert_array_equal(m.offsets, single.offsets)
    np.testing.assert_array_equal(m.load_all()[0], single.load_all()[0])
    np.testing.assert_array_equal(m.meta("speaker"), single.meta("speaker"))
    assert "shard" not in m.attrs
    with pytest.raises(InputError, match="missing shard"):
        merge_feature_stores(tmp_path / "x.h5", [tmp_path / "p0.h5", tmp_path / "p1.h5"])
    with pytest.raises(InputError, match="occur in more than one part"):
        merge_feature_stores(tmp_path / "x.h5", [tmp_path / "all.h5", tmp_path / "all.h5"])
    # parts with different metadata columns: union, empty where a part lacks a column
    other = [dict(it, id=f"v{k}", meta={"time": str(k)}) for k, it in enumerate(_items(2, seed=1))]
    write_feature_store(tmp_path / "t.h5", c, other, ["time"])
    u = FeatureStore(merge_feature_stores(tmp_path / "u.h5", [tmp_path / "all.h5", tmp_path / "t.h5"]))
    assert u.meta_columns == ["speaker", "time"] and len(u) == 11
    assert list(u.meta("speaker"))[-3:] == ["s2", "", ""] and list(u.meta("time"))[-3:] == ["", "0", "1"]
    write_feature_store(tmp_path / "o.h5", c.replace(n_mels=40), [], ["speaker"])
    with pytest.raises(ConfigMismatchError, match="n_mels"):
        merge_feature_stores(tmp_path / "x.h5", [tmp_path / "all.h5", tmp_path / "o.h5"])
    assert not (tmp_path / "x.h5").exists()


def test_docs_h5py_snippet(tmp_path, monkeypatch, capsys):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "feature_store.md").read_text()
    m = re.search(r"<!-- snippet:read-one -->\s*```python\n(.*?)```", doc, re.S)
    assert m, "snippet markers missing from docs/feature_store.md"
    c = FeatureConfig.preset("speech8k")
    items = _items(3)
    items[1]["id"] = "0_jackson_0"
    write_feature_store(tmp_path / "features.h5", c, items)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(m.group(1), "feature_store.md", "exec"), ns)
    np.testing.assert_array_equal(ns["x"], items[1]["features"])
    assert "0_jackson_0 (8, 64) logmel 8000" in capsys.readouterr().out
    assert math.isfinite(float(ns["x"].sum()))


def test_docs_kaldi_style_snippet(tmp_path, monkeypatch):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "feature_store.md").read_text()
    m = re.search(r"<!-- snippet:kaldi-style -->\s*```python\n(.*?)```", doc, re.S)
    assert m, "snippet markers missing from docs/feature_store.md"
    c = FeatureConfig.preset("speech8k")
    items = _items(3)
    write_feature_store(tmp_path / "features.h5", c, items, ["speaker"])
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(m.group(1), "feature_store.md", "exec"), ns)
    got = list(ns["pllcli_utterances"]("features.h5"))
    assert [u for u, _, _ in got] == [it["id"] for it in items]
    for (_, x, meta), it in zip(got, items):
        np.testing.assert_array_equal(x, it["features"])
        assert meta == {"speaker": it["meta"]["speaker"]}
    assert ns["frame_shift"] == c.hop_length / c.sample_rate
    assert ns["utt2spk"] == {it["id"]: it["meta"]["speaker"] for it in items}


@pytest.mark.parametrize("preset", ["speech8k", "fbank8k"])
def test_export_mode_matches_fft_path(preset):
    fe = FeatureConfig.preset(preset).make_frontend()
    x = torch.from_numpy(np.stack([_tone(4000, seed=1), _tone(4000, seed=2)]))
    ref = fe(x)
    fe.export_mode = True
    got = fe(x)
    assert got.shape == ref.shape
    # DFT-as-matmul vs FFT in float32: log values agree to 1e-3 (measured < 1e-4)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_frontend_exports_to_onnx_with_dynamic_length(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    fe = FeatureConfig.preset("speech8k").make_frontend()
    x = torch.from_numpy(np.stack([_tone(4000, seed=1)] * 2))
    torch.onnx.export(fe, (x,), str(tmp_path / "fe.onnx"), opset_version=17, dynamo=False, input_names=["wav"],
                      output_names=["feat"], dynamic_axes={"wav": {0: "B", 1: "S"}, "feat": {0: "B", 1: "T"}})
    assert fe.export_mode is False  # the switch was only active during export
    sess = ort.InferenceSession(str(tmp_path / "fe.onnx"))
    x2 = np.stack([_tone(6001, seed=3)] * 3)
    got = sess.run(None, {"wav": x2})[0]
    ref = fe(torch.from_numpy(x2)).numpy()
    assert got.shape == ref.shape == (3, FeatureConfig.preset("speech8k").num_frames(6001), 64)
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_store_tmp_file_is_created_exclusively(tmp_path, monkeypatch):
    """The writer's tmp file is made with O_EXCL (never an existing file reopened with O_TRUNC,
    which on ext4 forces a writeback of the whole store at close): a taken name is skipped and
    left untouched, the new file is private (0600) until it is renamed into place."""
    import os
    import secrets

    import h5py

    from pllcli.features.store import _create_new_h5
    taken = tmp_path / ".s.h5.aaaa.tmp"
    taken.write_bytes(b"someone else's file")
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    path, f = _create_new_h5(h5py, tmp_path, ".s.h5.")
    f.close()
    assert path.name == ".s.h5.bbbb.tmp" and taken.read_bytes() == b"someone else's file"
    assert os.stat(path).st_mode & 0o777 == 0o600
