"""The access rules, table-driven: who may read, send, route and subscribe."""

from __future__ import annotations

import pytest

from imserver.policy import (
    Identity,
    can_create_group,
    can_manage_members,
    can_read,
    can_send,
    can_subscribe,
    check_update,
)
from protocol import Conversation, ConvKind, ConvState, MemberRole, Role, Topic


def direct(state: ConvState = ConvState.ASSIGNED, agent: str | None = "a1") -> Conversation:
    return Conversation(
        id="d", kind=ConvKind.DIRECT, shop="s1", state=state, customer="c1", agent=agent
    )


GROUP = Conversation(id="g", kind=ConvKind.GROUP, shop="s1", state=ConvState.ASSIGNED)
MEMBERS = {"c2": MemberRole.MEMBER, "a2": MemberRole.OWNER}


def who(user: str, role: Role, shop: str = "s1") -> Identity:
    return Identity(user=user, role=role, shop="" if role is Role.CUSTOMER else shop)


@pytest.mark.parametrize(
    ("identity", "conv", "members", "readable", "sendable"),
    [
        (who("c1", Role.CUSTOMER), direct(), {}, True, True),
        (who("c9", Role.CUSTOMER), direct(), {}, False, False),  # another customer
        (who("a1", Role.AGENT), direct(), {}, True, True),  # the assigned agent
        (who("a2", Role.AGENT), direct(), {}, False, False),  # a colleague
        (who("a2", Role.AGENT), direct(ConvState.QUEUED, None), {}, True, False),  # open to all
        (who("a1", Role.AGENT, "s2"), direct(), {}, False, False),  # another shop
        (who("sup", Role.SUPERVISOR), direct(), {}, True, True),
        (who("sup", Role.SUPERVISOR, "s2"), direct(), {}, False, False),
        (who("w", Role.WORKER, "*"), direct(), {}, True, True),
        (who("w", Role.WORKER, "s2"), direct(), {}, False, False),
        (who("root", Role.ADMIN, "*"), direct(), {}, True, True),
        (who("c2", Role.CUSTOMER), GROUP, MEMBERS, True, True),  # group member
        (who("c1", Role.CUSTOMER), GROUP, MEMBERS, False, False),
        (who("a2", Role.AGENT), GROUP, MEMBERS, True, True),
        (who("a1", Role.AGENT), GROUP, MEMBERS, False, False),  # shop agent, not a member
    ],
)
def test_read_and_send(
    identity: Identity,
    conv: Conversation,
    members: dict[str, MemberRole],
    readable: bool,
    sendable: bool,
) -> None:
    assert can_read(identity, conv, members) is readable
    assert can_send(identity, conv, members) is sendable


def test_routing_updates() -> None:
    queued = direct(ConvState.QUEUED, None)
    assert check_update(who("a2", Role.AGENT), queued, ConvState.ASSIGNED, "a2") is None  # claim
    assert check_update(who("a2", Role.AGENT), queued, ConvState.ASSIGNED, "a3") is not None
    assert check_update(who("a2", Role.AGENT), direct(), ConvState.CLOSED, None) is not None
    assert check_update(who("a1", Role.AGENT), direct(), ConvState.CLOSED, None) is None
    assert check_update(who("c1", Role.CUSTOMER), direct(), ConvState.CLOSED, None) is not None
    assert (
        check_update(
            who("w", Role.WORKER, "*"), direct(ConvState.BOT, None), ConvState.QUEUED, None
        )
        is None
    )
    assert (
        check_update(who("a1", Role.AGENT), direct(ConvState.CLOSED, None), ConvState.BOT, None)
        is not None
    )  # only shop-wide roles reopen
    assert check_update(who("sup", Role.SUPERVISOR), GROUP, ConvState.CLOSED, None) is not None


def test_groups_and_topics() -> None:
    assert can_create_group(who("a1", Role.AGENT), "s1")
    assert not can_create_group(who("a1", Role.AGENT), "s2")
    assert not can_create_group(who("c1", Role.CUSTOMER), "s1")
    assert can_manage_members(who("a2", Role.AGENT), GROUP, MEMBERS)  # owner
    assert not can_manage_members(who("c2", Role.CUSTOMER), GROUP, MEMBERS)
    assert can_subscribe(who("a1", Role.AGENT), Topic.CONVERSATIONS, "s1")
    assert not can_subscribe(who("a1", Role.AGENT), Topic.MESSAGES, "s1")
    assert can_subscribe(who("sup", Role.SUPERVISOR), Topic.MESSAGES, "s1")
    assert not can_subscribe(who("sup", Role.SUPERVISOR), Topic.MESSAGES, "s2")
    assert not can_subscribe(who("c1", Role.CUSTOMER), Topic.CONVERSATIONS, "s1")
