"""One Ray cluster and one set of real small models for the whole session; a gateway on port 0 over them."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import pytest_asyncio

from serving.gateway.app import Gateway
from serving.models.registry import ModelSpec, load_registry
from serving.partners.store import PartnerStore
from serving.settings import Settings, load_settings
from serving.storage.database import Database

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token-" + "x" * 16
REDIS_URL = os.environ.get("SERVING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("SERVING_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """The URL of a new database of the caller's own on the shared test server, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(
        env={},
        data_dir=tmp_path_factory.mktemp("data"),
        # The converted generation model is cached across runs (converting takes ~20 s).
        model_cache_dir=ROOT / ".cache" / "models",
        grpc_port=0,
        http_port=0,
        ops_port=0,
        final_scrape_wait_s=0.0,  # nothing scrapes test gateways at their stop (the billing stop test sets it)
        shutdown_grace_s=10.0,
        serve_app_name="test",
        admin_token=ADMIN_TOKEN,
    )


@pytest.fixture(scope="session")
def specs(settings: Settings) -> list[ModelSpec]:
    return load_registry(settings.model_registry)


@pytest.fixture(scope="session")
def ray_models(settings: Settings, specs: list[ModelSpec]) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    from serving.models.deployment import deploy_models

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        log_to_driver=False,
    )
    serve.start(proxy_location="Disabled")
    try:
        yield deploy_models(specs, settings.models_cache, settings.serve_app_name)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def store(settings: Settings) -> Iterator[PartnerStore]:
    store = PartnerStore(Database(settings.partners_db_url))
    yield store
    store.close()


@pytest.fixture(scope="session")
def api_key(store: PartnerStore) -> str:
    partner = store.create_partner("acme", plan="unlimited")
    return store.issue_key(partner.id)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def gateway(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore
) -> AsyncIterator[Gateway]:
    gw = Gateway(settings, specs, ray_models, store)
    await gw.start()
    yield gw
    await gw.stop()


@asynccontextmanager
async def running_gateway(
    settings: Settings, specs: list[ModelSpec], handles: dict[str, Any], store: PartnerStore, **overrides: Any
) -> AsyncIterator[Gateway]:
    """Another gateway replica over the same models and partner store (port 0, its own journal)."""
    gw = Gateway(replace(settings, **overrides), specs, handles, store)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
def grpc_target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.grpc_port}"


@pytest.fixture
def http_base(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.http_port}"


@pytest.fixture
def ops_base(gateway: Gateway) -> str:
    """The private ops listener: /metrics, /admin/v1, health."""
    return f"http://127.0.0.1:{gateway.ops_port}"
