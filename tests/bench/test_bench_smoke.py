"""Smoke test of the benchmark suite: ``python -m bench.run --quick`` end to end.

One run of the whole quick suite (every scenario, imserver and both bare relays, tiny scale,
about 40 s on the 2-core box) in a subprocess, like a user runs it; the tests then check what
it recorded in its JSON. They assert on behaviour (everything sent was acked and delivered, no
message lost or duplicated by the reconnect storm, the bot answered its routine questions and
handed the others to the queue), never on latency or throughput figures: the machines are
shared and those are noise at this scale.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.loadgen.bot_heavy import BotHeavyReport
from bench.loadgen.fanout import FanoutReport
from bench.loadgen.idle import IdleReport
from bench.loadgen.independent import IndependentReport
from bench.loadgen.peak_sale import PeakSaleReport
from bench.loadgen.reconnect_storm import StormReport
from bench.loadgen.suite import NEEDS_BOT, SCENARIOS
from bench.report import ScenarioOutcome, SuiteResult, TargetResult, read_json

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 85.0
"""The smoke test must stay under 90 s; the quick suite takes about 40 s."""
TARGETS = ("imserver", "trio_wsproto", "websockets")
BASELINES = ("trio_wsproto", "websockets")

pytestmark = pytest.mark.slow


class SuiteRun:
    def __init__(self, result: SuiteResult, output: str, seconds: float) -> None:
        self.result = result
        self.output = output
        self.seconds = seconds

    def target(self, name: str) -> TargetResult:
        target = self.result.targets[name]
        assert target.status == "ok", f"{name} {target.status}: {target.reason}\n{self.output}"
        return target

    def outcome(self, name: str, scenario: str) -> ScenarioOutcome:
        outcome = self.target(name).scenarios.get(scenario)
        assert outcome is not None, f"{name}/{scenario} did not run\n{self.output}"
        assert outcome.status == "ok", f"{name}/{scenario}: {outcome.status} {outcome.error}"
        return outcome


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--out",
            str(out),
            "--no-plot",
            "--targets",
            ",".join(TARGETS),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    files = sorted(out.glob("*-quick*.json"))
    assert len(files) == 1, f"expected one results file in {out}, got {files}\n{output}"
    assert proc.returncode == 0, f"bench.run exited with {proc.returncode}\n{output}"
    return SuiteRun(read_json(files[0]), output, seconds)


def test_every_scenario_ran_on_every_target(suite: SuiteRun) -> None:
    assert suite.result.profile.name == "quick"
    for name in TARGETS:
        target = suite.target(name)
        assert list(target.scenarios) == list(SCENARIOS), name
        for scenario, outcome in target.scenarios.items():
            if scenario in NEEDS_BOT and name in BASELINES:
                assert outcome.status == "n/a", (name, scenario, outcome)
                assert outcome.report is None
            else:
                assert outcome.status == "ok", (name, scenario, outcome.error)
                assert outcome.report is not None


def test_the_host_is_recorded(suite: SuiteRun) -> None:
    machine = suite.result.machine
    assert machine.calibration_us > 0
    assert suite.result.calibration_end_us > 0
    assert machine.fsync is not None
    assert 0 < machine.fsync.p50_us <= machine.fsync.p90_us
    assert "calibration" in suite.output and "fsync" in suite.output


@pytest.mark.parametrize("name", TARGETS)
def test_the_independent_client_delivers_everything(suite: SuiteRun, name: str) -> None:
    report = suite.outcome(name, "independent").report
    assert isinstance(report, IndependentReport)
    assert [p.offered_msgs_per_s for p in report.points] == list(report.params.points)
    for point in report.points:
        assert point.sent > 0, point.verdict
        assert (point.acked, point.delivered, point.errors) == (point.sent, point.sent, {}), (
            point.verdict
        )


def test_imserver_logged_no_errors(suite: SuiteRun) -> None:
    for scenario in SCENARIOS:
        log = suite.outcome("imserver", scenario).server_log
        assert log is not None, scenario
        assert log.errors == 0, (scenario, log.events, log.samples)
        assert log.unstructured == 0, (scenario, log.samples)
    bot_log = suite.outcome("imserver", "bot_heavy").server_log
    assert bot_log is not None
    assert bot_log.worker_joins == 1, "the bot worker joined more than once: it restarted"


@pytest.mark.parametrize("name", TARGETS)
def test_peak_sale_delivers_everything(suite: SuiteRun, name: str) -> None:
    report = suite.outcome(name, "peak_sale").report
    assert isinstance(report, PeakSaleReport)
    assert report.pairs_connected == report.params.pairs
    assert report.setup_errors == []
    assert report.steps, "no step ran"
    for step in report.steps:
        assert step.sent > 0, step.index
        assert (step.acked, step.delivered, step.unsent, step.errors) == (
            step.sent,
            step.sent,
            0,
            {},
        ), (step.offered_msgs_per_s, step.verdict)


@pytest.mark.parametrize("name", TARGETS)
def test_fanout_reaches_every_member(suite: SuiteRun, name: str) -> None:
    report = suite.outcome(name, "fanout").report
    assert isinstance(report, FanoutReport)
    assert report.members_connected == report.params.members
    assert report.sent > 0
    assert report.acked == report.sent
    assert report.errors == {}
    assert report.deliveries == report.expected_deliveries == report.sent * report.params.members
    assert report.incomplete_messages == 0


@pytest.mark.parametrize("name", TARGETS)
def test_reconnect_storm_loses_and_duplicates_nothing(suite: SuiteRun, name: str) -> None:
    report = suite.outcome(name, "reconnect_storm").report
    assert isinstance(report, StormReport)
    assert report.clients_connected == report.params.clients
    assert report.sent > 0
    assert report.lost == 0
    assert report.duplicates == 0
    assert report.acked == report.sent
    assert report.unacked == 0
    assert report.reconnect_failures == 0
    assert report.never_resumed == 0
    assert report.time_to_all_resumed_ms is not None
    assert report.errors == {}


@pytest.mark.parametrize("name", TARGETS)
def test_idle_connections_stay_up_and_answer_pings(suite: SuiteRun, name: str) -> None:
    report = suite.outcome(name, "idle").report
    assert isinstance(report, IdleReport)
    assert report.connected == report.params.connections
    assert report.connect_failures == 0
    assert report.still_open == report.connected
    assert report.pings > 0
    assert report.pongs == report.pings
    assert report.errors == {}


def test_bot_answers_routine_questions_and_hands_off_the_rest(suite: SuiteRun) -> None:
    report = suite.outcome("imserver", "bot_heavy").report
    assert isinstance(report, BotHeavyReport)
    p = report.params
    assert report.customers_ready == report.customers_connected == p.customers
    assert report.questions == report.routine + report.human > 0
    assert report.routine > 0
    assert report.human > 0
    # Every routine question got the right answer from the bot (order status and parcel
    # tracking from the seeded CRM order, FAQ from the example KB)...
    assert report.answered_by_bot == report.routine, report.wrong_samples
    assert report.wrong_answers == 0, report.wrong_samples
    # ...and every request for a person got a reply and put the conversation in the queue.
    assert report.handoff_replies == report.handed_off == report.human
    assert report.unanswered == 0
    assert report.unexpected_handoffs == report.unexpected_replies == report.not_queued == 0
    assert report.acked == report.questions
    assert report.errors == {}
    assert report.not_asked == report.unsent == report.open_failures == 0
    # Every human question ends a conversation; the next one opens with a welcome.
    assert report.sessions_opened == report.human
    assert report.welcome.count == report.human
    assert report.reply.count == report.questions
    assert report.queued.count == report.human
    assert report.bot_answered_share == pytest.approx(report.routine / report.questions)
    assert 0.6 <= report.bot_answered_share <= 0.95
    assert report.passed, report.verdict
