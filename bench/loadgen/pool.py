"""Load worker processes and the synchronous coordinator that drives them in lock step.

Theory of operation
-------------------
One Python process with uvloop saturates at roughly one core of protocol
work, so a scenario's clients can be spread over ``count`` forked worker
processes. Each worker gets a ``ScenarioWorker`` built in the child by
``factory(index, count)`` (the worker takes the share of clients whose
number is congruent to ``index``), runs it on its own uvloop loop, and
serves commands read from a pipe: ``handle(command)`` returns a result that
goes back up the pipe; ``Stop`` ends it (``close`` first).

The coordinator (``WorkerPool``) is plain synchronous code: ``call`` sends a
command to every worker and waits, bounded by a deadline, for every result;
an exception in a worker comes back as ``WorkerFailure`` with its traceback
and is raised here. Phases therefore run in lock step (all connected, then
all go at a common ``start_ns`` on the host-wide monotonic clock), and the
coordinator can read the server's RSS/CPU between phases.

Processes are forked (cheap, nothing to re-import). The coordinator never
runs an event loop, so forking is safe. Commands and results are pickled
msgspec Structs; histograms travel encoded (see ``histogram``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Final, Protocol

import msgspec
import uvloop

STOP_TIMEOUT_S: Final = 10.0
"""Time a worker has to close its clients after Stop before it is killed."""
START_DELAY_S: Final = 0.3
"""Lead time between a go command and its common start instant."""


class ScenarioWorker(Protocol):
    async def handle(self, command: object) -> object: ...

    async def close(self) -> None: ...


class Stop(msgspec.Struct, frozen=True):
    pass


class WorkerFailure(msgspec.Struct, frozen=True):
    index: int
    error: str


class PoolError(RuntimeError):
    """A worker failed, died or missed a deadline."""


WorkerFactory = Callable[[int, int], ScenarioWorker]


def start_at(delay_s: float = START_DELAY_S) -> int:
    """A common start instant, ``delay_s`` from now, on the monotonic clock (ns)."""
    return time.monotonic_ns() + int(delay_s * 1e9)


async def sleep_until(when_ns: int) -> None:
    delay = (when_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


async def _serve(worker_factory: WorkerFactory, index: int, count: int, pipe: Connection) -> None:
    worker = worker_factory(index, count)
    try:
        while True:
            command = await asyncio.to_thread(pipe.recv)
            if isinstance(command, Stop):
                break
            try:
                result = await worker.handle(command)
            except Exception:
                result = WorkerFailure(index, traceback.format_exc())
            pipe.send(result)
    except EOFError:  # the coordinator is gone
        pass
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.close(), STOP_TIMEOUT_S / 2)


def _child(worker_factory: WorkerFactory, index: int, count: int, pipe: Connection) -> None:
    uvloop.run(_serve(worker_factory, index, count, pipe))


class WorkerPool:
    """``count`` forked workers; use as a context manager."""

    def __init__(self, factory: WorkerFactory, count: int) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        context = multiprocessing.get_context("fork")
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=_child,
                args=(factory, index, count, child),
                daemon=True,
                name=f"loadgen-worker-{index}",
            )
            process.start()
            child.close()
            self._pipes.append(parent)
            self._processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, command: object, timeout_s: float) -> list[object]:
        """Send ``command`` to every worker; their results, in worker order."""
        return self.call_each([command] * len(self._pipes), timeout_s)

    def call_each(self, commands: Sequence[object], timeout_s: float) -> list[object]:
        """Send ``commands[i]`` to worker i; their results, in worker order."""
        for pipe, command in zip(self._pipes, commands, strict=True):
            pipe.send(command)
        deadline = time.monotonic() + timeout_s
        results: list[object] = []
        for index, pipe in enumerate(self._pipes):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not pipe.poll(remaining):
                raise PoolError(f"worker {index} missed the {timeout_s:.0f} s deadline")
            try:
                result = pipe.recv()
            except EOFError:
                raise PoolError(f"worker {index} died") from None
            if isinstance(result, WorkerFailure):
                raise PoolError(f"worker {result.index} failed:\n{result.error}")
            results.append(result)
        return results

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(Stop())
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1)
        for pipe in self._pipes:
            pipe.close()
