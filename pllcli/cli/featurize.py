"""`pllcli featurize INPUT OUTPUT`: audio -> HDF5 feature store."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from pllcli.cli._options import Jobs, Overwrite, Shard, Strict

_DEFAULT_CHUNK = 256  # = pllcli.features.extract.DEFAULT_CHUNK (checked by a test; not imported: keeps --help fast)


def featurize_cmd(
    input: Annotated[str, typer.Argument(metavar="INPUT", help=(
        "Manifest (CSV/TSV/JSONL with id and path columns; other columns are kept as metadata; "
        "relative paths resolve against the manifest's folder), a directory scanned recursively, "
        "or '-' for a manifest on stdin."))],
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="Feature store to write (.h5).")],
    preset: Annotated[str, typer.Option("--preset", "-p", help=(
        "Feature preset: speech8k (default; 8 kHz log-mel 64 x 25/10 ms), speech16k, fbank8k, fbank16k."))]
    = "speech8k",
    frontend: Annotated[Optional[str], typer.Option("--frontend", help="Override: logmel or fbank.")] = None,
    sample_rate: Annotated[Optional[int], typer.Option("--sample-rate", "--sr", help="Override: target rate (Hz).")] = None,
    n_mels: Annotated[Optional[int], typer.Option("--n-mels", help="Override: mel bins.")] = None,
    n_fft: Annotated[Optional[int], typer.Option("--n-fft", help="Override: FFT size.")] = None,
    win_length: Annotated[Optional[int], typer.Option("--win-length", help="Override: window (samples).")] = None,
    hop_length: Annotated[Optional[int], typer.Option("--hop-length", help="Override: hop (samples).")] = None,
    fmin: Annotated[Optional[float], typer.Option("--fmin", help="Override: lowest frequency (Hz).")] = None,
    fmax: Annotated[Optional[float], typer.Option("--fmax", help="Override: highest frequency (Hz; <=0: Nyquist+fmax).")] = None,
    log_offset: Annotated[Optional[float], typer.Option("--log-offset", help="Override: log offset/floor.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Storage dtype: float32 or float16.")] = None,
    jobs: Jobs = 1,
    shard: Shard = None,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", min=1, show_default=False, help=(
        "Files per chunk (unit of work, of resume and of the progress bar); default "
        f"{_DEFAULT_CHUNK}."))] = None,
    ext: Annotated[Optional[str], typer.Option("--ext", help=(
        "Comma-separated extensions for directory input (default wav,flac,ogg,mp3)."))] = None,
    strict: Strict = False,
    overwrite: Overwrite = False,
    report: Annotated[Optional[str], typer.Option("--report", metavar="FILE", help=(
        "Write the summary (skips with reasons, warnings, x-real-time) as JSON ('-' for stdout)."))] = None,
):
    """Compute log-mel / Kaldi fbank features for audio files into one HDF5 store.

    Batched, parallel (--jobs), sharded (--shard I/N, then `pllcli merge`) and resumable:
    rerun the same command after an interruption and finished chunks are kept.
    """
    import logging
    import sys

    from pllcli.cli._state import settings
    from pllcli.errors import StrictModeError
    from pllcli.features.config import FeatureConfig, _pow2
    from pllcli.features.extract import DEFAULT_CHUNK, featurize
    from pllcli.io import parse_shard, write_json

    base = FeatureConfig.preset(preset)
    fr = frontend or base.frontend
    if fr == "fbank" and n_fft is None and (win_length is not None or frontend is not None):
        n_fft = _pow2(win_length or base.win_length)
    if sample_rate is not None and fmax is None and base.fmax > sample_rate / 2:
        fmax = sample_rate / 2  # a lower --sample-rate pulls the preset's fmax down to Nyquist
    config = FeatureConfig.preset(preset, frontend=frontend, sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft,
                                  win_length=win_length, hop_length=hop_length, fmin=fmin, fmax=fmax,
                                  log_offset=log_offset, dtype=dtype)
    exts = tuple(e.strip() for e in ext.split(",") if e.strip()) if ext else None
    kwargs = {"extensions": exts} if exts else {}
    try:
        summary = featurize(input, output, config, jobs=jobs, shard=parse_shard(shard),
                            chunk_size=DEFAULT_CHUNK if chunk_size is None else chunk_size,
                            strict=strict, overwrite=overwrite, progress=settings.verbosity >= 0, **kwargs)
    except StrictModeError as e:
        if report:
            write_json({"error": str(e)}, report)
        raise
    write_json(summary, report)
    log = logging.getLogger("pllcli.featurize")
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(summary["skipped_by_reason"].items()))
    msg = (f"featurized {summary['files_done']} files"
           f" ({summary['files_skipped']} skipped{': ' + reasons if reasons else ''}"
           f"{', %d resumed' % summary['files_resumed'] if summary['files_resumed'] else ''}), "
           f"{summary['audio_seconds']:.1f} s audio in {summary['wall_seconds']:.2f} s, "
           f"{summary['x_real_time'] or 0:.0f}x real time -> {summary['output']}")
    if summary["warnings"]:
        msg += f"; {len(summary['warnings'])} warning(s)"
    if settings.verbosity >= 0:
        print(msg, file=sys.stderr)
    else:
        log.debug(msg)


def register(app: typer.Typer) -> None:
    app.command(name="featurize")(featurize_cmd)
