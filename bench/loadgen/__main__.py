"""Run one scenario against an already running server.

Usage::

    python -m bench.loadgen peak_sale --url ws://127.0.0.1:PORT/ws --secret SECRET \\
        [--server-pid PID] [--profile quick|full] [--workers K] [--json out.json] \\
        [--pairs N] [--steps 1000,2000] [--step-s S] [--members M] [--rate R] \\
        [--clients C] [--connections K] [--hold-s S] [--customers N] [--duration-s S] \\
        [--seed-data DIR]

The scenario's parameters come from the profile (``suite``), with any of the
overrides given. ``--server-pid`` lets it read the server's RSS and CPU (the
idle scenario's memory figure needs it). The report is printed as JSON, or
written to ``--json``. ``bench.run`` is the way to run the whole suite.

bot_heavy needs a server run with ``--workers bot`` and the customers' orders in its CRM
database: ``--seed-data DIR`` (the server's ``--data``) writes them there first.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import msgspec

from . import bot_heavy
from .suite import PROFILES, SCENARIOS, SuiteProfile, run_scenario
from .sysstat import ServerProbe


def _apply_overrides(profile: SuiteProfile, args: argparse.Namespace) -> SuiteProfile:
    replace = msgspec.structs.replace
    peak, fan, storm, idle = (
        profile.peak_sale,
        profile.fanout,
        profile.reconnect_storm,
        profile.idle,
    )
    bot = profile.bot_heavy
    if args.pairs is not None:
        peak = replace(peak, pairs=args.pairs)
    if args.steps is not None:
        peak = replace(peak, steps=tuple(int(s) for s in args.steps.split(",")))
    if args.step_s is not None:
        peak = replace(peak, step_s=args.step_s)
    if args.members is not None:
        fan = replace(fan, members=args.members)
    if args.rate is not None:
        fan = replace(fan, rate=args.rate)
        storm = replace(storm, rate=args.rate)
        bot = bot and replace(bot, rate=args.rate)
    if args.customers is not None:
        bot = bot and replace(bot, customers=args.customers)
    if args.duration_s is not None:
        bot = bot and replace(bot, duration_s=args.duration_s)
    if args.clients is not None:
        storm = replace(storm, clients=args.clients)
    if args.connections is not None:
        idle = replace(idle, connections=args.connections)
    if args.hold_s is not None:
        idle = replace(idle, hold_s=args.hold_s)
    return replace(
        profile, peak_sale=peak, fanout=fan, reconnect_storm=storm, idle=idle, bot_heavy=bot
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", default="", help="token secret (ignored by the baselines)")
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--steps")
    parser.add_argument("--step-s", type=float)
    parser.add_argument("--members", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--hold-s", type=float)
    parser.add_argument("--customers", type=int)
    parser.add_argument("--duration-s", type=float)
    parser.add_argument(
        "--tag",
        default=None,
        help="prefix of the run's user and shop ids (default: random); imserver "
        "serves registered shops only: register TAG-shop0 .. TAG-shop9 first",
    )
    parser.add_argument(
        "--seed-data",
        type=Path,
        default=None,
        help="bot_heavy: the server's data directory, to seed its CRM database",
    )
    args = parser.parse_args(argv)
    if not args.url.startswith(("ws://127.0.0.1", "ws://localhost", "ws://[::1]")):
        parser.error("the load generator only targets this host (127.0.0.1)")
    profile = _apply_overrides(PROFILES[args.profile], args)
    secret = (args.secret or secrets.token_hex(16)).encode()
    tag = args.tag or f"{args.scenario[:4]}{secrets.token_hex(3)}"
    if args.scenario == "bot_heavy" and args.seed_data is not None and profile.bot_heavy:
        profile.bot_heavy.validate()
        bot_heavy.seed_crm(args.seed_data, profile.bot_heavy, tag)
    report = run_scenario(
        args.scenario,
        profile,
        args.url,
        secret,
        tag,
        ServerProbe(args.server_pid),
        lambda line: print(line, file=sys.stderr),
        args.workers,
    )
    data = msgspec.json.format(msgspec.json.encode(report), indent=2)
    if args.json is not None:
        args.json.write_bytes(data + b"\n")
    else:
        sys.stdout.write(data.decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
