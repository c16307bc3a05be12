"""Checkpoints: parameters, optimizer state and JSON metadata in one ``.npz``, written atomically.

A checkpoint is ``<directory>/checkpoint.npz`` (:func:`save_checkpoint`), or one of the rotating
``<directory>/ckpt-<step>.npz`` files a run writes every N steps (:class:`Checkpoints`, the last K
kept), with entries ``param/<name>``, ``state/<name>``,
``meta`` (UTF-8 JSON as ``uint8`` bytes) and ``version``. It is written to a temporary file in
the same directory, flushed and fsynced, then renamed over the final name, so a crash leaves
either the old checkpoint or the new one, never a torn file. Nothing is pickled.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> path = save_checkpoint(d, {"0.weight": np.ones((2, 3))}, {}, {"epoch": 3})
>>> params, state, meta = load_checkpoint(d)
>>> params["0.weight"].shape, meta
((2, 3), {'epoch': 3})
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from rapydli.errors import ConfigError, DataError
from rapydli.storage.atomic import atomic_write

FILENAME = "checkpoint.npz"
#: name of rotating checkpoints; the step number sorts them
ROTATING = "ckpt-{step:09d}.npz"
#: bumped when the layout of entries changes
VERSION = 1
_PREFIXES = {"param/": 0, "state/": 1}


def _entries(params: dict, opt_state: dict, meta: dict) -> dict[str, np.ndarray]:
    entries = {}
    for prefix, arrays in (("param/", params), ("state/", opt_state)):
        for name, value in arrays.items():
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise DataError(f"checkpoint {prefix}{name}: expected a numeric array; received "
                                f"dtype {array.dtype} (object arrays would need pickle)")
            entries[f"{prefix}{name}"] = array
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise DataError(f"checkpoint meta: expected JSON-serialisable values (str, int, float, "
                        f"bool, None, lists, dicts); received {exc}") from None
    entries["meta"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    entries["version"] = np.array(VERSION, dtype=np.int64)
    return entries


def save_checkpoint(directory: str | Path, params: dict[str, np.ndarray],
                    opt_state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Atomically write ``directory/checkpoint.npz``, replacing any previous checkpoint there.

    Parameters
    ----------
    directory : str or Path
        Created if missing.
    params, opt_state : dict of str to ndarray
        Parameters (``{"0.weight": ...}``) and optimizer state slots, stored exactly.
    meta : dict
        JSON-serialisable metadata: epoch, step, config, metrics ...

    Returns
    -------
    Path
        The checkpoint file.

    Examples
    --------
    >>> import tempfile
    >>> save_checkpoint(tempfile.mkdtemp(), {"w": np.zeros(3)}, {}, {}).name
    'checkpoint.npz'
    """
    return _write(Path(directory), FILENAME, _entries(params, opt_state, meta))


def _write(directory: Path, name: str, entries: dict) -> Path:
    return atomic_write(directory / name, lambda file: np.savez(file, **entries))


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                               dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file or the directory holding ``checkpoint.npz``.

    Returns
    -------
    params, opt_state, meta

    Raises
    ------
    ConfigError
        If there is no checkpoint at ``path``.
    DataError
        If the file is not a rapydli checkpoint or is corrupt.

    Examples
    --------
    >>> load_checkpoint("no/such/dir")
    Traceback (most recent call last):
    ...
    rapydli.errors.ConfigError: checkpoint 'no/such/dir/checkpoint.npz': file not found; ...
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        rotating = Checkpoints(path).paths()
        if rotating:  # the newest readable one; an older one if the newest cannot be read
            for candidate in reversed(rotating):
                try:
                    return load_checkpoint(candidate)
                except DataError:
                    if candidate == rotating[0]:
                        raise
        path = path / FILENAME
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r}: file not found; expected a directory "
                          f"holding {FILENAME} or the file itself, as written by save_checkpoint")
    try:
        with np.load(path, allow_pickle=False) as npz:
            entries = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"checkpoint {str(path)!r}: cannot be read as .npz ({exc}); "
                        "the file is corrupt or not a checkpoint") from None
    return _unpack(entries, path)


def _unpack(entries: dict[str, np.ndarray], path: Path):
    where = f"checkpoint {str(path)!r}"
    if "meta" not in entries or "version" not in entries:
        raise DataError(f"{where}: missing entries 'meta'/'version'; expected a file written "
                        f"by save_checkpoint; received entries {sorted(entries)}")
    if int(entries.pop("version")) != VERSION:
        raise DataError(f"{where}: format version unsupported; expected {VERSION}")
    meta = json.loads(entries.pop("meta").tobytes().decode("utf-8"))
    parts: tuple[dict, dict] = ({}, {})
    for key, array in entries.items():
        prefix = key[:6]
        if prefix not in _PREFIXES:
            raise DataError(f"{where}: unexpected entry {key!r}; expected param/<name>, "
                            "state/<name>, meta, version")
        parts[_PREFIXES[prefix]][key[6:]] = array
    return parts[0], parts[1], meta


class Checkpoints:
    """Rotating checkpoints of a run: ``ckpt-<step>.npz`` in ``directory``, the last ``keep`` kept.

    Each is written like :func:`save_checkpoint` (temporary file, fsync, rename), so a process
    killed while writing leaves every earlier checkpoint readable; a stray temporary file is
    never taken for a checkpoint.

    >>> import tempfile
    >>> ckpts = Checkpoints(tempfile.mkdtemp(), keep=2)
    >>> for step in (10, 20, 30):
    ...     _ = ckpts.save(step, {"w": np.full(2, step)}, {}, {"step": step})
    >>> [p.name for p in ckpts.paths()]
    ['ckpt-000000020.npz', 'ckpt-000000030.npz']
    >>> load_checkpoint(ckpts.directory)[2]
    {'step': 30}
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"checkpoints: keep must be a positive int; received {keep!r}")
        self.directory, self.keep = Path(directory), keep

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("ckpt-*.npz") if p.name[5:-4].isdigit())

    def save(self, step: int, params: dict, opt_state: dict, meta: dict) -> Path:
        """Write the checkpoint of ``step``, then delete all but the newest ``keep``."""
        path = _write(self.directory, ROTATING.format(step=int(step)),
                      _entries(params, opt_state, meta))
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return path
