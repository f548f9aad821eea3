import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _restore_registries():
    """Objectives or models a test registers are gone after it."""
    from pllcli.models import registry as models
    from pllcli.training import objective_base as objectives
    from pllcli.training.objectives import _load_builtin
    _load_builtin()  # builtins register on first use: load them before the snapshot
    saved = dict(objectives._REGISTRY), dict(models._REGISTRY)
    yield
    for reg, old in zip((objectives._REGISTRY, models._REGISTRY), saved):
        reg.clear()
        reg.update(old)


def load_example(name: str):
    """The module examples/NAME.py (benchmark scripts are not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(*args, input=None):
    """Run `python -m pllcli ARGS` in a subprocess; return CompletedProcess."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "pllcli", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=600)


@pytest.fixture
def cli_inproc(capsys):
    """Run the CLI in this process (no interpreter start-up): cli_inproc(*args) -> (exit code, stdout, stderr)."""
    from pllcli.cli.app import app
    from pllcli.cli.errors import run_app

    def run(*args):
        capsys.readouterr()
        code = run_app(app, [str(a) for a in args])
        cap = capsys.readouterr()
        return code, cap.out, cap.err
    return run


def make_tone_run(d, durations, n: int, batch_size: int, noise: float):
    """In folder `d`: `n` tone clips (300/900/1800 Hz, classes low/mid/high) of the given durations
    (cycled), their manifest audio.csv, feature store f.h5, label store l.h5 and a tiny convgru
    trained on them in run/; returns `d`."""
    import csv

    import numpy as np
    import soundfile as sf

    from pllcli.features.config import FeatureConfig
    from pllcli.features.extract import featurize
    from pllcli.labels.store import LabelData, write_label_store
    from pllcli.training.trainer import TrainConfig, train
    sr = 8000
    (d / "audio").mkdir()
    rng = np.random.default_rng(0)
    rows = [("id", "path")]
    for i in range(n):
        t = np.arange(int(durations[i % len(durations)] * sr)) / sr
        x = 0.3 * np.sin(2 * np.pi * (300, 900, 1800)[i % 3] * t) + noise * rng.normal(size=t.size)
        p = d / "audio" / f"clip{i:02d}.wav"
        sf.write(p, x.astype(np.float32), sr, subtype="PCM_16")
        rows.append((f"clip{i:02d}", str(p)))
    with open(d / "audio.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    featurize(str(d / "audio.csv"), d / "f.h5", FeatureConfig.preset("speech8k", n_mels=16), progress=False)
    write_label_store(d / "l.h5", LabelData.new([r[0] for r in rows[1:]], ["low", "mid", "high"],
                                                clean=[i % 3 for i in range(n)]), {})
    train(TrainConfig(features=str(d / "f.h5"), labels=str(d / "l.h5"), outdir=str(d / "run"), epochs=2,
                      batch_size=batch_size, model_options={"width": 4, "rnn_hidden": 8, "proj": 16},
                      device="cpu", valid_fraction=0.0, progress=False, top_k=0, objectives=["ce"]))
    return d


@pytest.fixture(scope="module")
def tone_run(tmp_path_factory):
    """make_tone_run(name, durations, n, batch_size, noise) in a fresh module-scoped folder."""
    return lambda name, *args: make_tone_run(tmp_path_factory.mktemp(name), *args)
