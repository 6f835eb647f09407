"""The CRM worker plugin: customer context beside the chat, and segment broadcasts.

* When a conversation opens, the chat user is registered as a CRM customer:
  the customer already holding their identity ``(channel, user)`` (orders
  imported before the first chat find them), or a new one (docs/CRM.md,
  "Who is the buyer").
* When a conversation is assigned or transferred, the agent gets the
  customer's profile as a ``PluginEvent`` of kind ``profile`` (the sidebar:
  level, VIP, points, tags, segment, recent orders, lifetime value).
* Every tick it recomputes what is due: RFM segments, rule tags and loyalty
  points once per ``SCORE_EVERY_S``, and the sends of configured broadcasts
  whose time has come (each customer in their own local sending window,
  opted-out customers skipped, rate limited so live chats never starve).

Configuration (``crm:`` in the workers YAML): ``db`` (path of the CRM
database, shared with the bot), ``orders`` (a CSV / JSON file imported at
start and again whenever it changes), ``customers`` (likewise), ``broadcasts`` (a list of {id, shop, segment, text, window: [9, 21],
rate_per_minute}).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Final

import msgspec

from imserver.gateway._ids import direct_conversation_id
from imserver.logs import event as log_event
from protocol import TextBody, WorkerEvent, WorkerEventKind
from workers import metrics
from workers.sdk import Plugin, RequestFailed, WorkerContext

from .broadcast import BroadcastPlanner
from .importer import ImportReport, import_customers, import_orders
from .loyalty import LoyaltyEngine
from .repository import CrmRepository
from .rfm import RfmScorer
from .tagging import TagEngine

log = logging.getLogger("imserver.worker.crm")

SCORE_EVERY_S: Final = 3600.0
"""How often RFM segments, rule tags and loyalty points are recomputed per shop."""

DEFAULT_DB: Final = "crm.db"


def crm_db_path(ctx: WorkerContext) -> Path:
    """The CRM database: ``config['db']``, else DATA/workers/crm/crm.db (the bot reads it too)."""
    configured = ctx.config.get("db")
    return Path(str(configured)) if configured else ctx.data_dir.parent / "crm" / DEFAULT_DB


class _Broadcast(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    shop: str
    segment: str
    text: str
    window: tuple[int, int] = (9, 21)
    rate_per_minute: int = 20


class CrmPlugin(Plugin):
    name: ClassVar[str] = "crm"
    kinds: ClassVar[frozenset[WorkerEventKind]] = frozenset({WorkerEventKind.CONVERSATION})
    tick_seconds: ClassVar[float] = 2.0

    def __init__(self) -> None:
        self.repo: CrmRepository | None = None
        self.broadcasts: list[_Broadcast] = []
        self.shops: set[str] = set()
        self._scored_at: dict[str, float] = {}
        self._imported: dict[Path, float] = {}
        """Configured import files -> the mtime last imported."""
        self._import_errors: dict[Path, str] = {}
        """Configured import files that cannot be read -> why (logged once)."""

    async def setup(self, ctx: WorkerContext) -> None:
        path = crm_db_path(ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.repo = await asyncio.to_thread(CrmRepository, path)
        await self._import_changed(ctx)
        self.broadcasts = msgspec.convert(ctx.config.get("broadcasts", []), list[_Broadcast])
        self.shops.update(b.shop for b in self.broadcasts)

    async def _import_changed(self, ctx: WorkerContext) -> None:
        """Import the configured customers and orders files when new or changed since
        the last import (orders pushed during a sale reach the bot within a tick;
        ``imserver crm import-orders`` writes the database directly instead)."""
        repo = self.repo
        assert repo is not None
        for key, importer in (("customers", import_customers), ("orders", import_orders)):
            where = ctx.config.get(key)
            if not where:
                continue
            path = Path(str(where))
            try:
                mtime = (await asyncio.to_thread(path.stat)).st_mtime
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc.strerror}"
                if self._import_errors.get(path) != error:  # once, not every tick
                    self._import_errors[path] = error
                    log_event(
                        log,
                        "import_failed",
                        level=logging.ERROR,
                        kind=key,
                        path=str(path),
                        error=error,
                    )
                continue
            self._import_errors.pop(path, None)
            if self._imported.get(path) == mtime:
                continue
            self._imported[path] = mtime
            report: ImportReport = await asyncio.to_thread(importer, repo, path)
            log_event(
                log,
                "imported",
                kind=key,
                path=str(path),
                imported=report.imported,
                rejected=report.rejected,
                inserted=report.inserted,
                updated=report.updated,
                customers_created=report.customers_created,
                errors=[f"line {e.line}: {e.message}" for e in report.errors[:10]],
            )

    async def teardown(self) -> None:
        if self.repo is not None:
            self.repo.close()

    async def on_conversation(self, ctx: WorkerContext, event: WorkerEvent) -> None:
        conv, repo = event.conversation, self.repo
        if conv is None or repo is None or conv.customer is None:
            return
        self.shops.add(conv.shop)
        if event.change in ("opened", "reopened"):
            await asyncio.to_thread(repo.register_chat_user, conv.customer, str(conv.channel))
        elif event.change in ("assigned", "transferred") and conv.agent:
            customer = await asyncio.to_thread(repo.chat_customer, conv.customer, str(conv.channel))
            profile = await asyncio.to_thread(repo.profile, conv.shop, customer)
            if profile is not None:
                data = msgspec.to_builtins(profile)
                data["conv"] = conv.id
                await ctx.notify("profile", data, user=conv.agent)
                metrics.CRM_PROFILES.labels(shop=conv.shop).inc()

    async def on_tick(self, ctx: WorkerContext, now: float) -> None:
        repo = self.repo
        if repo is None:
            return
        await self._import_changed(ctx)
        for shop in sorted(self.shops):
            if now - self._scored_at.get(shop, 0.0) >= SCORE_EVERY_S:
                self._scored_at[shop] = now
                await asyncio.to_thread(self._score, repo, shop)
        for broadcast in self.broadcasts:
            await self._send_due(ctx, repo, broadcast, datetime.fromtimestamp(now, UTC))

    @staticmethod
    def _score(repo: CrmRepository, shop: str) -> None:
        at = datetime.now(UTC)
        LoyaltyEngine(repo).accrue(shop, at)
        RfmScorer(repo).score_shop(shop, at)
        TagEngine(repo).apply_rules(shop, at)

    async def _send_due(
        self, ctx: WorkerContext, repo: CrmRepository, broadcast: _Broadcast, now: datetime
    ) -> None:
        planner = BroadcastPlanner(repo)
        plan = await asyncio.to_thread(
            planner.plan_broadcast,
            broadcast.shop,
            broadcast.segment,
            broadcast.text,
            now,
            window=broadcast.window,
            rate_per_minute=broadcast.rate_per_minute,
            broadcast_id=broadcast.id,
        )
        sent = 0
        for send in plan.sends:
            if send.send_at > now:
                break  # the plan is in time order; the rest is for later ticks
            sent += 1
            # Into the chats of the customer's chat users (a customer known only from
            # the shop's own ids may chat under that id).
            users = await asyncio.to_thread(repo.chat_users_of, send.customer)
            for user in users or [send.customer]:
                conv = direct_conversation_id(broadcast.shop, user)
                keyed = dataclasses.replace(ctx, event_key=f"broadcast:{broadcast.id}:{user}")
                try:
                    await keyed.send(conv, TextBody(text=broadcast.text))
                except RequestFailed as exc:
                    if exc.code != "not_found":  # never chatted with the shop: nothing to send
                        raise
            await asyncio.to_thread(planner.mark_sent, broadcast.id, send.customer, now)
        if sent:  # supervisors follow the broadcast on their dashboard
            await ctx.notify(
                "broadcast_progress",
                {
                    "broadcast": broadcast.id,
                    "segment": broadcast.segment,
                    "sent": len(plan.skipped_already_sent) + sent,
                    "remaining": len(plan.sends) - sent,
                    "skipped_opted_out": list(plan.skipped_opted_out),
                },
                shop=broadcast.shop,
            )


__all__ = ["CrmPlugin", "crm_db_path"]
