"""Hugging Face transformers encoders (`--encoder hf:...`): tiny random models saved on the spot;
no network."""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pllcli.encoders import build_encoder  # noqa: E402
from pllcli.errors import CheckpointError, InputError, UsageError  # noqa: E402
from tests.test_encoders import _head_proto, _Head, _wave  # noqa: E402

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=False,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            layerdrop=0.0, mask_time_prob=0.0)


def _save(folder, kind="wav2vec2", normalize=True, seed=0):
    cfg_cls, model_cls = {"wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
                          "wavlm": (transformers.WavLMConfig, transformers.WavLMModel),
                          "hubert": (transformers.HubertConfig, transformers.HubertModel)}[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**TINY)).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": normalize, "sampling_rate": 16000,
         "feature_size": 1, "padding_value": 0.0, "return_attention_mask": False}))
    return model


@pytest.mark.parametrize("kind", ["wav2vec2", "wavlm", "hubert"])
def test_hf_embed_is_the_hidden_state_of_the_layer(tmp_path, kind):
    model = _save(tmp_path / "m", kind)
    enc = build_encoder(f"hf:{tmp_path / 'm'},layer=1")
    assert (enc.min_samples, enc.hop, enc.dim, enc.sample_rate) == (10 + 2 * 5, 10, 16, 16000)
    x = _wave(400, 1) + 0.3       # an offset: the model's own norms do not remove it, do_normalize does
    xn = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    with torch.no_grad():
        ref = model(torch.from_numpy(xn)[None], output_hidden_states=True).hidden_states[1][0].numpy()
    out = enc.embed(x)
    assert out.shape == (enc.num_frames(400), 16)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    last = build_encoder(f"hf:{tmp_path / 'm'}")
    assert last.layer == 2 and not np.allclose(last.embed(x), out, atol=1e-3)
    ident = enc.identity()
    assert ident["kind"] == "hf" and ident["model_type"] == kind and ident["layer"] == 1
    assert ident["normalisation"] == "per_clip_zero_mean_unit_var" and set(ident["sha256"]) == {"weights"}


def test_hf_identity_follows_weights_and_normalisation(tmp_path):
    _save(tmp_path / "a", seed=0)
    _save(tmp_path / "b", seed=1)
    _save(tmp_path / "c", normalize=False)
    a, b, c = (build_encoder(f"hf:{tmp_path / k}").identity() for k in "abc")
    assert a["sha256"] != b["sha256"] and c["normalisation"] == "none"
    x = _wave(300, 2)
    raw = build_encoder(f"hf:{tmp_path / 'c'}")
    assert not np.allclose(raw.embed(x * 3 + 0.3), raw.embed(x), atol=1e-3)
    # with normalisation, a louder, offset copy of a clip gives the same frames
    norm = build_encoder(f"hf:{tmp_path / 'a'}")
    np.testing.assert_allclose(norm.embed(x * 3 + 0.3), norm.embed(x), atol=1e-4)


def test_hf_errors_name_the_problem(tmp_path):
    _save(tmp_path / "m")
    with pytest.raises(UsageError, match="layer must be 0..2"):
        build_encoder(f"hf:{tmp_path / 'm'},layer=3")
    with pytest.raises(InputError, match="not found"):
        build_encoder(f"hf:{tmp_path / 'nope' / 'deeper' / 'x'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        build_encoder(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        build_encoder(f"hf:{tmp_path / 'm'}")
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=20)).save_pretrained(bert)
    with pytest.raises(UsageError, match="no wav2vec2-style conv feature extractor"):
        build_encoder(f"hf:{bert}")


def test_hf_repo_from_the_cache_else_one_clear_line(tmp_path, monkeypatch):
    """A repo id resolves through the Hugging Face cache first; a failed fetch (offline here: the
    fetch is faked, tests never touch the network) is one line saying how to pre-fetch."""
    import huggingface_hub
    _save(tmp_path / "snap")
    calls = []

    def fake(repo, local_files_only=False, **kw):
        calls.append((repo, local_files_only))
        if repo == "someone/cached":
            return str(tmp_path / "snap")
        raise OSError("We couldn't connect to the Hub" if not local_files_only else "not in the cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    enc = build_encoder("hf:someone/cached,layer=1")
    assert enc.name == "someone/cached" and calls == [("someone/cached", True)]
    with pytest.raises(InputError, match="cannot fetch Hugging Face model someone/tiny-model .*hf download"):
        build_encoder("hf:someone/tiny-model")
    assert calls[1:] == [("someone/tiny-model", True), ("someone/tiny-model", False)]


def test_hf_export_composes_waveform_to_probs(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from pllcli.encoders.onnx import compose_onnx
    _save(tmp_path / "m", "wavlm")
    enc = build_encoder(f"hf:{tmp_path / 'm'},layer=2,min_duration=40ms")
    model = compose_onnx(enc, _head_proto(enc.dim), "features")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    head = _Head(enc.dim).eval()
    for n in (700, enc.min_samples - 5):                 # the second one is padded in the graph
        x = _wave(n, 3)[None]
        got = sess.run(None, {"waveform": x})[1]
        with torch.no_grad():
            ref = head(torch.from_numpy(enc.embed(x[0]))[None])[1].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_hf_featurize_store_frames_and_hash(tmp_path, cli_inproc):
    import soundfile as sf

    from pllcli.features.store import FeatureStore
    _save(tmp_path / "m")
    _save(tmp_path / "other", seed=3)
    (tmp_path / "audio").mkdir()
    for i in range(3):
        sf.write(tmp_path / "audio" / f"c{i}.wav", _wave(800 + 300 * i, i), 16000, subtype="FLOAT")
    code, out, err = cli_inproc("featurize", tmp_path / "audio", "-o", tmp_path / "a.h5", "--encoder",
                                f"hf:{tmp_path / 'm'},layer=1")
    assert code == 0, err
    assert "Loading weights" not in out + err and "featurized 3 files" in out + err   # no transformers bars
    fs = FeatureStore(tmp_path / "a.h5")
    enc = build_encoder(f"hf:{tmp_path / 'm'},layer=1")
    x, _ = sf.read(tmp_path / "audio" / "c2.wav", dtype="float32")
    np.testing.assert_allclose(fs.get("c2"), enc.embed(x), atol=1e-6)
    code, _, err = cli_inproc("featurize", tmp_path / "audio", "-o", tmp_path / "b.h5", "--encoder",
                              f"hf:{tmp_path / 'other'},layer=1")
    assert code == 0, err
    assert FeatureStore(tmp_path / "b.h5").config.hash() != fs.config.hash()
    with pytest.raises(CheckpointError):
        from pllcli.encoders.hf import HFEncoder
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text('{"model_type": "wav2vec2", "hidden_size": "x"}')
        (tmp_path / "broken" / "model.safetensors").write_bytes(b"not weights")
        HFEncoder(str(tmp_path / "broken"))
