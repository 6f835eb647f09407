"""Conversation pages are cut by (updated_at, id): ties are neither skipped nor repeated."""

from __future__ import annotations

from imserver.store import Scope, ScopeKind, SqliteStore
from tests.imserver.store.conftest import SHOP, put_conv


async def test_pages_with_equal_timestamps_cover_everything_once(store: SqliteStore) -> None:
    # seven conversations updated in the same millisecond, three in another
    await store.write(
        [put_conv(f"c{i}", updated_at=5_000) for i in range(7)]
        + [put_conv(f"d{i}", updated_at=4_000) for i in range(3)]
    )
    scope = Scope(kind=ScopeKind.SHOP, user="sup", shop=SHOP)
    seen: list[str] = []
    before: int | None = None
    before_id: str | None = None
    while True:
        page, more = await store.list_conversations(
            scope, state=None, updated_before=before, before_id=before_id, limit=3
        )
        seen += [c.id for c in page]
        if not more:
            break
        before, before_id = page[-1].updated_at, page[-1].id
    assert seen == [f"c{i}" for i in reversed(range(7))] + [f"d{i}" for i in reversed(range(3))]
