"""`pllcli featurize INPUT -o OUTPUT`: audio -> HDF5 feature store."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pllcli.cli._options import Jobs, Shard, Strict, output_or_positional

_DEFAULT_CHUNK = 256  # = pllcli.features.extract.DEFAULT_CHUNK (checked by a test; not imported: keeps --help fast)


# The closed choices, = pllcli.features.config AUTO_PRESET + PRESETS / FRONTENDS / DTYPES (checked
# by a test; not imported: keeps --help fast).
class Preset(str, Enum):
    auto = "auto"
    speech8k = "speech8k"
    speech16k = "speech16k"
    fbank8k = "fbank8k"
    fbank16k = "fbank16k"


class Frontend(str, Enum):
    logmel = "logmel"
    fbank = "fbank"


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


def featurize_cmd(
    input: Annotated[str, typer.Argument(metavar="INPUT", help=(
        "Manifest (CSV/TSV/JSONL with id and path columns; other columns are kept as metadata; "
        "relative paths resolve against the manifest's folder), a directory scanned recursively, "
        "a Kaldi data directory (wav.scp, optional segments, utt2spk, text), a lhotse manifest "
        "(cuts or recordings JSONL, .jsonl.gz too, or a folder with recordings + supervisions), "
        "one audio file, or '-' for a manifest on stdin."))],
    legacy_output: Annotated[Optional[Path], typer.Argument(
        metavar="OUTPUT", hidden=True, help="Deprecated: use -o/--output.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="PATH", help="Feature store to write (.h5); required.")] = None,
    preset: Annotated[Preset, typer.Option("--preset", "-p", help=(
        "Feature preset: speech8k (8 kHz log-mel 64 x 25/10 ms), speech16k (16 kHz, up to 8 kHz), "
        "fbank8k, fbank16k (Kaldi fbank); auto: speech16k if the first 16 files of the input are all "
        ">= 16 kHz, else speech8k (a notice on stderr says which and why)."))]
    = Preset.auto,
    frontend: Annotated[Optional[Frontend], typer.Option("--frontend", help="Override: logmel or fbank.")] = None,
    sample_rate: Annotated[Optional[int], typer.Option("--sample-rate", "--sr", help="Override: target rate (Hz).")] = None,
    n_mels: Annotated[Optional[int], typer.Option("--n-mels", help="Override: mel bins.")] = None,
    n_fft: Annotated[Optional[int], typer.Option("--n-fft", help="Override: FFT size.")] = None,
    win_length: Annotated[Optional[int], typer.Option("--win-length", help="Override: window (samples).")] = None,
    hop_length: Annotated[Optional[int], typer.Option("--hop-length", help="Override: hop (samples).")] = None,
    fmin: Annotated[Optional[float], typer.Option("--fmin", help="Override: lowest frequency (Hz).")] = None,
    fmax: Annotated[Optional[float], typer.Option("--fmax", help="Override: highest frequency (Hz; <=0: Nyquist+fmax).")] = None,
    log_offset: Annotated[Optional[float], typer.Option("--log-offset", help="Override: log offset/floor.")] = None,
    dtype: Annotated[Optional[Dtype], typer.Option("--dtype", help="Storage dtype: float32 or float16.")] = None,
    encoder: Annotated[Optional[str], typer.Option("--encoder", metavar="SPEC", help=(
        "Store a pretrained encoder's frames (T', D) instead of log-mel (--preset and the overrides "
        "then do not apply). Kinds: onnx:DIR (speech_embedding pair: melspectrogram.onnx + "
        "embedding_model.onnx), onnx:embedding=E.onnx,melspec=M.onnx,mel_scale=0.1,mel_offset=2, "
        "onnx:FRAMES.onnx,hop=N (one waveform->frames graph), torchaudio:WAV2VEC2_BASE,layer=6 "
        "(bundle weights from the torch hub cache); keys pad=centre|end, min_duration=1.5s."))] = None,
    max_duration: Annotated[str, typer.Option("--max-duration", metavar="DURATION", help=(
        "Decode at most this much of one file (2s, 1.5m, 1h or seconds); longer files are cut, "
        "with a warning."))] = "1h",
    jobs: Jobs = 1,
    shard: Shard = None,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", min=1, show_default=False, help=(
        "Files per chunk (unit of work, of resume and of the progress bar); default "
        f"{_DEFAULT_CHUNK}."))] = None,
    ext: Annotated[Optional[str], typer.Option("--ext", help=(
        "Comma-separated extensions for directory input (default wav,flac,ogg,mp3)."))] = None,
    strict: Strict = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=(
        "Replace an existing output; also discards the resume journal of an interrupted run "
        "(a fresh run)."))] = False,
    json_out: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help=(
        "Write the summary (skips with reasons, warnings, resumed and redone chunks, x-real-time) as "
        "JSON to FILE ('-' for stdout)."))] = None,
    report: Annotated[Optional[str], typer.Option("--report", metavar="FILE", hidden=True,
                                                  help="Deprecated spelling of --json.")] = None,
):
    """Compute log-mel / Kaldi fbank features, or a pretrained encoder's frames, into one HDF5 store.

    Batched, parallel (--jobs), sharded (--shard I/N, then `pllcli merge`) and resumable:
    rerun the same command after an interruption and finished chunks are kept.
    """
    import logging
    import sys

    from pllcli.cli._state import one_blas_thread, settings
    one_blas_thread()   # one per process: --jobs N makes the processes
    from pllcli.errors import StrictModeError, UsageError
    from pllcli.features.config import AUTO_PRESET, AutoPreset, config_from_options, encoder_config
    from pllcli.features.extract import DEFAULT_CHUNK, featurize
    from pllcli.io import parse_duration, parse_shard, write_json

    out = output_or_positional(output, legacy_output, "featurize")
    if report is not None and json_out is not None:
        raise UsageError("give --json only (--report is its deprecated spelling)")
    report = json_out if json_out is not None else report
    overrides = dict(frontend=frontend and frontend.value, sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft,
                     win_length=win_length, hop_length=hop_length, fmin=fmin, fmax=fmax, log_offset=log_offset)
    if encoder is not None:
        given = [k for k, v in overrides.items() if v is not None]
        if given:
            raise UsageError(f"--encoder sets the frames itself; drop --{given[0].replace('_', '-')}")
        config = encoder_config(encoder, dtype and dtype.value)
    elif preset.value == AUTO_PRESET:  # chosen by featurize from the input's first files
        config = AutoPreset(dict(overrides, dtype=dtype and dtype.value))
    else:
        config = config_from_options(preset.value, dtype=dtype and dtype.value, **overrides)
    exts = tuple(e.strip() for e in ext.split(",") if e.strip()) if ext else None
    kwargs = {"extensions": exts} if exts else {}
    try:
        summary = featurize(input, out, config, jobs=jobs, shard=parse_shard(shard),
                            chunk_size=DEFAULT_CHUNK if chunk_size is None else chunk_size,
                            strict=strict, overwrite=overwrite, progress=settings.verbosity >= 0,
                            max_duration=parse_duration(max_duration, "--max-duration"), **kwargs)
    except StrictModeError as e:
        if report:
            write_json({"error": str(e)}, report)
        raise
    write_json(summary, report)
    msg = summary_line(summary)
    if settings.verbosity >= 0:  # what was written, on stdout unless the JSON goes there
        print(msg, file=sys.stderr if report == "-" else sys.stdout)
    else:
        logging.getLogger("pllcli.featurize").debug(msg)


def summary_line(s: dict) -> str:
    """The one line featurize ends with: counts, skips by reason, speed, the output path."""
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(s["skipped_by_reason"].items()))
    extra = [f"{s[k]} {what}" for k, what in (("files_resumed", "resumed"), ("files_changed", "redone (changed since)"),
                                                ("files_cut", "cut to --max-duration"),
                                                ("files_padded", "zero-padded to the encoder's minimum length"))
             if s.get(k)]
    msg = (f"featurized {s['files_done']} files ({s['files_skipped']} skipped{': ' + reasons if reasons else ''}"
           f"{''.join(', ' + e for e in extra)}), {s['audio_seconds']:.1f} s audio in {s['wall_seconds']:.2f} s, "
           f"{s['x_real_time'] or 0:.0f}x real time -> {s['output']}")
    return msg + (f"; {len(s['warnings'])} warning(s)" if s["warnings"] else "")


def register(app: typer.Typer) -> None:
    app.command(name="featurize")(featurize_cmd)
