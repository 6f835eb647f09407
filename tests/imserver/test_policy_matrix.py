"""The authorization table against a live server: every request kind x role x
relation, exhaustively (real sockets, the ``server`` fixture).

For every cell a requester of that role sends that kind of request about a
target in that relation, and the test asserts the server's answer is what
``policy.RULES`` says: allowed (a normal reply, or the notice's effect seen by
a participant) or refused (``forbidden`` / ``not_found``). Conditional cells
are tried where their condition holds (an open conversation, a group the
agent owns, the token's plugin, queue topics) and, separately, where it does
not. Cells no token can reach must be ``deny`` in the table.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imserver import policy
from imserver.client import Client, ServerError, connect
from imserver.policy import RULES, TARGETS, Access, Relation, Target
from protocol import AgentStatus as Status
from protocol import (
    ConvState,
    CreateGroup,
    Delivered,
    Error,
    GetConversation,
    History,
    ListAgents,
    ListConversations,
    MessageEvent,
    Notify,
    OpenConversation,
    Ping,
    Read,
    Recall,
    ReceiptEvent,
    ReceiptKind,
    Role,
    Send,
    SetAgentStatus,
    Subscribe,
    TextBody,
    Topic,
    Typing,
    TypingEvent,
    Unsubscribe,
    Unwatch,
    UpdateConversation,
    UpdateMembers,
    WatchPresence,
    WorkerAck,
    WorkerEventKind,
    WorkerJoin,
)
from tests.conftest import RunningServer

REACHABLE: dict[Role, tuple[Relation, ...]] = {
    Role.CUSTOMER: (Relation.OWN_CONVERSATION, Relation.OWN_SHOP, Relation.OTHER_SHOP),
    Role.AGENT: (Relation.OWN_CONVERSATION, Relation.OWN_SHOP, Relation.OTHER_SHOP),
    Role.SUPERVISOR: (Relation.OWN_CONVERSATION, Relation.OWN_SHOP, Relation.OTHER_SHOP),
    Role.WORKER: tuple(Relation),
    Role.ADMIN: (Relation.ALL_SHOPS,),
}
"""Relations a token of each role can have to some target (agents and
supervisors never hold all shops, admins always do; a customer's own shops
are the shops it may deal with)."""

HOME = {
    Role.CUSTOMER: Relation.OWN_CONVERSATION,
    Role.AGENT: Relation.OWN_SHOP,
    Role.SUPERVISOR: Relation.OWN_SHOP,
    Role.WORKER: Relation.OWN_SHOP,
    Role.ADMIN: Relation.ALL_SHOPS,
}


def reachable(kind: type, role: Role, relation: Relation) -> bool:
    if relation not in REACHABLE[role]:
        return False
    target = TARGETS[kind]
    if target is Target.SELF:  # about nothing but the requester's own scope
        home = (
            Relation.ALL_SHOPS
            if role is Role.WORKER and relation is Relation.ALL_SHOPS
            else HOME[role]
        )
        return relation is home
    if role is Role.CUSTOMER and relation is Relation.OWN_SHOP:
        return target is Target.SHOP  # customers belong to no shop: only shops are own
    if target in (Target.SHOP, Target.USER):
        return relation is not Relation.OWN_CONVERSATION
    return True


CELLS = [(kind, role, relation) for kind in policy.KINDS for role in Role for relation in Relation]


def test_every_request_kind_has_exactly_one_entry_per_role_and_relation() -> None:
    assert set(RULES) == set(CELLS)
    assert len(RULES) == len(CELLS) == len(policy.KINDS) * len(Role) * len(Relation)
    assert set(TARGETS) == set(policy.KINDS)


def test_a_request_kind_without_an_entry_fails_the_import() -> None:
    class Unlisted(Ping, tag="unlisted"):
        pass

    kinds = policy.KINDS
    try:
        policy.KINDS = (*kinds, Unlisted)  # type: ignore[misc]
        with pytest.raises(RuntimeError, match="incomplete"):
            policy._check_complete()
    finally:
        policy.KINDS = kinds  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kind", "role", "relation"),
    [c for c in CELLS if not reachable(*c)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_cells_no_token_can_reach_are_denied(kind: type, role: Role, relation: Relation) -> None:
    assert RULES[kind, role, relation] is Access.DENY


# ------------------------------------------------------------- live matrix


@dataclass
class World:
    """Requesters (one per role and scope) and targets in every relation."""

    server: RunningServer
    stack: AsyncExitStack
    clients: dict[str, Client] = field(default_factory=dict)
    listeners: dict[str, Client] = field(default_factory=dict)
    """Observers' second devices: they get what the observer's messages cause."""
    convs: dict[str, str] = field(default_factory=dict)
    fresh: itertools.count[int] = field(default_factory=itertools.count)

    async def connect(
        self, name: str, role: str = "customer", shop: str = "", **claims: str
    ) -> Client:
        client: Client = await self.stack.enter_async_context(
            _connect(self.server, name, role, shop, f"{name}-d", **claims)
        )
        self.clients[name] = client
        return client

    async def listen(self, name: str, role: str = "customer", shop: str = "") -> None:
        self.listeners[name] = await self.stack.enter_async_context(
            _connect(self.server, name, role, shop, f"{name}-listen")
        )


async def _open(client: Client, shop: str) -> str:
    info = await client.request(OpenConversation(id=0, shop=shop))
    return str(info.conversation.id)


async def _group(client: Client, shop: str, members: list[str]) -> str:
    info = await client.request(CreateGroup(id=0, shop=shop, title="g", members=members))
    return str(info.conversation.id)


def _connect(
    server: RunningServer, name: str, role: str, shop: str, device: str, **claims: str
) -> Any:
    return connect(server.url, server.token(name, role, shop, **claims), device=device)


REQUESTERS = {  # name -> (role, shop), and the relations it is used for
    "cu": (Role.CUSTOMER, ""),  # a platform buyer: every shop is its own
    "vc": (Role.CUSTOMER, "shop1"),  # vouched for by shop1: shop2 is another shop
    "ag": (Role.AGENT, "shop1"),
    "su": (Role.SUPERVISOR, "shop1"),
    "wk": (Role.WORKER, "shop1"),
    "wa": (Role.WORKER, "*"),
    "ad": (Role.ADMIN, "*"),
}


def requester(role: Role, relation: Relation, kind: type) -> str:
    if role is Role.CUSTOMER and relation is Relation.OTHER_SHOP and TARGETS[kind] is Target.SHOP:
        return "vc"
    if role is Role.WORKER:
        return "wa" if relation is Relation.ALL_SHOPS else "wk"
    return next(n for n, (r, _) in REQUESTERS.items() if r is role)


async def build_world(server: RunningServer, stack: AsyncExitStack) -> World:
    w = World(server=server, stack=stack)
    for name, (role, shop) in REQUESTERS.items():
        extra = {"plugin": "p1"} if role is Role.WORKER else {}
        await w.connect(name, role.value, shop, **extra)
    ag2 = await w.connect("ag2", "agent", "shop2")
    for name in ("os", "cx1", "cx2", "cy", "cz"):
        await w.connect(name)
    c = w.clients
    # group members must be users of the group's shop: cy of shop1, cz of both
    for name, shop in (("cy", "shop1"), ("cz", "shop1"), ("cz", "shop2")):
        await _open(c[name], shop)
    # own conversations: cu's with shop1, assigned to ag; su's own; groups
    w.convs["cu_direct"] = await _open(c["cu"], "shop1")
    await c["ag"].request(UpdateConversation(id=0, conv=w.convs["cu_direct"], agent="ag"))
    w.convs["su_direct"] = await _open(c["os"], "shop1")
    await c["su"].request(UpdateConversation(id=0, conv=w.convs["su_direct"], agent="su"))
    w.convs["ag_owned"] = await _group(c["ag"], "shop1", ["cy"])
    w.convs["su_group"] = await _group(c["su"], "shop1", ["wk", "cy"])
    w.convs["ag_member"] = await _group(c["su"], "shop1", ["ag"])
    # the shop's others: an open conversation; another shop's
    w.convs["open1"] = await _open(c["cx1"], "shop1")
    w.convs["d2"] = await _open(c["cx2"], "shop2")
    w.convs["g2"] = await _group(ag2, "shop2", ["cx2"])
    for name in ("ag", "cu", "os", "su", "cx1", "cx2"):  # the observers
        role, shop = REQUESTERS.get(name, (Role.CUSTOMER, ""))
        await w.listen(name, role.value, shop)
    return w


# Per requester and relation: (direct conversation, its observer), group.
def targets(who: str, relation: Relation) -> tuple[str, str, str]:
    if relation is Relation.OWN_CONVERSATION:
        return {
            "cu": ("cu_direct", "ag", "ag_owned"),  # a member of no group: group unused
            "ag": ("cu_direct", "cu", "ag_owned"),
            "su": ("su_direct", "os", "su_group"),
            "wk": ("su_group", "su", "su_group"),
        }[who]
    if relation is Relation.OWN_SHOP:
        return ("open1", "cx1", "su_group" if who == "ag" else "ag_owned")
    return ("d2", "cx2", "g2")  # other shop, all shops


def shop_target(relation: Relation) -> str:
    return "shop1" if relation is Relation.OWN_SHOP else "shop2"


def user_target(relation: Relation) -> str:
    return "cx1" if relation is Relation.OWN_SHOP else "cx2"


_MARK = Typing(conv="")
"""A malformed notice: answered with ``bad_frame`` (no id), after anything the
frames before it caused, so reading up to that answer is a barrier."""


async def _refused_notice(client: Client, notice: Any) -> bool:
    """Send a notice; whether the gateway refused it (an ``Error`` without id)."""
    await client.notify(notice)
    await client.notify(_MARK)
    refused = False
    async for frame in client.events:
        if isinstance(frame, Error) and frame.id is None:
            if frame.code == "bad_frame":
                return refused
            refused = True
    raise AssertionError("connection closed")


async def _notice_seen(w: World, who: str, notice: Any, conv: str, observer: str) -> bool:
    """Whether a participant saw the notice's effect. Once the requester's notice
    is past the gateway (the barrier), a message from the observer into the same
    conversation comes after it in the actor's mailbox, so the observer's other
    device gets the effect, if any, before that message."""
    await _refused_notice(w.clients[who], notice)
    marker = f"sync {next(w.fresh)}"
    await w.clients[observer].send_text(w.convs[conv], marker)
    seen = False
    async for frame in w.listeners[observer].events:
        if isinstance(frame, TypingEvent) and frame.user == who:
            seen = True
        if (
            isinstance(frame, ReceiptEvent)
            and frame.user == who
            and frame.kind is ReceiptKind.DELIVERED
        ):
            seen = True
        if isinstance(frame, MessageEvent) and frame.message.body == TextBody(text=marker):
            return seen
    raise AssertionError("connection closed")


_NOT_AUTHZ = ("author", "no message", "only direct", "already joined", "not users of shop ")
"""Refusals that are not the table's (the test must not mistake them for it)."""


async def _answer(client: Client, request: Any) -> bool:
    """True for a normal reply, False for a refusal by the table."""
    try:
        await client.request(request)
    except ServerError as exc:
        if exc.code not in ("forbidden", "not_found") or any(
            text in exc.error.message for text in _NOT_AUTHZ
        ):
            raise AssertionError(f"not the table's refusal: {exc}") from exc
        return False
    return True


async def attempt(w: World, kind: type, role: Role, relation: Relation) -> bool:
    """Make a request of ``kind`` as ``role`` about a target in ``relation``
    (chosen so that the entry's condition, if any, holds); whether it was allowed."""
    who = requester(role, relation, kind)
    client = w.clients[who]
    direct, observer, group = targets(who, relation)
    conv = w.convs[group if kind is UpdateMembers else direct]
    if kind is Ping:
        return await _answer(client, Ping(id=0))
    if kind is ListConversations:
        return await _answer(client, ListConversations(id=0))
    if kind is OpenConversation:
        return await _answer(client, OpenConversation(id=0, shop=shop_target(relation)))
    if kind is CreateGroup:
        return await _answer(client, CreateGroup(id=0, shop=shop_target(relation), title="t"))
    if kind is UpdateMembers:
        return await _answer(client, UpdateMembers(id=0, conv=conv, add=["cz"]))
    if kind is Send:
        return await _answer(
            client, Send(id=0, conv=conv, cmid=f"m{next(w.fresh)}", body=TextBody(text="hi"))
        )
    if kind is Recall:
        try:
            sent = await client.send_text(conv, "oops")
        except ServerError:
            sent = None
        return await _answer(client, Recall(id=0, conv=conv, seq=sent.seq if sent else 1))
    if kind is History:
        return await _answer(client, History(id=0, conv=conv))
    if kind is GetConversation:
        return await _answer(client, GetConversation(id=0, conv=conv))
    if kind is Read:
        return await _answer(client, Read(id=0, conv=conv, seq=1))
    if kind is UpdateConversation:
        if RULES[kind, role, relation] is Access.CLAIM:  # a new open conversation to claim
            fresh = await w.connect(f"cl{next(w.fresh)}")
            conv = await _open(fresh, "shop1")
            return await _answer(
                client, UpdateConversation(id=0, conv=conv, state=ConvState.ASSIGNED, agent=who)
            )
        return await _answer(client, UpdateConversation(id=0, conv=conv, tags_add=["m"]))
    if kind is ListAgents:
        return await _answer(client, ListAgents(id=0, shop=shop_target(relation)))
    if kind is SetAgentStatus:
        return await _answer(client, SetAgentStatus(id=0, status=Status.ONLINE))
    if kind is WatchPresence:
        return await _answer(client, WatchPresence(id=0, users=[user_target(relation)]))
    if kind is Unwatch:
        return await _answer(client, Unwatch(id=0, users=["cx1"]))
    if kind is Subscribe:
        return await _answer(
            client, Subscribe(id=0, topics=[Topic.CONVERSATIONS], shop=shop_target(relation))
        )
    if kind is Unsubscribe:
        return await _answer(client, Unsubscribe(id=0, topics=[Topic.CONVERSATIONS]))
    if kind is WorkerJoin:  # one join per connection: a connection of its own
        fresh = await w.connect(
            f"j{next(w.fresh)}",
            role.value,
            REQUESTERS[who][1],
            **({"plugin": "p1"} if role is Role.WORKER else {}),
        )
        return await _answer(fresh, WorkerJoin(id=0, plugin="p1", kinds=[WorkerEventKind.AGENT]))
    if kind is Notify:
        return await _answer(client, Notify(id=0, kind="k", conv=conv))
    if kind is WorkerAck:
        return not await _refused_notice(client, WorkerAck(ids=[1]))
    if kind is Typing:
        return await _notice_seen(w, who, Typing(conv=conv), direct, observer)
    if kind is Delivered:
        return await _notice_seen(w, who, Delivered(conv=conv, seq=1), direct, observer)
    raise AssertionError(f"no scenario for {kind.__name__}: add one")


@asynccontextmanager
async def live_world(server: RunningServer) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield await build_world(server, stack)


async def test_the_live_server_follows_the_table_in_every_reachable_cell(
    server: RunningServer,
) -> None:
    async with live_world(server) as world:
        await _follows_the_table(world)


async def _follows_the_table(world: World) -> None:
    checked = 0
    wrong = []
    for kind, role, relation in CELLS:
        if not reachable(kind, role, relation):
            continue
        try:
            allowed = await attempt(world, kind, role, relation)
        except AssertionError as exc:
            raise AssertionError(f"{kind.__name__} {role} {relation}: {exc}") from exc
        expected = RULES[kind, role, relation] is not Access.DENY
        if allowed is not expected:
            wrong.append(
                f"{kind.__name__} {role} {relation}: {'allowed' if allowed else 'refused'}"
            )
        checked += 1
    assert not wrong, wrong
    assert checked == sum(reachable(*c) for c in CELLS)


async def test_conditional_cells_refuse_when_their_condition_fails(
    server: RunningServer,
) -> None:
    async with live_world(server) as world:
        await _conditions_fail(world)


async def _conditions_fail(world: World) -> None:
    c, convs = world.clients, world.convs
    # open (agents read open conversations of their shop): not one assigned to another
    with pytest.raises(ServerError) as refused:
        await c["ag"].request(History(id=0, conv=convs["su_direct"]))
    assert refused.value.code == "not_found"
    # claim: an agent may assign an open conversation to themself, not to a colleague...
    with pytest.raises(ServerError) as refused:
        await c["ag"].request(
            UpdateConversation(id=0, conv=convs["open1"], state=ConvState.ASSIGNED, agent="su")
        )
    assert refused.value.code == "forbidden"
    # ... nor change it otherwise
    with pytest.raises(ServerError) as refused:
        await c["ag"].request(UpdateConversation(id=0, conv=convs["open1"], tags_add=["x"]))
    assert refused.value.code == "forbidden"
    # group admin: a plain member may not change the members
    with pytest.raises(ServerError) as refused:
        await c["ag"].request(UpdateMembers(id=0, conv=convs["ag_member"], add=["cz"]))
    assert refused.value.code == "forbidden"
    # queue topics: agents do not get every message of the shop
    with pytest.raises(ServerError) as refused:
        await c["ag"].request(Subscribe(id=0, topics=[Topic.MESSAGES]))
    assert refused.value.code == "forbidden"
    # own plugin: a worker token joins the plugin it names, no other
    other = await world.connect("wj", "worker", "shop1", plugin="p1")
    with pytest.raises(ServerError) as refused:
        await other.request(WorkerJoin(id=0, plugin="crm", kinds=[WorkerEventKind.MESSAGE]))
    assert refused.value.code == "forbidden"


def test_security_md_shows_the_table() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md").read_text("utf-8")
    start = text.index("<!-- authz:start")
    start = text.index("\n", start) + 1
    assert text[start : text.index("<!-- authz:end")].strip() == policy.markdown_table(), (
        "docs/SECURITY.md: paste the output of `python -m imserver.policy`"
    )


@pytest.mark.parametrize("kind", policy.KINDS, ids=lambda k: k.__name__)
def test_the_gateways_first_look_follows_the_table(kind: type) -> None:
    """``may_attempt`` (a table derived for speed) says yes exactly when some
    relation the requester's scope can have is not denied."""
    for role in Role:
        for shop in ("", "shop1", "*"):
            who = policy.Identity(user="u", role=role, shop=shop)
            relations = (
                [Relation.ALL_SHOPS]
                if who.all_shops
                else [r for r in Relation if r is not Relation.ALL_SHOPS]
            )
            expected = any(RULES[kind, role, r] is not Access.DENY for r in relations)
            assert policy.may_attempt(kind, who) is expected, (role, shop)
