"""Record stores: one interface over sharded LMDB, zarr and HDF5 stores and npy / image folders.

A *record* is one sample: a key, an array ``x``, an integer label ``y`` and optional metadata.
A *store* is a location (a local path or an fsspec URL: ``memory://``, ``s3://``, ``file://``)
holding records in named shards, read one shard at a time, where the shard lives:

- a **sharded store** that rapydli writes (:data:`FORMATS`): one LMDB environment, zarr group or
  HDF5 file per shard, listed by the manifest :data:`MANIFEST`, which is written last and
  atomically, so a reader sees whole shards or none;
- a **folder** rapydli reads (:data:`SOURCES`): sub-folders of ``.npy`` files or PNG / JPEG images,
  one sub-folder per class; shards are runs of :data:`FILES_PER_SHARD` files in sorted order.

Every reader checks every record (:func:`rapydli.storage.quality.check_record`); unusable records
are listed in :attr:`ShardData.skipped`, never returned.

>>> spec = RecordSpec((2,), "float32", classes=("no", "yes"))
>>> recs = [Record(f"r{i}", np.full(2, i, np.float32), i % 2) for i in range(3)]
>>> store = write_store("memory://doc/records", "zarr", spec, {"shard-00000": recs}, overwrite=True)
>>> data = load_shard("memory://doc/records", "shard-00000")
>>> data.keys, data.y.tolist(), data.x[2].tolist()
(('r0', 'r1', 'r2'), [0, 1, 0], [2.0, 2.0])
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from rapydli.errors import DataError
from rapydli.storage.backends import (LMDB_MAX_KEY, MANIFEST, READERS, SUFFIX, WRITERS, Block,
                                      Location, folder_blocks, infer_spec, io_errors, local_root,
                                      locate, scan_folder)
from rapydli.storage.quality import check_batch, check_record

FORMATS = ("lmdb", "zarr", "hdf5")
SOURCES = ("npy", "images")
__all__ = ["FILES_PER_SHARD", "FORMATS", "MANIFEST", "READS", "SOURCES", "Record", "RecordSpec",
           "ShardData", "Store", "Unreadable", "append_records", "load_shard", "open_store",
           "store_exists", "write_store"]
#: files per shard of a folder source
FILES_PER_SHARD = 1000
#: bytes per zarr / HDF5 chunk of ``x`` aimed at when ``chunk_records`` is not given
CHUNK_BYTES = 1 << 20
#: how many times this process read each ``(url, shard)`` through :func:`load_shard`
READS: collections.Counter = collections.Counter()
_READS_LOCK = threading.Lock()  # in-process workers are threads

_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True, eq=False)
class Record:
    """One sample: ``key`` (unique in its store), array ``x``, label ``y``, optional ``meta``."""

    key: str
    x: np.ndarray
    y: int
    meta: dict | None = None

    def __repr__(self) -> str:
        x = np.asarray(self.x)
        return f"Record({self.key!r}, x=<{x.dtype} {x.shape}>, y={self.y!r}, meta={self.meta!r})"


@dataclass(frozen=True)
class Unreadable:
    """A record whose bytes could not be decoded; ``reason`` starts with ``"cannot decode:"``."""

    key: str
    reason: str


@dataclass(frozen=True)
class RecordSpec:
    """What every record of a store holds: ``x`` of ``shape`` and ``dtype``, labels naming
    ``classes[y]`` when the class names are known.

    >>> RecordSpec([1, 8, 8], np.float32, classes=["0", "1"])
    RecordSpec(shape=(1, 8, 8), dtype='float32', classes=('0', '1'))
    """

    shape: tuple[int, ...]
    dtype: str
    classes: tuple[str, ...] | None = None

    def __post_init__(self):
        try:
            shape = tuple(int(s) for s in self.shape)
            dtype = np.dtype(self.dtype)
        except (TypeError, ValueError) as exc:
            raise DataError(f"RecordSpec: expected a shape of ints and a NumPy dtype; received "
                            f"shape={self.shape!r}, dtype={self.dtype!r} ({exc})") from None
        if any(s < 1 for s in shape) or dtype.kind not in "biufc":
            raise DataError(f"RecordSpec: expected positive sizes and a numeric dtype; received "
                            f"shape={shape}, dtype={dtype}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype.name)
        if self.classes is not None:
            classes = tuple(str(c) for c in self.classes)
            if not classes or len(set(classes)) != len(classes):
                raise DataError(f"RecordSpec: expected distinct class names; received {classes}")
            object.__setattr__(self, "classes", classes)

    @property
    def n_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype,
                "classes": None if self.classes is None else list(self.classes)}


@dataclass(frozen=True, eq=False)
class ShardData:
    """The usable records of one shard, and what was skipped.

    ``x`` is ``(n, *spec.shape)`` of ``spec.dtype``, C-contiguous; ``y`` is ``int64`` ``(n,)``;
    ``skipped`` holds ``(key, reason)`` of every record not returned; ``n_read`` counts records
    attempted, ``n + len(skipped)``.
    """

    x: np.ndarray
    y: np.ndarray
    keys: tuple[str, ...]
    meta: tuple[dict | None, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    n_read: int | None = None

    def __post_init__(self):
        n_read = len(self.keys) + len(self.skipped)
        if self.n_read is None:
            object.__setattr__(self, "n_read", n_read)
        if not len(self.x) == len(self.y) == len(self.keys) == len(self.meta) \
                or self.n_read != n_read:
            raise DataError(f"ShardData: expected x, y, keys, meta of one length and n_read = "
                            f"returned + skipped; received {len(self.x)}, {len(self.y)}, "
                            f"{len(self.keys)}, {len(self.meta)} and n_read={self.n_read}")

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (f"ShardData({len(self)} records, x {self.x.shape} {self.x.dtype}, "
                f"{len(self.skipped)} skipped)")


def _read_manifest(loc: Location) -> dict | None:
    loc.fs.invalidate_cache()  # object-store listings are cached; a re-open must see new files
    with io_errors(loc.url, f"read {MANIFEST}"):
        try:
            raw = loc.fs.cat_file(loc.path(MANIFEST))
        except (FileNotFoundError, NotADirectoryError):
            return None
    try:
        manifest = json.loads(raw)
        manifest["spec"] = RecordSpec(**manifest["spec"])
        assert manifest["format"] in FORMATS, f"format {manifest['format']!r}"
        manifest["shards"] = [{"name": str(s["name"]), "count": int(s["count"]),
                               "nbytes": s.get("nbytes")} for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError, AssertionError, DataError) as exc:
        raise DataError(f"{loc.url}/{MANIFEST} is malformed ({type(exc).__name__}: {exc}); "
                        f"expected a manifest written by rapydli; re-import the store "
                        "(`rapydli data import`)") from None
    return manifest


def _write_manifest(loc: Location, fmt: str, spec: RecordSpec, entries: list[dict]) -> None:
    """Write the manifest in one atomic step: replace a synced temp file, or one object PUT."""
    data = json.dumps({"rapydli_store": 1, "format": fmt, "spec": spec.to_dict(),
                       "shards": entries}, indent=1).encode()
    with io_errors(loc.url, f"write {MANIFEST}"):
        if not loc.local:
            loc.fs.pipe_file(loc.path(MANIFEST), data)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=loc.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path(MANIFEST))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _fsync_dir(loc.root)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can sync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Store:
    """An opened store: its format, record spec, and shards in a stable order.

    Made by :func:`open_store`; cheap to make and to pickle. A store opened once keeps the shard
    list it saw; re-open it to see shards appended (or files added) since.

    Attributes
    ----------
    url : str
    format : str
        One of :data:`FORMATS` or :data:`SOURCES`.
    spec : RecordSpec
    shards : tuple of str
    counts : tuple of int
        Records per shard, unusable ones included.
    nbytes : tuple of int or None
        Bytes each shard takes on the store, where known.
    """

    def __init__(self, loc: Location, fmt: str, spec: RecordSpec, entries: list[dict],
                 files: dict[str, tuple[tuple[str, int], ...]] | None = None):
        self._loc = loc
        self.url = loc.url
        self.format = fmt
        self.spec = spec
        self.shards = tuple(e["name"] for e in entries)
        self.counts = tuple(e["count"] for e in entries)
        self.nbytes = tuple(e.get("nbytes") for e in entries)
        self._files = files  # folder sources: shard -> ((relative path, label), ...)

    def __len__(self) -> int:
        return sum(self.counts)

    def __repr__(self) -> str:
        return (f"Store({self.url!r}, format={self.format!r}, {len(self)} records in "
                f"{len(self.shards)} shards, x {self.spec.shape} {self.spec.dtype})")

    def read_shard(self, name: str) -> ShardData:
        """The usable records of shard ``name``; unusable ones are listed in ``skipped``."""
        return _collect(self._blocks(name), self.spec)

    def iter_records(self, name: str) -> Iterator[Record | Unreadable]:
        """Every record of shard ``name`` in order, unchecked: a :class:`Record` for each record
        that decodes (run :func:`~rapydli.storage.quality.check_record` on it), an
        :class:`Unreadable` for each that does not."""
        for block in self._blocks(name):
            for i, key in enumerate(block.keys):
                if i in block.errors:
                    yield Unreadable(key, block.errors[i])
                else:
                    yield Record(key, np.array(block.x[i]), int(block.y[i]), block.meta[i])

    def _blocks(self, name: str) -> Iterator[Block]:
        if name not in self.shards:
            shown = ", ".join(self.shards[:5]) + (", ..." if len(self.shards) > 5 else "")
            raise DataError(f"{self.url}: no shard {name!r}; expected one of {len(self.shards)} "
                            f"shards ({shown}). Re-open the store if it grew since")
        if self._files is not None:
            return folder_blocks(self._loc, self.format, self._files[name])
        placeholders = [f"{name}[{i}]" for i in range(self.counts[self.shards.index(name)])]
        return READERS[self.format](self._loc, name, placeholders)


def _collect(blocks: Iterable[Block], spec: RecordSpec) -> ShardData:
    xs, ys, keys, metas, skipped = [], [], [], [], []
    for b in blocks:
        if not isinstance(b.x, np.ndarray) and not b.errors and b.x and all(
                x.shape == spec.shape and x.dtype == spec.dtype for x in b.x):
            b.x, b.y = np.stack(b.x), np.asarray(b.y)  # (k, *shape): one vectorised check
        if isinstance(b.x, np.ndarray):
            reasons = check_batch(b.x, np.asarray(b.y), spec)
        else:
            reasons = [None if i in b.errors else check_record(b.x[i], b.y[i], spec)
                       for i in range(len(b.keys))]
        for i, error in b.errors.items():
            reasons[i] = error
        good = [i for i, r in enumerate(reasons) if r is None]
        skipped.extend((b.keys[i], r) for i, r in enumerate(reasons) if r is not None)
        if good and isinstance(b.x, np.ndarray):
            xs.append(b.x if len(good) == len(b.keys) else b.x[good])
        elif good:
            xs.append(np.stack([b.x[i] for i in good]))  # (k, *shape)
        ys.extend(int(b.y[i]) for i in good)
        keys.extend(str(b.keys[i]) for i in good)
        metas.extend(b.meta[i] for i in good)
    x = np.concatenate(xs) if xs else np.empty((0, *spec.shape), spec.dtype)
    return ShardData(np.ascontiguousarray(x), np.asarray(ys, dtype=np.int64), tuple(keys),
                     tuple(metas), tuple(skipped))


def open_store(url, storage_options: Mapping | None = None, *,
               spec: RecordSpec | None = None) -> Store:
    """Open the store or folder at ``url``.

    Parameters
    ----------
    url : str or path
        A local path or an fsspec URL (``memory://``, ``s3://bucket/prefix``, ``file://``).
    storage_options : dict, optional
        Passed to the fsspec file system, e.g. s3fs ``key``, ``secret``, ``client_kwargs``.
    spec : RecordSpec, optional
        Folder sources only: the shape and dtype expected, instead of those of the first file
        that decodes; class names default to the sub-folder names.

    Raises
    ------
    DataError
        The location does not exist or cannot be reached, or holds neither a manifest nor
        sub-folders of ``.npy`` or image files.

    Examples
    --------
    >>> open_store("memory://doc/nothing-here")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rapydli.errors.DataError: memory://doc/nothing-here: does not exist; expected a rapydli store ...
    """
    loc = locate(url, storage_options)
    manifest = _read_manifest(loc)
    if manifest is not None:
        return Store(loc, manifest["format"], manifest["spec"], manifest["shards"])
    return _open_folder(loc, spec)


def load_shard(url, shard: str, storage_options: Mapping | None = None) -> ShardData:
    """Open the store at ``url`` and read one shard; what a Dask task runs on a worker.

    Counts the read in :data:`READS` under ``(url, shard)``.

    >>> before = READS[("memory://doc/records", "shard-00000")]
    >>> len(load_shard("memory://doc/records", "shard-00000"))
    3
    >>> READS[("memory://doc/records", "shard-00000")] - before
    1
    """
    data = open_store(url, storage_options).read_shard(shard)
    with _READS_LOCK:
        READS[(url, shard)] += 1
    return data


def store_exists(url, storage_options: Mapping | None = None) -> bool:
    """Whether ``url`` holds a sharded store (a manifest)."""
    return _read_manifest(locate(url, storage_options)) is not None


# -- writing ---------------------------------------------------------------------------------


def write_store(url, format: str, spec: RecordSpec, shards: Mapping[str, Iterable[Record]],
                storage_options: Mapping | None = None, overwrite: bool = False, *,
                chunk_records: int | None = None) -> Store:
    """Write a sharded store: each shard in turn, then the manifest, last and atomically.

    Records must have ``spec.shape`` and a dtype that casts to ``spec.dtype`` within its kind
    (``float64`` -> ``float32``); keys must be unique. Values (NaN, labels) are written as they
    are; readers skip the unusable ones.

    Parameters
    ----------
    format : {"lmdb", "zarr", "hdf5"}
        LMDB needs a local path.
    shards : mapping of shard name to records
    overwrite : bool
        Replace a store already at ``url``; without it, an existing store is an error.
    chunk_records : int, optional
        Records per zarr / HDF5 chunk (the unit that a corrupted byte makes unreadable); by
        default about :data:`CHUNK_BYTES` of ``x``.
    """
    fmt = _check_format(format, FORMATS, "write_store")
    if not isinstance(spec, RecordSpec):
        raise DataError(f"write_store: expected spec to be a RecordSpec; received {type(spec)}")
    loc = locate(url, storage_options)
    _prepare_destination(loc, fmt, overwrite)
    seen: set[str] = set()
    entries = [_write_shard(loc, fmt, spec, _check_shard_name(name), records, seen, chunk_records)
               for name, records in shards.items()]
    _write_manifest(loc, fmt, spec, entries)
    return Store(loc, fmt, spec, entries)


def append_records(url, records: Iterable[Record], storage_options: Mapping | None = None, *,
                   chunk_records: int | None = None) -> str:
    """Add ``records`` as a new shard of the store at ``url`` and return the shard's name.

    The shard is written completely before the manifest is rewritten (atomically), so readers
    see the new shard only once it is whole: a store opened before keeps its shard list, one
    opened after sees the new shard. One writer at a time; keys are checked for uniqueness
    within the new shard only.
    """
    loc = locate(url, storage_options)
    manifest = _read_manifest(loc)
    if manifest is None:
        open_store(url, storage_options)  # raises for a missing or unknown location
        raise DataError(f"{url}: append_records needs a sharded store ({', '.join(FORMATS)}); "
                        "received a folder source; add files to the folder instead, or import it "
                        "with `rapydli data import`")
    iterator = iter(records)
    first = next(iterator, None)
    if first is None:
        raise DataError(f"{url}: append_records received no records; expected at least one")
    names = {s["name"] for s in manifest["shards"]}
    numbers = [int(n[6:]) for n in names if re.fullmatch(r"shard-\d+", n)]
    name = f"shard-{max(numbers, default=len(names) - 1) + 1:05d}"
    entry = _write_shard(loc, manifest["format"], manifest["spec"], name,
                         itertools.chain([first], iterator), set(), chunk_records)
    _write_manifest(loc, manifest["format"], manifest["spec"], [*manifest["shards"], entry])
    return name


def _check_format(fmt: str, legal: tuple[str, ...], where: str) -> str:
    if fmt not in legal:
        raise DataError(f"{where}: unknown format {fmt!r}; expected one of "
                        f"{', '.join(map(repr, legal))}")
    return fmt


def _check_shard_name(name: str) -> str:
    if not isinstance(name, str) or not _SHARD_NAME.match(name):
        raise DataError(f"shard name {name!r}: expected letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit, e.g. 'shard-00000'")
    return name


def _ours(entry: str) -> bool:
    name = entry.rstrip("/").rsplit("/", 1)[-1]
    return name == MANIFEST or name.startswith(f".{MANIFEST}.") or \
        name.endswith(tuple(SUFFIX.values()))


def _prepare_destination(loc: Location, fmt: str, overwrite: bool) -> None:
    """Refuse an existing store unless ``overwrite``; clear it (manifest first) or leftovers."""
    if fmt == "lmdb":
        local_root(loc, "lmdb")
    manifest = _read_manifest(loc)
    if manifest is not None and not overwrite:
        raise DataError(f"{loc.url}: a rapydli store is already there ({manifest['format']}, "
                        f"{len(manifest['shards'])} shards); pass overwrite=True (CLI: "
                        "--overwrite) to replace it, or choose another location")
    with io_errors(loc.url, "list the destination"):
        try:
            entries = loc.fs.ls(loc.root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
    stray = [e for e in entries if not _ours(e)]
    if stray:
        raise DataError(f"{loc.url}: holds {len(stray)} entries that are not part of a rapydli "
                        f"store (e.g. {stray[0]!r}); expected an empty or missing location, or a "
                        "store; choose another destination")
    with io_errors(loc.url, "clear the destination"):
        if manifest is not None:
            loc.fs.rm_file(loc.path(MANIFEST))  # readers stop seeing the old store first
        for entry in entries:
            if loc.fs.exists(entry):
                loc.fs.rm(entry, recursive=True)
        if loc.local:
            os.makedirs(loc.root, exist_ok=True)


def _write_shard(loc: Location, fmt: str, spec: RecordSpec, name: str,
                 records: Iterable[Record], seen: set[str], chunk_records: int | None) -> dict:
    path = loc.path(name + SUFFIX[fmt])
    checked = (_prepare(r, spec, seen, f"{loc.url} {name}", fmt) for r in records)
    chunk = chunk_records or max(1, min(4096, CHUNK_BYTES // max(1, _record_nbytes(spec))))
    with io_errors(loc.url, f"write shard {name}"):
        if loc.fs.exists(path):  # a leftover of a write that never reached the manifest
            loc.fs.rm(path, recursive=True)
        count = WRITERS[fmt](loc, path, spec, checked, chunk)
    nbytes = None
    with contextlib.suppress(Exception):  # a size is nice to show, not worth failing over
        nbytes = int(loc.fs.du(path, total=True))
    return {"name": name, "count": count, "nbytes": nbytes}


def _record_nbytes(spec: RecordSpec) -> int:
    return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize


def _prepare(rec: Record, spec: RecordSpec, seen: set[str], where: str, fmt: str) -> Record:
    if not isinstance(rec, Record):
        raise DataError(f"{where}: expected Record objects; received {type(rec).__name__}")
    key, x = rec.key, np.asarray(rec.x)
    if not isinstance(key, str) or not key or key in seen:
        raise DataError(f"{where}: record key {key!r} is empty, not a str, or used twice; "
                        "expected unique non-empty string keys")
    if fmt == "lmdb" and len(key.encode()) > LMDB_MAX_KEY - 11:
        raise DataError(f"{where}: key {key[:40]!r}... is {len(key.encode())} bytes; LMDB keys "
                        f"hold at most {LMDB_MAX_KEY - 11}; shorten it or use zarr or hdf5")
    if x.shape != spec.shape or not np.can_cast(x.dtype, spec.dtype, "same_kind"):
        raise DataError(f"{where}: record {key!r} has x of shape {x.shape} and dtype {x.dtype}; "
                        f"expected shape {spec.shape} and dtype {spec.dtype} (or one that casts "
                        "to it); fix the record or write it with a matching RecordSpec")
    if isinstance(rec.y, bool) or not isinstance(rec.y, (int, np.integer)):
        raise DataError(f"{where}: record {key!r} has label {rec.y!r}; expected an int")
    try:
        json.dumps(rec.meta)
        assert rec.meta is None or isinstance(rec.meta, dict)
    except (TypeError, ValueError, AssertionError):
        raise DataError(f"{where}: record {key!r} has meta {rec.meta!r}; expected None or a "
                        "JSON-able dict") from None
    seen.add(key)
    return Record(key, np.ascontiguousarray(x, dtype=spec.dtype), int(rec.y), rec.meta)


def _open_folder(loc: Location, spec: RecordSpec | None) -> Store:
    fmt, classes, files = scan_folder(loc)
    entries, shard_files = [], {}
    for i in range(0, len(files), FILES_PER_SHARD):
        name = f"files-{i // FILES_PER_SHARD:05d}"
        chunk = files[i:i + FILES_PER_SHARD]
        shard_files[name] = tuple((rel, label) for rel, label, _ in chunk)
        entries.append({"name": name, "count": len(chunk), "nbytes": sum(s for *_, s in chunk)})
    if spec is None:
        spec = RecordSpec(*infer_spec(loc, fmt, files), classes)
    elif spec.classes is None:
        spec = RecordSpec(spec.shape, spec.dtype, classes)
    return Store(loc, fmt, spec, entries, shard_files)
