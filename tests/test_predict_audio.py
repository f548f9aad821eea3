"""`pllcli predict` on audio (a file, a folder, a manifest): featurized with the checkpoint's config."""
import csv

import numpy as np
import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def trained(tone_run):
    return tone_run("pa", [0.5], 12, 4, 0.01)


def _probs(path):
    with open(path) as f:
        return {r["id"]: (r["label"], float(r["prob"])) for r in csv.DictReader(f)}


def test_predict_on_a_file_a_folder_and_a_manifest_equals_the_store(trained, tmp_path):
    from pllcli.predict import predict
    d = trained
    ck = d / "run" / "last.pt"
    predict(ck, d / "f.h5", tmp_path / "store.csv", device="cpu")
    ref = _probs(tmp_path / "store.csv")
    s = predict(ck, d / "audio", tmp_path / "dir.csv", device="cpu")
    assert s["featurized"]["files_done"] == 12 and s["featurized"]["files_skipped"] == 0
    predict(ck, d / "audio.csv", tmp_path / "man.csv", device="cpu")
    for name in ("dir.csv", "man.csv"):
        got = _probs(tmp_path / name)
        assert set(got) == set(ref)  # directory scans use the file stem as the id
        for k, (lab, p) in ref.items():
            assert got[k][0] == lab and got[k][1] == pytest.approx(p, abs=1e-5)
    predict(ck, d / "audio" / "clip04.wav", tmp_path / "one.csv", device="cpu")
    one = _probs(tmp_path / "one.csv")
    assert list(one) == ["clip04"] and one["clip04"][0] == ref["clip04"][0]


def test_predict_on_audio_skips_bad_files_and_fails_cleanly(trained, tmp_path):
    d = trained
    bad = tmp_path / "audio"
    bad.mkdir()
    (bad / "good.wav").write_bytes((d / "audio" / "clip00.wav").read_bytes())
    (bad / "broken.wav").write_text("not audio at all")
    r = run_cli("predict", d / "run" / "last.pt", bad, "-o", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stderr and "broken.wav" in r.stderr
    assert list(_probs(tmp_path / "p.csv")) == ["good"]
    r = run_cli("predict", d / "run" / "last.pt", tmp_path / "nothing_here")
    assert r.returncode == 1 and "nothing_here" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
