"""Procedural speech-like audio and a simulated chat log: the embedded demo corpus.

No network, no system packages, no recordings: each "word" is a short sequence of
phoneme-like segments (vowels as formant pairs on a glottal harmonic source,
fricatives as band-limited noise, plosives as bursts, nasals as a low formant).
Speakers differ in pitch, formant scale (vocal-tract length), speaking rate and
breathiness, so a classifier has to generalise across voices as with real speech.

A voice message is WORDS words; its text is the words joined by a space. The chat
log follows the scenario of the chat-fsdd benchmark: each typed message arrives
after a log-normal typing delay, other people's messages (in-vocabulary texts and
off-topic chatter) arrive as a Poisson stream in between, and some typed copies are
written in another style (upper case, punctuation).
"""
from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Phoneme inventory: (kind, parameters). Vowel formants in Hz for an average adult voice.
PHONEMES: dict[str, tuple[str, tuple[float, ...]]] = {
    "a": ("vowel", (730, 1090, 2440)), "i": ("vowel", (270, 2290, 3010)),
    "u": ("vowel", (300, 870, 2240)), "e": ("vowel", (530, 1840, 2480)),
    "o": ("vowel", (570, 840, 2410)), "ae": ("vowel", (660, 1720, 2410)),
    "s": ("fricative", (5000, 1500)), "sh": ("fricative", (2800, 900)),
    "f": ("fricative", (3800, 2500)), "t": ("plosive", (3500,)), "k": ("plosive", (1800,)),
    "p": ("plosive", (800,)), "m": ("nasal", (280, 1200)), "n": ("nasal", (300, 1700)),
    "l": ("vowel", (360, 1300, 2700)), "r": ("vowel", (420, 1300, 1600)),
}

WORDS: dict[str, tuple[str, ...]] = {
    "sun": ("s", "a", "n"), "tea": ("t", "i"), "moon": ("m", "u", "n"),
    "fish": ("f", "i", "sh"), "kite": ("k", "a", "i", "t"), "lamp": ("l", "ae", "m", "p"),
    "rose": ("r", "o", "s"), "peak": ("p", "i", "k"), "nest": ("n", "e", "s", "t"),
    "shoe": ("sh", "u"),
}

CHATTER = ["ok", "lol", "brb", "thanks!", "who is on tonight?", "gg", "nice one", "mic check",
           "back", "haha", "sounds good", "see you later", "hello all", "?"]


@dataclass
class Speaker:
    """Voice parameters: mean pitch (Hz), formant scale, speaking rate, breathiness (0-1)."""
    name: str
    f0: float
    formant_scale: float
    rate: float
    breath: float

    @classmethod
    def random(cls, name: str, rng: np.random.Generator) -> "Speaker":
        low = rng.random() < 0.5
        return cls(name=name,
                   f0=float(rng.uniform(95, 140) if low else rng.uniform(170, 250)),
                   formant_scale=float(rng.uniform(0.88, 1.0) if low else rng.uniform(1.02, 1.18)),
                   rate=float(rng.uniform(0.8, 1.25)), breath=float(rng.uniform(0.02, 0.12)))


def _harmonic_vowel(f0: np.ndarray, formants: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Glottal source through formant resonances, by additive synthesis.

    f0: (S,) pitch contour in Hz; formants: (S, 3) formant contour. Returns (S,).
    """
    n_harm = int(sr / 2 / max(f0.min(), 50.0))
    k = np.arange(1, n_harm + 1)[:, None]                     # (H, 1)
    phase = 2 * np.pi * np.cumsum(f0) / sr                      # (S,)
    freqs = k * f0[None, :]                                     # (H, S)
    bw = np.array([80.0, 110.0, 160.0])
    env = np.zeros_like(freqs)
    for j in range(formants.shape[1]):
        env += (1.0 / (j + 1)) / (1.0 + ((freqs - formants[None, :, j]) / bw[j]) ** 2)
    env *= (freqs < sr / 2 - 100) / k ** 0.7                    # glottal roll-off, no aliasing
    jitter = rng.uniform(0, 2 * np.pi, size=(n_harm, 1))
    return (env * np.sin(k * phase[None, :] + jitter)).sum(0)


def _band_noise(n: int, centre: float, width: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """White noise shaped to a Gaussian band in the frequency domain. Returns (n,)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec *= np.exp(-0.5 * ((f - centre) / width) ** 2)
    return np.fft.irfft(spec, n)


def synth_word(word: str, speaker: Speaker, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One spoken word (float32 samples in about [-1, 1])."""
    parts = []
    rate = speaker.rate * rng.uniform(0.92, 1.08)
    for ph in WORDS[word]:
        kind, params = PHONEMES[ph]
        if kind in ("vowel", "nasal"):
            dur = (0.16 if kind == "vowel" else 0.08) / rate * rng.uniform(0.85, 1.15)
            n = int(dur * sr)
            t = np.arange(n) / sr
            f0 = speaker.f0 * (1 + 0.06 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)) * rng.uniform(0.95, 1.05)
            fm = np.array(params + ((2500,) if len(params) == 2 else ()), dtype=float) * speaker.formant_scale
            fm = np.tile(fm, (n, 1)) * (1 + 0.03 * rng.standard_normal(3))
            x = _harmonic_vowel(f0, fm, sr, rng)
            if kind == "nasal":
                x *= 0.5
            x = x / (np.abs(x).max() + 1e-9)
            x += speaker.breath * rng.standard_normal(n)
            fade = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.015 * sr))
            parts.append(x * fade)
        elif kind == "fricative":
            n = int(0.11 / rate * sr * rng.uniform(0.85, 1.15))
            centre = min(params[0] * speaker.formant_scale, sr / 2 * 0.85)
            x = _band_noise(n, centre, params[1], sr, rng)
            x = 0.35 * x / (np.abs(x).max() + 1e-9) * np.hanning(n)
            parts.append(x)
        else:  # plosive: closure silence then a short burst
            parts.append(np.zeros(int(0.035 / rate * sr)))
            n = int(0.025 * sr)
            centre = min(params[0] * speaker.formant_scale, sr / 2 * 0.85)
            x = _band_noise(n, centre, 800, sr, rng)
            parts.append(0.6 * x / (np.abs(x).max() + 1e-9) * np.exp(-np.arange(n) / (0.006 * sr)))
    return np.concatenate(parts).astype(np.float32)


def synth_message(words: list[str], speaker: Speaker, sr: int, rng: np.random.Generator,
                  noise: float = 0.003) -> np.ndarray:
    """Words from one speaker with short pauses, leading/trailing silence and background noise."""
    pieces = [np.zeros(int(sr * rng.uniform(0.02, 0.2)))]
    for i, w in enumerate(words):
        if i:
            pieces.append(np.zeros(int(sr * rng.uniform(0.05, 0.25))))
        pieces.append(synth_word(w, speaker, sr, rng) * rng.uniform(0.5, 0.9))
    pieces.append(np.zeros(int(sr * rng.uniform(0.02, 0.2))))
    x = np.concatenate(pieces)
    x = x + rng.normal(0, noise * rng.uniform(0.3, 2.0), size=x.shape)
    return np.clip(x, -1, 1).astype(np.float32)


@dataclass
class DemoCorpusSpec:
    """Sizes and scenario parameters of the demo corpus."""
    train_messages: int = 1200
    test_messages: int = 300
    words_per_message: int = 2
    vocab_size: int = 5
    speakers: int = 8
    test_speakers: int = 0  # 0: test messages from the same (chat-member) voices, as held-out takes
    sample_rate: int = 8000
    clean_fraction: float = 0.1
    unlabeled_fraction: float = 0.2
    chat_rate: float = 0.35
    chatter_share: float = 0.25
    delay_median: float = 6.0
    delay_sigma: float = 0.8
    style_rate: float = 0.1
    seed: int = 0
    vocab: list[str] = field(default_factory=list)

    def classes(self) -> list[str]:
        return [" ".join(ws) for ws in itertools.product(self.vocab, repeat=self.words_per_message)]


def _write_wav(path: Path, x: np.ndarray, sr: int) -> None:
    import soundfile as sf
    sf.write(str(path), x, sr, subtype="PCM_16")


def _dump(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_demo_corpus(out: str | Path, spec: DemoCorpusSpec | None = None) -> dict:
    """Write a chat-aligned voice-message corpus to OUT; return a summary dict.

    Files (the same layout as the chat-fsdd benchmark):
    audio/*.wav, voice.csv (id,path,time), unlabeled.csv (id,path), chat.csv (time,author,text),
    clean.csv (id,label), test.csv (id,path,label), truth.csv (id,label,split; scoring only),
    corpus.json (the spec).
    """
    spec = spec or DemoCorpusSpec()
    rng = np.random.default_rng(spec.seed)
    if not spec.vocab:
        spec.vocab = sorted(WORDS)[: spec.vocab_size]
    unknown = [w for w in spec.vocab if w not in WORDS]
    if unknown:
        raise ValueError(f"unknown demo words: {unknown}")
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    voices = [Speaker.random(f"spk{i}", rng) for i in range(spec.speakers)]
    if not 0 <= spec.test_speakers < spec.speakers:
        raise ValueError("test_speakers must be in [0, speakers)")
    train_voices = voices[spec.test_speakers:]
    test_voices = voices[: spec.test_speakers] or train_voices
    sr = spec.sample_rate

    def style(text: str) -> str:
        if rng.random() >= spec.style_rate:
            return text
        return text.upper() if rng.random() < 0.5 else text.capitalize() + str(rng.choice([".", "!", " "]))

    truth, voice_rows, unlabeled, chat, clean, test = [], [], [], [], [], []
    t = 0.0
    for i in range(spec.train_messages):
        words = list(rng.choice(spec.vocab, size=spec.words_per_message))
        spk = train_voices[rng.integers(len(train_voices))]
        mid = f"train_{i:06d}"
        _write_wav(out / "audio" / f"{mid}.wav", synth_message(words, spk, sr, rng), sr)
        text = " ".join(words)
        t += rng.exponential(12.0)
        if rng.random() < spec.unlabeled_fraction:
            truth.append((mid, text, "unlabeled"))
            unlabeled.append((mid, f"audio/{mid}.wav"))
            continue
        truth.append((mid, text, "train"))
        voice_rows.append((mid, f"audio/{mid}.wav", f"{t:.3f}"))
        chat.append((t + float(rng.lognormal(math.log(spec.delay_median), spec.delay_sigma)),
                     f"user{rng.integers(10_000):04d}", style(text)))
        if rng.random() < spec.clean_fraction / (1 - spec.unlabeled_fraction):
            clean.append((mid, text))
    s, t_end = 0.0, t + 120.0
    while s < t_end:
        s += rng.exponential(1 / spec.chat_rate)
        if rng.random() < spec.chatter_share:
            msg = str(rng.choice(CHATTER))
        else:
            msg = style(" ".join(rng.choice(spec.vocab, size=spec.words_per_message)))
        chat.append((s, f"user{rng.integers(10_000):04d}", msg))
    chat.sort()
    for i in range(spec.test_messages):
        words = list(rng.choice(spec.vocab, size=spec.words_per_message))
        spk = test_voices[rng.integers(len(test_voices))]
        mid = f"test_{i:06d}"
        _write_wav(out / "audio" / f"{mid}.wav", synth_message(words, spk, sr, rng), sr)
        test.append((mid, f"audio/{mid}.wav", " ".join(words)))
        truth.append((mid, " ".join(words), "test"))

    _dump(out / "voice.csv", ["id", "path", "time"], voice_rows)
    _dump(out / "unlabeled.csv", ["id", "path"], unlabeled)
    _dump(out / "chat.csv", ["time", "author", "text"], [(f"{a:.3f}", b, c) for a, b, c in chat])
    _dump(out / "clean.csv", ["id", "label"], clean)
    _dump(out / "test.csv", ["id", "path", "label"], test)
    _dump(out / "truth.csv", ["id", "label", "split"], truth)
    info = asdict(spec) | {"classes": len(spec.classes()),
                           "speakers": [asdict(v) for v in voices],
                           "counts": {"typed": len(voice_rows), "unlabeled": len(unlabeled),
                                      "clean": len(clean), "test": len(test), "chat": len(chat)}}
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
