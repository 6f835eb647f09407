"""The engine rebuilt from durable facts: restore, settle, forced chats, overflow, and
the timestamps the plugin reads from a conversation's history."""

from __future__ import annotations

from typing import Any

from protocol import AgentStatus, Message, Role, SystemBody, TextBody
from workers.routing import Assign, Classification, Queued, QueuePosition, Router, RouterConfig
from workers.routing.actions import Action, SlaBreach
from workers.routing.plugin import durable_times

SHOP = "shop-1"
PRE = Classification(skill="pre-sale", priority=0, language="lang:zh")
URGENT = Classification(skill="pre-sale", priority=9, language="lang:zh")


def make(**config: Any) -> Router:
    return Router(RouterConfig(**config))


def agent(
    r: Router, name: str, max_chats: int, status: AgentStatus = AgentStatus.ONLINE, now: float = 0.0
) -> None:
    r.upsert_agent(name, SHOP, {"pre-sale"}, max_chats, now=now)
    r.set_status(name, status, now)


def assigns(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.conv, a.agent) for a in actions if isinstance(a, Assign)]


def test_restored_queue_keeps_durable_order_head_band_and_priority() -> None:
    r = make()
    agent(r, "a", 0)
    # restored in a scrambled order; the store's timestamps decide
    r.restore("late", SHOP, PRE, since=30.0)
    r.restore("urgent", SHOP, URGENT, since=40.0)
    r.restore("early", SHOP, PRE, since=10.0)
    r.restore("taken-back", SHOP, PRE, since=50.0, head=True, previous_agent="x")
    assert r.queue(SHOP) == ["taken-back", "urgent", "early", "late"]
    positions = {a.conv: a.position for a in r.settle(SHOP, 60.0) if isinstance(a, QueuePosition)}
    assert positions == {"taken-back": 1, "urgent": 2, "early": 3, "late": 4}
    actions = r.upsert_agent("a", SHOP, {"pre-sale"}, 2, now=61.0)  # capacity appears
    assert assigns(actions) == [("taken-back", "a"), ("urgent", "a")]
    first = next(a for a in actions if isinstance(a, Assign))
    assert first.previous_agent == "x" and first.expect_agent is None
    r.check_invariants()


def test_restore_onto_a_full_agent_is_forced_and_blocks_new_chats() -> None:
    r = make()
    agent(r, "a", 1)
    r.restore("mine", SHOP, PRE, since=1.0, agent="a")
    r.restore("claimed-by-hand", SHOP, PRE, since=2.0, agent="a")
    r.check_invariants()  # over max_chats only by forced chats
    assert r.request("new", SHOP, PRE, 3.0)[0] == Queued(
        conv="new", shop=SHOP, position=1, eta_seconds=300, priority=0
    )
    assert assigns(r.closed("mine", 4.0)) == []  # still at 1 of 1
    assert assigns(r.closed("claimed-by-hand", 5.0)) == [("new", "a")]
    r.check_invariants()


def test_restore_moves_a_tracked_chat_and_an_assign_is_conditional_on_its_holder() -> None:
    r = make()
    agent(r, "a", 1)
    agent(r, "b", 1)
    r.request("c", SHOP, PRE, 0.0)
    assert r.conversation("c").agent == "a"  # type: ignore[union-attr]
    r.restore("c", SHOP, PRE, since=1.0, agent="b")  # someone transferred it to b
    assert r.agent("a").chats == () and r.agent("b").chats == ("c",)  # type: ignore[union-attr]
    actions = r.set_status("b", AgentStatus.OFFLINE, 2.0)
    [move] = [a for a in actions if isinstance(a, Assign)]
    assert (move.agent, move.expect_agent, move.previous_agent) == ("a", "b", "b")
    r.check_invariants()


def test_sla_deadline_comes_from_durable_timestamps_not_from_restart() -> None:
    r = make(sla_seconds=60.0)
    agent(r, "a", 1)
    agent(r, "b", 1)
    # assigned at 100, the customer's unanswered message at 110: due at 170,
    # whenever this process started
    r.restore("c", SHOP, PRE, since=100.0, agent="a", unanswered_since=110.0)
    assert r.tick(169.0) == []
    actions = r.tick(171.0)
    assert [type(a) for a in actions] == [SlaBreach, Assign]
    assert actions[0] == SlaBreach(conv="c", shop=SHOP, agent="a", waiting_seconds=61.0)


def test_requests_past_the_queue_limit_are_queued_as_overflow() -> None:
    r = make(queue_limit=2)
    agent(r, "a", 0)
    told = [r.request(f"c{i}", SHOP, PRE, float(i))[0] for i in range(4)]
    assert [isinstance(t, Queued) and t.overflow for t in told] == [False, False, True, True]
    assert r.queue(SHOP) == ["c0", "c1", "c2", "c3"]  # overflow keeps its place


def test_forget_shop_drops_everything_of_that_shop() -> None:
    r = make()
    agent(r, "a", 1)
    r.request("c1", SHOP, PRE, 0.0)
    r.request("c2", SHOP, PRE, 0.0)
    r.forget_shop(SHOP)
    assert r.shops() == [] and r.conversation("c1") is None and r.agent("a") is None
    r.check_invariants()
    assert r.tick(1e9) == []


def _m(seq: int, role: Role, body: Any, ts: int, sender: str = "x") -> Message:
    return Message(
        conv="c", seq=seq, sender=sender, sender_role=role, cmid=f"m{seq}", ts=ts, body=body
    )


def test_durable_times_from_history() -> None:
    from protocol import ConvState

    history = [
        _m(1, Role.CUSTOMER, TextBody(text="转人工"), 1_000),
        _m(2, Role.WORKER, SystemBody(event="queued", data={"state": "queued"}), 2_000),
        _m(3, Role.WORKER, SystemBody(event="assigned", data={"agent": "a"}), 3_000),
        _m(4, Role.AGENT, TextBody(text="hi"), 4_000, sender="a"),
        _m(5, Role.CUSTOMER, TextBody(text="where is it"), 5_000),
        _m(6, Role.CUSTOMER, TextBody(text="hello?"), 6_000),
        _m(7, Role.WORKER, SystemBody(event="queued", data={"state": "queued"}), 7_000),
        _m(8, Role.WORKER, SystemBody(event="requeued", data={"previous_agent": "a"}), 7_001),
    ]
    queued = durable_times(history, ConvState.QUEUED, me="routing")
    assert (queued.since, queued.unanswered_since, queued.previous_agent) == (7.0, 5.0, "a")
    assert not queued.told
    assigned = durable_times(history[:6], ConvState.ASSIGNED)
    assert (assigned.since, assigned.unanswered_since, assigned.previous_agent) == (3.0, 5.0, None)
    # nothing answered yet: the handoff message starts the clock
    early = durable_times(history[:3], ConvState.ASSIGNED)
    assert (early.since, early.unanswered_since) == (3.0, 1.0)
    # routing told the customer their place after the entry
    told = [*history, _m(9, Role.WORKER, TextBody(text="you are number 2"), 7_002, "routing")]
    assert durable_times(told, ConvState.QUEUED, me="routing").told


def test_an_escalated_chat_moves_up_keeping_its_time_of_entry() -> None:
    r = make()
    agent(r, "a", 0)
    for i, conv in enumerate(("c0", "c1", "c2")):
        r.request(conv, SHOP, PRE, float(i))
    actions = r.set_priority("c2", 9, 5.0)  # a complaint after 转人工
    assert r.queue(SHOP) == ["c2", "c0", "c1"]
    assert {a.conv: a.position for a in actions if isinstance(a, QueuePosition)} == {
        "c2": 1,
        "c0": 2,
        "c1": 3,
    }
    r.set_priority("c2", 0, 6.0)  # back to its old place: it entered last
    assert r.queue(SHOP) == ["c0", "c1", "c2"]
    assert r.set_priority("c0", 0, 7.0) == []
    r.check_invariants()
