"""`train --save-every`: last.pt mid-epoch every N steps (a crash loses at most N steps, and the
resume is exact), and SIGTERM stops a run like Ctrl-C does (last.pt at the batch, exit 143)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from pllcli.errors import UsageError
from tests.test_train_stream import _cfg, _log, data  # noqa: F401 - the module fixture

_CRASH = {"step": None}


def _crash_objective():
    from pllcli.training.objectives import register_objective
    from pllcli.training.pll_objectives import Proden

    @register_objective("test-crash-step")
    class CrashAtStep(Proden):
        """Test: PRODEN that fails (as a killed or crashed process would stop) at step _CRASH['step']."""

        def loss(self, ctx):
            if _CRASH["step"] is not None and ctx.step == _CRASH["step"]:
                raise RuntimeError("simulated crash")
            return super().loss(ctx)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_crash_loses_at_most_n_steps_and_the_resume_is_exact(data, tmp_path, mode):  # noqa: F811
    """4 steps per epoch, --save-every 3 steps, a crash at step 7: last.pt holds step 6 (epoch 2,
    batch 2); --resume ends with the weights and losses of the uninterrupted run."""
    from pllcli.checkpoint import load_checkpoint
    from pllcli.training.trainer import train
    _crash_objective()
    d, _ = data
    kw = dict(objectives=["test-crash-step"], epochs=3, data=mode, ema=0.9, save_every_steps=3)
    _CRASH["step"] = None
    train(_cfg(d, tmp_path / "full", **kw))
    _CRASH["step"] = 7
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(d, tmp_path / "part", **kw))
    _CRASH["step"] = None
    _, meta, extra = load_checkpoint(tmp_path / "part" / "last.pt", with_extra=True)
    pos = extra["trainer"]["position"]
    assert (pos["epoch"], pos["batches"]) == (1, 2) and meta["saved"] == "epoch 2, main batch 2"
    assert "interrupted" not in meta
    train(_cfg(d, tmp_path / "part", resume=str(tmp_path / "part"), **kw))
    a, _ = load_checkpoint(tmp_path / "full" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _log(tmp_path / "full")] == pytest.approx([r["loss"] for r in _log(tmp_path / "part")],
                                                                         rel=1e-9)


def test_save_every_is_free_to_change_on_resume_and_checked(data, tmp_path):  # noqa: F811
    from pllcli.training.config import TrainConfig, RESUME_FREE
    assert {"save_every_steps", "save_every_seconds"} <= RESUME_FREE
    with pytest.raises(UsageError, match="--save-every"):
        TrainConfig(features="f", labels="l", outdir="o", save_every_steps=-1)


@pytest.mark.parametrize("spec,want", [("250", {"save_every_steps": 250}), ("10m", {"save_every_seconds": 600.0}),
                                       ("90s", {"save_every_seconds": 90.0}), (None, {})])
def test_save_every_reads_steps_or_a_duration(spec, want):
    from pllcli.cli.train import save_every_options
    assert save_every_options(spec) == want


@pytest.mark.parametrize("spec", ["1.5", "", "ten", "-3"])
def test_save_every_refuses_what_is_neither(spec):
    from pllcli.cli.train import save_every_options
    with pytest.raises(UsageError, match="--save-every"):
        save_every_options(spec)


def test_sigterm_saves_mid_epoch_and_exits_143(data, tmp_path):  # noqa: F811
    """A batch system's kill (SIGTERM) at step 5: one error line, exit 128+15, last.pt at the batch."""
    from pllcli.checkpoint import load_checkpoint
    d, _ = data
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pllcli.training.objectives import register_objective
        from pllcli.training.pll_objectives import Proden

        @register_objective("test-sigterm")
        class SigtermAtStep(Proden):
            def loss(self, ctx):
                if ctx.step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                return super().loss(ctx)

        from pllcli.cli.app import app
        from pllcli.cli.errors import run_app
        sys.exit(run_app(app, ["train", {str(d / 'f.h5')!r}, "-l", {str(d / 'l.h5')!r}, "-o", {str(tmp_path / 'r')!r},
                               "--objective", "test-sigterm", "--epochs", "3", "--batch-size", "32",
                               "--model-opt", "width=4,rnn_hidden=16,proj=16", "--device", "cpu", "--data", "memory"]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
    assert "Traceback" not in r.stderr
    _, meta, extra = load_checkpoint(tmp_path / "r" / "last.pt", with_extra=True)
    assert "interrupted" in meta and extra["trainer"]["position"]["epoch"] == 1


_DDP_SCRIPT = """
import os, sys
from pllcli.training.objectives import register_objective
from pllcli.training.pll_objectives import Proden

@register_objective("test-crash-ddp")
class CrashAtStep(Proden):
    def loss(self, ctx):
        if ctx.step == int(os.environ.get("CRASH_STEP", "-1")):
            raise RuntimeError("simulated crash")
        return super().loss(ctx)

from pllcli.cli.app import main
sys.argv = ["pllcli"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("data_path", ["stream"])  # the stream loader's position too (memory: checked by hand)
def test_torchrun_saves_every_n_steps_and_resumes_exactly(tmp_path, data_path):
    """2 gloo ranks, 4 steps per epoch, --save-every 3, both ranks crash at step 7: last.pt holds
    step 6 with each rank's RNG and BatchNorm statistics; the resumed run ends with the weights
    and losses of the uninterrupted one."""
    import json
    import os
    import shutil

    from pllcli.checkpoint import load_checkpoint
    from tests.test_train import make_features, make_labels
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun) and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    y = make_features(tmp_path / "f.h5", n=64)
    make_labels(tmp_path / "l.h5", y)
    (tmp_path / "entry.py").write_text(_DDP_SCRIPT)

    def run(out, crash=None, resume=False):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CRASH_STEP": str(crash or -1)}
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(tmp_path / "entry.py"), "-q", "train",
               str(tmp_path / "f.h5"), "-l", str(tmp_path / "l.h5"), "--epochs", "3", "--batch-size", "8",
               "--model-opt", "width=4,rnn_hidden=8,proj=8", "--device", "cpu", "--valid-fraction", "0",
               "--objective", "test-crash-ddp", "--save-every", "3", "--data", data_path]
        cmd += ["--resume", str(out)] if resume else ["-o", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    r = run(tmp_path / "full")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(tmp_path / "part", crash=7)
    assert r.returncode != 0 and "simulated crash" in r.stderr
    _, meta, extra = load_checkpoint(tmp_path / "part" / "last.pt", with_extra=True)
    tr = extra["trainer"]
    assert (tr["position"]["epoch"], tr["position"]["batches"], tr["position"]["world"]) == (1, 2, 2)
    assert len(tr["rank_states"]) == 2 and meta["saved"] == "epoch 2, main batch 2"
    assert not torch.equal(tr["rank_states"][0]["rng"]["torch"], tr["rank_states"][1]["rng"]["torch"])
    r = run(tmp_path / "part", resume=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, _ = load_checkpoint(tmp_path / "full" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-9)
