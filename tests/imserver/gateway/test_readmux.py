"""The read multiplexer: level-triggered, fair, and a failing callback stays local."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator

import pytest
import trio

from imserver.gateway._readmux import ReadMux


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(3)]
    for a, b in made:
        a.setblocking(False)
        b.setblocking(False)
    yield made
    for a, b in made:
        a.close()
        b.close()


async def test_level_triggered_reads_until_drained_and_others_are_served(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    mux = ReadMux()
    got: dict[int, bytearray] = {i: bytearray() for i in range(len(pairs))}
    calls = {i: 0 for i in range(len(pairs))}
    done = trio.Event()

    def reader(i: int, sock: socket.socket) -> None:
        calls[i] += 1
        got[i] += os.read(sock.fileno(), 3)  # less than what is waiting: called again
        if all(len(g) == 9 for g in got.values()):
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mux.run)
        for i, (_, ours) in enumerate(pairs):
            mux.add(ours.fileno(), functools.partial(reader, i, ours))
        for i, (theirs, _) in enumerate(pairs):
            theirs.send(b"%d" % i * 9)
        with trio.fail_after(5):
            await done.wait()
        assert {i: bytes(g) for i, g in got.items()} == {i: b"%d" % i * 9 for i in got}
        assert all(n >= 3 for n in calls.values())  # one read of 3 bytes per round each
        for _, ours in pairs:
            mux.remove(ours.fileno())
            mux.remove(ours.fileno())  # idempotent
        assert len(mux) == 0
        nursery.cancel_scope.cancel()


async def test_a_failing_callback_is_removed_and_the_others_go_on(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    mux = ReadMux()
    (bad_theirs, bad), (good_theirs, good) = pairs[0], pairs[1]
    received = trio.Event()
    exploded = trio.Event()

    def explode() -> None:
        exploded.set()
        raise RuntimeError("a bug in one connection's code")

    def fine() -> None:
        if os.read(good.fileno(), 100) == b"after":
            received.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mux.run)
        mux.add(bad.fileno(), explode)
        mux.add(good.fileno(), fine)
        bad_theirs.send(b"boom")
        with trio.fail_after(5):
            await exploded.wait()  # we run again only once the mux task has yielded
        assert len(mux) == 1  # the failing one is gone
        good_theirs.send(b"after")
        with trio.fail_after(5):
            await received.wait()
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.ClosedResourceError):
        mux.add(good.fileno(), fine)
