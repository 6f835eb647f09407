"""Command line: ``imserver serve | token | shop | export | chat``.

Every flag has an environment variable (shown in ``--help``) so that the
same binary runs under systemd, containers and tests unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import os
import re
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from protocol import Channel, Role

from . import logs
from .auth import mint_token
from .limits import GC_THRESHOLDS, MAX_ID_CHARS, RETENTION_DAYS, SHARD_COUNT
from .server import DB_FILE, Server, ServerConfig, StartupError, load_or_create_secret

WORKER_FAILED_EXIT = 3
"""Exit code of ``imserver worker`` when its plugin cannot start or fails."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(_env("IMSERVER_DATA", "./data") or "./data"),
        help="data directory: SQLite database and token secret (env IMSERVER_DATA, default ./data)",
    )
    parser.add_argument(
        "--secret",
        default=_env("IMSERVER_SECRET"),
        help="token signing secret, at least 32 bytes (env IMSERVER_SECRET; "
        "default: DATA/secret, created on first use)",
    )


def _shop_file(text: str) -> tuple[str, str]:
    shop, eq, where = text.partition("=")
    if not eq or not shop or not where:
        raise argparse.ArgumentTypeError(f"{text!r}: want SHOP=PATH or SHOP=URL")
    return shop, where


def _secret(args: argparse.Namespace) -> bytes:
    if args.secret:
        return str(args.secret).encode()
    return load_or_create_secret(args.data)


def _version() -> str:
    try:
        return importlib.metadata.version("imserver")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imserver", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (embedded: one process, SQLite)")
    _add_data(serve)
    serve.add_argument(
        "--host",
        default=_env("IMSERVER_HOST", "127.0.0.1"),
        help="listen address (env IMSERVER_HOST, default 127.0.0.1)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(_env("IMSERVER_PORT", "8080") or 8080),
        help="listen port, 0 for any free port (env IMSERVER_PORT, default 8080)",
    )
    serve.add_argument(
        "--cert",
        type=Path,
        default=_env("IMSERVER_CERT"),
        help="TLS certificate chain, PEM (env IMSERVER_CERT); enables wss://",
    )
    serve.add_argument(
        "--key",
        type=Path,
        default=_env("IMSERVER_KEY"),
        help="TLS private key, PEM (env IMSERVER_KEY)",
    )
    serve.add_argument(
        "--retention-days",
        type=int,
        default=int(_env("IMSERVER_RETENTION_DAYS", str(RETENTION_DAYS)) or RETENTION_DAYS),
        help=f"delete messages older than this (env IMSERVER_RETENTION_DAYS, default {RETENTION_DAYS})",
    )
    serve.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL"],
        default=_env("IMSERVER_SYNCHRONOUS", "FULL"),
        help="SQLite durability: FULL survives power loss, NORMAL survives process "
        "crashes only (env IMSERVER_SYNCHRONOUS, default FULL)",
    )
    serve.add_argument(
        "--shards", type=int, default=SHARD_COUNT, help=f"shard count (default {SHARD_COUNT})"
    )
    serve.add_argument(
        "--log-level",
        default=_env("IMSERVER_LOG_LEVEL", "info"),
        help="debug, info, warning, error (env IMSERVER_LOG_LEVEL)",
    )
    serve.add_argument(
        "--shops",
        default=_env("IMSERVER_SHOPS", ""),
        help="comma-separated shops to register at start, e.g. shop1,shop2 "
        "(env IMSERVER_SHOPS); conversations with unregistered shops are "
        "refused (see also `imserver shop add`)",
    )
    serve.add_argument(
        "--workers",
        default=_env("IMSERVER_WORKERS", ""),
        help="comma-separated worker plugins to run as supervised child processes, "
        "e.g. bot,routing,crm (env IMSERVER_WORKERS)",
    )
    serve.add_argument(
        "--workers-config",
        type=Path,
        default=_env("IMSERVER_WORKERS_CONFIG"),
        help="YAML file with per-plugin settings (env IMSERVER_WORKERS_CONFIG)",
    )
    serve.add_argument(
        "--jwks",
        action="append",
        type=_shop_file,
        default=[_shop_file(item) for item in (_env("IMSERVER_JWKS") or "").split(",") if item],
        metavar="SHOP=PATH|URL",
        help="the JWKS (file, or http(s) URL) with the public keys shop SHOP's backend signs "
        "its tokens with; repeatable (env IMSERVER_JWKS, comma-separated). "
        "DATA/jwks/SHOP.json is read too",
    )

    worker = sub.add_parser("worker", help="run one worker plugin (asyncio + uvloop)")
    _add_data(worker)
    worker.add_argument(
        "name", help="plugin name (entry point in group imserver.workers), or package.module:Class"
    )
    worker.add_argument(
        "--server",
        default=_env("IMSERVER_URL", "ws://127.0.0.1:8080/ws"),
        help="server URL (env IMSERVER_URL)",
    )
    worker.add_argument(
        "--token",
        default=_env("IMSERVER_WORKER_TOKEN"),
        help="worker token (env IMSERVER_WORKER_TOKEN); default: minted from the secret",
    )
    worker.add_argument(
        "--config",
        type=Path,
        default=_env("IMSERVER_WORKERS_CONFIG"),
        help="YAML file with per-plugin settings (env IMSERVER_WORKERS_CONFIG)",
    )
    worker.add_argument(
        "--log-level",
        default=_env("IMSERVER_LOG_LEVEL", "info"),
        help="debug, info, warning, error (env IMSERVER_LOG_LEVEL)",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="also serve this worker's Prometheus metrics on this port (a worker away from "
        "the server's data directory; nearby ones are on the server's /metrics)",
    )
    sub.add_parser("plugins", help="list installed worker plugins")

    token = sub.add_parser("token", help="mint a development token")
    _add_data(token)
    token.add_argument("user", help="user id")
    token.add_argument("--role", choices=[r.value for r in Role], default="customer")
    token.add_argument(
        "--shop",
        default="",
        help="the shop: staff's and workers' own; a customer's binds them to it (default none)",
    )
    token.add_argument(
        "--all-shops",
        action="store_true",
        help="worker or admin only: every shop (shop '*'); never a default",
    )
    token.add_argument("--plugin", default="", help="worker only: the plugin it may join as")
    token.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds")
    token.add_argument("--once", action="store_true", help="single use (refused if replayed)")

    shop = sub.add_parser("shop", help="register shops (tenants) or list them")
    shop_sub = shop.add_subparsers(dest="shop_command", required=True)
    shop_add = shop_sub.add_parser("add", help="register shops (works while a server runs)")
    _add_data(shop_add)
    shop_add.add_argument("names", nargs="+", help="shop ids")
    shop_list = shop_sub.add_parser("list", help="list the registered shops")
    _add_data(shop_list)

    export = sub.add_parser("export", help="export history to JSON Lines or CSV")
    _add_data(export)
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--conv", help="one conversation id")
    which.add_argument("--shop", help="every conversation of a shop")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--since-ms", type=int, default=None, help="shop export: from this time")
    export.add_argument("--out", type=Path, default=None, help="output file (default stdout)")

    chat = sub.add_parser("chat", help="a small terminal chat for demos")
    _add_data(chat)
    chat.add_argument(
        "--url",
        default=_env("IMSERVER_URL", "ws://127.0.0.1:8080/ws"),
        help="server URL (env IMSERVER_URL)",
    )
    chat.add_argument("user", help="who you are")
    chat.add_argument("--role", choices=["customer", "agent", "supervisor"], default="customer")
    chat.add_argument("--shop", required=True, help="the shop to talk to (customer) or work for")
    chat.add_argument("--conv", default=None, help="agent: the conversation to claim and join")
    chat.add_argument(
        "--channel",
        choices=[c.value for c in Channel],
        default="web",
        help="customer: the channel you chat through (the CRM knows you as CHANNEL:USER)",
    )
    from workers.crm.cli import add_crm_parser

    add_crm_parser(sub)
    add_env_defaults(parser)
    return parser


_ENV_IN_HELP = re.compile(r"\benv (IMSERVER_[A-Z0-9_]+)")
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


def env_var_of(action: argparse.Action) -> str | None:
    """The environment variable an option reads (named in its help), if any."""
    found = _ENV_IN_HELP.search(action.help or "")
    return found.group(1) if found else None


def add_env_defaults(parser: argparse.ArgumentParser, command: str = "") -> None:
    """Give every option of every subcommand an environment variable.

    Options that name theirs in the help (``env IMSERVER_PORT``) read it already;
    the others get ``IMSERVER_<OPTION>`` (``serve``) or ``IMSERVER_<COMMAND>_<OPTION>``
    (other subcommands; nested ones ``IMSERVER_SHOP_ADD_<OPTION>``), read here as the default and named in ``--help``. A flag
    given on the command line still wins. ``tests/imserver/test_operations.py``
    walks the parser and fails on an option without one.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                add_env_defaults(subparser, f"{command}_{name}" if command else name)
            continue
        if not action.option_strings or action.default == argparse.SUPPRESS:
            continue  # positionals, --help, --version
        if env_var_of(action) is not None:
            continue
        option = max(action.option_strings, key=len).lstrip("-").upper().replace("-", "_")
        prefix = "" if command == "serve" else f"{command.upper().replace('-', '_')}_"
        name = f"IMSERVER_{prefix}{option}"
        value = os.environ.get(name)
        if value is not None:
            if action.nargs == 0:  # store_true / store_false
                action.default = (value.strip().lower() in _TRUE_WORDS) == action.const
            else:  # a string default goes through the option's type, as if typed
                action.default = value
            action.required = False
        action.help = f"{action.help or ''} (env {name})".strip()
    for group in parser._mutually_exclusive_groups:  # one of them set by its variable
        if any(env_var_of(a) in os.environ for a in group._group_actions):
            group.required = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    if args.command == "shop":
        return _shop(args)
    if args.command == "export":
        return _export(args)
    if args.command == "worker":
        return _worker(args)
    if args.command == "plugins":
        from workers.sdk import available

        for name, target in sorted(available().items()):
            print(f"{name}\t{target}")
        return 0
    if args.command == "crm":
        from workers.crm.cli import run_crm

        return run_crm(args)
    if args.command == "chat":
        from .chat import run_chat

        return run_chat(args, _secret(args))
    raise AssertionError(args.command)


def _token(args: argparse.Namespace) -> int:
    role = Role(args.role)
    if args.all_shops and role not in (Role.WORKER, Role.ADMIN):
        print("--all-shops is for worker and admin tokens only", file=sys.stderr)
        return 2
    if args.all_shops and args.shop:
        print("give --shop or --all-shops, not both", file=sys.stderr)
        return 2
    if args.shop == "*":  # all-shops power is asked for by name, never spelled as a shop
        print("use --all-shops for every shop", file=sys.stderr)
        return 2
    shop = "*" if args.all_shops else args.shop
    try:
        token = mint_token(
            _secret(args),
            user=args.user,
            role=role,
            shop=shop,
            ttl_s=args.ttl,
            once=args.once,
            plugin=args.plugin,
        )
    except ValueError as exc:
        hint = " (--all-shops for every shop)" if role in (Role.WORKER, Role.ADMIN) else ""
        print(f"{exc}{hint}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _tune_gc() -> None:
    """Tens of thousands of long-lived connection objects make every full
    collection slow (a visible latency spike): move what exists at start-up out
    of the collector's sight and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _serve(args: argparse.Namespace) -> int:
    """Run the server; a start-up problem (data dir in use, corrupt database,
    address in use, unreadable certificate) is one line on stderr and exit 1."""
    failed: list[StartupError] = []
    code = 1
    try:
        code = _run_server(args)
    except* StartupError as group:
        failed += [e for e in group.exceptions if isinstance(e, StartupError)]
    if failed:
        print(f"imserver: {failed[0]}", file=sys.stderr)
        return 1
    return code


def _run_server(args: argparse.Namespace) -> int:
    logs.setup(args.log_level)
    _tune_gc()
    try:
        secret = _secret(args)
    except OSError as exc:
        raise StartupError(f"cannot read or create the secret in {args.data}: {exc}") from None
    config = ServerConfig(
        data_dir=args.data,
        secret=secret,
        host=args.host,
        port=args.port,
        cert=args.cert,
        key=args.key,
        retention_days=args.retention_days,
        synchronous=args.synchronous,
        shards=args.shards,
        shops=_shop_names(args.shops),
        jwks=dict(args.jwks),
    )
    try:
        server = Server(config)
    except ValueError as exc:  # a shop's JWKS file: one line, not a traceback
        print(f"imserver: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the data dir is not one (the shops' keys are read from it)
        raise StartupError(f"cannot use data directory {args.data}: {exc}") from None

    plugins = [name.strip() for name in args.workers.split(",") if name.strip()]
    from workers.metrics import METRICS_DIR, WorkerFilesCollector

    from .metrics import METRICS

    # Workers on this data directory write their metrics files there (workers/metrics.py).
    METRICS.registry.register(WorkerFilesCollector(args.data / METRICS_DIR))

    async def run() -> None:
        from .supervisor import WorkerStates, supervise

        states = WorkerStates()
        for name in plugins:
            states.of(name)
        if plugins:
            server.worker_health = states.health

        until_drained = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[str]) -> None:
            try:
                await server.serve(task_status=task_status)
            finally:
                until_drained.cancel()

        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve)
            print(f"imserver listening on {url}", flush=True)
            workers = trio.CancelScope()

            async def run_workers() -> None:
                with workers:
                    async with trio.open_nursery() as children:
                        for name in plugins:
                            children.start_soon(
                                partial(
                                    supervise,
                                    name,
                                    url=url,
                                    secret=config.secret,
                                    data_dir=args.data,
                                    config=args.workers_config,
                                    states=states,
                                )
                            )

            nursery.start_soon(run_workers)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    workers.cancel()
                    server.stop()
                    break
                # Taken and ignored while the server drains (bounded by DRAIN_TIMEOUT_S
                # and CLOSE_LINGER_S): a second SIGTERM must not kill a clean drain, and
                # a signal left pending when the receiver closes would be redelivered.
                with until_drained:
                    async for _ in signals:
                        pass

    trio.run(run)
    return 0


def _worker(args: argparse.Namespace) -> int:
    """Run one plugin. A plugin that cannot start (not installed, a missing dependency,
    bad settings, its ``setup`` failing) is one JSON log line and exit code 3, never a
    traceback: the supervisor shows it in ``/healthz`` and restarts with backoff."""
    import asyncio
    import logging

    from workers.sdk import WorkerRunner, load

    logs.setup(args.log_level)
    logging.getLogger("imserver.worker").setLevel(args.log_level.upper())
    log = logging.getLogger("imserver.worker.main")
    stage = "load"
    try:
        plugin_cls = load(args.name)
        stage = "config"
        config: dict[str, object] = {}
        if args.config:
            import yaml

            loaded = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
            config = dict(loaded.get(args.name, {})) if isinstance(loaded, dict) else {}
        if args.token:
            token = str(args.token)

            def token_provider() -> str:
                return token
        else:
            secret = _secret(args)

            def token_provider() -> str:
                return mint_token(
                    secret,
                    user=f"worker:{plugin_cls.name}",
                    role="worker",
                    shop="*",
                    plugin=plugin_cls.name,
                    ttl_s=24 * 3600,
                )

        runner = WorkerRunner(
            plugin_cls(),
            url=args.server,
            token=token_provider,
            data_dir=args.data / "workers" / plugin_cls.name,
            config=config,
        )
        stage = "run"
        from workers import metrics

        if args.metrics_port is not None:
            import prometheus_client

            prometheus_client.start_http_server(args.metrics_port, registry=metrics.REGISTRY)
        writer = metrics.FileWriter(args.data, plugin_cls.name)
        try:
            try:
                import uvloop
            except ImportError:  # uvloop is optional outside Linux/macOS
                asyncio.run(runner.run())
            else:
                uvloop.run(runner.run())
        finally:
            writer.close()
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        logs.event(
            log,
            "worker_failed",
            level=logging.ERROR,
            plugin=args.name,
            stage=stage,
            error=f"{type(exc).__name__}: {exc}",
        )
        return WORKER_FAILED_EXIT
    return 0


def _shop_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    for name in names:
        if not _valid_shop(name):
            raise SystemExit(f"imserver: not a shop id: {name!r}")
    return names


def _valid_shop(name: str) -> bool:
    return 0 < len(name) <= MAX_ID_CHARS and name != "*" and not any(ord(ch) < 0x20 for ch in name)


def _shop(args: argparse.Namespace) -> int:
    from .store import add_shops, read_shops

    db = args.data / DB_FILE
    if args.shop_command == "add":
        bad = [name for name in args.names if not _valid_shop(name)]
        if bad:
            print(f"not a shop id: {bad[0]!r}", file=sys.stderr)
            return 2
        args.data.mkdir(parents=True, exist_ok=True)
        added = add_shops(db, args.names)
        print(f"registered {added} new shop(s)", file=sys.stderr)
        return 0
    if not db.exists():
        print(f"no database at {db}", file=sys.stderr)
        return 2
    for name in read_shops(db):
        print(name)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .store import export_conversation, export_shop

    db = args.data / DB_FILE
    if not db.exists():
        print(f"no database at {db}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        out = (
            stack.enter_context(open(args.out, "w", newline="", encoding="utf-8"))
            if args.out
            else sys.stdout
        )
        if args.conv:
            count = export_conversation(db, args.conv, out, args.format)
        else:
            count = export_shop(db, args.shop, out, args.format, since_ms=args.since_ms)
    print(f"exported {count} messages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
