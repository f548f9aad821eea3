"""Encoders (pllcli.encoders): tiny wav2vec2 and ONNX graphs built on the spot; no network."""
import urllib.error

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
torch = pytest.importorskip("torch")
pytest.importorskip("torchaudio")

from pllcli.encoders import build_encoder, check_identity, identity_hash  # noqa: E402
from pllcli.errors import ConfigMismatchError, InputError, UsageError  # noqa: E402

TINY_W2V = dict(extractor_mode="group_norm", extractor_conv_layer_config=[(8, 10, 5), (8, 3, 2)],
                extractor_conv_bias=False, encoder_embed_dim=16, encoder_projection_dropout=0.0,
                encoder_pos_conv_kernel=4, encoder_pos_conv_groups=2, encoder_num_layers=3,
                encoder_num_heads=2, encoder_attention_dropout=0.0, encoder_ff_interm_features=32,
                encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False,
                encoder_layer_drop=0.0, aux_num_out=None)


def _tiny_w2v(seed=0):
    from torchaudio.models import wav2vec2_model
    torch.manual_seed(seed)
    return wav2vec2_model(**TINY_W2V).eval()


def _wave(n, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


@pytest.fixture
def w2v_file(tmp_path):
    from pllcli.encoders.torchaudio_bundle import save_local_model
    path = tmp_path / "tiny_w2v.pt"
    save_local_model(path, _tiny_w2v(), TINY_W2V)
    return path


# ------------------------------------------------------------------ torchaudio

def test_w2v_embed_equals_model_and_layer_changes_output(w2v_file):
    model = _tiny_w2v()
    x = _wave(1600)
    with torch.no_grad():
        ref = model.extract_features(torch.from_numpy(x)[None])[0]
    enc = build_encoder(f"torchaudio:{w2v_file},layer=2")
    assert enc.min_samples == 10 + 2 * 5 and enc.hop == 10 and enc.dim == 16
    out = enc.embed(x)
    assert out.shape == (enc.num_frames(1600), 16) == tuple(ref[1][0].shape)
    np.testing.assert_allclose(out, ref[1][0].numpy(), atol=1e-6)
    last = build_encoder(f"torchaudio:{w2v_file}").embed(x)
    np.testing.assert_allclose(last, ref[2][0].numpy(), atol=1e-6)
    assert np.abs(last - out).max() > 1e-3
    ident = enc.identity()
    assert ident["kind"] == "torchaudio" and ident["layer"] == 2 and ident["frame_rate"] == 1600.0
    assert build_encoder(f"torchaudio:{w2v_file}").identity()["layer"] == 3


def test_w2v_model_object_and_module_match(w2v_file):
    from pllcli.encoders.torchaudio_bundle import TorchaudioEncoder
    enc = TorchaudioEncoder(model=_tiny_w2v(), name="tiny", layer=1)
    x = _wave(800, 1)
    with torch.no_grad():
        mod = enc.as_module()(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(enc.embed(x), mod, atol=1e-6)


def test_identity_follows_file_sha256(w2v_file, tmp_path):
    from pllcli.encoders.torchaudio_bundle import save_local_model
    other = tmp_path / "other" / w2v_file.name
    other.parent.mkdir()
    save_local_model(other, _tiny_w2v(seed=1), TINY_W2V)
    a, b = build_encoder(f"torchaudio:{w2v_file}"), build_encoder(f"torchaudio:{other}")
    assert a.identity()["sha256"] != b.identity()["sha256"]
    assert identity_hash(a.identity()) != identity_hash(b.identity())
    with pytest.raises(ConfigMismatchError, match="sha256"):
        check_identity(a.identity(), b.identity(), "store vs checkpoint")
    # the same file at another path: same identity (no paths in it)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(w2v_file.read_bytes())
    c = build_encoder(f"torchaudio:{copy},name=tiny_w2v")
    assert c.identity() == a.identity()
    check_identity(a.identity(), c.identity(), "x")
    with pytest.raises(ConfigMismatchError, match="encoder differs"):
        check_identity(None, a.identity(), "store vs checkpoint")


def test_short_clip_padded_and_recorded(w2v_file):
    enc = build_encoder(f"torchaudio:{w2v_file}")
    x = _wave(7, 2)
    out, pad = enc.embed(x, with_padding=True)
    assert pad == enc.min_samples - 7 == enc.padding(7) == 13 and out.shape == (1, 16)
    assert enc.padding_split(7) == (6, 7) and enc.identity()["pad"] == "centre"
    np.testing.assert_array_equal(out, enc.embed(np.pad(x, (6, 7))))
    outs, pads = enc.embed_many([x, _wave(400)])
    assert pads == [pad, 0] and [o.shape[0] for o in outs] == [1, enc.num_frames(400)]
    end = build_encoder(f"torchaudio:{w2v_file},pad=end")
    assert end.padding_split(7) == (0, 13) and end.identity() != enc.identity()
    np.testing.assert_array_equal(end.embed(x), enc.embed(np.pad(x, (0, 13))))
    longer = build_encoder(f"torchaudio:{w2v_file},min_duration=5ms")    # 80 samples at 16 kHz
    out, pad = longer.embed(x, with_padding=True)
    assert pad == 73 and out.shape[0] == longer.num_frames(7) == 7 and longer.identity()["min_duration"] == 0.005
    assert longer.padding(400) == 0


def test_offline_bundle_error_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, dst, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(InputError) as e:
        build_encoder("torchaudio:WAV2VEC2_BASE,layer=6")
    msg = str(e.value)
    assert "\n" not in msg and "WAV2VEC2_BASE" in msg and "name resolution" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg and "with network" in msg


def test_bundle_local_weights(monkeypatch, tmp_path):
    """weights=PATH loads the bundle's architecture from a local state file, no download."""
    from torchaudio import pipelines
    monkeypatch.setattr(pipelines.WAV2VEC2_BASE, "_params", TINY_W2V)
    path = tmp_path / "w.pt"
    torch.save(_tiny_w2v().state_dict(), path)
    enc = build_encoder(f"torchaudio:WAV2VEC2_BASE,weights={path},layer=1")
    assert enc.name == "WAV2VEC2_BASE" and enc.identity()["normalisation"] == "none"
    with torch.no_grad():
        ref = _tiny_w2v().extract_features(torch.from_numpy(_wave(500))[None], num_layers=1)[0][-1][0]
    np.testing.assert_allclose(enc.embed(_wave(500)), ref.numpy(), atol=1e-6)


# ------------------------------------------------------------------ specs

@pytest.mark.parametrize("spec, needle", [
    ("torchaudio:x.pt,layr=2", "valid: layer, weights, sample_rate, name, device, pad, min_duration"),
    ("onnx:a.onnx,mel_scal=0.1", "valid: melspec, embedding"),
    ("wav2vec:WAV2VEC2_BASE", "choose from hf, onnx, torchaudio"),
    ("WAV2VEC2_BASE", "KIND:"),
    ("torchaudio:a.pt,b.pt", "only one value"),
    ("torchaudio:x.pt,pad=left", "pad must be one of centre, end"),
    ("onnx:x.onnx,min_duration=soon", "min_duration"),
])
def test_bad_spec_names_flag_and_keys(spec, needle):
    with pytest.raises(UsageError) as e:
        build_encoder(spec)
    assert "--encoder" in str(e.value) and needle in str(e.value)


def test_bad_layer_and_unknown_bundle(w2v_file):
    with pytest.raises(UsageError, match="layer must be 1..3"):
        build_encoder(f"torchaudio:{w2v_file},layer=4")
    with pytest.raises(UsageError, match="unknown bundle 'NOPE'"):
        build_encoder("torchaudio:NOPE")


# ------------------------------------------------------------------ onnx

def _export(module, example, path, input_name):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                      input_names=[input_name], output_names=["out"],
                      dynamic_axes={input_name: {0: "b", 1: "s"}, "out": {0: "b", 1: "t"}})
    return path


class _Frames(torch.nn.Module):
    """(B, S) -> (B, T', 4): conv1d kernel 16 stride 8, then tanh."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv1d(1, 4, 16, stride=8)

    def forward(self, x):
        return torch.tanh(self.conv(x[:, None])).transpose(1, 2)


def _frames_ref(m, x):
    w, b = m.conv.weight.detach().numpy()[:, 0], m.conv.bias.detach().numpy()
    win = np.lib.stride_tricks.sliding_window_view(x, 16)[::8]   # (T', 16)
    return np.tanh(win @ w.T + b)


def test_onnx_single_graph_matches_reference_and_probes_framing(tmp_path):
    m = _Frames().eval()
    path = _export(m, torch.zeros(1, 64), tmp_path / "frames.onnx", "wave")
    for spec in (f"onnx:{path}", f"onnx:{path},hop=8,min_samples=16"):
        enc = build_encoder(spec, flag="--encoder")
        assert (enc.hop, enc.min_samples, enc.dim, enc.sample_rate) == (8, 16, 4, 16000)
        x = _wave(203, 4)
        np.testing.assert_allclose(enc.embed(x), _frames_ref(m, x), atol=1e-5)
    with pytest.raises(UsageError, match="declared framing .hop 7"):
        build_encoder(f"onnx:{path},hop=7,min_samples=16")


class _Mel(torch.nn.Module):
    """(B, S) -> (B, 1, M, 3) 'mel': frames of 32 every 10 samples, a fixed projection, log."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv1d(1, 3, 32, stride=10, bias=False)

    def forward(self, x):
        return torch.log1p(self.conv(x[:, None]) ** 2).transpose(1, 2)[:, None]


class _Emb(torch.nn.Module):
    """(N, 6, 3, 1) -> (N, 1, 1, 5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.lin = torch.nn.Linear(18, 5)

    def forward(self, x):
        return torch.sigmoid(self.lin(x.reshape(x.shape[0], 18)))[:, None, None]


def _two_stage(tmp_path):
    mel, emb = _Mel().eval(), _Emb().eval()
    mp = _export(mel, torch.zeros(1, 100), tmp_path / "melspectrogram.onnx", "input")
    pytest.importorskip("onnxruntime")
    torch.onnx.export(emb, (torch.zeros(2, 6, 3, 1),), str(tmp_path / "embedding_model.onnx"), dynamo=False,
                      opset_version=17, input_names=["input_1"], output_names=["out"],
                      dynamic_axes={"input_1": {0: "n"}, "out": {0: "n"}})
    return mel, emb, mp


KEYS = "mel_frame=32,mel_hop=10,window=6,hop=2,mel_scale=0.5,mel_offset=1,input_scale=3"


def test_onnx_two_stage_matches_reference(tmp_path):
    mel, emb, mp = _two_stage(tmp_path)
    keys = KEYS
    enc = build_encoder(f"onnx:{tmp_path},{keys}")
    enc2 = build_encoder(f"onnx:melspec={mp},embedding={tmp_path / 'embedding_model.onnx'},{keys}")
    assert enc.identity() == enc2.identity() and enc.name == "embedding_model"
    assert (enc.min_samples, enc.hop, enc.dim) == (32 + 5 * 10, 20, 5)
    x = _wave(311, 7)
    with torch.no_grad():
        w = mel.conv.weight[:, 0].numpy()                                       # (3, 32)
        m = np.log1p((np.lib.stride_tricks.sliding_window_view(x * 3, 32)[::10] @ w.T) ** 2) * 0.5 + 1
        wins = np.stack([m[i:i + 6] for i in range(0, len(m) - 5, 2)])          # (W, 6, 3)
        ref = emb(torch.from_numpy(wins[..., None].astype(np.float32)))[:, 0, 0].numpy()
    out = enc.embed(x)
    assert out.shape == (enc.num_frames(311), 5) == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)
    ident = enc.identity()
    assert ident["mel_scale"] == 0.5 and ident["window"] == 6 and set(ident["sha256"]) == {"melspec", "embedding"}
    short, pad = enc.embed(x[:50], with_padding=True)
    assert pad == 32 and short.shape == (1, 5)
    with torch.no_grad():
        mod = enc.as_module()(torch.from_numpy(np.stack([x[:50], x[50:100]])))
    np.testing.assert_array_equal(mod[0].numpy(), short)


def test_onnx_missing_file_and_half_pair(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_encoder(f"onnx:{tmp_path / 'nope.onnx'}")
    with pytest.raises(UsageError, match="both"):
        build_encoder(f"onnx:melspec={tmp_path / 'm.onnx'}")


class _Head(torch.nn.Module):
    """(B, T', D) -> logits, probs (B, 3)."""

    def __init__(self, d):
        super().__init__()
        torch.manual_seed(8)
        self.lin = torch.nn.Linear(d, 3)

    def forward(self, x):
        logits = self.lin(x.mean(1))
        return logits, torch.softmax(logits, -1)


def _head_proto(d):
    import io
    import onnx
    buf = io.BytesIO()
    torch.onnx.export(_Head(d).eval(), (torch.zeros(1, 3, d),), buf, dynamo=False, opset_version=17,
                      input_names=["features"], output_names=["logits", "probs"],
                      dynamic_axes={"features": {0: "b", 1: "t"}, "logits": {0: "b"}, "probs": {0: "b"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("kind, pad", [("two_stage", "centre"), ("two_stage", "end"), ("single", "centre"),
                                       ("torchaudio", "centre")])
def test_compose_onnx_waveform_to_probs_matches_pipeline(tmp_path, kind, pad, w2v_file):
    import onnx
    import onnxruntime as ort
    from pllcli.encoders.onnx import compose_onnx
    if kind == "two_stage":
        _two_stage(tmp_path)
        enc = build_encoder(f"onnx:{tmp_path},{KEYS},pad={pad}")
    elif kind == "single":
        path = _export(_Frames().eval(), torch.zeros(1, 64), tmp_path / "frames.onnx", "wave")
        enc = build_encoder(f"onnx:{path},pad={pad}")
    else:
        enc = build_encoder(f"torchaudio:{w2v_file},layer=2,min_duration=40ms")   # 640 samples
    model = compose_onnx(enc, _head_proto(enc.dim), "features")
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs"]
    head = _Head(enc.dim).eval()
    for n, b in ((300, 2), (enc.min_samples - 9, 1)):            # the second one is padded in-graph
        x = np.stack([_wave(n, 10 + i) for i in range(b)])
        got = sess.run(None, {"waveform": x})[1]
        with torch.no_grad():
            ref = np.stack([head(torch.from_numpy(enc.embed(w))[None])[1][0].numpy() for w in x])
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_feature_fields_frame_count_and_cached_identity(w2v_file, tmp_path):
    from pllcli.encoders import cached_encoder, feature_fields, identity_json
    enc = build_encoder(f"torchaudio:{w2v_file},layer=1")
    f = feature_fields(enc)
    assert (f["frontend"], f["sample_rate"], f["n_mels"], f["hop_length"]) == ("encoder", 16000, 16, 10)
    for s in (f["n_fft"], f["n_fft"] + 9, 1234):   # FeatureConfig.num_frames for S >= n_fft
        assert 1 + (s - f["n_fft"]) // f["hop_length"] == enc.num_frames(s) == len(enc.embed(_wave(s)))
    assert f["encoder"] == identity_json(enc.identity()) and f["encoder_spec"] == enc.spec
    spec = f"torchaudio:{w2v_file},layer=1"
    assert cached_encoder(spec, f["encoder"]) is cached_encoder(spec)
    other = dict(enc.identity(), layer=2)
    with pytest.raises(ConfigMismatchError, match="layer expected 2 got 1"):
        cached_encoder(spec, other, what="checkpoint m.pt")


def test_extract_speech_embedding_checks_wheel(tmp_path):
    import zipfile
    from pllcli.encoders.onnx import extract_speech_embedding
    wheel = tmp_path / "openwakeword-0.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("openwakeword/resources/models/melspectrogram.onnx", b"not the real file")
    with pytest.raises(InputError, match="another sha256"):
        extract_speech_embedding(wheel, tmp_path / "out")
    assert not (tmp_path / "out" / "melspectrogram.onnx").exists()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("README", b"")
    with pytest.raises(InputError, match="has no openwakeword/resources/models/melspectrogram.onnx"):
        extract_speech_embedding(wheel, tmp_path / "out")


def test_bench_encoder_script_runs(tmp_path, capsys):
    """examples/bench_encoder.py on a tiny FSDD-like folder with a tiny ONNX encoder."""
    import json

    import soundfile as sf
    pytest.importorskip("sklearn")
    data = tmp_path / "rec"
    data.mkdir()
    rng = np.random.default_rng(0)
    for d in range(10):
        for take in range(7):
            t = np.arange(1600) / 8000
            sf.write(data / f"{d}_spk_{take}.wav", (0.3 * np.sin(2 * np.pi * (200 + 150 * d) * t)
                                                  + 0.01 * rng.standard_normal(1600)).astype(np.float32), 8000)
    path = _export(_Frames().eval(), torch.zeros(1, 64), tmp_path / "frames.onnx", "wave")
    from tests.conftest import load_example
    mod = load_example("bench_encoder")
    mod.main([str(data), "--encoder", f"onnx:{path}", "--per-class", "1", "--draws", "2",
              "--json", str(tmp_path / "b.json")])
    out = json.loads((tmp_path / "b.json").read_text())
    assert (out["n_train"], out["n_test"]) == (20, 50) and len(out["rows"]) == 3
    assert all(0 <= r["accuracy"] <= 1 for r in out["rows"]) and "frames " in capsys.readouterr().out


# ------------------------------------------------------------------ featurize --encoder (R1-R3)

def _enc_corpus(tmp_path, n=8):
    """n 16 kHz clips: even ones 1000 samples (< min_duration=0.1s: padded), odd ones 3000."""
    import soundfile as sf
    (tmp_path / "audio").mkdir()
    rows = ["id,path"]
    for i in range(n):
        p = tmp_path / "audio" / f"c{i}.wav"
        sf.write(p, _wave(1000 if i % 2 == 0 else 3000, i) + 0.2 * (i % 2), 16000, subtype="FLOAT")
        rows.append(f"c{i},{p}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def _frames_graph(folder, bias=0.0):
    m = _Frames().eval()
    with torch.no_grad():
        m.conv.bias += bias
    folder.mkdir(exist_ok=True)
    return _export(m, torch.zeros(1, 64), folder / "frames.onnx", "wave")


def _store(path):
    from pllcli.features.store import FeatureStore
    with FeatureStore(path) as s:
        return s.config, s.load_all()[0], s.ids.tolist(), s.num_frames.tolist()


def test_featurize_encoder_store_jobs_resume_and_padded_count(tmp_path, cli_inproc):
    import json

    from pllcli.features.config import FeatureConfig, encoder_config
    from pllcli.features.extract import featurize
    man = _enc_corpus(tmp_path)
    spec = f"onnx:{_frames_graph(tmp_path / 'a')},min_duration=0.1s"
    code, out, err = cli_inproc("featurize", man, "-o", tmp_path / "j1.h5", "--encoder", spec, "--chunk-size", 3,
                                "--json", tmp_path / "s.json")
    assert code == 0, err
    assert out.count("4 zero-padded to the encoder's minimum length") == 1 and "zero samples" not in err + out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["files_padded"] == 4 and s["warnings"] == []
    cfg, feats, ids, nfr = _store(tmp_path / "j1.h5")
    enc = build_encoder(spec)
    ident = json.loads(cfg.encoder)
    assert cfg.frontend == "encoder" and ident == enc.identity() and set(ident["sha256"]) == {"graph"}
    assert cfg.hash() == s["feature_config_hash"] != FeatureConfig.preset("speech16k").hash()
    other = encoder_config(f"onnx:{_frames_graph(tmp_path / 'b', 0.1)},min_duration=0.1s")
    assert other.hash() != cfg.hash()                     # same shapes, other file sha256
    assert nfr == [enc.num_frames(1600 if i % 2 == 0 else 3000) for i in range(8)] and feats.shape[1] == 4
    import soundfile as sf
    x, _ = sf.read(tmp_path / "audio" / "c3.wav", dtype="float32")
    np.testing.assert_array_equal(feats[sum(nfr[:3]):sum(nfr[:4])], enc.embed(x))
    assert cli_inproc("featurize", man, "-o", tmp_path / "j2.h5", "--encoder", spec, "--jobs", 2,
                      "--chunk-size", 3)[0] == 0
    cfg2, feats2, ids2, _ = _store(tmp_path / "j2.h5")
    assert cfg2.hash() == cfg.hash() and ids2 == ids and feats2.tobytes() == feats.tobytes()

    def stop(k):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        featurize(str(man), tmp_path / "r.h5", cfg, chunk_size=3, progress=False, on_chunk=stop)
    code, out, err = cli_inproc("featurize", man, "-o", tmp_path / "r.h5", "--encoder", spec, "--chunk-size", 3,
                                "--json", tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and r["chunks_resumed"] == 1 and r["files_padded"] == 4
    assert _store(tmp_path / "r.h5")[1].tobytes() == feats.tobytes()
    code, _, err = cli_inproc("featurize", man, "-o", tmp_path / "x.h5", "--encoder", spec, "--n-mels", 8)
    assert code != 0 and "--encoder" in err and "--n-mels" in err
    code, _, err = cli_inproc("featurize", man, "-o", tmp_path / "x.h5", "--encoder", "onnx:/nope.onnx")
    assert code != 0 and "--encoder" in err and err.count("\n") == 1


def test_encoder_store_train_predict_mismatch_and_export_parity(tmp_path):
    import csv

    from pllcli.export import Runner, export
    from pllcli.features.config import encoder_config
    from pllcli.features.extract import featurize
    from pllcli.labels.store import LabelData, write_label_store
    from pllcli.predict import predict
    from pllcli.training.trainer import TrainConfig, train
    man = _enc_corpus(tmp_path)
    spec = f"onnx:{_frames_graph(tmp_path / 'a')},min_duration=0.1s"
    featurize(str(man), tmp_path / "a.h5", encoder_config(spec), chunk_size=3, progress=False)
    featurize(str(man), tmp_path / "b.h5", encoder_config(f"onnx:{_frames_graph(tmp_path / 'b', 0.1)},"
                                                          "min_duration=0.1s"), progress=False)
    write_label_store(tmp_path / "l.h5", LabelData.new([f"c{i}" for i in range(8)], ["short", "long"],
                                                       clean=[i % 2 for i in range(8)]), {})
    train(TrainConfig(features=str(tmp_path / "a.h5"), labels=str(tmp_path / "l.h5"), outdir=str(tmp_path / "run"),
                      epochs=2, batch_size=4, model_options={"width": 4, "rnn_hidden": 8, "proj": 8},
                      device="cpu", valid_fraction=0.0, progress=False, top_k=0, objectives=["ce"]))
    ck = tmp_path / "run" / "last.pt"
    with pytest.raises(ConfigMismatchError, match="encoder differs: .*sha256"):
        predict(ck, tmp_path / "b.h5", tmp_path / "b.csv", device="cpu")
    with pytest.raises(ConfigMismatchError, match="encoder differs: .*sha256"):
        train(TrainConfig(features=str(tmp_path / "b.h5"), labels=str(tmp_path / "l.h5"),
                          outdir=str(tmp_path / "run2"), init=str(ck), epochs=1, batch_size=4, device="cpu",
                          valid_fraction=0.0, progress=False, top_k=0, objectives=["ce"]))
    predict(ck, tmp_path / "audio", tmp_path / "p.csv", device="cpu", top_k_n=2)
    with open(tmp_path / "p.csv") as f:
        got = {(r["id"], r[k]): float(r[p]) for r in csv.DictReader(f)
               for k, p in (("label", "prob"), ("label_2", "prob_2"))}
    # the encoder file moved (another machine): predict on audio with --encoder at the new path gives
    # the same probabilities; another file, or --encoder on a feature store, is refused
    import shutil
    (tmp_path / "moved").mkdir()
    shutil.move(str(tmp_path / "a" / "frames.onnx"), tmp_path / "moved" / "frames.onnx")
    moved = f"onnx:{tmp_path / 'moved' / 'frames.onnx'},min_duration=0.1s"
    predict(ck, tmp_path / "audio", tmp_path / "moved.csv", device="cpu", top_k_n=2, encoder=moved)
    with open(tmp_path / "moved.csv") as f:
        again = {(r["id"], r[k]): float(r[p]) for r in csv.DictReader(f)
                 for k, p in (("label", "prob"), ("label_2", "prob_2"))}
    assert again == pytest.approx(got, abs=1e-6)
    with pytest.raises(ConfigMismatchError, match="encoder differs: .*sha256"):
        predict(ck, tmp_path / "audio", tmp_path / "other.csv", device="cpu",
                encoder=f"onnx:{tmp_path / 'b' / 'frames.onnx'},min_duration=0.1s")
    with pytest.raises(UsageError, match="--encoder applies to audio inputs"):
        predict(ck, tmp_path / "a.h5", tmp_path / "store.csv", device="cpu", encoder=moved)
    shutil.copy(tmp_path / "moved" / "frames.onnx", tmp_path / "a" / "frames.onnx")
    export(ck, tmp_path / "m.onnx")
    run = Runner(tmp_path / "m.onnx")
    import soundfile as sf
    for i in (0, 1):
        x, _ = sf.read(tmp_path / "audio" / f"c{i}.wav", dtype="float32")
        probs = run(x[None])[1][0]
        for c, lab in enumerate(["short", "long"]):
            assert probs[c] == pytest.approx(got[(f"c{i}", lab)], abs=1e-4)


def test_with_encoder_relocates_same_files_and_refuses_others(tmp_path):
    import shutil

    from pllcli.features.config import FeatureConfig, encoder_config
    cfg = encoder_config(f"onnx:{_frames_graph(tmp_path / 'a')}")
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "a" / "frames.onnx", tmp_path / "moved" / "frames.onnx")
    moved = FeatureConfig.from_dict(cfg.to_dict()).with_encoder(f"onnx:{tmp_path / 'moved' / 'frames.onnx'}")
    assert moved.hash() == cfg.hash() and "moved" in moved.encoder_spec
    with pytest.raises(ConfigMismatchError, match="encoder differs: .*sha256"):
        cfg.with_encoder(f"onnx:{_frames_graph(tmp_path / 'b', 0.1)}")
    with pytest.raises(UsageError, match="logmel, not an encoder"):
        FeatureConfig.preset("speech8k").with_encoder(f"onnx:{tmp_path / 'moved' / 'frames.onnx'}")


class _Energy(torch.nn.Module):
    """(B, S) -> (B, T', 1): mean power over 0.2 s windows every 20 ms at 16 kHz (a long receptive
    field, as speech_embedding's 0.775 s)."""

    def forward(self, x):
        w = torch.full((1, 1, 3200), 1.0 / 3200)
        return torch.nn.functional.conv1d(x[:, None] ** 2, w, stride=320).transpose(1, 2)


@pytest.mark.parametrize("extra, clip_s", [("", 1.0), (",min_duration=1.5s", 0.6), (",min_duration=1.5s,pad=end", 0.6)])
def test_encoder_frames_decode_where_the_sound_is(tmp_path, extra, clip_s):
    """An energy 'encoder' with a 0.2 s window: decoded on the clip's timeline, a 0.1 s burst gives
    an event centred on the burst (off by under one 20 ms frame), padding and pad mode included; the
    stored identity's geometry is the encoder's."""
    from pllcli.encoders import identity_num_frames, identity_padding
    from pllcli.events import decode_events
    from pllcli.features.config import encoder_config
    from pllcli.predict import clip_frame_probs
    path = _export(_Energy().eval(), torch.zeros(1, 4000), tmp_path / "energy.onnx", "wave")
    spec = f"onnx:{path},hop=320,min_samples=3200{extra}"
    enc, cfg = build_encoder(spec), encoder_config(spec)
    ident = enc.identity()
    for s in (1, 3199, 3200, 9000, 24000, 30001):
        assert identity_padding(ident, s) == enc.padding_split(s)
        assert identity_num_frames(ident, s) == enc.num_frames(s) == cfg.num_frames(s)
    n = int(clip_s * 16000)
    x = np.zeros(n, np.float32)
    x[int(0.3 * 16000):int(0.4 * 16000)] = 0.5 * np.sin(np.arange(1600, dtype=np.float32))
    frames = enc.embed(x)
    assert len(frames) == cfg.num_frames(n)
    probs, hop = clip_frame_probs(cfg, clip_s, frames / frames.max())
    assert hop == pytest.approx(0.02) and len(probs) == round(clip_s / 0.02)
    (ev,) = decode_events(probs, ["burst"], hop, threshold=0.5)
    assert (ev.onset + ev.offset) / 2 == pytest.approx(0.35, abs=0.02)
    # a model that strides 2 encoder frames into one output frame: hop 40 ms, same place
    probs2, hop2 = clip_frame_probs(cfg, clip_s, (frames / frames.max())[::2])
    (ev2,) = decode_events(probs2, ["burst"], hop2, threshold=0.5)
    assert hop2 == pytest.approx(0.04, rel=0.05) and (ev2.onset + ev2.offset) / 2 == pytest.approx(0.35, abs=0.04)


_FORK_CHILD = """
import os, sys, time
import numpy as np, torch
torch.set_num_threads(2)                      # any machine with 2+ cores: torch's default
from pllcli.encoders import build_encoder
from pllcli.features.pool import init_worker
enc = build_encoder(sys.argv[1])              # probes the graph
torch.set_num_threads(1)                      # what featurize's _compute does before working
x = np.random.default_rng(0).standard_normal(32000).astype(np.float32)
enc.embed(x)                                  # the parent's first chunk
pid = os.fork()
if pid == 0:
    init_worker()
    enc.embed(x)                              # a worker's first chunk opens its own session
    os._exit(0)
t0 = time.time()
while time.time() - t0 < 30:
    if os.waitpid(pid, os.WNOHANG)[0]:
        sys.exit(0)
    time.sleep(0.02)
os.kill(pid, 9)
sys.exit("the forked worker hung in onnxruntime")
"""


def test_onnx_encoder_survives_featurize_fork(tmp_path):
    """onnxruntime is not fork-safe: a child forked after the parent ran a multi-threaded session
    hangs in its first InferenceSession. featurize forks its --jobs workers after building the
    encoder, at torch's default thread count (2 on any 2-core machine; this suite runs at 1)."""
    import subprocess
    import sys
    graph = _export(_Energy().eval(), torch.zeros(1, 4000), tmp_path / "energy.onnx", "wave")
    p = subprocess.run([sys.executable, "-c", _FORK_CHILD, f"onnx:{graph},hop=320,min_samples=3200"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-400:]
