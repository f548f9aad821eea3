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


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_torchrun_two_cpu_processes_stream_their_own_share(tmp_path):
    """--data stream under torchrun: each rank streams its share (rank r/2 in its plan line), the
    same steps as the memory path, rank 0 alone writes and prints; pretrain prints once too."""
    y = make_features(tmp_path / "f.h5", n=64)
    make_labels(tmp_path / "l.h5", y)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    base = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "pllcli"]
    cmd = base + ["train", str(tmp_path / "f.h5"), "--labels", str(tmp_path / "l.h5"), "-o", str(tmp_path / "run"),
                  "--epochs", "2", "--batch-size", "8", "--model-opt", "width=4,rnn_hidden=8,proj=8",
                  "--device", "cpu", "--valid-fraction", "0", "--data", "stream"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr and r.stderr.count("data path: stream") == 2
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # 16 clean items at a quarter of each batch (2 of 8), 48 others 6 a batch over 2 ranks: 4 steps each
    assert len(log) == 2 and [x["step"] for x in log] == [4, 8]
    assert sorted(r.stdout.split()) == sorted(str(tmp_path / "run" / n) for n in
                                              ("model.pt", "best.pt", "last.pt", "averaged.pt", "log.jsonl",
                                               "summary.json"))
    cmd = base + ["pretrain", str(tmp_path / "f.h5"), "-o", str(tmp_path / "enc.pt"), "--epochs", "1",
                  "--batch-size", "8", "--model-opt", "width=4,rnn_hidden=8,proj=8", "--device", "cpu",
                  "--data", "stream"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(tmp_path / "enc.pt"), str(tmp_path / "enc.log.jsonl")]  # rank 0 only
    assert [json.loads(x)["step"] for x in (tmp_path / "enc.log.jsonl").read_text().splitlines()] == [4]


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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out", "err")  # flushed, exit code kept, no atexit


def _two_views_worker(rank, port, out):
    """One step of two forward passes (two 'views', as consistency objectives do) through
    Dist.wrap's DistributedDataParallel, on rank-specific data; writes the rank's gradients."""
    import torch
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from pllcli.training.distributed import Dist
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    dist = Dist()
    dist.init(torch.device("cpu"))
    net = dist.wrap(model)
    torch.manual_seed(100 + rank)
    x = torch.randn(6, 4)
    loss = net(x).logsumexp(1).mean() + net(x + 0.1).pow(2).mean()
    loss.backward()
    torch.save([p.grad for p in model.parameters()], os.path.join(out, f"g{rank}.pt"))
    dist.barrier()  # as train does: rank 0 hosts the store, tearing it down under rank 1 aborts it
    dist.close()


def _spawn_two(worker, tmp_path) -> None:
    """Run worker(rank, port, out) on 2 gloo ranks (a free local port for the rendezvous)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2, join=True)


def test_ddp_averages_gradients_over_several_forward_passes(tmp_path):
    import torch
    _spawn_two(_two_views_worker, tmp_path)
    g0, g1 = (torch.load(tmp_path / f"g{r}.pt") for r in (0, 1))
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b)  # averaged by DDP: every rank holds the same gradient
    assert any(a.abs().sum() > 0 for a in g0)


def _when_attention_worker(rank, port, out):
    """A WHEN step with attention pooling through DDP: the pooling must run inside forward."""
    import torch
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from pllcli.models.whenwho import WhenWhoNet
    from pllcli.training.distributed import Dist
    from pllcli.training.weak_objectives import when_loss
    torch.manual_seed(0)
    model = WhenWhoNet(6, 2, width=4, depth=2, rnn_hidden=4)
    dist = Dist()
    dist.init(torch.device("cpu"))
    net = dist.wrap(model)
    torch.manual_seed(100 + rank)
    x = torch.randn(4, 12, 6)
    when_loss(net(x, torch.tensor([12, 10, 8, 12]), part="when"), torch.tensor([1.0, 0, 1, 0]), "attention",
              model).backward()
    torch.save(model.when_att.att.weight.grad, os.path.join(out, f"a{rank}.pt"))
    dist.barrier()
    dist.close()


def test_ddp_when_attention_pooling_runs_inside_forward(tmp_path):
    import torch
    _spawn_two(_when_attention_worker, tmp_path)
    a0, a1 = (torch.load(tmp_path / f"a{r}.pt") for r in (0, 1))
    assert torch.allclose(a0, a1) and a0.abs().sum() > 0
