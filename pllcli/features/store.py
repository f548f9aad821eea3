"""The HDF5 feature store: a ragged `features` (sum T, F) array plus frame offsets.

Schema (docs/feature_store.md): root attrs `format="pllcli-features"`, `format_version`,
`feature_config` (JSON), `feature_config_hash`, `pllcli_version`, one attr per config field;
datasets `ids` (N,) str, `offsets` (N+1,) int64, `num_frames` (N,) int32, `duration` (N,)
float32, `path` (N,) str, `features` (sumT, F) float32|float16, `meta/<col>` (N,) str.

`FeatureStore` reads it (lazy, fork-safe); `FeatureStoreWriter` writes it incrementally and
atomically; `merge_feature_stores` concatenates stores made with the same config.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pllcli.errors import ConfigMismatchError, InputError, UsageError
from pllcli.features.config import FeatureConfig, check_compatible

FORMAT = "pllcli-features"
LABEL_FORMAT = "pllcli-labels"    # the label store's format attr (pllcli.labels.store), named in errors
FORMAT_VERSION = 1
FEATURE_CHUNK_ROWS = 1024          # HDF5 chunk of `features`: 1024 frames x F (256 KiB at F=64 float32)
COLUMN_ITEMS = 1024               # the writer's per-item columns are written this many items at a time
_CACHE_BYTES = 32 << 20            # h5py raw-data chunk cache per open handle
_REQUIRED = ("ids", "offsets", "num_frames", "duration", "path", "features")


def _h5py():
    import h5py
    return h5py


def _str_array(values) -> np.ndarray:
    """numpy array of Python str (dtype '<U..'); empty -> dtype '<U1'."""
    arr = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    return arr if arr.size else np.zeros(0, dtype="<U1")


def open_h5(path: str | os.PathLike, what: str = "HDF5 file"):
    """Open `path` read-only, turning 'missing' and 'not HDF5' into InputError."""
    h5py = _h5py()
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", str(path))
    if p.is_dir():
        raise InputError(f"is a directory, expected a {what}", str(path))
    try:
        return h5py.File(p, "r", rdcc_nbytes=_CACHE_BYTES)
    except OSError as e:
        raise InputError(f"not a readable {what} ({str(e).splitlines()[0]})", str(path)) from None


def read_format(path: str | os.PathLike) -> str | None:
    """The root `format` attr of an HDF5 file (None if absent)."""
    with open_h5(path) as f:
        v = f.attrs.get("format")
    return v.decode() if isinstance(v, bytes) else (None if v is None else str(v))


class FeatureStore:
    """Read-only view of a feature store.

    Metadata (ids, offsets, frames, durations) is read once into numpy arrays; the HDF5
    handle is opened lazily and reopened when the process id changes, so one instance can
    be handed to forked or spawned DataLoader workers. `fs[i]` / `fs.get(id)` -> (T, F) float32.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._h5 = None
        self._pid = None
        with open_h5(self.path, "feature store") as f:
            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt == LABEL_FORMAT:
                raise InputError("this is a label store; pass it with --labels", self.path)
            if fmt != FORMAT:
                raise InputError(f"not a pllcli feature store (format attr is {fmt!r}, expected {FORMAT!r})",
                                 self.path)
            ver = int(f.attrs.get("format_version", 0))
            if ver > FORMAT_VERSION:
                raise InputError(f"feature store format_version {ver} is newer than this pllcli "
                                 f"supports ({FORMAT_VERSION}); upgrade pllcli", self.path)
            for name in _REQUIRED:
                if name not in f:
                    raise InputError(f"feature store has no dataset {name!r}", self.path, field=name)
            self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            self.ids = _str_array(f["ids"].asstr()[:])
            self.offsets = f["offsets"][:].astype(np.int64)
            self.num_frames = f["num_frames"][:].astype(np.int64)
            self.durations = f["duration"][:].astype(np.float32)
            self.paths = _str_array(f["path"].asstr()[:])
            self.meta_columns = sorted(f["meta"].keys()) if "meta" in f else []
            self.feature_dim = int(f["features"].shape[1])
            self.dtype = str(f["features"].dtype)
            n_rows = int(f["features"].shape[0])
        if "feature_config" not in self.attrs:
            raise InputError("feature store has no feature_config attr", self.path, field="feature_config")
        try:
            cfg = json.loads(self.attrs["feature_config"])
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (TypeError, ValueError):
            raise InputError("corrupt feature_config attribute", self.path) from None
        try:
            self.config = FeatureConfig.from_dict(cfg)
        except (ConfigMismatchError, UsageError) as e:
            raise InputError(f"corrupt feature_config attribute ({e})", self.path) from None
        self.config_hash = str(self.attrs.get("feature_config_hash", self.config.hash()))
        n = len(self.ids)
        if len(self.offsets) != n + 1 or self.offsets[0] != 0 or self.offsets[-1] != n_rows \
                or len(self.num_frames) != n or np.any(np.diff(self.offsets) != self.num_frames):
            raise InputError("feature store is inconsistent (offsets do not match num_frames/features)",
                             self.path, field="offsets")
        self._order = None

    # ---------------------------------------------------------------- handle
    def _file(self):
        pid = os.getpid()
        if self._h5 is None or self._pid != pid:
            self._h5 = _h5py().File(self.path, "r", rdcc_nbytes=_CACHE_BYTES)
            self._pid = pid
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._h5.close()
        self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_h5"], d["_pid"] = None, None
        return d

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FeatureStore({self.path!r}, n={len(self)}, {self.config.summary()})"

    def _ensure_sorted(self) -> None:
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
            self._sorted = self.ids[self._order]

    def index(self, item_id: str) -> int:
        """Row of `item_id`; KeyError if absent (binary search over sorted ids, no Python dict)."""
        self._ensure_sorted()
        pos = int(np.searchsorted(self._sorted, item_id))
        if pos < len(self._sorted) and self._sorted[pos] == item_id:
            return int(self._order[pos])
        raise KeyError(item_id)

    def indices(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of many ids at once (int64); KeyError naming the first missing id."""
        self._ensure_sorted()
        q = np.asarray(ids, dtype=str)
        if not len(self.ids):
            if len(q):
                raise KeyError(str(q[0]))
            return np.zeros(0, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted, q), 0, len(self._sorted) - 1)
        bad = self._sorted[pos] != q
        if bad.any():
            raise KeyError(str(q[bad][0]))
        return self._order[pos].astype(np.int64)

    def __contains__(self, item_id: str) -> bool:
        try:
            self.index(item_id)
            return True
        except KeyError:
            return False

    def __getitem__(self, i: int) -> np.ndarray:
        """Features of row `i` as (T, F) float32."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for a store of {n} items")
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self._file()["features"][a:b], dtype=np.float32)

    def get(self, item_id: str) -> np.ndarray:
        """Features of `item_id` as (T, F) float32."""
        return self[self.index(item_id)]

    def meta(self, column: str) -> np.ndarray:
        """Carried manifest column `column` as (N,) str."""
        if column not in self.meta_columns:
            raise InputError(f"no metadata column {column!r} (have: {', '.join(self.meta_columns) or 'none'})",
                             self.path, field=column)
        return _str_array(self._file()["meta"][column].asstr()[:])

    def load_all(self, dtype: str | None = "float32") -> tuple[np.ndarray, np.ndarray]:
        """Whole store in memory: (features (sumT, F), offsets (N+1,) int64); dtype None keeps storage dtype."""
        feats = self._file()["features"][:]
        if dtype is not None:
            feats = feats.astype(dtype, copy=False)
        return feats, self.offsets.copy()

    def total_duration(self) -> float:
        return float(self.durations.astype(np.float64).sum())


# -------------------------------------------------------------------- writing

def store_attrs(config: FeatureConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Root attrs for a store made with `config`."""
    from pllcli import __version__
    attrs: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "feature_config": config.to_json(), "feature_config_hash": config.hash(),
        "pllcli_version": __version__,
    }
    for k, v in config.to_dict().items():
        attrs[k] = v
    for k, v in (extra or {}).items():
        attrs[k] = v if isinstance(v, (str, int, float, np.integer, np.floating)) else json.dumps(v)
    return attrs


def _create_new_h5(h5py, folder: Path, prefix: str):
    """(path, h5py.File) of a new, uniquely named, 0600 file created with O_EXCL.

    Not mkstemp + h5py "w": that reopens the existing empty file with O_TRUNC, and ext4
    (auto_da_alloc) then writes back all of the file's data when it is closed, which made
    closing a large store slow in featurize's serial tail.
    """
    import secrets
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(4)}.tmp"
        umask = os.umask(0o077)
        try:
            # no raw-data chunk cache: the writer fills whole chunks, and flushing a cache at close
            # cost ~4 ms in featurize's serial tail
            return path, h5py.File(path, "x", rdcc_nbytes=0)
        except FileExistsError:
            continue
        finally:
            os.umask(umask)
    raise FileExistsError(f"could not create a temporary file in {folder}")


class FeatureStoreWriter:
    """Append items to a new store; the file appears at `path` only on `close()` (tmp + rename;
    the tmp lives in `tmp_dir`, default beside `path`, which must be on the same filesystem).

    Items are buffered and written in blocks. Use as a context manager: an exception
    discards the temporary file. `add(id, features (T, F), duration, path, meta)`.
    """

    def __init__(self, path: str | os.PathLike, config: FeatureConfig,
                 meta_columns: Sequence[str] = (), attrs: dict[str, Any] | None = None,
                 flush_frames: int = 1 << 16, tmp_dir: str | os.PathLike | None = None):
        h5py = _h5py()
        self.path = Path(path)
        self.config = config
        self.meta_columns = list(meta_columns)
        self.dtype = np.dtype(config.dtype)
        self.F = config.n_mels
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp, self.f = _create_new_h5(h5py, Path(tmp_dir or self.path.parent), f".{self.path.name}.")
        for k, v in store_attrs(config, attrs).items():
            self.f.attrs[k] = v
        s = h5py.string_dtype("utf-8")
        mk = lambda name, dt: self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))  # noqa: E731
        mk("ids", s), mk("num_frames", np.int32), mk("duration", np.float32), mk("path", s)
        self.f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,))
        self.f.create_dataset("features", shape=(0, self.F), maxshape=(None, self.F), dtype=self.dtype,
                              chunks=(FEATURE_CHUNK_ROWS, self.F))
        for col in self.meta_columns:
            mk(f"meta/{col}", s)
        names = ["ids", "num_frames", "duration", "path", "offsets"] + [f"meta/{c}" for c in self.meta_columns]
        self._ds = {name: self.f[name] for name in names + ["features"]}
        self._cols: dict[str, list[np.ndarray]] = {name: [] for name in names}
        self._cols_items = 0
        self.n = 0
        self.rows = 0
        self._flush_frames = flush_frames
        self._buf: dict[str, list] = {k: [] for k in ("ids", "feats", "dur", "path")}
        self._meta_buf: dict[str, list] = {c: [] for c in self.meta_columns}
        self._buf_frames = 0
        self.closed = False

    def add(self, item_id: str, features: np.ndarray, duration: float, path: str = "",
            meta: dict[str, str] | None = None) -> None:
        feats = np.asarray(features)
        if feats.ndim != 2 or feats.shape[1] != self.F:
            raise ValueError(f"{item_id}: features must be (T, {self.F}), got {feats.shape}")
        self._buf["ids"].append(str(item_id))
        self._buf["feats"].append(feats)
        self._buf["dur"].append(float(duration))
        self._buf["path"].append(str(path))
        meta = meta or {}
        for c in self.meta_columns:
            self._meta_buf[c].append(str(meta.get(c, "")))
        self._buf_frames += feats.shape[0]
        if self._buf_frames >= self._flush_frames:
            self.flush()

    def add_block(self, ids: Sequence[str], features: np.ndarray, num_frames: np.ndarray,
                  durations: np.ndarray, paths: Sequence[str], meta: dict[str, Sequence[str]] | None = None):
        """Append many items at once: `features` (sum num_frames, F) already concatenated."""
        self.add_blocks([(ids, features, num_frames, durations, paths, meta)])

    def add_blocks(self, blocks: Sequence[tuple]) -> None:
        """Append consecutive add_block argument tuples. Each block's features are written at
        once, in place (no concatenated copy); the per-item columns (ids, offsets, ...) are
        gathered and written COLUMN_ITEMS at a time (or at close): a small block then costs
        one HDF5 write instead of one per column."""
        self.flush()
        d = self._ds["features"]
        for ids, feats, nf, durs, paths, meta in blocks:
            k = len(ids)
            if not k:
                continue
            nf = np.asarray(nf, dtype=np.int64)
            rows = int(nf.sum())
            if feats.shape != (rows, self.F):
                raise ValueError(f"features block must be ({rows}, {self.F}), got {feats.shape}")
            if not k == len(nf) == len(durs) == len(paths):
                raise ValueError("ids, num_frames, durations and paths of a block must have one length")
            if rows:
                d.resize((self.rows + rows, self.F))
                d[self.rows:] = feats.astype(self.dtype, copy=False)
            cols = self._cols
            cols["ids"].append(np.asarray(ids, dtype=object))
            cols["num_frames"].append(nf.astype(np.int32))
            cols["duration"].append(np.asarray(durs, dtype=np.float32))
            cols["path"].append(np.asarray(paths, dtype=object))
            cols["offsets"].append(self.rows + np.cumsum(nf))
            for c in self.meta_columns:
                cols[f"meta/{c}"].append(np.asarray([str(v) for v in (meta or {}).get(c, [""] * k)], dtype=object))
            self.n += k
            self.rows += rows
            self._cols_items += k
        if self._cols_items >= COLUMN_ITEMS:
            self.flush_columns()

    def flush_columns(self) -> None:
        """Write the per-item columns gathered so far (featurize calls it while it waits)."""
        k = self._cols_items
        if not k:
            return
        n0 = self.n - k
        for name, parts in self._cols.items():
            d = self._ds[name]
            if name == "offsets":  # (N + 1,): offsets[i + 1] = end of item i
                d.resize((self.n + 1,))
                d[n0 + 1:] = np.concatenate(parts)
            else:
                d.resize((self.n,))
                d[n0:] = np.concatenate(parts)
            parts.clear()
        self._cols_items = 0

    def flush(self) -> None:
        b = self._buf
        if not b["ids"]:
            return
        nf = np.asarray([x.shape[0] for x in b["feats"]], dtype=np.int64)
        feats = np.concatenate(b["feats"], axis=0) if b["feats"] else np.zeros((0, self.F))
        ids, dur, paths = b["ids"], b["dur"], b["path"]
        meta = {c: v for c, v in self._meta_buf.items()}
        self._buf = {k: [] for k in b}
        self._meta_buf = {c: [] for c in self.meta_columns}
        self._buf_frames = 0
        self.add_block(ids, feats, nf, dur, paths, meta)

    def set_attr(self, key: str, value: Any) -> None:
        self.f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)

    def close(self) -> Path:
        """Flush, close and rename into place; returns the final path."""
        if self.closed:
            return self.path
        self.flush()
        self.flush_columns()
        self.f.attrs["num_items"] = self.n
        self.f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # the tmp is made 0600; give the usual permissions
        os.replace(self.tmp, self.path)
        self.closed = True
        return self.path

    def abort(self) -> None:
        if self.closed:
            return
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - e.g. a full disk fails the flush: close the ids without it,
            for ds in self._ds.values():  # or h5py reports "Exception ignored" when they are collected
                with contextlib.suppress(Exception):
                    ds.id.close()
            with contextlib.suppress(Exception):
                self.f.id.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_feature_store(path: str | os.PathLike, config: FeatureConfig, items: Iterable[dict[str, Any]],
                        meta_columns: Sequence[str] = (), attrs: dict[str, Any] | None = None) -> Path:
    """Write a store from dicts {id, features (T, F), duration, path?, meta?} (atomic)."""
    with FeatureStoreWriter(path, config, meta_columns, attrs) as w:
        for it in items:
            w.add(it["id"], it["features"], it.get("duration", 0.0), it.get("path", ""), it.get("meta"))
    return Path(path)


def _part_order(parts: Sequence[str], shards: list[str | None]) -> list[int]:
    """Order parts by their `shard` attr "i/n" when every part has one, else keep the given order."""
    if not parts or any(s is None for s in shards):
        return list(range(len(parts)))
    parsed = [tuple(int(x) for x in s.split("/")) for s in shards]
    ns = {n for _, n in parsed}
    if len(ns) != 1:
        raise InputError(f"parts come from different shard counts ({', '.join(sorted(set(shards)))})", parts[0])
    n = ns.pop()
    seen: dict[int, str] = {}
    for p, (i, _) in zip(parts, parsed):
        if i in seen:
            raise InputError(f"shard {i}/{n} given twice (also {seen[i]})", p)
        seen[i] = p
    missing = [f"{i}/{n}" for i in range(n) if i not in seen]
    if missing:
        raise InputError(f"missing shard(s) {', '.join(missing)}; pass every shard to merge", parts[0])
    return sorted(range(len(parts)), key=lambda k: parsed[k][0])


def merge_feature_stores(out: str | os.PathLike, parts: Sequence[str | os.PathLike],
                         attrs: dict[str, Any] | None = None, order_by_shard: bool = True,
                         block_frames: int = 1 << 18) -> Path:
    """Concatenate feature stores into `out` (atomic). All parts must share the feature config
    and storage dtype; ids must be unique across parts. The output has the union of the parts'
    metadata columns (empty strings where a part lacks one). Parts written with `--shard i/n`
    are put in shard order, giving the same store as a single run."""
    parts = [str(p) for p in parts]
    if not parts:
        raise InputError("nothing to merge: no input stores given")
    stores = [FeatureStore(p) for p in parts]
    first = stores[0]
    for p, s in zip(parts[1:], stores[1:]):
        if s.config_hash != first.config_hash:
            check_compatible(first.config, s.config, f"{p} vs {parts[0]}")
            raise ConfigMismatchError(f"{p}: feature config hash differs from {parts[0]}")
        if s.dtype != first.dtype:
            raise ConfigMismatchError(f"{p}: features stored as {s.dtype}, {parts[0]} as {first.dtype}")
    order = _part_order(parts, [s.attrs.get("shard") for s in stores]) if order_by_shard \
        else list(range(len(parts)))
    all_ids = np.concatenate([s.ids for s in stores]) if stores else np.zeros(0, str)
    uniq, counts = np.unique(all_ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        d0 = str(dup[0])
        where = [parts[k] for k, s in enumerate(stores) if d0 in s][:2]
        raise InputError(f"{int((counts > 1).sum())} id(s) occur in more than one part, e.g. {d0!r} "
                         f"in {' and '.join(where)}", where[0])
    cfg = first.config.replace(dtype=first.dtype if first.dtype in ("float32", "float16") else None)
    meta_columns = list(dict.fromkeys(c for s in stores for c in s.meta_columns))
    with FeatureStoreWriter(out, cfg, meta_columns, attrs) as w:
        for k in order:
            s = stores[k]
            f = s._file()
            metas = {c: s.meta(c) for c in s.meta_columns}
            i = 0
            while i < len(s):
                # a block of whole items holding about `block_frames` frames
                j = int(np.searchsorted(s.offsets, s.offsets[i] + block_frames, side="right")) - 1
                j = min(max(j, i + 1), len(s))
                a, b = s.offsets[i], s.offsets[j]
                w.add_block(s.ids[i:j], f["features"][a:b], s.num_frames[i:j], s.durations[i:j],
                            s.paths[i:j], {c: v[i:j] for c, v in metas.items()})
                i = j
            s.close()
    return Path(out)
