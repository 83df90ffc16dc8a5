"""Choose the Ray hop by measurement (issue 12 item 4): today's DeploymentHandle calls against the alternatives,
on the same model deployment and the same client load, side by side in one run on this machine.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/bench_rayhop.py [--calls 6000] [--model noop|minilm-l6] [--json FILE]

It starts Ray, deploys the model through ``serving.models.deployment`` (the no-op by default, so the hop is all
that is measured), starts Serve's gRPC proxy with the partner API's servicer, and measures each variant of
``benchlib.rayhop`` in a fresh worker subprocess (in-process callers attached to the cluster for the handle and
actor rows; a gRPC client process for the rows with a network front). Every row runs twice, the second pass in
reverse order, so drift affects them alike; the table reports the means and the ratios to today's path (H1 for
one call per request, HB for the gateway's micro-batches, G for the rows behind a gRPC front). Serve's ingress
replicas are deployed twice: with Serve's defaults (P, D) and with user code on the replica's main loop (PM, DM).

Direct ingress needs ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the controller and replicas, which leaves Serve's
proxy on the head node only for the whole instance; its rows (G2, D, DM) run afterwards in a Ray instance of their
own (``--phase direct`` in a subprocess), D and DM divided by the G2 measured there. Nothing is asserted: it prints
numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.common import NOOP_MODEL, fmt
from benchlib.rayhop import Counts, Sample

SAME_LOOP = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
GATEWAY_ROLES = ("caller", "front", "proxy", "ingress")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=NOOP_MODEL, help="the model deployment behind every variant")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup-calls", type=int, default=1000, help="calls at full concurrency before measuring")
    parser.add_argument("--calls", type=int, default=6000, help="calls measured at full concurrency (rate, CPU)")
    parser.add_argument("--c1-calls", type=int, default=400, help="calls measured one at a time (p50 at c=1)")
    parser.add_argument("--no-direct-ingress", action="store_true", help="skip the direct-ingress phase (G2, D)")
    parser.add_argument("--json", type=Path, help="also write every run and the means to this JSON file")
    parser.add_argument("--phase", choices=("main", "direct"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    baseline: str
    job: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ingress:
    """A Serve ingress replica: its process, and in a direct-ingress instance its own gRPC port."""

    pid: int
    port: int | None = None


@dataclass
class Cluster:
    address: str
    model_pid: int
    proxy_grpc_port: int
    proxy_pid: int | None = None
    ingress: dict[str, Ingress] = field(default_factory=dict)  # app name → its replica


def start_cluster(tmp: Path, model: str, direct: bool) -> Cluster:
    """Ray, Serve (gRPC proxy with the partner API's servicer, access logs off), the model, the ingress apps:
    the gateway-core stand-in twice (Serve's defaults; user code on the replica's main loop) and, on the no-op
    model without direct ingress, the no-op as the ingress itself."""
    import ray
    from benchlib.common import CACHE_DIR
    from benchlib.rayhop import (
        APP_PREFIX,
        INGRESS_APP,
        INGRESS_MAIN_LOOP_APP,
        MAIN_LOOP_ENV,
        NOOP_INGRESS_APP,
        SERVICER,
        HopIngress,
        NoopIngress,
        actor_pid,
        deploy_ingress,
        direct_ingress_grpc_port,
        model_app,
        proxy_actor,
        replica_actor,
        replica_runs_user_code_on_main_loop,
    )
    from benchlib.stack import Hardware, free_port, init_local_ray, write_registry
    from ray import serve

    from serving.models.deployment import deploy_models
    from serving.models.registry import load_registry

    specs = [spec for spec in load_registry(write_registry(tmp / "registry.toml", Hardware())) if spec.id == model]
    if not specs:
        raise SystemExit(f"unknown model {model!r}")
    init_local_ray()
    grpc_port = free_port()
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        logging_config={"enable_access_log": False},
    )
    deploy_models(specs, CACHE_DIR, APP_PREFIX)
    deploy_ingress(INGRESS_APP, HopIngress, model_app(model))
    deploy_ingress(INGRESS_MAIN_LOOP_APP, HopIngress, model_app(model), env=MAIN_LOOP_ENV)
    if model == NOOP_MODEL and not direct:
        deploy_ingress(NOOP_INGRESS_APP, NoopIngress)
    cluster = Cluster(
        address=ray.get_runtime_context().gcs_address,
        model_pid=actor_pid(replica_actor(model_app(model))),
        proxy_grpc_port=grpc_port,
        proxy_pid=None if direct else actor_pid(proxy_actor()),
    )
    for app in (INGRESS_APP, INGRESS_MAIN_LOOP_APP, NOOP_INGRESS_APP):
        if app == NOOP_INGRESS_APP and (model != NOOP_MODEL or direct):
            continue
        replica = replica_actor(app)
        if replica_runs_user_code_on_main_loop(replica) != (app == INGRESS_MAIN_LOOP_APP):
            raise RuntimeError(f"{app}: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD is not what was deployed")
        port = direct_ingress_grpc_port(replica) if direct else None
        cluster.ingress[app] = Ingress(actor_pid(replica), port)
    return cluster


def stop_cluster() -> None:
    import ray
    from ray import serve

    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


def base_job(key: str, model: str, counts: Counts) -> dict[str, Any]:
    return {"key": key, "model": model, **asdict(counts)}


def inproc_rows(cluster: Cluster, model: str, counts: Counts) -> list[Row]:
    """The handle and actor rows: 32 callers in a worker process attached to the cluster."""
    from benchlib.rayhop import model_app

    variants = [
        ("H", "DeploymentHandle, Serve defaults", "handle", False, {}),
        ("L", "DeploymentHandle, router on the caller's loop", "handle", False, SAME_LOOP),
        ("R", "DeploymentHandle, gRPC transport (_by_reference=False)", "handle", True, {}),
        ("X", "DeploymentHandle, caller's loop + gRPC transport", "handle", True, SAME_LOOP),
        ("A", "replica actor called directly (no Serve router)", "actor", False, {}),
    ]
    rows: list[Row] = []
    for letter, label, target, grpc_transport, env in variants:
        for is_batched, suffix, how in ((False, "1", "1 call/request"), (True, "B", "gateway micro-batches")):
            key = letter + suffix
            job = {
                **base_job(key, model, counts),
                "kind": "inproc",
                "address": cluster.address,
                "model_app": model_app(model),
                "target": target,
                "grpc_transport": grpc_transport,
                "batched": is_batched,
                "pids": {"model": cluster.model_pid},
            }
            rows.append(Row(key, f"{label}, {how}", "H" + suffix, job, env))
    return rows


def client_row(
    key: str,
    label: str,
    baseline: str,
    target: str,
    app: str | None,
    pids: dict[str, int | None],
    model: str,
    counts: Counts,
) -> Row:
    job = {
        **base_job(key, model, counts),
        "kind": "client",
        "target": target,
        "app": app,
        "pids": {role: pid for role, pid in pids.items() if pid is not None},
    }
    return Row(key, label, baseline, job)


def front_rows(
    cluster: Cluster, front_port: int, front_pid: int, model: str, counts: Counts, direct: bool
) -> list[Row]:
    """Rows behind a gRPC front, loaded by a client process: ours (G), Serve's proxy (P, PM, P0), or in a
    direct-ingress instance ours (G2) and the ingress replicas' own ports (D, DM)."""
    from benchlib.rayhop import INGRESS_APP, INGRESS_MAIN_LOOP_APP, NOOP_INGRESS_APP

    model_pid = cluster.model_pid
    ours_key = "G2" if direct else "G"
    ours = "grpc.aio front (own process) → micro-batches → DeploymentHandle"
    rows = [
        client_row(
            ours_key,
            ours + (", direct-ingress Ray" if direct else ""),
            ours_key,
            f"127.0.0.1:{front_port}",
            None,
            {"front": front_pid, "model": model_pid},
            model,
            counts,
        )
    ]
    core = "ingress replica → micro-batches → DeploymentHandle"
    variants = ((INGRESS_APP, "", "Serve defaults"), (INGRESS_MAIN_LOOP_APP, "M", "user code on main loop"))
    for app, suffix, how in variants:
        ingress = cluster.ingress[app]
        pids: dict[str, int | None] = {"ingress": ingress.pid, "model": model_pid}
        if direct:  # straight to the replica's own port; no application header needed
            key, label, target, via = "D" + suffix, f"direct ingress: {core} ({how})", f"127.0.0.1:{ingress.port}", None
        else:
            key, label, via = "P" + suffix, f"Serve gRPC proxy → {core} ({how})", app
            target = f"127.0.0.1:{cluster.proxy_grpc_port}"
            pids["proxy"] = cluster.proxy_pid
        rows.append(client_row(key, label, ours_key, target, via, pids, model, counts))
    noop = cluster.ingress.get(NOOP_INGRESS_APP)
    if noop is not None:
        label = "Serve gRPC proxy → the no-op as the ingress itself (no 2nd hop)"
        target = f"127.0.0.1:{cluster.proxy_grpc_port}"
        pids = {"proxy": cluster.proxy_pid, "model": noop.pid}
        rows.append(client_row("P0", label, "G", target, NOOP_INGRESS_APP, pids, model, counts))
    return rows


async def run_phase(cluster: Cluster, model: str, counts: Counts, direct: bool) -> tuple[list[Row], list[Sample]]:
    from benchlib.rayhop import model_app, spawn_worker, start_front

    front = await start_front(cluster.address, model_app(model))
    try:
        rows = front_rows(cluster, front.port, front.pid, model, counts, direct)
        if not direct:
            rows = inproc_rows(cluster, model, counts) + rows
        samples: list[Sample] = []
        for order in (rows, rows[::-1]):
            for row in order:
                sample = await spawn_worker(row.job, row.env)
                progress(f"  {row.key:<3} {sample.rate:8.1f} req/s  p50 c=1 {sample.p50_c1_ms:6.2f} ms")
                samples.append(sample)
        return rows, samples
    finally:
        await front.stop()


def phase(model: str, counts: Counts, direct: bool) -> tuple[list[Row], list[Sample]]:
    with tempfile.TemporaryDirectory(prefix="rayhop-") as tmp:
        try:
            cluster = start_cluster(Path(tmp), model, direct)
            return asyncio.run(run_phase(cluster, model, counts, direct))
        finally:
            stop_cluster()


def direct_phase(args: argparse.Namespace) -> tuple[list[Row], list[Sample]]:
    """The direct-ingress rows in a subprocess whose Ray instance has direct ingress on."""
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", "direct", "--model", args.model]
    command += ["--concurrency", str(args.concurrency), "--warmup-calls", str(args.warmup_calls)]
    command += ["--calls", str(args.calls), "--c1-calls", str(args.c1_calls)]
    env = {**os.environ, **DIRECT_INGRESS_ENV}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PHASE ")]
    if done.returncode != 0 or not lines:
        print(f"direct-ingress phase failed (exit {done.returncode}); its rows are missing", flush=True)
        return [], []
    data = json.loads(lines[-1].removeprefix("PHASE "))
    return [Row(**r) for r in data["rows"]], [Sample(**s) for s in data["samples"]]


# --- report -----------------------------------------------------------------------------------------------------


@dataclass
class Mean:
    row: Row
    runs: list[Sample]

    def _mean(self, values: list[float]) -> float:
        return sum(values) / len(values)

    @property
    def rate(self) -> float:
        return self._mean([s.rate for s in self.runs])

    @property
    def p50_c1(self) -> float:
        return self._mean([s.p50_c1_ms for s in self.runs])

    @property
    def p50_c32(self) -> float:
        return self._mean([s.p50_c32_ms for s in self.runs])

    def cpu(self, roles: tuple[str, ...]) -> float:
        return self._mean([sum(v for r, v in s.cpu_ms.items() if r in roles) for s in self.runs])


def means(rows: list[Row], samples: list[Sample]) -> list[Mean]:
    return [Mean(row, [s for s in samples if s.key == row.key]) for row in rows]


def report(table: list[Mean], counts: Counts, load_before: tuple[float, ...], load_after: tuple[float, ...]) -> None:
    by_key = {m.row.key: m for m in table}
    print()
    print(
        f"{counts.calls} calls at concurrency {counts.concurrency} (after {counts.warmup_calls} warm-up calls) and "
        f"{counts.c1_calls} at concurrency 1 per run; every row run twice (second pass reversed), means shown."
    )
    print("gw CPU: CPU ms per request of the caller / front / proxy / ingress processes; model: the model replica's.")
    header = (
        f"{'key':<4}{'variant':<74}{'req/s c=32':>11}{'p50 c=1':>9}{'p50 c=32':>9}{'gw CPU':>8}{'model':>7}"
        f"   {'vs':<4}{'×rate':>6}{'×p50':>6}{'×gwCPU':>7}  runs (req/s)"
    )
    print(header)
    print("-" * len(header))
    for m in table:
        base = by_key.get(m.row.baseline)
        gw = m.cpu(GATEWAY_ROLES)
        ratios = (
            ""
            if base is None
            else (
                f"{m.row.baseline:<4}{fmt(m.rate / base.rate, 2):>6}{fmt(m.p50_c1 / base.p50_c1, 2):>6}"
                f"{fmt(gw / base.cpu(GATEWAY_ROLES), 2):>7}"
            )
        )
        runs = " / ".join(f"{s.rate:.0f}" for s in m.runs)
        print(
            f"{m.row.key:<4}{m.row.label[:73]:<74}{m.rate:>11.1f}{m.p50_c1:>9.2f}{m.p50_c32:>9.2f}{gw:>8.2f}"
            f"{m.cpu(('model',)):>7.2f}   {ratios}  {runs}"
        )
    for m in table:
        if m.row.key in ("P", "PM", "P0", "D", "DM"):
            parts = ", ".join(
                f"{role} {m.cpu((role,)):.2f}"
                for role in ("proxy", "ingress", "model")
                if any(role in s.cpu_ms for s in m.runs)
            )
            print(f"{m.row.key}: CPU ms/request by process: {parts}")
    print(
        f"load average (1/5/15 min): {' '.join(f'{v:.2f}' for v in load_before)} before, "
        f"{' '.join(f'{v:.2f}' for v in load_after)} after; {os.cpu_count()} CPUs"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        from benchlib.rayhop import run_worker

        run_worker(args.worker)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = Counts(args.concurrency, args.warmup_calls, args.calls, args.c1_calls)
    if args.phase == "direct":
        rows, samples = phase(args.model, counts, direct=True)
        print("PHASE " + json.dumps({"rows": [asdict(r) for r in rows], "samples": [asdict(s) for s in samples]}))
        return
    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"model {args.model}: starting Ray, measuring the handle, actor and gRPC-front rows...", flush=True)
    rows, samples = phase(args.model, counts, direct=False)
    if not args.no_direct_ingress:
        print("direct ingress: a Ray instance of its own (RAY_SERVE_ENABLE_DIRECT_INGRESS=1)...", flush=True)
        more_rows, more_samples = direct_phase(args)
        rows, samples = rows + more_rows, samples + more_samples
    table = means(rows, samples)
    report(table, counts, load_before, os.getloadavg())
    if args.json is not None:
        args.json.write_text(
            json.dumps({"rows": [asdict(r) for r in rows], "samples": [asdict(s) for s in samples]}, indent=1)
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
