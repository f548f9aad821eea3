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
    for attempt in range(2):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        # Rarely (2 of ~30 runs, only on a loaded machine) one gloo rank aborts with SIGABRT
        # ("terminate called without an active exception"); not reproduced in isolation, so a
        # second launch is allowed for exactly that failure and no other.
        if r.returncode == 0 or "SIGABRT" not in r.stderr:
            break
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2  # one writer: rank 0
    # 64 items / batch 8 = 8 batches per epoch, split across 2 ranks -> 4 steps each
    assert log[0]["step"] == 4 and log[1]["step"] == 8
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "averaged.pt").exists()
