"""Wiring of one server process: store -> shards/actors -> hub -> gateway.

Theory of operation
-------------------
``Server.serve`` opens everything in dependency order inside one nursery
tree and tears it down in reverse:

    root nursery
      store (committer)          -- last to stop: flushes every pending write
      shards (actors)            -- stop after the gateway has drained
      retention sweep
      connections nursery
        listener                 -- first to stop on drain
        one task per connection

``stop()`` (SIGTERM, SIGINT) drains: stop accepting, refuse new requests
with ``unavailable``, wait (bounded) for queued commands and in-flight
requests to be answered, close every connection with 1001, then stop the
actors and let the store commit what it holds. Nothing acknowledged is ever
lost because acknowledgements are sent only after commits.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from protocol import CloseCode

from .auth import ShopKeys, TokenVerifier
from .dispatch import WorkerDispatcher
from .fanout import Hub
from .gateway._readmux import ReadMux
from .gateway._session import GatewayContext, Session
from .gateway._websocket import HandshakeFailed, HttpResponse, Outbox, accept
from .limits import (
    CLOSE_LINGER_S,
    CLOSE_SEND_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    HANDSHAKE_TIMEOUT_S,
    IDLE_TIMEOUT_MS,
    MAX_CONNECTIONS,
    OUTBOUND_BUFFER_BYTES,
    RETENTION_DAYS,
    RETENTION_SWEEP_S,
    SESSION_SWEEP_S,
    SHARD_COUNT,
    TOKEN_REPLAY_CACHE,
    WORKER_EVENT_RETENTION_MS,
)
from .logs import event, now_ms
from .metrics import METRICS
from .shards import LocalShards
from .store import SqliteStore

log = logging.getLogger("imserver.server")

DB_FILE = "imserver.db"
SECRET_FILE = "secret"
JWKS_DIR = "jwks"  # SHOP.json: the public keys shop SHOP's backend signs tokens with


def _is_url(where: str) -> bool:
    return where.startswith(("http://", "https://"))


def load_or_create_secret(data_dir: Path) -> bytes:
    """The token secret kept beside the database (created 0600 on first use)."""
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    path.touch(mode=0o600)
    path.write_bytes(secret)
    return secret


@dataclass
class ServerConfig:
    data_dir: Path
    secret: bytes
    host: str = "127.0.0.1"
    port: int = 8080
    cert: Path | None = None
    key: Path | None = None
    retention_days: int = RETENTION_DAYS
    synchronous: str = "FULL"
    shards: int = SHARD_COUNT
    idle_timeout_ms: int = IDLE_TIMEOUT_MS
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    outbound_buffer_bytes: int = OUTBOUND_BUFFER_BYTES
    close_send_timeout_s: float = CLOSE_SEND_TIMEOUT_S
    close_linger_s: float = CLOSE_LINGER_S
    shops: tuple[str, ...] = ()
    """Shops registered at start (more with ``imserver shop add``)."""
    extra: dict[str, str] = field(default_factory=dict)
    jwks: dict[str, str] = field(default_factory=dict)
    """shop -> its JWKS: a file path or an http(s) URL (besides DATA/jwks/SHOP.json)."""


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port = 0
        self.url = ""
        self._stop = trio.Event()
        self._ssl: ssl.SSLContext | None = None
        if config.cert and config.key:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(config.cert, config.key)
        self._shop_keys = ShopKeys(
            {shop: Path(where) for shop, where in config.jwks.items() if not _is_url(where)},
            config.data_dir / JWKS_DIR,
            urls={shop: where for shop, where in config.jwks.items() if _is_url(where)},
        )
        self.ctx: GatewayContext | None = None
        self.shards: LocalShards | None = None
        self.store: SqliteStore | None = None
        self.dispatcher: WorkerDispatcher | None = None

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        store = SqliteStore(
            config.data_dir / DB_FILE, synchronous=config.synchronous, on_commit=METRICS.on_commit
        )
        self.store = store
        async with trio.open_nursery() as root:
            await root.start(store.run)
            hub = Hub()
            dispatcher = WorkerDispatcher(store, shard_count=config.shards)
            self.dispatcher = dispatcher
            shards = LocalShards(store, hub, dispatcher, count=config.shards)
            self.shards = shards
            shards_scope = trio.CancelScope()
            root.start_soon(self._run_in_scope, shards_scope, shards.run)
            await root.start(dispatcher.run)
            ctx = GatewayContext(
                store=store,
                shards=shards,
                hub=hub,
                dispatcher=dispatcher,
                verifier=TokenVerifier(config.secret, shop_keys=self._shop_keys),
                idle_timeout_ms=config.idle_timeout_ms,
                handshake_timeout_s=config.handshake_timeout_s,
                outbound_buffer_bytes=config.outbound_buffer_bytes,
                close_send_timeout_s=config.close_send_timeout_s,
                close_linger_s=config.close_linger_s,
                read_mux=(read_mux := ReadMux()),
            )
            self.ctx = ctx
            await ctx.register_shops(list(config.shops))
            root.start_soon(read_mux.run)
            root.start_soon(self._shop_keys.run)  # shops' JWKS URLs, if any
            # Single-use tokens used before a restart stay refused.
            for jti, exp in reversed(await store.used_tokens(int(time.time()), TOKEN_REPLAY_CACHE)):
                ctx.verifier.remember_used(jti, exp)
            root.start_soon(self._retention_sweep, store)
            root.start_soon(self._sweep_sessions, ctx)
            async with trio.open_nursery() as connections:
                listen_scope = trio.CancelScope()
                listeners = await connections.start(self._listen, listen_scope, connections)
                sockname = listeners[0].socket.getsockname()
                self.port = sockname[1]
                scheme = "wss" if self._ssl else "ws"
                self.url = f"{scheme}://{config.host}:{self.port}/ws"
                event(log, "listening", url=self.url)
                task_status.started(self.url)
                await self._stop.wait()
                await self._drain(ctx, shards, listen_scope, connections)
            shards_scope.cancel()
            root.cancel_scope.cancel()  # retention sweep; the store flushes on its way out

    async def _run_in_scope(
        self, scope: trio.CancelScope, fn: Callable[[], Awaitable[object]]
    ) -> None:
        with scope:
            await fn()

    async def _listen(
        self,
        scope: trio.CancelScope,
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]],
    ) -> None:
        with scope:
            await trio.serve_tcp(
                self._handle,
                self.config.port,
                host=self.config.host,
                handler_nursery=connections,
                task_status=task_status,
            )

    async def _drain(
        self,
        ctx: GatewayContext,
        shards: LocalShards,
        listen_scope: trio.CancelScope,
        connections: trio.Nursery,
    ) -> None:
        event(log, "draining", sessions=len(ctx.sessions))
        listen_scope.cancel()
        ctx.draining = True
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            await shards.drain()
            for session in list(ctx.sessions):
                await session.wait_quiet()
        for session in list(ctx.sessions):
            session.close(CloseCode.GOING_AWAY, "server shutting down")
        # Sessions finish their close handshakes on their own; stragglers are cut off.
        connections.cancel_scope.deadline = (
            trio.current_time() + ctx.close_send_timeout_s + ctx.close_linger_s + 1
        )

    async def _handle(self, stream: trio.abc.Stream) -> None:
        METRICS.connections_total.inc()
        ctx = self.ctx
        assert ctx is not None
        try:
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_side=True)
            with trio.fail_after(ctx.handshake_timeout_s):
                accepted = await accept(
                    stream,
                    self._http,
                    can_accept=not ctx.draining and len(ctx.sessions) < MAX_CONNECTIONS,
                )
                if accepted is None:
                    return
                await stream.send_all(accepted.response)
            ws = accepted.ws
            session = Session(
                ctx,
                stream,
                ws,
                Outbox(stream, ws, max_bytes=ctx.outbound_buffer_bytes),
                early=accepted.early,
            )
            ctx.sessions.add(session)
            await session.run()
        except (
            HandshakeFailed,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ssl.SSLError,
        ):
            pass
        except Exception as exc:  # one connection's bug never takes the server down
            event(log, "connection_failed", level=logging.ERROR, error=repr(exc))
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _http(self, target: str) -> HttpResponse | None:
        path = target.split("?", 1)[0]
        if path == "/metrics":
            if self.store is not None:
                METRICS.store_pending.set(self.store.pending_ops)
            if self.shards is not None:
                for index in range(self.shards.count):
                    METRICS.shard_depth.labels(shard=str(index)).set(self.shards.depth(index))
            return 200, "text/plain; version=0.0.4", METRICS.render()
        if path == "/healthz":
            if self.ctx is not None and self.ctx.draining:
                return 503, "text/plain", b"draining\n"
            return 200, "text/plain", b"ok\n"
        return None

    @staticmethod
    async def _sweep_sessions(ctx: GatewayContext) -> None:
        while True:
            await trio.sleep(SESSION_SWEEP_S)
            now = trio.current_time()
            for session in list(ctx.sessions):
                session.check(now)

    async def _retention_sweep(self, store: SqliteStore) -> None:
        while True:
            cutoff = now_ms() - self.config.retention_days * 86_400_000
            try:
                removed = await store.prune(cutoff)
                events = await store.prune_events(now_ms() - WORKER_EVENT_RETENTION_MS)
                await store.prune_used_tokens(int(time.time()))
                if removed or events:
                    event(log, "retention", removed=removed, worker_events=events)
            except Exception as exc:
                event(log, "retention_failed", level=logging.ERROR, error=repr(exc))
            await trio.sleep(RETENTION_SWEEP_S)
