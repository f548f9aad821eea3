"""featurize reads Kaldi data directories and lhotse manifests directly (issue 18, item 6)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

from pllcli.cli.app import app  # noqa: E402
from pllcli.cli.errors import run_app  # noqa: E402
from pllcli.features.config import FeatureConfig  # noqa: E402
from pllcli.features.store import FeatureStore  # noqa: E402

SR = 8000


def cli(*args):
    return run_app(app, [str(a) for a in args])


def _wave(n, seed):
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (300 + 40 * seed) * np.arange(n) / SR)
            + 0.02 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture
def audio(tmp_path):
    """Two recordings (2 s and 3 s, 8 kHz PCM16) in tmp/wav."""
    d = tmp_path / "wav"
    d.mkdir()
    for name, n, seed in (("ra", 2 * SR, 1), ("rb", 3 * SR, 2)):
        sf.write(d / f"{name}.wav", _wave(n, seed), SR, subtype="PCM_16")
    return d


def _expected(path, onset, offset):
    """The frontend on the [onset, offset) samples of the decoded file."""
    x = sf.read(path, dtype="float32")[0]
    x = x[int(round(onset * SR)):None if offset is None else int(round(offset * SR))]
    from pllcli.features.np_frontend import build_np_frontend  # what featurize computes (bitwise)
    return build_np_frontend(FeatureConfig.preset("speech8k"))(x[None])[0]


def test_kaldi_dir_segments_speakers_text(tmp_path, audio):
    k = tmp_path / "data" / "train"
    k.mkdir(parents=True)
    (k / "wav.scp").write_text(f"ra {audio / 'ra.wav'}\nrb ../../wav/rb.wav\n")  # relative to the data dir
    (k / "segments").write_text("u1 ra 0.25 1.0\nu2 ra 1.0 -1\nu3 rb 0.5 2.75\n")
    (k / "utt2spk").write_text("u1 alice\nu2 bob\nu3 alice\n")
    (k / "text").write_text("u1 hello there\nu2 two\nu3 three words here\n")
    out = tmp_path / "k.h5"
    assert cli("featurize", k, "-o", out, "--chunk-size", "2") == 0
    fs = FeatureStore(out)
    assert list(fs.ids) == ["u1", "u2", "u3"]
    assert list(fs.meta("speaker")) == ["alice", "bob", "alice"]
    assert list(fs.meta("text")) == ["hello there", "two", "three words here"]
    assert list(fs.meta("recording")) == ["ra", "ra", "rb"]
    assert list(fs.meta("onset")) == ["0.25", "1.0", "0.5"] and list(fs.meta("offset")) == ["1.0", "", "2.75"]
    np.testing.assert_allclose(fs.durations, [0.75, 1.0, 2.25])
    for i, (rec, on, off) in enumerate([("ra", 0.25, 1.0), ("ra", 1.0, None), ("rb", 0.5, 2.75)]):
        np.testing.assert_array_equal(fs[i], _expected(audio / f"{rec}.wav", on, off))
    # without segments: one item per recording, no segment columns
    (k / "segments").unlink()
    (k / "utt2spk").write_text("ra alice\nrb bob\n")
    (k / "text").unlink()
    assert cli("featurize", k, "-o", tmp_path / "r.h5") == 0
    fr = FeatureStore(tmp_path / "r.h5")
    assert list(fr.ids) == ["ra", "rb"] and fr.meta_columns == ["speaker"]
    np.testing.assert_allclose(fr.durations, [2.0, 3.0])


def test_kaldi_pipes_and_bad_lines_are_refused(tmp_path, audio, capsys):
    k = tmp_path / "k"
    k.mkdir()
    (k / "wav.scp").write_text(f"ra {audio / 'ra.wav'}\nrb sox {audio / 'rb.wav'} -t wav - |\n")
    assert cli("featurize", k, "-o", tmp_path / "o.h5") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {k / 'wav.scp'}:2: pipe commands in wav.scp are not supported"), err
    (k / "wav.scp").write_text(f"ra {audio / 'ra.wav'}\n")
    (k / "segments").write_text("u1 ra 0 1\nu2 rz 0 1\n")
    assert cli("featurize", k, "-o", tmp_path / "o.h5") == 1
    assert f"{k / 'segments'}:2: recording 'rz' is not in wav.scp" in capsys.readouterr().err
    (k / "segments").write_text("u1 ra 0 1\nu2 ra 5 6\n")  # past the end of the file: a per-item skip
    rep = tmp_path / "r.json"
    assert cli("featurize", k, "-o", tmp_path / "o.h5", "--json", rep) == 0
    r = json.loads(rep.read_text())
    assert r["files_done"] == 1 and [(s["id"], s["reason"]) for s in r["skipped"]] == [("u2", "no_samples")]


def _write_jsonl(path, objs):
    text = "".join(json.dumps(o) + "\n" for o in objs)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def _rec(rid, path, n):
    return {"id": rid, "sources": [{"type": "file", "channels": [0], "source": path}], "sampling_rate": SR,
            "num_samples": n, "duration": n / SR, "channel_ids": [0]}


def test_lhotse_manifests_written_by_hand(tmp_path, audio, capsys):
    m = tmp_path / "m"
    m.mkdir()
    recs = [_rec("ra", "../wav/ra.wav", 2 * SR), _rec("rb", str(audio / "rb.wav"), 3 * SR)]
    _write_jsonl(m / "recordings.jsonl.gz", recs)
    assert cli("featurize", m / "recordings.jsonl.gz", "-o", tmp_path / "r.h5") == 0
    assert list(FeatureStore(tmp_path / "r.h5").ids) == ["ra", "rb"]
    sups = [{"id": "s1", "recording_id": "rb", "start": 0.5, "duration": 1.0, "channel": 0, "text": "hi",
             "speaker": "sp1"},
            {"id": "s2", "recording_id": "ra", "start": 0.0, "duration": 0.5, "channel": 0}]
    _write_jsonl(m / "supervisions.jsonl.gz", sups)
    assert cli("featurize", m, "-o", tmp_path / "s.h5") == 0  # the folder: recordings + supervisions
    fs = FeatureStore(tmp_path / "s.h5")
    assert list(fs.ids) == ["s1", "s2"] and list(fs.meta("speaker")) == ["sp1", ""]
    assert list(fs.meta("text")) == ["hi", ""] and list(fs.meta("recording")) == ["rb", "ra"]
    np.testing.assert_array_equal(fs.get("s1"), _expected(audio / "rb.wav", 0.5, 1.5))
    capsys.readouterr()
    assert cli("featurize", m / "supervisions.jsonl.gz", "-o", tmp_path / "x.h5") == 1
    assert "needs its recordings" in capsys.readouterr().err
    _write_jsonl(m / "bad_recordings.jsonl", [{**recs[0], "sources": [{"type": "url", "source": "http://x"}]}])
    assert cli("featurize", m / "bad_recordings.jsonl", "-o", tmp_path / "x.h5") == 1
    assert "source type 'url' is not supported" in capsys.readouterr().err


def test_lhotse_manifests_written_by_lhotse(tmp_path, audio):
    lhotse = pytest.importorskip("lhotse")
    recs = lhotse.RecordingSet.from_recordings(
        [lhotse.Recording.from_file(audio / "ra.wav"), lhotse.Recording.from_file(audio / "rb.wav")])
    sups = lhotse.SupervisionSet.from_segments([
        lhotse.SupervisionSegment(id="u1", recording_id="ra", start=0.2, duration=1.3, channel=0, text="one",
                                  speaker="alice"),
        lhotse.SupervisionSegment(id="u2", recording_id="rb", start=1.0, duration=1.5, channel=0, text="two",
                                  speaker="bob")])
    d = tmp_path / "lh"
    d.mkdir()
    recs.to_file(d / "corpus_recordings_train.jsonl.gz")
    sups.to_file(d / "corpus_supervisions_train.jsonl.gz")
    cuts = lhotse.CutSet.from_manifests(recordings=recs, supervisions=sups).trim_to_supervisions()
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    assert cli("featurize", d, "-o", tmp_path / "s.h5") == 0
    assert cli("featurize", tmp_path / "cuts.jsonl.gz", "-o", tmp_path / "c.h5") == 0
    s, c = FeatureStore(tmp_path / "s.h5"), FeatureStore(tmp_path / "c.h5")
    for fs in (s, c):
        assert list(fs.ids) == ["u1", "u2"]
        assert list(fs.meta("speaker")) == ["alice", "bob"] and list(fs.meta("text")) == ["one", "two"]
        np.testing.assert_allclose(fs.durations, [1.3, 1.5], atol=1e-6)
        np.testing.assert_array_equal(fs.get("u2"), _expected(audio / "rb.wav", 1.0, 2.5))
    np.testing.assert_array_equal(s.load_all()[0], c.load_all()[0])


def test_lhotse_entries_with_missing_fields_name_the_line(tmp_path, audio, capsys):
    _write_jsonl(tmp_path / "cuts.jsonl", [
        {"id": "c1", "start": 0.0, "duration": 0.5, "recording": _rec("ra", str(audio / "ra.wav"), 2 * SR)},
        {"id": "c2", "start": 0.0, "recording": _rec("ra", str(audio / "ra.wav"), 2 * SR)}])
    assert cli("featurize", tmp_path / "cuts.jsonl", "-o", tmp_path / "o.h5") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'cuts.jsonl'}:2: not a lhotse cuts entry (missing or bad field 'duration')"
    # a folder of audio with a file merely named *recordings*.jsonl is still scanned as audio
    (audio / "recordings_notes.jsonl").write_text('{"note": "not lhotse"}\n')
    assert cli("featurize", audio, "-o", tmp_path / "d.h5") == 0
    assert list(FeatureStore(tmp_path / "d.h5").ids) == ["ra", "rb"]
