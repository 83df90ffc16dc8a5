"""The audit log: every kind of admin change, made through the admin API and through the CLI, is read back through
``GET /admin/v1/audit`` and ``serving audit list`` with its exact actor, role, action, target, before and after;
the filters select exactly what they name; no secret ever reaches a row; a change that fails leaves no row and a
row that cannot be written undoes its change; the metric counts the API's changes. On SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from admin_support import ADMIN_TOKEN, START, AdminWorld, CliResult, admin_world
from conftest import fresh_postgres_database

from serving.admin.audit import ACTIONS
from serving.admin.operators import Role
from serving.admin.service import Admin, local_owner
from serving.admin.views import key_view
from serving.errors import InvalidInput

Record = dict[str, Any]


# --- two ways to make a change: the admin API and the CLI --------------------------------------------------------


@dataclass
class Api:
    world: AdminWorld
    token: str
    actor: str
    role: str

    def as_(self, token: str, actor: str, role: str) -> Api:
        return Api(self.world, token, actor, role)

    async def _send(self, method: str, path: str, body: Any = None) -> Any:
        reply = await self.world.call(method, path, self.token, body)
        assert reply.status_code in (200, 201), reply.text
        return reply.json()

    async def create_partner(self, name: str, plan: str) -> Record:
        return await self._send("POST", "/partners", {"name": name, "plan": plan})  # type: ignore[no-any-return]

    async def set_plan(self, ref: str, plan: str) -> Record:
        return await self._send("POST", f"/partners/{ref}/plan", {"plan": plan})  # type: ignore[no-any-return]

    async def set_partner_disabled(self, ref: str, disabled: bool) -> Record:
        reply = await self._send("POST", f"/partners/{ref}/disabled", {"disabled": disabled})
        return reply  # type: ignore[no-any-return]

    async def put_plan(self, name: str, rpm: int) -> Record:
        return await self._send("PUT", f"/plans/{name}", {"requests_per_minute": rpm})  # type: ignore[no-any-return]

    async def issue_key(self, ref: str, scopes: list[str] | None) -> tuple[str, Record]:
        reply = await self._send("POST", f"/partners/{ref}/keys", None if scopes is None else {"scopes": scopes})
        return reply.pop("api_key"), reply

    async def rotate_key(self, key_id: str) -> tuple[str, Record]:
        reply = await self._send("POST", f"/keys/{key_id}/rotate")
        assert reply.pop("revoked") == key_id  # the old key's id; the new key is not revoked
        return reply.pop("api_key"), {**reply, "revoked": False}

    async def revoke_key(self, key_id: str) -> bool:
        reply = await self._send("POST", f"/keys/{key_id}/revoke")
        return reply["revoked"]  # type: ignore[no-any-return]

    async def create_client(self, ref: str, name: str, scopes: list[str]) -> tuple[Record, str]:
        reply = await self._send("POST", f"/partners/{ref}/oauth-clients", {"name": name, "scopes": scopes})
        return reply, reply.pop("client_secret")

    async def set_client_disabled(self, client_id: str, disabled: bool) -> Record:
        reply = await self._send("POST", f"/oauth-clients/{client_id}/disabled", {"disabled": disabled})
        return reply  # type: ignore[no-any-return]

    async def create_operator(self, name: str, role: str) -> tuple[Record, str]:
        reply = await self._send("POST", "/operators", {"name": name, "role": role})
        return reply, reply.pop("token")

    async def set_operator_role(self, name: str, role: str) -> Record:
        return await self._send("POST", f"/operators/{name}/role", {"role": role})  # type: ignore[no-any-return]

    async def set_operator_disabled(self, name: str, disabled: bool) -> Record:
        reply = await self._send("POST", f"/operators/{name}/disabled", {"disabled": disabled})
        return reply  # type: ignore[no-any-return]

    async def rotate_signing_key(self) -> Record:
        return await self._send("POST", "/signing-keys/rotate")  # type: ignore[no-any-return]


@dataclass
class Cli:
    world: AdminWorld
    auth: tuple[str, ...]  # ("--token", token), or () for the local owner
    actor: str
    role: str
    env_token: str | None = None  # SERVING_OPERATOR_TOKEN while the command runs

    def as_(self, token: str, actor: str, role: str) -> Cli:
        return Cli(self.world, ("--token", token), actor, role)

    def _run(self, *argv: str) -> CliResult:
        with pytest.MonkeyPatch.context() as env:
            if self.env_token is not None:
                env.setenv("SERVING_OPERATOR_TOKEN", self.env_token)
            result = self.world.cli(*argv, *self.auth)
        assert result.exit is None, result.exit
        return result

    def _key(self, key_id: str) -> Record:
        stored = self.world.store.key(key_id)
        assert stored is not None
        return key_view(stored)

    async def create_partner(self, name: str, plan: str) -> Record:
        return self._run("partners", "create", name, "--plan", plan).json()  # type: ignore[no-any-return]

    async def set_plan(self, ref: str, plan: str) -> Record:
        return self._run("partners", "set-plan", ref, plan).json()  # type: ignore[no-any-return]

    async def set_partner_disabled(self, ref: str, disabled: bool) -> Record:
        return self._run("partners", "disable" if disabled else "enable", ref).json()  # type: ignore[no-any-return]

    async def put_plan(self, name: str, rpm: int) -> Record:
        return self._run("plans", "set", name, "--rpm", str(rpm)).json()  # type: ignore[no-any-return]

    async def issue_key(self, ref: str, scopes: list[str] | None) -> tuple[str, Record]:
        key = self._run("keys", "issue", "--partner", ref, *(("--scopes", ",".join(scopes)) if scopes else ()))
        secret = key.out.strip()
        return secret, self._key(secret.split("_")[1])

    async def rotate_key(self, key_id: str) -> tuple[str, Record]:
        secret = self._run("keys", "rotate", key_id).out.strip()
        return secret, self._key(secret.split("_")[1])

    async def revoke_key(self, key_id: str) -> bool:
        return self._run("keys", "revoke", key_id).json()["revoked"]  # type: ignore[no-any-return]

    async def create_client(self, ref: str, name: str, scopes: list[str]) -> tuple[Record, str]:
        reply = self._run("oauth-clients", "create", ref, "--name", name, "--scopes", ",".join(scopes))
        client = reply.json()
        return client, client.pop("client_secret")

    async def set_client_disabled(self, client_id: str, disabled: bool) -> Record:
        command = "disable" if disabled else "enable"
        return self._run("oauth-clients", command, client_id).json()  # type: ignore[no-any-return]

    async def create_operator(self, name: str, role: str) -> tuple[Record, str]:
        operator = self._run("operators", "create", name, "--role", role).json()
        return operator, operator.pop("token")

    async def set_operator_role(self, name: str, role: str) -> Record:
        return self._run("operators", "set-role", name, role).json()  # type: ignore[no-any-return]

    async def set_operator_disabled(self, name: str, disabled: bool) -> Record:
        command = "disable" if disabled else "enable"
        return self._run("operators", command, name).json()  # type: ignore[no-any-return]

    async def rotate_signing_key(self) -> Record:
        return self._run("signing-keys", "rotate").json()  # type: ignore[no-any-return]


Via = Api | Cli


@dataclass
class Outcome:
    expected: list[Record]  # oldest first, without ids
    secrets: list[str]  # every key, client secret and operator token the scenario was shown
    partner_id: str
    first_key: str  # the key id of the first key issued (issued, then rotated)


async def every_change(world: AdminWorld, operator: Via, owner: Via, legacy: Via) -> Outcome:
    """Each kind of change once or more; the clock moves one second before each, so ``at`` is known exactly."""
    expected: list[Record] = []

    def tick() -> float:
        world.clock.now += 1
        return world.clock.now

    def record(at: float, via: Via, action: str, kind: str, target: str, before: Any, after: Any) -> None:
        expected.append(
            {
                "at": at,
                "actor": via.actor,
                "actor_role": via.role,
                "action": action,
                "target_kind": kind,
                "target_id": target,
                "before": before,
                "after": after,
            }
        )

    at = tick()
    p0 = await operator.create_partner("acme", "free")
    assert p0 == {"id": p0["id"], "name": "acme", "plan": "free", "disabled": False}
    pid = p0["id"]
    record(at, operator, "partner.create", "partner", pid, None, p0)
    at = tick()
    p1 = await operator.set_plan("acme", "standard")
    record(at, operator, "partner.plan", "partner", pid, p0, {**p0, "plan": "standard"})
    at = tick()
    p2 = await operator.set_partner_disabled(pid, True)
    record(at, operator, "partner.disable", "partner", pid, p1, {**p1, "disabled": True})
    at = tick()
    p3 = await operator.set_partner_disabled("acme", False)
    record(at, operator, "partner.enable", "partner", pid, p2, p3)
    assert p3 == p1

    at = tick()
    plan0 = await operator.put_plan("team", 120)
    assert (plan0["name"], plan0["requests_per_minute"], plan0["tokens_per_minute"]) == ("team", 120, 0)
    record(at, operator, "plan.put", "plan", "team", None, plan0)
    at = tick()
    plan1 = await operator.put_plan("team", 60)
    record(at, operator, "plan.put", "plan", "team", plan0, {**plan0, "requests_per_minute": 60})

    at = tick()
    key1, k1 = await operator.issue_key("acme", None)
    assert (k1["partner_id"], k1["revoked"], k1["scopes"]) == (pid, False, None)
    record(at, operator, "key.issue", "key", k1["key_id"], None, k1)
    at = tick()
    key2, k2 = await operator.issue_key(pid, ["generate", "embed"])
    assert k2["scopes"] == ["embed", "generate"]  # canonical order
    record(at, operator, "key.issue", "key", k2["key_id"], None, k2)
    at = tick()
    key3, k3 = await operator.rotate_key(k1["key_id"])
    assert (k3["partner_id"], k3["revoked"], k3["scopes"]) == (pid, False, None)
    record(at, operator, "key.rotate", "key", k1["key_id"], k1, {**k1, "revoked": True, "replaced_by": k3})
    at = tick()
    assert await operator.revoke_key(k2["key_id"]) is True
    record(at, operator, "key.revoke", "key", k2["key_id"], k2, {**k2, "revoked": True})

    at = tick()
    c0, client_secret = await operator.create_client("acme", "backend", ["embed", "usage:read"])
    assert (c0["partner_id"], c0["name"], c0["disabled"]) == (pid, "backend", False)
    assert c0["scopes"] == ["embed", "usage:read"]
    record(at, operator, "oauth_client.create", "oauth_client", c0["client_id"], None, c0)
    at = tick()
    c1 = await operator.set_client_disabled(c0["client_id"], True)
    record(at, operator, "oauth_client.disable", "oauth_client", c0["client_id"], c0, {**c0, "disabled": True})
    at = tick()
    c2 = await operator.set_client_disabled(c0["client_id"], False)
    record(at, operator, "oauth_client.enable", "oauth_client", c0["client_id"], c1, c0)
    assert c2 == c0

    at = tick()
    o0, ada_token = await owner.create_operator("ada", "viewer")
    assert o0 == {"name": "ada", "role": "viewer", "created_at": at, "disabled": False}
    record(at, owner, "operator.create", "operator", "ada", None, o0)
    at = tick()
    o1 = await owner.set_operator_role("ada", "operator")
    record(at, owner, "operator.role", "operator", "ada", o0, {**o0, "role": "operator"})
    at = tick()  # ada acts with the role she holds now, and her record says so
    ada = operator.as_(ada_token, "ada", "operator")
    plan2 = await ada.put_plan("team", 30)
    record(at, ada, "plan.put", "plan", "team", plan1, plan2)
    at = tick()
    o2 = await owner.set_operator_disabled("ada", True)
    record(at, owner, "operator.disable", "operator", "ada", o1, {**o1, "disabled": True})
    at = tick()
    o3 = await owner.set_operator_disabled("ada", False)
    record(at, owner, "operator.enable", "operator", "ada", o2, o1)
    assert o3 == o1

    kids: list[str] = []
    for via in (owner, legacy, legacy):
        at = tick()
        rotated = await via.rotate_signing_key()
        retired = kids[:-1]  # all but the new key and its predecessor
        assert rotated == {"kid": rotated["kid"], "retired": retired}
        before = list(reversed(kids))
        kids = [*kids[-1:], rotated["kid"]]
        after = {"signing": rotated["kid"], "verifying": list(reversed(kids)), "retired": retired}
        record(at, via, "signing_key.rotate", "signing_key", rotated["kid"], {"verifying": before}, after)
    assert [r["after"]["retired"] for r in expected[-3:]] == [[], [], [expected[-3]["target_id"]]]
    return Outcome(expected, [key1, key2, key3, client_secret, ada_token], pid, k1["key_id"])


def without_ids(records: list[Record]) -> list[Record]:
    ids = [record.pop("id") for record in records]
    assert all(re.fullmatch(r"au_[0-9a-f]{16}", i) for i in ids) and len(set(ids)) == len(ids), ids
    return records


async def audit_api(world: AdminWorld, **params: Any) -> list[Record]:
    reply = await world.call("GET", "/audit", world.tokens["viewer"], params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def audit_cli(world: AdminWorld, *argv: str) -> list[Record]:
    return world.cli("audit", "list", *argv).json()  # type: ignore[no-any-return]


# --- fixtures: a world on SQLite, and one on PostgreSQL ---------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh database of this test's own on the shared server."""
    with fresh_postgres_database("audit") as url:
        yield url


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AdminWorld]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    async with admin_world(tmp_path, database_url=url) as world:
        yield world


@pytest.fixture
def me(monkeypatch: pytest.MonkeyPatch) -> str:
    """The OS user the CLI records as the local owner (getpass reads LOGNAME first)."""
    monkeypatch.setenv("LOGNAME", "carol")
    return "local:carol"


async def api_scenario(world: AdminWorld) -> Outcome:
    operator = Api(world, world.tokens["operator"], "olga", "operator")
    owner = Api(world, world.tokens["owner"], "owen", "owner")
    return await every_change(world, operator, owner, Api(world, ADMIN_TOKEN, "admin-token", "owner"))


# --- the tests -------------------------------------------------------------------------------------------------


async def test_api_changes_are_audited(world: AdminWorld, me: str) -> None:
    outcome = await api_scenario(world)
    newest_first = list(reversed(outcome.expected))
    read = await audit_api(world, limit=1000)
    assert without_ids([dict(r) for r in read]) == newest_first
    assert audit_cli(world, "--limit", "1000") == read  # the CLI reads the same rows
    assert await audit_api(world) == read[:100]  # the default limit (fewer rows here: all of them)
    counted = Counter(record["action"] for record in outcome.expected)
    assert {action: world.changes(action) for action in ACTIONS} == {a: float(counted[a]) for a in ACTIONS}


async def test_cli_changes_are_audited(world: AdminWorld, me: str) -> None:
    """``--token``: that operator; ``SERVING_OPERATOR_TOKEN``: likewise; neither: the local owner."""
    operator = Cli(world, ("--token", world.tokens["operator"]), "olga", "operator")
    local_owner = Cli(world, (), me, "owner")
    by_env = Cli(world, (), "owen", "owner", env_token=world.tokens["owner"])
    outcome = await every_change(world, operator, local_owner, by_env)
    read = audit_cli(world, "--limit", "1000")
    assert without_ids([dict(r) for r in read]) == list(reversed(outcome.expected))
    assert {r["actor"] for r in read} == {"olga", "ada", "local:carol", "owen"}
    assert await audit_api(world, limit=1000) == read
    # The CLI is not the gateway: its changes are in the audit log, not in a gateway's counter.
    assert {world.changes(action) for action in ACTIONS} == {0.0}


async def test_filters(world: AdminWorld, me: str) -> None:
    expected = list(reversed((await api_scenario(world)).expected))
    every = await audit_api(world, limit=1000)

    def pick(**match: Any) -> list[Record]:
        return [r for r in every if all(r[k] == v for k, v in match.items())]

    def iso(at: float, suffix: str = "+00:00") -> str:
        return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", suffix)

    partner_id = expected[-1]["target_id"]
    first_key = next(r["target_id"] for r in reversed(expected) if r["action"] == "key.issue")
    window = [r for r in every if START + 5 <= r["at"] < START + 8]
    cases: list[tuple[dict[str, Any], list[Record]]] = [
        ({"actor": "olga"}, pick(actor="olga")),
        ({"actor": "admin-token"}, pick(actor="admin-token")),
        ({"action": "key.issue"}, pick(action="key.issue")),
        ({"target": "partner"}, pick(target_kind="partner")),
        ({"target": f"partner:{partner_id}"}, pick(target_kind="partner", target_id=partner_id)),
        ({"target": f"key:{first_key}"}, pick(target_kind="key", target_id=first_key)),
        ({"target": "operator:ada", "action": "operator.role"}, pick(target_id="ada", action="operator.role")),
        ({"actor": "owen", "target": "signing_key"}, pick(actor="owen", target_kind="signing_key")),
        ({"since": str(START + 5), "until": str(START + 8)}, window),
        ({"since": iso(START + 5), "until": iso(START + 8, "Z")}, window),
        ({"since": iso(START + 20)[:19]}, [r for r in every if r["at"] >= START + 20]),  # no offset: UTC
        ({"until": str(START + 3)}, [r for r in every if r["at"] < START + 3]),
        ({"limit": 3}, every[:3]),
        ({"actor": "nobody"}, []),
    ]
    assert len(pick(action="key.issue")) == 2 and len(pick(target_kind="key", target_id=first_key)) == 2
    assert [r["at"] for r in window] == [START + 7, START + 6, START + 5]
    for params, want in cases:
        assert await audit_api(world, **params) == want, params
        argv = [part for name, value in params.items() for part in (f"--{name}", str(value))]
        assert audit_cli(world, *argv) == want, argv

    bad: list[tuple[dict[str, Any], str]] = [
        ({"action": "partner.delete"}, "action"),
        ({"target": "invoice:1"}, "target"),
        ({"since": "yesterday"}, "since"),
        ({"until": "nan"}, "until"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
    ]
    for params, param in bad:
        reply = await world.call("GET", "/audit", world.tokens["viewer"], params=params)
        assert (reply.status_code, reply.json()["error"]["param"]) == (400, param), params
        argv = [part for name, value in params.items() for part in (f"--{name}", str(value))]
        result = world.cli("audit", "list", *argv)
        assert result.exit == reply.json()["error"]["message"], argv


def secret_part(credential: str) -> str:
    """The random part: ``sk_<id>_<secret>``, ``sop_<id>_<secret>``, ``ocs_<secret>`` (43 url-safe characters)."""
    part = credential.removeprefix("ocs_") if credential.startswith("ocs_") else credential.split("_", 2)[2]
    assert len(part) == 43, credential
    return part


async def test_no_secret_reaches_the_audit_log(world: AdminWorld, me: str) -> None:
    outcome = await api_scenario(world)
    db = world.store.db
    secrets = [
        *outcome.secrets,
        ADMIN_TOKEN,
        *world.tokens.values(),
        *(row[0] for row in db.query("SELECT digest FROM api_keys")),
        *(row[0] for row in db.query("SELECT digest FROM oauth_clients")),
        *(row[0] for row in db.query("SELECT digest FROM operators")),
        *(row[0] for row in db.query("SELECT private_pem FROM signing_keys")),
    ]
    assert len(secrets) == 5 + 1 + 3 + 3 + 1 + 4 + 3
    stored = repr(db.query("SELECT * FROM audit_log"))
    served = (await world.call("GET", "/audit", world.tokens["viewer"], params={"limit": 1000})).text
    printed = world.cli("audit", "list", "--limit", "1000").out
    for text in (stored, served, printed):
        assert len(text) > 1000
        leaked = [secret for secret in secrets if secret in text]
        assert leaked == []
        # Nor a token's or key's secret part, a digest-shaped string, or any PEM.
        assert all(secret_part(secret) not in text for secret in outcome.secrets)
        assert re.search(r"[0-9a-f]{64}", text) is None
        assert "PRIVATE KEY" not in text and "-----BEGIN" not in text


async def test_a_failed_change_leaves_no_record(world: AdminWorld, me: str) -> None:
    viewer, operator = world.tokens["viewer"], world.tokens["operator"]
    assert (await world.call("POST", "/partners", viewer, {"name": "x"})).status_code == 403
    assert (await world.call("POST", "/partners/nobody/plan", operator, {"plan": "free"})).status_code == 404
    assert (await world.call("POST", "/partners", operator, {"name": "x", "plan": "gold"})).status_code == 404
    bad_scopes = {"name": "c", "scopes": ["embed", "admin"]}
    created = await world.call("POST", "/partners", operator, {"name": "x"})
    assert (await world.call("POST", "/partners/x/oauth-clients", operator, bad_scopes)).status_code == 400
    assert (await world.call("POST", "/partners/x/keys", operator, {"scopes": []})).status_code == 400
    assert (await world.call("POST", "/keys/000000000000/revoke", operator)).status_code == 404
    assert world.cli("keys", "revoke", "000000000000").exit == "no key '000000000000'"
    records = await audit_api(world)
    assert [(r["action"], r["target_id"]) for r in records] == [("partner.create", created.json()["id"])]
    assert world.changes("partner.create") == 1.0


def test_a_change_whose_record_fails_is_undone(world: AdminWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """One transaction: when the audit row cannot be written, the change is rolled back with it."""
    admin = Admin(world.store)

    def refuse(*_: Any) -> None:
        raise InvalidInput("the audit log refused the row")

    monkeypatch.setattr(admin.audit_log, "append", refuse)
    with pytest.raises(InvalidInput):
        admin.create_partner(local_owner("carol"), "ghost")
    with pytest.raises(InvalidInput):
        admin.create_operator(local_owner("carol"), "ghost", Role.VIEWER)
    assert [p.name for p in world.store.partners()] == []
    assert [o.name for o in admin.operators.list()] == ["olga", "owen", "vera"]  # the world's own three
    assert world.store.db.query("SELECT id FROM audit_log") == []
