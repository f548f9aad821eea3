"""Small I/O helpers shared by every stage: atomic writes, tables, shards, JSON, provenance."""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from pllcli.errors import InputError, UsageError

STDIO = "-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    A reader never sees a half-written file: either the old one or the complete new one.
    """
    path = Path(path)
    if path.is_dir():  # else os.replace fails naming the internal temporary file
        raise InputError("is a directory; give a file path", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp makes 0600; give the mode open() would (0666 & ~umask)
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def current_umask() -> int:
    """The process umask, read from /proc/self/status where possible (os.umask can only be read
    by setting it, which races with threads that create files)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


_UMASK_LOCK = threading.Lock()
_MAGIC = ((b"\x89HDF\r\n\x1a\n", "an HDF5 file (a feature or label store?)"),
          (b"PK\x03\x04", "a zip archive (a checkpoint or TorchScript model?)"))


def sniff_kind(path: str | os.PathLike) -> str:
    """What an existing file looks like, for error messages: 'an HDF5 file ...', 'a zip archive ...',
    'a text file' or 'a binary file'."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if b"\0" in head:
        return "a binary file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the 4096-byte boundary
            return "a binary file"
    return "a text file"


def check_output(path: str | os.PathLike, suffixes: tuple[str, ...] | list[str] | None, *, command: str,
                 overwrite: bool = False, own_kind=None, kind: str = "", inputs=(),
                 allow_stdout: bool = False) -> None:
    """Refuse an output path before any work is done (UsageError naming the path):

    - a suffix not in `suffixes` (the error lists them; None = any); '-' only with `allow_stdout`;
    - a directory, or a file that is also one of `inputs`;
    - an existing file unless `overwrite`, or unless `own_kind(path)` says it is what the
      command writes (`kind` names that in the message), so a feature store is never replaced
      by a CSV by accident.
    """
    if str(path) == STDIO:
        if allow_stdout:
            return
        raise UsageError(f"{command} cannot write its output to stdout ('-'); give a file")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffixes is not None and suffix not in suffixes:
        names = ", ".join(suffixes[:-1]) + (" or " if len(suffixes) > 1 else "") + suffixes[-1]
        raise UsageError(f"{p}: {command} writes {names} files, not "
                         + (repr(suffix) if suffix else "a file without a suffix"))
    if p.is_dir():
        raise UsageError(f"{p}: is a directory; give a file path")
    if not p.exists():
        return
    for i in inputs:
        if i is not None and str(i) != STDIO and Path(i).exists() and p.samefile(i):
            raise UsageError(f"{p}: is also an input of {command}; give another output path")
    if overwrite or (own_kind is not None and own_kind(p)):
        return
    what = f" and is {sniff_kind(p)}, not {kind}" if own_kind is not None else ""
    raise UsageError(f"{p} exists{what}; pass --overwrite to replace it")


def check_report_output(path: str | os.PathLike | None, *, command: str, overwrite: bool = False,
                        inputs=()) -> None:
    """`--json FILE` (or another text report): refuse an input, a directory, or an existing file that is
    not text (a feature store, a checkpoint) unless `overwrite`; None and '-' pass."""
    if path is None:
        return
    check_output(path, None, command=command, overwrite=overwrite, kind="a text report", inputs=inputs,
                 allow_stdout=True, own_kind=lambda p: sniff_kind(p) == "a text file")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    if str(path) == STDIO:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(obj: Any, path: str | os.PathLike | None) -> None:
    """Write `obj` as indented JSON to `path` ('-' for stdout); no-op for None."""
    if path is None:
        return
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {spec}: need 0 <= I < N")
    return i, n



_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|sec|m|min|h)?\s*$", re.I)
_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "": 1.0}


def parse_duration(spec: "str | float | None", option: str = "--duration") -> "float | None":
    """'30s', '1.5m', '500ms', '2h' or a bare number of seconds -> seconds (> 0); None -> None.
    Errors name `option`, the flag the value came from."""
    if spec is None:
        return None
    if isinstance(spec, (int, float)):
        value = float(spec)
    else:
        m = _DURATION.match(str(spec))
        if not m:
            raise UsageError(f"{option}: cannot read {spec!r} as a duration (e.g. 2s, 1.5m, 500ms or 2)")
        value = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]
    if not value > 0:
        raise UsageError(f"{option} must be positive, got {spec!r}")
    return value

def sha256_file(path: str | os.PathLike, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        read = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            read += len(chunk)
            if limit is not None and read >= limit:
                break
    return h.hexdigest()


def provenance(inputs: dict[str, str | os.PathLike | None] | None = None,
               params: dict[str, Any] | None = None) -> dict[str, Any]:
    """What made an output: command line, input checksums, parameters, time, version."""
    from pllcli import __version__
    files = {}
    for role, p in (inputs or {}).items():
        if p is None or str(p) == STDIO:
            files[role] = {"path": str(p)} if p is not None else None
            continue
        p = Path(p)
        files[role] = {"path": str(p), "sha256": sha256_file(p) if p.is_file() else None}
    return {
        "command": sys.argv,
        "inputs": files,
        "params": params or {},
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pllcli_version": __version__,
    }


# ---------------------------------------------------------------- tables

def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    if str(path) == STDIO:
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict", newline="")
    return open(path, encoding="utf-8", errors="strict", newline="")


def table_format(path: str | os.PathLike, first_line: str = "") -> str:
    """'csv', 'tsv' or 'jsonl', from the extension or else the first line."""
    name = str(path).lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".tsv", "tsv"), (".csv", "csv")):
        if name.endswith(ext):
            return fmt
    s = first_line.lstrip()
    if s.startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in first_line else "csv"


class Table:
    """Rows of a CSV, TSV or JSONL file as dicts of strings, with 1-based line numbers.

    `Table(path, required=["id", "path"])` fails at once with the file and the
    missing column; iterating yields `(line_no, row)`; a non-UTF-8 byte is an
    InputError naming the line.
    """

    def __init__(self, path: str | os.PathLike, required: list[str] | tuple[str, ...] = (),
                 name: str | None = None):
        self.path = str(path)
        self.name = name or ("<stdin>" if self.path == STDIO else self.path)
        if self.path != STDIO and not Path(self.path).exists():
            raise InputError("no such file", self.name)
        raw = self._read_all()
        self._lines = raw.splitlines()
        first = next((ln for ln in self._lines if ln.strip()), "")
        self.format = table_format(self.path, first)
        if self.format == "jsonl":
            self.columns = list(json.loads(first).keys()) if first else []
        else:
            delim = "\t" if self.format == "tsv" else ","
            self._reader_rows = list(csv.reader(self._lines, delimiter=delim))
            self.columns = [c.strip() for c in self._reader_rows[0]] if self._reader_rows else []
        if not self.columns:
            raise InputError("empty file (no header line)", self.name)
        missing = [c for c in required if c not in self.columns]
        if missing:
            raise InputError(f"missing column {missing[0]!r} (columns: {', '.join(self.columns)})",
                             self.name, line=1, field=missing[0])

    def _read_all(self) -> str:
        if self.path == STDIO:
            data = sys.stdin.buffer.read()
        else:
            data = Path(self.path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise InputError(f"not valid UTF-8 (byte 0x{data[e.start]:02x})", self.name, line=line) from None
        return text.lstrip("\ufeff")

    def json_objects(self) -> Iterator[tuple[int, dict]]:
        """JSONL only: `(line_no, object)` with values as parsed (lists stay lists)."""
        if self.format != "jsonl":
            raise InputError("expected a JSONL file", self.name)
        for ln, line in enumerate(self._lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"invalid JSON ({e.msg})", self.name, line=ln) from None
            if not isinstance(obj, dict):
                raise InputError("each JSONL line must be an object", self.name, line=ln)
            yield ln, obj

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        if self.format == "jsonl":
            for ln, obj in self.json_objects():
                yield ln, {k: ("" if v is None else str(v)) for k, v in obj.items()}
            return
        for ln, values in self.csv_values():
            yield ln, dict(zip(self.columns, values))

    def csv_values(self) -> Iterator[tuple[int, list[str]]]:
        """CSV/TSV only: `(line_no, values)` per non-blank row, values stripped and padded with ""
        to the header's length (a row with more fields than the header is an InputError)."""
        ncol, strip = len(self.columns), str.strip
        pad = [""] * ncol
        for ln, cells in enumerate(self._reader_rows, start=1):
            if ln == 1:
                continue
            values = list(map(strip, cells))
            if not any(values):  # blank line (or only separators / spaces)
                continue
            if len(values) != ncol:
                if len(values) > ncol:
                    raise InputError(f"{len(cells)} fields, header has {ncol}", self.name, line=ln)
                values += pad[len(values):]
            yield ln, values

    def rows(self) -> list[tuple[int, dict[str, str]]]:
        return list(self)

    def unique_rows(self, col: str = "id", seen: dict[str, tuple[str, int]] | None = None
                    ) -> Iterator[tuple[int, dict[str, str]]]:
        """Rows whose `col` is non-empty and unique; `seen` ({id: (file, line)}) extends the check
        across files. An empty or repeated id is an InputError naming both places."""
        seen = {} if seen is None else seen
        for ln, row in self:
            key = row[col]
            if not key:
                raise InputError(f"empty {col}", self.name, line=ln, field=col)
            if key in seen:
                f0, l0 = seen[key]
                where = f"line {l0}" if f0 == self.name else f"{f0}:{l0}"
                raise InputError(f"duplicate {col} {key!r} (first on {where})", self.name, line=ln, field=col)
            seen[key] = (self.name, ln)
            yield ln, row
