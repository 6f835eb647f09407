"""``imserver crm``: the shop owner's CRM commands, usable while the server runs.

They write the CRM database the plugins read (DATA/workers/crm/crm.db, SQLite in
WAL mode; the bot looks orders up there on every question), so an order pushed
during a sale is what the next answer says. Formats: docs/CRM.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Final

CRM_DB: Final = Path("workers") / "crm" / "crm.db"
"""Where ``crm_db_path`` puts the database under the data directory (no ``db`` set)."""


def add_crm_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    crm = sub.add_parser("crm", help="CRM: import orders and customers, link chat users")
    crm.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("IMSERVER_DATA", "./data")),
        help="data directory (env IMSERVER_DATA, default ./data)",
    )
    crm.add_argument(
        "--db", type=Path, default=None, help="the CRM database (default DATA/workers/crm/crm.db)"
    )
    commands = crm.add_subparsers(dest="crm_command", required=True)
    for name, what in (("import-orders", "orders"), ("import-customers", "customers")):
        command = commands.add_parser(name, help=f"import {what} (CSV, JSON or JSON Lines)")
        command.add_argument("file", type=Path, help=f"the {what} file (docs/CRM.md)")
        command.add_argument(
            "--format",
            choices=["csv", "json", "jsonl"],
            default=None,
            help="default: from the file's suffix",
        )
        command.add_argument(
            "--encoding", default="utf-8-sig", help="file encoding (gbk for some Excel exports)"
        )
        if what == "orders":
            command.add_argument("--shop", default=None, help="shop of records without one")
            command.add_argument(
                "--naive-timezone",
                default="Asia/Shanghai",
                help="timezone of timestamps without an offset",
            )
    link = commands.add_parser("link", help="chat user USER is CRM customer CUSTOMER")
    link.add_argument("user", help="the chat user id (the token's subject)")
    link.add_argument("customer", help="the unified customer id")
    link.add_argument(
        "--merge",
        action="store_true",
        help="USER was linked to another customer: they are the same person, merge them",
    )
    whois = commands.add_parser("whois", help="the customer behind a chat user, and its orders")
    whois.add_argument("user", help="the chat user id")
    whois.add_argument("--channel", default="web", help="the channel they chat through")
    whois.add_argument("--shop", default=None, help="list this shop's recent orders")


def run_crm(args: argparse.Namespace) -> int:
    from .importer import ImportReport, import_customers, import_orders
    from .repository import CrmError, CrmRepository

    path: Path = args.db or args.data / CRM_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    with CrmRepository(path) as repo:
        try:
            if args.crm_command in ("import-orders", "import-customers"):
                report: ImportReport
                if args.crm_command == "import-orders":
                    report = import_orders(
                        repo,
                        args.file,
                        fmt=args.format,
                        shop=args.shop,
                        naive_timezone=args.naive_timezone,
                        encoding=args.encoding,
                    )
                else:
                    report = import_customers(
                        repo, args.file, fmt=args.format, encoding=args.encoding
                    )
                print(
                    f"imported {report.imported} (new {report.inserted}, updated"
                    f" {report.updated}, unchanged {report.unchanged}, stale {report.stale});"
                    f" customers created {report.customers_created}; rejected {report.rejected}"
                )
                for error in report.errors:
                    key = f" [{error.key}]" if error.key else ""
                    print(f"line {error.line}{key}: {error.message}", file=sys.stderr)
                return 1 if report.rejected else 0
            if args.crm_command == "link":
                changed = repo.link_chat_user(args.user, args.customer, merge=args.merge)
                print(f"{args.user} -> {args.customer}" + ("" if changed else " (already)"))
                return 0
            customer = repo.chat_customer(args.user, args.channel)
            known = repo.customer(customer) is not None
            print(f"{args.user} on {args.channel} -> {customer}" + ("" if known else " (new)"))
            for identity in repo.identities(customer):
                print(f"  identity {identity.channel}:{identity.external_id}")
            if args.shop:
                for order in repo.recent_orders(args.shop, customer):
                    print(f"  order {order.order_id}: {order.status}")
            return 0
        except (CrmError, ValueError, OSError) as exc:
            print(f"imserver crm: {exc}", file=sys.stderr)
            return 2
