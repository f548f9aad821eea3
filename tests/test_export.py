"""`pllcli export`: ONNX / TorchScript with the frontend inside, parity, metadata, errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from pllcli import export as ex  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["zero", "one", "two"]


def _checkpoint(path, preset="speech8k", model="convgru", task="single", **kw):
    from pllcli.checkpoint import save_checkpoint
    from pllcli.features.config import FeatureConfig
    from pllcli.models import build_model
    torch.manual_seed(0)
    cfg = FeatureConfig.preset(preset)
    m = build_model(model, cfg.n_mels, len(CLASSES), **kw).eval()
    with torch.no_grad():  # make the outputs depend on the input
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, m, {"kind": "classifier", "classes": CLASSES, "task": task,
                              "feature_config": cfg.to_dict(), "feature_config_hash": cfg.hash()})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "model.pt", width=4, rnn_hidden=16, proj=16)


def _wav(path, sr=8000, seconds=0.7, freq=700.0):
    import soundfile as sf
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_export_parity_metadata_dynamic_time(ckpt, tmp_path, suffix):
    out = tmp_path / f"m{suffix}"
    md = ex.export(ckpt, out)
    meta = ex.read_metadata(out)
    assert meta["classes"] == CLASSES and meta["sample_rate"] == 8000 and meta["task"] == "single"
    assert md["size_bytes"] == out.stat().st_size > 0
    model, cmeta, cfg, frontend = ex.load_for_export(ckpt)
    eager = ex.eager_module(model, cmeta, frontend)
    run = ex.Runner(out)
    rng = np.random.default_rng(0)
    for n in (2000, 8000, 13333):  # dynamic time axis, batch of 2
        x = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
        with torch.no_grad():
            ref_l, ref_p = (t.numpy() for t in eager(torch.from_numpy(x)))
        got_l, got_p = run(x)
        assert got_l.shape == (2, 3)
        np.testing.assert_allclose(got_l, ref_l, atol=1e-4)
        np.testing.assert_allclose(got_p.sum(1), 1.0, atol=1e-5)
    assert np.abs(ref_l[0] - ref_l[1]).max() > 1e-4  # outputs do depend on the input


def test_dft_conv_frontends_match_torch_frontends():
    from pllcli.features.config import FeatureConfig
    x = torch.from_numpy(ex.synthetic_clip(16000, 0.5)[None])
    x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for preset in ("speech16k", "fbank16k"):
        fe = FeatureConfig.preset(preset).make_frontend()
        conv = ex.onnx_frontend(fe)
        with torch.no_grad():
            ref, got = fe(x), conv(x)
        assert ref.shape == got.shape
        assert float((ref - got).abs().max()) < 1e-3, preset


def test_fbank_multilabel_crnn_onnx(tmp_path):
    ck = _checkpoint(tmp_path / "fb.pt", preset="fbank8k", model="crnn", task="multi", width=4,
                     rnn_hidden=8)
    out = tmp_path / "fb.onnx"
    ex.export(ck, out)
    res = ex.check(ck, out, tolerance=1e-4)
    assert res["ok"] and res["max_abs_diff"] < 1e-4
    x = ex.synthetic_clip(8000)[None]
    _, probs = ex.Runner(out)(x)
    assert not np.allclose(probs.sum(1), 1.0)  # sigmoid, not softmax


def test_untraceable_frontend_names_the_part(ckpt, tmp_path):
    import torch

    class ComplexSTFTFrontend(torch.nn.Module):  # a complex STFT: ONNX has no complex tensors
        def forward(self, waveform):
            spec = torch.stft(waveform, 512, 80, 200, window=torch.hann_window(200), center=False,
                              return_complex=True)
            return torch.log(spec.abs()[:, :64] ** 2 + 1e-6).transpose(1, 2)

    fe = ComplexSTFTFrontend()
    with pytest.raises(ex.ExportError) as e:
        ex.export(ckpt, tmp_path / "bad.onnx", frontend=fe)
    msg = str(e.value)
    assert "frontend (ComplexSTFTFrontend)" in msg and "\n" not in msg
    assert not (tmp_path / "bad.onnx").exists()


def test_cli_export_check_and_errors(ckpt, tmp_path):
    wav = _wav(tmp_path / "a.wav", sr=16000)  # resampled to 8 kHz
    out = tmp_path / "cli.onnx"
    r = run_cli("export", ckpt, "-o", out, "--check", wav, "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "max abs diff" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["check"]["clips"][0]["clip"] == str(wav) and rep["check"]["ok"]
    r = run_cli("export", ckpt, "-o", out)  # exists
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("export", ckpt, "-o", tmp_path / "m.bin")
    assert r.returncode == 2 and "m.bin" in r.stderr and ".onnx" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run_cli("export", bad, "-o", tmp_path / "z.onnx")
    assert r.returncode == 1 and "bad.pt" in r.stderr and "Traceback" not in r.stderr
    # a tolerance of 0 cannot be met by the DFT-conv ONNX graph: non-zero exit
    r = run_cli("export", ckpt, "-o", tmp_path / "t.onnx", "--check", "--tolerance", "0",
                "--json", tmp_path / "t.json")
    assert r.returncode == 1 and "tolerance" in r.stderr
    # a failed check leaves nothing at the output path (nor a temporary file beside it)
    assert not (tmp_path / "t.onnx").exists() and not list(tmp_path.glob(".t.onnx*"))
    assert json.loads((tmp_path / "t.json").read_text())["check"]["ok"] is False


def test_onnx_classify_example_runs_without_torch(ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    ex.export(ckpt, out)
    wav = _wav(tmp_path / "b.wav", sr=8000, seconds=0.03)  # shorter than one frame: padded
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['onnx_classify.py', {str(out)!r}, {str(wav)!r}, '--top', '2']\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'onnx_classify.py')!r}, run_name='__main__')\n"
        "assert 'torch' not in sys.modules and 'pllcli' not in sys.modules, 'torch imported'\n"
        "print('TORCH-FREE')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "TORCH-FREE" and len(lines) == 3
    assert lines[0].split("\t")[0] in CLASSES
    # the same top class as the torch model on the same (padded) samples
    model, meta, cfg, fe = ex.load_for_export(ckpt)
    x = np.pad(ex._read_audio(wav, 8000), (0, cfg.frame_length - 240))
    with torch.no_grad():
        _, p = ex.eager_module(model, meta, fe)(torch.from_numpy(x)[None])
    assert lines[0].split("\t")[0] == CLASSES[int(p.argmax())]


def test_encoder_export_is_one_onnx_graph_equal_to_encoder_plus_model(tmp_path):
    """An encoder frontend (issue 15): waveform -> encoder graph -> classifier in one ONNX file."""
    import onnx

    from pllcli.encoders import build_encoder
    from pllcli.models import build_model
    from tests.test_encoders import KEYS, _two_stage, _wave
    _two_stage(tmp_path)
    enc = build_encoder(f"onnx:{tmp_path},{KEYS}")
    torch.manual_seed(0)
    model = build_model("convgru", enc.dim, len(CLASSES), width=4, rnn_hidden=8, proj=8).eval()
    md = {"classes": CLASSES, "task": "single"}
    checked = []
    out = tmp_path / "enc.onnx"
    got_md = ex.export_encoder_onnx(enc, model, md, out, False, verify=lambda tmp, fmt: checked.append(fmt))
    assert checked == ["onnx"] and got_md["encoder"] == enc.identity() and got_md["min_samples"] == 1
    onnx.checker.check_model(onnx.load(str(out)))
    meta = ex.read_metadata(out)
    assert meta["classes"] == CLASSES and meta["encoder"] == enc.identity()
    run = ex.Runner(out)
    for n in (enc.min_samples + 4 * enc.hop * 8, enc.min_samples * 3 + 7):
        x = _wave(n, n)
        logits, probs = run(x[None])
        with torch.no_grad():
            ref = model(torch.from_numpy(enc.embed(x))[None], None)["logits"].numpy()
        np.testing.assert_allclose(logits, ref, atol=1e-4)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
