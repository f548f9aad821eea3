"""Training configs check themselves (before any store is read); the train/pretrain CLI grammar."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pllcli.errors import UsageError
from pllcli.training.config import (LRSchedule, Optimizer, PretrainConfig, PretrainObjective, TrainConfig,
                                    WeakConfig, WhenWhoMode)

MISSING = dict(features="/nonexistent/f.h5", labels="/nonexistent/l.h5", outdir="/nonexistent/run")


@pytest.mark.parametrize("kw,message", [
    ({"clean_share": 1.5}, r"--clean-share must be in [0, 1), got 1.5"),
    ({"clean_share": 0.6, "unlabeled_share": 0.5}, "--clean-share + --unlabeled-share must be < 1, got 0.6 + 0.5"),
    ({"epochs": 0}, "--epochs must be >= 1, got 0"),
    ({"lr": 0.0}, "--lr must be > 0, got 0.0"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"valid_fraction": 1.0}, "--valid-fraction must be in [0, 1), got 1.0"),
    ({"ema": 1.0}, "--ema must be in [0, 1), got 1.0"),
    ({"unlabeled_share": float("nan")}, "--unlabeled-share must be in [0, 1), got nan"),
    ({"objectives": []}, "--objective: need at least one objective"),
    ({"optimizer": "lion"}, "--optimizer must be one of adamw, adam, sgd, got 'lion'"),
    ({"lr_schedule": "step"}, "--lr-schedule must be one of cosine, cosine-restarts, onecycle, poly, constant"),
    ({"sampler": "bogus"}, "--sampler must be one of natural, hnh, balanced, got 'bogus'"),
])
def test_train_config_errors_name_the_flag(kw, message):
    with pytest.raises(UsageError) as e:
        TrainConfig(**MISSING, **kw)
    assert str(e.value).startswith(message)


def test_enums_coerced_and_plain_in_json():
    cfg = TrainConfig(**MISSING, optimizer="sgd", lr_schedule="cosine-restarts", sampler="hnh", clean_share=0.0)
    assert cfg.optimizer is Optimizer.sgd and cfg.lr_schedule is LRSchedule.cosine_restarts
    assert cfg.sampler == "hnh" and f"{cfg.sampler}" == "hnh" and str(cfg.optimizer) == "sgd"
    sem = cfg.semantic()
    assert json.loads(json.dumps(sem))["lr_schedule"] == "cosine-restarts"
    assert type(sem["optimizer"]) is str and "outdir" not in sem
    assert WeakConfig(mode="tied").mode is WhenWhoMode.tied
    assert PretrainConfig(objective="apc").objective is PretrainObjective.apc


@pytest.mark.parametrize("kw,message", [
    ({"mode": "stacked"}, "--when-who: unknown WHEN/WHO mode 'stacked'"),
    ({"batch_size": 1}, "--batch-size must be >= 2, got 1"),
    ({"when_pooling": "median"}, "unknown WHEN loss 'median'"),
    ({"tasks": ()}, "WHEN/WHO tasks must be a non-empty subset"),
])
def test_weak_config_errors(kw, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        WeakConfig(**kw)


@pytest.mark.parametrize("kw,message", [
    ({"objective": "bert"}, "--objective must be one of contrastive, masked, apc, got 'bert'"),
    ({"mask_ratio": 1.2}, "--mask-ratio must be in (0, 1), got 1.2"),
    ({"temperature": 0}, "--temperature must be > 0, got 0"),
    ({"epochs": 0}, "--epochs must be >= 1, got 0"),
])
def test_pretrain_config_errors(kw, message):
    with pytest.raises(UsageError) as e:
        PretrainConfig(**kw)
    assert str(e.value) == message


# ------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("args,message", [
    (["--clean-share", "1.5"], "error: --clean-share must be in [0, 1), got 1.5"),
    (["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
    (["--augment", "foo=1"], "error: --augment: unknown key 'foo' (valid: gain_db, shift, time_masks"),
    (["--augment", "shift=abc"], "error: --augment: key 'shift' expects int, got 'abc'"),
    (["--model-opt", "widht=8"], "error: --model-opt: unknown key 'widht' for model convgru (valid: width,"),
    (["--objective", "cr:lam=x"], "error: --objective cr: key 'lam' expects float, got 'x'"),
])
def test_train_cli_checks_options_before_opening_stores(cli_inproc, tmp_path, args, message):
    """The stores do not exist: the option error must come first (not 'no such feature store')."""
    code, out, err = cli_inproc("train", tmp_path / "none.h5", "--labels", tmp_path / "none_l.h5",
                                "-o", tmp_path / "run", *args)
    assert code == 2 and err.startswith(message), err
    assert not (tmp_path / "run").exists()


def test_pretrain_cli_checks_options_before_opening_stores(cli_inproc, tmp_path):
    code, _, err = cli_inproc("pretrain", tmp_path / "none.h5", "-o", tmp_path / "x.pt", "--mask-ratio", "1")
    assert code == 2 and err.startswith("error: --mask-ratio must be in (0, 1), got 1.0"), err
    code, _, err = cli_inproc("pretrain", tmp_path / "none.h5", "-o", tmp_path / "x.pt", "--model-opt", "gru=2")
    assert code == 2 and "--model-opt: unknown key 'gru' for model convgru" in err


def _command(name):
    import typer.main

    from pllcli.cli.app import app
    return typer.main.get_command(app).commands[name]


def test_closed_choices_are_enums_listed_in_help(cli_inproc, monkeypatch, tmp_path):
    stores = (tmp_path / "f.h5", "--labels", tmp_path / "l.h5", "-o", tmp_path / "run")
    for flag, bad, listed in (("--lr-schedule", "step", "'cosine', 'cosine-restarts', 'onecycle', 'poly', 'constant'"),
                              ("--optimizer", "lion", "'adamw', 'adam', 'sgd'"),
                              ("--sampler", "bogus", "'natural', 'hnh', 'balanced'"),
                              ("--when-who", "both", "'separate', 'joint', 'tied'")):
        code, _, err = cli_inproc("train", *stores, flag, bad)
        assert code == 2 and flag in err and f"'{bad}' is not one of {listed}" in err, err
    code, _, err = cli_inproc("pretrain", tmp_path / "f.h5", "-o", tmp_path / "x.pt", "--objective", "bert")
    assert code == 2 and "'bert' is not one of 'contrastive', 'masked', 'apc'" in err
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = cli_inproc("train", "--help")
    assert code == 0 and "cosine-restarts|onecycle" in out and "natural|hnh|balanced" in out
    for flag, words in (("--epochs", "Passes over"), ("--lr ", "Peak learning rate"), ("--weight-decay", "Weight decay")):
        line = next(ln for ln in out.splitlines() if flag in ln)
        assert words in line, line
    assert "--outdir" not in out and "<bool>" not in out


def test_every_train_and_pretrain_option_has_help_and_no_raw_type():
    checked = 0
    for name in ("train", "pretrain"):
        for p in _command(name).params:
            if getattr(p, "hidden", False) or p.param_type_name == "argument":
                continue
            assert p.help, f"{name} {p.opts} has no help"
            assert "list[" not in str(p.metavar or ""), p.opts
            checked += 1
    assert checked > 50


def test_list_objectives_and_models_show_keys_types_defaults(cli_inproc):
    code, out, _ = cli_inproc("train", "--list-objectives")
    assert code == 0
    lines = out.splitlines()
    cc = lines.index(next(ln for ln in lines if ln.startswith("cc ")))
    assert lines[cc + 1] == "    eps: float = 0.0"
    assert "    teacher: bool = False" in lines and "    weight: float = 1.0" in lines
    code, out, _ = cli_inproc("train", "--list-models")
    lines = out.splitlines()
    i = lines.index(next(ln for ln in lines if ln.startswith("convgru ")))
    assert code == 0 and lines[i + 1] == "    width: int = 8" and "    utt_norm: bool = False" in lines


def test_train_prints_what_it_wrote_and_accepts_deprecated_outdir(cli_inproc, tmp_path, monkeypatch):
    import pllcli.training.trainer as T
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        out = Path(cfg.outdir)
        out.mkdir()
        for name in ("best.pt", "last.pt", "averaged.pt", "log.jsonl", "summary.json"):
            (out / name).write_text("x")
        return {"ok": 1}
    monkeypatch.setattr(T, "train", fake_train)
    code, out, err = cli_inproc("train", tmp_path / "f.h5", "--labels", tmp_path / "l.h5", "--outdir", tmp_path / "run",
                                "--augment", "none", "--augment", "shift=3", "--model-opt", "utt_norm=yes")
    assert code == 0, err
    assert "--outdir is deprecated" in err
    assert out.splitlines() == [str(tmp_path / "run" / n)
                                for n in ("best.pt", "last.pt", "averaged.pt", "log.jsonl", "summary.json")]
    cfg = seen["cfg"]
    assert cfg.augment["shift"] == 3 and cfg.augment["time_masks"] == 0 and cfg.model_options == {"utt_norm": True}
    # --json -: stdout carries the figures, so the paths go to stderr
    code, out, err = cli_inproc("train", tmp_path / "f.h5", "--labels", tmp_path / "l.h5", "-o", tmp_path / "run2",
                                "--json", "-")
    assert code == 0 and json.loads(out) == {"ok": 1} and str(tmp_path / "run" / "best.pt") not in out
    assert str(tmp_path / "run2" / "best.pt") in err.splitlines()


def test_train_requires_output_and_labels(cli_inproc, tmp_path):
    code, _, err = cli_inproc("train", tmp_path / "f.h5", "--labels", tmp_path / "l.h5")
    assert code == 2 and "missing option -o/--output" in err
    code, _, err = cli_inproc("train", tmp_path / "f.h5", "-o", tmp_path / "run")
    assert code == 2 and "--labels" in err


def test_when_who_refuses_flags_it_would_ignore(cli_inproc, tmp_path):
    code, _, err = cli_inproc("train", tmp_path / "f.h5", "--labels", tmp_path / "l.h5", "-o", tmp_path / "run",
                              "--when-who", "joint", "--objective", "ce", "--sampler", "hnh")
    assert code == 2 and "--when-who does not use --objective, --sampler" in err


def test_config_file_gives_defaults_flags_override_unknown_keys_name_the_file(cli_inproc, tmp_path, monkeypatch):
    import pllcli.training.trainer as T
    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg: seen.setdefault("cfg", cfg) and {})
    conf = tmp_path / "exp.toml"
    conf.write_text(f'features = "{tmp_path / "f.h5"}"\nlabels = "{tmp_path / "l.h5"}"\noutput = "{tmp_path / "run"}"\n'
                    'epochs = 7\nclean_share = 0.1\nlr-schedule = "poly"\nobjective = ["cc:eps=0.01", "ce"]\n'
                    'freeze = true\nmodel-opt = "width=4"\n')
    code, _, err = cli_inproc("train", "--config", conf, "--epochs", "3")
    assert code == 0, err
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.clean_share, cfg.lr_schedule, cfg.freeze) == (3, 0.1, "poly", True)
    assert cfg.objectives == ["cc:eps=0.01", "ce"] and cfg.model_options == {"width": 4}
    assert cfg.labels == str(tmp_path / "l.h5") and cfg.outdir == str(tmp_path / "run")
    conf.write_text(conf.read_text() + "clean-shares = 0.2\n")
    code, _, err = cli_inproc("train", "--config", conf)
    assert code == 2 and err.startswith(f"error: {conf}: unknown key 'clean-shares' (valid: alpha, augment,"), err
    conf.write_text('labels = "l.h5"\noutput = "run"\nclean-share = 1.5\n')
    code, _, err = cli_inproc("train", tmp_path / "none.h5", "--config", conf)
    assert code == 2 and "--clean-share must be in [0, 1), got 1.5" in err


def test_when_who_model_opt_is_checked_against_whenwho(cli_inproc, tmp_path):
    """--when-who sets `shared` itself (by mode): not a --model-opt key; the stores do not exist."""
    base = ("train", tmp_path / "f.h5", "--labels", tmp_path / "l.h5", "-o", tmp_path / "run", "--when-who", "joint")
    code, _, err = cli_inproc(*base, "--model-opt", "shared=no")
    assert code == 2 and err.startswith("error: --model-opt: unknown key 'shared' for model whenwho (valid: width,"), err
    code, _, err = cli_inproc(*base, "--batch-size", "1")
    assert code == 2 and "--batch-size must be >= 2, got 1" in err


def test_pretrain_augment_is_typed_over_the_view_defaults(cli_inproc, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import pllcli.features.store as S
    import pllcli.pretrain as P
    seen = {}
    monkeypatch.setattr(S, "FeatureStore", lambda p: SimpleNamespace(config=SimpleNamespace(sample_rate=16000,
                                                                                           hop_length=160)))
    monkeypatch.setattr(P, "pretrain", lambda *a, **kw: seen.update(kw) or {"clips": 2, "final_loss": 0.5})
    (tmp_path / "a.h5").write_text("")
    code, _, err = cli_inproc("pretrain", tmp_path / "a.h5", "-o", tmp_path / "x.pt", "--augment", "mix_prob=0,fill=mean")
    assert code == 0, err
    aug = seen["augment"]
    assert (aug.mix_prob, aug.fill, aug.noise_std) == (0.0, "mean", 0.2)  # noise_std: the views' default
    code, _, err = cli_inproc("pretrain", tmp_path / "a.h5", "-o", tmp_path / "y.pt", "--augment", "mixprob=0")
    assert code == 2 and err.startswith("error: --augment: unknown key 'mixprob' (valid: gain_db,"), err


@pytest.mark.parametrize("frontend,rate,user,want", [
    ("logmel", 100.0, {}, {"shift": 10, "gain_db": 6.0}),              # the log-mel defaults, unchanged
    ("encoder", 12.5, {}, {"shift": 1, "gain_db": 0.0}),               # 0.1 s = 1 frame; no gain on embeddings
    ("encoder", 50.0, {"shift": 7, "gain_db": 2.0}, {"shift": 7, "gain_db": 2.0}),  # --augment wins
    ("logmel", 100.0, {"time_masks": 0}, {"shift": 10, "time_masks": 0}),
])
def test_train_augment_defaults_follow_the_store_frames(frontend, rate, user, want):
    from types import SimpleNamespace

    import torch

    from pllcli.training.trainer import _augment
    feats = SimpleNamespace(frontend=frontend, sample_rate=16000, hop_length=int(16000 / rate))
    model = SimpleNamespace(encoder=SimpleNamespace(norm=SimpleNamespace(mean=torch.zeros(4))))
    cfg = SimpleNamespace(augment=user)
    aug = _augment(cfg, model, feats).cfg
    assert {k: getattr(aug, k) for k in want} == want
