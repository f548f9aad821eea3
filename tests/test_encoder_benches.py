"""Issue 15 on tiny generated data (a tiny ONNX frames graph, no network): the `pooled` model,
`examples/bench_ssl.py --encoder`, `examples/bench_encoder.py --cost` and
`examples/bench_weak.py --encoder`."""
import json

import numpy as np
import pytest
import torch

from pllcli.checkpoint import load_model, save_checkpoint
from pllcli.errors import UsageError
from pllcli.models import build_model, list_models
from tests.conftest import load_example
from tests.test_encoders import _Frames, _export


@pytest.fixture
def frames_onnx(tmp_path):
    """onnx:FILE spec of a (B, S) -> (B, T', 4) graph (hop 8, receptive field 16 samples)."""
    return f"onnx:{_export(_Frames().eval(), torch.zeros(1, 64), tmp_path / 'frames.onnx', 'wave')}"


# ------------------------------------------------------------------ pooled model

@pytest.mark.parametrize("opts", [{}, {"hidden": 8}, {"hidden": 8, "rnn_hidden": 4, "pool": "attention"},
                                  {"utt_norm": True}])
def test_pooled_shapes_padding_exact_and_no_time_stride(opts):
    torch.manual_seed(0)
    m = build_model("pooled", 6, 3, **opts).eval()
    x, lengths = torch.randn(3, 9, 6), torch.tensor([9, 5, 2])
    out = m(x, lengths)
    assert out["logits"].shape == (3, 3)
    assert m.encoder(x, lengths)["frame_lengths"].tolist() == [9, 5, 2]      # every input frame kept
    x2 = x.clone()
    x2[1, 5:] = 50.0                                                         # past item 1's end
    assert torch.allclose(m(x2, lengths)["logits"], out["logits"], atol=1e-5)
    x2[1, 4] = 50.0                                                          # its last valid frame
    assert not torch.allclose(m(x2, lengths)["logits"][1], out["logits"][1], atol=1e-3)
    assert m.config["name"] == "pooled" and build_model(**m.config)


def test_pooled_default_is_linear_on_mean_and_max_of_normalised_frames():
    m = build_model("pooled", 4, 2, dropout=0.0).eval()
    m.encoder.norm.set_stats(torch.ones(4), torch.full((4,), 2.0))
    x = torch.randn(1, 7, 4)
    z = (x[0] - 1) / 2
    feats = torch.cat([z.mean(0), z.max(0).values])
    assert torch.allclose(m(x)["logits"][0], m.head(feats), atol=1e-5)
    assert sum(p.numel() for p in m.parameters()) == 2 * 8 + 2                # the head only


def test_pooled_registered_bad_options_and_checkpoint(tmp_path):
    assert "pooled" in list_models()
    with pytest.raises(UsageError, match="bad option"):
        build_model("pooled", 4, 2, pool="median")
    with pytest.raises(UsageError, match="bad option"):
        build_model("pooled", 4, 2, hidden=-1)
    m = build_model("pooled", 4, 2, hidden=3).eval()
    save_checkpoint(tmp_path / "m.pt", m, {"kind": "classifier", "classes": ["a", "b"], "task": "single"})
    m2, meta = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 5, 4)
    assert meta["model"]["hidden"] == 3 and torch.allclose(m(x)["logits"], m2.eval()(x)["logits"])


# ------------------------------------------------------------------ bench_ssl.py --encoder

def _fsdd_like(folder, takes=7):
    import soundfile as sf
    folder.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(1600) / 8000
    for d in range(10):
        for take in range(takes):
            sf.write(folder / f"{d}_spk_{take}.wav", (0.3 * np.sin(2 * np.pi * (200 + 150 * d) * t)
                                                      + 0.01 * rng.standard_normal(1600)).astype(np.float32), 8000)
    return folder


def test_bench_ssl_encoder_rows(tmp_path, frames_onnx, capsys):
    data = _fsdd_like(tmp_path / "rec")
    work = tmp_path / "work"
    bench = load_example("bench_ssl")
    methods = "supervised,fixmatch,pseudo-label student,full labels"
    bench.main([str(data), "--work", str(work), "--encoder", frames_onnx, "--model", "pooled", "--model-opt",
                "hidden=8", "--student-init", "none", "--per-class", "1", "--epochs", "1", "--sup-epochs", "2",
                "--full-epochs", "1", "--threads", "1", "--augment", "time_masks=1", "--methods", methods,
                "--json", str(tmp_path / "b.json")])
    out = json.loads((tmp_path / "b.json").read_text())
    assert sorted(out["results"]) == sorted(methods.split(","))
    assert all(0 <= v <= 1 for v in out["results"].values())
    assert out["features"].startswith("encoder") and out["model"] == {"name": "pooled", "hidden": 8}
    # encoder defaults: no feature-axis warp, a 1-frame shift; --augment overrides a key
    assert out["augment"]["freq_warp"] == 0.0 and out["augment"]["shift"] == 1 and out["augment"]["time_masks"] == 1
    assert "--model pooled" in out["commands"]["supervised"] and "--init" not in out["commands"]["pseudo-label student"]
    assert len(list(work.glob("fsdd_*.h5"))) == 1 and not list(work.glob("enc_*.pt"))   # no pretraining
    assert "best/full" in capsys.readouterr().out


# ------------------------------------------------------------------ bench_encoder.py --cost

def _weak_like(folder, n=7):
    """clips.csv / tags.csv / truth_tags.csv / strong.tsv of n 1 s clips (first half train, then
    one unlabeled, the rest test), a tone burst at 0.3-0.6 s in every clip with a tag."""
    import soundfile as sf
    (folder / "audio").mkdir(parents=True)
    rng = np.random.default_rng(1)
    clips, tags, strong = ["id,path,split"], ["id,labels"], ["id\tonset\toffset\tlabel"]
    truth = ["id,labels"]
    for i in range(n):
        split = "train" if i < n // 2 else ("unlabeled" if i == n // 2 else "test")
        x = 0.01 * rng.standard_normal(8000).astype(np.float32)
        lab = "ab"[i % 2] if i % 3 else ""
        if lab:
            t = np.arange(2400) / 8000
            x[2400:4800] += 0.3 * np.sin(2 * np.pi * (300 if lab == "a" else 900) * t).astype(np.float32)
            strong.append(f"c{i}\t0.3\t0.6\t{lab}")
        sf.write(folder / "audio" / f"c{i}.wav", x, 8000)
        clips.append(f"c{i},audio/c{i}.wav,{split}")
        truth.append(f"c{i},{lab}")
        if split == "train":
            tags.append(f"c{i},{lab}")
    for name, rows in (("clips.csv", clips), ("tags.csv", tags), ("truth_tags.csv", truth), ("strong.tsv", strong)):
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def test_bench_encoder_cost_rows_and_reuse(tmp_path, frames_onnx, capsys):
    data = _weak_like(tmp_path / "weak")
    bench = load_example("bench_encoder")
    argv = ["--cost", str(data / "clips.csv"), "--cost-dir", str(tmp_path / "c"), "--encoder", frames_onnx,
            "--baseline", "--json", str(tmp_path / "cost.json")]
    bench.main(argv)
    rows = json.loads((tmp_path / "cost.json").read_text())["cost"]
    assert [r["dim"] for r in rows] == [4, 64, 40] and all(r["clips"] == 7 for r in rows)
    assert all(r["x_real_time"] > 0 and r["store_mb"] > 0 and "reused" not in r for r in rows)
    # 16 kHz / hop 8 = 2000 frames per second of audio (minus the receptive field); log-mel 100 / 31.25
    assert rows[0]["frames_per_second"] == pytest.approx(1999, abs=2)
    assert rows[1]["frames_per_second"] == pytest.approx(100, rel=0.1)                # 1 s clips: edge frames
    assert rows[2]["frames_per_second"] == pytest.approx(31.25, rel=0.1)
    assert (tmp_path / "c" / "feats_h256_m40.h5").exists()
    bench.main(argv)                                                      # second call reuses the stores
    assert all(r.get("reused") for r in json.loads((tmp_path / "cost.json").read_text())["cost"])
    assert "x real" in capsys.readouterr().out


# ------------------------------------------------------------------ bench_weak.py --encoder

def test_encoder_align_repeats_edge_frames():
    bench = load_example("bench_weak")
    f = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert bench.encoder_align(f, 0) is f
    assert bench.encoder_align(f, 2)[:, 0].tolist() == [0, 0, 0, 2, 4, 4, 4]


def test_bench_weak_encoder_run(tmp_path, frames_onnx):
    data = _weak_like(tmp_path / "weak")
    bench = load_example("bench_weak")
    out = tmp_path / "out"
    D = bench.load(data, out, frames_onnx)
    assert D["Xtr"].shape[2] == 4 and D["hop"] == pytest.approx(8 / 16000) and D["align_frames"] == 1
    assert D["features"].startswith("encoder") and len(list(out.glob("feats_*.h5"))) == 1
    # 1 s = 16000 samples -> 1 + (16000 - 16) // 8 frames, plus one repeated frame at each end
    assert int(D["Ltr"][0]) == 1 + (16000 - 16) // 8 + 2
    assert bench.load(data, out, frames_onnx, align=False)["Xtr"].shape[1] == 1 + (16000 - 16) // 8
    rc = bench.main([str(data), "--out", str(out), "--encoder", frames_onnx, "--epochs", "1", "--width", "4",
                     "--batch-size", "2", "--crnn-poolings", "none", "--base-when-pooling", "attention",
                     "--base-who-sampler", "balanced", "--only", "separate_attention_hnh_balanced",
                     "--json", str(tmp_path / "w.json")])
    res = json.loads((tmp_path / "w.json").read_text())
    assert rc == 0 and res["mel_pool"] == 1 and res["encoder"] == frames_onnx and res["encoder_align_frames"] == 1
    r = res["results"]["separate_attention_hnh_balanced"]
    assert 0 <= r["who_mAP"] <= 1 and 0 <= r["when_frame_auc"] <= 1


# ------------------------------------------------------------------ chat_unseen_ceiling.py

def test_voiced_parts_cut_messages_in_the_middle_of_each_pause():
    ceiling = load_example("chat_unseen_ceiling")
    sr = 16000
    rng = np.random.default_rng(0)
    tone = lambda s: 0.3 * np.sin(2 * np.pi * 300 * np.arange(int(s * sr)) / sr)  # noqa: E731
    x = np.concatenate([np.zeros(int(0.1 * sr)), tone(0.4), np.zeros(int(0.2 * sr)), tone(0.3), np.zeros(int(0.1 * sr))])
    x = (x + 1e-3 * rng.standard_normal(len(x))).astype(np.float32)
    parts = ceiling.voiced_parts(x, sr)
    assert len(parts) == 2 and parts[0][0] == 0 and parts[1][1] == len(x) and parts[0][1] == parts[1][0]
    assert parts[0][1] / sr == pytest.approx(0.6, abs=0.02)                   # the middle of the 0.2 s pause
    short = np.concatenate([tone(0.4), np.zeros(int(0.02 * sr)), tone(0.3)]).astype(np.float32)
    assert len(ceiling.voiced_parts(short, sr)) == 1                          # a 20 ms gap is no pause
    assert ceiling.speech_level(tone(0.5).astype(np.float32), sr) == pytest.approx(0.3 / np.sqrt(2), rel=0.01)


def test_chat_unseen_ceiling_rows(tmp_path, frames_onnx, capsys):
    import soundfile as sf
    data = tmp_path / "rec"
    data.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(1600) / 8000
    for spk, level in (("a", 0.3), ("b", 0.3), ("c", 0.02)):
        for d in range(3):
            for take in range(4):
                sf.write(data / f"{d}_{spk}_{take}.wav", (level * np.sin(2 * np.pi * (200 + 300 * d) * t)
                                                          + 1e-3 * rng.standard_normal(1600)).astype(np.float32), 8000)
    ceiling = load_example("chat_unseen_ceiling")
    ceiling.main([str(data), "--encoder", frames_onnx, "--fold", "c", "--voices-curve", "--json", str(tmp_path / "c.json")])
    out = json.loads((tmp_path / "c.json").read_text())
    (row,) = out["voices"]
    assert row["voice"] == "c" and row["speech_rms"] == pytest.approx(0.02 / np.sqrt(2), rel=0.05)
    # the corpus noise (mean std 2.75e-3 at mean gain 0.8) over a 0.014 rms voice: 12 dB
    assert row["corpus_snr_db"] == pytest.approx(20 * np.log10(0.02 / np.sqrt(2) * 0.8 / 0.00275), abs=0.5)
    assert row["pair_clean"] == pytest.approx(row["word_clean"] ** 2, abs=1e-3)
    assert [r["training_voices"] for r in out["voices_curve"]] == [1, 2]
    assert out["folds"][0]["fold"] == "c" and "two-word ceiling" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no recordings of zed"):
        ceiling.main([str(data), "--encoder", frames_onnx, "--fold", "zed"])


def test_split_stores_embed_each_part_alone(tmp_path, frames_onnx):
    import soundfile as sf

    from pllcli.encoders import build_encoder
    from pllcli.features import FeatureStore
    ceiling = load_example("chat_unseen_ceiling")
    corpus = tmp_path / "chat"
    (corpus / "audio").mkdir(parents=True)
    sr = 16000
    tone = lambda s, f: 0.3 * np.sin(2 * np.pi * f * np.arange(int(s * sr)) / sr)  # noqa: E731
    msgs = {"m0": np.concatenate([tone(0.3, 300), np.zeros(int(0.2 * sr)), tone(0.3, 900)]), "m1": tone(0.4, 500)}
    for k, x in msgs.items():
        sf.write(corpus / "audio" / f"{k}.wav", x.astype(np.float32), sr, subtype="FLOAT")
    for name in ("voice.csv", "test.csv"):
        (corpus / name).write_text("id,path\n" + "".join(f"{k},audio/{k}.wav\n" for k in msgs))
    info = ceiling.write_split_stores(corpus, tmp_path / "out", frames_onnx, jobs=1)
    assert info["parts_train"] == [0, 1, 1]
    enc = build_encoder(frames_onnx)
    fs = FeatureStore(tmp_path / "out" / "train.h5")
    x = msgs["m0"].astype(np.float32)
    a, b = ceiling.voiced_parts(x, sr)
    np.testing.assert_allclose(fs.get("m0"), np.concatenate([enc.embed(x[slice(*a)]), enc.embed(x[slice(*b)])]), atol=1e-6)
    from pllcli.features.config import encoder_config
    assert "split" in fs.config.encoder and fs.config.hash() != encoder_config(frames_onnx).hash()


def test_snr_bands_group_a_checkpoint_accuracy_by_message_snr(tmp_path, frames_onnx, capsys):
    import soundfile as sf

    from pllcli.features import FeatureStore, write_feature_store
    from pllcli.features.config import encoder_config
    from pllcli.predict import infer
    from pllcli.training.data import InMemoryFeatures
    ceiling = load_example("chat_unseen_ceiling")
    corpus = tmp_path / "chat"
    (corpus / "audio").mkdir(parents=True)
    sr, rng = 8000, np.random.default_rng(0)
    t = np.arange(int(0.5 * sr)) / sr
    msgs = {"loud": (0.3, 1e-4, "a"), "quiet": (0.01, 3e-3, "b")}   # about 60 dB and 7 dB
    for k, (amp, noise, _) in msgs.items():
        x = np.concatenate([np.zeros(800), amp * np.sin(2 * np.pi * 440 * t), np.zeros(800)])
        sf.write(corpus / "audio" / f"{k}.wav", (x + noise * rng.standard_normal(len(x))).astype(np.float32), sr)
    (corpus / "test.csv").write_text("id,path,label\n" + "".join(f"{k},audio/{k}.wav,{v[2]}\n" for k, v in msgs.items()))
    cfg = encoder_config(frames_onnx)
    feats = {k: rng.standard_normal((5, 4)).astype(np.float32) for k in msgs}
    write_feature_store(tmp_path / "t.h5", cfg, ({"id": k, "features": f, "duration": 0.7} for k, f in feats.items()))
    torch.manual_seed(0)
    m = build_model("pooled", 4, 2).eval()
    save_checkpoint(tmp_path / "m.pt", m, {"kind": "classifier", "classes": ["a", "b"], "task": "single"})
    f, o = FeatureStore(tmp_path / "t.h5").load_all()
    pred = infer(m, InMemoryFeatures(f, o), None, "cpu", 8)["logits"].argmax(1)
    ok = [["a", "b"][pred[0]] == "a", ["a", "b"][pred[1]] == "b"]
    ceiling.main(["--snr-bands", str(corpus), str(tmp_path / "m.pt"), str(tmp_path / "t.h5"),
                  "--json", str(tmp_path / "s.json")])
    rows = {r["snr"]: r for r in json.loads((tmp_path / "s.json").read_text())["snr_bands"]}
    assert rows["< 10 dB"]["messages"] == 1 and rows["< 10 dB"]["accuracy"] == float(ok[1])
    assert rows[">= 25 dB"]["messages"] == 1 and rows[">= 25 dB"]["accuracy"] == float(ok[0])
    assert rows["all"]["accuracy"] == np.mean(ok) and "| message SNR |" in capsys.readouterr().out
