"""`pllcli train` under torchrun with 2 CPU processes (gloo): rank-aware batches, rank 0 writes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_train import make_features, make_labels


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_torchrun_two_cpu_processes(tmp_path):
    y = make_features(tmp_path / "f.h5", n=64)
    make_labels(tmp_path / "l.h5", y)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --standalone: a free rendezvous port of its own (a fixed port fails when another run holds it)
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "pllcli", "-q", "train",
           str(tmp_path / "f.h5"), "--labels", str(tmp_path / "l.h5"), "-o", str(tmp_path / "run"),
           "--epochs", "2", "--batch-size", "8", "--model-opt", "width=4,rnn_hidden=8,proj=8",
           "--device", "cpu", "--valid-fraction", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2  # one writer: rank 0
    # 64 items / batch 8 = 8 batches per epoch, split across 2 ranks -> 4 steps each
    assert log[0]["step"] == 4 and log[1]["step"] == 8
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "averaged.pt").exists()


def test_a_torchrun_rank_leaves_without_interpreter_teardown(monkeypatch):
    """pllcli.cli.app.main ends a torchrun rank with os._exit after flushing (a gloo rank could
    abort in the interpreter's teardown after all its work was written)."""
    from pllcli.cli import app as A
    monkeypatch.setenv("WORLD_SIZE", "2")
    import torch.distributed
    assert torch.distributed is sys.modules["torch.distributed"] and A._torchrun_rank()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not A._torchrun_rank()
    code = ("import atexit, sys; from pllcli.cli.app import _exit_now; "
            "atexit.register(lambda: print('teardown ran')); "
            "print('out', end=''); print('err', end='', file=sys.stderr); _exit_now(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err")  # flushed, exit code kept, no atexit
