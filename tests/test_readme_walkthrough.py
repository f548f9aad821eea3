"""The README's walkthrough and its weak-tags block run as written, in order, on tiny corpora, so
the README cannot drift.

Every ```bash block between "## Walkthrough" and "Ready-made pipelines" (and the block of
"## Weak tags") is run by bash
(`set -euo pipefail`) in a fresh folder, with the venv's `pllcli`/`python` first on PATH (the
Quickstart activates the venv). Only these substitutions are made (each must match, so a README
change that makes one stale fails here rather than silently testing less):

| README                                              | here                                         |
|-----------------------------------------------------|----------------------------------------------|
| `python ../shared/bench/make_chat_corpus.py ... chat` | the demo corpus (`pllcli.synth`, same layout), 100 + 20 messages (tests never read ../shared) |
| `--epochs N` on train / pretrain, or none             | `--epochs 1`                                  |
| `torchrun ...`                                        | skipped (tests/test_train_ddp.py runs torchrun) |
| `python ../shared/bench/make_weak_corpus.py ... weak`  | `make_weak_corpus` below (same layout: 3 s clips, 0-2 synthetic words over noise) |
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ("python -c \"from pllcli.synth import DemoCorpusSpec, make_demo_corpus; "
          "make_demo_corpus('chat', DemoCorpusSpec(train_messages=100, test_messages=20, seed=1))\"")


def _one_epoch(cmd: str) -> str:
    cmd = re.sub(r"--epochs \d+", "--epochs 1", cmd)
    return cmd if "--epochs" in cmd else cmd + " --epochs 1"


WEAK_CORPUS = (f"python -c \"import sys; sys.path.insert(0, {str(ROOT)!r}); "
               "from tests.test_readme_walkthrough import make_weak_corpus; make_weak_corpus('weak')\"")


def make_weak_corpus(out: str, n_train: int = 40, n_unlabeled: int = 10, n_test: int = 12, seed: int = 0) -> None:
    """A tiny corpus in make_weak_corpus.py's layout: clips.csv id,path,split; tags.csv (train split)
    and truth_tags.csv id,labels; strong.tsv id onset offset label; audio/*.wav (3 s, 8 kHz)."""
    import csv

    import numpy as np
    import soundfile as sf

    from pllcli.synth import Speaker, synth_word
    sr, words, rng = 8000, ["sun", "fish", "kite"], np.random.default_rng(seed)
    root = Path(out)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    clips, tags, strong = [], [], []
    splits = ["train"] * n_train + ["unlabeled"] * n_unlabeled + ["test"] * n_test
    for i, split in enumerate(splits):
        cid, x = f"clip_{i:04d}", 0.01 * rng.standard_normal(3 * sr).astype(np.float32)
        names = sorted(set(rng.choice(words, size=int(rng.integers(0, 3))).tolist()))
        for k, w in enumerate(names):  # one word per 1.5 s half, so events never overlap
            y = synth_word(w, Speaker.random(f"s{i}", rng), sr, rng)[: int(1.4 * sr)]
            a = int((1.5 * k + rng.uniform(0, 0.05)) * sr)
            x[a:a + len(y)] += y
            strong.append((cid, round(a / sr, 3), round((a + len(y)) / sr, 3), w))
        sf.write(root / "audio" / f"{cid}.wav", x, sr, subtype="PCM_16")
        clips.append((cid, f"audio/{cid}.wav", split))
        tags.append((cid, ";".join(names), split))

    def dump(name, header, rows, delimiter=","):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f, delimiter=delimiter)
            w.writerow(header)
            w.writerows(rows)
    dump("clips.csv", ["id", "path", "split"], clips)
    dump("tags.csv", ["id", "labels"], [t[:2] for t in tags if t[2] == "train"])
    dump("truth_tags.csv", ["id", "labels"], [t[:2] for t in tags])
    dump("strong.tsv", ["id", "onset", "offset", "label"], strong, "\t")


# (name, pattern matched against one logical command line, replacement: str or function)
MAPPING = [
    ("corpus", re.compile(r"^python \.\./shared/bench/make_chat_corpus\.py \S+ chat$"), lambda c: CORPUS),
    ("epochs", re.compile(r"^pllcli (train|pretrain) "), _one_epoch),
    ("torchrun", re.compile(r"^(\S+=\S+ )*torchrun "), lambda c: None),
    ("weak corpus", re.compile(r"^python \.\./shared/bench/make_weak_corpus\.py \S+ weak$"), lambda c: WEAK_CORPUS),
]
WALKTHROUGH_RULES = {"corpus", "epochs", "torchrun"}
WEAK_RULES = {"weak corpus", "epochs"}


def bash_commands(section: str) -> list[str]:
    """The logical command lines (continuations joined, comments dropped) of the ```bash blocks."""
    commands = []
    for block in re.findall(r"^( *)```bash\n(.*?)^\1```", section, flags=re.S | re.M):
        text = textwrap.dedent(block[1]).replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+", " ", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _section(readme: str, start: str, end: str) -> str:
    a = readme.index(start)
    return readme[a:readme.index(end, a)]


def walkthrough_commands(readme: str) -> list[str]:
    return bash_commands(_section(readme, "## Walkthrough", "Ready-made pipelines"))


def weak_commands(readme: str) -> list[str]:
    return bash_commands(_section(readme, "## Weak tags", "\n## "))


def run_as_written(cmds: list[str], rules: set[str], cwd: Path) -> None:
    """Map `cmds` (every rule in `rules` must apply) and run them with bash in `cwd`."""
    cmds, used = mapped(cmds)
    assert used == rules, f"stale substitutions: {rules - used}, unexpected: {used - rules}"
    (cwd / "examples").symlink_to(ROOT / "examples")
    (cwd / "walkthrough.sh").write_text("set -euo pipefail\n" + "\n".join(cmds) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MAKEFLAGS", None)
    r = subprocess.run(["bash", "-x", "walkthrough.sh"], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    # nothing it writes into the repository root would show up as untracked
    if shutil.which("git") and (ROOT / ".git").exists():
        written = sorted(p.name + ("/" if p.is_dir() else "") for p in cwd.iterdir()
                         if p.name not in ("walkthrough.sh", "examples"))
        kept = [w for w in written if subprocess.run(["git", "check-ignore", "-q", "--no-index", w],
                                                     cwd=ROOT).returncode != 0]
        assert not kept, f"the README's commands write {kept}: not in .gitignore"


def mapped(commands: list[str]) -> tuple[list[str], set[str]]:
    out, used = [], set()
    for cmd in commands:
        for name, pat, repl in MAPPING:
            if pat.search(cmd):
                used.add(name)
                cmd = repl(cmd)
                if cmd is None:
                    break
        if cmd is not None:
            out.append(cmd)
    return out, used


def test_walkthrough_extraction_sees_every_step():
    cmds = walkthrough_commands((ROOT / "README.md").read_text())
    assert cmds[0].startswith("python ../shared/bench/make_chat_corpus.py")
    assert not any(c.startswith(".venv/bin/") for c in cmds)  # one way to call it: the activated venv
    for stage in ("featurize", "build-candidates", "pretrain", "train", "pseudo-label", "evaluate", "predict",
                  "export"):
        assert any(c.startswith(f"pllcli {stage} ") for c in cmds), stage
    # the commands after training use the checkpoint to deploy (model.pt), not best/last/averaged.pt
    readers = [c for c in cmds + weak_commands((ROOT / "README.md").read_text())
               if c.startswith(("pllcli predict", "pllcli evaluate", "pllcli export", "pllcli pseudo-label"))]
    assert readers and all(".pt" not in c or "/model.pt" in c for c in readers), readers
    assert not any(x in c for c in readers for x in ("best.pt", "last.pt", "averaged.pt"))
    # every folder a command reads was made by an earlier command (the 'new_messages/' trap)
    predict_audio = [c for c in cmds if c.startswith("pllcli predict") and "new_messages" in c]
    made = [c for c in cmds[:cmds.index(predict_audio[0])] if "mkdir" in c and "new_messages" in c]
    assert made, "predict reads new_messages/ before a step creates it"


def test_quickstart_activates_the_venv_it_installs():
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quickstart"):readme.index("## Which stage when")]
    assert "source .venv/bin/activate" in quick and "\npllcli demo" in quick


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_walkthrough_runs_as_written(tmp_path):
    run_as_written(walkthrough_commands((ROOT / "README.md").read_text()), WALKTHROUGH_RULES, tmp_path)
    for path in ("feats/train.h5", "labels/chat.h5", "runs/encoder.pt", "runs/pll/model.pt", "runs/pll-ssl/model.pt",
                 "labels/pseudo.h5", "runs/student/model.pt", "runs/pll/test.json", "model.onnx"):
        assert (tmp_path / path).stat().st_size > 0, path
    new = (tmp_path / "new.csv").read_text().splitlines()
    assert len(new) == 1 + 10 and new[1].split(",")[0].startswith("test_00000")
    picked = (tmp_path / "train_labels.csv").read_text().splitlines()
    assert len(picked) > 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("make") is None, reason="bash/make missing")
def test_weak_tags_block_runs_as_written(tmp_path):
    cmds = weak_commands((ROOT / "README.md").read_text())
    assert cmds[0].startswith("python ../shared/bench/make_weak_corpus.py")
    run_as_written(cmds, WEAK_RULES, tmp_path)
    for path in ("runs/mil/model.pt", "runs/whenwho/model.pt", "labels/psl.h5", "runs/psl/model.pt",
                 "runs/whenwho/test.json"):
        assert (tmp_path / path).stat().st_size > 0, path
    assert len((tmp_path / "tags.csv").read_text().splitlines()) == 1 + 12  # every test clip predicted
