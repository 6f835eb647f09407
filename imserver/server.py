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

import contextlib
import errno
import fcntl
import logging
import os
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
    ACCEPT_BACKOFF_MAX_S,
    ACCEPT_BACKOFF_S,
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
from .store import (
    WRITER_DEAD,
    DatabaseCorrupt,
    SchemaError,
    WatchedSqliteStore,
    prepare_database,
)

log = logging.getLogger("imserver.server")

DB_FILE = "imserver.db"
SECRET_FILE = "secret"
LOCK_FILE = "lock"

_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""accept() failures that mean "out of descriptors or kernel memory": back off."""


class StartupError(Exception):
    """The server cannot start; the message is one line for the operator."""


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data dir (mode 0700: the server's user only) if missing."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


JWKS_DIR = "jwks"  # SHOP.json: the public keys shop SHOP's backend signs tokens with


def _is_url(where: str) -> bool:
    return where.startswith(("http://", "https://"))


def load_or_create_secret(data_dir: Path) -> bytes:
    """The token secret kept beside the database (created 0600 on first use;
    an older, wider file is tightened)."""
    path = data_dir / SECRET_FILE
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        prepare_data_dir(data_dir)
        secret = secrets.token_hex(32).encode()
        # Created with its mode: never readable by others, not even for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secret)
        return secret
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return secret


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's exclusive lock, held while the returned descriptor
    is open (closed on exit, kill -9 included). Two servers on one database
    would fight over every conversation's seqs and both accept a single-use
    token. Raises ``StartupError`` if another process holds it."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise StartupError(f"data directory {data_dir} is in use by another server{by}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_spare() -> int | None:
    """A descriptor kept in reserve to answer one connection when accept() runs out."""
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


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
            try:
                self._ssl.load_cert_chain(config.cert, config.key)
            except (OSError, ssl.SSLError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise StartupError(
                    f"cannot load TLS certificate {config.cert} and key {config.key}: {detail}"
                ) from None
        self._shop_keys = ShopKeys(
            {shop: Path(where) for shop, where in config.jwks.items() if not _is_url(where)},
            config.data_dir / JWKS_DIR,
            urls={shop: where for shop, where in config.jwks.items() if _is_url(where)},
        )
        self.ctx: GatewayContext | None = None
        self.shards: LocalShards | None = None
        self.store: WatchedSqliteStore | None = None
        self.dispatcher: WorkerDispatcher | None = None
        self.worker_health: Callable[[], tuple[bool, bytes]] | None = None
        """Set by ``serve --workers``: (all well, one line per worker) for ``/healthz``."""
        self._root: trio.Nursery | None = None
        self._reviving = False
        self._spare: int | None = None
        """Kept in reserve for ``_serve_one_on_spare``."""
        self._exhausted: tuple[float, int] | None = None
        """(since, failed accepts) while accept() runs out of descriptors."""

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop()`` and drained. Start-up problems the operator must
        fix (data dir in use, corrupt database, address in use) raise
        ``StartupError`` before anything is started."""
        config = self.config
        try:
            verifier = TokenVerifier(config.secret, shop_keys=self._shop_keys)
        except ValueError as exc:  # a secret too short
            raise StartupError(str(exc)) from None
        try:
            prepare_data_dir(config.data_dir)
            lock = lock_data_dir(config.data_dir)
        except OSError as exc:
            raise StartupError(
                f"cannot use data directory {config.data_dir}: {exc.strerror or exc}"
            ) from None
        self._spare = _open_spare()
        try:
            try:
                await trio.to_thread.run_sync(prepare_database, config.data_dir / DB_FILE)
            except DatabaseCorrupt as exc:
                raise StartupError(f"refusing a corrupt database: {exc}") from None
            except OSError as exc:
                raise StartupError(f"cannot open the database: {exc}") from None
            try:
                listeners = await trio.open_tcp_listeners(config.port, host=config.host)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
                ) from None
            try:
                await self._serve(listeners, verifier, task_status)
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
        finally:
            if self._spare is not None:
                os.close(self._spare)
                self._spare = None
            os.close(lock)

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        verifier: TokenVerifier,
        task_status: trio.TaskStatus[str],
    ) -> None:
        config = self.config
        store = WatchedSqliteStore(
            config.data_dir / DB_FILE, synchronous=config.synchronous, on_commit=METRICS.on_commit
        )
        self.store = store
        async with trio.open_nursery() as root:
            self._root = root
            try:
                await root.start(store.run)
            except SchemaError as exc:
                raise StartupError(str(exc)) from None
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
                verifier=verifier,
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
                connections.start_soon(self._listen, listeners, listen_scope, connections)
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
        listeners: list[trio.SocketListener],
        scope: trio.CancelScope,
        connections: trio.Nursery,
    ) -> None:
        """Accept on every listener until ``scope`` is cancelled (drain)."""
        with scope:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, connections)

    async def _accept_loop(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        """Out of descriptors or kernel memory, back off (ACCEPT_BACKOFF_S
        doubling to ACCEPT_BACKOFF_MAX_S) and keep serving the connections we
        have; the spare descriptor answers one waiting connection per round."""
        backoff = 0.0
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                self._accept_failed(exc)
                if await self._serve_one_on_spare(listener):
                    continue  # the next one waiting, at once
                backoff = min(max(backoff * 2, ACCEPT_BACKOFF_S), ACCEPT_BACKOFF_MAX_S)
                await trio.sleep(backoff)
                continue
            backoff = 0.0
            if self._exhausted is not None:
                since, failures = self._exhausted
                self._exhausted = None
                event(
                    log,
                    "accept_recovered",
                    seconds=round(time.monotonic() - since, 3),
                    failed_accepts=failures,
                )
            connections.start_soon(self._handle, stream)

    def _accept_failed(self, exc: OSError) -> None:
        METRICS.accept_backoffs.inc()
        if self._exhausted is None:  # logged once per episode, not per retry
            self._exhausted = (time.monotonic(), 1)
            assert self.ctx is not None
            event(
                log,
                "accept_exhausted",
                level=logging.ERROR,
                error=errno.errorcode.get(exc.errno or 0, str(exc)),
                connections=len(self.ctx.sessions),
            )
        else:
            since, failures = self._exhausted
            self._exhausted = (since, failures + 1)

    async def _serve_one_on_spare(self, listener: trio.SocketListener) -> bool:
        """Spend the spare descriptor on the connection waiting longest: it is
        served at once (``/healthz`` and ``/metrics`` answered, an upgrade
        refused with 503, to retry elsewhere or later) instead of hanging in
        the backlog, and the spare is taken again. False if there was no spare
        or nobody waiting."""
        if self._spare is None:
            self._spare = _open_spare()  # descriptors may have been freed since
            return False
        os.close(self._spare)
        self._spare = None
        try:
            stream = None
            with contextlib.suppress(OSError), trio.move_on_after(ACCEPT_BACKOFF_S):
                stream = await listener.accept()
            if stream is None:
                return False
            await self._handle(stream, spare=True)
            return True
        finally:
            if self._spare is None:
                self._spare = _open_spare()

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

    async def _handle(self, stream: trio.abc.Stream, spare: bool = False) -> None:
        """One connection; ``spare``: accepted on the spare descriptor (only
        plain HTTP is served, upgrades get 503, all within ACCEPT_BACKOFF_MAX_S)."""
        METRICS.connections_total.inc()
        ctx = self.ctx
        assert ctx is not None
        try:
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_side=True)
            with trio.fail_after(
                min(ctx.handshake_timeout_s, ACCEPT_BACKOFF_MAX_S)
                if spare
                else ctx.handshake_timeout_s
            ):
                accepted = await accept(
                    stream,
                    self._http,
                    can_accept=not spare
                    and not ctx.draining
                    and len(ctx.sessions) < MAX_CONNECTIONS,
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
            # Bounded: a TLS close_notify is a write to a peer that may not read.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + ctx.close_send_timeout_s
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
            reason = self.health()
            if reason is not None:
                return 503, "text/plain", f"{reason}\n".encode()
            if self.worker_health is not None:  # the server serves; a worker may be failing
                well, lines = self.worker_health()
                return 200, "text/plain", (b"ok\n" if well else b"degraded\n") + lines
            return 200, "text/plain", b"ok\n"
        return None

    def health(self) -> str | None:
        """Why this server should get no traffic now (None: it is healthy).
        A dead store writer is replaced in the background, so the next probe
        sees the recovery even if no traffic comes."""
        if self.ctx is None or self.store is None:
            return "starting"
        if self.ctx.draining:
            return "draining"
        reason = self.store.health()
        if reason == WRITER_DEAD and not self._reviving and self._root is not None:
            self._reviving = True
            self._root.start_soon(self._revive_store, self.store)
        return reason

    async def _revive_store(self, store: WatchedSqliteStore) -> None:
        try:
            await store.revive()
        finally:
            self._reviving = False

    @staticmethod
    async def _sweep_sessions(ctx: GatewayContext) -> None:
        while True:
            await trio.sleep(SESSION_SWEEP_S)
            now = trio.current_time()
            for session in list(ctx.sessions):
                session.check(now)

    async def _retention_sweep(self, store: WatchedSqliteStore) -> None:
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
