"""Shared memory for tiles between mesh workers on one machine: the direct exchange's fast path.

A tile posted to a worker process on the same machine need not cross the network stack (over
loopback TCP each byte is copied into the kernel and out again, and both workers' event loops
handle every frame: on a 2-core machine that took 6-7 ms of CPU per worker and step for the
7.4 MB of gradients of a data-parallel MLP, beside 22 ms of kernels). Instead the sender copies
the tile into a *segment*, a file in the shared-memory directory (``/dev/shm``) mapped into
both processes, and the mailbox message carries a :class:`SharedTile` handle of a few dozen
bytes. The receiver reads the tile in place, without a copy; when the last reference to that
array goes, the segment is marked free and its sender reuses it for a later tile, so a
training settles on a fixed set of segments, reused every step.

Where it applies: both mailboxes see the same shared-memory directory (each mailbox leaves a
probe file there, and a sender looks for the receiver's), the tile is a NumPy array of at
least :data:`MIN_BYTES`, and the sender holds less than :data:`MAX_BYTES` of segments. Every
other tile travels inside the message, as before. A segment is allocated in full when it is
made (``posix_fallocate``), so a full ``/dev/shm`` means a tile by message, never a crash.

A segment is one file: a header of :data:`HEADER` bytes (byte 0: 1 while a tile in it is
unread or in use, 0 when free), then the tile. Only its sender writes a tile into it, only when
free; only a receiver frees it. Segments are deleted when their mailboxes close, and a
mailbox closing with its engine deletes its peers' files on this machine too, so that a worker
that was killed leaves nothing behind once the engine closes. A machine whose workers are all
killed, and whose engines never closed, keeps the files until it restarts: remove
``/dev/shm/rapydli-*`` then.
"""
from __future__ import annotations

import glob
import mmap
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np

#: where segments live: a memory-backed file system every process on the machine sees
SHM_DIR = "/dev/shm"
#: tiles smaller than this travel inside the message (a segment saves nothing on them)
MIN_BYTES = 1 << 16
#: the most shared memory one sender (one engine's mailbox on one worker) holds in segments
MAX_BYTES = 1 << 30
#: bytes before the tile in a segment (byte 0 is the busy flag); keeps the tile 64-byte aligned
HEADER = 64


@dataclass(frozen=True)
class SharedTile:
    """What travels in place of a tile put in a segment: where it is and what it is."""

    path: str
    shape: tuple[int, ...]
    dtype: str


def probe_path(name: str) -> str:
    """The probe file of the mailbox ``name``: a sender that sees it shares memory with it."""
    return os.path.join(SHM_DIR, f"{name}.probe")


def make_probe(name: str) -> bool:
    """Leave the probe of mailbox ``name``; False where there is no shared-memory directory."""
    try:
        with open(probe_path(name), "x"):
            pass
        return True
    except OSError:  # no /dev/shm (not Linux), read-only, or full: tiles go by message
        return False


def remove_files(name: str) -> None:
    """Delete the probe and every segment of mailbox ``name`` on this machine (a peer closing
    cleans up after a mailbox whose process was killed)."""
    _remove(probe_path(name))
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(name) + "-[0-9]*")):
        _remove(path)


def close_shared(name: str, segments: Segments, mappings: Mappings) -> None:
    """Mailbox ``name``'s shared memory goes: its probe, its segments, its mappings."""
    _remove(probe_path(name))
    segments.close()
    mappings.close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Segments:
    """A sender's segments (one set per mailbox, for the tiles its worker posts)."""

    def __init__(self, name: str, limit: int = MAX_BYTES):
        self.name = name
        self.limit = limit
        #: ``(path, mapping, capacity in bytes)`` of every segment made
        self.segments: list[tuple[str, mmap.mmap, int]] = []
        self.held = 0
        #: per receiving mailbox name: whether its probe is visible (memory is shared)
        self._shares: dict[str, bool] = {}
        #: set by :meth:`close`: a task still posting sends by message (no file made after it)
        self.closed = False
        self._lock = threading.Lock()

    def shares_with(self, name: str) -> bool:
        """Whether mailbox ``name`` sees this machine's shared memory as this one does, and
        runs as the same user (segments are readable by their owner only)."""
        known = self._shares.get(name)
        if known is None:
            try:
                known = os.stat(probe_path(name)).st_uid == os.getuid()
            except OSError:  # no probe here: another machine, or no /dev/shm
                known = False
            self._shares[name] = known
        return known

    def pack(self, value) -> SharedTile | None:
        """``value`` copied into a free segment, or None when it should travel by message."""
        if not isinstance(value, np.ndarray) or value.nbytes < MIN_BYTES or value.dtype.hasobject:
            return None
        with self._lock:
            segment = None if self.closed else self._segment_for(value.nbytes)
            if segment is None:
                return None
            path, mapping, _ = segment
            mapping[0] = 1  # taken: until the receiver lets go of the tile
        np.copyto(np.ndarray(value.shape, value.dtype, mapping, HEADER), value)
        return SharedTile(path, value.shape, value.dtype.str)

    def _segment_for(self, nbytes: int):
        """The smallest free segment that holds ``nbytes`` (at most twice as big), else a new
        one; None when the limit or the machine's shared memory is reached."""
        fits = [s for s in self.segments if nbytes <= s[2] <= 2 * nbytes and s[1][0] == 0]
        if fits:
            return min(fits, key=lambda s: s[2])
        capacity = -(-nbytes // 4096) * 4096
        if self.held + capacity > self.limit:
            return None
        path = os.path.join(SHM_DIR, f"{self.name}-{len(self.segments)}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            return None
        try:
            os.posix_fallocate(fd, 0, HEADER + capacity)  # ENOSPC here, not SIGBUS on writing
            mapping = mmap.mmap(fd, HEADER + capacity)
        except OSError:
            _remove(path)
            return None
        finally:
            os.close(fd)
        self.segments.append((path, mapping, capacity))
        self.held += capacity
        return self.segments[-1]

    def close(self) -> None:
        """Delete every segment (mappings still read by someone stay valid until let go)."""
        with self._lock:
            self.closed = True
            for path, mapping, _ in self.segments:
                _remove(path)
                try:
                    mapping.close()
                except BufferError:  # an array still views it: it goes with that array
                    pass
            self.segments.clear()
            self.held = 0


class Mappings:
    """A receiver's mappings of its senders' segments, opened once and kept."""

    def __init__(self):
        self.maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _map(self, path: str) -> mmap.mmap:
        with self._lock:
            mapping = self.maps.get(path)
            if mapping is None:
                fd = os.open(path, os.O_RDWR)
                try:
                    mapping = self.maps[path] = mmap.mmap(fd, 0)
                finally:
                    os.close(fd)
            return mapping

    def open(self, tile: SharedTile) -> np.ndarray:
        """The tile, read in place; its segment is freed once the array (and every view of
        it) is gone."""
        mapping = self._map(tile.path)
        array = np.ndarray(tile.shape, np.dtype(tile.dtype), mapping, HEADER)
        weakref.finalize(array, _free, mapping)
        return array

    def release(self, tile: SharedTile) -> None:
        """Free the segment of a tile that will not be read (its step failed)."""
        try:
            self._map(tile.path)[0] = 0
        except (OSError, ValueError):  # deleted or closed already: nothing to free
            pass

    def close(self) -> None:
        """Let go of every mapping and delete the segments seen (their sender may be gone)."""
        with self._lock:
            for path, mapping in self.maps.items():
                _remove(path)
                try:
                    mapping.close()
                except BufferError:
                    pass
            self.maps.clear()


def _free(mapping: mmap.mmap) -> None:
    try:
        mapping[0] = 0
    except ValueError:  # the mapping was closed: its sender is gone
        pass
