"""``serving``: run the platform, run a gateway against a running cluster, manage partners and keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from serving import eventloop
from serving.cli_admin import add_admin_commands
from serving.gateway.ray_node import own_ray_node
from serving.gateway.workers import DRAINED_LINE, PortInUse, Supervisor, ready_line, reserve_port, worker_specs
from serving.models.registry import ModelSpec, load_model_registry, load_registry
from serving.observability import access_log
from serving.partners.keys import parse_key
from serving.partners.store import PartnerStore
from serving.settings import Settings, load_settings
from serving.storage.database import Database

log = logging.getLogger("serving")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("data_dir", "grpc_port", "http_port", "ops_port", "ray_address", "model_registry", "workers"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = Path(value) if name in ("data_dir", "model_registry") else value
    return load_settings(**overrides)


def _demo_key(settings: Settings, store: PartnerStore) -> str:
    """The demo partner's key: reused from the data directory, issued on first start."""
    partner, _ = store.ensure_partner(settings.demo_partner)
    path = settings.demo_key_path
    if path.exists():
        key = path.read_text().strip()
        parsed = parse_key(key)
        stored = store.key(parsed.key_id) if parsed else None
        if stored is not None and not stored.revoked:
            return key
    key = store.issue_key(partner.id)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _admin_token(settings: Settings) -> Settings:
    """The configured admin token, or one generated on first start and kept in the data directory."""
    if settings.admin_token:
        return settings
    path = settings.admin_token_path
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    return replace(settings, admin_token=path.read_text().strip())


def _banner(settings: Settings, grpc_port: int, http_port: int, ops_ports: list[int], key: str) -> str:
    tls = settings.tls_cert_file is not None
    http = f"{'https' if tls else 'http'}://{settings.http_host}:{http_port}"
    sdk_tls = f" --ca-file {settings.tls_cert_file}" if tls else ""  # a self-signed certificate is its own CA
    ops = f"http://{settings.ops_host}:{ops_ports[0]}"
    grpc_addr = f"{settings.grpc_host}:{grpc_port}"
    workers = ""
    if len(ops_ports) > 1:
        workers = (
            f"\n  {len(ops_ports)} gateway workers share the gRPC and HTTP ports; each has its own ops port:"
            f" {', '.join(map(str, ops_ports))} (quota shared in Redis; fair queues per worker)"
        )
    question = {"role": "user", "content": "What is the capital of France?"}
    chat = json.dumps({"model": "smollm2-135m-instruct", "messages": [question]})
    return f"""
Partner model API is up.
  gRPC  {grpc_addr}   (serving.v1.InferenceService, ModelService; health + reflection on)
  HTTP  {http}   (OpenAPI: {http}/docs)
  ops   {ops}   (private: /metrics, admin API {ops}/admin/v1/partners, /healthz, /readyz){workers}
  demo API key: {key}   (also in {settings.demo_key_path})
  admin token in {settings.admin_token_path}

Try it:
  curl -s {http}/v1/embeddings -H "Authorization: Bearer $(cat {settings.demo_key_path})" \\
       -H 'content-type: application/json' -d '{{"model": "minilm-l6", "input": "hello world"}}'
  curl -s {http}/v1/chat/completions -H "Authorization: Bearer $(cat {settings.demo_key_path})" \\
       -H 'content-type: application/json' \\
       -d '{chat}'
  SERVING_API_KEY="$(cat {settings.demo_key_path})" .venv/bin/serving-sdk --target {grpc_addr}{sdk_tls} \\
       generate "What is the capital of France?"
Ctrl-C stops everything.
"""


_BILLING_STOP_S = 60.0  # its exit scrape retries a target a few times; past this it is killed


async def _drain_pipe(pipe: asyncio.StreamReader) -> None:
    while line := await pipe.readline():
        sys.stdout.buffer.write(line)
    sys.stdout.flush()


async def _start_billing(
    settings: Settings, ops_ports: list[int], readers: set[asyncio.Task[None]]
) -> tuple[asyncio.subprocess.Process | None, str]:
    """``serving run`` starts the usage-billing service (services/billing) beside the gateway: it scrapes the
    gateway's ops listener (/metrics; every worker's with ``--workers``) and reads the ledger; its API takes the
    same admin token. ``BILLING_*`` variables in the environment take precedence."""
    targets = ",".join(f"http://{settings.ops_host}:{port}/metrics" for port in ops_ports)
    defaults = {
        "BILLING_DATA_DIR": str(settings.data_dir),
        "BILLING_SCRAPE_TARGETS": targets,
        "BILLING_ADMIN_TOKEN": settings.admin_token or "",
        "BILLING_LEDGER_DATABASE_URL": settings.ledger_db_url,
        "BILLING_PARTNERS_DATABASE_URL": settings.partners_db_url,
        "BILLING_PRICE_BOOK": str(settings.price_book or ""),  # one price book: prepaid holds and invoices agree
    }
    # Its own session: Ctrl-C must not reach billing before the gateway drained (its exit scrape reads the final
    # counters); ``serving run`` terminates it after the drain.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing.cli", "serve",
        env={**defaults, **os.environ}, stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    while line := await process.stdout.readline():  # billing's own readiness line
        if line.startswith(b"READY "):
            # Keep reading what it prints after (an unread pipe would block it once full).
            readers.add(asyncio.create_task(_drain_pipe(process.stdout)))
            return process, str(json.loads(line[6:])["url"])
    log.warning("the billing service did not start (exit code %s); the gateway runs without it", await process.wait())
    return None, ""


async def _stop_billing(billing: asyncio.subprocess.Process) -> None:
    # Billing scrapes the final counters on its way out (SIGTERM), while the ops listeners are still up.
    with contextlib.suppress(ProcessLookupError):  # Ctrl-C reached its process group too: it is stopping already
        billing.terminate()
    try:
        async with asyncio.timeout(_BILLING_STOP_S):
            await billing.wait()
    except TimeoutError:
        log.warning("the billing service did not stop within %.0f s; killing it", _BILLING_STOP_S)
        billing.kill()
        await billing.wait()


def _announce(settings: Settings, key: str, ports: tuple[int, int, list[int]], billing_url: str) -> None:
    print(_banner(settings, *ports, key), flush=True)
    if billing_url:
        print(f"Usage billing: {billing_url}  (invoices: {billing_url}/v1/invoices · metrics: {billing_url}/metrics)")


async def _stop_at_stdin_eof(stop: asyncio.Event) -> None:
    """A worker's stdin is a pipe from its supervisor: EOF means the supervisor is gone, and a worker left behind
    would serve on unsupervised."""
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    stop.set()


async def _serve_until_signal(
    settings: Settings, handles: dict[str, Any], store: PartnerStore, key: str | None, worker: bool = False
) -> None:
    from serving.gateway.app import Gateway

    registry = load_model_registry(settings.model_registry)
    gateway = Gateway(settings, registry.models, handles, store, registry.aliases)
    await gateway.start(reuse_port=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.create_task(_stop_at_stdin_eof(stop)) if worker else None
    readers: set[asyncio.Task[None]] = set()  # billing's stdout, read on
    billing, billing_url = (None, "") if key is None else await _start_billing(settings, [gateway.ops_port], readers)
    if key is not None:
        _announce(settings, key, (gateway.grpc_port, gateway.http_port, [gateway.ops_port]), billing_url)
    # One machine-readable line for scripts and tests that start a gateway on port 0.
    ports = {"grpc_port": gateway.grpc_port, "http_port": gateway.http_port, "ops_port": gateway.ops_port}
    print("READY " + json.dumps(ports), flush=True)
    await stop.wait()
    log.info("stopping: draining in-flight requests (grace %.0f s)", settings.shutdown_grace_s)
    await gateway.drain()
    if orphan_watch is not None and not orphan_watch.done():  # done: the supervisor is gone, nobody reads stdout
        orphan_watch.cancel()
        with contextlib.suppress(BrokenPipeError):  # it died just now
            print(DRAINED_LINE, flush=True)  # the supervisor stops billing (its exit scrape) once every worker drained
    if billing is None:
        await gateway.close()  # waits (bounded) for whoever scrapes this gateway to read the final counters
        return
    await _stop_billing(billing)
    await gateway.close(final_scrape_wait_s=0)


_WORKER_STOP_MARGIN_S = 30.0  # beyond a worker's own bounds (grace, final-scrape wait) before it is killed


def _require_shared_quota(settings: Settings) -> None:
    """Several gateway processes must share quota and idempotency state: kept in each process, a partner would get
    up to N times its plan. Checked before anything starts."""
    if settings.workers > 1 and settings.redis_url is None:
        print(
            f"serving: --workers {settings.workers} (SERVING_WORKERS) runs {settings.workers} gateway processes,"
            " which must share the quota: set SERVING_REDIS_URL (e.g. redis://127.0.0.1:6379/0).",
            file=sys.stderr,
        )
        raise SystemExit(2)


async def _supervise(settings: Settings, ray_address: str, key: str | None, ray_temp_dir: str | None = None) -> int:
    """``--workers N`` (N > 1): N gateway processes on the same partner ports (``gateway/workers.py``), started
    and stopped together; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.ExitStack() as reserved:  # held until the end; they take no connections (see reserve_port)
        try:
            grpc_port = reserved.enter_context(reserve_port(settings.grpc_host, settings.grpc_port)).getsockname()[1]
            http_port = reserved.enter_context(reserve_port(settings.http_host, settings.http_port)).getsockname()[1]
        except PortInUse as exc:
            log.error("cannot start the gateway workers: %s", exc)
            return 1
        supervisor = Supervisor(worker_specs(settings, ray_address, grpc_port, http_port, ray_temp_dir))
        billing: asyncio.subprocess.Process | None = None
        readers: set[asyncio.Task[None]] = set()  # billing's stdout, read on
        ready = await supervisor.start(stop)
        if ready is not None:
            ops_ports = [int(worker["ops_port"]) for worker in ready]
            if key is not None:
                billing, billing_url = await _start_billing(settings, ops_ports, readers)
                _announce(settings, key, (grpc_port, http_port, ops_ports), billing_url)
            print(ready_line(grpc_port, http_port, ops_ports), flush=True)
            await supervisor.run_until(stop)
        log.info("stopping the gateway workers")
        supervisor.terminate()
        await supervisor.drained(settings.shutdown_grace_s + _WORKER_STOP_MARGIN_S)
        if billing is not None:
            await _stop_billing(billing)
        return await supervisor.wait(settings.final_scrape_wait_s + _WORKER_STOP_MARGIN_S)


def _ray_env() -> dict[str, Any]:
    return {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}


def _ray_auth_rejected(error: BaseException | None) -> bool:
    while error is not None:
        if "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _ray_auth_env() -> None:
    """Sets RAY_AUTH_MODE=token (also for child processes) if RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token holds a token and RAY_AUTH_MODE is unset; a cluster without token authentication accepts such
    a client too."""
    if "RAY_AUTH_MODE" not in os.environ:
        with contextlib.suppress(ImportError):  # Ray's own step for ``auto``; absent in other Ray versions
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _ray_init(**kwargs: Any) -> None:
    """``ray.init`` that authenticates to a running cluster alike for an explicit address and for ``auto``.

    Ray 2.60's ``ray.init`` turns on token authentication from a local token only when it finds the cluster itself
    (``address`` None or ``auto``); given an address (``--ray-address``, ``RAY_ADDRESS``) with ``RAY_AUTH_MODE``
    unset it connects without a token, and a cluster with token authentication (what ``ray start --head`` runs
    once ``~/.ray/auth_token`` exists) rejects it with ``InvalidAuthToken`` after about 20 s of retries.
    """
    import ray

    _ray_auth_env()
    try:
        ray.init(**kwargs)
    except ConnectionError as error:
        if not _ray_auth_rejected(error):
            raise
        mode = os.environ.get("RAY_AUTH_MODE")
        sent = "a token that is not the cluster's" if mode == "token" else f"no token (RAY_AUTH_MODE={mode or 'unset'})"
        raise SystemExit(
            f"serving: the Ray cluster at {kwargs.get('address') or 'auto'} requires token authentication and"
            f" rejected this process (InvalidAuthToken), which sent {sent}. Set RAY_AUTH_MODE=token and put the"
            " cluster's token in ~/.ray/auth_token, in a file named by RAY_AUTH_TOKEN_PATH, or in RAY_AUTH_TOKEN"
            " (`ray get-auth-token` on the head node prints it)."
        ) from None


def _convert_models(specs: list[ModelSpec], cache_dir: Path) -> None:
    """Converts GGUF sources into the model cache once (the replicas then load the converted files)."""
    from serving.models.sources import needs_conversion, resolve_model_dir

    for spec in specs:
        if needs_conversion(spec, cache_dir):
            print(f"converting {spec.id} from GGUF into {cache_dir} (first start only)...", flush=True)
            started = time.monotonic()
            # In a child process: torch and transformers stay out of the process that then serves as the gateway.
            child = multiprocessing.get_context("spawn").Process(target=resolve_model_dir, args=(spec, cache_dir))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"serving: converting {spec.id} failed (exit code {child.exitcode}); see above")
            print(f"  converted in {time.monotonic() - started:.0f} s", flush=True)


def cmd_run(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from serving.models.deployment import deploy_models

    settings = _settings(args)
    _require_shared_quota(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings = _admin_token(settings)
    store = PartnerStore(Database(settings.partners_db_url))
    key = _demo_key(settings, store)
    specs = load_registry(settings.model_registry)
    if settings.ray_address is None:  # a local Ray: convert here, with progress, rather than silently in a replica
        _convert_models(specs, settings.models_cache)
    print(f"starting Ray and deploying {len(specs)} models...", flush=True)
    _ray_init(
        address=settings.ray_address,
        num_cpus=settings.ray_num_cpus,
        include_dashboard=False,
        runtime_env=_ray_env(),
        logging_level=logging.WARNING,
    )
    code = 0
    try:
        serve.start(proxy_location="Disabled")
        handles = deploy_models(
            specs, settings.models_cache, settings.serve_app_name, progress=lambda line: print(line, flush=True)
        )
        if settings.workers > 1:  # the workers attach to this Ray instance as drivers of their own
            code = asyncio.run(_supervise(settings, ray.get_runtime_context().gcs_address, key))
        else:
            eventloop.run(_serve_until_signal(settings, handles, store, key), settings.event_loop)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        store.close()
    if code:
        raise SystemExit(code)


def cmd_gateway(args: argparse.Namespace) -> None:
    """A gateway process attached to models another process (or KubeRay) deployed."""
    import ray

    from serving.models.deployment import attach_models

    settings = _settings(args)
    with contextlib.ExitStack() as stack:
        # A supervisor's worker gets the node its supervisor started; otherwise start one if configured.
        node_dir: str | None = args.ray_temp_dir
        if settings.ray_own_node and node_dir is None:
            if settings.ray_address in (None, "auto"):
                raise SystemExit("serving: SERVING_RAY_OWN_NODE joins a cluster by its address: set --ray-address")
            _ray_auth_env()  # before the node starts: it must authenticate to the cluster as the driver does
            node_dir = stack.enter_context(own_ray_node(str(settings.ray_address)))
        if settings.workers > 1 and not args.worker:  # the supervisor: no Ray, no stores of its own
            _require_shared_quota(settings)
            raise SystemExit(asyncio.run(_supervise(settings, settings.ray_address or "auto", None, node_dir)))
        store = stack.enter_context(contextlib.closing(PartnerStore(Database(settings.partners_db_url))))
        node = {} if node_dir is None else {"_temp_dir": node_dir}  # ray.init attaches to that node's raylet
        _ray_init(address=settings.ray_address or "auto", logging_level=logging.WARNING, namespace="serve", **node)
        stack.callback(ray.shutdown)
        handles = attach_models(load_registry(settings.model_registry), settings.serve_app_name)
        eventloop.run(_serve_until_signal(settings, handles, store, None, worker=args.worker), settings.event_loop)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="serving", description=__doc__)
    root.add_argument("--data-dir", dest="data_dir", help="data directory (default var/, SERVING_DATA_DIR)")
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start Ray, deploy the models and run the gateway")
    gateway = commands.add_parser("gateway", help="run a gateway against models already deployed")
    for sub in (run, gateway):
        sub.add_argument("--grpc-port", dest="grpc_port", type=int)
        sub.add_argument("--http-port", dest="http_port", type=int)
        sub.add_argument("--ops-port", dest="ops_port", type=int, help="metrics, admin API, health (private)")
        sub.add_argument("--ray-address", dest="ray_address")
        sub.add_argument("--model-registry", dest="model_registry")
        sub.add_argument(
            "--workers", dest="workers", type=int, help="gateway processes sharing the partner ports (SERVING_WORKERS)"
        )
    # A worker of a --workers supervisor: shares the partner ports, reports its drain, stops if the supervisor dies.
    gateway.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    gateway.add_argument("--ray-temp-dir", dest="ray_temp_dir", help=argparse.SUPPRESS)  # the supervisor's own node
    run.set_defaults(func=cmd_run)
    gateway.set_defaults(func=cmd_gateway)

    add_admin_commands(commands, _settings)
    return root


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no code path may reach a model hub
    args = parser().parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lines = access_log.configure(settings.access_log)
    try:
        args.func(args)
    finally:
        lines.stop()  # writes what is still queued


if __name__ == "__main__":
    main()
