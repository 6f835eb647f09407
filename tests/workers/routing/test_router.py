"""Router scenarios: assignment, queueing, SLA, offline, transfer, dashboard.

Time is passed explicitly; nothing sleeps.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import pytest

from protocol import AgentStatus, ConvState
from workers.handoff import HANDOFF_PRIORITY, HandoffReason
from workers.routing import (
    Action,
    AnyAction,
    Assign,
    AssignReason,
    Classification,
    Queued,
    QueuePosition,
    Rejected,
    RejectReason,
    Requeue,
    Router,
    RouterConfig,
    RoutingError,
    SlaBreach,
    classify,
)
from workers.routing.classify import COMPLAINT_WEIGHT, VIP_WEIGHT
from workers.routing.engine import HEAP_SLACK

SHOP = "shop-1"
PRE = Classification(skill="pre-sale", priority=0, language="lang:zh")
REF = Classification(skill="refunds", priority=0, language="lang:zh")

A = TypeVar("A", bound=Action)


def make(**config: Any) -> Router:
    config.setdefault("fallback_after_seconds", None)
    return Router(RouterConfig(**config))


def online(
    r: Router, agent: str, skills: set[str], max_chats: int, now: float = 0.0, shop: str = SHOP
) -> list[Action]:
    r.upsert_agent(agent, shop, skills, max_chats, now=now)
    return r.set_status(agent, AgentStatus.ONLINE, now)


def only(actions: list[Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def assignment(actions: list[Action]) -> Assign:
    (assign,) = only(actions, Assign)
    return assign


def positions(actions: list[Action]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in actions:
        if isinstance(a, Queued | QueuePosition | Requeue):
            out[a.conv] = a.position
    return out


def chats(r: Router, agent: str) -> tuple[str, ...]:
    snapshot = r.agent(agent)
    assert snapshot is not None
    return snapshot.chats


# -- the scenario --------------------------------------------------------------


def test_complaint_is_handed_off_at_high_priority_to_a_refunds_agent() -> None:
    r = make()
    online(r, "presale-amy", {"pre-sale"}, 5)
    online(r, "refund-bob", {"refunds", "after-sale"}, 5)
    r.request("c-busy", SHOP, REF, 0.0)  # Bob is not idle, Amy is: skill still wins
    c = classify(
        intent="complaint",
        channel="taobao",
        text="我要投诉",
        vip=False,
        sentiment=None,
        handoff_reason="complaint",
        requested_skill="refunds",
    )
    actions = r.request("c-complaint", SHOP, c, 1.0, customer="cust-9")
    assert actions == [
        Assign(
            conv="c-complaint",
            shop=SHOP,
            agent="refund-bob",
            previous_agent=None,
            reason=AssignReason.NEW,
            priority=HANDOFF_PRIORITY[HandoffReason.COMPLAINT],
        )
    ]
    placement = r.conversation("c-complaint")
    assert placement is not None
    assert (placement.state, placement.agent, placement.customer) == (
        ConvState.ASSIGNED,
        "refund-bob",
        "cust-9",
    )


def test_complaint_jumps_the_queue_of_a_full_refunds_desk() -> None:
    r = make()
    online(r, "bob", {"refunds"}, 1)
    r.request("c0", SHOP, REF, 0.0)
    r.request("c1", SHOP, REF, 1.0)
    r.request("c2", SHOP, REF, 2.0)
    complaint = classify(
        intent="complaint",
        channel="taobao",
        text="我要投诉",
        vip=False,
        sentiment=None,
        handoff_reason=None,
        requested_skill="refunds",
    )
    actions = r.request("c3", SHOP, complaint, 3.0)
    assert positions(actions) == {"c3": 1, "c1": 2, "c2": 3}
    assert r.queue(SHOP) == ["c3", "c1", "c2"]
    assert assignment(r.closed("c0", 10.0)).conv == "c3"


# -- least loaded ----------------------------------------------------------------------


def test_least_loaded_then_longest_idle_then_id() -> None:
    r = make()
    for name in ("a", "b", "c"):
        online(r, name, {"pre-sale"}, 3)
    got = [assignment(r.request(f"x{i}", SHOP, PRE, float(i))).agent for i in (1, 2, 3)]
    assert got == ["a", "b", "c"]  # all idle forever: smallest id first, then least loaded
    r.closed("x2", 4.0)
    r.closed("x3", 4.0)
    # a: 1 chat; b: 0 (last assigned t=2); c: 0 (last assigned t=3) -> b idled longest
    assert assignment(r.request("x4", SHOP, PRE, 5.0)).agent == "b"
    assert assignment(r.request("x5", SHOP, PRE, 6.0)).agent == "c"
    # everyone has 1 chat now; a was assigned longest ago (t=1)
    assert assignment(r.request("x6", SHOP, PRE, 7.0)).agent == "a"


def test_load_is_relative_to_max_chats() -> None:
    r = make()
    online(r, "junior", {"pre-sale"}, 2)
    online(r, "senior", {"pre-sale"}, 10)
    r.request("j1", SHOP, PRE, 0.0)  # junior (tie, smaller id)
    assert chats(r, "junior") == ("j1",)
    r.request("s1", SHOP, PRE, 1.0)
    r.request("s2", SHOP, PRE, 2.0)
    # junior 1/2 = 0.5 vs senior 2/10 = 0.2: senior, although it holds more chats
    assert assignment(r.request("x", SHOP, PRE, 3.0)).agent == "senior"


def test_only_online_qualified_agents_get_new_chats() -> None:
    r = make()
    online(r, "busy", {"refunds"}, 5)
    r.set_status("busy", AgentStatus.BUSY, 0.0)
    online(r, "away", {"refunds"}, 5)
    r.set_status("away", "away", 0.0)
    r.upsert_agent("offline", SHOP, {"refunds"}, 5, now=0.0)
    online(r, "presale", {"pre-sale"}, 5)
    online(r, "elsewhere", {"refunds"}, 5, shop="shop-2")
    actions = r.request("c", SHOP, REF, 0.0)
    assert actions == [Queued(conv="c", shop=SHOP, position=1, eta_seconds=None, priority=0)]


# -- queue -----------------------------------------------------------------------------


def test_all_full_queues_with_positions_that_decrease_as_agents_free_up() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 1)
    online(r, "b", {"pre-sale"}, 1)
    assert assignment(r.request("c1", SHOP, PRE, 0.0)).agent == "a"
    assert assignment(r.request("c2", SHOP, PRE, 0.0)).agent == "b"
    # default handle time 300 s, 2 slots: one frees every 150 s
    assert r.request("c3", SHOP, PRE, 1.0) == [
        Queued(conv="c3", shop=SHOP, position=1, eta_seconds=150, priority=0)
    ]
    assert r.request("c4", SHOP, PRE, 2.0) == [
        Queued(conv="c4", shop=SHOP, position=2, eta_seconds=300, priority=0)
    ]
    assert r.request("c5", SHOP, PRE, 3.0) == [
        Queued(conv="c5", shop=SHOP, position=3, eta_seconds=450, priority=0)
    ]

    # a closes after 100 s: its slot goes to the head; the others move up, and the ETA
    # now uses the measured handle time (100 s / 2 slots = 50 s per place)
    actions = r.closed("c1", 100.0)
    assert actions == [
        Assign(
            conv="c3",
            shop=SHOP,
            agent="a",
            previous_agent=None,
            reason=AssignReason.QUEUE,
            priority=0,
        ),
        QueuePosition(conv="c4", shop=SHOP, position=1, eta_seconds=50),
        QueuePosition(conv="c5", shop=SHOP, position=2, eta_seconds=100),
    ]
    actions = r.closed("c2", 150.0)
    assert assignment(actions).conv == "c4"
    assert positions(actions) == {"c5": 1}
    assert r.queue(SHOP) == ["c5"]


def test_customer_leaving_the_queue_moves_the_others_up() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 1)
    for i in range(4):
        r.request(f"c{i}", SHOP, PRE, float(i))
    actions = r.closed("c1", 5.0)  # c1 was first in the queue
    assert only(actions, Assign) == []
    assert positions(actions) == {"c2": 1, "c3": 2}


def test_priority_desc_then_fifo() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 1)
    r.request("busy", SHOP, PRE, 0.0)
    r.request("n1", SHOP, PRE, 1.0)
    r.request("n2", SHOP, PRE, 2.0)
    vip = Classification(skill="pre-sale", priority=VIP_WEIGHT, language="lang:zh")
    actions = r.request("vip", SHOP, vip, 3.0)
    assert positions(actions) == {"vip": 1, "n1": 2, "n2": 3}  # n1, n2 are told they moved back
    complaint = Classification(skill="pre-sale", priority=COMPLAINT_WEIGHT, language="lang:zh")
    r.request("complaint", SHOP, complaint, 4.0)
    r.request("n3", SHOP, PRE, 5.0)
    r.request("vip2", SHOP, vip, 6.0)
    assert r.queue(SHOP) == ["complaint", "vip", "vip2", "n1", "n2", "n3"]
    served = []
    current = "busy"
    for t in range(7):
        actions = r.closed(current, 10.0 + t)
        if not actions:
            break
        current = assignment(actions).conv
        served.append(current)
    assert served == ["complaint", "vip", "vip2", "n1", "n2", "n3"]


def test_positions_count_only_conversations_competing_for_the_same_agents() -> None:
    r = make()
    online(r, "p", {"pre-sale"}, 1)
    online(r, "q", {"refunds"}, 1)
    r.request("p0", SHOP, PRE, 0.0)
    r.request("q0", SHOP, REF, 0.0)
    assert positions(r.request("p1", SHOP, PRE, 1.0)) == {"p1": 1}
    assert positions(r.request("q1", SHOP, REF, 2.0)) == {"q1": 1}
    assert positions(r.request("p2", SHOP, PRE, 3.0)) == {"p2": 2}
    en = Classification(skill="pre-sale", priority=0, language="lang:en")
    assert positions(r.request("p-en", SHOP, en, 4.0)) == {"p-en": 1}
    placement = r.conversation("p2")
    assert placement is not None
    assert (placement.state, placement.position) == (ConvState.QUEUED, 2)


def test_agent_coming_online_pulls_from_the_queue() -> None:
    r = make()
    r.request("c1", SHOP, PRE, 0.0)
    r.request("c2", SHOP, PRE, 1.0)
    r.request("c3", SHOP, PRE, 2.0)
    actions = online(r, "a", {"pre-sale"}, 2, now=10.0)
    assert [(x.conv, x.agent, x.reason) for x in only(actions, Assign)] == [
        ("c1", "a", AssignReason.QUEUE),
        ("c2", "a", AssignReason.QUEUE),
    ]
    assert positions(actions) == {"c3": 1}


def test_queue_is_bounded_for_new_requests() -> None:
    r = make(max_queue_per_shop=2)
    online(r, "a", {"pre-sale"}, 1)
    online(r, "b", {"refunds"}, 1)
    r.request("c0", SHOP, PRE, 0.0)
    r.request("c1", SHOP, PRE, 0.0)
    r.request("c2", SHOP, PRE, 0.0)
    assert r.request("c3", SHOP, PRE, 0.0) == [
        Rejected(conv="c3", shop=SHOP, reason=RejectReason.QUEUE_FULL)
    ]
    assert r.conversation("c3") is None
    # a free agent still takes a conversation when the queue is full
    assert assignment(r.request("r0", SHOP, REF, 0.0)).agent == "b"


# -- idempotency -----------------------------------------------------------------------


def test_redelivered_request_never_assigns_twice() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 1)
    online(r, "b", {"pre-sale"}, 1)
    assert assignment(r.request("c", SHOP, PRE, 0.0)).agent == "a"
    assert r.request("c", SHOP, PRE, 1.0) == []
    assert r.request("c", SHOP, REF, 1.0) == []
    r.set_status("a", AgentStatus.BUSY, 2.0)
    r.set_status("b", AgentStatus.BUSY, 2.0)
    r.request("q", SHOP, PRE, 3.0)
    assert r.request("q", SHOP, PRE, 4.0) == []
    assert r.queue(SHOP) == ["q"]
    assert chats(r, "a") == ("c",)
    assert chats(r, "b") == ()
    # after close, a request is a reopen and routes again
    r.closed("c", 5.0)
    r.set_status("b", AgentStatus.ONLINE, 5.0)  # takes q
    r.set_status("a", AgentStatus.ONLINE, 5.0)
    assert assignment(r.request("c", SHOP, PRE, 6.0)).agent == "a"


def test_repeated_close_and_status_are_no_ops() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 1)
    r.request("c", SHOP, PRE, 0.0)
    r.closed("c", 1.0)
    assert r.closed("c", 2.0) == []
    assert r.set_status("a", AgentStatus.ONLINE, 2.0) == []


# -- SLA -------------------------------------------------------------------------------


def test_sla_breach_moves_the_chat_to_another_agent() -> None:
    r = make(sla_seconds=60.0)
    online(r, "a", {"pre-sale"}, 2)
    online(r, "b", {"pre-sale"}, 2)
    assert assignment(r.request("c", SHOP, PRE, 0.0)).agent == "a"
    assert r.tick(60.0) == []  # exactly 60 s is still within the SLA
    actions = r.tick(60.5)
    assert actions == [
        SlaBreach(conv="c", shop=SHOP, agent="a", waiting_seconds=60.5),
        Assign(
            conv="c",
            shop=SHOP,
            agent="b",
            previous_agent="a",
            reason=AssignReason.SLA_BREACH,
            priority=0,
            expect_agent="a",
        ),
    ]
    # b gets a full window from the moment it received the chat
    assert r.tick(120.0) == []
    assert only(r.tick(121.0), SlaBreach) == [
        SlaBreach(conv="c", shop=SHOP, agent="b", waiting_seconds=121.0)
    ]
    assert r.dashboard(SHOP, 121.0).sla_breaches == 2


def test_agent_reply_stops_the_clock_and_the_next_customer_message_restarts_it() -> None:
    r = make(sla_seconds=60.0)
    online(r, "a", {"pre-sale"}, 2)
    online(r, "b", {"pre-sale"}, 2)
    r.request("c", SHOP, PRE, 0.0)
    r.on_customer_message("c", 10.0)  # the clock runs from the oldest message (t=0)
    r.on_agent_reply("c", "b", 30.0)  # not the assigned agent: does not count
    r.on_agent_reply("c", "a", 50.0)
    assert r.tick(500.0) == []
    r.on_customer_message("c", 600.0)
    r.on_customer_message("c", 630.0)
    assert r.tick(660.0) == []
    assert only(r.tick(661.0), SlaBreach) == [
        SlaBreach(conv="c", shop=SHOP, agent="a", waiting_seconds=61.0)
    ]


def test_sla_breach_with_nobody_else_requeues_at_the_head() -> None:
    r = make(sla_seconds=60.0, exclusion_seconds=300.0)
    online(r, "a", {"pre-sale"}, 1)
    r.request("c1", SHOP, PRE, 0.0)
    r.request("c2", SHOP, PRE, 1.0)
    r.request("c3", SHOP, Classification(skill="pre-sale", priority=9, language="lang:zh"), 2.0)
    assert r.queue(SHOP) == ["c3", "c2"]
    actions = r.tick(61.0)
    assert actions[0] == SlaBreach(conv="c1", shop=SHOP, agent="a", waiting_seconds=61.0)
    # a's freed slot serves the queue, but not c1 (a just failed it): c1 waits at the head,
    # ahead of even a priority-9 newcomer
    assert only(actions, Requeue) == [
        Requeue(
            conv="c1",
            shop=SHOP,
            previous_agent="a",
            reason=AssignReason.SLA_BREACH,
            position=1,
            eta_seconds=300,
            priority=0,
        )
    ]
    assert assignment(actions).conv == "c3"
    assert positions(actions) == {"c1": 1}  # c2 was 2nd behind c3 and is 2nd behind c1
    assert r.queue(SHOP) == ["c1", "c2"]

    # another agent comes online: the head goes first, telling who had it before
    actions = online(r, "b", {"pre-sale"}, 1, now=70.0)
    assert assignment(actions) == Assign(
        conv="c1", shop=SHOP, agent="b", previous_agent="a", reason=AssignReason.QUEUE, priority=0
    )


def test_excluded_agent_gets_the_chat_back_when_the_exclusion_expires() -> None:
    r = make(sla_seconds=60.0, exclusion_seconds=300.0)
    online(r, "a", {"pre-sale"}, 1)
    r.request("c1", SHOP, PRE, 0.0)
    r.tick(61.0)
    assert r.queue(SHOP) == ["c1"]
    assert r.tick(360.0) == []
    actions = r.tick(361.0)
    assert assignment(actions).agent == "a"
    # it still has an unanswered message: a gets a new full window
    placement = r.conversation("c1")
    assert placement is not None
    assert placement.sla_due == 421.0


def test_busy_and_away_agents_keep_chats_but_still_owe_replies() -> None:
    r = make(sla_seconds=60.0)
    online(r, "a", {"pre-sale"}, 1)
    online(r, "b", {"pre-sale"}, 1)
    r.request("c", SHOP, PRE, 0.0)
    assert r.set_status("a", AgentStatus.AWAY, 1.0) == []
    assert chats(r, "a") == ("c",)
    actions = r.tick(61.0)
    assert assignment(actions).agent == "b"


# -- agent offline ---------------------------------------------------------------------


def test_agent_going_offline_with_nobody_free_requeues_its_chats_at_the_head() -> None:
    r = make()
    online(r, "a", {"refunds"}, 3)
    r.request("c1", SHOP, REF, 0.0)
    r.request("c2", SHOP, Classification(skill="refunds", priority=4, language="lang:zh"), 1.0)
    r.request("c3", SHOP, REF, 2.0)
    r.request("late", SHOP, Classification(skill="refunds", priority=9, language="lang:zh"), 3.0)
    assert r.queue(SHOP) == ["late"]

    actions = r.set_status("a", AgentStatus.OFFLINE, 10.0)
    assert chats(r, "a") == ()
    # nobody qualified is online: no ETA. Taken-back chats go before every new one
    # (even priority 9), by priority among themselves.
    assert only(actions, Requeue) == [
        Requeue(
            conv=c,
            shop=SHOP,
            previous_agent="a",
            reason=AssignReason.AGENT_OFFLINE,
            position=p,
            eta_seconds=None,
            priority=prio,
        )
        for c, p, prio in [("c2", 1, 4), ("c1", 2, 0), ("c3", 3, 0)]
    ]
    assert only(actions, QueuePosition) == [
        QueuePosition(conv="late", shop=SHOP, position=4, eta_seconds=None)
    ]
    assert r.queue(SHOP) == ["c2", "c1", "c3", "late"]


def test_offline_chats_go_to_free_colleagues_first() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 3)
    r.request("c1", SHOP, PRE, 0.0)
    r.request("c2", SHOP, PRE, 1.0)
    online(r, "b", {"pre-sale"}, 1, now=2.0)
    r.set_status("b", AgentStatus.BUSY, 2.0)
    r.request("c3", SHOP, PRE, 3.0)  # a
    r.set_status("b", AgentStatus.ONLINE, 4.0)
    r.request("new", SHOP, PRE, 5.0)  # b (least loaded)
    assert chats(r, "b") == ("new",)
    r.closed("new", 6.0)
    r.request("n2", SHOP, PRE, 7.0)  # b again
    r.closed("n2", 8.0)
    online(r, "c", {"pre-sale"}, 1, now=9.0)
    actions = r.set_status("a", AgentStatus.OFFLINE, 10.0)
    # 3 chats, 2 free slots (b, c): the first two in assignment order are re-routed
    assigned = {x.conv: (x.agent, x.previous_agent, x.reason) for x in only(actions, Assign)}
    assert assigned == {
        "c1": ("c", "a", AssignReason.AGENT_OFFLINE),  # c never assigned: idle longest
        "c2": ("b", "a", AssignReason.AGENT_OFFLINE),
    }
    assert [(x.conv, x.position) for x in only(actions, Requeue)] == [("c3", 1)]
    # the head is served before anything that arrives later
    r.request("later", SHOP, PRE, 11.0)
    assert assignment(r.closed("c1", 12.0)).conv == "c3"


def test_remove_agent_reroutes_and_forgets() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 1)
    online(r, "b", {"pre-sale"}, 1)
    r.request("c", SHOP, PRE, 0.0)
    actions = r.remove_agent("a", now=1.0)
    assert assignment(actions).agent == "b"
    assert r.agent("a") is None
    assert r.remove_agent("a", now=2.0) == []
    with pytest.raises(RoutingError):
        r.set_status("a", AgentStatus.ONLINE, 3.0)


def test_lowering_max_chats_reroutes_the_newest_excess_chats() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 3)
    for i in range(3):
        r.request(f"c{i}", SHOP, PRE, float(i))
    actions = r.upsert_agent("a", SHOP, {"pre-sale"}, 1, now=10.0)
    assert [(x.conv, x.reason) for x in only(actions, Requeue)] == [
        ("c1", AssignReason.CAPACITY_REDUCED),
        ("c2", AssignReason.CAPACITY_REDUCED),
    ]
    assert chats(r, "a") == ("c0",)
    # raising it again pulls them back
    actions = r.upsert_agent("a", SHOP, {"pre-sale"}, 3, now=11.0)
    assert [x.conv for x in only(actions, Assign)] == ["c1", "c2"]


# -- transfer --------------------------------------------------------------------------


def test_transfer_to_a_colleague_with_note() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 2)
    online(r, "b", {"logistics"}, 1)
    r.request("c", SHOP, PRE, 0.0)
    actions = r.transfer("c", "a", "b", None, "wants express shipping", 5.0)
    assert actions == [
        Assign(
            conv="c",
            shop=SHOP,
            agent="b",
            previous_agent="a",
            reason=AssignReason.TRANSFER,
            priority=0,
            note="wants express shipping",
            expect_agent="a",
        )
    ]
    assert chats(r, "a") == ()
    assert chats(r, "b") == ("c",)
    # a redelivered transfer changes nothing
    assert r.transfer("c", "a", "b", None, "wants express shipping", 6.0) == []


def test_transfer_to_a_colleague_policy() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 2)
    online(r, "full", {"pre-sale"}, 1)
    online(r, "busy", {"pre-sale"}, 1)
    r.set_status("busy", AgentStatus.BUSY, 0.0)
    online(r, "away", {"pre-sale"}, 1)
    r.set_status("away", AgentStatus.AWAY, 0.0)
    online(r, "other-shop", {"pre-sale"}, 1, shop="shop-2")
    r.request("c", SHOP, PRE, 0.0)
    r.request("d", SHOP, PRE, 0.0)  # goes to "full"
    assert chats(r, "full") == ("d",)

    def reason(target: str) -> RejectReason:
        (rejected,) = r.transfer("c", "a", target, None, "", 1.0)
        assert isinstance(rejected, Rejected)
        return rejected.reason

    assert reason("full") == RejectReason.AGENT_FULL
    assert reason("away") == RejectReason.AGENT_UNAVAILABLE
    assert reason("other-shop") == RejectReason.UNKNOWN_AGENT
    assert reason("nobody") == RejectReason.UNKNOWN_AGENT
    assert chats(r, "a") == ("c",)
    (rejected,) = r.transfer("c", "full", "busy", None, "", 1.0)
    assert rejected == Rejected(conv="c", shop=SHOP, reason=RejectReason.NOT_ASSIGNED)
    # a busy colleague may be chosen on purpose
    assert assignment(r.transfer("c", "a", "busy", None, "", 2.0)).agent == "busy"
    with pytest.raises(RoutingError):
        r.transfer("c", "busy", None, None, "", 3.0)
    with pytest.raises(RoutingError):
        r.transfer("c", "busy", "a", "refunds", "", 3.0)


def test_transfer_to_a_skill_group_routes_by_the_same_rule() -> None:
    r = make()
    online(r, "a", {"pre-sale", "refunds"}, 3)
    online(r, "r1", {"refunds"}, 1)
    online(r, "r2", {"refunds"}, 1)
    r.request("c", SHOP, PRE, 0.0)
    r.request("busy", SHOP, REF, 0.0)  # r1
    actions = r.transfer("c", "a", None, "refunds", "refund of order 42", 5.0)
    # a has the skill and most room, but it is the one handing it over
    assert actions == [
        Assign(
            conv="c",
            shop=SHOP,
            agent="r2",
            previous_agent="a",
            reason=AssignReason.TRANSFER,
            priority=0,
            note="refund of order 42",
            expect_agent="a",
        )
    ]
    placement = r.conversation("c")
    assert placement is not None
    assert placement.skill == "refunds"


def test_transfer_to_a_full_group_waits_at_the_head_and_keeps_the_note() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 2)
    online(r, "r", {"refunds"}, 1)
    r.request("busy", SHOP, REF, 0.0)
    r.request("waiting", SHOP, REF, 1.0)
    r.request("c", SHOP, PRE, 2.0)
    actions = r.transfer("c", "a", None, "refunds", "angry customer", 5.0)
    assert only(actions, Requeue) == [
        Requeue(
            conv="c",
            shop=SHOP,
            previous_agent="a",
            reason=AssignReason.TRANSFER,
            position=1,
            eta_seconds=300,
            priority=0,
        )
    ]
    assert positions(actions) == {"c": 1, "waiting": 2}
    assert assignment(r.closed("busy", 100.0)) == Assign(
        conv="c",
        shop=SHOP,
        agent="r",
        previous_agent="a",
        reason=AssignReason.QUEUE,
        priority=0,
        note="angry customer",
    )


# -- fallback and language -------------------------------------------------------------


def test_no_fallback_when_disabled() -> None:
    r = make(fallback_after_seconds=None)
    online(r, "p", {"pre-sale"}, 5)
    r.request("c", SHOP, Classification(skill="logistics", priority=0, language="lang:zh"), 0.0)
    assert r.tick(1e6) == []
    assert r.queue(SHOP) == ["c"]


def test_fallback_to_any_agent_after_the_configured_wait() -> None:
    r = make(fallback_after_seconds=120.0)
    online(r, "p", {"pre-sale"}, 5)
    r.upsert_agent("logi", SHOP, {"logistics"}, 5, now=0.0)  # exists, but offline
    r.request("c", SHOP, Classification(skill="logistics", priority=0, language="lang:zh"), 0.0)
    assert r.tick(119.0) == []
    actions = r.tick(120.0)
    assert actions == [
        Assign(
            conv="c",
            shop=SHOP,
            agent="p",
            previous_agent=None,
            reason=AssignReason.QUEUE,
            priority=0,
            fallback=True,
        )
    ]


def test_immediate_fallback_when_nobody_in_the_shop_has_the_skill() -> None:
    r = make(fallback_after_seconds=120.0)
    online(r, "p", {"pre-sale"}, 5)
    vip_desk = Classification(skill="vip-desk", priority=0, language="lang:zh")
    got = assignment(r.request("c", SHOP, vip_desk, 0.0))
    assert (got.agent, got.fallback, got.reason) == ("p", True, AssignReason.NEW)


def test_no_fallback_while_qualified_agents_are_online_but_full() -> None:
    r = make(fallback_after_seconds=120.0, sla_seconds=1e6)
    online(r, "p", {"pre-sale"}, 5)
    online(r, "logi", {"logistics"}, 1)
    logistics = Classification(skill="logistics", priority=0, language="lang:zh")
    r.request("c0", SHOP, logistics, 0.0)
    r.request("c1", SHOP, logistics, 0.0)
    assert r.tick(1000.0) == []
    # the qualified agent leaves: now the fallback applies
    actions = r.set_status("logi", AgentStatus.OFFLINE, 1001.0)
    assert {(x.conv, x.agent, x.fallback) for x in only(actions, Assign)} == {("c1", "p", True)}
    assert r.queue(SHOP) == ["c0"]  # requeued just now: waits its own 120 s
    assert assignment(r.tick(1121.0)).conv == "c0"


def test_language_is_a_requirement_and_agents_default_to_chinese() -> None:
    r = make()
    online(r, "zh-only", {"pre-sale"}, 5)
    online(r, "bilingual", {"pre-sale", "lang:en", "lang:zh"}, 1)
    en = classify(
        intent="size",
        channel="aliexpress",
        text="Do you have size M?",
        vip=False,
        sentiment=None,
        handoff_reason=None,
        requested_skill=None,
    )
    assert (en.skill, en.language) == ("pre-sale", "lang:en")
    zh = classify(
        intent="size",
        channel="taobao",
        text="有M码吗",
        vip=False,
        sentiment=None,
        handoff_reason=None,
        requested_skill=None,
    )
    assert assignment(r.request("zh1", SHOP, zh, 0.0)).agent == "bilingual"  # tie -> id
    assert assignment(r.request("zh2", SHOP, zh, 1.0)).agent == "zh-only"
    r.closed("zh1", 2.0)
    assert assignment(r.request("en1", SHOP, en, 3.0)).agent == "bilingual"
    # one qualified slot; the one close so far took 2 s
    assert r.request("en2", SHOP, en, 4.0) == [
        Queued(conv="en2", shop=SHOP, position=1, eta_seconds=2, priority=0)
    ]


# -- dashboard -------------------------------------------------------------------------


def test_dashboard_numbers() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 2)
    online(r, "b", {"refunds"}, 1)
    r.upsert_agent("c", SHOP, {"refunds"}, 4, now=0.0)  # offline
    r.request("p1", SHOP, PRE, 0.0)
    r.request("p2", SHOP, PRE, 10.0)
    r.request("p3", SHOP, PRE, 20.0)  # queued
    r.request("p4", SHOP, PRE, 40.0)  # queued
    r.request("r1", SHOP, REF, 30.0)
    r.request("r2", SHOP, REF, 50.0)  # queued
    r.closed("p1", 60.0)  # handle time 60 s; p3 gets a's slot at t=60
    d = r.dashboard(SHOP, 100.0)
    assert d.queued == 2
    assert set(d.queues) == {"pre-sale", "refunds"}
    assert (d.queues["pre-sale"].queued, d.queues["pre-sale"].longest_wait_seconds) == (1, 60.0)
    assert (d.queues["refunds"].queued, d.queues["refunds"].average_wait_seconds) == (1, 50.0)
    assert d.longest_wait_seconds == 60.0
    assert d.average_wait_seconds == 55.0
    assert [(x.agent, x.status, x.chats, x.max_chats, x.idle_seconds) for x in d.agents] == [
        ("a", AgentStatus.ONLINE, 2, 2, 40.0),
        ("b", AgentStatus.ONLINE, 1, 1, 70.0),
        ("c", AgentStatus.OFFLINE, 0, 4, None),
    ]
    assert (d.online_agents, d.available_agents, d.assigned, d.online_capacity) == (2, 0, 3, 3)
    assert d.average_handle_seconds == 60.0
    assert d.sla_breaches == 0
    # serialisable for supervisors
    assert msgspec.json.decode(msgspec.json.encode(d))["queues"]["refunds"]["queued"] == 1
    empty = r.dashboard("unknown-shop", 100.0)
    assert (empty.queued, empty.agents) == (0, [])


# -- contract --------------------------------------------------------------------------


def test_actions_round_trip_through_msgspec() -> None:
    r = make(sla_seconds=10.0)
    online(r, "a", {"pre-sale"}, 1)
    actions = r.request("c1", SHOP, PRE, 0.0) + r.request("c2", SHOP, PRE, 0.0)
    actions += r.tick(11.0)
    actions += [Rejected(conv="x", shop=SHOP, reason=RejectReason.QUEUE_FULL)]
    assert {type(a) for a in actions} == {Assign, Queued, SlaBreach, Requeue, Rejected}
    wire = msgspec.msgpack.encode(actions)
    assert msgspec.msgpack.decode(wire, type=list[AnyAction]) == actions


def test_contract_violations_raise() -> None:
    r = make()
    with pytest.raises(RoutingError):
        r.upsert_agent("", SHOP, {"pre-sale"}, 1, now=0.0)
    with pytest.raises(RoutingError):
        r.upsert_agent("a", SHOP, {"pre-sale"}, 51, now=0.0)
    with pytest.raises(RoutingError):
        r.upsert_agent("a", SHOP, {""}, 1, now=0.0)
    r.upsert_agent("a", SHOP, {"pre-sale"}, 1, now=0.0)
    with pytest.raises(RoutingError):
        r.upsert_agent("a", "shop-2", {"pre-sale"}, 1, now=0.0)
    with pytest.raises(RoutingError):
        r.set_status("a", "sleeping", 0.0)
    with pytest.raises(RoutingError):
        r.request("c", SHOP, PRE, float("nan"))
    with pytest.raises(RoutingError):
        r.request("c", SHOP, Classification(skill="pre-sale", priority=10, language="lang:zh"), 0.0)
    with pytest.raises(RoutingError):
        RouterConfig(sla_seconds=0)


def test_shops_are_bounded_and_isolated() -> None:
    r = make(max_shops=2)
    online(r, "a", {"pre-sale"}, 1, shop="s1")
    online(r, "b", {"pre-sale"}, 1, shop="s2")
    r.request("c1", "s1", PRE, 0.0)
    assert r.request("c2", "s1", PRE, 0.0) == [
        Queued(conv="c2", shop="s1", position=1, eta_seconds=300, priority=0)
    ]
    assert r.request("c3", "s3", PRE, 0.0) == [
        Rejected(conv="c3", shop="s3", reason=RejectReason.TOO_MANY_SHOPS)
    ]
    with pytest.raises(RoutingError):
        r.upsert_agent("z", "s3", {"pre-sale"}, 1, now=0.0)


def test_timer_heaps_stay_bounded() -> None:
    r = make(sla_seconds=60.0, fallback_after_seconds=120.0)
    online(r, "a", {"pre-sale"}, 1)
    r.request("c", SHOP, PRE, 0.0)
    # white-box: stale timers are compacted away (at most 2 conversations are live here)
    bound = 2 * 2 + HEAP_SLACK
    for i in range(3 * HEAP_SLACK):  # every customer message after a reply arms a timer
        r.on_agent_reply("c", "a", float(i))
        r.on_customer_message("c", i + 0.5)
        assert len(r._sla_timers) <= bound
    for i in range(3 * HEAP_SLACK):  # every enqueue arms a fallback timer
        r.request(f"q{i}", SHOP, PRE, float(i))
        assert len(r._wake_timers) <= bound
        r.closed(f"q{i}", float(i))
    # and the live SLA timer survived the compactions
    last = 3 * HEAP_SLACK - 1 + 0.5
    assert r.tick(last + 60.0) == []
    assert only(r.tick(last + 60.5), SlaBreach) == [
        SlaBreach(conv="c", shop=SHOP, agent="a", waiting_seconds=60.5)
    ]


def test_events_for_untracked_conversations_are_ignored() -> None:
    r = make()
    online(r, "a", {"pre-sale"}, 1)
    assert r.on_customer_message("bot-conv", 0.0) == []
    assert r.on_agent_reply("bot-conv", "a", 0.0) == []
    assert r.closed("bot-conv", 0.0) == []
    assert r.conversation("bot-conv") is None
    assert r.tick(1e9) == []
