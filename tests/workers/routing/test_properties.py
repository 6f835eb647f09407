"""Property test: random operation sequences against a model rebuilt from the actions.

The model only sees what the outside world sees (the returned actions); after
every step it must agree with the router's own views, and the router must keep
its invariants: no agent above ``max_chats``, every conversation in exactly one
place (one agent or the queue), positions told to customers are the real ones,
SLA timers never overdue after a tick, and no queued conversation left behind
while a free, qualified, non-excluded online agent exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import AgentStatus, ConvState
from workers.routing import (
    Action,
    Agent,
    Assign,
    AssignReason,
    Classification,
    Queued,
    QueuePosition,
    Rejected,
    Requeue,
    Router,
    RouterConfig,
    SlaBreach,
)

SHOPS = ("s0", "s1")
AGENTS = tuple(f"a{i}" for i in range(5))
CONVS = tuple(f"c{i}" for i in range(10))
SKILLS = ("pre-sale", "refunds")
KINDS = (
    "upsert",
    "status",
    "status",
    "remove",
    "request",
    "request",
    "request",
    "request",
    "close",
    "close",
    "customer",
    "reply",
    "transfer_agent",
    "transfer_agent",
    "transfer_skill",
    "tick",
    "tick",
)


def shop_of(index: int) -> str:
    return SHOPS[index % len(SHOPS)]


@dataclass(frozen=True)
class Op:
    kind: str
    dt: float
    agent: int
    other: int
    conv: int
    skill: str
    skills: frozenset[str]
    language: str | None
    priority: int
    max_chats: int
    status: AgentStatus


agent_skills = st.builds(
    frozenset.union,
    st.frozensets(st.sampled_from(SKILLS), min_size=1),
    st.frozensets(st.sampled_from(("lang:en", "lang:zh")), max_size=2),
)
ops = st.builds(
    Op,
    kind=st.sampled_from(KINDS),
    dt=st.sampled_from([0.0, 0.5, 3.0, 20.0, 45.0, 61.0]),
    agent=st.integers(0, len(AGENTS) - 1),
    other=st.integers(0, len(AGENTS) - 1),
    conv=st.integers(0, len(CONVS) - 1),
    skill=st.sampled_from(SKILLS),
    skills=agent_skills,
    language=st.sampled_from([None, None, None, "lang:zh", "lang:en"]),
    priority=st.integers(0, 9),
    max_chats=st.integers(0, 3),
    status=st.sampled_from(
        [
            AgentStatus.ONLINE,
            AgentStatus.ONLINE,
            AgentStatus.BUSY,
            AgentStatus.AWAY,
            AgentStatus.OFFLINE,
        ]
    ),
)

configs = st.builds(
    RouterConfig,
    sla_seconds=st.sampled_from([10.0, 60.0]),
    fallback_after_seconds=st.sampled_from([None, 0.0, 50.0]),
    exclusion_seconds=st.sampled_from([0.25, 40.0, 300.0]),
    max_queue_per_shop=st.sampled_from([2, 1000]),
)


def speaks(agent: Agent, language: str) -> bool:
    langs = {s for s in agent.skills if s.startswith("lang:")} or {"lang:zh"}
    return language in langs


@dataclass
class Model:
    """What a consumer of the actions believes."""

    config: RouterConfig
    now: float = 0.0
    where: dict[str, str] = field(default_factory=dict)
    """conv -> agent id, or "" for the queue."""
    previous: dict[str, str] = field(default_factory=dict)
    told: dict[str, int] = field(default_factory=dict)
    route: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    excluded: dict[tuple[str, str], float] = field(default_factory=dict)
    last_tick: float = 0.0

    def qualified(self, agent: Agent, conv: str) -> bool:
        skill, language = self.route[conv]
        return skill in agent.skills and (language is None or speaks(agent, language))

    def is_excluded(self, conv: str, agent: str) -> bool:
        return self.now < self.excluded.get((conv, agent), -1.0)

    def forget_exclusions(self, conv: str) -> None:
        for key in [k for k in self.excluded if k[0] == conv]:
            del self.excluded[key]

    def apply(self, router: Router, op: Op, actions: list[Action]) -> None:
        for action in actions:
            conv = action.conv
            prior = self.where.get(conv)
            if isinstance(action, Assign):
                assert prior is not None, f"assigned an unknown conversation {conv}"
                # the condition the update carries is where the consumer last put it
                assert action.expect_agent == (prior or None)
                if prior:
                    assert action.previous_agent == prior
                    assert action.agent != prior
                else:
                    assert action.previous_agent == self.previous.get(conv)
                agent = router.agent(action.agent)
                assert agent is not None
                assert agent.shop == action.shop
                if op.kind == "transfer_agent" and action.reason is AssignReason.TRANSFER:
                    # a person chose this colleague: skills and exclusions do not apply
                    assert agent.status in (AgentStatus.ONLINE, AgentStatus.BUSY)
                else:
                    assert agent.status is AgentStatus.ONLINE
                    assert not self.is_excluded(conv, action.agent)
                    assert action.fallback or self.qualified(agent, conv)
                self.where[conv] = action.agent
                self.previous.pop(conv, None)
                self.told.pop(conv, None)
            elif isinstance(action, Queued):
                assert prior == "" and conv not in self.told  # entered by this request
                self.told[conv] = action.position
            elif isinstance(action, Requeue):
                assert prior == action.previous_agent
                self.where[conv] = ""
                self.previous[conv] = action.previous_agent
                self.told[conv] = action.position
            elif isinstance(action, QueuePosition):
                assert prior == "" and self.told.get(conv) != action.position
                self.told[conv] = action.position
            elif isinstance(action, SlaBreach):
                assert op.kind == "tick"
                assert prior == action.agent
                self.excluded[conv, action.agent] = self.now + self.config.exclusion_seconds
            elif isinstance(action, Rejected):
                if op.kind == "request":
                    assert len(actions) == 1
                    self.where.pop(conv, None)
                    self.route.pop(conv, None)
            else:  # pragma: no cover
                raise AssertionError(f"unexpected action {action}")

    def check(self, router: Router, op: Op) -> None:
        router.check_invariants()
        actual: dict[str, str] = {}
        agents: list[Agent] = []
        for shop in SHOPS:
            for conv in router.queue(shop):
                assert conv not in actual, f"{conv} queued twice"
                actual[conv] = ""
            for agent in router.agents(shop):
                agents.append(agent)
                assert len(agent.chats) <= agent.max_chats, f"{agent.id} over max_chats"
                if agent.status is AgentStatus.OFFLINE:
                    assert agent.chats == ()
                for conv in agent.chats:
                    assert conv not in actual, f"{conv} in two places"
                    actual[conv] = agent.id
        assert actual == self.where

        for conv, place in self.where.items():
            placement = router.conversation(conv)
            assert placement is not None
            if place:
                assert placement.state is ConvState.ASSIGNED and placement.agent == place
                if op.kind == "tick":
                    assert placement.sla_due is None or placement.sla_due >= self.now
            else:
                assert placement.state is ConvState.QUEUED and placement.agent is None
                assert placement.position == self.told[conv]

        # Work conservation: no conversation waits while a free online agent qualifies
        # for it. Exclusions end with time, and only tick() (or an operation on that
        # shop) acts on time passing: an exclusion that ended since the last tick may
        # or may not have been acted on yet, so it still counts here.
        if op.kind == "tick":
            self.last_tick = self.now
        for agent in agents:
            if agent.status is not AgentStatus.ONLINE or len(agent.chats) >= agent.max_chats:
                continue
            for conv in router.queue(agent.shop):
                still_excluded = self.excluded.get((conv, agent.id), -1.0) > self.last_tick
                assert not (self.qualified(agent, conv) and not still_excluded), (
                    f"{conv} waits while {agent.id} is free"
                )


def start(router: Router, team: list[tuple[frozenset[str], int]]) -> None:
    """Register the first agents and put them online (ops change them afterwards)."""
    for index, (skills, max_chats) in enumerate(team):
        router.upsert_agent(AGENTS[index], shop_of(index), skills, max_chats, now=0.0)
        router.set_status(AGENTS[index], AgentStatus.ONLINE, 0.0)


teams = st.lists(st.tuples(agent_skills, st.integers(1, 3)), max_size=len(AGENTS))


def run_op(router: Router, model: Model, op: Op) -> list[Action]:
    now = model.now
    agent_id, other_id = AGENTS[op.agent], AGENTS[op.other]
    conv = CONVS[op.conv]
    assigned = sorted(c for c, where in model.where.items() if where)
    if op.kind in ("reply", "transfer_agent", "transfer_skill") and assigned and op.conv % 4:
        conv = assigned[op.conv % len(assigned)]  # mostly act on a conversation in progress
    if op.kind == "upsert":
        return router.upsert_agent(agent_id, shop_of(op.agent), op.skills, op.max_chats, now=now)
    if op.kind == "status":
        if router.agent(agent_id) is None:
            return []
        return router.set_status(agent_id, op.status, now)
    if op.kind == "remove":
        return router.remove_agent(agent_id, now=now)
    if op.kind == "request":
        if conv not in model.where:
            model.where[conv] = ""  # provisional: Assign/Queued/Rejected settle it
            model.route[conv] = (op.skill, op.language)
        return router.request(
            conv,
            shop_of(op.conv),
            Classification(skill=op.skill, priority=op.priority, language=op.language),
            now,
        )
    if op.kind == "close":
        actions = router.closed(conv, now)
        model.where.pop(conv, None)
        model.told.pop(conv, None)
        model.previous.pop(conv, None)
        model.forget_exclusions(conv)
        return actions
    if op.kind == "customer":
        return router.on_customer_message(conv, now)
    if op.kind == "reply":
        holder = model.where.get(conv) or agent_id
        return router.on_agent_reply(conv, holder, now)
    if op.kind == "transfer_agent":
        holder = model.where.get(conv) or agent_id
        colleagues = [a for i, a in enumerate(AGENTS) if shop_of(i) == shop_of(CONVS.index(conv))]
        target = other_id if op.other == 0 else colleagues[op.other % len(colleagues)]
        return router.transfer(conv, holder, target, None, "note", now)
    if op.kind == "transfer_skill":
        holder = model.where.get(conv) or agent_id
        actions = router.transfer(conv, holder, None, op.skill, "", now)
        if actions and not isinstance(actions[0], Rejected):
            model.route[conv] = (op.skill, model.route[conv][1])
            model.excluded[conv, holder] = now + model.config.exclusion_seconds
        return actions
    assert op.kind == "tick"
    return router.tick(now)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, team=teams, steps=st.lists(ops, min_size=20, max_size=100))
def test_random_operations_keep_every_invariant(
    config: RouterConfig, team: list[tuple[frozenset[str], int]], steps: list[Op]
) -> None:
    router = Router(config)
    start(router, team)
    model = Model(config=config)
    for op in steps:
        model.now += op.dt
        actions = run_op(router, model, op)
        model.apply(router, op, actions)
        model.check(router, op)


@settings(max_examples=100, deadline=None)
@given(config=configs, team=teams, steps=st.lists(ops, max_size=40))
def test_same_calls_same_actions(
    config: RouterConfig, team: list[tuple[frozenset[str], int]], steps: list[Op]
) -> None:
    """Determinism: two routers fed the same calls return identical actions."""
    results = []
    for _ in range(2):
        router = Router(config)
        start(router, team)
        model = Model(config=config)
        trace: list[list[Action]] = []
        for op in steps:
            model.now += op.dt
            actions = run_op(router, model, op)
            model.apply(router, op, actions)
            trace.append(actions)
        results.append(trace)
    assert results[0] == results[1]
