"""The featurize benchmark scripts run end to end on a small corpus (they are how the README's
figures are made; a broken script would go unnoticed until the next measurement)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "audio"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        sf.write(d / f"{i % 10}_s{i % 3}_{i}.wav", 0.1 * rng.standard_normal(2000 + 37 * i), 8000, subtype="PCM_16")
    return d


def _run(script, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    if "forked no worker" in p.stderr:  # pragma: no cover - timing: the parent took every chunk
        pytest.skip("the worker took no chunk")
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_bench_featurize_runs_and_counts_every_file(folder, tmp_path):
    # a relative data folder: the manifest it writes elsewhere must still find the files
    out = _run("bench_featurize.py", os.path.relpath(folder, tmp_path), "--work", tmp_path / "w", "--repeats", "1",
               "--rows", "jobs1", "jobs2", "--json", tmp_path / "b.json", cwd=tmp_path)
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["jobs1"]["files"] == r["jobs2"]["files"] == 60 and r["jobs2"]["jobs"] == 2
    assert len(r["scaling_1_to_2_jobs_per_round"]) == 1 and "jobs2 / jobs1" in out


def test_featurize_timeline_reports_a_ceiling(folder, tmp_path):
    out = _run("featurize_timeline.py", folder, "--work", tmp_path / "w", "--repeat", "1",
               "--json", tmp_path / "t.json", cwd=tmp_path)
    r = json.loads((tmp_path / "t.json").read_text())
    two = r["median_round"]["2"]
    assert r["files"] == 60 and two["fork"] > 0 and two["worker_first_chunk_at"] >= two["pre_fork"]
    # structure, not speed (the figures depend on the machine's load): the ceiling is the
    # formula it prints, 2 T1 / (T1 + W), with W >= 0
    one = r["median_round"]["1"]
    assert r["unavoidable_s"] >= 0 and 0 < r["scaling_ceiling"] <= 2.0
    assert abs(r["scaling_ceiling"] - 2 * one["wall"] / (one["wall"] + r["unavoidable_s"])) < 1e-9
    assert f"ceiling on the scaling: 2 T1 / (T1 + W) = {r['scaling_ceiling']:.2f}x" in out
