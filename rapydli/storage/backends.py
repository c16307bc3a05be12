"""The back ends behind :mod:`rapydli.storage.records`; internal, use that module's API.

Each sharded format has a writer ``(loc, path, spec, records, chunk) -> count`` and a reader
``(loc, name, placeholders) -> blocks`` (:data:`WRITERS`, :data:`READERS`); folder sources have
:func:`scan_folder` and :func:`folder_blocks`. Readers yield :class:`Block` s of raw records and
mark the ones whose bytes do not decode; ``records`` checks the rest and assembles ``ShardData``.
``placeholders`` are the keys used for the records of a shard that cannot be opened at all
(``"shard-00000[17]"``): the manifest knows how many records it held, not their keys.
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rapydli.errors import DataError, RapydliError
from rapydli.storage.quality import CANNOT_DECODE

if TYPE_CHECKING:
    from rapydli.storage.records import Record, RecordSpec

MANIFEST = "rapydli-store.json"
#: file or folder suffix of one shard of each sharded format
SUFFIX = {"lmdb": ".lmdb", "zarr": ".zarr", "hdf5": ".h5"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAGIC = b"RPD1"  # LMDB value: magic, u32 header length, JSON header, raw array bytes
LMDB_MAX_KEY = 511
FILES_PER_READ = 64  # folder files fetched together (concurrently on object stores)
BLOCK_RECORDS = 256  # records per block (and per LMDB write transaction)


@dataclass(frozen=True)
class Location:
    url: str
    fs: object  # an fsspec file system
    root: str
    options: dict

    @property
    def local(self) -> bool:
        protocol = self.fs.protocol
        return bool({"file", "local"} & set((protocol,) if isinstance(protocol, str) else protocol))

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, path: str) -> str:
        """A URL for ``path`` that zarr and fsspec open with ``self.options``."""
        if self.local:
            return path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{path.lstrip('/') if protocol != 'memory' else path}"


def locate(url, storage_options: Mapping | None) -> Location:
    import fsspec

    if not isinstance(url, (str, os.PathLike)) or not os.fspath(url):
        raise DataError(f"expected a store location (a path or a URL such as s3://bucket/prefix); "
                        f"received {url!r}")
    url = os.fspath(url)
    options = dict(storage_options or {})
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise DataError(f"{url}: the file system for this URL is not installed ({exc}); install it, "
                        "e.g. `pip install s3fs` for s3://") from None
    except Exception as exc:
        raise DataError(f"{url}: not a location rapydli can open ({type(exc).__name__}: {exc}); "
                        "expected a local path or an fsspec URL such as memory://name, "
                        "s3://bucket/prefix or file:///path") from None
    return Location(url, fs, root.rstrip("/") or root, options)


@contextlib.contextmanager
def io_errors(url: str, action: str):
    """Turn a file-system failure into a DataError that names the URL."""
    try:
        yield
    except RapydliError:
        raise
    except Exception as exc:
        raise DataError(f"{url}: cannot {action} ({type(exc).__name__}: {exc}); check that the "
                        "location exists and is reachable, and the storage_options (credentials, "
                        "endpoint_url)") from exc


@dataclass
class Block:
    """Records read together: ``x`` stacked ``(k, *shape)``, or one array per record."""

    keys: list[str] = field(default_factory=list)
    x: np.ndarray | list = field(default_factory=list)
    y: np.ndarray | list = field(default_factory=list)
    meta: list = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # position -> "cannot decode: ..."

    def add(self, key: str, x=None, y: int = -1, meta=None, error: str | None = None) -> None:
        if error is not None:
            self.errors[len(self.keys)] = error
        self.keys.append(key)
        self.x.append(x)
        self.y.append(y)
        self.meta.append(meta)

    @classmethod
    def failed(cls, keys: Iterable[str], reason: str) -> Block:
        block = cls()
        for key in keys:
            block.add(key, error=f"{CANNOT_DECODE} {reason}")
        return block


def batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def gather(records: Iterable[Record], spec: RecordSpec
           ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Keys, stacked ``x`` ``(n, *shape)``, labels and JSON meta of ``records``."""
    records = list(records)
    x = np.stack([r.x for r in records]) if records else np.empty((0, *spec.shape), spec.dtype)
    return ([r.key for r in records], x, np.array([r.y for r in records], dtype=np.int64),
            [json.dumps(r.meta) for r in records])


def float_fill(spec: RecordSpec) -> float:
    # a missing chunk then reads as NaN, which the checks skip, rather than as silent zeros
    return np.nan if np.dtype(spec.dtype).kind in "fc" else 0


# -- LMDB: one environment per shard, one value per record -----------------------------------


def local_root(loc: Location, fmt: str) -> str:
    if not loc.local:
        raise DataError(f"{loc.url}: {fmt} stores need a local path; received a "
                        f"{loc.fs.protocol} URL. Use format 'zarr' or 'hdf5' for object stores "
                        "(s3://, memory://), or a local directory for lmdb")
    return loc.root


def encode(rec: Record) -> bytes:
    """An LMDB value: magic, header length, JSON header (shape, dtype, label, meta), raw bytes."""
    x = np.ascontiguousarray(rec.x)
    header = json.dumps({"shape": list(x.shape), "dtype": x.dtype.str, "y": int(rec.y),
                         "meta": rec.meta}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + x.tobytes()


def decode(value: bytes) -> tuple[np.ndarray, int, dict | None]:
    if value[:4] != MAGIC or len(value) < 8:
        raise ValueError("no rapydli record header")
    (n,) = struct.unpack_from("<I", value, 4)
    dtype, shape, y, meta = _header(bytes(value[8:8 + n]))
    payload = memoryview(value)[8 + n:]
    if len(payload) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"header (dtype {dtype}, shape {shape}) does not match "
                         f"{len(payload)} payload bytes")
    meta = None if meta is None else json.loads(meta)  # a fresh dict for every record
    return np.frombuffer(payload, dtype).reshape(shape), y, meta  # read-only; stacking copies


@functools.lru_cache(maxsize=4096)
def _header(raw: bytes) -> tuple[np.dtype, tuple[int, ...], int, str | None]:
    """``(dtype, shape, label, meta as JSON)`` of a record header; records of one store share
    a few headers (one per label when they carry no metadata), so each is parsed once."""
    header = json.loads(raw)
    dtype, shape = np.dtype(header["dtype"]), tuple(int(s) for s in header["shape"])
    y, meta = header["y"], header["meta"]
    if dtype.hasobject or not isinstance(meta, (dict, type(None))) or isinstance(y, bool) \
            or not isinstance(y, int):
        raise ValueError(f"header {header} is not a record header")
    return dtype, shape, y, (None if meta is None else json.dumps(meta))


def lmdb_write(loc: Location, path: str, spec: RecordSpec, records, chunk: int) -> int:
    import lmdb

    env = lmdb.open(path, map_size=1 << 26, subdir=True)
    try:
        count = 0
        for batch in batches(records, BLOCK_RECORDS):
            items = [(f"{count + i:010d} {r.key}".encode(), encode(r)) for i, r in enumerate(batch)]
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in items:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)
            count += len(batch)
        env.sync(True)
    finally:
        env.close()
    return count


def lmdb_blocks(loc: Location, name: str, placeholders: list[str]) -> Iterator[Block]:
    import lmdb

    path = loc.path(name + SUFFIX["lmdb"])
    local_root(loc, "lmdb")
    try:
        env = lmdb.open(path, readonly=True, lock=False, subdir=True)
    except lmdb.Error as exc:
        yield Block.failed(placeholders, f"LMDB environment {path} ({exc})")
        return
    n_seen = 0
    try:
        with env.begin() as txn:
            block = Block()
            for raw_key, value in txn.cursor():
                key = raw_key.decode("utf-8", "replace").partition(" ")[2]
                try:
                    block.add(key, *decode(value))
                except DECODE_ERRORS as exc:
                    block.add(key, error=f"{CANNOT_DECODE} {type(exc).__name__}: {exc}")
                n_seen += 1
                if len(block.keys) == BLOCK_RECORDS:
                    yield block
                    block = Block()
            yield block
    except lmdb.Error as exc:
        yield Block.failed(placeholders[n_seen:], f"LMDB {path} ({exc})")
    finally:
        env.close()


# -- zarr: one group per shard, arrays x (chunked by records), y, keys, meta (JSON strings) ---


def zarr_write(loc: Location, path: str, spec: RecordSpec, records, chunk: int) -> int:
    import zarr
    from zarr.codecs import ZstdCodec

    keys, x, y, meta = gather(records, spec)
    options = {} if loc.local else {"storage_options": loc.options}
    group = zarr.open_group(loc.url_of(path), mode="w", **options)
    group.create_array("x", data=x, chunks=(chunk, *spec.shape), fill_value=float_fill(spec),
                       compressors=ZstdCodec(checksum=True))  # a flipped byte fails to decode
    group.create_array("y", data=y, chunks=(max(1, len(y)),), fill_value=-1)
    for field_name, values in (("keys", keys), ("meta", meta)):
        array = group.create_array(field_name, shape=(len(values),), dtype=str,
                                   chunks=(max(1, len(values)),))
        if values:
            array[:] = np.array(values, dtype=object)
    return len(keys)


def zarr_blocks(loc: Location, name: str, placeholders: list[str]) -> Iterator[Block]:
    import zarr

    options = {} if loc.local else {"storage_options": loc.options}
    try:
        group = zarr.open_group(loc.url_of(loc.path(name + SUFFIX["zarr"])), mode="r", **options)
        x = group["x"]
        keys, y, meta = group["keys"][:], group["y"][:], group["meta"][:]
        assert len(keys) == len(y) == len(meta) == x.shape[0], "arrays differ in length"
    except Exception as exc:  # any failure here leaves no way to read a single record
        yield Block.failed(placeholders, f"zarr group {name} ({exc})")
        return
    step = x.chunks[0]
    for start in range(0, len(keys), step):
        stop = min(start + step, len(keys))
        yield array_block(lambda a=start, b=stop: x[a:b], keys[start:stop], y[start:stop],
                           meta[start:stop], f"zarr chunk of records {start}..{stop - 1}")


def array_block(read, keys, y, meta, what: str) -> Block:
    """A block of stacked records; a chunk that fails to read skips its records."""
    keys = [str(k) for k in keys]
    try:
        x = read()
    except Exception as exc:  # codecs and checksums raise many kinds; all mean "corrupt"
        return Block.failed(keys, f"{what} ({type(exc).__name__}: {exc})")
    block = Block(keys, x, np.asarray(y), [None] * len(keys))
    for i, text in enumerate(meta):
        try:
            block.meta[i] = json.loads(text)
            assert block.meta[i] is None or isinstance(block.meta[i], dict)
        except (ValueError, TypeError, AssertionError):
            block.errors[i] = f"{CANNOT_DECODE} meta {text!r} is not a JSON object"
    return block


# -- HDF5: one file per shard, datasets x (chunked, Fletcher-32 checksums), y, keys, meta ----


def hdf5_write(loc: Location, path: str, spec: RecordSpec, records, chunk: int) -> int:
    import h5py

    keys, x, y, meta = gather(records, spec)
    if loc.local:
        target = path
    else:  # HDF5 writes need a seekable local file; upload it whole afterwards
        fd, target = tempfile.mkstemp(suffix=".h5")
        os.close(fd)
    try:
        with h5py.File(target, "w") as f:
            f.create_dataset("x", data=x, maxshape=(None, *spec.shape), chunks=(chunk, *spec.shape),
                             fletcher32=True, fillvalue=float_fill(spec))
            f.create_dataset("y", data=y, maxshape=(None,), chunks=(chunk,), fletcher32=True,
                             fillvalue=-1)
            strings = h5py.string_dtype()
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=strings)
            f.create_dataset("meta", data=np.array(meta, dtype=object), dtype=strings)
        if not loc.local:
            loc.fs.put_file(target, path)
    finally:
        if not loc.local:
            os.remove(target)
    return len(keys)


def hdf5_blocks(loc: Location, name: str, placeholders: list[str]) -> Iterator[Block]:
    import h5py

    path = loc.path(name + SUFFIX["hdf5"])
    with contextlib.ExitStack() as stack:
        try:
            handle = path if loc.local else stack.enter_context(loc.fs.open(path, "rb"))
            f = stack.enter_context(h5py.File(handle, "r"))
            x = f["x"]
            keys, y, meta = f["keys"].asstr()[:], f["y"][:], f["meta"].asstr()[:]
            assert len(keys) == len(y) == len(meta) == x.shape[0], "datasets differ in length"
        except Exception as exc:  # the file is unreadable as a whole
            yield Block.failed(placeholders, f"HDF5 file {path} ({exc})")
            return
        step = x.chunks[0] if x.chunks else max(1, len(keys))
        for start in range(0, len(keys), step):
            stop = min(start + step, len(keys))
            yield array_block(lambda a=start, b=stop: x[a:b], keys[start:stop], y[start:stop],
                               meta[start:stop], f"HDF5 chunk of records {start}..{stop - 1}")


# -- folder sources: <root>/<class>/.../<file>.npy or .png / .jpg ----------------------------


def scan_folder(loc: Location) -> tuple[str, tuple[str, ...], list[tuple[str, int, int]]]:
    with io_errors(loc.url, "list the folder"):
        if not loc.fs.exists(loc.root):
            raise DataError(f"{loc.url}: does not exist; expected a rapydli store ({MANIFEST}) or "
                            "a folder with one sub-folder of .npy or image files per class")
        found = loc.fs.find(loc.root, detail=True)
    prefix = loc.root.rstrip("/") + "/"
    by_kind: dict[str, list[tuple[str, int]]] = {"npy": [], "images": []}
    for path, info in found.items():
        rel = path[len(prefix):] if path.startswith(prefix) else path
        parts = rel.split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue  # files at the top have no class; hidden files are not records
        suffix = os.path.splitext(rel)[1].lower()
        kind = "npy" if suffix == ".npy" else "images" if suffix in IMAGE_SUFFIXES else None
        if kind:
            by_kind[kind].append((rel, int(info.get("size") or 0)))
    if bool(by_kind["npy"]) == bool(by_kind["images"]):
        what = "both .npy and image files" if by_kind["npy"] else \
            f"no {MANIFEST} and no sub-folders of .npy or image files"
        raise DataError(f"{loc.url}: holds {what}; expected a rapydli store or a folder with one "
                        "sub-folder of .npy files (or of PNG / JPEG images) per class; create a "
                        "store with `rapydli data import`")
    fmt = "npy" if by_kind["npy"] else "images"
    classes = tuple(sorted({rel.split("/")[0] for rel, _ in by_kind[fmt]}))
    label = {c: i for i, c in enumerate(classes)}
    files = sorted((rel, label[rel.split("/")[0]], size) for rel, size in by_kind[fmt])
    return fmt, classes, files


def infer_spec(loc: Location, fmt: str, files: list) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of the first of ``files`` that decodes."""
    decode = decode_npy if fmt == "npy" else decode_image
    errors = []
    for rel, _, _ in files[:100]:
        try:
            with io_errors(loc.url, f"read {rel}"):
                x = decode(loc.fs.cat_file(loc.path(rel)))
            return x.shape, x.dtype.name
        except (DataError, *DECODE_ERRORS) as exc:
            errors.append(f"{rel}: {exc}")
    raise DataError(f"{loc.url}: none of the first {len(errors)} {fmt} files decodes (e.g. "
                    f"{errors[0]}); expected readable files, or pass spec= to open_store")


def decode_npy(raw: bytes) -> np.ndarray:
    x = np.load(io.BytesIO(raw), allow_pickle=False)
    if not isinstance(x, np.ndarray):
        raise ValueError("holds an .npz archive, not one array")
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def decode_image(raw: bytes) -> np.ndarray:
    """Pillow decode: grayscale -> ``(1, H, W)``, colour -> ``(3, H, W)``, float32 in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        if image.mode.startswith("I;16"):
            return (np.asarray(image, dtype=np.float32) / 65535.0)[None]  # (1, H, W)
        image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "F") else "RGB")
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


#: decoders (NumPy, Pillow and its plugins) raise many kinds; each means one unreadable record
DECODE_ERRORS = (Exception,)


def folder_blocks(loc: Location, fmt: str, files: Iterable[tuple[str, int]]) -> Iterator[Block]:
    """Blocks of the ``(relative path, label)`` files of a folder source, read in batches."""
    decode = decode_npy if fmt == "npy" else decode_image
    for batch in batches(files, FILES_PER_READ):
        paths = [loc.path(rel) for rel, _ in batch]
        try:
            raw = loc.fs.cat(paths, on_error="return")
        except Exception as exc:
            raw = dict.fromkeys(paths, exc)
        block = Block()
        for (rel, label), path in zip(batch, paths):
            data = raw.get(path, raw.get(loc.fs._strip_protocol(path)))
            try:
                if not isinstance(data, bytes):
                    raise OSError(f"cannot read file ({data!r})")
                block.add(rel, decode(data), label)
            except DECODE_ERRORS as exc:
                block.add(rel, error=f"{CANNOT_DECODE} {type(exc).__name__}: {exc}")
        yield block


WRITERS = {"lmdb": lmdb_write, "zarr": zarr_write, "hdf5": hdf5_write}
READERS = {"lmdb": lmdb_blocks, "zarr": zarr_blocks, "hdf5": hdf5_blocks}
