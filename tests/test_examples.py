"""examples/Makefile.*: every Makefile parses, `help` and dry runs show pllcli calls; one real run of
the chat Makefile (featurize -> build-candidates -> train -> evaluate) on a tiny synthetic corpus."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="GNU make not installed")


def _env():
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MAKEFLAGS", None)
    env.pop("MFLAGS", None)
    return env


def make(name, *args, dry=True, timeout=600):  # the timeout only stops a hang
    cmd = [MAKE, "--no-print-directory", "-f", str(EXAMPLES / f"Makefile.{name}")]
    cmd += ["-n"] if dry else []
    r = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"make {' '.join(cmd[1:] + list(map(str, args)))} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")


@pytest.mark.parametrize("name", ["chat", "ssl", "weak", "export"])
def test_help_is_default_and_lists_targets(name):
    out = make(name, "help")
    assert "pllcli" in out and "clean" in out
    real = make(name, dry=False)  # the default target is help: it prints and runs nothing
    assert "targets:" in real and "parameters" in real and "OUT=" in real


def test_chat_dry_run(tmp_path):
    data = tmp_path / "data"
    _touch(*(data / f for f in ("voice.csv", "chat.csv", "clean.csv", "unlabeled.csv", "test.csv")))
    out = make("chat", f"DATA={data}", f"OUT={tmp_path / 'out'}", "EPOCHS=3", "all")
    for stage in ("pllcli featurize", "pllcli build-candidates", "--next 10", "--weights delay-prior",
                  "--vocab", "pllcli train", "--epochs 3", "pllcli evaluate", "--restrict-candidates",
                  "pllcli pseudo-label", "pllcli export", "--check"):
        assert stage in out, stage
    # pseudo-label restricts with a label store path, like predict (a bare flag is a usage error now)
    assert f"--restrict-candidates {tmp_path / 'out'}/labels.h5 --threshold" in out
    assert f"build-candidates -o {tmp_path / 'out'}/labels.h5" in out
    assert f"featurize {tmp_path / 'out'}/train_audio.csv -o {tmp_path / 'out'}/train.h5" in out


def test_makefile_data_defaults_match_the_readme():
    """The corpus targets default to ../shared next to the clone (as the README's walkthrough), and
    every default data/output folder sits under the ignored runs/."""
    readme = (ROOT / "README.md").read_text()
    assert "python ../shared/bench/make_chat_corpus.py ../shared/data/fsdd/recordings chat" in readme
    assert make("chat", "corpus").split() == ["python", "../shared/bench/make_chat_corpus.py",
                                              "../shared/data/fsdd/recordings", "runs/data/chat-fsdd"]
    assert make("weak", "corpus").split() == ["python", "../shared/bench/make_weak_corpus.py",
                                              "../shared/data/fsdd/recordings", "runs/data/weak"]
    for name in ("chat", "ssl", "weak", "export"):
        text = (EXAMPLES / f"Makefile.{name}").read_text()
        assert "/work/" not in text, name
    assert "/work/" not in (EXAMPLES / "README.md").read_text()


def test_ddp_sets_threads_so_torchrun_prints_no_banner(tmp_path):
    data = tmp_path / "data"
    _touch(*(data / f for f in ("voice.csv", "chat.csv", "clean.csv", "unlabeled.csv", "test.csv")))
    out = make("chat", f"DATA={data}", f"OUT={tmp_path / 'out'}", "ddp")
    line = next(ln for ln in out.splitlines() if "torchrun" in ln)
    assert line.startswith("OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m pllcli train")
    readme = (ROOT / "README.md").read_text()
    assert all(ln.lstrip().startswith("OMP_NUM_THREADS=") for ln in readme.splitlines()
               if ln.lstrip().startswith(("torchrun", "OMP_NUM_THREADS")) and "torchrun" in ln)


def test_ssl_dry_run(tmp_path):
    fsdd = tmp_path / "recordings"
    fsdd.mkdir()
    out = make("ssl", f"FSDD={fsdd}", f"OUT={tmp_path / 'out'}", "EPOCHS=2", "all")
    for stage in ("pllcli featurize", "pllcli build-candidates", "pllcli pretrain", "--init",
                  "--freeze", "--objective fixmatch", "pllcli evaluate"):
        assert stage in out, stage


def test_weak_dry_run(tmp_path):
    data = tmp_path / "data"
    _touch(data / "clips.csv", data / "tags.csv", data / "truth_tags.csv", data / "strong.tsv")
    out = make("weak", f"DATA={data}", f"OUT={tmp_path / 'out'}", "EPOCHS=2", "all")
    for stage in ("pllcli featurize", "pllcli build-candidates", "--tags", "--strong",
                  "--objective multilabel-bce", "--objective mil", "pllcli evaluate"):
        assert stage in out, stage


def test_export_dry_run(tmp_path):
    ckpt, wav = tmp_path / "best.pt", tmp_path / "clip.wav"
    _touch(ckpt, wav)
    out = make("export", f"CKPT={ckpt}", f"WAV={wav}", f"OUT={tmp_path / 'out'}", "all")
    assert "--format onnx --check" in out and "--format torchscript --check" in out
    assert "onnx_classify.py" in out


def test_chat_class_list_from_test_words(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.csv").write_text("id,path,label\na,a.wav,two zero\nb,b.wav,one one\n")
    make("chat", f"DATA={data}", f"OUT={tmp_path / 'out'}", str(tmp_path / "out" / "classes.txt"), dry=False)
    classes = (tmp_path / "out" / "classes.txt").read_text().splitlines()
    assert classes == [f"{a} {b}" for a in ("zero", "one", "two") for b in ("zero", "one", "two")]


def test_chat_makefile_evaluate_end_to_end(tmp_path):
    from pllcli.synth import DemoCorpusSpec, make_demo_corpus
    spec = DemoCorpusSpec(train_messages=80, test_messages=20)
    corpus = tmp_path / "corpus"
    make_demo_corpus(corpus, spec)
    (corpus / "classes.txt").write_text("\n".join(spec.classes()) + "\n")
    out = tmp_path / "out"
    args = [f"DATA={corpus}", f"OUT={out}", f"VOCAB={corpus / 'classes.txt'}", "EPOCHS=1", "JOBS=1",
            "DEVICE=cpu", "TRAIN_ARGS=--batch-size 32"]
    make("chat", *args, "evaluate", dry=False)
    metrics = json.loads((out / "pll" / "test_metrics.json").read_text())
    assert metrics["clip"]["n_items"] == 20 and metrics["num_classes"] == 25  # every test message, every class
    # file targets: a second run has nothing to do
    again = make("chat", *args, "evaluate", dry=False)
    assert "pllcli" not in again
