"""The release gate: one command that answers GO or NO-GO (``make loadtest``).

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/gate.py [--config loadtests/gate.toml] [--out var/loadtest]

Without a target it starts the stack (``serving run`` on free ports, its own data directory under the output
directory, the model cache in var/models) and stops it at the end. With one (``--grpc-target`` and
``--http-base``, or ``LOADTEST_TARGET=host`` for gRPC host:50051 and HTTP http://host:8000) it loads that
stack; it then needs the admin token (``--admin-token``/``LOADTEST_ADMIN_TOKEN``) and the gateway's private
ops listener, which serves the admin API (``--ops-base``/``LOADTEST_OPS_BASE``, default the HTTP host on port
8090), and reads the ledger database given by ``--ledger-db``/``LOADTEST_LEDGER_DB``, or else compares
per-partner totals from the admin usage API.

Steps: create the config's plans and partners through the admin API; run locust headless
(``loadtests/locustfile.py``: users ramp up at the configured rate, run for the configured time, then finish
the request in hand); write locust's HTML and CSV reports; compare the usage ledger with the outcome of every
request id locust saw; check the thresholds; print the GO / NO-GO table. Exit status: 0 GO, 1 NO-GO, 2 the
gate itself could not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from gatelib.config import DEFAULT_CONFIG, GateConfig, load_config
from gatelib.metering import Metering, compare_by_id, compare_by_partner, settled_ledger
from gatelib.outcomes import Expect, Observed, PartnerRun, RunFile
from gatelib.partners import create_partners
from gatelib.stack import REPO, Target, started_stack
from gatelib.verdict import evaluate, go, table, write_verdict

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
OPS_PORT = 8090  # SERVING_OPS_PORT's default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=REPO / "var" / "loadtest", help="reports and run files")
    parser.add_argument("--grpc-target", default=os.environ.get("LOADTEST_GRPC_TARGET"))
    parser.add_argument("--http-base", default=os.environ.get("LOADTEST_HTTP_BASE"))
    parser.add_argument(
        "--ops-base",
        default=os.environ.get("LOADTEST_OPS_BASE"),
        help=f"the ops listener (admin API); default http://<--http-base host>:{OPS_PORT}",
    )
    parser.add_argument("--admin-token", default=os.environ.get("LOADTEST_ADMIN_TOKEN"))
    parser.add_argument("--ledger-db", default=os.environ.get("LOADTEST_LEDGER_DB"), help="SQLite path or URL")
    parser.add_argument("--model-cache", type=Path, default=REPO / "var" / "models", help="when starting the stack")
    parser.add_argument("--run-time", type=int, help="override [load] run_time_s")
    parser.add_argument("--users", type=int, help="override [load] users")
    parser.add_argument(
        "--setup-only", action="store_true", help="with a target: create partners, write run.json (for locust's UI)"
    )
    args = parser.parse_args(argv)
    if host := os.environ.get("LOADTEST_TARGET"):
        args.grpc_target = args.grpc_target or f"{host}:50051"
        args.http_base = args.http_base or f"http://{host}:8000"
    if bool(args.grpc_target) != bool(args.http_base):
        parser.error("give both --grpc-target and --http-base (or LOADTEST_TARGET), or neither")
    if args.setup_only and not args.grpc_target:
        parser.error("--setup-only needs a running stack to set up (--grpc-target and --http-base)")
    if args.grpc_target and not args.admin_token:
        parser.error("a given target needs --admin-token (or LOADTEST_ADMIN_TOKEN) to create the gate's partners")
    if args.ops_base and not args.grpc_target:
        parser.error("--ops-base goes with a given target (--grpc-target and --http-base)")
    if args.http_base and not args.ops_base:
        args.ops_base = default_ops_base(args.http_base)
    return args


def default_ops_base(http_base: str) -> str:
    """The admin API is on the gateway's ops listener, never on the partner port: same host, port 8090."""
    host = urlsplit(http_base).hostname
    if not host:
        raise SystemExit(f"--http-base {http_base!r} has no host; give --ops-base")
    return f"http://{f'[{host}]' if ':' in host else host}:{OPS_PORT}"


def with_overrides(config: GateConfig, args: argparse.Namespace) -> GateConfig:
    load = config.load
    if args.run_time is not None:
        load = dataclasses.replace(load, run_time_s=args.run_time)
    if args.users is not None:
        load = dataclasses.replace(load, users=args.users)
    return dataclasses.replace(config, load=load)


def stack_for(args: argparse.Namespace) -> AbstractContextManager[Target]:
    if args.grpc_target:
        return nullcontext(
            Target(
                grpc_target=args.grpc_target,
                http_base=args.http_base.rstrip("/"),
                ops_base=args.ops_base.rstrip("/"),
                admin_token=args.admin_token,
                ledger_db=args.ledger_db,
            )
        )
    cache = args.model_cache if args.model_cache.exists() else REPO / ".cache" / "models"
    print(f"starting the stack (serving run; log in {args.out / 'stack.log'})...", flush=True)
    return started_stack(args.out / "stack-data", cache, args.out / "stack.log")


def run_file(config: GateConfig, run_id: str, target: Target, partners: list[PartnerRun]) -> RunFile:
    load, mix = config.load, config.mix
    return RunFile(
        run_id=run_id,
        grpc_target=target.grpc_target,
        http_base=target.http_base,
        partners=partners,
        grpc_mix=mix.grpc,
        http_mix=mix.http,
        max_tokens=mix.max_tokens,
        wait_min_s=load.wait_min_s,
        wait_max_s=load.wait_max_s,
        grpc_weight=load.grpc_weight if any(mix.grpc.values()) else 0,
        http_weight=load.http_weight if any(mix.http.values()) else 0,
    )


def run_locust(config: GateConfig, run: RunFile, out: Path) -> None:
    """Locust headless in its own process (it monkey-patches the standard library with gevent)."""
    load = config.load
    classes = [name for name, weight in (("GrpcApiUser", run.grpc_weight), ("HttpApiUser", run.http_weight)) if weight]
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--users", str(load.users), "--spawn-rate", str(load.spawn_rate), "--run-time", f"{load.run_time_s}s",
        "--stop-timeout", str(load.stop_timeout_s), "--host", run.http_base,
        "--run-file", str(out / "run.json"), "--outcomes-file", str(out / "outcomes.json"),
        "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--loglevel", "WARNING", *classes,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    timeout = load.run_time_s + load.stop_timeout_s + 120
    done = subprocess.run(command, env=env, timeout=timeout, check=False)
    # 0, or 1 when any request failed (the thresholds judge those); anything else: locust itself broke.
    if done.returncode not in (0, 1) or not (out / "outcomes.json").exists():
        raise RuntimeError(f"locust exited with {done.returncode} and no outcomes file")


def metering_for(target: Target, run: RunFile, observed: Observed) -> Metering:
    if target.ledger_db:
        served = sum(1 for o in observed.outcomes if o.expect is Expect.ONE)
        return compare_by_id(observed, settled_ledger(target.ledger_db, run.run_id, served), run.partners)
    return compare_by_partner(observed, target.ops_base, target.admin_token, run.partners)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = with_overrides(load_config(args.config), args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("outcomes.json", "verdict.json"):
        (out / stale).unlink(missing_ok=True)
    run_id = "lt" + datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    try:
        with stack_for(args) as target:
            partners = create_partners(target.ops_base, target.admin_token, config, run_id)
            run = run_file(config, run_id, target, partners)
            run.write(out / "run.json")
            names = [f"{p.name} ({s.plan})" for p, s in zip(partners, config.partners, strict=True)]
            print(f"run {run_id}: partners {', '.join(names)}")
            if args.setup_only:
                print(f"wrote {out / 'run.json'}")
                return 0
            load = config.load
            print(f"locust: {load.users} users, +{load.spawn_rate:g}/s, {load.run_time_s} s...", flush=True)
            run_locust(config, run, out)
            observed = Observed.read(out / "outcomes.json")
            if target.ledger_db is None:  # totals come from the live gateway
                metering = metering_for(target, run, observed)
        if target.ledger_db is not None:  # read after the stack we started has flushed its ledger and stopped
            metering = metering_for(target, run, observed)
    except Exception as exc:  # the gate could not run: not a verdict
        print(f"release gate could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    checks = evaluate(config, observed, metering)
    print()
    print(table(checks))
    for example in metering.examples:
        print(f"  metering: {example}")
    write_verdict(out / "verdict.json", checks, metering, observed.entries)
    print(f"\nreports: {out / 'report.html'}, {out / 'locust_stats.csv'}, {out / 'verdict.json'}")
    return 0 if go(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
