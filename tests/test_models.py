"""Model registry and checkpoints."""
import pickle

import pytest
import torch

from pllcli.checkpoint import describe, load_checkpoint, load_model, save_checkpoint
from pllcli.errors import CheckpointError, UsageError
from pllcli.models import build_model, list_models


@pytest.mark.parametrize("name", ["convgru", "crnn", "densenet", "mobilenetv2"])
def test_models_shapes_and_masking(name):
    torch.manual_seed(0)
    m = build_model(name, 16, 5, **({"width": 4} if name != "densenet" else {"width": 4, "growth": 4}))
    m.eval()
    x = torch.randn(3, 40, 16)
    lengths = torch.tensor([40, 25, 12])
    out = m(x, lengths)
    assert out["logits"].shape == (3, 5) and out["embedding"].shape[0] == 3
    if name == "crnn":
        assert out["frame_logits"].shape[0] == 3 and out["frame_logits"].shape[2] == 5
    # whatever lies right after the length changes no model's outputs (the trunks are masked;
    # tests/test_padding.py checks this in full)
    x2 = x.clone()
    x2[2, 12:] = 100.0  # item 2 has 12 valid frames
    out2 = m(x2, lengths)
    assert torch.allclose(out["logits"][2], out2["logits"][2], atol=1e-5)
    if name in ("convgru", "crnn"):
        x2[2, 5] = 100.0  # inside the valid part: must matter
        assert not torch.allclose(out["logits"][2], m(x2, lengths)["logits"][2], atol=1e-3)
    assert m.config["name"] == name and build_model(**{**m.config})


def test_default_model_is_order_aware():
    torch.manual_seed(0)
    m = build_model("convgru", 16, 3).eval()
    a, b = torch.zeros(1, 40, 16), torch.zeros(1, 40, 16)
    a[0, :20, :4] = 3.0; a[0, 20:, 8:12] = 3.0
    b[0, :20, 8:12] = 3.0; b[0, 20:, :4] = 3.0
    assert not torch.allclose(m(a)["embedding"], m(b)["embedding"], atol=1e-4)


def test_registry_errors():
    assert {"convgru", "crnn", "densenet", "mobilenetv2"} <= set(list_models())
    with pytest.raises(UsageError, match="unknown model"):
        build_model("resnet9000", 16, 3)
    with pytest.raises(UsageError, match="bad option"):
        build_model("convgru", 16, 3, colour="red")


def test_checkpoint_round_trip_and_describe(tmp_path):
    m = build_model("convgru", 16, 4, width=4)
    m.encoder.norm.set_stats(torch.arange(16.0), torch.full((16,), 2.0))
    p = tmp_path / "c.pt"
    save_checkpoint(p, m, {"kind": "classifier", "classes": list("abcd"), "task": "single", "epoch": 3})
    m2, meta = load_model(p)
    assert meta["classes"] == list("abcd") and meta["model"]["width"] == 4
    x = torch.randn(2, 30, 16)
    m.eval()
    assert torch.allclose(m(x)["logits"], m2(x)["logits"])
    d = describe(p)
    assert d["kind"] == "classifier" and d["num_classes"] == 4 and d["epoch"] == 3
    assert d["parameters"] == sum(q.numel() for q in m.parameters())
    with pytest.raises(CheckpointError, match="need a 'encoder'"):
        load_model(p, kind="encoder")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "pllcli-checkpoint", "meta": "{}", "state": {}, "x": Evil()}, p)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(p)
    q = tmp_path / "plain.pkl"
    q.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(q)
    r = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, r)
    with pytest.raises(CheckpointError, match="not a pllcli checkpoint"):
        load_checkpoint(r)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
    # text and truncated archives are refused with a clear message, not an unpickler crash
    t = tmp_path / "text.pt"
    t.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(CheckpointError, match="not a torch.save archive"):
        load_checkpoint(t)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(r.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_checkpoint(cut)


def test_utt_norm_removes_a_per_clip_channel_offset_and_ignores_padding():
    torch.manual_seed(0)
    m = build_model("convgru", 16, 4, width=4, rnn_hidden=8, proj=16, utt_norm=True).eval()
    x = torch.randn(2, 40, 16)
    lengths = torch.tensor([40, 25])
    offset = torch.randn(1, 1, 16) * 3  # a fixed spectral tilt (microphone, speaker envelope)
    with torch.no_grad():
        a = m(x, lengths)["logits"]
        b = m(x + offset, lengths)["logits"]
        x2 = x.clone()
        x2[1, 25:] = 100.0  # whatever lies in the padding
        c = m(x2, lengths)["logits"]
        plain = build_model("convgru", 16, 4, width=4, rnn_hidden=8, proj=16).eval()
        plain.load_state_dict(m.state_dict())
        d = plain(x + offset, lengths)["logits"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(x, lengths)["logits"], d, atol=1e-3)  # without it the offset matters
