"""Setting up what is measured: Ray with the model deployments (the stack's and plain Serve's), the bare
grpc.aio echo server, and the partner store with the benchmark's partners and keys."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from ray import serve

from benchlib.common import APP_PREFIX, CACHE_DIR, EMBED_MODEL, NOOP_MODEL, RAY_ENV
from benchlib.plain import PLAIN_MAX_BATCH, PLAIN_WAIT_S, PlainPlacement, deploy_plain


@dataclass(frozen=True)
class Hardware:
    """Device, dtype and GPU share for every MiniLM copy (stack replica, plain Serve, raw baseline).
    On a CPU machine: cpu / float32 / 0 GPUs. On CUDA: device auto resolves to cuda, dtype as asked."""

    device: str = "cpu"
    dtype: str = "float32"
    num_gpus: float = 0.0


def toml_table(values: dict[str, Any]) -> str:
    parts = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    return "{ " + ", ".join(parts) + " }"


def write_registry(path: Path, hardware: Hardware) -> Path:
    """minilm-l6 as the default registry has it (device, dtype and GPU share from ``hardware``), plus the
    no-op model over the same package."""
    from serving.models.registry import load_registry

    minilm = next(spec for spec in load_registry() if spec.id == EMBED_MODEL)
    minilm = replace(
        minilm,
        device=hardware.device,
        dtype=hardware.dtype,
        replicas=replace(minilm.replicas, num_gpus=hardware.num_gpus),
    )
    source = toml_table(asdict(minilm.source))
    path.write_text(
        f"""[[models]]
id = "{EMBED_MODEL}"
task = "embed"
source = {source}
device = "{minilm.device}"
dtype = "{minilm.dtype}"
max_input_tokens = {minilm.max_input_tokens}
batching = {toml_table(asdict(minilm.batching))}
replicas = {toml_table(asdict(minilm.replicas))}

[[models]]
id = "{NOOP_MODEL}"
task = "embed"
runner = "noop"
source = {source}
batching = {{ max_batch_size = 256, max_wait_ms = 0 }}
replicas = {{ num_replicas = 1, num_cpus = 0.25, torch_threads = 1 }}
"""
    )
    return path


@dataclass
class Stack:
    tmp: Path
    settings: Any
    specs: list[Any]
    handles: dict[str, Any]
    plain: dict[str, Any]
    plain_http: dict[str, str]  # model → URL of the plain Serve HTTP route (Serve's proxy)
    model_dir: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_local_ray() -> None:
    """A Ray instance of the benchmark's own (``address="local"``: never one already running on this machine)."""
    import ray

    ray.init(
        address="local",
        include_dashboard=False,
        runtime_env={"env_vars": RAY_ENV},
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


def start_stack(tmp: Path, hardware: Hardware, with_plain: bool = True) -> Stack:
    """A local Ray with the stack's model deployments and (``with_plain``) plain Serve's."""
    from serving.models.deployment import deploy_models
    from serving.models.registry import load_registry
    from serving.models.sources import resolve_model_dir
    from serving.settings import Settings

    registry = write_registry(tmp / "registry.toml", hardware)
    settings = Settings(
        data_dir=tmp,
        price_book=write_price_book(tmp / "prices.toml"),
        model_registry=registry,
        model_cache_dir=CACHE_DIR,
        grpc_port=0,
        http_port=0,
        ops_port=0,
        shutdown_grace_s=1.0,
        serve_app_name=APP_PREFIX,  # the gateways read these applications' replica states (decision 0014)
    ).validate()
    specs = load_registry(registry)
    model_dir = resolve_model_dir(specs[0], CACHE_DIR)
    init_local_ray()
    # Serve's HTTP proxy on the head node serves only the plain-Serve HTTP rows; the gateway uses handles.
    http_port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
    handles = deploy_models(specs, CACHE_DIR, APP_PREFIX)
    if not with_plain:
        return Stack(tmp, settings, specs, handles, {}, {}, model_dir)
    noop_place = PlainPlacement(num_cpus=0.25)
    minilm_place = PlainPlacement(0.5, hardware.num_gpus, hardware.device, hardware.dtype)
    # Logical CPUs only (every replica runs 1 torch thread): the HTTP copies ask for 0.1 so that all
    # replicas fit Ray's 2 logical CPUs on this machine (1.7 in all); they never run at the same time.
    noop_http = replace(noop_place, num_cpus=0.1)
    minilm_http = replace(minilm_place, num_cpus=0.1)
    plain = {
        NOOP_MODEL: deploy_plain("plain-noop", model_dir, True, noop_place),
        EMBED_MODEL: deploy_plain("plain-minilm", model_dir, False, minilm_place),
        f"{NOOP_MODEL}-http": deploy_plain("plain-http-noop", model_dir, True, noop_http, http=True),
        f"{EMBED_MODEL}-http": deploy_plain("plain-http-minilm", model_dir, False, minilm_http, http=True),
    }
    base = f"http://127.0.0.1:{http_port}"
    plain_http = {NOOP_MODEL: f"{base}/plain-http-noop", EMBED_MODEL: f"{base}/plain-http-minilm"}
    return Stack(tmp, settings, specs, handles, plain, plain_http, model_dir)


def describe_batching(stack: Stack) -> str:
    gateway = stack.settings.batching
    replicas = ", ".join(
        f"{spec.id} {spec.batching.max_batch_size}/{spec.batching.max_wait_ms:g} ms" for spec in stack.specs
    )
    return (
        f"batching: gateway micro-batch {gateway.max_batch_size}/{gateway.max_wait_ms:g} ms; "
        f"stack replicas @serve.batch {replicas}; plain Serve @serve.batch {PLAIN_MAX_BATCH}/{PLAIN_WAIT_S * 1000:g} ms"
    )


def stop_stack() -> None:
    import ray

    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


# --- the bare grpc.aio baseline ---------------------------------------------------------------------------


def echo_payload() -> bytes:
    """A response the size of the gateway's answer to a one-text MiniLM request (384 floats, usage, id)."""
    from serving.domain import EmbedResult, Usage
    from serving.gateway import convert

    result = EmbedResult(EMBED_MODEL, [[0.01 * i for i in range(384)]], Usage(16, 0), "0" * 32)
    return bytes(convert.embed_response(result).SerializeToString())


async def start_echo_server(payload: bytes) -> tuple[grpc.aio.Server, int]:
    """A bare grpc.aio server answering the Embed method with fixed bytes, so AsyncClient can call it."""

    async def embed(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler(
        "serving.v1.InferenceService", {"Embed": grpc.unary_unary_rpc_method_handler(embed)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


# --- partners --------------------------------------------------------------------------------------------


def open_store(path: Path) -> Any:
    """The partner store over a SQLite file."""
    from serving.partners.store import PartnerStore
    from serving.storage.database import Database

    return PartnerStore(Database(str(path)))


PREPAID_PLAN = "bench-prepaid"


def write_price_book(path: Path) -> Path:
    """The shipped price book plus a price for the no-op model on the prepaid bench plan (rows CPU prepaid)."""
    from importlib import resources

    from serving.commerce.pricebook import PriceBook

    shipped = resources.files("serving.commerce").joinpath("pricebook.toml").read_text()
    noop = (
        f'[[price]]\nplan = "{PREPAID_PLAN}"\nmodel = "{NOOP_MODEL}"\neffective_from = 2026-01-01T00:00:00Z\n'
        'input_per_1k = "0.0200"\noutput_per_1k = "0"\nper_request = "0.0001"\n'
    )
    path.write_text(f"{shipped}\n{noop}")
    PriceBook.load(path)  # valid, or the bench stops here
    return path


def prepaid_key(store: Any, partner: str, plan: Any) -> tuple[str, str]:
    """A new partner on a prepaid copy of ``plan`` with a grant no benchmark spends: (partner id, API key)."""
    from decimal import Decimal

    from serving.commerce.credits import CreditStore

    partner_id, key = partner_key(store, partner, replace(plan, name=PREPAID_PLAN, prepaid=True))
    CreditStore(store.db).grant(partner_id, "purchased", Decimal("1000000.00"), note="benchmark")
    return partner_id, key


def partner_key(store: Any, partner: str, plan: Any) -> tuple[str, str]:
    """A new partner on ``plan`` (stored first) and a key for it: (partner id, API key)."""
    store.put_plan(plan)
    partner_id = store.create_partner(partner, plan=plan.name).id
    return partner_id, str(store.issue_key(partner_id))


def unlimited_key(store: Any, partner: str) -> str:
    """A key on a plan without limits: rows A/B/A0/B0 and S measure the serving path, not quota."""
    from serving.plans import Plan

    return partner_key(store, partner, Plan(name="bench-unlimited"))[1]  # zero: unlimited
