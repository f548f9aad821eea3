"""examples/sed_ceiling.py: the voiced share of a true event measured on the clip's energy."""
import wave

import numpy as np
import pytest

from tests.conftest import load_example


@pytest.fixture(scope="module")
def ceiling():
    return load_example("sed_ceiling")


def test_voiced_span_first_and_last_active_frame(ceiling):
    act = np.array([0, 1, 0, 1, 1, 0, 0, 1], bool)
    assert ceiling.voiced_span(act, 0, 6) == (1, 5)
    assert ceiling.voiced_span(act, 5, 7) is None
    assert np.allclose(ceiling.frame_energy(np.ones(256 * 2 + 10)), [1.0, 1.0])   # whole frames only


def test_clip_measure_finds_the_tone_inside_a_padded_event(ceiling, tmp_path):
    # 2 s at 8 kHz: noise at rms 0.01, a tone of rms ~0.2 from 0.512 s to 1.024 s (frames 16-31 of
    # 32 ms); the true event 0.256-1.28 s (frames 8-39) carries 0.256 s of silence at each end
    sr = 8000
    x = np.random.default_rng(0).normal(0, 0.01, 2 * sr)
    t = np.arange(int(0.512 * sr), int(1.024 * sr))
    x[t] += 0.3 * np.sin(2 * np.pi * 440 * t / sr)
    path = tmp_path / "c.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    [(share, span)] = ceiling.clip_measure(path, [(0.256, 1.28, "a")], 3.0, 0.032)
    assert share == pytest.approx(16 / 32)
    assert span == pytest.approx((0.512, 1.024))
