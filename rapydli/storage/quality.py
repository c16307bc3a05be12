"""Record quality: the checks every reader runs, the report of skipped records, and the threshold.

A record is *usable* when its array has the store's shape and dtype, holds no NaN or Inf, and its
label is an integer in range. Readers (:mod:`rapydli.storage.records`) never return unusable
records; they list them as ``(key, reason)`` in :attr:`ShardData.skipped`. A run adds each shard it
reads to a :class:`QualityReport` and stops (:func:`check_threshold`) when too many were skipped.

>>> from rapydli.storage.records import RecordSpec
>>> spec = RecordSpec((1, 2, 2), "float32", classes=("a", "b"))
>>> check_record(np.zeros((1, 2, 2), np.float32), 1, spec) is None
True
>>> check_record(np.full((1, 2, 2), np.nan, np.float32), 1, spec)
'holds 4 NaN/Inf values'
>>> check_record(np.zeros((1, 2, 2), np.float32), 2, spec)
'label 2 out of range; expected 0..1 (2 classes)'
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rapydli.errors import ConfigError, DataError

if TYPE_CHECKING:
    from rapydli.storage.records import RecordSpec, ShardData

#: reason prefix of a record whose bytes could not be turned into an array and a label
CANNOT_DECODE = "cannot decode:"
#: the kinds :meth:`QualityReport.by_reason` counts, in the order they are checked
REASON_KINDS = ("cannot decode", "shape", "dtype", "NaN/Inf", "label")
#: examples a threshold error and a report summary show
N_EXAMPLES = 5


def check_record(x, y, spec: RecordSpec) -> str | None:
    """``None`` if the record ``(x, y)`` is usable under ``spec``, else a short reason.

    Checked in order, the first failure wins: shape, dtype, NaN/Inf values, label (an integer,
    ``>= 0``, and ``< spec.n_classes`` when the classes are known). Bytes that cannot be decoded
    are reported by the reader itself, with a reason starting ``"cannot decode:"``.

    Examples
    --------
    >>> from rapydli.storage.records import RecordSpec
    >>> spec = RecordSpec((1, 8, 8), "float32")
    >>> check_record(np.zeros((1, 7, 8), np.float32), 0, spec)
    'shape (1, 7, 8); expected (1, 8, 8)'
    >>> check_record(np.zeros((1, 8, 8)), 0, spec)
    'dtype float64; expected float32'
    >>> check_record(np.zeros((1, 8, 8), np.float32), -1, spec)
    'label -1 out of range; expected >= 0'
    """
    if not isinstance(x, np.ndarray):
        return f"not an array; received {type(x).__name__}"
    if x.shape != spec.shape:
        return f"shape {x.shape}; expected {spec.shape}"
    if x.dtype != np.dtype(spec.dtype):
        return f"dtype {x.dtype}; expected {spec.dtype}"
    if x.dtype.kind in "fc":
        n_bad = int(np.count_nonzero(~np.isfinite(x)))
        if n_bad:
            return f"holds {n_bad} NaN/Inf values"
    return _check_label(y, spec)


def _check_label(y, spec: RecordSpec) -> str | None:
    if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
        return f"label {y!r} is not an integer"
    if y < 0:
        return f"label {y} out of range; expected >= 0"
    if spec.n_classes is not None and y >= spec.n_classes:
        return f"label {y} out of range; expected 0..{spec.n_classes - 1} ({spec.n_classes} classes)"
    return None


def check_batch(x: np.ndarray, y: np.ndarray, spec: RecordSpec) -> list[str | None]:
    """:func:`check_record` for each of ``len(y)`` records stacked in ``x`` ``(n, *shape)``.

    Gives the same reasons as calling :func:`check_record` record by record, in one pass.

    Examples
    --------
    >>> from rapydli.storage.records import RecordSpec
    >>> x = np.zeros((3, 2), np.float32); x[1, 0] = np.inf
    >>> check_batch(x, np.array([0, 0, 5]), RecordSpec((2,), "float32", classes=("a", "b")))
    [None, 'holds 1 NaN/Inf values', 'label 5 out of range; expected 0..1 (2 classes)']
    """
    n = len(y)
    if x.shape[1:] != spec.shape or x.dtype != np.dtype(spec.dtype):
        return [check_record(x[i], y[i], spec) for i in range(n)]
    n_bad = np.zeros(n, dtype=np.int64)
    if x.dtype.kind in "fc":
        n_bad = np.count_nonzero(~np.isfinite(x.reshape(n, -1)), axis=1)  # (n,)
    y = np.asarray(y)
    in_range = (y >= 0) & (y < (spec.n_classes if spec.n_classes is not None else np.inf))
    if y.dtype.kind not in "iu":
        in_range[:] = False
    return [None if n_bad[i] == 0 and in_range[i]
            else (f"holds {n_bad[i]} NaN/Inf values" if n_bad[i] else _check_label(y[i], spec))
            for i in range(n)]


def reason_kind(reason: str) -> str:
    """The kind of a skip reason: one of :data:`REASON_KINDS`, or ``"other"``.

    >>> reason_kind("holds 3 NaN/Inf values"), reason_kind("cannot decode: truncated")
    ('NaN/Inf', 'cannot decode')
    """
    if reason.startswith(CANNOT_DECODE):
        return "cannot decode"
    for kind, marker in (("shape", "shape "), ("dtype", "dtype "), ("label", "label ")):
        if reason.startswith(marker):
            return kind
    return "NaN/Inf" if "NaN/Inf" in reason else "other"


@dataclass
class QualityReport:
    """Records read and skipped, accumulated shard by shard over one or more stores.

    Examples
    --------
    >>> from rapydli.storage.records import ShardData
    >>> data = ShardData(np.zeros((3, 1), np.float32), np.zeros(3, np.int64), ("a", "b", "c"),
    ...                  (None,) * 3, skipped=(("d", "holds 1 NaN/Inf values"),))
    >>> report = QualityReport()
    >>> report.add("memory://s", "shard-00000", data)
    >>> report.n_read, report.n_skipped, report.fraction, report.by_reason()
    (4, 1, 0.25, {'NaN/Inf': 1})
    """

    #: records attempted (returned plus skipped)
    n_read: int = 0
    #: ``(store_url, shard, key, reason)`` of every skipped record, in reading order
    skipped: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: store URLs added, in first-seen order
    stores: list[str] = field(default_factory=list)

    def add(self, store_url: str, shard: str, shard_data: ShardData) -> None:
        """Count the records of one shard read from ``store_url``."""
        if store_url not in self.stores:
            self.stores.append(store_url)
        self.n_read += shard_data.n_read
        self.skipped.extend((store_url, shard, key, reason) for key, reason in shard_data.skipped)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def fraction(self) -> float:
        """Skipped records over records read; 0.0 when nothing was read."""
        return self.n_skipped / self.n_read if self.n_read else 0.0

    def by_reason(self) -> dict[str, int]:
        """Skipped records per kind of reason (see :func:`reason_kind`), most frequent first."""
        return dict(Counter(reason_kind(reason) for *_, reason in self.skipped).most_common())

    def examples(self, n: int = N_EXAMPLES) -> list[str]:
        """Up to ``n`` skipped records as ``"url shard/key: reason"`` lines."""
        return [f"{url} {shard}/{key}: {reason}" for url, shard, key, reason in self.skipped[:n]]

    def to_dict(self, n_examples: int = 20) -> dict:
        """A JSON-able summary for run reports: counts, fraction, kinds and a few examples."""
        return {"stores": list(self.stores), "n_read": self.n_read, "n_skipped": self.n_skipped,
                "fraction": self.fraction, "by_reason": self.by_reason(),
                "examples": [{"store": url, "shard": shard, "key": key, "reason": reason}
                             for url, shard, key, reason in self.skipped[:n_examples]]}

    def __str__(self) -> str:
        head = (f"read {self.n_read} records from {len(self.stores)} store(s); skipped "
                f"{self.n_skipped} ({100 * self.fraction:.2f}%)")
        if not self.skipped:
            return head
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.by_reason().items())
        more = self.n_skipped - N_EXAMPLES
        tail = [f"  ... and {more} more"] if more > 0 else []
        return "\n".join([f"{head}: {kinds}", *(f"  {line}" for line in self.examples()), *tail])


def check_threshold(report: QualityReport, threshold: float = 0.01) -> None:
    """Raise :class:`DataError` when more than ``threshold`` of the records read were skipped.

    The message names the stores, the count and percentage, the threshold, up to five example
    keys with their reasons, and the fix.

    Examples
    --------
    >>> report = QualityReport(n_read=100, stores=["s3://b/digits"],
    ...                        skipped=[("s3://b/digits", "shard-00000", "k7", "holds 1 NaN/Inf values")])
    >>> check_threshold(report, threshold=0.01)
    >>> check_threshold(report, threshold=0.005)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rapydli.errors.DataError: skipped 1 of 100 records (1.00%) from s3://b/digits; ...
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0 <= threshold <= 1:
        raise ConfigError(f"check_threshold: threshold must be a fraction in [0, 1]; received "
                          f"{threshold!r}")
    if report.fraction <= threshold:
        return
    examples = "\n  ".join(report.examples())
    raise DataError(
        f"skipped {report.n_skipped} of {report.n_read} records ({100 * report.fraction:.2f}%) "
        f"from {', '.join(report.stores)}; expected at most {100 * threshold:.2f}% (the threshold)."
        f" Reasons: {report.by_reason()}. Examples:\n  {examples}\nRepair or re-import those "
        "records (`rapydli data import`, then `rapydli data inspect` to check), or raise the "
        "threshold if losing them is acceptable")
