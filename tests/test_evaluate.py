"""`pllcli evaluate`: predictions files, truth tables, label stores, checkpoints, errors, plots."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from pllcli.errors import ConfigMismatchError, InputError
from pllcli.evaluate import evaluate, make_plots
from tests.conftest import run_cli

CLASSES = ["cat", "dog", "owl"]


def _write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def single(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    y = rng.integers(0, 3, n)
    y[:3] = [0, 1, 2]
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = [f"u{i:02d}" for i in range(n)]
    pred = _write(tmp_path / "pred.csv", "id," + ",".join(CLASSES) + "\n" + "".join(
        f"{i}," + ",".join(f"{v:.9f}" for v in row) + "\n" for i, row in zip(ids, p)))
    truth = _write(tmp_path / "truth.tsv", "id\tlabel\n" + "".join(
        f"{i}\t{CLASSES[c]}\n" for i, c in zip(ids[::-1], y[::-1])))  # other order than predictions
    return ids, y, np.round(p, 9), pred, truth


def test_single_label_predictions_match_sklearn(single, tmp_path):
    ids, y, p, pred, truth = single
    res = evaluate(truth, predictions=pred)
    clip = res.report["clip"]
    assert res.task == "single" and res.report["n_items"] == len(ids)
    assert clip["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(1)), abs=1e-6)
    assert clip["macro_f1"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"), abs=1e-6)
    assert clip["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, p, k=2), abs=1e-6)
    assert clip["confusion_matrix"] == skm.confusion_matrix(y, p.argmax(1)).tolist()
    assert 0 <= clip["ece"] <= 1
    # the long (top-k) layout gives the same figures for top-1
    rows = "".join(f"{i},{CLASSES[k]},{p[r, k]:.9f}\n" for r, i in enumerate(ids)
                   for k in np.argsort(-p[r])[:2])
    long = _write(tmp_path / "topk.csv", "id,label,prob\n" + rows)
    res2 = evaluate(truth, predictions=long)
    assert res2.report["clip"]["accuracy"] == pytest.approx(clip["accuracy"])
    assert res2.report["clip"]["macro_f1"] == pytest.approx(clip["macro_f1"])
    # the layouts written by `pllcli predict --top-k 2`: one row per item, and JSONL lists
    top = [np.argsort(-p[r])[:2] for r in range(len(ids))]
    row = _write(tmp_path / "row.csv", "id,label,prob,label_2,prob_2\n" + "".join(
        f"{i},{CLASSES[t[0]]},{p[r, t[0]]:.9f},{CLASSES[t[1]]},{p[r, t[1]]:.9f}\n"
        for r, (i, t) in enumerate(zip(ids, top))))
    jl = _write(tmp_path / "row.jsonl", "".join(json.dumps(
        {"id": i, "labels": [CLASSES[k] for k in t], "probs": [float(p[r, k]) for k in t]}) + "\n"
        for r, (i, t) in enumerate(zip(ids, top))))
    for f in (row, jl):
        r3 = evaluate(truth, predictions=f).report["clip"]
        assert r3["accuracy"] == pytest.approx(clip["accuracy"]) and r3["top2_accuracy"] == clip["top2_accuracy"]


def test_multi_label_truth_table(tmp_path):
    rng = np.random.default_rng(1)
    n = 30
    y = rng.random((n, 3)) < 0.4
    y[0] = [True, False, False]
    s = np.round(rng.random((n, 3)) * 0.7 + 0.3 * y, 6)
    ids = [f"m{i}" for i in range(n)]
    pred = _write(tmp_path / "p.jsonl", "".join(
        json.dumps({"id": i, **{c: float(v) for c, v in zip(CLASSES, row)}}) + "\n" for i, row in zip(ids, s)))
    truth = _write(tmp_path / "t.csv", "id,labels\n" + "".join(
        f"{i},{';'.join(c for c, on in zip(CLASSES, row) if on)}\n" for i, row in zip(ids, y)))
    rep = evaluate(truth, predictions=pred).report
    assert rep["task"] == "multi"
    keep = y.sum(0) > 0
    assert rep["clip"]["mAP"] == pytest.approx(
        skm.average_precision_score(y[:, keep], s[:, keep], average="macro"), abs=1e-6)
    assert rep["clip"]["lwlrap"] == pytest.approx(
        skm.label_ranking_average_precision_score(y, s, sample_weight=y.sum(1)), abs=1e-6)
    assert rep["clip"]["micro_f1"] == pytest.approx(skm.f1_score(y, s >= 0.5, average="micro"), abs=1e-6)


def test_strong_truth_with_estimated_events(tmp_path):
    truth = _write(tmp_path / "strong.tsv", "id\tonset\toffset\tlabel\n"
                   "a\t1.0\t2.0\tdog\na\t3.0\t6.0\tdog\nb\t0.0\t1.0\tcat\n")
    est = _write(tmp_path / "est.tsv", "id\tonset\toffset\tlabel\n"
                 "a\t1.1\t2.15\tdog\na\t3.3\t6.0\tdog\nb\t0.0\t1.0\tcat\n")
    pred = _write(tmp_path / "p.csv", "id,cat,dog,owl\na,0.1,0.9,0.2\nb,0.8,0.3,0.1\n")
    rep = evaluate(truth, predictions=pred, estimated_events=est).report
    assert rep["event"]["micro_f1"] == pytest.approx(2 * 2 / (3 + 3))
    assert rep["clip"]["mAP"] == 1.0
    # segments (1 s): dog ref {1, 3, 4, 5}, est {1, 2, 3, 4, 5}; cat ref = est = {0}
    assert rep["segment"]["micro_f1"] == pytest.approx(2 * 5 / (2 * 5 + 1))
    assert rep["segment"]["micro_recall"] == 1.0


def test_label_store_truth_with_candidates(tmp_path):
    from pllcli.labels.store import LabelData, write_label_store
    ids = ["a", "b", "c", "d", "e"]
    d = LabelData.new(ids, CLASSES, candidates=[[0, 1], [1, 2], [0], None, [0, 1, 2]],
                      clean=[1, 0, 0, 2, -1])  # b: truth outside its set
    store = tmp_path / "labels.h5"
    write_label_store(store, d)
    pred = _write(tmp_path / "p.csv", "id,cat,dog,owl\na,0.5,0.2,0.3\nb,0.9,0.05,0.05\n"
                  "c,0.1,0.8,0.1\nd,0,0,1\ne,1,0,0\n")
    rep = evaluate(store, predictions=pred).report
    assert rep["n_items"] == 4  # e has no clean label
    assert rep["pll"]["coverage"]["coverage"] == pytest.approx(2 / 3)
    assert rep["pll"]["disambiguation"]["restricted"] == pytest.approx(1 / 3)
    # the same candidate sets scored against a truth table
    truth = _write(tmp_path / "t.csv", "id,label\na,dog\nb,cat\nc,cat\n")
    rep2 = evaluate(truth, predictions=pred, candidates=store).report
    assert rep2["pll"] == rep["pll"]
    assert rep2["pll"]["disambiguation"]["restricted"] == pytest.approx(1 / 3)
    bad = _write(tmp_path / "q.csv", "id,cat,dog,owl\na,0.5,0.2,0.3\nzz,1,0,0\n")
    with pytest.raises(InputError, match=r"1 of 2 ids .* not in the label store \(e.g. 'zz'\)"):
        evaluate(store, predictions=bad)


def test_bad_inputs_name_file_line_and_field(single, tmp_path):
    ids, y, p, pred, truth = single
    short = _write(tmp_path / "short.csv", "id,label\n" + "".join(f"x{i},cat\n" for i in range(4)))
    with pytest.raises(InputError) as e:
        evaluate(short, predictions=pred)
    assert "4 of 4 truth ids have no prediction" in str(e.value) and "'x0'" in str(e.value)
    assert str(e.value).startswith(f"{short}:2")
    unknown = _write(tmp_path / "unk.csv", f"id,label\n{ids[0]},cat\n{ids[1]},emu\n")
    with pytest.raises(InputError, match=r"unk.csv:3 \[label\]: unknown class 'emu'"):
        evaluate(unknown, predictions=pred)
    wrong = _write(tmp_path / "wrong.csv", "id,label\nu00,cat\n")
    with pytest.raises(InputError, match=r"wrong.csv:1: predictions need columns 'id' plus"):
        evaluate(truth, predictions=wrong)
    noid = _write(tmp_path / "noid.csv", "name,cat,dog,owl\nu00,1,0,0\n")
    with pytest.raises(InputError, match=r"noid.csv:1 \[id\]: missing column 'id'"):
        evaluate(truth, predictions=noid)
    nan = _write(tmp_path / "nan.csv", "id,cat,dog,owl\nu00,1,zero,0\n")
    with pytest.raises(InputError, match=r"nan.csv:2 \[dog\]: not a number"):
        evaluate(truth, predictions=nan)


def test_cli_predictions_json_plots_and_errors(single, tmp_path):
    ids, y, p, pred, truth = single
    log = _write(tmp_path / "log.jsonl", "".join(json.dumps(
        {"epoch": e, "loss": 1 / e, "val_accuracy": 0.5 + e / 20, "time_s": 1.0}) + "\n" for e in range(1, 6)))
    r = run_cli("evaluate", "--predictions", pred, truth, "--json", tmp_path / "r.json",
                "--plots", tmp_path / "plots", "--train-log", log)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "macro_f1" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    names = sorted(p.split("/")[-1] for p in rep["plots"])
    assert names == ["confusion_matrix.png", "pr_curves.png", "reliability.png", "training_curves.png"]
    for n in names:
        assert (tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG"
    r = run_cli("evaluate", "--predictions", pred, "--json", "-", truth)
    assert r.returncode == 0 and json.loads(r.stdout)["n_items"] == len(ids)
    wrong = _write(tmp_path / "wrong.csv", "id,label\nu00,cat\n")
    r = run_cli("evaluate", "--predictions", wrong, truth)
    assert r.returncode == 1 and "wrong.csv:1" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("evaluate", truth)
    assert r.returncode == 2


def test_missing_matplotlib_is_named(single, monkeypatch, tmp_path):
    import builtins
    ids, y, p, pred, truth = single
    res = evaluate(truth, predictions=pred)
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    from pllcli.errors import MissingExtraError
    with pytest.raises(MissingExtraError, match="matplotlib"):
        make_plots(res, tmp_path / "pl")


# ---------------------------------------------------------------- checkpoint + feature store

def _store_and_checkpoint(tmp_path, model="crnn", task="multi", other_config=False):
    import torch
    from pllcli.checkpoint import save_checkpoint
    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import write_feature_store
    from pllcli.models import build_model
    cfg = FeatureConfig.preset("speech8k", n_mels=16)
    torch.manual_seed(0)
    m = build_model(model, cfg.n_mels, 3, width=4, rnn_hidden=8).eval()
    save_checkpoint(tmp_path / "m.pt", m, {"kind": "classifier", "classes": CLASSES, "task": task,
                                           "feature_config": cfg.to_dict(), "feature_config_hash": cfg.hash()})
    scfg = cfg.replace(hop_length=100) if other_config else cfg
    rng = np.random.default_rng(0)
    items = [{"id": f"s{i}", "features": rng.normal(size=(60 + 10 * i, 16)).astype(np.float32),
              "duration": (60 + 10 * i) * 0.01} for i in range(6)]
    write_feature_store(tmp_path / "f.h5", scfg, items)
    return m, tmp_path / "m.pt", tmp_path / "f.h5", items


def test_checkpoint_feature_store_and_strong_truth(tmp_path):
    import torch
    m, ck, fs, items = _store_and_checkpoint(tmp_path)
    truth = _write(tmp_path / "strong.tsv", "id\tonset\toffset\tlabel\n" + "".join(
        f"{it['id']}\t0.1\t0.4\t{CLASSES[i % 3]}\n" for i, it in enumerate(items)))
    res = evaluate(truth, checkpoint=ck, features=fs, batch_size=1)
    rep = res.report
    assert {"clip", "frame", "segment", "event"} <= set(rep)
    # probabilities equal running the model item by item
    with torch.no_grad():
        ref = np.stack([torch.sigmoid(m(torch.from_numpy(it["features"])[None], None)["logits"])[0].numpy()
                        for it in items])
    np.testing.assert_allclose(res.probs, ref, atol=1e-5)
    # batched with padding: every model is exact under padding, so batches change nothing
    res4 = evaluate(truth, checkpoint=ck, features=fs, batch_size=4)
    np.testing.assert_allclose(res4.probs, ref, atol=1e-5)
    assert rep["event"]["t_collar"] == 0.2 and 0 <= rep["frame"]["auc"] <= 1
    assert rep["n_items"] == len(items)
    # clips absent from a strong table are scored as event-free, not dropped
    part = _write(tmp_path / "part.tsv", "id\tonset\toffset\tlabel\n" + "".join(
        f"{it['id']}\t0.1\t0.4\t{CLASSES[i % 3]}\n" for i, it in enumerate(items[:4])))
    rp = evaluate(part, checkpoint=ck, features=fs, batch_size=1).report
    assert rp["n_items"] == len(items)


def test_feature_config_mismatch_is_refused(tmp_path):
    _, ck, fs, items = _store_and_checkpoint(tmp_path, model="convgru", task="single", other_config=True)
    truth = _write(tmp_path / "t.csv", "id,label\n" + "".join(f"{it['id']},cat\n" for it in items))
    with pytest.raises(ConfigMismatchError, match="hop_length"):
        evaluate(truth, checkpoint=ck, features=fs)
    r = run_cli("evaluate", ck, fs, truth)
    assert r.returncode == 1 and "feature config hash" in r.stderr and "Traceback" not in r.stderr


def test_nan_features_are_an_error_naming_file_and_item(tmp_path):
    from pllcli.features.config import FeatureConfig
    from pllcli.features.store import write_feature_store
    _, ck, fs, items = _store_and_checkpoint(tmp_path)
    items[2]["features"][5, 3] = np.nan
    items[4]["features"][0, 0] = np.inf
    bad = tmp_path / "bad.h5"
    write_feature_store(bad, FeatureConfig.preset("speech8k", n_mels=16), items)
    truth = _write(tmp_path / "t.csv", "id,labels\n" + "".join(f"{it['id']},cat\n" for it in items))
    with pytest.raises(InputError, match=r"bad.h5: features of item 's2' contain NaN/inf \(and 1 more\)"):
        evaluate(truth, checkpoint=ck, features=bad)
    r = run_cli("evaluate", ck, bad, truth)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: {bad}: features of item 's2' contain NaN/inf "
                                                 "(and 1 more)")


def test_help_grammar_plots_extra_device_and_durations(single, tmp_path):
    import re
    r = run_cli("evaluate", "--help")
    text = re.sub(r"[│\s]+", " ", r.stdout)
    assert "pip install 'pllcli[plots]'" in text and "pip install 'pllcli[sed]'" in text
    assert "[default: auto]" in text.split("--device", 1)[1][:200]
    ids, y, p, pred, truth = single
    r = run_cli("evaluate", "--predictions", pred, truth, "--segment", "2x")
    assert r.returncode == 2 and "--segment: cannot read '2x' as a duration" in r.stderr


def test_without_sed_scores_eval_psds_is_skipped_with_a_hint(tmp_path, monkeypatch):
    from pllcli.errors import MissingExtraError
    from pllcli.metrics import sed

    def missing(purpose="PSDS"):
        raise MissingExtraError("sed-scores-eval-np2", "sed", purpose)
    monkeypatch.setattr(sed, "load", missing)
    truth = _write(tmp_path / "strong.tsv", "id\tonset\toffset\tlabel\na\t1.0\t2.0\tdog\n")
    est = _write(tmp_path / "est.tsv", "id\tonset\toffset\tlabel\na\t1.1\t2.1\tdog\n")
    pred = _write(tmp_path / "p.csv", "id,cat,dog,owl\na,0.1,0.9,0.2\n")
    rep = evaluate(truth, predictions=pred, estimated_events=est).report
    assert rep["event"]["micro_f1"] == 1.0 and "intersection" not in rep
    assert rep["psds"] == "skipped: sed_scores_eval is not installed (pip install 'pllcli[sed]')"
