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

The message itself need not go through Dask's comms either: each mailbox also opens a
*doorbell*, a named pipe (FIFO) in the same directory, and a sender on the machine writes the
message there as one short record (:class:`Bell`). A record of at most ``PIPE_BUF`` bytes
arrives whole even when several senders write at once, so every array of at least
:data:`BELL_MIN_BYTES` then goes into a segment and the record carries handles only. The
waiting take reads it straight away, in the receiving task's own thread: no event loop on
either side handles it. (Measured on 2 worker processes on 2 cores, data-parallel MLP: Dask's
actor call for the message took about 70% of each worker's event-loop CPU, 1.5 ms a step,
and 1.3-2.4 ms from the sender to the receiver under load.) A record that does not fit, a pipe
that is full or has no reader, falls back to the actor message; so do failure notices.

Where it applies: both mailboxes see the same shared-memory directory (each mailbox leaves a
probe file there, and a sender looks for the receiver's), the tile is a NumPy array of at
least :data:`MIN_BYTES`, and the sender holds less than :data:`MAX_BYTES` of segments. Every
other tile travels inside the message, as before. A segment is allocated in full when it is
made (``posix_fallocate``), so a full ``/dev/shm`` means a tile by message, never a crash.

A segment is one file: a header of :data:`HEADER` bytes (byte 0: 1 while a tile in it is
unread or in use by its receiver; byte 1: 1 while its sender's own array of it lives; free
when both are 0), then the tile. Only its sender writes a tile into it, only when free: by
copying a tile in as it posts it, or, for a gradient a kernel computes straight into the
segment (:meth:`Segments.allocate`), before; posting that one copies nothing. Only a receiver
clears byte 0, and only the sender's array going clears byte 1.

A *kept* array (:meth:`Segments.keep`) is a file of its own that is not recycled: the first
replica of a weight updated sharded (:meth:`rapydli.graph.lower._Lowering.sharded_update`)
moves its copy there, and the other replicas on the machine take that copy up as theirs
(:func:`rapydli.graph.ops.place_task`); a block of rows of it is posted as a handle
(``SharedTile.held`` False, with its ``offset``), and the receiver finds it in the memory it
already computes with. The file goes when the first replica's array does, or with its mailbox.
Where shared memory cannot be had, every replica keeps its own copy and blocks are copied.

Segments are deleted when their mailboxes close, and a mailbox closing with its engine
deletes its peers' files on this machine too, so that a worker that was killed leaves nothing
behind once the engine closes. A machine whose workers are all killed, and whose engines never
closed, keeps the files until it restarts: remove ``/dev/shm/rapydli-*`` then.
"""
from __future__ import annotations

import errno
import glob
import itertools
import mmap
import os
import pickle
import select
import struct
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
#: a message through a doorbell puts every array of at least this many bytes into a segment,
#: so that the record stays short (tiles between this and MIN_BYTES cost a page of memory)
BELL_MIN_BYTES = 1 << 9
#: the longest doorbell record: a write to a pipe of at most this many bytes is atomic
RECORD_BYTES = select.PIPE_BUF
#: a record is a 4-byte length, then the pickled message
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class SharedTile:
    """What travels in place of a tile put in a segment: where it is and what it is.

    ``offset``: bytes from the start of the segment's data to the tile (a block of rows of a
    gradient, say). ``held``: the segment's byte 0 says whether its tile is in use (False for
    a *kept* array, see :meth:`Segments.keep`, which lives as long as its owners use it)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0
    held: bool = True


def probe_path(name: str) -> str:
    """The probe file of the mailbox ``name``: a sender that sees it shares memory with it."""
    return os.path.join(SHM_DIR, f"{name}.probe")


def bell_path(name: str) -> str:
    """The doorbell of the mailbox ``name``: senders on this machine write messages to it."""
    return os.path.join(SHM_DIR, f"{name}.bell")


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
    _remove(bell_path(name))
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(name) + "-[0-9]*")):
        _remove(path)


def close_shared(name: str, segments: Segments, mappings: Mappings) -> None:
    """Mailbox ``name``'s shared memory goes: its probe, its doorbell's file (the pipe stays
    open until the mailbox goes), its segments, its mappings."""
    _remove(probe_path(name))
    _remove(bell_path(name))
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
        #: write ends of the doorbells rung, by receiving mailbox name
        self._bells: dict[str, int] = {}
        #: segments by the address of their tile, for arrays allocate handed out
        self._in_place: dict[int, tuple] = {}
        #: mappings of the files of kept arrays (see keep), by path
        self._kept: dict[str, mmap.mmap] = {}
        self._files = itertools.count()  # numbers the files made, segments and kept alike
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

    def pack(self, value, min_bytes: int = MIN_BYTES) -> SharedTile | None:
        """The handle of ``value`` in shared memory, or None when it should travel by message
        (not an array of at least ``min_bytes``, or no segment to be had): a block of a kept
        array (:meth:`keep`) or an array :meth:`allocate` handed out goes as it lies, any other
        is copied into a free segment."""
        if not isinstance(value, np.ndarray) or value.nbytes < min_bytes or value.dtype.hasobject:
            return None
        tile = kept_tile(value)
        if tile is not None:
            return tile
        with self._lock:
            tile = self._computed_here(value)
            if tile is not None:
                return tile
            segment = None if self.closed else self._segment_for(value.nbytes)
            if segment is None:
                return None
            path, mapping, _ = segment
            mapping[0] = 1  # taken: until the receiver lets go of the tile
        np.copyto(np.ndarray(value.shape, value.dtype, mapping, HEADER), value)
        return SharedTile(path, value.shape, value.dtype.str)

    def allocate(self, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """An empty array in a free segment, held until the array (and every view of it) goes;
        :meth:`pack` then posts it without a copy. None below :data:`MIN_BYTES`, or when no
        segment is to be had."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes < MIN_BYTES or dtype.hasobject:
            return None
        with self._lock:
            segment = None if self.closed else self._segment_for(nbytes)
            if segment is None:
                return None
            segment[1][1] = 1  # held by the array below
        array = np.ndarray(shape, dtype, segment[1], HEADER)
        self._in_place[array.ctypes.data] = segment
        weakref.finalize(array, _let_go, segment[1], 1)
        return array

    def _computed_here(self, value: np.ndarray) -> SharedTile | None:
        """The handle of ``value`` if it is an array :meth:`allocate` handed out, or a
        contiguous part of one (a block of its rows), not yet posted (holding the lock)."""
        if not value.flags.c_contiguous:
            return None
        address = value.ctypes.data
        segment, offset = self._in_place.get(address), 0
        if segment is None:  # a part: look for the array it is in
            for start, candidate in self._in_place.items():
                if start < address < start + candidate[2]:
                    segment, offset = candidate, address - start
                    break
            else:
                return None
        path, mapping, capacity = segment
        if mapping[1] != 1 or mapping[0] != 0 or offset + value.nbytes > capacity:
            return None  # its array is gone (a new one at the same place), or posted already
        mapping[0] = 1
        return SharedTile(path, value.shape, value.dtype.str, offset)

    def keep(self, array: np.ndarray) -> np.ndarray | None:
        """A copy of ``array`` in a file of its own in shared memory; None where none can be
        made. Posting a block of it (:meth:`pack`) copies nothing, and a peer that opens it
        reads and writes this same memory (see :func:`rapydli.graph.ops.place_task`: the
        replicas of a weight on one machine keep one copy). The file goes when the copy (the
        array returned, not its views) does, or with :meth:`close`. Kept arrays count against
        no limit: each replaces an array of the same size in the worker's own memory."""
        if not isinstance(array, np.ndarray) or array.dtype.hasobject or array.nbytes == 0:
            return None
        with self._lock:
            made = None if self.closed else self._new_file(array.nbytes)
            if made is None:
                return None
            self._kept[made[0]] = made[1]
        copy = np.ndarray(array.shape, array.dtype, made[1], HEADER)
        copy[...] = array
        _KEPT.add(*made)
        weakref.finalize(copy, self._drop_kept, made[0])
        return copy

    def _drop_kept(self, path: str) -> None:
        with self._lock:
            mapping = self._kept.pop(path, None)
        if mapping is not None:
            _forget_file(path, mapping)

    def _segment_for(self, nbytes: int):
        """The smallest free segment that holds ``nbytes`` (at most twice as big), else a new
        one; None when the limit or the machine's shared memory is reached."""
        capacity = -(-nbytes // 4096) * 4096  # whole pages: a small tile reuses its page
        fits = [s for s in self.segments if capacity <= s[2] <= 2 * capacity and s[1][0] == 0
                and s[1][1] == 0]
        if fits:
            return min(fits, key=lambda s: s[2])
        if self.held + capacity > self.limit:
            return None
        made = self._new_file(capacity)
        if made is None:
            return None
        self.segments.append((*made, capacity))
        self.held += capacity
        return self.segments[-1]

    def _new_file(self, nbytes: int) -> tuple[str, mmap.mmap] | None:
        """A new file of :data:`HEADER` + ``nbytes`` bytes, mapped; None where the machine's
        shared memory has no room for it."""
        path = os.path.join(SHM_DIR, f"{self.name}-{next(self._files)}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError:
            return None
        try:
            os.posix_fallocate(fd, 0, HEADER + nbytes)  # ENOSPC here, not SIGBUS on writing
            return path, mmap.mmap(fd, HEADER + nbytes)
        except OSError:
            _remove(path)
            return None
        finally:
            os.close(fd)

    def ring(self, name: str, message) -> bool:
        """Write ``message`` (picklable) to the doorbell of mailbox ``name`` on this machine;
        False, with nothing sent, where it cannot go that way: the record would be longer
        than :data:`RECORD_BYTES`, the pipe is full, or no mailbox reads it (gone, closed,
        or on another machine)."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if _LENGTH.size + len(payload) > RECORD_BYTES:
            return False
        with self._lock:
            if self.closed:
                return False
            fd = self._bells.get(name)
            if fd is None:
                try:  # no reader: ENXIO; no doorbell: ENOENT
                    fd = self._bells[name] = os.open(bell_path(name),
                                                     os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    return False
            try:
                os.write(fd, _LENGTH.pack(len(payload)) + payload)  # all or nothing
            except OSError:  # full (EAGAIN), or the reader went (EPIPE): by message this time
                if self._bells.pop(name, None) is not None:
                    os.close(fd)
                return False
        return True

    def close(self) -> None:
        """Delete every segment (mappings still read by someone stay valid until let go)."""
        with self._lock:
            self.closed = True
            for fd in self._bells.values():
                os.close(fd)
            self._bells.clear()
            for path, mapping, _ in self.segments:
                _let_file_go(path, mapping)
            for path, mapping in self._kept.items():
                _forget_file(path, mapping)
            self.segments.clear()
            self._kept.clear()
            self._in_place.clear()
            self.held = 0


class Mappings:
    """A receiver's mappings of its senders' segments, opened once and kept."""

    def __init__(self):
        self.maps: dict[str, mmap.mmap] = {}
        #: files of kept arrays opened here (mapped while arrays view them, see open)
        self.kept: set[str] = set()
        self._lock = threading.Lock()

    def _map(self, path: str) -> mmap.mmap:
        with self._lock:
            mapping = self.maps.get(path)
            if mapping is None:
                mapping = self.maps[path] = _open_file(path)
            return mapping

    def open(self, tile: SharedTile) -> np.ndarray:
        """The tile, read in place; its segment is freed once the array (and every view of
        it) is gone. A tile of a kept array is a view into the one mapping of that array's
        file in this process (see :func:`whole`), which lasts while arrays view it."""
        if not tile.held:
            with self._lock:
                mapping = _KEPT.get(tile.path)
                if mapping is None:
                    mapping = _open_file(tile.path)
                    _KEPT.add(tile.path, mapping)
                    self.kept.add(tile.path)
            return np.ndarray(tile.shape, np.dtype(tile.dtype), mapping, HEADER + tile.offset)
        mapping = self._map(tile.path)
        array = np.ndarray(tile.shape, np.dtype(tile.dtype), mapping, HEADER + tile.offset)
        weakref.finalize(array, _let_go, mapping, 0)
        return array

    def release(self, tile: SharedTile) -> None:
        """Free the segment of a tile that will not be read (its step failed)."""
        if not tile.held:
            return
        try:
            self._map(tile.path)[0] = 0
        except (OSError, ValueError):  # deleted or closed already: nothing to free
            pass

    def close(self) -> None:
        """Let go of every mapping and delete the files seen (their sender may be gone)."""
        with self._lock:
            for path, mapping in self.maps.items():
                _let_file_go(path, mapping)
            for path in self.kept:
                _KEPT.forget(path)
                _remove(path)
            self.maps.clear()
            self.kept.clear()


def _open_file(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _forget_file(path: str, mapping: mmap.mmap) -> None:
    """A kept array's file goes: from the registry, from the directory, and unmapped once no
    array views it any more."""
    _KEPT.forget(path)
    _let_file_go(path, mapping)


def _let_file_go(path: str, mapping: mmap.mmap) -> None:
    """Delete the file and unmap it, or leave the mapping to the arrays that still view it
    (it goes with the last of them)."""
    _remove(path)
    try:
        mapping.close()
    except BufferError:
        pass


class _Kept:
    """This process's mappings of kept arrays' files (:meth:`Segments.keep`), by path and by
    the address range of their data, for as long as they live: a view into one is posted as
    a handle, not copied."""

    def __init__(self):
        self._by_path: dict[str, weakref.ref] = {}
        self._ranges: dict[int, tuple[int, str]] = {}  # data address -> (bytes, path)
        self._lock = threading.RLock()  # a mapping's death (forget) may come inside find

    def add(self, path: str, mapping: mmap.mmap) -> None:
        start = np.frombuffer(mapping, np.uint8, 1, HEADER).ctypes.data
        with self._lock:
            self._by_path[path] = weakref.ref(mapping, lambda _, p=path: self.forget(p))
            self._ranges[start] = (len(mapping) - HEADER, path)

    def get(self, path: str) -> mmap.mmap | None:
        ref = self._by_path.get(path)
        return None if ref is None else ref()

    def forget(self, path: str) -> None:
        with self._lock:
            self._by_path.pop(path, None)
            for start, (_, p) in list(self._ranges.items()):
                if p == path:
                    del self._ranges[start]

    def find(self, array: np.ndarray) -> tuple[str, int] | None:
        """``(path, offset)`` of the kept file ``array`` lies in, else None."""
        if not self._ranges:
            return None
        address, nbytes = array.ctypes.data, array.nbytes
        with self._lock:
            for start, (size, path) in list(self._ranges.items()):
                if start <= address and address + nbytes <= start + size:
                    return path, address - start
        return None


_KEPT = _Kept()


def kept_tile(value: np.ndarray) -> SharedTile | None:
    """The handle of ``value`` if it is a contiguous part of a kept array's file."""
    if not value.flags.c_contiguous:
        return None
    found = _KEPT.find(value)
    if found is None:
        return None
    return SharedTile(found[0], value.shape, value.dtype.str, found[1], held=False)


def whole(part, shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """The array of ``shape`` and ``dtype`` that fills the kept file ``part`` lies in (this
    process's mapping of it), else None: a replica adopts the first replica's copy so."""
    if not isinstance(part, np.ndarray):
        return None
    found = _KEPT.find(part)
    mapping = _KEPT.get(found[0]) if found else None
    dtype = np.dtype(dtype)
    if mapping is None or len(mapping) != HEADER + int(np.prod(shape)) * dtype.itemsize:
        return None
    return np.ndarray(shape, dtype, mapping, HEADER)


def _let_go(mapping: mmap.mmap, holder: int) -> None:
    """Clear a segment's header byte ``holder`` (0: its receiver, 1: its sender's array)."""
    try:
        mapping[holder] = 0
    except ValueError:  # the mapping was closed: its sender is gone
        pass


class Bell:
    """A mailbox's doorbell: a named pipe that senders on this machine write records to
    (:meth:`Segments.ring`) and that the mailbox's waiting take reads (:meth:`wait`).

    The mailbox holds both ends (a pipe opened read-write never reports end of file and never
    blocks the opener), so it can also wake its own reader (:meth:`wake`) when a message comes
    another way. :meth:`open` returns None where the pipe cannot be made: messages then go by
    actor only.
    """

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self._pending = b""  # the start of a record not yet read whole
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._close = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, name: str) -> Bell | None:
        path = bell_path(name)
        try:
            os.mkfifo(path, 0o600)
        except OSError:  # no /dev/shm, read-only, or the name is taken
            return None
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            _remove(path)
            return None
        return cls(path, fd)

    def wake(self) -> None:
        """Wake a :meth:`wait` (an empty record); a full pipe will wake it anyway."""
        try:
            os.write(self.fd, _LENGTH.pack(0))
        except OSError:
            pass

    def wait(self, timeout: float) -> list:
        """The messages rung since the last call, waiting up to ``timeout`` seconds for the
        first record (an empty list on a timeout or a bare :meth:`wake`)."""
        try:  # poll, not select: a worker may hold more than select's 1,024 descriptors
            ready = self._poll.poll(max(timeout, 0.0) * 1000.0)
        except (OSError, ValueError):  # closed under us: the mailbox is closing
            return []
        if not ready:
            return []
        chunks = [self._pending]
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # pragma: no cover - closed under us
                if exc.errno == errno.EBADF:
                    break
                raise
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        messages, at = [], 0
        while at + _LENGTH.size <= len(data):
            (n,) = _LENGTH.unpack_from(data, at)
            if at + _LENGTH.size + n > len(data):
                break
            if n:
                messages.append(pickle.loads(data[at + _LENGTH.size:at + _LENGTH.size + n]))
            at += _LENGTH.size + n
        self._pending = data[at:]
        return messages
