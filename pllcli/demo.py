"""`pllcli demo`: the whole voice-message-plus-chat pipeline on an embedded corpus.

It synthesises a small corpus (pllcli.synth), then runs the real commands one by one,
printing each as `$ pllcli ...` so that a newcomer can copy them:

    featurize -> build-candidates -> train (PLL default, and an oracle on true labels)
    -> evaluate -> predict (disambiguate the training set) -> export (ONNX, checked)

and ends with a summary: test accuracy of the PLL model against the oracle, the share
of training messages whose chat text it picked correctly, and where each artefact is.
"""
from __future__ import annotations

import csv
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pllcli.errors import PllcliError

log = logging.getLogger(__name__)

SIZES = {
    # name: (train messages, test messages, epochs)
    "default": (1500, 300, 12),
    "small": (500, 150, 10),
    "tiny": (120, 40, 2),
}


@dataclass
class DemoResult:
    outdir: Path
    figures: dict = field(default_factory=dict)
    artefacts: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)  # (name, seconds)


class _Runner:
    """Runs pllcli commands in subprocesses, echoing them and timing them. Their stderr (logs,
    per-epoch progress of train) goes straight to ours, so a long stage is never silent."""

    def __init__(self, result: DemoResult, echo: bool = True, quiet: bool = False):
        self.result, self.echo, self.quiet = result, echo, quiet

    def __call__(self, stage: str, *args) -> str:
        argv = [str(a) for a in args]
        if self.echo:
            print("$ pllcli " + " ".join(shlex.quote(a) for a in argv), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pllcli", *(["-q"] if self.quiet else []), *argv],
                           stdout=subprocess.PIPE, text=True)
        self.result.stages.append((stage, round(time.perf_counter() - t0, 1)))
        if r.returncode != 0:
            raise PllcliError(f"demo stage '{stage}' failed (exit {r.returncode}); its error is printed above")
        return r.stdout


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run_demo(outdir: str | Path, size: str = "default", epochs: int | None = None,
             seed: int = 0, echo: bool = True, quiet: bool = False) -> DemoResult:
    """Build the demo corpus in OUTDIR and run the pipeline; return figures and artefact paths."""
    from pllcli.synth import DemoCorpusSpec, make_demo_corpus

    if size not in SIZES:
        raise PllcliError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    n_train, n_test, default_epochs = SIZES[size]
    epochs = epochs or default_epochs
    out = Path(outdir)
    res = DemoResult(outdir=out)
    run = _Runner(res, echo=echo, quiet=quiet)
    corpus, feats, labels, runs = out / "corpus", out / "features", out / "labels", out / "runs"
    for d in (feats, labels, runs):
        d.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    spec = DemoCorpusSpec(train_messages=n_train, test_messages=n_test, seed=seed)
    if echo:
        print(f"# synthesising {n_train} voice messages + {n_test} test messages "
              f"({spec.vocab_size ** spec.words_per_message} classes) in {corpus}", file=sys.stderr)
    info = make_demo_corpus(corpus, spec)
    res.stages.append(("synthesise corpus", round(time.perf_counter() - t0, 1)))
    (corpus / "classes.txt").write_text("\n".join(spec.classes()) + "\n")

    # Feature manifests: typed voice messages + unlabeled ones for training; test separately.
    voice, unlabeled = _read_csv(corpus / "voice.csv"), _read_csv(corpus / "unlabeled.csv")
    with open(corpus / "train_audio.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        w.writerows([(r["id"], r["path"]) for r in voice + unlabeled])
    truth = _read_csv(corpus / "truth.csv")
    with open(corpus / "oracle_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([(r["id"], r["label"]) for r in truth if r["split"] == "train"])

    run("featurize", "featurize", corpus / "train_audio.csv", "-o", feats / "train.h5", "--overwrite")
    run("featurize", "featurize", corpus / "test.csv", "-o", feats / "test.h5", "--overwrite")
    run("build-candidates", "build-candidates", "-o", labels / "chat.h5", "--voice", corpus / "voice.csv",
        "--chat", corpus / "chat.csv", "--next", 10, "--clean", corpus / "clean.csv",
        "--weights", "delay-prior", "--unlabeled", corpus / "unlabeled.csv",
        "--vocab", corpus / "classes.txt", "--json", labels / "chat_stats.json", "--overwrite")
    run("build-candidates (oracle)", "build-candidates", "-o", labels / "oracle.h5",
        "--simulate-from", corpus / "oracle_labels.csv", "--set-size", 1, "--clean-share", 1,
        "--unlabeled", corpus / "unlabeled.csv", "--vocab", corpus / "classes.txt", "--overwrite")

    common = ["--epochs", epochs, "--seed", seed]
    for name in ("pll", "oracle"):  # the demo owns these folders: start each run afresh
        shutil.rmtree(runs / name, ignore_errors=True)
    run("train (PLL default)", "train", feats / "train.h5", "--labels", labels / "chat.h5",
        "-o", runs / "pll", *common)
    run("train (oracle)", "train", feats / "train.h5", "--labels", labels / "oracle.h5",
        "-o", runs / "oracle", *common)

    figures = {}
    for name in ("pll", "oracle"):
        run(f"evaluate ({name})", "evaluate", runs / name / "model.pt", feats / "test.h5",
            corpus / "test.csv", "--json", runs / name / "test_metrics.json")
        figures[f"{name}_test_accuracy"] = json.loads((runs / name / "test_metrics.json").read_text())["clip"]["accuracy"]

    run("predict (disambiguate)", "predict", runs / "pll" / "model.pt", feats / "train.h5",
        "--restrict-candidates", labels / "chat.h5", "-o", runs / "pll" / "train_disambiguated.csv")
    picked = {r["id"]: r["label"] for r in _read_csv(runs / "pll" / "train_disambiguated.csv")}
    typed = [r for r in truth if r["split"] == "train"]
    figures["disambiguation_accuracy"] = sum(picked.get(r["id"]) == r["label"] for r in typed) / max(1, len(typed))

    run("export (ONNX, checked)", "export", runs / "pll" / "model.pt", "-o", runs / "pll" / "model.onnx",
        "--check", corpus / "audio" / f"{_read_csv(corpus / 'test.csv')[0]['id']}.wav")

    stats = json.loads((labels / "chat_stats.json").read_text())
    figures.update({
        "classes": info["classes"],
        "typed_messages": info["counts"]["typed"],
        "clean_labels": info["counts"]["clean"],
        "unlabeled_messages": info["counts"]["unlabeled"],
        "candidate_coverage_estimate": stats.get("coverage_estimate"),
        "mean_set_size": stats.get("mean_set_size"),
        "pll_over_oracle": figures["pll_test_accuracy"] / max(1e-9, figures["oracle_test_accuracy"]),
        "wall_seconds": round(sum(s for _, s in res.stages), 1),
    })
    res.figures = figures
    res.artefacts = {
        "corpus": str(corpus), "train features": str(feats / "train.h5"), "test features": str(feats / "test.h5"),
        "label store": str(labels / "chat.h5"), "PLL checkpoint": str(runs / "pll" / "model.pt"),
        "oracle checkpoint": str(runs / "oracle" / "model.pt"), "training log": str(runs / "pll" / "log.jsonl"),
        "disambiguated train labels": str(runs / "pll" / "train_disambiguated.csv"),
        "ONNX model": str(runs / "pll" / "model.onnx"),
    }
    return res
