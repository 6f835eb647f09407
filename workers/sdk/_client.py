"""The asyncio flavour of the client: one WebSocket connection speaking the protocol.

Used by worker processes (and load generators) under asyncio + uvloop. The
WebSocket layer is the ``websockets`` library; frames are the ``protocol``
package's. Replies are matched to requests by id; everything else is an
event handed to ``on_event``. Heartbeats follow the interval the server
announces in Welcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed as WsClosed

from protocol import (
    MAX_SERVER_FRAME_BYTES,
    PROTOCOL_VERSION,
    ClientConnection,
    Error,
    Hello,
    Ping,
    Reply,
    ServerFrameType,
    Welcome,
)

REQUEST_TIMEOUT_S = 30.0

EventHandler = Callable[[ServerFrameType], Awaitable[None] | None]


class RequestFailed(Exception):
    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.code = error.code


class Disconnected(Exception):
    pass


class AsyncClient:
    """Connect with ``await AsyncClient.connect(...)``; ``await client.closed`` to wait."""

    def __init__(
        self, ws: WsConnection, conn: ClientConnection, welcome: Welcome, on_event: EventHandler
    ) -> None:
        self._ws = ws
        self._conn = conn
        self.welcome = welcome
        self._on_event = on_event
        self._waiting: dict[int, asyncio.Future[ServerFrameType]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str,
        *,
        device: str,
        on_event: EventHandler,
        resume: dict[str, int] | None = None,
    ) -> AsyncClient:
        ws = await ws_connect(
            url,
            max_size=MAX_SERVER_FRAME_BYTES,
            compression=None,
            ping_interval=None,
            open_timeout=10,
        )
        conn = ClientConnection()
        await ws.send(
            conn.hello(
                Hello(
                    v=PROTOCOL_VERSION,
                    token=token,
                    device=device,
                    resume=resume or {},
                    agent="imserver-worker/0.1",
                )
            )
        )
        first = conn.receive(await asyncio.wait_for(ws.recv(decode=False), 10))
        if isinstance(first, Error):
            await ws.close()
            raise RequestFailed(first)
        assert isinstance(first, Welcome)
        client = cls(ws, conn, first, on_event)
        client._tasks = [
            asyncio.create_task(client._reader()),
            asyncio.create_task(client._heartbeat()),
        ]
        return client

    async def request(self, frame: Any) -> Any:
        frame = msgspec.structs.replace(frame, id=self._conn.next_request_id())
        future: asyncio.Future[ServerFrameType] = asyncio.get_running_loop().create_future()
        self._waiting[frame.id] = future
        try:
            try:
                await self._ws.send(self._conn.send(frame))
            except WsClosed as exc:
                raise Disconnected(str(exc)) from None
            reply = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        finally:
            self._waiting.pop(frame.id, None)
        if isinstance(reply, Error):
            raise RequestFailed(reply)
        return reply

    async def notify(self, frame: msgspec.Struct) -> None:
        try:
            await self._ws.send(self._conn.send(frame))
        except WsClosed as exc:
            raise Disconnected(str(exc)) from None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._ws.close()
        self._finish(None)

    def _finish(self, code: int | None) -> None:
        if not self.closed.done():
            self.closed.set_result(code)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(Disconnected(f"connection closed ({code})"))

    async def _reader(self) -> None:
        try:
            async for data in self._ws:
                if isinstance(data, str):
                    continue
                frame = self._conn.receive(data)
                if isinstance(frame, Reply | Error) and frame.id is not None:
                    future = self._waiting.get(frame.id)
                    if future is not None and not future.done():
                        future.set_result(frame)
                        continue
                result = self._on_event(frame)
                if result is not None:
                    await result
        except WsClosed:
            pass
        finally:
            code = self._ws.close_code
            self._finish(code)

    async def _heartbeat(self) -> None:
        interval = self.welcome.heartbeat_ms / 1000
        with contextlib.suppress(Disconnected, RequestFailed, asyncio.TimeoutError):
            while True:
                await asyncio.sleep(interval)
                await self.request(Ping(id=0))
