"""Who may do what: one authorization table, and the relations it is keyed by.

Theory of operation
-------------------
Every request a client can make (every request and notice frame type of the
protocol) has, for every role and every *relation* between the requester and
the request's target, exactly one entry in ``RULES``. Nothing else decides
access: the gateway looks the request up before it does anything
(``may_attempt``: is there a relation at all in which this role may do it?),
and whoever knows the target -- the gateway for shops, users and plugins, the
conversation's actor for conversations -- computes the relation and asks
``check`` for the verdict. The module refuses to import if a request kind of
the protocol has no row, so a new kind cannot slip past.

Relations (``Relation``), from the requester's point of view:

* ``own_conversation``: a conversation they take part in -- its customer, its
  assigned agent, a member of the group -- of their own shop (staff) or of any
  shop (customers);
* ``own_shop``: anything else of their own shop: its conversations, the shop
  itself, its users (its staff and the customers who have a conversation with
  it). Requests without a target (ping, list, status, acks) are about the
  requester's own scope: ``own_shop`` for staff, ``own_conversation`` for
  customers;
* ``other_shop``: another shop's conversation, user or shop. Customers belong
  to no shop: any conversation not theirs is ``other_shop``. As for shops, a
  platform buyer (token shop "") may deal with every shop (``own_shop``), a
  buyer whose token a shop's key vouches for (token shop = that shop) with
  that shop only;
* ``all_shops``: the requester holds the all-shops scope (token shop ``*``,
  given only explicitly); every target is in it. An empty shop is never all
  shops.

An entry (``Access``) is ``allow``, ``deny``, or allowed under one condition
on the target: ``open`` (a direct conversation still open to every agent of
its shop: bot or queued), ``claim`` (an update that assigns such an open
conversation to the requester), ``group_admin`` (the requester is the
group's owner or admin), ``own_plugin`` (the plugin named in the requester's
token) or ``queue_topics`` (shop streams other than every message).
Cells no token can reach are ``deny`` (fail closed): a customer never has an
own shop nor all shops, agents and supervisors never hold all shops, admins
always do, a shop or a user is never an own conversation, and requests
without a target have only the requester's home relation.

Visibility. Conversations a requester may not read (``History``) are "not
found", whatever the request: ids are no oracle. Readable ones that the
request may not touch are "forbidden". The state machine of routing
(``STATE_TRANSITIONS``: which role may move a conversation from which state
to which) is checked after the table, for updates only.

Users of a shop. Some requests name users, and the table's relation to a user
is "own shop" only for *users of the requester's shop* (``users_of_shop``):
its staff -- connected now with a staff token of that shop, or known to the
store (logged in there as agent or supervisor, or with an agent status) --
and the customers who have a direct conversation with it. The same set bounds
who may be made a group member (``member_strangers``: anyone else is refused,
so no shop can pull another shop's customer into its groups), and its agents
and supervisors are who may be assigned a conversation (``is_agent_of_shop``).
Connected staff count because their login's record is written in the
background: a transfer in the milliseconds after an agent's Welcome must not
depend on that write. Fan-out, last, delivers a conversation's frames only to
sessions that may read it (``can_read``), whatever the membership says.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Final, Protocol

import msgspec

from protocol import (
    NOTICE_TYPES,
    REQUEST_TYPES,
    Conversation,
    ConvKind,
    ConvState,
    CreateGroup,
    Delivered,
    GetConversation,
    History,
    ListAgents,
    ListConversations,
    MemberRole,
    Notify,
    OpenConversation,
    Ping,
    Read,
    Recall,
    Role,
    Send,
    SetAgentStatus,
    Subscribe,
    Topic,
    Typing,
    Unsubscribe,
    Unwatch,
    UpdateConversation,
    UpdateMembers,
    WatchPresence,
    WorkerAck,
    WorkerJoin,
)

ALL_SHOPS: Final = "*"
"""The token shop that means every shop. Nothing else does (not "")."""


class Identity(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The authenticated user behind a connection."""

    user: str
    role: Role
    shop: str
    session: str = ""
    device: str = ""
    plugin: str = ""
    """Workers: the one plugin this token may join as ("" for none: no join)."""

    @property
    def is_staff(self) -> bool:
        return self.role is not Role.CUSTOMER

    @property
    def all_shops(self) -> bool:
        """Holds the all-shops scope: staff with shop ``*`` (never shop "")."""
        return self.shop == ALL_SHOPS and self.is_staff

    def in_shop(self, shop: str) -> bool:
        """Staff of ``shop`` (or of every shop)."""
        return self.is_staff and bool(shop) and (self.shop == shop or self.all_shops)


class Relation(enum.StrEnum):
    OWN_CONVERSATION = "own_conversation"
    OWN_SHOP = "own_shop"
    OTHER_SHOP = "other_shop"
    ALL_SHOPS = "all_shops"


class Access(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    OPEN = "open"
    """Only a direct conversation open to every agent of its shop (bot or queued)."""
    CLAIM = "claim"
    """Only to assign an open conversation (bot or queued) to oneself."""
    GROUP_ADMIN = "group_admin"
    """Only as the group's owner or admin."""
    OWN_PLUGIN = "own_plugin"
    """Only the plugin named in the token."""
    QUEUE_TOPICS = "queue_topics"
    """Shop streams except every message (conversations, agents, dashboard)."""


class Target(enum.Enum):
    """What a request kind is about, which decides how its relation is found."""

    CONVERSATION = "conversation"
    SHOP = "shop"
    USER = "user"
    SELF = "self"
    """Nothing but the requester's own scope (ping, list, status, plugin join)."""


# The table: one row per request kind, its target, then per role (customer,
# agent, supervisor, worker, admin) four letters, one per relation in the
# order own conversation, own shop, other shop, all shops:
#   Y allow   - deny   O open   C claim   G group admin   P own plugin   Q queue topics
# Notify names a conversation, a user or a shop: its relation is the one to
# whichever it names. Unwatch and Unsubscribe only remove the requester's own
# subscriptions. Recall is, besides, for the author of the message only.
# fmt: off
_ROWS: Final[dict[type, tuple[Target, str, str, str, str, str]]] = {
    #                     target               customer agent   superv. worker  admin
    Ping:               (Target.SELF,         "Y---", "-Y--", "-Y--", "-Y-Y", "---Y"),
    ListConversations:  (Target.SELF,         "Y---", "-Y--", "-Y--", "-Y-Y", "---Y"),
    OpenConversation:   (Target.SHOP,         "-Y--", "----", "----", "----", "----"),
    CreateGroup:        (Target.SHOP,         "----", "-Y--", "-Y--", "-Y-Y", "---Y"),
    UpdateMembers:      (Target.CONVERSATION, "----", "G---", "YY--", "YY-Y", "---Y"),
    Send:               (Target.CONVERSATION, "Y---", "Y---", "YY--", "YY-Y", "---Y"),
    Typing:             (Target.CONVERSATION, "Y---", "Y---", "YY--", "YY-Y", "---Y"),
    Recall:             (Target.CONVERSATION, "Y---", "Y---", "YY--", "YY-Y", "---Y"),
    History:            (Target.CONVERSATION, "Y---", "YO--", "YY--", "YY-Y", "---Y"),
    GetConversation:    (Target.CONVERSATION, "Y---", "YO--", "YY--", "YY-Y", "---Y"),
    Read:               (Target.CONVERSATION, "Y---", "YO--", "YY--", "YY-Y", "---Y"),
    Delivered:          (Target.CONVERSATION, "Y---", "YO--", "YY--", "YY-Y", "---Y"),
    # (a worker takes part in groups only, and groups are not routed)
    UpdateConversation: (Target.CONVERSATION, "----", "YC--", "YY--", "-Y-Y", "---Y"),
    SetAgentStatus:     (Target.SELF,         "----", "-Y--", "-Y--", "----", "----"),
    ListAgents:         (Target.SHOP,         "----", "-Y--", "-Y--", "-Y-Y", "---Y"),
    WatchPresence:      (Target.USER,         "----", "-Y--", "-Y--", "-Y-Y", "---Y"),
    Unwatch:            (Target.SELF,         "Y---", "-Y--", "-Y--", "-Y-Y", "---Y"),
    Subscribe:          (Target.SHOP,         "----", "-Q--", "-Y--", "-Y-Y", "---Y"),
    Unsubscribe:        (Target.SELF,         "Y---", "-Y--", "-Y--", "-Y-Y", "---Y"),
    WorkerJoin:         (Target.SELF,         "----", "----", "----", "-P-P", "----"),
    WorkerAck:          (Target.SELF,         "----", "----", "----", "-Y-Y", "----"),
    Notify:             (Target.CONVERSATION, "----", "----", "----", "YY-Y", "---Y"),
}
# fmt: on
_LETTERS: Final = {
    "Y": Access.ALLOW,
    "-": Access.DENY,
    "O": Access.OPEN,
    "C": Access.CLAIM,
    "G": Access.GROUP_ADMIN,
    "P": Access.OWN_PLUGIN,
    "Q": Access.QUEUE_TOPICS,
}
_ROLES: Final = (Role.CUSTOMER, Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN)
_RELATIONS: Final = tuple(Relation)

RULES: Final[dict[tuple[type, Role, Relation], Access]] = {
    (kind, role, relation): _LETTERS[letter]
    for kind, (_, *columns) in _ROWS.items()
    for role, column in zip(_ROLES, columns, strict=True)
    for relation, letter in zip(_RELATIONS, column, strict=True)
}
"""(request kind, role, relation) -> access: the one authorization table."""

_BY_ROLE: Final[dict[type, dict[str, tuple[Access, ...]]]] = {
    kind: {
        role.value: tuple(RULES[kind, role, relation] for relation in _RELATIONS) for role in _ROLES
    }
    for kind in _ROWS
}
"""``RULES`` again, for the hot path: kind -> role value -> access per relation index."""
_ALLOW: Final = Access.ALLOW
_DENY: Final = Access.DENY
_MAY_ATTEMPT: Final[dict[type, dict[str, tuple[bool, bool]]]] = {
    kind: {
        role: (any(a is not _DENY for a in accesses[:3]), accesses[3] is not _DENY)
        for role, accesses in columns.items()
    }
    for kind, columns in _BY_ROLE.items()
}
"""kind -> role value -> (allowed in some relation of a single-shop scope, of all shops)."""

TARGETS: Final[dict[type, Target]] = {kind: row[0] for kind, row in _ROWS.items()}

KINDS: Final = (*REQUEST_TYPES, *NOTICE_TYPES)
"""Every request kind of the protocol (requests with an id, and notices)."""


def _check_complete() -> None:
    missing = [
        (k.__name__, r.value, rel.value)
        for k in KINDS
        for r in Role
        for rel in Relation
        if (k, r, rel) not in RULES
    ]
    extra = [k.__name__ for k in _ROWS if k not in KINDS]
    if missing or extra:
        raise RuntimeError(
            f"authorization table incomplete: missing {missing[:5]}, unknown kinds {extra}"
        )


_check_complete()  # a request kind without a table entry is a bug at import time


# ---------------------------------------------------------------- relations


def home_relation(who: Identity) -> Relation:
    """The relation of requests about nothing but the requester's own scope."""
    if who.all_shops:
        return Relation.ALL_SHOPS
    return Relation.OWN_CONVERSATION if who.role is Role.CUSTOMER else Relation.OWN_SHOP


def shop_relation(who: Identity, shop: str) -> Relation:
    if who.all_shops:
        return Relation.ALL_SHOPS
    if who.role is Role.CUSTOMER:
        # A platform buyer (no shop) deals with every shop; one vouched for by a
        # shop's own key (its token names that shop) with that shop only.
        own = not who.shop or who.shop == shop
    else:
        own = bool(shop) and shop == who.shop
    return Relation.OWN_SHOP if own else Relation.OTHER_SHOP


def user_relation(who: Identity, related: bool) -> Relation:
    """A user target: ``related`` says whether that user belongs to the requester's
    shop (its staff, or a customer with a conversation with it)."""
    if who.all_shops:
        return Relation.ALL_SHOPS
    return Relation.OWN_SHOP if who.is_staff and related else Relation.OTHER_SHOP


def conversation_relation(
    who: Identity, conv: Conversation, members: Mapping[str, MemberRole]
) -> Relation:
    """``members`` needs to hold the requester's membership only."""
    return _RELATIONS[_conversation_index(who, conv, members)]


# The same, as an index into _RELATIONS: every message passes here twice (read,
# send), so it avoids the enum machinery (an enum's hash is a Python call).
_CUSTOMER: Final = Role.CUSTOMER
_DIRECT: Final = ConvKind.DIRECT


def _conversation_index(
    who: Identity, conv: Conversation, members: Mapping[str, MemberRole]
) -> int:
    role, user, shop = who.role, who.user, who.shop
    if role is _CUSTOMER:
        return 0 if conv.customer == user or user in members else 2
    if shop == ALL_SHOPS:
        return 3
    if not shop or conv.shop != shop:
        return 2
    return 0 if user in members or (conv.agent == user and conv.kind is _DIRECT) else 1


# ----------------------------------------------------------------- verdicts


_OPEN_TO_AGENTS: Final = frozenset({ConvState.BOT, ConvState.QUEUED})


def may_attempt(kind: type, who: Identity) -> bool:
    """The gateway's first look, before anything is done: whether ``who``'s role
    may make a request of this kind in any relation its scope can have."""
    return _MAY_ATTEMPT[kind][who.role._value_][who.shop == ALL_SHOPS and who.role is not _CUSTOMER]


def access(kind: type, who: Identity, relation: Relation) -> Access:
    return RULES[kind, who.role, relation]


def conversation_access(
    kind: type,
    who: Identity,
    conv: Conversation,
    members: Mapping[str, MemberRole],
    *,
    new_state: ConvState | None = None,
    new_agent: str | None = None,
) -> bool:
    """The verdict on a request about ``conv``: the table entry, and its condition."""
    rule = _BY_ROLE[kind][who.role._value_][_conversation_index(who, conv, members)]
    if rule is _ALLOW:
        return True
    if rule is _DENY:
        return False
    if rule is Access.OPEN:
        return conv.kind is ConvKind.DIRECT and conv.state in _OPEN_TO_AGENTS
    if rule is Access.CLAIM:
        return (
            conv.kind is ConvKind.DIRECT
            and conv.state in _OPEN_TO_AGENTS
            and new_state is ConvState.ASSIGNED
            and new_agent == who.user
        )
    if rule is Access.GROUP_ADMIN:
        return conv.kind is ConvKind.GROUP and members.get(who.user) in (
            MemberRole.OWNER,
            MemberRole.ADMIN,
        )
    return False


def shop_access(kind: type, who: Identity, shop: str, *, topics: Collection[Topic] = ()) -> bool:
    rule = RULES[kind, who.role, shop_relation(who, shop)]
    if rule is Access.QUEUE_TOPICS:
        return Topic.MESSAGES not in topics
    return rule is Access.ALLOW


def self_access(kind: type, who: Identity, *, plugin: str = "") -> bool:
    rule = RULES[kind, who.role, home_relation(who)]
    if rule is Access.OWN_PLUGIN:
        return bool(who.plugin) and plugin == who.plugin
    return rule is Access.ALLOW


def user_access(kind: type, who: Identity, related: bool) -> bool:
    return RULES[kind, who.role, user_relation(who, related)] is Access.ALLOW


# ------------------------------------------------------- users of a shop

STAFF_ROLES: Final = frozenset({Role.AGENT, Role.SUPERVISOR, Role.WORKER, Role.ADMIN})
ASSIGNEE_ROLES: Final = frozenset({Role.AGENT, Role.SUPERVISOR})
"""Who may be given a conversation: agents and supervisors."""


class ConnectedStaff(Protocol):
    """Who is connected now (the hub)."""

    def staff_of(self, shop: str, users: Iterable[str], roles: Collection[Role]) -> set[str]:
        """Those of ``users`` with a session whose token is a ``roles`` token of ``shop``."""
        ...


class KnownUsers(Protocol):
    """What the store knows of a shop's users."""

    async def shop_users(self, shop: str, users: Sequence[str]) -> set[str]:
        """Staff (logged in, or with an agent status) and direct customers of ``shop``."""
        ...

    async def is_shop_agent(self, shop: str, user: str) -> bool: ...


async def users_of_shop(
    shop: str, users: Iterable[str], *, online: ConnectedStaff, known: KnownUsers
) -> set[str]:
    """Those of ``users`` who are users of ``shop`` (see "Users of a shop")."""
    users = list(dict.fromkeys(users))
    now = online.staff_of(shop, users, STAFF_ROLES) if shop else set()
    rest = [user for user in users if user not in now]
    return now | (await known.shop_users(shop, rest) if shop and rest else set())


async def is_agent_of_shop(
    shop: str, user: str, *, online: ConnectedStaff, known: KnownUsers
) -> bool:
    """Whether ``user`` may be assigned a conversation of ``shop``."""
    if not shop:
        return False
    return bool(online.staff_of(shop, (user,), ASSIGNEE_ROLES)) or await known.is_shop_agent(
        shop, user
    )


async def member_strangers(
    who: Identity,
    shop: str,
    users: Iterable[str],
    *,
    online: ConnectedStaff,
    known: KnownUsers,
) -> list[str]:
    """Those of ``users`` who may not be members of a group of ``shop``: all but
    the users of that shop and the requester (whom the table let manage it)."""
    others = [user for user in dict.fromkeys(users) if user != who.user]
    if not others:
        return []
    shop_users = await users_of_shop(shop, others, online=online, known=known)
    return [user for user in others if user not in shop_users]


# ------------------------------------------- the verdicts by their old names


_READ: Final = _BY_ROLE[History]


def can_read(who: Identity, conv: Conversation, members: Mapping[str, MemberRole]) -> bool:
    # Asked for every recipient of every message (fan-out): plain cells first.
    rule = _READ[who.role._value_][_conversation_index(who, conv, members)]
    if rule is _ALLOW:
        return True
    return rule is not _DENY and conversation_access(History, who, conv, members)


def can_send(who: Identity, conv: Conversation, members: Mapping[str, MemberRole]) -> bool:
    return conversation_access(Send, who, conv, members)


def can_manage_members(
    who: Identity, conv: Conversation, members: Mapping[str, MemberRole]
) -> bool:
    return conv.kind is ConvKind.GROUP and conversation_access(UpdateMembers, who, conv, members)


def can_create_group(who: Identity, shop: str) -> bool:
    return shop_access(CreateGroup, who, shop)


def can_subscribe(who: Identity, topic: Topic, shop: str) -> bool:
    return shop_access(Subscribe, who, shop, topics=(topic,))


# Allowed state changes of a direct conversation, and who may make them.
# (from, to) -> roles; checked after the table allowed the update.
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
    who: Identity,
    conv: Conversation,
    new_state: ConvState | None,
    new_agent: str | None,
    members: Mapping[str, MemberRole] | None = None,
) -> str | None:
    """None if ``who`` may make this update, else the reason it is forbidden.
    (That the new agent is an agent of the shop is the store's to know: the
    actor checks it.)"""
    if not conversation_access(
        UpdateConversation, who, conv, members or {}, new_state=new_state, new_agent=new_agent
    ):
        if who.role is Role.AGENT and who.in_shop(conv.shop):
            return "agents may only claim open conversations or change their own"
        return "not staff of this conversation's shop"
    if conv.kind is not ConvKind.DIRECT:
        return "only direct conversations are routed"
    if (new_state is not None and new_state is not conv.state) or new_state is ConvState.ASSIGNED:
        target = new_state if new_state is not None else conv.state
        roles = STATE_TRANSITIONS.get((conv.state, target))
        if roles is None or who.role not in roles:
            return f"cannot go from {conv.state} to {target}"
    return None


def markdown_table() -> str:
    """The table for docs/SECURITY.md (``python -m imserver.policy``): one row per
    request kind, one column per role, the four relations in each cell."""
    names = {
        Access.ALLOW: "Y",
        Access.DENY: "-",
        Access.OPEN: "O",
        Access.CLAIM: "C",
        Access.GROUP_ADMIN: "G",
        Access.OWN_PLUGIN: "P",
        Access.QUEUE_TOPICS: "Q",
    }
    rows = [
        "| request (`t`) | target | " + " | ".join(role.value for role in _ROLES) + " |",
        "|---|---|" + "---|" * len(_ROLES),
    ]
    for kind in KINDS:
        cells = [
            "`" + "".join(names[RULES[kind, role, rel]] for rel in _RELATIONS) + "`"
            for role in _ROLES
        ]
        tag = kind.__struct_config__.tag
        rows.append(f"| `{tag}` | {TARGETS[kind].value} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
