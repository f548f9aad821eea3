"""The numpy frontends and resampler featurize uses (no torch) against the torch / torchaudio
definitions: log-mel and Kaldi fbank for every preset, the filterbanks, the sinc resampler."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchaudio = pytest.importorskip("torchaudio")

from pllcli.audio import resample, sinc_resample_kernel  # noqa: E402
from pllcli.features.config import PRESETS, FeatureConfig  # noqa: E402
from pllcli.features.np_frontend import (  # noqa: E402
    build_np_frontend, hann_window, kaldi_mel_banks, melscale_fbanks,
)

torch.set_num_threads(1)


def _signals(n, sr, seed):
    """Random audio and a tone with a little noise (a pure tone drives far bands to the log floor,
    where float32 torch itself is off its float64 self by more than 1e-4)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.2 * np.sin(2 * np.pi * 1870.0 * t) + 0.05 * rng.standard_normal(n)
    return {"random": (0.3 * rng.standard_normal(n)).astype(np.float32), "tone": tone.astype(np.float32),
            "silence": np.zeros(n, np.float32)}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_np_frontend_matches_torch_frontend(preset):
    c = FeatureConfig.preset(preset)
    fe, nfe = c.make_frontend(), build_np_frontend(c)
    fl, hop = c.frame_length, c.hop_length
    # very short clips (< one frame: zero-padded to one), frame edges, longer clips
    for n in (1, 37, fl - 1, fl, fl + 1, fl + hop - 1, fl + hop, 3001, int(1.7 * c.sample_rate)):
        for kind, x in _signals(n, c.sample_rate, seed=n).items():
            ref = fe(torch.from_numpy(x)[None])[0].numpy()
            got = nfe(x[None])[0]
            assert got.dtype == np.float32 and got.shape == ref.shape == (c.num_frames(n), c.n_mels), (n, kind)
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{preset} {kind} n={n}")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_np_power_and_filterbank_match_torch(preset):
    c = FeatureConfig.preset(preset)
    fe, nfe = c.make_frontend(), build_np_frontend(c)
    np.testing.assert_allclose(nfe.fb, fe.fb.numpy(), atol=2e-5, rtol=0)
    x = _signals(4000, c.sample_rate, seed=3)["random"][None]
    p_ref = fe.power(torch.from_numpy(x)).numpy()
    p = nfe.power(x)
    assert p.shape == p_ref.shape
    np.testing.assert_allclose(p, p_ref, rtol=0, atol=2e-5 * p_ref.max())


def test_filterbanks_equal_torchaudio_functions():
    import torchaudio.functional as AF
    from torchaudio.compliance.kaldi import get_mel_banks
    for n_freq, lo, hi, n_mels, sr in ((257, 20.0, 4000.0, 64, 8000), (257, 0.0, 8000.0, 40, 16000),
                                       (201, 60.0, 7600.0, 80, 16000)):
        ref = AF.melscale_fbanks(n_freq, lo, hi, n_mels, sr, norm=None, mel_scale="htk").numpy()
        np.testing.assert_allclose(melscale_fbanks(n_freq, lo, hi, n_mels, sr), ref, atol=2e-5, rtol=0)
    for n_mels, n_fft, sr, lo, hi in ((40, 256, 8000.0, 20.0, 0.0), (64, 512, 16000.0, 20.0, 0.0),
                                      (23, 512, 16000.0, 64.0, -400.0), (80, 1024, 44100.0, 30.0, 8000.0)):
        ref = get_mel_banks(n_mels, n_fft, sr, lo, hi, 100.0, -500.0, 1.0)[0].numpy()
        np.testing.assert_allclose(kaldi_mel_banks(n_mels, n_fft, sr, lo, hi), ref, atol=2e-5, rtol=0)
    for n in (1, 200, 400, 401):
        for periodic in (True, False):
            ref = torch.hann_window(n, periodic=periodic, dtype=torch.float64).numpy()
            np.testing.assert_allclose(hann_window(n, periodic), ref, atol=1e-12)


@pytest.mark.parametrize("preset", ["speech8k", "fbank16k"])
def test_np_clip_numbers_do_not_depend_on_the_batch(preset):
    from pllcli.features.compute import compute_features
    c = FeatureConfig.preset(preset)
    nfe = build_np_frontend(c)
    rng = np.random.default_rng(0)
    waves = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in (30, 700, 2501, 2600, 9000, 401, 1603)]
    alone = [nfe(w[None])[0] for w in waves]
    for batch_samples, max_items in ((1, 1), (5000, 2), (20000, 3), (1 << 20, 128)):
        got = compute_features(waves, c, batch_samples=batch_samples, max_items=max_items)
        for a, g in zip(alone, got):
            np.testing.assert_array_equal(g, a)  # bitwise, whatever the batch and the offset in the output
        # a clip's numbers also survive reordering and other company in the chunk
        got2 = compute_features(waves[::-1] + waves[:2], c, batch_samples=batch_samples, max_items=max_items)
        for a, g in zip(alone[::-1] + alone[:2], got2):
            np.testing.assert_array_equal(g, a)


@pytest.mark.parametrize("rates", [(16000, 8000), (44100, 16000), (8000, 16000), (48000, 16000), (22050, 8000)])
def test_np_resample_matches_torchaudio(rates):
    orig, new = rates
    rs = torchaudio.transforms.Resample(orig, new)
    kernel, width = sinc_resample_kernel(orig, new)
    assert width == rs.width
    np.testing.assert_array_equal(kernel, rs.kernel[:, 0].numpy())  # the same float64 formula, cast alike
    rng = np.random.default_rng(orig)
    for n in (1, 2, 5, 99, 441, 1000, 4410, 44101):
        t = np.arange(n) / orig
        for x in ((0.3 * rng.standard_normal(n)).astype(np.float32),
                  (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)):
            ref = rs(torch.from_numpy(x)[None])[0].numpy()
            got = resample(x, orig, new)
            assert got.dtype == np.float32 and got.shape == ref.shape, (n, got.shape, ref.shape)
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert resample(x, orig, orig) is x


def test_resample_long_input_in_blocks(monkeypatch):
    import pllcli.audio as A
    x = (0.3 * np.random.default_rng(1).standard_normal(20001)).astype(np.float32)
    whole = A.resample(x, 16000, 8000)
    A._RESAMPLERS.clear()
    monkeypatch.setattr(A, "_RESAMPLE_ROWS", 7)  # many blocks: the same numbers
    np.testing.assert_array_equal(A.resample(x, 16000, 8000), whole)
