"""The ``billing`` command: the service (``serve``) and the same operations as the HTTP API.

    billing serve [--host H] [--port P]           # prints ``READY {"url": ...}`` once it accepts connections
    billing scrape                                # scrape every target once (embedded mode)
    billing close PERIOD                          # PERIOD: 2026-11, START..END (ISO-8601 UTC) or previous-month
    billing invoices [--period P] [--partner ID] [--format json|csv]
    billing reconcile PERIOD

Settings come from ``BILLING_*`` environment variables (see ``billing.settings``). Exit codes: 0 ok,
2 bad arguments or settings, 3 period not complete yet, 4 a usage source failed, 5 pricing error, 6 a database
unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from billing.errors import BILLING_ERRORS, kind_of
from billing.invoices import CSV_HEADER
from billing.periods import previous_month
from billing.service import BillingService
from billing.settings import BillingSettings, SettingsError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billing", description="usage billing from the gateway's counters")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP API (and the scraper in embedded mode)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    commands.add_parser("scrape", help="scrape every target once")
    close = commands.add_parser("close", help="close a billing period (idempotent)")
    close.add_argument("period", help="YYYY-MM, START..END, or previous-month (the monthly CronJob)")
    invoices = commands.add_parser("invoices", help="print invoices")
    invoices.add_argument("--period")
    invoices.add_argument("--partner")
    invoices.add_argument("--format", choices=("json", "csv"), default="json")
    reconcile = commands.add_parser("reconcile", help="print the reconciliation report of a period")
    reconcile.add_argument("period")
    return parser


def _print(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _serve(settings: BillingSettings) -> int:
    import uvicorn

    from billing.api import create_app

    service = BillingService(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    url = f"http://{settings.host}:{port}"
    sock.listen(128)  # connections queue from now on: the address is usable before uvicorn's loop runs
    config = uvicorn.Config(create_app(service), log_level=settings.log_level.lower(), lifespan="on")
    server = uvicorn.Server(config)
    sys.stdout.write(f"billing: {url}  (mode {settings.mode}; invoices at {url}/v1/invoices)\n")
    sys.stdout.write("READY " + json.dumps({"url": url, "port": port}) + "\n")
    sys.stdout.flush()

    async def run() -> None:
        await server.serve(sockets=[sock])

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to these handlers: by then the
    # shutdown is done, so they let ``billing serve`` return normally (exit code 0, the store closed).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        asyncio.run(run())
    finally:
        service.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        if args.command == "serve":
            overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        settings = load_settings(**overrides)
    except SettingsError as exc:
        sys.stderr.write(f"billing: {exc}\n")
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape otherwise
    if args.command == "serve":
        return _serve(settings)
    service = BillingService(settings)
    try:
        if args.command == "scrape":
            if service.scraper is None:
                sys.stderr.write("billing: scrape needs BILLING_MODE=scrape\n")
                return 2
            _print(service.scraper.scrape_once())
        elif args.command == "close":
            period = previous_month(datetime.now(UTC)) if args.period == "previous-month" else args.period
            stored = service.close_period(period)
            _print({"period": stored[0].period if stored else period, "invoices": [i.partner for i in stored]})
        elif args.command == "invoices":
            found = service.invoices(args.period, args.partner)
            if args.format == "csv":
                rows = [line for item in found for line in item["csv"].splitlines()[1:]]  # one header for all
                sys.stdout.write("\n".join([",".join(CSV_HEADER), *rows]) + "\n")
            else:
                _print(found)
        else:
            _print(service.reconciliation(args.period))
    except BILLING_ERRORS as exc:
        kind = kind_of(exc)
        sys.stderr.write(f"billing: {kind.what}: {exc}\n")
        return kind.exit_code
    finally:
        service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
