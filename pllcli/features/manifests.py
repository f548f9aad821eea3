"""Corpora people already have, read as featurize inputs: Kaldi data directories and lhotse manifests.

Kaldi: a folder with `wav.scp` (`<recording-id> <path>`; pipe commands are refused), and
optionally `segments` (`<utt-id> <recording-id> <start> <end>`, end -1 = to the end),
`utt2spk` and `text`. lhotse: recordings, supervisions or cuts JSONL (`.jsonl.gz` too);
a folder with `*recordings*.jsonl[.gz]` and `*supervisions*.jsonl[.gz]`. Segments
(Kaldi segments, supervisions, cuts) become items with onset and offset; recording,
speaker and text become metadata columns. lhotse is not needed to read its manifests.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator

from pllcli.errors import InputError
from pllcli.features.items import Item

KALDI_SCP = "wav.scp"


def _resolve(p: str, base: Path) -> str:
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


# -------------------------------------------------------------------- Kaldi

def _kaldi_lines(path: Path, min_fields: int, max_split: int = -1) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a Kaldi table file, blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split(None, max_split) if max_split > 0 else line.split()
            if len(fields) < min_fields:
                raise InputError(f"expected at least {min_fields} fields", str(path), line=ln)
            yield ln, [x.strip() for x in fields]


def _kaldi_map(path: Path) -> dict[str, str]:
    """utt2spk / text: first field -> the rest of the line ('' when absent)."""
    if not path.exists():
        return {}
    return {f[0]: (f[1] if len(f) > 1 else "") for _, f in _kaldi_lines(path, 1, max_split=1)}


def _kaldi_wavs(scp: Path) -> dict[str, tuple[str, int]]:
    """wav.scp: recording id -> (resolved path, line). Pipe commands and ark offsets are refused."""
    wavs: dict[str, tuple[str, int]] = {}
    for ln, (rec, spec) in _kaldi_lines(scp, 2, max_split=1):
        if spec.endswith("|") or spec.startswith("|"):
            raise InputError("pipe commands in wav.scp are not supported (featurize reads audio files); "
                             "write the audio to files first, e.g. with sox", str(scp), line=ln)
        if "ark:" in spec or spec.rsplit(":", 1)[-1].isdigit():
            raise InputError("archive (ark:offset) entries in wav.scp are not supported; list audio files",
                             str(scp), line=ln)
        wavs[rec] = (_resolve(spec, scp.parent), ln)
    return wavs


def read_kaldi_dir(folder: str) -> tuple[list[Item], list[str]]:
    """Items of a Kaldi data directory: one per segment (or per recording without `segments`)."""
    d = Path(folder)
    wavs = _kaldi_wavs(d / KALDI_SCP)
    spk, text = _kaldi_map(d / "utt2spk"), _kaldi_map(d / "text")
    items: list[Item] = []
    seg_file = d / "segments"
    if seg_file.exists():
        for ln, f in _kaldi_lines(seg_file, 4):
            utt, rec = f[0], f[1]
            if rec not in wavs:
                raise InputError(f"recording {rec!r} is not in {KALDI_SCP}", str(seg_file), line=ln)
            try:
                start, end = float(f[2]), float(f[3])
            except ValueError:
                raise InputError(f"start/end must be numbers, got {f[2]!r} {f[3]!r}", str(seg_file), line=ln) from None
            items.append(Item(utt, wavs[rec][0], ln, {"recording": rec}, start, None if end < 0 else end))
    else:
        items = [Item(rec, p, ln, {}) for rec, (p, ln) in wavs.items()]
    cols = (["recording"] if seg_file.exists() else []) + (["speaker"] if spk else []) + (["text"] if text else [])
    for it in items:
        it.meta.update({"speaker": spk.get(it.id, "")} if spk else {})
        it.meta.update({"text": text.get(it.id, "")} if text else {})
    return _with_segment_columns(items, cols)


def _with_segment_columns(items: list[Item], cols: list[str]) -> tuple[list[Item], list[str]]:
    """Add onset/offset metadata columns when any item is a segment."""
    if not any(it.onset is not None or it.offset is not None for it in items):
        return items, cols
    for it in items:
        it.meta["onset"] = "" if it.onset is None else repr(float(it.onset))
        it.meta["offset"] = "" if it.offset is None else repr(float(it.offset))
    return items, cols + ["onset", "offset"]


# -------------------------------------------------------------------- lhotse

def is_lhotse_file(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz")) and _lhotse_kind(path) is not None


def _objects(path: str) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise InputError(f"not JSON ({e})", path, line=ln) from None
                    if not isinstance(obj, dict):
                        raise InputError("not a JSON object", path, line=ln)
                    yield ln, obj
    except (OSError, EOFError) as e:  # e.g. a truncated .gz
        raise InputError(f"cannot read ({e})", path) from None


def _lhotse_kind(path: str) -> str | None:
    """'recordings', 'supervisions' or 'cuts' from the first object; None if not lhotse."""
    try:
        first = next(_objects(path), (0, {}))[1]
    except InputError:
        return None
    if "sources" in first and "sampling_rate" in first:
        return "recordings"
    if "recording" in first and "start" in first and "duration" in first:
        return "cuts"
    if "recording_id" in first and "start" in first and "duration" in first:
        return "supervisions"
    return None


def _source(rec: dict, path: str, ln: int) -> str:
    """The audio file of a lhotse recording (resolved against the manifest's folder)."""
    srcs = rec.get("sources") or []
    if not srcs:
        raise InputError(f"recording {rec.get('id')!r} has no sources", path, line=ln)
    s = srcs[0]
    if s.get("type") != "file":
        raise InputError(f"recording {rec.get('id')!r}: source type {s.get('type')!r} is not supported "
                         "(featurize reads audio files)", path, line=ln)
    return _resolve(str(s["source"]), Path(path).resolve().parent)


def _sup_meta(sups: list[dict]) -> dict[str, str]:
    speakers = list(dict.fromkeys(str(s["speaker"]) for s in sups if s.get("speaker")))
    return {"speaker": ",".join(speakers), "text": " ".join(str(s["text"]) for s in sups if s.get("text"))}


def _entries(path: str, kind: str, make) -> list:
    """make(obj, line) for every object of a lhotse JSONL; a missing or malformed field is an
    InputError naming the line."""
    out = []
    for ln, obj in _objects(path):
        try:
            out.append(make(obj, ln))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a lhotse {kind} entry (missing or bad field {e})", path, line=ln) from None
    return out


def _cut_item(c: dict, path: str, ln: int) -> Item:
    start = float(c["start"])
    meta = {"recording": str(c["recording"]["id"]), **_sup_meta(c.get("supervisions") or [])}
    return Item(str(c["id"]), _source(c["recording"], path, ln), ln, meta, start, start + float(c["duration"]))


def read_lhotse(path: str) -> tuple[list[Item], list[str]]:
    """Items of a lhotse manifest file (recordings or cuts) or of a folder with recordings (and supervisions)."""
    if os.path.isdir(path):
        return _read_lhotse_dir(path)
    kind = _lhotse_kind(path)
    if kind == "recordings":
        return _entries(path, kind, lambda r, ln: Item(str(r["id"]), _source(r, path, ln), ln)), []
    if kind == "cuts":
        return _with_segment_columns(_entries(path, kind, lambda c, ln: _cut_item(c, path, ln)),
                                     ["recording", "speaker", "text"])
    if kind == "supervisions":
        raise InputError("a lhotse supervisions manifest needs its recordings: pass the folder that holds "
                         "both, or a cuts manifest", path)
    raise InputError("not a lhotse recordings, supervisions or cuts manifest", path)


def lhotse_dir_files(folder: str) -> tuple[str | None, str | None]:
    """(recordings, supervisions) manifests of a folder (None where absent); InputError if ambiguous."""
    found = {}
    for kind in ("recordings", "supervisions"):
        hits = sorted(str(p) for p in Path(folder).iterdir()
                      if kind in p.name and p.name.endswith((".jsonl", ".jsonl.gz")))
        if len(hits) > 1:
            raise InputError(f"several lhotse {kind} manifests ({', '.join(Path(h).name for h in hits)}); "
                             "pass one folder per corpus split", folder)
        found[kind] = hits[0] if hits else None
    return found["recordings"], found["supervisions"]


def is_lhotse_dir(folder: str) -> bool:
    """A folder holding a lhotse recordings manifest (not just a file named so)."""
    rec = lhotse_dir_files(folder)[0]
    return rec is not None and _lhotse_kind(rec) == "recordings"


def _read_lhotse_dir(folder: str) -> tuple[list[Item], list[str]]:
    rec_file, sup_file = lhotse_dir_files(folder)
    if rec_file is None:
        raise InputError("no lhotse recordings manifest (*recordings*.jsonl[.gz]) in folder", folder)
    recs = dict(_entries(rec_file, "recordings", lambda r, ln: (str(r["id"]), _source(r, rec_file, ln))))
    if sup_file is None:
        return [Item(rid, p, 0) for rid, p in recs.items()], []

    def sup_item(s: dict, ln: int) -> Item:
        rid = str(s["recording_id"])
        if rid not in recs:
            raise InputError(f"recording {rid!r} is not in {Path(rec_file).name}", sup_file, line=ln)
        start = float(s["start"])
        return Item(str(s["id"]), recs[rid], ln, {"recording": rid, **_sup_meta([s])},
                    start, start + float(s["duration"]))
    return _with_segment_columns(_entries(sup_file, "supervisions", sup_item), ["recording", "speaker", "text"])
