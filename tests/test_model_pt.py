"""model.pt, the checkpoint a training run tells users to deploy: written, chosen, loadable, resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_train import _STOP, FAST, _cfg, _register_test_objectives, data, run_inproc  # noqa: F401 - the module fixture


def _same_weights(a, b) -> bool:
    import torch
    from pllcli.checkpoint import load_checkpoint
    sa, sb = load_checkpoint(a)[0], load_checkpoint(b)[0]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_writes_model_pt_as_the_average_and_predict_uses_it(data, tmp_path, capsys):
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.checkpoints import DEPLOY_ORDER
    d, y = data
    out = tmp_path / "run"
    r = run_inproc(capsys, "-q", "train", d / "f.h5", "--labels", d / "l.h5", "-o", out, *FAST)
    assert r.returncode == 0, r.stderr
    assert str(out / "model.pt") in r.stdout.splitlines()  # the printed paths list it
    assert json.loads((out / "summary.json").read_text())["checkpoints"]["model"] == str(out / "model.pt")
    src = out / DEPLOY_ORDER[0]
    assert DEPLOY_ORDER[0] == "averaged.pt" and src.exists()
    assert _same_weights(out / "model.pt", src) and not _same_weights(out / "model.pt", out / "last.pt")
    state, meta, extra = load_checkpoint(out / "model.pt", with_extra=True)
    _, src_meta = load_checkpoint(src)
    assert meta == {**src_meta, "deployed_from": "averaged.pt"}
    assert extra == {}  # weights only: no resume state
    p1, p2 = tmp_path / "m.jsonl", tmp_path / "a.jsonl"
    for ck, dest in ((out / "model.pt", p1), (src, p2)):
        r = run_inproc(capsys, "-q", "predict", ck, d / "f.h5", "--top-k", "2", "-o", dest)
        assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in p1.read_text().splitlines()]
    assert len(rows) == len(y) and p1.read_text() == p2.read_text()
    r = run_inproc(capsys, "info", out, "--json", "-")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "training run" and info["files"][0] == "model.pt"
    assert info["model.pt"]["deployed_from"] == "averaged.pt"
    r = run_inproc(capsys, "info", out / "model.pt", "--json", "-")
    assert r.returncode == 0 and json.loads(r.stdout)["deployed_from"] == "averaged.pt"


def test_without_top_k_model_pt_is_best_pt(data, tmp_path):
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.trainer import train
    d, _ = data
    out = tmp_path / "r"
    train(_cfg(d, out, top_k=0))
    assert not (out / "averaged.pt").exists()
    assert _same_weights(out / "model.pt", out / "best.pt")
    assert load_checkpoint(out / "model.pt")[1]["deployed_from"] == "best.pt"


def test_interrupted_run_has_no_model_pt_and_resume_writes_the_same_one(data, tmp_path):
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.trainer import train
    _register_test_objectives()
    d, _ = data
    kw = dict(objectives=["test-stop"], epochs=3)
    _STOP["at"] = None
    train(_cfg(d, tmp_path / "full", **kw))
    _STOP["at"] = 2
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(d, tmp_path / "part", **kw))
    _STOP["at"] = None
    assert (tmp_path / "part" / "last.pt").exists() and not (tmp_path / "part" / "model.pt").exists()
    train(_cfg(d, tmp_path / "part", resume=str(tmp_path / "part"), **kw))
    assert _same_weights(tmp_path / "part" / "model.pt", tmp_path / "full" / "model.pt")
    assert _same_weights(tmp_path / "part" / "model.pt", tmp_path / "part" / "averaged.pt")
    # resuming a finished run again keeps a loadable model.pt with the same weights
    before = load_checkpoint(tmp_path / "part" / "model.pt")[0]
    train(_cfg(d, tmp_path / "part", resume=str(tmp_path / "part"), **kw))
    after = load_checkpoint(tmp_path / "part" / "model.pt")[0]
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
    assert not list((tmp_path / "part").glob(".model.pt.*"))  # no temporary left behind


def test_when_who_run_writes_model_pt_too(tmp_path):
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training import weak
    from pllcli.training.config import TrainConfig
    from tests.test_weak import _tag_store
    _tag_store(tmp_path)
    cfg = TrainConfig(features=str(tmp_path / "f.h5"), labels=str(tmp_path / "t.h5"), outdir=str(tmp_path / "r"),
                      epochs=2, batch_size=8, lr=1e-2, model_options={"width": 4, "depth": 2, "rnn_hidden": 4},
                      top_k=2, valid_fraction=0.25, progress=False)
    weak.train_when_who(cfg, mode="joint")
    assert load_checkpoint(tmp_path / "r" / "model.pt")[1]["deployed_from"] == "averaged.pt"
    assert _same_weights(tmp_path / "r" / "model.pt", tmp_path / "r" / "averaged.pt")
