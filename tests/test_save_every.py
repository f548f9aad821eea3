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
