"""Outputs (issue 14 items 3, 4, 6; issue 18 items 3, 4): refused output paths, umask-honouring
atomic writes, NaN features in predict, empty vocabularies, unknown model names, the
build-candidates grammar and table, and the export warning filter."""
import csv
import json
import os
import stat

import numpy as np
import pytest

from tests.conftest import run_cli

torch = pytest.importorskip("torch")

CLASSES = ["low", "mid", "high"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny untrained checkpoint and a matching feature store (item 'b' holds a NaN)."""
    from pllcli.checkpoint import save_checkpoint
    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import write_feature_store
    from pllcli.models import build_model
    d = tmp_path_factory.mktemp("outputs")
    cfg = FeatureConfig.preset("speech8k", n_mels=16)
    torch.manual_seed(0)
    m = build_model("convgru", cfg.n_mels, len(CLASSES), width=4, rnn_hidden=8, proj=16).eval()
    save_checkpoint(d / "m.pt", m, {"kind": "classifier", "classes": CLASSES, "task": "single",
                                    "feature_config": cfg.to_dict(), "feature_config_hash": cfg.hash()})
    rng = np.random.default_rng(0)
    items = [{"id": i, "features": rng.normal(size=(20 + 5 * k, 16)).astype(np.float32), "duration": 0.3}
             for k, i in enumerate("abcd")]
    write_feature_store(d / "f.h5", cfg, items)
    items[1]["features"][7, 3] = np.nan
    items[3]["features"][0, 0] = np.inf
    write_feature_store(d / "nan.h5", cfg, items)
    return d


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- refused outputs (issue 14 item 3)

def test_predict_refuses_a_feature_store_as_output_and_keeps_it(art, tmp_path):
    target = tmp_path / "features.h5"
    target.write_bytes((art / "f.h5").read_bytes())
    before = target.read_bytes()
    for out in (target, art / "f.h5"):
        r = run_cli("predict", art / "m.pt", art / "f.h5", "-o", out, "--device", "cpu")
        assert r.returncode == 2, r.stderr
        assert ".csv" in r.stderr and ".jsonl" in r.stderr and str(out.name) in r.stderr
    events = tmp_path / "events.tsv"  # the events output is no feature store either
    events.write_bytes(before)
    r = run_cli("predict", art / "m.pt", art / "f.h5", "-o", tmp_path / "p.csv", "--events", events,
                "--device", "cpu")
    assert r.returncode == 2 and "HDF5" in r.stderr and "--overwrite" in r.stderr
    assert target.read_bytes() == before == events.read_bytes() and not (tmp_path / "p.csv").exists()


def test_predict_replaces_only_its_own_kind_without_overwrite(art, tmp_path):
    manifest = tmp_path / "clips.csv"
    manifest.write_text("id,path\na,a.wav\n")
    r = run_cli("predict", art / "m.pt", art / "f.h5", "-o", manifest, "--device", "cpu")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "predictions" in r.stderr
    assert manifest.read_text() == "id,path\na,a.wav\n"
    r = run_cli("predict", art / "m.pt", art / "f.h5", "-o", manifest, "--overwrite", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert manifest.read_text().startswith("id,label,prob")
    # an existing predictions table (CSV or JSONL) is replaced as before
    r = run_cli("predict", art / "m.pt", art / "f.h5", "-o", manifest, "-k", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert manifest.read_text().startswith("id,label,prob,label_2,prob_2")
    assert f"wrote 4 predictions to {manifest}" in r.stdout
    jl = tmp_path / "p.jsonl"
    for _ in range(2):
        r = run_cli("predict", art / "m.pt", art / "f.h5", "--output", jl, "--device", "cpu")
        assert r.returncode == 0, r.stderr


def test_predict_old_out_spelling_still_works_with_a_warning(art, tmp_path):
    r = run_cli("predict", art / "m.pt", art / "f.h5", "--out", tmp_path / "p.csv", "--device", "cpu",
                "--chunk", "0")
    assert r.returncode == 0, r.stderr
    assert "deprecated" in r.stderr and (tmp_path / "p.csv").exists()
    r = run_cli("predict", art / "m.pt", art / "f.h5", "--device", "cpu")  # stdout carries the table
    assert r.returncode == 0 and r.stdout.startswith("id,label,prob") and "wrote 4 predictions" in r.stderr
    r = run_cli("predict", art / "m.pt", art / "f.h5", "--json", "-", "--device", "cpu")  # two things on stdout
    assert r.returncode == 2 and "--json" in r.stderr and not r.stdout


def test_build_candidates_refuses_other_suffixes_and_inputs(tmp_path):
    (tmp_path / "clean.csv").write_text("id,label\na,x\nb,y\n")
    r = run_cli("build-candidates", "-o", tmp_path / "l.csv", "--clean", tmp_path / "clean.csv")
    assert r.returncode == 2 and ".h5" in r.stderr and not (tmp_path / "l.csv").exists()
    r = run_cli("build-candidates", "-o", tmp_path / "l.h5", "--clean", tmp_path / "clean.csv")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'l.h5'} (2 items, 2 classes)" in r.stdout
    r = run_cli("build-candidates", "-o", tmp_path / "l.h5", "--clean", tmp_path / "clean.csv")
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_export_refuses_a_suffix_that_does_not_fit_the_format(art, tmp_path):
    r = run_cli("export", art / "m.pt", "-o", tmp_path / "m.onnx", "--format", "torchscript")
    assert r.returncode == 2 and ".pt" in r.stderr and not (tmp_path / "m.onnx").exists()
    r = run_cli("export", art / "m.pt", "-o", art / "m.pt", "--overwrite")  # the checkpoint itself
    assert r.returncode == 2 and "input" in r.stderr


def test_predict_restrict_candidates_leaves_items_outside_the_store_unrestricted(art, tmp_path):
    from pllcli.labels.store import LabelData, write_label_store
    from pllcli.predict import predict
    write_label_store(tmp_path / "l.h5", LabelData.new(["a", "b"], CLASSES, candidates=[[0], [1, 2]]), {})
    predict(art / "m.pt", art / "f.h5", tmp_path / "ref.jsonl", top_k_n=3, device="cpu")
    s = predict(art / "m.pt", art / "f.h5", tmp_path / "r.jsonl", top_k_n=3, restrict_labels=tmp_path / "l.h5",
                device="cpu")
    assert s["restricted"] == 2
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    ref = {r["id"]: r for r in map(json.loads, (tmp_path / "ref.jsonl").read_text().splitlines())}
    assert rows["a"]["labels"][0] == "low" and rows["a"]["probs"][0] == pytest.approx(1.0)
    assert set(rows["b"]["labels"][:2]) == {"mid", "high"} and sum(rows["b"]["probs"][:2]) == pytest.approx(1.0)
    assert rows["c"] == ref["c"] and rows["d"] == ref["d"]
    write_label_store(tmp_path / "other.h5", LabelData.new(["x"], CLASSES, candidates=[[0]]), {})
    r = run_cli("predict", art / "m.pt", art / "f.h5", "--restrict-candidates", tmp_path / "other.h5",
                "--device", "cpu")
    assert r.returncode == 1 and "none of the 4 feature ids are in the label store" in r.stderr


# ---------------------------------------------------------------- modes (issue 14 item 3)

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_outputs_honour_the_umask(art, tmp_path, umask):
    from pllcli.checkpoint import save_checkpoint
    from pllcli.io import atomic_path, current_umask, write_json
    from pllcli.labels.store import LabelData, write_label_store
    from pllcli.predict import predict
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
        write_json({"a": 1}, tmp_path / "summary.json")
        write_label_store(tmp_path / "l.h5", LabelData.new(["a"], ["x"], clean=[0]), {})
        save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(2)}, {"kind": "classifier"})
        predict(art / "m.pt", art / "f.h5", tmp_path / "p.csv", device="cpu")
        for name in ("a.bin", "summary.json", "l.h5", "c.pt", "p.csv"):
            assert _mode(tmp_path / name) == 0o666 & ~umask, name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        os.umask(old)


def test_exported_onnx_honours_the_umask(art, tmp_path):
    pytest.importorskip("onnx")
    from pllcli.export import export
    old = os.umask(0o027)
    try:
        export(art / "m.pt", tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "m.onnx") == 0o640


# ---------------------------------------------------------------- NaN features (issue 14 item 4)

def test_predict_fails_on_nan_features_naming_file_and_item(art, tmp_path):
    r = run_cli("predict", art / "m.pt", art / "nan.h5", "-o", tmp_path / "p.csv", "--device", "cpu")
    assert r.returncode == 1
    assert f"error: {art / 'nan.h5'}: features of item 'b' contain NaN/inf" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "p.csv").exists()


def test_predict_skip_bad_leaves_out_and_reports_the_items(art, tmp_path):
    r = run_cli("predict", art / "m.pt", art / "nan.h5", "-o", tmp_path / "p.csv", "--skip-bad",
                "--json", tmp_path / "s.json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "skipped 2 item(s)" in r.stderr and "b, d" in r.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["skipped_bad"] == ["b", "d"] and summary["items"] == 2
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["a", "c"] and all(np.isfinite(float(r["prob"])) for r in rows)
    # the kept items get the same probabilities as in the clean store
    r = run_cli("predict", art / "m.pt", art / "f.h5", "-o", tmp_path / "ref.csv", "--device", "cpu")
    with open(tmp_path / "ref.csv") as f:
        ref = {r["id"]: float(r["prob"]) for r in csv.DictReader(f)}
    for row in rows:
        assert float(row["prob"]) == pytest.approx(ref[row["id"]], abs=1e-5)


def test_nonfinite_items():
    from pllcli.training.data import nonfinite_items
    feats = np.zeros((10, 2), np.float32)
    offsets = np.array([0, 3, 3, 7, 10])
    assert nonfinite_items(feats, offsets).tolist() == []
    feats[3, 1] = np.inf   # first frame of item 2 (item 1 is empty)
    feats[9, 0] = np.nan
    feats[8, 0] = np.nan
    assert nonfinite_items(feats, offsets).tolist() == [2, 3]


# ---------------------------------------------------------------- smaller error paths (issue 14 item 6)

def test_empty_vocab_is_refused_naming_the_vocab_file(tmp_path):
    (tmp_path / "voice.csv").write_text("id,time\nv1,10\nv2,11\n")
    (tmp_path / "chat.csv").write_text("time,author,text\n10.5,u1,one\n11.5,u2,two\n")
    (tmp_path / "clean.csv").write_text("id,label\nv1,one\n")
    for text in ("", "\n\n", "label\n"):
        (tmp_path / "vocab.txt").write_text(text)
        r = run_cli("build-candidates", "-o", tmp_path / "l.h5", "--voice", tmp_path / "voice.csv",
                    "--chat", tmp_path / "chat.csv", "--clean", tmp_path / "clean.csv",
                    "--vocab", tmp_path / "vocab.txt")
        assert r.returncode == 1, r.stderr
        assert "vocab.txt" in r.stderr and "empty vocabulary" in r.stderr and "clean.csv" not in r.stderr
        assert not (tmp_path / "l.h5").exists()


def test_unknown_model_name_names_the_checkpoint(art, tmp_path):
    from pllcli.checkpoint import load_checkpoint, load_model, save_checkpoint
    from pllcli.errors import CheckpointError
    state, meta = load_checkpoint(art / "m.pt")
    meta["model"] = dict(meta["model"], name="nosuchnet")
    save_checkpoint(tmp_path / "odd.pt", state, meta)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "odd.pt")
    assert str(tmp_path / "odd.pt") in str(e.value) and "nosuchnet" in str(e.value)
    r = run_cli("predict", tmp_path / "odd.pt", art / "f.h5", "--device", "cpu")
    assert r.returncode == 1 and "odd.pt" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- build-candidates grammar and table (issue 18)

def test_build_candidates_output_option_and_deprecated_positional(tmp_path):
    (tmp_path / "voice.csv").write_text("id,time\nv1,10\nv2,12\n")
    (tmp_path / "chat.csv").write_text("time,author,text\n9,u0,hello there\n10.5,u1,one\n11,u2,lol\n"
                                       "12.5,u3,two\n13,u4,one\n")
    (tmp_path / "vocab.txt").write_text("one\ntwo\n")
    args = ["--voice", tmp_path / "voice.csv", "--chat", tmp_path / "chat.csv", "--vocab", tmp_path / "vocab.txt"]
    r = run_cli("build-candidates", tmp_path / "old.h5", *args)
    assert r.returncode == 0, r.stderr
    assert "deprecated" in r.stderr and (tmp_path / "old.h5").exists()
    r = run_cli("build-candidates", tmp_path / "x.h5", "-o", tmp_path / "y.h5", *args)
    assert r.returncode == 2 and "once" in r.stderr
    r = run_cli("build-candidates", *args)
    assert r.returncode == 2 and "-o/--output" in r.stderr
    r = run_cli("build-candidates", "-o", tmp_path / "new.h5", *args, "--json", "-")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)  # stdout carries the JSON; "wrote ..." goes to stderr then
    assert stats["off_vocabulary_examples"] and "wrote" in r.stderr and "deprecated" not in r.stderr
    # off-vocabulary examples quoted and comma-separated; q_eff and clean_labels_added explained
    assert '"hello there", "lol"' in r.stderr or '"lol", "hello there"' in r.stderr
    assert "q_eff *" in r.stderr and "* q_eff: mean share of the wrong classes" in r.stderr
    assert "* clean_labels_added:" in r.stderr and "clean_labels_added * " in r.stderr


# ---------------------------------------------------------------- export warnings (issue 18 item 3)

def test_export_filters_only_the_known_harmless_warnings(capfd):
    import warnings

    from pllcli.export import _quiet
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _quiet(native=True):
            warnings.warn_explicit("Converting a tensor to a Python boolean might cause the trace to be "
                                   "incorrect", torch.jit.TracerWarning, "rnn.py", 1, module="torch.nn.modules.rnn")
            warnings.warn("You are using the legacy TorchScript-based ONNX export.", DeprecationWarning)
            warnings.warn("something else went wrong", UserWarning)
            os.write(2, b"[W] Warning: The shape inference of prim::PackPadded type is missing, so it may "
                        b"result in wrong shape inference\n")
            os.write(2, b"a native line that matters\n")
    assert [str(w.message) for w in seen] == ["something else went wrong"]
    err = capfd.readouterr().err
    assert "a native line that matters" in err and "PackPadded" not in err


def test_export_cli_prints_no_torch_warnings(art, tmp_path):
    pytest.importorskip("onnx")
    r = run_cli("export", art / "m.pt", "-o", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "PackPadded" not in r.stderr, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'm.onnx'} (onnx")


# ---------------------------------------------------------------- checkpoints stay weights-only

def test_save_checkpoint_refuses_extra_that_would_be_pickled(tmp_path):
    import enum

    from pllcli.checkpoint import load_checkpoint, save_checkpoint

    class Mode(str, enum.Enum):
        a = "a"

    extra = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
             "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "ok.pt", {"w": torch.zeros(1)}, {"kind": "classifier"}, extra=extra)
    assert set(load_checkpoint(tmp_path / "ok.pt", with_extra=True)[2]) == {"optimizer", "rng"}
    for bad in ({"sched": {"lr_lambdas": [{"schedule": object()}]}}, {"mode": [Mode.a]}):
        with pytest.raises(TypeError, match=r"checkpoint extra (sched/lr_lambdas\[0\]/schedule|mode\[0\])"):
            save_checkpoint(tmp_path / "bad.pt", {"w": torch.zeros(1)}, {}, extra=bad)
    assert not (tmp_path / "bad.pt").exists()


def test_atomic_path_onto_a_directory_names_the_directory(tmp_path):
    from pllcli.errors import InputError
    from pllcli.io import write_json
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"out: is a directory"):
        write_json({}, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_json_report_never_replaces_a_store_or_an_input(art, tmp_path):
    store = tmp_path / "report.h5"
    store.write_bytes((art / "f.h5").read_bytes())
    before = store.read_bytes()
    r = run_cli("predict", art / "m.pt", art / "f.h5", "-o", tmp_path / "p.csv", "--json", store, "--device", "cpu")
    assert r.returncode == 2 and "HDF5" in r.stderr and not (tmp_path / "p.csv").exists()
    (tmp_path / "clean.csv").write_text("id,label\na,x\n")
    r = run_cli("build-candidates", "-o", tmp_path / "l.h5", "--clean", tmp_path / "clean.csv",
                "--json", tmp_path / "clean.csv")
    assert r.returncode == 2 and "input" in r.stderr and not (tmp_path / "l.h5").exists()
    r = run_cli("export", art / "m.pt", "-o", tmp_path / "m.pt", "--json", store)
    assert r.returncode == 2 and not (tmp_path / "m.pt").exists()
    assert store.read_bytes() == before
    (tmp_path / "old.json").write_text("{}\n")  # an existing text report is replaced as before
    r = run_cli("build-candidates", "-o", tmp_path / "l.h5", "--clean", tmp_path / "clean.csv",
                "--json", tmp_path / "old.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "old.json").read_text())["items"] == 1


def test_predict_streams_the_store_with_the_same_results(art, tmp_path):
    from pllcli.predict import predict
    predict(art / "m.pt", art / "f.h5", tmp_path / "mem.jsonl", top_k_n=3, device="cpu", data="memory")
    predict(art / "m.pt", art / "f.h5", tmp_path / "st.jsonl", top_k_n=3, device="cpu", data="stream")
    mem = [json.loads(ln) for ln in (tmp_path / "mem.jsonl").read_text().splitlines()]
    st = [json.loads(ln) for ln in (tmp_path / "st.jsonl").read_text().splitlines()]
    assert [r["id"] for r in st] == [r["id"] for r in mem] and [r["labels"] for r in st] == [r["labels"] for r in mem]
    np.testing.assert_allclose([r["probs"] for r in st], [r["probs"] for r in mem], atol=1e-6)
    r = run_cli("predict", art / "m.pt", art / "nan.h5", "--data", "stream", "--device", "cpu")
    assert r.returncode == 1 and "features of item 'b' contain NaN/inf" in r.stderr
    r = run_cli("predict", art / "m.pt", art / "nan.h5", "--data", "stream", "--skip-bad", "--device", "cpu")
    assert r.returncode == 2 and "--data stream does not support --skip-bad" in r.stderr
    r = run_cli("predict", art / "m.pt", art / "f.h5", "--max-memory", "1K", "--device", "cpu")
    assert r.returncode == 0 and "data path: stream" in r.stderr, r.stderr
