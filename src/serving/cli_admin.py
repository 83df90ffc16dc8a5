"""Admin commands: ``serving partners|keys|plans ...`` against the partner store (SQLite or PostgreSQL).

Changes reach every running gateway replica within its auth cache TTL, without a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from serving.partners.store import PartnerNotFound, PartnerStore, PlanNotFound
from serving.plans import Plan, PlanError
from serving.settings import Settings
from serving.storage.database import Database


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _partner(store: PartnerStore, args: argparse.Namespace) -> None:
    command = args.partners_command
    if command == "create":
        partner, created = store.ensure_partner(args.name, args.plan)
        if not created:
            sys.exit(f"a partner named {args.name!r} already exists ({partner.id})")
        _print(vars(partner))
    elif command == "list":
        _print([vars(p) for p in store.partners()])
    elif command == "show":
        partner = store.partner(args.partner)
        keys = [{"key_id": k.key_id, "revoked": k.revoked, "created_at": k.created_at} for k in store.keys(partner.id)]
        _print({**vars(partner), "plan_limits": store.plan(partner.plan).as_dict(), "keys": keys})
    elif command == "set-plan":
        store.set_plan(store.partner(args.partner).id, args.plan)
        _print(vars(store.partner(args.partner)))
    elif command in ("disable", "enable"):
        store.set_disabled(store.partner(args.partner).id, command == "disable")
        _print(vars(store.partner(args.partner)))


def _keys(store: PartnerStore, args: argparse.Namespace) -> None:
    command = args.keys_command
    if command == "issue":
        try:
            partner = store.partner(args.partner)
        except PartnerNotFound:
            if not args.create:
                sys.exit(f"no partner named {args.partner!r}; add --create to create it")
            partner = store.create_partner(args.partner)
        print(store.issue_key(partner.id))
    elif command == "list":
        partner = store.partner(args.partner)
        _print([{"key_id": k.key_id, "revoked": k.revoked, "created_at": k.created_at} for k in store.keys(partner.id)])
    elif command == "revoke":
        if store.key(args.key_id) is None:
            sys.exit(f"no key {args.key_id!r}")
        _print({"key_id": args.key_id, "revoked": store.revoke_key(args.key_id)})
    elif command == "rotate":
        print(store.rotate_key(args.key_id))


def _plans(store: PartnerStore, args: argparse.Namespace) -> None:
    if args.plans_command == "list":
        _print([p.as_dict() for p in store.plans()])
        return
    plan = Plan(
        name=args.name,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_concurrent=args.concurrency,
        monthly_tokens=args.monthly_tokens,
        allowed_models=tuple(m for m in args.models.split(",") if m),
        weight=args.weight,
        ip_allowlist=tuple(c for c in args.ip_allowlist.split(",") if c),
    )
    store.put_plan(plan)
    _print(plan.as_dict())


def add_admin_commands(commands: Any, settings: Callable[[argparse.Namespace], Settings]) -> None:
    def runner(handler: Callable[[PartnerStore, argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        def run(args: argparse.Namespace) -> None:
            store = PartnerStore(Database(settings(args).partners_db_url))
            try:
                handler(store, args)
            except (PartnerNotFound, PlanNotFound, PlanError) as exc:
                sys.exit(str(exc))
            finally:
                store.close()

        return run

    partners = commands.add_parser("partners", help="partners").add_subparsers(dest="partners_command", required=True)
    create = partners.add_parser("create", help="create a partner")
    create.add_argument("name")
    create.add_argument("--plan", default="standard")
    partners.add_parser("list", help="list partners")
    for name in ("show", "disable", "enable"):
        partners.add_parser(name, help=f"{name} a partner").add_argument("partner", help="partner id or name")
    set_plan = partners.add_parser("set-plan", help="move a partner to another plan")
    set_plan.add_argument("partner")
    set_plan.add_argument("plan")
    for parser in partners.choices.values():
        parser.set_defaults(func=runner(_partner))

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    issue = keys.add_parser("issue", help="print a new API key for a partner")
    issue.add_argument("--partner", required=True)
    issue.add_argument("--create", action="store_true", help="create the partner when missing")
    keys.add_parser("list", help="a partner's keys").add_argument("--partner", required=True)
    keys.add_parser("revoke", help="revoke a key").add_argument("key_id")
    keys.add_parser("rotate", help="issue a replacement and revoke the old key").add_argument("key_id")
    for parser in keys.choices.values():
        parser.set_defaults(func=runner(_keys))

    plans = commands.add_parser("plans", help="plans").add_subparsers(dest="plans_command", required=True)
    plans.add_parser("list", help="list plans")
    put = plans.add_parser("set", help="create or change a plan (0 = unlimited)")
    put.add_argument("name")
    put.add_argument("--rpm", type=int, default=0, help="requests per minute")
    put.add_argument("--tpm", type=int, default=0, help="tokens per minute (input + output)")
    put.add_argument("--concurrency", type=int, default=0, help="max concurrent requests")
    put.add_argument("--monthly-tokens", dest="monthly_tokens", type=int, default=0)
    put.add_argument("--models", default="", help="comma-separated allowed models (empty: all)")
    put.add_argument("--weight", type=float, default=1.0, help="fair-queuing weight")
    put.add_argument("--ip-allowlist", dest="ip_allowlist", default="", help="comma-separated CIDRs")
    for parser in plans.choices.values():
        parser.set_defaults(func=runner(_plans))
