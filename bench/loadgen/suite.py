"""The standard suite: scenario names, the quick and full profiles, one dispatcher.

Every knob of a standard run is here (or a default in the scenario module),
so that ``bench.run`` and ``python -m bench.loadgen`` run exactly the same
thing. The full profile keeps each scenario under ~40 s on the 2-core box
(the other engineers share it); the quick profile is a smoke test that runs
the whole suite against one target in about 15 s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import msgspec

from . import bot_heavy, fanout, idle, independent, peak_sale, reconnect_storm
from .bot_heavy import BotHeavyParams
from .fanout import FanoutParams
from .idle import IdleParams
from .independent import IndependentParams
from .peak_sale import PeakSaleParams
from .reconnect_storm import StormParams
from .sysstat import ServerProbe

SCENARIOS: Final = ("idle", "peak_sale", "fanout", "reconnect_storm", "bot_heavy", "independent")
"""In run order: idle first would not matter (each scenario gets a fresh server)."""
NEEDS_BOT: Final = frozenset({"bot_heavy"})
"""Scenarios that need a server running the bot worker: imserver only (n/a for the relays)."""


class SuiteProfile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    workers: int
    """Load processes per scenario. One is right on 2 cores (the server needs the other)."""
    reference_loads: tuple[int, ...]
    """Offered msg/s (steps of the ramp) at which peak-sale latencies are compared."""
    peak_sale: PeakSaleParams
    fanout: FanoutParams
    reconnect_storm: StormParams
    idle: IdleParams
    bot_heavy: BotHeavyParams | None = None
    """None in runs recorded before the scenario existed."""
    independent: IndependentParams | None = None
    """The second, independent load client's points (None: runs before it existed)."""


QUICK: Final = SuiteProfile(
    name="quick",
    workers=1,
    reference_loads=(400,),
    peak_sale=PeakSaleParams(pairs=20, steps=(200, 400, 800), step_s=1.0, drain_s=1.0),
    fanout=FanoutParams(members=20, rate=10.0, duration_s=1.0, drain_s=1.0),
    reconnect_storm=StormParams(clients=40, rate=2.0, before_s=1.0, after_s=1.0, drain_s=1.5),
    idle=IdleParams(connections=100, hold_s=1.0, settle_s=0.5),
    bot_heavy=BotHeavyParams(customers=20, rate=1.0, duration_s=3.0, drain_s=3.0),
    independent=IndependentParams(points=(200,), rate=5.0, duration_s=1.0, drain_s=1.0),
)

FULL: Final = SuiteProfile(
    name="full",
    workers=1,
    reference_loads=(1000, 5000),
    peak_sale=PeakSaleParams(
        pairs=400, steps=peak_sale.DEFAULT_STEPS, step_s=peak_sale.DEFAULT_STEP_S, drain_s=2.0
    ),
    fanout=FanoutParams(members=1000, rate=10.0, duration_s=4.0, drain_s=3.0),
    reconnect_storm=StormParams(clients=1000, rate=1.0, before_s=3.0, after_s=3.0, drain_s=3.0),
    idle=IdleParams(connections=5000, hold_s=5.0, settle_s=1.0),
    bot_heavy=BotHeavyParams(customers=400, rate=0.5, duration_s=10.0, drain_s=5.0),
    independent=IndependentParams(),
)

PROFILES: Final = {"quick": QUICK, "full": FULL}

Report = (
    peak_sale.PeakSaleReport
    | fanout.FanoutReport
    | reconnect_storm.StormReport
    | idle.IdleReport
    | bot_heavy.BotHeavyReport
    | independent.IndependentReport
)


def run_scenario(
    name: str,
    profile: SuiteProfile,
    url: str,
    secret: bytes,
    tag: str,
    probe: ServerProbe,
    log: Callable[[str], None] = print,
    workers: int | None = None,
) -> Report:
    """Run one scenario of the profile against the server at ``url``."""
    count = workers or profile.workers
    if name == "peak_sale":
        return peak_sale.run(profile.peak_sale, url, secret, tag, probe, count, log)
    if name == "fanout":
        return fanout.run(profile.fanout, url, secret, tag, probe, count, log)
    if name == "reconnect_storm":
        return reconnect_storm.run(profile.reconnect_storm, url, secret, tag, probe, count, log)
    if name == "idle":
        return idle.run(profile.idle, url, secret, tag, probe, count, log)
    if name == "bot_heavy":
        if profile.bot_heavy is None:
            raise ValueError(f"profile {profile.name!r} has no bot_heavy parameters")
        return bot_heavy.run(profile.bot_heavy, url, secret, tag, probe, count, log)
    if name == "independent":
        return independent.run(
            profile.independent or independent.IndependentParams(), url, secret, tag, probe, log
        )
    raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
