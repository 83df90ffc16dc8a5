"""The gateway's own Ray node: a raylet with no CPUs, started next to the gateway, that its driver attaches to.

A Ray driver needs a raylet on its own machine (``ray.init(address=...)`` looks for one and fails without it). A
gateway that borrowed the head's raylet (same machine) dies with the head; one in its own pod has no raylet at all.
With a node of its own the gateway depends on the head only through the GCS, and with GCS fault tolerance (external
Redis) the raylet and the driver reconnect to a restarted head while the gateway keeps calling the replicas it
knows (decision 0015). The node offers no CPUs and a minimal object store: nothing is scheduled on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("serving.gateway")

# Ray's smallest object store (75 MiB) is ample: results this small travel inline, not through the store.
_OBJECT_STORE_BYTES = 75 * 1024 * 1024
_STOP_TIMEOUT_S = 15.0


def node_command(address: str, temp_dir: str) -> list[str]:
    """``ray start`` for a zero-CPU node joining ``address``, blocking until it is stopped."""
    ray = Path(sys.executable).with_name("ray")
    return [
        str(ray) if ray.exists() else "ray",
        "start",
        "--block",
        f"--address={address}",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--object-store-memory={_OBJECT_STORE_BYTES}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


@contextlib.contextmanager
def own_ray_node(address: str) -> Iterator[str]:
    """Starts the node and yields its temp dir (``ray.init(_temp_dir=...)`` picks this node's raylet among any on
    the machine); stops it, raylet and agents included, on exit. ``ray.init`` waits for the node to register. If
    the node exits on its own (it could not join, or its raylet gave up on an unreachable head), the gateway is
    sent SIGTERM: it stops gracefully, and its supervisor (Kubernetes) starts it again."""
    # Short and under /tmp: Ray's socket paths must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="serving-ray-")
    # setpriv (util-linux): the node gets SIGTERM when the gateway dies, even by SIGKILL, so no raylet outlives it
    # (`ray start --block` stops its processes on SIGTERM).
    setpriv = shutil.which("setpriv")
    command = [setpriv, "--pdeathsig", "TERM", *node_command(address, temp_dir)] if setpriv else []
    process = subprocess.Popen(
        command or node_command(address, temp_dir),
        start_new_session=True,  # one process group: stopping it stops the raylet and everything it started
        stdout=subprocess.DEVNULL,
        env={name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"},
    )
    log.info("started this gateway's Ray node (pid %d, temp dir %s)", process.pid, temp_dir)
    stopping = threading.Event()
    threading.Thread(target=_watch, args=(process, stopping), name="ray-node-watch", daemon=True).start()
    try:
        yield temp_dir
    finally:
        stopping.set()
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _watch(process: subprocess.Popen[bytes], stopping: threading.Event) -> None:
    code = process.wait()
    if not stopping.is_set():
        log.error("this gateway's Ray node exited (code %s); stopping the gateway", code)
        os.kill(os.getpid(), signal.SIGTERM)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the node's process group (``ray start --block`` stops the processes it started), then SIGKILL to
    whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(_STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
