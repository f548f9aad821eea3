"""Batch-independent outputs (issue 14.1): a clip alone and the same clip padded in a batch beside
longer clips give the same logits and frame logits, for every registered model, whatever the
padding holds; `predict -b 1` == `predict -b 64`; exported models == `predict`."""
import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pllcli.models import build_model, list_models  # noqa: E402
from pllcli.models.base import masked_batch_norm  # noqa: E402

N_MELS = 16
LENGTHS = [1, 2, 3, 5, 7, 13, 30, 61]  # odd and even against the x2 / x4 time strides
T_BATCH = 83                           # the batch's longest clip (odd as well)


def _model(name, seed=0, **kw):
    torch.manual_seed(seed)
    m = build_model(name, N_MELS, 5, dropout=0.0, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial input norm and BatchNorm statistics, so "the mean" is no zero
        for mod in m.modules():
            if hasattr(mod, "set_stats"):
                mod.set_stats(torch.randn(N_MELS, generator=g), 0.5 + torch.rand(N_MELS, generator=g))
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
    return m


def _clips(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, N_MELS, generator=g) * 2 for L in LENGTHS + [T_BATCH]]


def _batch(clips, pad, mean, seed=0):
    """(B, T, F) with every clip's frames first and `pad` after: "garbage" or the feature mean."""
    g = torch.Generator().manual_seed(seed)
    T = max(len(c) for c in clips)
    if pad == "garbage":
        x = torch.randn(len(clips), T, N_MELS, generator=g) * 1e3
        x[:, ::7] = 1e6
    else:
        x = mean.expand(len(clips), T, N_MELS).clone()
    for i, c in enumerate(clips):
        x[i, :len(c)] = c
    return x, torch.tensor([len(c) for c in clips])


def _assert_same_outputs(alone, batched, i):
    for k in ("logits", "embedding"):
        torch.testing.assert_close(alone[k][0], batched[k][i], atol=1e-5, rtol=0)
    if "frame_logits" in alone:
        n = int(alone["frame_lengths"][0])
        assert n == int(batched["frame_lengths"][i])
        torch.testing.assert_close(alone["frame_logits"][0, :n], batched["frame_logits"][i, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pad", ["garbage", "mean"])
@pytest.mark.parametrize("name", sorted(list_models()))
def test_a_clip_alone_equals_the_clip_padded_in_a_batch(name, pad):
    m = _model(name).eval()
    clips = _clips()
    x, lengths = _batch(clips, pad, m.encoder.norm.mean if hasattr(m.encoder, "norm") else torch.zeros(N_MELS))
    with torch.no_grad():
        batched = m(x, lengths)
        for i, c in enumerate(clips):
            alone = m(c[None], torch.tensor([len(c)]))
            _assert_same_outputs(alone, batched, i)
            _assert_same_outputs(m(c[None]), batched, i)  # lengths=None: the whole input is valid
            if "frame_logits" in alone:
                stride = -(-x.shape[1] // batched["frame_logits"].shape[1])
                assert int(alone["frame_lengths"][0]) == -(-len(c) // stride)
    # gradients: a clip's logits depend on its last valid frame and on no padded frame
    x = x.requires_grad_()
    m(x, lengths)["logits"][4].sum().backward()
    L = LENGTHS[4]
    assert float(x.grad[4, L - 1].abs().sum()) > 0
    assert float(x.grad[4, L:].abs().sum()) == 0


@pytest.mark.parametrize("name", sorted(list_models()))
def test_train_mode_padding_moves_neither_outputs_nor_batchnorm_statistics(name):
    """Train-mode batches: more padding (any values) changes no valid output and no running statistic."""
    clips = _clips(1)[3:]
    outs, stats = [], []
    for extra, pad in ((0, "mean"), (17, "garbage")):
        m = _model(name).train()
        x, lengths = _batch(clips, pad, torch.zeros(N_MELS), seed=extra)
        x = torch.cat([x, torch.full((len(clips), extra, N_MELS), 1e4)], 1)
        outs.append(m(x, lengths))
        stats.append([t.clone() for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)
                      for t in (mod.running_mean, mod.running_var)])
    for i in range(len(clips)):
        torch.testing.assert_close(outs[0]["logits"][i], outs[1]["logits"][i], atol=1e-4, rtol=1e-4)
    for a, b in zip(*stats):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
def test_masked_batch_norm_equals_batch_norm_when_nothing_is_padded(momentum):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, 10, 5, generator=g) * 3 + 1
    ref, got = (torch.nn.BatchNorm2d(6, momentum=momentum).train() for _ in range(2))
    with torch.no_grad():
        for bn in (ref, got):
            bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            bn.bias.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        a = ref(h)
        b = masked_batch_norm(got, h, torch.ones(4, 1, 10, 1, dtype=torch.bool))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.running_mean, got.running_mean)
    torch.testing.assert_close(ref.running_var, got.running_var)
    assert int(ref.num_batches_tracked) == int(got.num_batches_tracked) == 2
    # padded frames count for nothing: statistics of the valid part only
    valid = torch.zeros(4, 1, 10, 1, dtype=torch.bool)
    valid[:, :, :7] = True
    bn = torch.nn.BatchNorm2d(6, affine=False).train()
    y = masked_batch_norm(bn, h, valid)
    v = y[:, :, :7]
    torch.testing.assert_close(v.mean((0, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.var((0, 2, 3), unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


# ------------------------------------------------------------------ through the CLI and export

SR = 8000
DURATIONS = [0.13, 0.21, 0.34, 0.47, 0.52, 0.61, 0.73, 0.9, 1.07, 1.31]  # mixed frame counts


@pytest.fixture(scope="module")
def trained(tone_run):
    """A tiny store of clips of mixed length (tones), and a tiny convgru trained on it."""
    return tone_run("pad", DURATIONS, 18, 6, 0.05)


def _predicted(path):
    """{id: {label: prob}} from a JSONL predictions file."""
    with open(path) as f:
        return {r["id"]: dict(zip(r["labels"], r["probs"])) for r in map(json.loads, f)}


def test_predict_batch_size_does_not_change_probabilities(trained, tmp_path, cli_inproc):
    ck = trained / "run" / "last.pt"
    got = {}
    for b in (1, 64):
        out = tmp_path / f"b{b}.jsonl"
        code, _, err = cli_inproc("predict", ck, trained / "f.h5", "-o", out, "-k", "3", "-b", b, "--device", "cpu")
        assert code == 0, err
        got[b] = _predicted(out)
    assert set(got[1]) == set(got[64]) and len(got[1]) == 18
    for k, probs in got[1].items():
        assert probs.keys() == got[64][k].keys()
        for lab, p in probs.items():
            assert got[64][k][lab] == pytest.approx(p, abs=2e-6), (k, lab)


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_exported_model_on_each_clip_alone_equals_predict(trained, tmp_path, cli_inproc, suffix):
    pytest.importorskip("onnxruntime")
    from pllcli import export as ex
    ck = trained / "run" / "last.pt"
    code, _, err = cli_inproc("predict", ck, trained / "f.h5", "-o", tmp_path / "p.jsonl", "-k", "3",
                              "--device", "cpu")
    assert code == 0, err
    ref = _predicted(tmp_path / "p.jsonl")
    md = ex.export(ck, tmp_path / f"m{suffix}")
    run = ex.Runner(tmp_path / f"m{suffix}")
    wavs = sorted((trained / "audio").glob("*.wav"))
    worst = 0.0
    for name, wave in ex.load_clips(wavs, SR, md["min_samples"]):
        _, probs = run(wave[None])
        item = ref[name.rsplit("/", 1)[-1][:-4]]
        want = np.array([item[c] for c in md["classes"]])
        worst = max(worst, float(np.abs(probs[0] - want).max()))
    assert worst <= 1e-4


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # whenwho's MIL pooling checks shapes
@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_every_model_exports_with_the_padding_to_the_stride_in_the_graph(tmp_path, suffix):
    """The exported graph pads each input to a multiple of the time stride itself (dynamic time):
    on clips of any frame count it equals the eager model on the clip alone."""
    pytest.importorskip("onnxruntime")
    from pllcli import export as ex
    from pllcli.checkpoint import save_checkpoint
    from pllcli.features.config import FeatureConfig
    cfg = FeatureConfig.preset("speech8k", n_mels=N_MELS)
    for name in sorted(list_models()):
        ck = tmp_path / f"{name}-checkpoint.pt"
        save_checkpoint(ck, _model(name).eval(), {"kind": "classifier", "classes": list("abcde"), "task": "single",
                                                  "feature_config": cfg.to_dict(),
                                                  "feature_config_hash": cfg.hash()})
        ex.export(ck, tmp_path / f"{name}{suffix}")
        model, meta, _, frontend = ex.load_for_export(ck)
        eager, run = ex.eager_module(model, meta, frontend), ex.Runner(tmp_path / f"{name}{suffix}")
        for n in (900, 1234, 2050, 3333):
            x = ex.synthetic_clip(SR, n / SR)[None]
            with torch.no_grad():
                want = eager(torch.from_numpy(x))[0].numpy()
            np.testing.assert_allclose(run(x)[0], want, atol=1e-5, err_msg=f"{name} {n} samples")
