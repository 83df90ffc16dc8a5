"""Shared by the admin tests: the admin API in-process (FastAPI over ``httpx.ASGITransport``) on a temporary SQLite
partner store, and the admin CLI in-process on the same database. No Ray, no listener."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from serving.admin.operators import OperatorStore, Role
from serving.cli_admin import add_admin_commands
from serving.gateway.http_admin import admin_router
from serving.gateway.http_common import install_error_handlers
from serving.observability.metrics import Metrics
from serving.partners.store import PartnerStore
from serving.settings import Settings, load_settings
from serving.storage.database import Database

ADMIN_TOKEN = "legacy-admin-token-" + "y" * 16
START = 1_700_000_000.0


class Clock:
    """Stamps audit records (and operators' created_at) with whatever ``now`` is set to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class CliResult:
    exit: str | int | None  # SystemExit's code (a message for errors), None when the command returned
    out: str

    def json(self) -> Any:
        assert self.exit is None, self.exit
        return json.loads(self.out)


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


@dataclass
class AdminWorld:
    settings: Settings
    store: PartnerStore
    metrics: Metrics
    clock: Clock
    http: httpx.AsyncClient
    tokens: dict[str, str]  # role label → a token of an operator with that role ("vera", "olga", "owen")

    async def call(
        self, method: str, path: str, token: str | None, body: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        return await self.http.request(method, f"/admin/v1{path}", json=body, params=params, headers=bearer(token))

    def cli(self, *argv: str) -> CliResult:
        """``serving <argv>`` against this world's database (same settings resolution as the real command)."""
        root = argparse.ArgumentParser(prog="serving")
        add_admin_commands(root.add_subparsers(dest="command", required=True), self._settings, self.clock)
        args = root.parse_args(argv)
        out = io.StringIO()
        code: str | int | None = None
        with contextlib.redirect_stdout(out):
            try:
                args.func(args)
            except SystemExit as exc:
                code = exc.code
        return CliResult(code, out.getvalue())

    def _settings(self, _args: argparse.Namespace) -> Settings:
        """This world's settings, with SERVING_OPERATOR_TOKEN read from the environment as ``load_settings`` does."""
        token = {name: value for name, value in os.environ.items() if name == "SERVING_OPERATOR_TOKEN"}
        return dataclasses.replace(self.settings, operator_token=load_settings(env=token).operator_token)

    def changes(self, action: str) -> float:
        value = self.metrics.registry.get_sample_value("serving_admin_changes_total", {"action": action})
        assert value is not None, f"no series for {action}"
        return value


@asynccontextmanager
async def admin_world(
    tmp_path: Path, admin_token: str | None = ADMIN_TOKEN, database_url: str | None = None
) -> AsyncIterator[AdminWorld]:
    """A partner store with one operator per role (created directly: the audit log starts empty)."""
    settings = load_settings(
        env={}, data_dir=tmp_path, database_url=database_url or str(tmp_path / "p.db"), admin_token=admin_token
    )
    store = PartnerStore(Database(settings.partners_db_url))
    operators = OperatorStore(store.db)
    tokens = {
        role.label: operators.create(name, role)[1]
        for name, role in (("vera", Role.VIEWER), ("olga", Role.OPERATOR), ("owen", Role.OWNER))
    }
    metrics, clock = Metrics(), Clock()
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(admin_router(store, store.db, admin_token, metrics, clock))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ops") as http:
            yield AdminWorld(settings, store, metrics, clock, http, tokens)
    finally:
        store.close()
