"""Import a data source into a sharded store, and inspect a store.

:func:`import_dataset` reads a source (scikit-learn's ``"digits"``, an npy or image folder, or
another store), drops the records that fail the quality checks, splits the rest into shards with
:func:`rapydli.storage.policies.partition` and writes them with
:func:`rapydli.storage.records.write_store`. :func:`inspect_store` reads every shard of a store
and summarises it; :func:`format_inspect` prints that summary as a table.

>>> store = import_dataset("digits", "memory://doc/digits", shards=3, overwrite=True)
>>> store.shards, store.counts
(('shard-00000', 'shard-00001', 'shard-00002'), (599, 599, 599))
>>> info = inspect_store("memory://doc/digits")
>>> info["n_records"], info["shape"], info["label_counts"][0], info["n_skipped"]
(1797, [1, 8, 8], 178, 0)
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from rapydli.errors import DataError
from rapydli.storage.policies import partition as partition_keys
from rapydli.storage.quality import QualityReport
from rapydli.storage.records import (FORMATS, Record, RecordSpec, Store, open_store, store_exists,
                                     write_store)

#: sources :func:`import_dataset` knows by name rather than by location
BUILTIN = ("digits",)
#: skipped records :func:`inspect_store` lists one by one
N_LISTED = 20


def import_dataset(src, dest, format: str = "zarr", shards: int = 4, partition: str = "contiguous",
                   storage_options: Mapping | None = None, overwrite: bool = False, *,
                   src_storage_options: Mapping | None = None,
                   report: QualityReport | None = None) -> Store:
    """Copy the usable records of ``src`` into a new sharded store at ``dest``.

    Parameters
    ----------
    src : str
        ``"digits"`` (scikit-learn's 8x8 digits: ``x`` ``(1, 8, 8)`` float32 in [0, 1], labels
        0..9, keys ``"digits-00000"``...), or any location :func:`open_store` reads: an npy or
        image folder, or another store.
    dest : str
        A local path or an fsspec URL; must not hold a store unless ``overwrite``.
    format : {"zarr", "lmdb", "hdf5"}
    shards : int
        Number of shards, named ``"shard-00000"``...
    partition : {"contiguous", "round_robin", "hash"}
        How records fall into shards (:func:`rapydli.storage.policies.partition`, over the keys
        of the usable records in source order). Folder sources are ordered by class, so
        ``"contiguous"`` gives shards of one or two classes; prefer ``"round_robin"`` or
        ``"hash"`` for them.
    storage_options, src_storage_options : dict, optional
        fsspec options for ``dest`` and ``src`` (``src`` defaults to ``storage_options``).
    report : QualityReport, optional
        Receives the records read from ``src`` and the ones skipped (with reasons); pass one to
        see what the import dropped, e.g. ``print(report)``.

    Returns
    -------
    Store
        The new store, opened. The source is held in memory while it is split.
    """
    if format not in FORMATS:
        raise DataError(f"import_dataset: unknown format {format!r}; expected one of "
                        f"{', '.join(map(repr, FORMATS))}")
    if not overwrite and store_exists(dest, storage_options):
        raise DataError(f"{dest}: a rapydli store is already there; pass overwrite=True (CLI: "
                        "--overwrite) to replace it, or choose another destination")
    report = QualityReport() if report is None else report
    src_options = storage_options if src_storage_options is None else src_storage_options
    spec, records = _read_source(src, src_options, report)
    groups = partition_keys([r.key for r in records], shards, partition)
    by_shard = {f"shard-{i:05d}": [records[j] for j in group] for i, group in enumerate(groups)}
    return write_store(dest, format, spec, by_shard, storage_options, overwrite=overwrite)


def _read_source(src, storage_options, report: QualityReport) -> tuple[RecordSpec, list[Record]]:
    if src == "digits":
        return _digits(report)
    store = open_store(src, storage_options)
    records = []
    for shard in store.shards:
        data = store.read_shard(shard)
        report.add(store.url, shard, data)
        records.extend(Record(key, data.x[i], int(data.y[i]), data.meta[i])
                       for i, key in enumerate(data.keys))
    return store.spec, records


def _digits(report: QualityReport) -> tuple[RecordSpec, list[Record]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 8, 8) -> (N, 1, 8, 8)
    spec = RecordSpec((1, 8, 8), "float32", classes=tuple(str(c) for c in range(10)))
    records = [Record(f"digits-{i:05d}", x[i], int(y)) for i, y in enumerate(digits.target)]
    report.n_read += len(records)
    if "digits" not in report.stores:
        report.stores.append("digits")
    return spec, records


def inspect_store(url, storage_options: Mapping | None = None) -> dict:
    """Read every shard of the store at ``url`` and summarise it (JSON-able).

    Returns
    -------
    dict
        ``url``, ``format``, ``n_records`` (all records, unusable ones included), ``n_usable``,
        ``shape``, ``dtype``, ``classes``, ``label_counts`` (usable records per label, a list
        indexed by label), ``shards`` (``name``, ``count``, ``usable``, ``nbytes`` or None),
        ``n_skipped``, ``skipped_by_reason``, ``skipped`` (the first :data:`N_LISTED` as
        ``shard``, ``key``, ``reason``) and ``quality`` (:meth:`QualityReport.to_dict`).
    """
    store = open_store(url, storage_options)
    report, labels, shard_rows = QualityReport(), Counter(), []
    for name, count, nbytes in zip(store.shards, store.counts, store.nbytes):
        data = store.read_shard(name)
        report.add(store.url, name, data)
        labels.update(data.y.tolist())
        shard_rows.append({"name": name, "count": count, "usable": len(data), "nbytes": nbytes})
    n_labels = max(store.spec.n_classes or 0, max(labels, default=-1) + 1)
    return {"url": store.url, "format": store.format, "n_records": len(store),
            "n_usable": report.n_read - report.n_skipped, "shape": list(store.spec.shape),
            "dtype": store.spec.dtype,
            "classes": None if store.spec.classes is None else list(store.spec.classes),
            "label_counts": [labels.get(i, 0) for i in range(n_labels)], "shards": shard_rows,
            "n_skipped": report.n_skipped, "skipped_by_reason": report.by_reason(),
            "skipped": [{"shard": shard, "key": key, "reason": reason}
                        for _, shard, key, reason in report.skipped[:N_LISTED]],
            "quality": report.to_dict()}


def format_inspect(info: dict) -> str:
    """:func:`inspect_store` 's summary as readable text: header, shard table, label table,
    skipped records.

    >>> print(format_inspect(inspect_store("memory://doc/digits")).splitlines()[1])
    1797 records (1797 usable) in 3 shards; x (1, 8, 8) float32; 10 classes
    """
    n_classes = "unknown classes" if info["classes"] is None else f"{len(info['classes'])} classes"
    lines = [f"store {info['url']} ({info['format']})",
             f"{info['n_records']} records ({info['n_usable']} usable) in {len(info['shards'])} "
             f"shards; x {tuple(info['shape'])} {info['dtype']}; {n_classes}", "",
             f"{'shard':<20} {'records':>9} {'usable':>9} {'bytes':>12}"]
    for row in info["shards"]:
        nbytes = "?" if row["nbytes"] is None else _human(row["nbytes"])
        lines.append(f"{row['name']:<20} {row['count']:>9} {row['usable']:>9} {nbytes:>12}")
    lines += ["", f"{'label':>5}  {'class':<20} {'records':>9}"]
    for label, count in enumerate(info["label_counts"]):
        name = info["classes"][label] if info["classes"] and label < len(info["classes"]) else "?"
        lines.append(f"{label:>5}  {name:<20} {count:>9}")
    fraction = info["n_skipped"] / info["n_records"] if info["n_records"] else 0.0
    lines += ["", f"skipped {info['n_skipped']} records ({100 * fraction:.2f}%)"]
    lines += [f"  {kind}: {n}" for kind, n in info["skipped_by_reason"].items()]
    lines += [f"  {s['shard']}/{s['key']}: {s['reason']}" for s in info["skipped"]]
    if info["n_skipped"] > len(info["skipped"]):
        lines.append(f"  ... and {info['n_skipped'] - len(info['skipped'])} more")
    return "\n".join(lines)


def _human(nbytes: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    exponent = min(3, int(np.log2(nbytes)) // 10)
    return f"{nbytes / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"
