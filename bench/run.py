"""Run the standard benchmark suite against imserver and the bare-relay baselines.

Usage::

    python -m bench.run [--quick] [--targets imserver,trio_wsproto,websockets]
                        [--scenarios idle,peak_sale,...] [--workers K] [--out DIR] [--no-plot]
                        [--wait-quiet SECONDS]

Theory of operation
-------------------
For each scenario of the suite, and for each target in turn (scenario-major,
so that a noisy period on the shared host hits every target alike), a fresh
server is started (``bench.servers``: port 0, temporary data directory,
random secret), the scenario runs with the same load generator, identities
and payloads as for every other target (``bench.loadgen``), and the server
is stopped. A fresh server per scenario keeps them independent (RSS before
the idle scenario is a clean process; a storm cannot disturb the ramp).

A target that does not start is *skipped* with the reason printed and
recorded, never given figures; imserver is skipped like that until
``python -m imserver serve`` exists. A scenario that fails is recorded as an
error and the suite goes on.

The bot-heavy scenario needs the bot worker: imserver runs it as its bot
variant (``serve --workers bot``, started once the worker has joined, with
the CRM database seeded first: ``bench.servers.BOT_VARIANTS``); the bare
relays have no bot, and the scenario is recorded as ``n/a`` for them. After
every scenario the server's log is summarised (warnings, errors, worker
joins) into the outcome.

Output: progress lines as it goes; then ``bench/results/<date>.json`` (all
reports, machine facts, the profile; ``<date>-<HHMM>.json`` if a run of that
date is already there), a summary table with imserver's figures as ratios to
the baselines, and ``bench/results/<date>-latency.png``.
``--quick`` runs the tiny profile (about 15 s per target, under 60 s in all)
and names its files ``<date>-quick*`` so that a smoke test never overwrites
a real run. Runs on one host only: everything is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import secrets
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Final

from bench.loadgen import bot_heavy
from bench.loadgen.common import SHOPS
from bench.loadgen.suite import NEEDS_BOT, PROFILES, SCENARIOS, SuiteProfile, run_scenario
from bench.loadgen.sysstat import HostCpu, calibrate, machine_info
from bench.report import (
    ScenarioOutcome,
    SuiteResult,
    TargetResult,
    plot_latency,
    summary_table,
    write_json,
)
from bench.servers import BOT_VARIANTS, REPO, TARGETS, RunningServer, Target, TargetUnavailable
from imserver.server import DB_FILE
from imserver.store import add_shops

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
DEFAULT_TARGETS: Final = ("imserver", "trio_wsproto", "trio_sansio", "websockets")
PAUSE_BETWEEN_SCENARIOS_S: Final = 0.25
"""Lets the previous server's sockets and CPU settle."""
QUIET_WINDOW_S: Final = 2.0
QUIET_BUSY_PCT: Final = 25.0
"""--wait-quiet: the host counts as quiet below this much busy CPU (% of one core)."""
NO_BOT: Final = "n/a: a bare relay has no bot worker (the scenario needs imserver's plugins)"


def log(line: str) -> None:
    print(line, flush=True)


def git_state() -> tuple[str, bool]:
    """(HEAD commit, working tree dirty) of the repository, or ("", False)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "", False
    return head.stdout.strip(), bool(status.stdout.strip())


def wait_quiet(limit_s: float) -> float:
    """Wait (at most ``limit_s``) for a window in which other processes leave the host idle;
    returns the busy share seen last, in % of one core."""
    deadline = time.monotonic() + limit_s
    while True:
        before = HostCpu.sample()
        time.sleep(QUIET_WINDOW_S)
        busy = 100 * HostCpu.sample().busy_s_since(before) / QUIET_WINDOW_S
        if busy < QUIET_BUSY_PCT or time.monotonic() >= deadline:
            return busy
        log(f"  (host busy at {busy:.0f}% of a core; waiting for a quiet window)")


def run_scenario_on(
    name: str, scenario: str, profile: SuiteProfile, result: TargetResult, workers: int | None
) -> None:
    """One scenario on a fresh server of target ``name``; records into ``result``."""
    target: Target = TARGETS[name]
    t0 = time.monotonic()
    tag = f"{scenario[:4]}{secrets.token_hex(3)}"
    seed: Callable[[Path], object] | None = None
    shops = [f"{tag}-shop{index}" for index in range(SHOPS)]
    if scenario == "independent" and profile.independent is not None:
        # each load point's client process runs under a tag of its own
        points = range(len(profile.independent.points))
        shops += [f"{tag}i{point}-shop{index}" for point in points for index in range(SHOPS)]
    if scenario in NEEDS_BOT:
        target = BOT_VARIANTS[name]
        params = profile.bot_heavy
        if params is not None:
            params.validate()
            seed = functools.partial(bot_heavy.seed_crm, params=params, tag=tag)
            shops += [bot_heavy.shop_name(tag, index) for index in range(params.shops)]

    def prepare(data: Path) -> None:
        if name == "imserver":  # imserver serves registered shops only
            add_shops(data / DB_FILE, shops)
        if seed is not None:
            seed(data)

    server = RunningServer(target, prepare)
    outcome: ScenarioOutcome
    try:
        with server:
            report = run_scenario(
                scenario, profile, server.url, server.secret_bytes, tag, server.probe, log, workers
            )
        outcome = ScenarioOutcome(
            status="ok", seconds=round(time.monotonic() - t0, 1), report=report
        )
    except TargetUnavailable as exc:
        if all(o.status not in ("ok", "error") for o in result.scenarios.values()):
            log(f"  SKIPPED: {exc}")
            result.status, result.reason = "skipped", str(exc)
            result.scenarios = {}
            return
        log(f"  {scenario}: ERROR, server did not start: {exc}")
        outcome = ScenarioOutcome(status="error", error=str(exc))
    except Exception as exc:
        log(f"  {scenario}: ERROR {type(exc).__name__}: {exc}")
        outcome = ScenarioOutcome(
            status="error",
            seconds=round(time.monotonic() - t0, 1),
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
        )
    outcome.server_log = server.log
    if server.log is not None and (server.log.errors or server.log.unstructured):
        log(
            f"  server log: {server.log.errors} errors, {server.log.warnings} warnings, "
            f"{server.log.unstructured} other lines on stderr: "
            + ", ".join(f"{k} x{v}" for k, v in server.log.events.items())
        )
    result.scenarios[scenario] = outcome


def run_suite(
    targets: list[str],
    scenarios: list[str],
    profile: SuiteProfile,
    workers: int | None,
    quiet_s: float,
    result: SuiteResult,
) -> None:
    """Scenario-major: every target runs scenario 1, then scenario 2... so that a noisy
    period on the shared host hits all targets alike rather than one of them."""
    for name in targets:
        target = TARGETS[name]
        result.targets[name] = TargetResult(name=name, description=target.description, status="ok")
        reason = target.missing()
        if reason is not None:
            log(f"== {name}: SKIPPED: {reason}")
            result.targets[name].status, result.targets[name].reason = "skipped", reason
    for scenario in scenarios:
        log(f"== {scenario}")
        for name in targets:
            target_result = result.targets[name]
            if target_result.status != "ok":
                continue
            if scenario in NEEDS_BOT and name not in BOT_VARIANTS:
                log(f"- {name}: {NO_BOT}")
                target_result.scenarios[scenario] = ScenarioOutcome(status="n/a", error=NO_BOT)
                continue
            if quiet_s > 0:
                wait_quiet(quiet_s)
            log(f"- {name}")
            run_scenario_on(name, scenario, profile, target_result, workers)
            time.sleep(PAUSE_BETWEEN_SCENARIOS_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description="Run the imserver benchmark suite."
    )
    parser.add_argument("--quick", action="store_true", help="tiny scale smoke run (< 60 s)")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated, from {', '.join(TARGETS)}",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="load processes per scenario (default: the profile's)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each scenario, wait up to this long for other processes "
        "to leave the shared host idle",
    )
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for t in targets:
        if t not in TARGETS:
            parser.error(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    profile = PROFILES["quick" if args.quick else "full"]
    now = dt.datetime.now().astimezone()
    date = now.date().isoformat()
    stem = f"{date}-quick" if args.quick else date
    if (args.out / f"{stem}.json").exists():  # keep the earlier run of the day
        stem = f"{stem}-{now:%H%M}"
    machine = machine_info()
    commit, dirty = git_state()
    result = SuiteResult(
        date=date,
        started_at=now.isoformat(timespec="seconds"),
        command=shlex.join(
            ["python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        git_commit=commit,
        git_dirty=dirty,
        machine=machine,
        profile=profile,
    )
    log(
        f"bench: {profile.name} profile, targets {', '.join(targets)}; {machine.nproc} cores "
        f"({machine.cpu_model} @ {machine.cpu_mhz:,.0f} MHz), calibration "
        f"{machine.calibration_us:,.0f} us, fsync p50 "
        f"{machine.fsync.p50_us if machine.fsync else 0:,.0f} us, load average "
        f"{machine.load_avg_1m}; commit {commit or '?'}{' + uncommitted changes' if dirty else ''}"
    )
    host0 = HostCpu.sample()
    run_suite(targets, scenarios, profile, args.workers, args.wait_quiet, result)
    result.host_steal_pct = HostCpu.sample().steal_pct_since(host0)
    result.calibration_end_us = calibrate()
    result.finished_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    json_path = args.out / f"{stem}.json"
    write_json(result, json_path)
    print()
    print(summary_table(result))
    print(f"\nhost CPU steal during the run: {result.host_steal_pct:.1f}%")
    print(f"results: {json_path}")
    if not args.no_plot:
        png = args.out / f"{stem}-latency.png"
        why_not = plot_latency(result, png)
        print(f"plot: {png}" if why_not is None else f"plot: skipped ({why_not})")
    failed = [
        f"{t}/{s}"
        for t, r in result.targets.items()
        for s, o in r.scenarios.items()
        if o.status == "error"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
