"""Locust load test for imserver's binary WebSocket protocol (also runs against the baselines).

Usage::

    IMSERVER_SECRET=<server secret> locust -f bench/locustfile.py --headless \\
        -u 50 -r 10 -t 60s --host ws://127.0.0.1:PORT/ws

Theory of operation
-------------------
One locust user is one 1:1 *pair*: a customer and an agent of a shop (two
WebSocket connections), set up as imserver's contract says (customer
``OpenConversation``, agent ``UpdateConversation(state=assigned, agent=me)``).
Each execution of the ``chat`` task sends one message from each side;
``wait_time`` paces it at ``IMSERVER_BENCH_RATE`` executions per second
(default 2: each connection sends 2 msg/s, far under the 50/s per-person
limit). The payload is the load generator's stamped 200-char text
(``bench.loadgen.payload``) carrying the send time on the monotonic clock,
so the receiving side reports, per delivered message, a request event
``WS send->delivery`` with the end-to-end latency; the sender reports
``WS send->Sent`` when the server acknowledges. Setup failures are reported
as failed ``connect``/``open``/``assign`` requests.

Locust runs on gevent, so the client is synchronous: ``websocket-client``
(pure Python sockets, cooperative once gevent has patched them; its sends
are serialised by a lock with ``enable_multithread``) with one reader
greenlet per connection. ``websockets.sync`` was not used: it runs a
background *thread* per connection, which under monkey patching becomes a
greenlet anyway, with more machinery for nothing.

The send time comes from the monotonic clock of the process that sent, and
is read by the same process: run locust on the server's host, without
``--processes``/distributed workers splitting a pair (pairs never split).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

import gevent  # type: ignore[import-untyped]
import websocket
from gevent.event import AsyncResult  # type: ignore[import-untyped]
from locust import User, constant_throughput, task
from locust.env import Environment

from bench.loadgen.payload import make_text, parse_text
from imserver.auth import mint_token
from protocol import (
    PROTOCOL_VERSION,
    ClientConnection,
    ConversationInfo,
    ConvState,
    Error,
    Hello,
    MessageEvent,
    OpenConversation,
    ProtocolError,
    Request,
    Role,
    Send,
    Sent,
    ServerFrameType,
    TextBody,
    UpdateConversation,
    Welcome,
    encode,
)

SECRET_ENV: Final = "IMSERVER_SECRET"
RATE_ENV: Final = "IMSERVER_BENCH_RATE"
DEFAULT_RATE: Final = 2.0
"""Messages/s per connection (both sides send once per task execution)."""
SHOPS: Final = 10
CONNECT_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 10.0
REQUEST_TYPE: Final = "WS"
RUN_TAG: Final = f"lc{secrets.token_hex(3)}"
_pair_numbers = itertools.count()


def _secret() -> bytes:
    value = os.environ.get(SECRET_ENV, "")
    if not value:
        raise RuntimeError(
            f"set {SECRET_ENV} to the server's token secret (any value for the "
            "baseline relays, which do not verify tokens)"
        )
    return value.encode()


class SyncImClient:
    """One protocol session over websocket-client, with a reader greenlet."""

    def __init__(
        self,
        url: str,
        user: str,
        role: Role,
        shop: str,
        secret: bytes,
        on_frame: Callable[[SyncImClient, ServerFrameType, int], None],
    ) -> None:
        self.user = user
        self.on_frame = on_frame
        self.conn = ClientConnection()
        self.pending: dict[int, Any] = {}
        self.ws = websocket.create_connection(
            url,
            timeout=CONNECT_TIMEOUT_S,
            enable_multithread=True,
            suppress_origin=True,
            http_no_proxy=["127.0.0.1", "localhost"],
        )
        token = mint_token(secret, user=user, role=role, shop=shop)
        self.ws.send_binary(
            self.conn.hello(
                Hello(
                    v=PROTOCOL_VERSION,
                    token=token,
                    device=f"{user}-d",
                    agent="imserver-bench-locust/1",
                )
            )
        )
        first = self.ws.recv()
        frame = self.conn.receive(first if isinstance(first, bytes) else first.encode())
        if not isinstance(frame, Welcome):
            self.ws.close()
            raise ConnectionError(f"hello refused: {frame!r}")
        self.ws.settimeout(None)
        self.reader = gevent.spawn(self._read)

    def request(self, make: Callable[[int], Request]) -> ServerFrameType:
        request_id = self.conn.next_request_id()
        result = self.pending[request_id] = AsyncResult()
        self.ws.send_binary(self.conn.send(make(request_id)))
        reply: ServerFrameType = result.get(timeout=REQUEST_TIMEOUT_S)
        if isinstance(reply, Error):
            raise RuntimeError(f"{reply.code}: {reply.message}")
        return reply

    def close(self) -> None:
        self.reader.kill(block=False)
        with contextlib.suppress(OSError, websocket.WebSocketException):
            self.ws.close(timeout=1)

    def _read(self) -> None:
        try:
            while True:
                data = self.ws.recv()
                if not isinstance(data, bytes) or not data:
                    continue
                try:
                    frame = self.conn.receive(data)
                except ProtocolError:
                    continue
                now = time.monotonic_ns()
                request_id = getattr(frame, "id", None)
                waiter = self.pending.pop(request_id, None) if request_id is not None else None
                if waiter is not None:
                    waiter.set(frame)
                else:
                    self.on_frame(self, frame, now)
        except (OSError, websocket.WebSocketException):
            pass


class ImUser(User):
    """One customer/agent pair chatting 1:1 (see the module docstring)."""

    wait_time = constant_throughput(float(os.environ.get(RATE_ENV, DEFAULT_RATE)))

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.sides: list[SyncImClient] = []
        self.conv = ""
        self.acks: dict[tuple[str, int], int] = {}

    def _fire(
        self,
        name: str,
        response_time_ms: float,
        length: int = 0,
        exception: Exception | None = None,
    ) -> None:
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=response_time_ms,
            response_length=length,
            exception=exception,
            context={},
        )

    def _timed(self, name: str, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            self._fire(name, (time.perf_counter() - t0) * 1000, exception=exc)
            raise
        self._fire(name, (time.perf_counter() - t0) * 1000)
        return result

    def on_frame(self, client: SyncImClient, frame: ServerFrameType, now_ns: int) -> None:
        if type(frame) is MessageEvent:
            message = frame.message
            body = message.body
            if message.sender == client.user or type(body) is not TextBody:
                return
            stamp = parse_text(body.text)
            if stamp is not None:
                self._fire("send->delivery", (now_ns - stamp.sent_ns) / 1e6, len(body.text))
        elif type(frame) is Sent:
            sent_ns = self.acks.pop((client.user, frame.id), None)
            if sent_ns is not None:
                self._fire("send->Sent", (now_ns - sent_ns) / 1e6)
        elif (
            isinstance(frame, Error)
            and frame.id is not None
            and self.acks.pop((client.user, frame.id), None) is not None
        ):
            self._fire("send->Sent", 0, exception=RuntimeError(f"{frame.code}: {frame.message}"))

    def on_start(self) -> None:
        secret = _secret()
        number = next(_pair_numbers)
        url = self.host or ""
        shop = f"{RUN_TAG}-shop{number % SHOPS}"
        customer = self._timed(
            "connect",
            lambda: SyncImClient(
                url, f"{RUN_TAG}-c{number}", Role.CUSTOMER, "", secret, self.on_frame
            ),
        )
        self.sides.append(customer)
        agent = self._timed(
            "connect",
            lambda: SyncImClient(
                url, f"{RUN_TAG}-a{number}", Role.AGENT, shop, secret, self.on_frame
            ),
        )
        self.sides.append(agent)
        info = self._timed(
            "open", lambda: customer.request(lambda rid: OpenConversation(id=rid, shop=shop))
        )
        assert isinstance(info, ConversationInfo)
        conv = self.conv = info.conversation.id
        self._timed(
            "assign",
            lambda: agent.request(
                lambda rid: UpdateConversation(
                    id=rid, conv=conv, state=ConvState.ASSIGNED, agent=agent.user
                )
            ),
        )

    @task
    def chat(self) -> None:
        for side in self.sides:
            sent_ns = time.monotonic_ns()
            text = make_text(0, sent_ns)
            n = side.conn.next_request_id()
            self.acks[side.user, n] = sent_ns
            try:
                side.ws.send_binary(
                    encode(
                        Send(
                            id=n, conv=self.conv, cmid=f"{side.user}-{n}", body=TextBody(text=text)
                        )
                    )
                )
            except (OSError, websocket.WebSocketException) as exc:
                self.acks.pop((side.user, n), None)
                self._fire("send", 0, exception=exc)

    def on_stop(self) -> None:
        for side in self.sides:
            side.close()
        self.sides.clear()
