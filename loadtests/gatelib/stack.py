"""The stack under test when the gate starts it: ``serving run`` in a subprocess on free ports (gRPC, HTTP and the
private ops listener), ready once it prints its ``READY {...}`` line, stopped with SIGINT (which drains requests
and flushes the usage ledger)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Target:
    grpc_target: str
    http_base: str  # the partner HTTP API
    ops_base: str  # the ops listener: the admin API (/admin/v1) and /metrics, never on the partner port
    admin_token: str
    ledger_db: str | None  # a SQLite path or postgresql:// URL the gate can read; None: admin usage API only


def _echo(stream: IO[str], log: IO[str]) -> None:
    for line in stream:
        log.write(line)
        log.flush()


@contextmanager
def started_stack(data_dir: Path, model_cache: Path, log_path: Path, timeout_s: float = 600.0) -> Iterator[Target]:
    """``serving run`` on ports 0 with its own data directory and a fresh local Ray; yields once it is ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SERVING_DATA_DIR": str(data_dir),
        "SERVING_MODEL_CACHE_DIR": str(model_cache),
        "SERVING_RAY_ADDRESS": "local",  # never attach to another Ray running on this machine
    }
    command = [sys.executable, "-m", "serving.cli", "run", "--grpc-port", "0", "--http-port", "0", "--ops-port", "0"]
    log = log_path.open("w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    timer = threading.Timer(timeout_s, process.kill)  # a stack that never gets ready does not hang the gate
    timer.start()
    try:
        ports: dict[str, int] | None = None
        for line in process.stdout:
            log.write(line)
            if line.startswith("READY "):
                ports = json.loads(line.removeprefix("READY "))
                break
        timer.cancel()
        if ports is None:
            raise RuntimeError(f"serving run exited before it was ready (code {process.wait()}); see {log_path}")
        threading.Thread(target=_echo, args=(process.stdout, log), daemon=True).start()
        token = os.environ.get("SERVING_ADMIN_TOKEN") or (data_dir / "admin-token").read_text().strip()
        yield Target(
            grpc_target=f"127.0.0.1:{ports['grpc_port']}",
            http_base=f"http://127.0.0.1:{ports['http_port']}",
            ops_base=f"http://127.0.0.1:{ports['ops_port']}",
            admin_token=token,
            ledger_db=str(data_dir / "ledger.db"),
        )
    finally:
        timer.cancel()
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
