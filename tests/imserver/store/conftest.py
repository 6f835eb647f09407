"""Fixtures and builders for the store tests: real SQLite files in tmp_path."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imserver.store import PutConversation, PutMessage, SqliteStore
from protocol import (
    AnyBody,
    Channel,
    Conversation,
    ConvKind,
    ConvState,
    Message,
    Role,
    TextBody,
)

SHOP = "shop-1"


def conversation(
    conv_id: str,
    *,
    shop: str = SHOP,
    kind: ConvKind = ConvKind.DIRECT,
    state: ConvState = ConvState.BOT,
    customer: str | None = "cust-1",
    agent: str | None = None,
    updated_at: int = 1_000,
    last_seq: int = 0,
    tags: list[str] | None = None,
    title: str = "",
) -> Conversation:
    return Conversation(
        id=conv_id,
        kind=kind,
        shop=shop,
        state=state,
        channel=Channel.TAOBAO,
        customer=customer,
        agent=agent,
        tags=tags or [],
        title=title,
        last_seq=last_seq,
        created_at=updated_at,
        updated_at=updated_at,
    )


def message(
    conv: str,
    seq: int,
    *,
    ts: int | None = None,
    sender: str = "cust-1",
    role: Role = Role.CUSTOMER,
    cmid: str | None = None,
    body: AnyBody | None = None,
) -> Message:
    return Message(
        conv=conv,
        seq=seq,
        sender=sender,
        sender_role=role,
        cmid=cmid if cmid is not None else f"c{seq}",
        ts=ts if ts is not None else 1_000 + seq,
        body=body if body is not None else TextBody(text=f"hello {seq}"),
    )


def put_conv(*args: Any, **kwargs: Any) -> PutConversation:
    return PutConversation(conversation=conversation(*args, **kwargs))


def put_msg(*args: Any, **kwargs: Any) -> PutMessage:
    return PutMessage(message=message(*args, **kwargs))


class Commits:
    """An on_commit callback that records (seconds, ops, callers)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, int]] = []

    def __call__(self, seconds: float, ops: int, callers: int) -> None:
        assert seconds >= 0
        self.calls.append((seconds, ops, callers))

    @property
    def ops(self) -> list[int]:
        return [ops for _, ops, _ in self.calls]

    @property
    def callers(self) -> list[int]:
        return [callers for _, _, callers in self.calls]

    def clear(self) -> None:
        self.calls.clear()


StoreFactory = Callable[..., Awaitable[SqliteStore]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "im.db"


@pytest.fixture(params=["writer process", "writer thread"])
async def make_store(db_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Start SqliteStores (run() in a nursery of their own); all are closed at
    teardown. Every test runs with both ways of committing (``_writer``)."""
    stores: list[SqliteStore] = []
    in_process = request.param == "writer process"
    async with trio.open_nursery() as nursery:

        async def start(path: Path = db_path, **kwargs: Any) -> SqliteStore:
            kwargs.setdefault("writer_process", in_process)
            store = SqliteStore(path, **kwargs)
            await nursery.start(store.run)
            stores.append(store)
            return store

        yield start
        for store in stores:
            await store.aclose()


@pytest.fixture
async def store(make_store: StoreFactory) -> SqliteStore:
    return await make_store()


@pytest.fixture
def raw(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A second, independent connection to the same file (autocommit)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    yield conn
    conn.close()


async def writer_took_all(store: SqliteStore) -> None:
    """Until the store's committer has taken every write queued so far: with
    a ``WriteLock`` held, those are then the in-flight transaction, and later
    writes queue behind it."""
    await store._handoff.wait_taken()


class WriteLock:
    """Holds SQLite's write lock from outside the store, so the committer's
    next BEGIN IMMEDIATE waits (busy timeout, 5 s): a deterministic way to
    make writes pile up behind an in-flight transaction, without sleeps.
    Release it (``release()``) inside the block, before awaiting the writes."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> WriteLock:
        self._conn.execute("BEGIN IMMEDIATE")
        return self

    def release(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._conn.close()
