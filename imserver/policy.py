"""Who may do what: pure functions over an identity and a conversation.

One place for every access rule, so the gateway and the actors agree:

* customer: their own direct conversations, and groups they are a member of;
* agent: their shop's direct conversations assigned to them or still open to
  any agent (state bot or queued), and their shop's groups they belong to;
* supervisor and shop workers: every conversation of their shop;
* admin and global workers (shop "*"): everything.
"""

from __future__ import annotations

from typing import Final

import msgspec

from protocol import Conversation, ConvKind, ConvState, MemberRole, Role, Topic


class Identity(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The authenticated user behind a connection."""

    user: str
    role: Role
    shop: str
    session: str = ""
    device: str = ""

    @property
    def is_staff(self) -> bool:
        return self.role is not Role.CUSTOMER

    def in_shop(self, shop: str) -> bool:
        """Staff of ``shop`` (or of every shop)."""
        return self.role is Role.ADMIN or self.shop == "*" or (self.is_staff and self.shop == shop)


_OPEN_TO_AGENTS: Final = frozenset({ConvState.BOT, ConvState.QUEUED})
_SHOP_WIDE: Final = frozenset({Role.SUPERVISOR, Role.WORKER, Role.ADMIN})


def can_read(who: Identity, conv: Conversation, members: dict[str, MemberRole]) -> bool:
    if who.role in _SHOP_WIDE:
        return who.in_shop(conv.shop)
    if who.role is Role.CUSTOMER:
        return conv.customer == who.user or who.user in members
    # agent
    if not who.in_shop(conv.shop):
        return False
    if conv.kind is ConvKind.GROUP:
        return who.user in members
    return conv.agent == who.user or conv.state in _OPEN_TO_AGENTS


def can_send(who: Identity, conv: Conversation, members: dict[str, MemberRole]) -> bool:
    if who.role in _SHOP_WIDE:
        return who.in_shop(conv.shop)
    if conv.kind is ConvKind.GROUP:
        return who.user in members and (who.role is Role.CUSTOMER or who.in_shop(conv.shop))
    if who.role is Role.CUSTOMER:
        return conv.customer == who.user
    return who.in_shop(conv.shop) and conv.agent == who.user and conv.state is ConvState.ASSIGNED


def can_manage_members(who: Identity, conv: Conversation, members: dict[str, MemberRole]) -> bool:
    if conv.kind is not ConvKind.GROUP:
        return False
    if who.role in _SHOP_WIDE:
        return who.in_shop(conv.shop)
    return who.in_shop(conv.shop) and members.get(who.user) in (MemberRole.OWNER, MemberRole.ADMIN)


def can_create_group(who: Identity, shop: str) -> bool:
    return who.is_staff and who.in_shop(shop)


def can_subscribe(who: Identity, topic: Topic, shop: str) -> bool:
    """Agents may watch their shop's conversations (the queue) and agents, not
    every message; supervisors, workers and admins may watch everything."""
    if not who.in_shop(shop):
        return False
    if who.role is Role.AGENT:
        return topic is not Topic.MESSAGES
    return who.role in _SHOP_WIDE


# Allowed state changes of a direct conversation, and who may make them.
# (from, to) -> roles; "self" rules for agents are checked in ``can_update``.
STATE_TRANSITIONS: Final[dict[tuple[ConvState, ConvState], frozenset[Role]]] = {
    (ConvState.BOT, ConvState.QUEUED): frozenset(
        {Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN}
    ),
    (ConvState.BOT, ConvState.ASSIGNED): frozenset(
        {Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN}
    ),
    (ConvState.BOT, ConvState.CLOSED): frozenset(
        {Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN}
    ),
    (ConvState.QUEUED, ConvState.ASSIGNED): frozenset(
        {Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN}
    ),
    (ConvState.QUEUED, ConvState.BOT): frozenset({Role.SUPERVISOR, Role.WORKER, Role.ADMIN}),
    (ConvState.QUEUED, ConvState.CLOSED): frozenset({Role.SUPERVISOR, Role.WORKER, Role.ADMIN}),
    (ConvState.ASSIGNED, ConvState.ASSIGNED): frozenset(
        {Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN}
    ),
    (ConvState.ASSIGNED, ConvState.QUEUED): frozenset(
        {Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN}
    ),
    (ConvState.ASSIGNED, ConvState.CLOSED): frozenset(
        {Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN}
    ),
    (ConvState.CLOSED, ConvState.BOT): frozenset({Role.SUPERVISOR, Role.WORKER, Role.ADMIN}),
    (ConvState.CLOSED, ConvState.QUEUED): frozenset({Role.SUPERVISOR, Role.WORKER, Role.ADMIN}),
}


def check_update(
    who: Identity, conv: Conversation, new_state: ConvState | None, new_agent: str | None
) -> str | None:
    """None if ``who`` may make this update, else the reason it is forbidden."""
    if not who.is_staff or not who.in_shop(conv.shop):
        return "not staff of this conversation's shop"
    if conv.kind is not ConvKind.DIRECT:
        return "only direct conversations are routed"
    if who.role is Role.AGENT:
        mine = conv.agent == who.user
        claiming = (
            new_state is ConvState.ASSIGNED
            and new_agent == who.user
            and conv.state in _OPEN_TO_AGENTS
        )
        if not (mine or claiming):
            return "agents may only claim open conversations or change their own"
    if (new_state is not None and new_state is not conv.state) or new_state is ConvState.ASSIGNED:
        target = new_state if new_state is not None else conv.state
        roles = STATE_TRANSITIONS.get((conv.state, target))
        if roles is None or who.role not in roles:
            return f"cannot go from {conv.state} to {target}"
    return None
