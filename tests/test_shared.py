"""Shared memory between mesh workers on one machine: segments, their reuse, and the direct
exchange training bit for bit as it does with every tile inside its message."""
from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest

import rapydli as rd
from rapydli.scheduler import shared
from rapydli.scheduler.engine import Engine
from rapydli.scheduler.mailbox import Exchange, Mailbox, close_mailboxes, start_mailboxes
from rapydli.scheduler.shared import (MIN_BYTES, Bell, Mappings, Segments, SharedTile,
                                      bell_path, make_probe, probe_path)

pytestmark = pytest.mark.skipif(not os.path.isdir(shared.SHM_DIR),
                                reason=f"no shared-memory directory {shared.SHM_DIR}")


def _name(tag: str) -> str:
    return f"rapydli-test-{tag}-{time.monotonic_ns()}"


@pytest.fixture
def pool():
    segments, mappings = Segments(_name("s")), Mappings()
    yield segments, mappings
    segments.close()
    mappings.close()


def _big(seed=0, shape=(128, 160)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_a_tile_read_in_place_is_the_tile_sent(pool):
    segments, mappings = pool
    value = _big()[:, 1:]  # a strided view: copied into the segment as a C-contiguous array
    tile = segments.pack(value)
    assert isinstance(tile, SharedTile) and tile.shape == value.shape
    got = mappings.open(tile)
    np.testing.assert_array_equal(got, value)
    assert got.dtype == value.dtype and got.flags.c_contiguous
    assert got.ctypes.data % 64 == 0  # aligned, as matrix products want it


def test_a_segment_is_reused_only_once_the_receiver_lets_go(pool):
    segments, mappings = pool
    first = mappings.open(segments.pack(_big(1)))
    view = first[3:5]  # a view keeps the tile alive, and its segment taken
    del first
    gc.collect()
    second = segments.pack(_big(2))
    assert second.path != segments.segments[0][0]  # the first one is still taken
    np.testing.assert_array_equal(view, _big(1)[3:5])  # untouched by the second tile
    del view
    gc.collect()
    third = segments.pack(_big(3))
    assert third.path == segments.segments[0][0]  # free again: reused, no third segment
    assert len(segments.segments) == 2
    np.testing.assert_array_equal(mappings.open(third), _big(3))


def test_a_tile_never_read_is_freed_by_release(pool):
    segments, mappings = pool
    tile = segments.pack(_big())
    mappings.release(tile)
    assert segments.pack(_big(1)).path == tile.path


def test_small_odd_and_foreign_values_travel_by_message(pool):
    segments, _ = pool
    assert segments.pack(np.zeros(MIN_BYTES // 4 - 1, np.float32)) is None
    assert segments.pack(np.empty(MIN_BYTES, object)) is None
    assert segments.pack([0.0] * MIN_BYTES) is None
    assert segments.segments == []


def test_the_limit_sends_the_rest_by_message():
    segments = Segments(_name("limit"), limit=2 * _big().nbytes)
    try:
        held = [segments.pack(_big(i)) for i in range(3)]
        assert [t is None for t in held] == [False, False, True]
    finally:
        segments.close()


def test_a_full_shared_memory_sends_by_message_and_leaves_no_file(pool, monkeypatch):
    """Where /dev/shm has no room (a container's 64 MiB, say), making a segment fails at once
    and the tile goes inside its message: nothing is written past the end of the memory."""
    import errno

    segments, _ = pool

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared.os, "posix_fallocate", full)
    before = set(os.listdir(shared.SHM_DIR))
    assert segments.pack(_big()) is None
    assert segments.segments == [] and set(os.listdir(shared.SHM_DIR)) == before


def test_a_tile_computed_in_its_segment_is_posted_without_a_copy(pool):
    segments, mappings = pool
    assert segments.allocate((8,), np.float32) is None  # small: by message, as before
    out = segments.allocate((128, 160), np.float32)
    (path, flag, _), = segments.segments
    assert flag[1] == 1 and flag[0] == 0  # held by its array, not yet posted
    out[...] = _big()  # a kernel writes it
    tile = segments.pack(out)
    assert tile.path == path and len(segments.segments) == 1 and flag[0] == 1  # no copy
    second = segments.pack(out)  # to a second peer: a copy of its own
    assert second.path != path and len(segments.segments) == 2
    got = mappings.open(tile)
    np.testing.assert_array_equal(got, _big())
    del got
    gc.collect()
    assert flag[0] == 0 and flag[1] == 1  # read, but the sender's array still lives
    assert segments.pack(_big(1)).path != path  # so the segment is not reused
    del out
    gc.collect()
    assert flag[1] == 0 and segments.pack(_big(2)).path == path  # now it is


def test_closing_deletes_the_segments_and_a_probe_tells_who_shares_memory(pool):
    segments, mappings = pool
    tile = segments.pack(_big())
    assert os.path.exists(tile.path)
    name = _name("probe")
    assert not segments.shares_with(name)  # no such mailbox on this machine
    assert make_probe(name)
    try:
        assert Segments(_name("other")).shares_with(name)
    finally:
        os.unlink(probe_path(name))
    got = mappings.open(tile)
    segments.close()
    assert not os.path.exists(tile.path)
    np.testing.assert_array_equal(got, _big())  # a tile still read stays valid
    assert segments.pack(_big()) is None and segments.segments == []  # none made after close


def _wide():
    # weight gradients of 64-256 KiB: over MIN_BYTES, so they travel through shared memory
    return rd.Sequential([rd.Dense(128, activation="relu"), rd.Dense(128, activation="tanh"),
                          rd.Dense(10)], input_shape=(96,))


def _train(client, net, x, y, steps, **kw):
    engine = Engine(net, rd.data_parallel(2), rd.SGD(lr=0.05, momentum=0.9), client, **kw)
    engine.set_params(net.init(0))
    engine.set_data("train", x, y)
    rng = np.random.default_rng(1)
    losses = [engine.value(engine.run("train", rng.permutation(len(x))[:64])["metrics"])
              for _ in range(steps)]
    return engine, losses


def test_the_direct_exchange_trains_alike_through_shared_memory(client):
    """Tiles through shared memory or inside the message, the same bits; and the shared
    memory was used, reused from step to step, and is gone once the engine closes."""
    net = _wide()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 96)).astype(np.float32), rng.integers(0, 10, 256)
    runs = {}
    for flag in (True, False):
        engine, losses = _train(client, net, x, y, 4, exchange="direct", shared_memory=flag)
        boxes = [b for name, b in Mailbox._here.items() if engine._token in name]
        made = sorted({p for b in boxes for p, _, _ in b.segments.segments})
        # the weight gradients of 64 KiB or more were computed in their segments
        assert all(b.segments._in_place for b in boxes) == flag
        runs[flag] = (losses, engine.get_params(), made)
        engine.close()
        assert not [p for p in made if os.path.exists(p)]
    (on, params_on, made), (off, params_off, none) = runs[True], runs[False]
    assert on == off
    for name, value in params_off.items():
        np.testing.assert_array_equal(params_on[name], value, err_msg=name)
    # a fixed set, not one per step: per worker the step's five tiles of at least
    # BELL_MIN_BYTES (three weight gradients, two biases), the block of rows of weights the
    # second replica sent before it took up the first's copy (see
    # test_replicas_of_a_weight_on_one_machine_share_one_copy), and one more where a tile
    # came back to be posted before its segment was free
    assert 0 < len(made) <= 2 * 7 and none == []


def _kept_block(value, path):
    from rapydli.graph.ops import pick

    tile = shared.kept_tile(pick(value, path))
    return None if tile is None else (tile.path, tile.offset, tile.shape)


def test_replicas_of_a_weight_on_one_machine_share_one_copy(client):
    """A sharded update (data parallel, a weight of at least SHARD_MIN_BYTES) between workers
    that share memory: after a step or two every replica's weight is one array in shared
    memory; the bits are those of every tile inside its message, and of the graph exchange,
    whose replicas each update the whole weight, optimizer state included. The smaller
    weights keep a copy each."""
    net = _wide()  # 1.weight: 128 x 128 float32, 64 KiB, the one sharded
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 96)).astype(np.float32), rng.integers(0, 10, 256)
    runs = {}
    for name, exchange, flag in (("shared", "direct", True), ("message", "direct", False),
                                 ("whole", "graph", True)):
        engine, losses = _train(client, net, x, y, 5, exchange=exchange, shared_memory=flag)
        assert engine.exchange == exchange
        blocks = {}
        for key, bound in engine.resident.items():
            info = engine.resident_info[key]
            if info[0] == "param":
                blocks.setdefault(info[1], []).append(client.submit(
                    _kept_block, bound.value, bound.path, pure=False,
                    workers=[engine.workers[info[3]]]).result())
        runs[name] = (losses, engine.get_params(), engine.get_opt_state(), blocks)
        engine.close()
    kept = runs["shared"][3]
    (first, second) = kept.pop("1.weight")
    assert first == second and first[1:] == (0, (128, 128))  # one file, the whole weight
    assert all(b is None for bs in kept.values() for b in bs)
    assert all(b is None for run in ("message", "whole") for bs in runs[run][3].values()
               for b in bs)
    losses, params, state, _ = runs["whole"]
    assert state["velocity/1.weight"].shape == (128, 128)
    for run in ("shared", "message"):
        assert runs[run][0] == losses and runs[run][2].keys() == state.keys()
        for name, value in [*params.items(), *state.items()]:
            got = runs[run][1].get(name, runs[run][2].get(name))
            np.testing.assert_array_equal(got, value, err_msg=f"{run}: {name}")
    assert not os.path.exists(first[0])  # deleted with the engine


def test_a_kept_array_and_blocks_of_rows_are_posted_without_a_copy(pool):
    """As a doorbell message packs them (down to BELL_MIN_BYTES)."""
    segments, mappings = pool
    BELL = shared.BELL_MIN_BYTES
    weight = _big()
    kept = segments.keep(weight)
    np.testing.assert_array_equal(kept, weight)
    n = len(segments.segments)
    tile = segments.pack(kept[32:96], BELL)  # a block of rows: a handle into the same file
    assert not tile.held and tile.offset == 32 * 160 * 4 and len(segments.segments) == n
    block = mappings.open(tile)  # in this process: the very memory of the kept array
    assert block.ctypes.data == kept[32:96].ctypes.data
    common = shared.whole(block, (128, 160), np.float32)
    assert common.ctypes.data == kept.ctypes.data
    assert shared.whole(block, (64, 160), np.float32) is None  # not the file's shape
    assert shared.whole(_big(), (128, 160), np.float32) is None  # not in a kept file
    assert segments.pack(kept[:, :8], min_bytes=0).path != tile.path  # columns: a copy
    # a gradient computed in its segment: its first block of rows goes as a handle, a
    # second block (to another peer) as a copy
    grad = segments.allocate((128, 160), np.float32)
    grad[...] = _big(1)
    lower, upper = segments.pack(grad[64:], BELL), segments.pack(grad[:64], BELL)
    assert lower.held and lower.offset == 64 * 160 * 4
    assert upper.path != lower.path and upper.offset == 0
    np.testing.assert_array_equal(mappings.open(lower), _big(1)[64:])
    del block, common
    gc.collect()
    assert os.path.exists(tile.path) and shared._KEPT.get(tile.path) is not None
    del kept  # the kept array goes: so does its file
    gc.collect()
    assert not os.path.exists(tile.path) and shared._KEPT.get(tile.path) is None
    assert shared.kept_tile(np.zeros(1)) is None


def _take(exchange: Exchange, key: str):
    return exchange.take(key)


def _post(exchange: Exchange, key: str, value):
    exchange.post(key, value, (0,))
    exchange.finish()


def _put_late(name: str, tile: SharedTile) -> None:
    import asyncio

    asyncio.run(Mailbox.here(name).put([(("s", "late"), tile)]))


def test_a_failed_step_frees_the_shared_tiles_it_left(client):
    workers = sorted(client.scheduler_info()["workers"])[:2]
    futures, boxes = start_mailboxes(client, workers, f"t{time.monotonic_ns()}")
    try:
        sender = Mailbox.here(boxes[1][2])
        receiver = Mailbox.here(boxes[0][2])
        client.submit(_post, Exchange("s", 1, boxes), "k", _big(), workers=[workers[1]]).result()
        assert receiver.items == {}  # rung at the doorbell: read by the next take, or forget
        assert sender.segments.segments[0][1][0] == 1  # taken until the tile is read
        receiver.forget("s")  # the step failed: nobody will take it
        assert sender.segments.segments[0][1][0] == 0
        # a tile of the failed step arriving later, by message, is freed as it comes
        tile = sender.segments.pack(_big(1))
        (flag,) = [m for path, m, _ in sender.segments.segments if path == tile.path]
        assert flag[0] == 1
        client.submit(_put_late, boxes[0][2], tile, workers=[workers[0]]).result()
        assert receiver.items == {} and flag[0] == 0
    finally:
        close_mailboxes(futures)


def test_a_closing_mailbox_deletes_what_a_killed_peer_left():
    dead, alive = _name("dead"), _name("alive")
    leftovers = Segments(dead)
    tile = leftovers.pack(_big())  # a worker that made a segment, then was killed
    assert make_probe(dead)
    box = Mailbox(alive)
    box.close(peers=(alive, dead))
    assert not [p for p in (tile.path, probe_path(dead), probe_path(alive)) if os.path.exists(p)]


def _held_back(exchange: Exchange, posts) -> list[int]:
    """Post ``(key, value, to_sum)`` one at a time, flushing between ops as a task does;
    returns how many tiles wait in the outbox after each."""
    held = []
    for key, value, to_sum in posts:
        exchange.post(key, value, (0,), to_sum)
        exchange.flush(urgent_only=True)
        held.append(sum(len(items) for items in exchange._outbox.values()))
    exchange.finish()  # the rest leaves at the end of the task, or at its next take
    assert not exchange._outbox
    return held


@pytest.mark.parametrize("shared_memory", [True, False])
def test_tiles_only_sums_read_wait_for_the_next_message(client, shared_memory):
    """Between ops, tiles only sums read stay queued while they would cost only a message
    (shared memory, or small); a tile a peer may be waiting for sends them all at once, and
    so does a large one that travels inside the message."""
    workers = sorted(client.scheduler_info()["workers"])[:2]
    futures, boxes = start_mailboxes(client, workers, f"t{time.monotonic_ns()}")
    try:
        small = np.ones(8, np.float32)
        posts = [("a", _big(), True), ("b", small, True), ("c", small, False),
                 ("d", _big(1), True)]
        held = client.submit(_held_back, Exchange("s", 1, boxes, shared=shared_memory), posts,
                             workers=[workers[1]]).result(timeout=30)
        # a large tile for a sum goes at once by message; through shared memory it waits
        assert held == ([1, 2, 0, 1] if shared_memory else [0, 1, 0, 0])
        taken = Mailbox.here(boxes[0][2])
        got = {k: taken.take(("s", k), timeout=5) for k in "abcd"}  # all four arrived
        np.testing.assert_array_equal(got["d"], _big(1))
        np.testing.assert_array_equal(got["c"], small)
        assert taken.items == {}
    finally:
        close_mailboxes(futures)


@pytest.mark.slow
def test_worker_processes_share_memory_and_leave_none_behind(process_client):
    """Two worker processes: gradients travel through segments mapped by both, the weight
    updated sharded is one copy both compute with, training is bitwise what it is with every
    tile inside its message, and closing the engine deletes every file it made."""
    net = _wide()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 96)).astype(np.float32), rng.integers(0, 10, 256)
    before = set(os.listdir(shared.SHM_DIR))
    runs = {}
    for flag in (True, False):
        engine, losses = _train(process_client, net, x, y, 4, exchange="direct",
                                shared_memory=flag)

        def held(token=engine._token):
            return sorted(p for name, b in Mailbox._here.items() if token in name
                          for p, _, _ in b.segments.segments)

        made = [p for paths in process_client.run(held).values() for p in paths]
        kept = [process_client.submit(_kept_block, bound.value, bound.path, pure=False,
                                      workers=[engine.workers[info[3]]]).result()
                for key, bound in engine.resident.items()
                if (info := engine.resident_info[key])[:2] == ("param", "1.weight")]
        runs[flag] = (losses, engine.get_params(), made)
        engine.close()
        # the sharded weight: one copy in shared memory for both processes, or one each
        assert len(kept) == 2 and (kept[0] == kept[1] is not None if flag else kept == [None] * 2)
    (on, params_on, made), (off, params_off, none) = runs[True], runs[False]
    assert made and none == []
    assert on == off
    for name, value in params_off.items():
        np.testing.assert_array_equal(params_on[name], value, err_msg=name)
    time.sleep(0.5)  # the close calls return before the last files go
    assert set(os.listdir(shared.SHM_DIR)) - before == set()


# --- the doorbell: messages between workers of one machine, without the event loops ----------


@pytest.fixture
def bell():
    name = _name("bell")
    ring = Bell.open(name)
    assert ring is not None and os.path.exists(bell_path(name))
    yield name, ring
    os.unlink(bell_path(name))


def test_a_doorbell_carries_each_message_whole_and_in_order(bell):
    name, ring = bell
    sender = Segments(_name("sender"))
    try:
        messages = [[(("s", f"k{i}"), np.full(i, i, np.float32))] for i in range(5)]
        assert all(sender.ring(name, m) for m in messages)
        got = ring.wait(1.0)
        assert [k for (m,) in got for k in [m[0]]] == [k for (m,) in messages for k in [m[0]]]
        np.testing.assert_array_equal(got[4][0][1], messages[4][0][1])
        start = time.monotonic()
        assert ring.wait(0.05) == [] and time.monotonic() - start >= 0.04  # nothing rang
        ring.wake()
        assert ring.wait(5.0) == []  # woken at once, with no message
        # what does not fit a record, or has nowhere to go, is refused (it goes by actor)
        assert not sender.ring(name, np.zeros(shared.RECORD_BYTES, np.uint8))
        assert not sender.ring(_name("nobody"), "x")
    finally:
        sender.close()
    assert not sender.ring(name, "x")  # closed: nothing more leaves


def test_a_full_doorbell_refuses_and_every_record_sent_is_read(bell):
    name, ring = bell
    sender = Segments(_name("sender"))
    try:
        sent = 0
        while sender.ring(name, b"x" * 3000):  # a pipe holds 64 KiB: about 21 of these
            sent += 1
            assert sent < 1000
        assert sent >= 1
        got = []
        while len(got) < sent:
            got += ring.wait(1.0)
        assert got == [b"x" * 3000] * sent
        assert sender.ring(name, "again")  # read: room again
        assert ring.wait(1.0) == ["again"]
    finally:
        sender.close()


def test_a_doorbell_whose_mailbox_went_is_refused(bell):
    name, ring = bell
    sender = Segments(_name("sender"))
    try:
        assert sender.ring(name, "first")
        os.close(ring.fd)  # the receiving process is gone: the pipe has no reader
        ring._close.detach()
        assert not sender.ring(name, "second")  # EPIPE: not sent, not raised
    finally:
        sender.close()


def _take_in_thread(box: Mailbox, key, timeout=5.0):
    import threading

    out = {}

    def run():
        try:
            out["value"] = box.take(key, timeout)
        except Exception as exc:  # the test looks at it
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_take_waiting_at_the_doorbell_wakes_for_a_message_by_actor_and_for_close():
    import asyncio

    from rapydli.scheduler.mailbox import ExchangeError

    box = Mailbox(_name("box"))
    try:
        assert box.bell is not None
        thread, out = _take_in_thread(box, ("s", "k"))
        time.sleep(0.1)  # the take is in the doorbell's select
        asyncio.run(box.put([(("s", "k"), np.arange(3.0))]))  # a peer on another machine
        thread.join(5.0)
        np.testing.assert_array_equal(out["value"], np.arange(3.0))
        sender = Segments(_name("peer"))
        try:  # and the same take by doorbell
            thread, out = _take_in_thread(box, ("s", "r"))
            time.sleep(0.1)
            assert sender.ring(box.name, [(("s", "r"), np.ones(2))])
            thread.join(5.0)
            np.testing.assert_array_equal(out["value"], np.ones(2))
        finally:
            sender.close()
        thread, out = _take_in_thread(box, ("s", "never"))
        time.sleep(0.1)
        start = time.monotonic()
        box.close()
        thread.join(5.0)
        assert isinstance(out.get("error"), ExchangeError) and time.monotonic() - start < 2
    finally:
        box.close()
    assert not os.path.exists(bell_path(box.name))


def test_steps_between_workers_of_one_machine_ring_instead_of_calling_the_actor(
        client, monkeypatch):
    """With shared memory every message of a data-parallel step goes through the doorbell
    (no actor call); without it, every one is an actor call."""
    from rapydli.scheduler import mailbox

    calls = []
    real = mailbox._proxy
    monkeypatch.setattr(mailbox, "_proxy", lambda box: calls.append(box) or real(box))
    net = _wide()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 96)).astype(np.float32), rng.integers(0, 10, 256)
    counts = {}
    for flag in (True, False):
        calls.clear()
        engine, _ = _train(client, net, x, y, 3, exchange="direct", shared_memory=flag)
        engine.close()
        counts[flag] = len(calls)
    assert counts[True] == 0 and counts[False] >= 3 * 2


def test_messages_the_doorbell_refuses_go_by_actor_with_the_same_numbers(client, monkeypatch):
    """Every other doorbell record refused (a full pipe, a record too long): those messages
    go by actor call, a take waiting at the doorbell wakes for them, and the training is bit
    for bit the one where every message rang."""
    net = _wide()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 96)).astype(np.float32), rng.integers(0, 10, 256)
    engine, rung = _train(client, net, x, y, 4, exchange="direct")
    params = engine.get_params()
    engine.close()
    real, calls = Segments.ring, []

    def ring(self, name, message):
        calls.append(name)
        return len(calls) % 2 == 0 and real(self, name, message)

    monkeypatch.setattr(Segments, "ring", ring)
    engine, mixed = _train(client, net, x, y, 4, exchange="direct")
    assert len(calls) >= 4 and mixed == rung
    for name, value in engine.get_params().items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
    engine.close()
