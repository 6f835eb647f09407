"""Scenario 5, bot-heavy: TODO, not implemented; it measures nothing and reports no figures.

The brief parked this scenario until the bot worker existed. The bot plugin
(``workers/bot``, run by ``imserver serve --workers bot``) landed while the
suite was being written; the scenario still needs:

* an imserver target variant started with ``--workers bot`` (and
  ``--workers-config`` pointing at a small per-shop knowledge base written
  to the temp data dir), since the baselines have no bot;
* the load: many customers in conversations in state ``bot`` asking
  questions the knowledge base answers (and some asking for a human);
* the figures: customer send -> bot reply (``MessageEvent`` with
  ``sender_role`` worker) latency, handoff (state ``queued``) latency,
  server + worker CPU per round trip, unanswered questions.

Until then ``run`` measures nothing and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import msgspec

TODO_REASON: Final = (
    "TODO: the bot-heavy scenario is not implemented yet (it needs an imserver target run with "
    "--workers bot and a bot knowledge base); no figures"
)


class BotHeavyReport(msgspec.Struct, frozen=True, kw_only=True, tag="bot_heavy"):
    status: str = "todo"
    reason: str = TODO_REASON


def run(log: Callable[[str], None] = print) -> BotHeavyReport:
    log(f"  bot-heavy: {TODO_REASON}")
    return BotHeavyReport()
