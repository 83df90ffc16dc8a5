"""Admin commands: ``serving partners|keys|plans|oauth-clients|signing-keys|operators|audit ...``, straight on the
partner store (SQLite or PostgreSQL), through the same ``Admin`` service as the admin API: the same role checks
and the same audit record for every change.

With an operator token (``--token`` or ``SERVING_OPERATOR_TOKEN``) a command runs with that operator's role and is
recorded as theirs. Without one it runs as the local owner ``local:<OS user>``: whoever holds the database
credentials has owner power anyway (they could write the tables directly), so the CLI does not pretend otherwise,
and still records who ran it. Changes reach every running gateway replica within its auth cache TTL, no restart.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from serving.admin.audit import AuditQuery, parse_instant
from serving.admin.operators import Role
from serving.admin.service import Actor, Admin, domain_errors, local_owner
from serving.admin.views import client_view, credit_view, operator_view, partner_view
from serving.errors import NotFound, ServingError
from serving.identity.scopes import parse_scopes
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.settings import Settings
from serving.storage.database import Database

TOKEN_ENV = "SERVING_OPERATOR_TOKEN"  # Settings.operator_token: the caller's credential, like --token

Handler = Callable[[Admin, Actor, argparse.Namespace], None]


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _scopes(raw: str | None) -> frozenset[str] | None:
    """``embed,generate`` (commas or spaces); None when the option was not given."""
    return None if raw is None else parse_scopes(raw.replace(",", " "))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except OSError:  # no login name in the environment or the password database (some containers)
        return f"uid-{os.getuid()}"


def _actor(admin: Admin, args: argparse.Namespace, settings: Settings) -> Actor:
    token = args.token or settings.operator_token
    return admin.authenticate(token) if token else local_owner(_os_user())


def _partners(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    command = args.partners_command
    if command == "create":
        _print(partner_view(admin.create_partner(actor, args.name, args.plan)))
    elif command == "list":
        _print([partner_view(p) for p in admin.partners(actor)])
    elif command == "show":
        partner = admin.partner(actor, args.partner)
        keys = [key.public() for key in admin.keys(actor, partner.id)]
        plan = admin.plan(actor, partner.plan).as_dict()
        _print({**partner_view(partner), "plan_limits": plan, "keys": keys})
    elif command == "set-plan":
        _print(partner_view(admin.set_plan(actor, args.partner, args.plan)))
    elif command in ("disable", "enable"):
        _print(partner_view(admin.set_partner_disabled(actor, args.partner, command == "disable")))


def _keys(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    command = args.keys_command
    if command == "issue":
        scopes = _scopes(args.scopes)
        try:
            partner = admin.partner(actor, args.partner)
        except NotFound:
            if not args.create:
                sys.exit(f"no partner named {args.partner!r}; add --create to create it")
            partner = admin.create_partner(actor, args.partner)
        print(admin.issue_key(actor, partner.id, scopes)[0])
    elif command == "list":
        partner = admin.partner(actor, args.partner)
        _print([key.public() for key in admin.keys(actor, partner.id)])
    elif command == "revoke":
        _print({"key_id": args.key_id, "revoked": admin.revoke_key(actor, args.key_id)})
    elif command == "rotate":
        print(admin.rotate_key(actor, args.key_id)[0])


def _plans(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    if args.plans_command == "list":
        _print([p.as_dict() for p in admin.plans(actor)])
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
        prepaid=args.prepaid,
    )
    _print(admin.put_plan(actor, plan).as_dict())


def _credits(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    if args.credits_command == "list":
        _print([credit_view(g) for g in admin.credit_grants(actor, args.partner)])
        return
    expires = None if args.expires is None else parse_instant(args.expires, "--expires")
    grant = admin.grant_credit(actor, args.partner, args.kind, args.amount, args.priority, expires, args.note)
    _print(credit_view(grant))


def _clients(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    command = args.clients_command
    if command == "create":
        client, secret = admin.create_client(actor, args.partner, args.name, _scopes(args.scopes) or frozenset())
        _print({**client_view(client), "client_secret": secret})  # the only time the secret is shown
    elif command == "list":
        _print([client_view(c) for c in admin.clients(actor, args.partner)])
    elif command == "show":
        _print(client_view(admin.client(actor, args.client_id)))
    elif command in ("disable", "enable"):
        _print(client_view(admin.set_client_disabled(actor, args.client_id, command == "disable")))


def _signing_keys(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    if args.signing_command == "rotate":
        kid, retired = admin.rotate_signing_key(actor)
        _print({"kid": kid, "retired": retired})
    else:
        _print(admin.signing_keys(actor))


def _operators(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    command = args.operators_command
    if command == "create":
        operator, token = admin.create_operator(actor, args.name, Role.parse(args.role))
        _print({**operator_view(operator), "token": token})  # the only time the token is shown
    elif command == "list":
        _print([operator_view(o) for o in admin.operator_list(actor)])
    elif command == "set-role":
        _print(operator_view(admin.set_operator_role(actor, args.name, Role.parse(args.role))))
    elif command in ("disable", "enable"):
        _print(operator_view(admin.set_operator_disabled(actor, args.name, command == "disable")))


def _audit(admin: Admin, actor: Actor, args: argparse.Namespace) -> None:
    query = AuditQuery.parse(args.actor, args.action, args.target, args.since, args.until, args.limit)
    _print([record.as_dict() for record in admin.audit(actor, query)])


def _group(commands: Any, name: str, help_: str, dest: str) -> Any:
    return commands.add_parser(name, help=help_, description=help_).add_subparsers(dest=dest, required=True)


def add_admin_commands(
    commands: Any, settings: Callable[[argparse.Namespace], Settings], clock: Callable[[], float] = time.time
) -> None:
    """``clock`` stamps audit records (tests pass their own)."""

    def runner(handler: Handler) -> Callable[[argparse.Namespace], None]:
        def run(args: argparse.Namespace) -> None:
            resolved = settings(args)
            store = PartnerStore(Database(resolved.partners_db_url))
            try:
                admin = Admin(store, resolved.admin_token, clock=clock)
                with domain_errors():
                    handler(admin, _actor(admin, args, resolved), args)
            except ServingError as exc:
                sys.exit(exc.message)
            finally:
                store.close()

        return run

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--token",
        help=f"an operator token (default ${TOKEN_ENV}): run with that operator's role, recorded as them. Without"
        " one the command runs as the local owner local:<OS user>: whoever holds the database credentials has owner"
        " power anyway",
    )

    def leaf(group: Any, name: str, help_: str, handler: Handler) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, help=help_, parents=[common])
        parser.set_defaults(func=runner(handler))
        return parser

    partners = _group(commands, "partners", "partners", "partners_command")
    create = leaf(partners, "create", "create a partner", _partners)
    create.add_argument("name")
    create.add_argument("--plan", default="standard")
    leaf(partners, "list", "list partners", _partners)
    for name in ("show", "disable", "enable"):
        leaf(partners, name, f"{name} a partner", _partners).add_argument("partner", help="partner id or name")
    set_plan = leaf(partners, "set-plan", "move a partner to another plan", _partners)
    set_plan.add_argument("partner")
    set_plan.add_argument("plan")

    keys = _group(commands, "keys", "API keys", "keys_command")
    issue = leaf(keys, "issue", "print a new API key for a partner", _keys)
    issue.add_argument("--partner", required=True)
    issue.add_argument("--create", action="store_true", help="create the partner when missing")
    issue.add_argument("--scopes", help="comma-separated scopes, e.g. embed,generate (default: every scope)")
    leaf(keys, "list", "a partner's keys", _keys).add_argument("--partner", required=True)
    leaf(keys, "revoke", "revoke a key", _keys).add_argument("key_id")
    leaf(keys, "rotate", "issue a replacement and revoke the old key", _keys).add_argument("key_id")

    plans = _group(commands, "plans", "plans", "plans_command")
    leaf(plans, "list", "list plans", _plans)
    put = leaf(plans, "set", "create or change a plan (0 = unlimited)", _plans)
    put.add_argument("name")
    put.add_argument("--rpm", type=int, default=0, help="requests per minute")
    put.add_argument("--tpm", type=int, default=0, help="tokens per minute (input + output)")
    put.add_argument("--concurrency", type=int, default=0, help="max concurrent requests")
    put.add_argument("--monthly-tokens", dest="monthly_tokens", type=int, default=0)
    put.add_argument("--models", default="", help="comma-separated allowed models (empty: all)")
    put.add_argument("--weight", type=float, default=1.0, help="fair-queuing weight")
    put.add_argument("--ip-allowlist", dest="ip_allowlist", default="", help="comma-separated CIDRs")
    put.add_argument("--prepaid", action="store_true", help="hold each request's maximum cost from the credit balance")

    credit = _group(commands, "credits", "credit grants (purchased or promotional money)", "credits_command")
    give = leaf(credit, "grant", "grant credit to a partner", _credits)
    give.add_argument("--partner", required=True, help="partner id or name")
    give.add_argument("--amount", required=True, help='decimal, in the price book currency, e.g. "25.00"')
    give.add_argument("--kind", required=True, choices=["purchased", "promotional"])
    give.add_argument("--priority", type=int, default=100, help="lower is drawn first (default 100)")
    give.add_argument("--expires", help="ISO-8601 or epoch seconds (default: never)")
    give.add_argument("--note", default="")
    leaf(credit, "list", "a partner's grants, in draw order", _credits).add_argument("--partner", required=True)

    clients = _group(commands, "oauth-clients", "OAuth clients (client credentials)", "clients_command")
    client = leaf(clients, "create", "create a client; prints its secret, the only time it is shown", _clients)
    client.add_argument("partner", help="partner id or name")
    client.add_argument("--name", required=True)
    client.add_argument("--scopes", required=True, help="comma-separated scopes, e.g. embed,generate")
    leaf(clients, "list", "list clients", _clients).add_argument("--partner", help="only this partner's")
    for name in ("show", "disable", "enable"):
        leaf(clients, name, f"{name} a client", _clients).add_argument("client_id")

    signing = _group(commands, "signing-keys", "access token signing keys", "signing_command")
    leaf(signing, "rotate", "add a signing key; retire all but it and its predecessor (owner)", _signing_keys)
    leaf(signing, "list", "the verifying keys (public information)", _signing_keys)

    operators = _group(commands, "operators", "operators of the admin API and CLI (owner)", "operators_command")
    new = leaf(operators, "create", "create an operator; prints its token, the only time it is shown", _operators)
    new.add_argument("name")
    new.add_argument("--role", required=True, choices=[role.label for role in Role])
    leaf(operators, "list", "list operators", _operators)
    set_role = leaf(operators, "set-role", "change an operator's role", _operators)
    set_role.add_argument("name")
    set_role.add_argument("role", choices=[role.label for role in Role])
    for name in ("disable", "enable"):
        leaf(operators, name, f"{name} an operator (a disabled one's token is refused)", _operators).add_argument(
            "name"
        )

    audit = _group(commands, "audit", "the audit log of admin changes", "audit_command")
    listing = leaf(audit, "list", "audit records, newest first", _audit)
    listing.add_argument("--actor", help="operator name, admin-token or local:<user>")
    listing.add_argument("--action", help="e.g. partner.create, key.issue")
    listing.add_argument("--target", help="a kind (partner, key, ...) or kind:id")
    listing.add_argument("--since", help="ISO-8601 or epoch seconds (inclusive)")
    listing.add_argument("--until", help="ISO-8601 or epoch seconds (exclusive)")
    listing.add_argument("--limit", type=int, help="at most this many (default 100, max 1000)")
