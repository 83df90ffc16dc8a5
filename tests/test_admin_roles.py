"""Who may call which admin route: for every route of the admin API, each role (viewer < operator < owner, and the
legacy admin token as an owner) gets the route's success status or 403 naming the role needed and the caller's;
no token, a wrong one, an unknown or disabled operator's token get 401; partner API keys and OAuth access tokens
403. The table is checked against the router, so a new route cannot ship without a role decision. The CLI applies
the same roles to an operator's token and runs as the local owner without one."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from admin_support import ADMIN_TOKEN, AdminWorld, admin_world
from fastapi.routing import APIRoute

from serving.admin.operators import OperatorStore, Role
from serving.gateway.http_admin import admin_router
from serving.identity.scopes import parse_scopes
from serving.identity.tokens import TokenIssuer
from serving.partners.store import PartnerStore
from serving.storage.database import Database

VIEWER, OPERATOR, OWNER = Role.VIEWER, Role.OPERATOR, Role.OWNER
_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # the router's template; {partner_id}, {key_id}, {client_id}, {name} are filled from the world
    needs: Role
    ok: int  # the status of an allowed call
    body: Callable[[], Any] | None = None
    params: dict[str, str] | None = None


ROUTES = [
    Route("GET", "/partners", VIEWER, 200),
    Route("POST", "/partners", OPERATOR, 201, lambda: {"name": unique("partner")}),
    Route("GET", "/partners/{partner_id}", VIEWER, 200),
    Route("POST", "/partners/{partner_id}/plan", OPERATOR, 200, lambda: {"plan": "free"}),
    Route("POST", "/partners/{partner_id}/disabled", OPERATOR, 200, lambda: {"disabled": False}),
    Route("POST", "/partners/{partner_id}/keys", OPERATOR, 201, lambda: {"scopes": ["embed"]}),
    Route("POST", "/keys/{key_id}/revoke", OPERATOR, 200),
    Route("POST", "/keys/{key_id}/rotate", OPERATOR, 201),
    Route("GET", "/plans", VIEWER, 200),
    Route("PUT", "/plans/{name}", OPERATOR, 200, lambda: {"requests_per_minute": 5}),
    Route("GET", "/usage", VIEWER, 200, params={"start_day": "2026-01-01", "end_day": "2026-01-31"}),
    Route("GET", "/partners/{partner_id}/credits", VIEWER, 200),
    Route("POST", "/partners/{partner_id}/credits", OPERATOR, 201, lambda: {"kind": "promotional", "amount": "1.50"}),
    Route("POST", "/partners/{partner_id}/oauth-clients", OPERATOR, 201, lambda: {"name": "c", "scopes": ["embed"]}),
    Route("GET", "/oauth-clients", VIEWER, 200),
    Route("GET", "/oauth-clients/{client_id}", VIEWER, 200),
    Route("POST", "/oauth-clients/{client_id}/disabled", OPERATOR, 200, lambda: {"disabled": False}),
    Route("GET", "/signing-keys", VIEWER, 200),
    Route("POST", "/signing-keys/rotate", OWNER, 201),
    Route("GET", "/operators", OWNER, 200),
    Route("POST", "/operators", OWNER, 201, lambda: {"name": unique("op"), "role": "viewer"}),
    Route("POST", "/operators/{name}/role", OWNER, 200, lambda: {"role": "viewer"}),
    Route("POST", "/operators/{name}/disabled", OWNER, 200, lambda: {"disabled": False}),
    Route("GET", "/audit", VIEWER, 200),
]


@dataclass
class Targets:
    """Existing things the routes act on, and the partner credentials that must be refused."""

    values: dict[str, str]
    api_key: str
    access_token: str
    disabled_operator_token: str


@pytest_asyncio.fixture
async def world(tmp_path: Path) -> AsyncIterator[AdminWorld]:
    async with admin_world(tmp_path) as world:
        yield world


def targets(world: AdminWorld, route: Route) -> Targets:
    store = world.store
    partner = store.create_partner(unique("acme"))
    key = store.issue_key(partner.id)
    client, secret = store.clients.create(partner.id, "app", parse_scopes("embed"))
    issuer = TokenIssuer(store.client_owner, store.signing.signing_key, "https://test", 300.0)
    access_token = str(issuer.issue(client.client_id, secret, None)["access_token"])
    operators = OperatorStore(store.db)
    target_operator = unique("target")
    operators.create(target_operator, Role.OPERATOR)
    gone = unique("gone")
    _, gone_token = operators.create(gone, Role.OWNER)
    operators.set_disabled(gone, True)
    name = target_operator if route.path.startswith("/operators") else "team"
    values = {"partner_id": partner.id, "key_id": key.split("_")[1], "client_id": client.client_id, "name": name}
    return Targets(values, key, access_token, gone_token)


def test_the_table_covers_every_route(tmp_path: Path) -> None:
    store = PartnerStore(Database(str(tmp_path / "p.db")))
    try:
        router = admin_router(store, store.db, None)
        served = {
            (method, route.path.removeprefix("/admin/v1"))
            for route in router.routes
            if isinstance(route, APIRoute)
            for method in route.methods or ()
        }
    finally:
        store.close()
    assert served == {(r.method, r.path) for r in ROUTES}


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_route_roles(world: AdminWorld, route: Route) -> None:
    found = targets(world, route)
    path = route.path.format(**found.values)
    params = dict(route.params or {})
    if route.path == "/usage":
        params["partner"] = found.values["partner_id"]

    async def call(token: str | None) -> tuple[int, dict[str, Any]]:
        reply = await world.call(route.method, path, token, route.body() if route.body else None, params)
        return reply.status_code, reply.json()

    for token in (None, "not-a-token", "sop_000000000000_" + "A" * 43, found.disabled_operator_token):
        status, body = await call(token)
        assert (status, body["error"]["type"]) == (401, "authentication_error"), (token, body)
    for token in (found.api_key, found.access_token):
        status, body = await call(token)
        assert status == 403
        assert body["error"]["message"] == (
            "partner API keys and access tokens are not accepted here; use an operator token"
        )
    callers = [("vera", VIEWER), ("olga", OPERATOR), ("owen", OWNER), ("admin-token", OWNER)]
    for name, role in callers:
        token = ADMIN_TOKEN if name == "admin-token" else world.tokens[role.label]
        status, body = await call(token)
        if role >= route.needs:
            assert status == route.ok, (name, body)
        else:
            assert status == 403, (name, body)
            assert body["error"] == {
                "message": f"this needs the {route.needs.label} role; {name} has the {role.label} role",
                "type": "permission_error",
                "code": "permission_denied",
                "param": "authorization",
            }


async def test_role_is_checked_before_the_body(world: AdminWorld) -> None:
    """A viewer's malformed change is refused for the role (403), not for the body (400)."""
    reply = await world.call("POST", "/partners", world.tokens["viewer"], {"nope": 1})
    assert reply.status_code == 403
    reply = await world.call("POST", "/partners", world.tokens["operator"], {"nope": 1})
    assert reply.status_code == 400


async def test_without_the_legacy_token_operators_still_work(tmp_path: Path) -> None:
    async with admin_world(tmp_path, admin_token=None) as world:
        assert (await world.call("GET", "/partners", ADMIN_TOKEN)).status_code == 401
        assert (await world.call("GET", "/partners", world.tokens["viewer"])).status_code == 200


async def test_a_role_change_applies_to_the_next_call(world: AdminWorld) -> None:
    owner, viewer = world.tokens["owner"], world.tokens["viewer"]
    assert (await world.call("POST", "/partners", viewer, {"name": "x"})).status_code == 403
    promoted = (await world.call("POST", "/operators/vera/role", owner, {"role": "operator"})).json()
    assert (promoted["name"], promoted["role"], promoted["disabled"]) == ("vera", "operator", False)
    assert (await world.call("POST", "/partners", viewer, {"name": "x"})).status_code == 201
    assert (await world.call("POST", "/operators/vera/disabled", owner, {"disabled": True})).status_code == 200
    assert (await world.call("GET", "/partners", viewer)).status_code == 401
    assert (await world.call("POST", "/operators/vera/disabled", owner, {"disabled": False})).status_code == 200
    assert (await world.call("GET", "/partners", viewer)).status_code == 200
    bad = await world.call("POST", "/operators/vera/role", owner, {"role": "admin"})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "role")
    missing = await world.call("POST", "/operators/nobody/role", owner, {"role": "viewer"})
    assert (missing.status_code, missing.json()["error"]["message"]) == (404, "no operator named 'nobody'")


# --- the CLI: the same roles, through the same service --------------------------------------------------------

CLI: list[tuple[str, Callable[[], tuple[str, ...]], Role]] = [
    ("partners list", lambda: ("partners", "list"), VIEWER),
    ("audit list", lambda: ("audit", "list"), VIEWER),
    ("signing-keys list", lambda: ("signing-keys", "list"), VIEWER),
    ("oauth-clients list", lambda: ("oauth-clients", "list"), VIEWER),
    ("partners create", lambda: ("partners", "create", unique("cli")), OPERATOR),
    ("plans set", lambda: ("plans", "set", unique("plan"), "--rpm", "3"), OPERATOR),
    ("operators list", lambda: ("operators", "list"), OWNER),
    ("operators create", lambda: ("operators", "create", unique("op"), "--role", "viewer"), OWNER),
    ("signing-keys rotate", lambda: ("signing-keys", "rotate"), OWNER),
]


@pytest.mark.parametrize(("argv", "needs"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_roles(
    world: AdminWorld, monkeypatch: pytest.MonkeyPatch, argv: Callable[[], tuple[str, ...]], needs: Role
) -> None:
    """``--token`` or ``SERVING_OPERATOR_TOKEN``: that operator's role; neither: the local owner."""
    for name, role in (("vera", VIEWER), ("olga", OPERATOR), ("owen", OWNER)):
        token = world.tokens[role.label]
        by_flag = world.cli(*argv(), "--token", token)
        monkeypatch.setenv("SERVING_OPERATOR_TOKEN", token)
        by_env = world.cli(*argv())
        monkeypatch.delenv("SERVING_OPERATOR_TOKEN")
        expected = None if role >= needs else f"this needs the {needs.label} role; {name} has the {role.label} role"
        assert (by_flag.exit, by_env.exit) == (expected, expected)
    assert world.cli(*argv()).exit is None


def test_cli_refuses_bad_tokens(world: AdminWorld) -> None:
    assert world.cli("partners", "list", "--token", "not-a-token").exit == "unknown or disabled operator token"
    key = world.store.issue_key(world.store.create_partner("p").id)
    assert world.cli("partners", "list", "--token", key).exit == (
        "partner API keys and access tokens are not accepted here; use an operator token"
    )
    assert world.cli("partners", "list", "--token", ADMIN_TOKEN).exit is None  # the legacy token: an owner
