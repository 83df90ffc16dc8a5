"""`make image-test`: runs the image `make image` built as the embedded platform, its ports published on 127.0.0.1
only, waits for readiness, makes a real embedding over HTTP and a streamed generation over gRPC through it, prints
what it measured, and removes the container (also on failure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from serving_sdk import Client, GenerateResult, TextDelta

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 600.0
PORTS = {"grpc": 50051, "http": 8000, "ops": 8090}


def podman(*args: str, check: bool = True) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "build" / "image" / "containers.conf")}
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def published(name: str, port: int) -> int:
    return int(podman("port", name, f"{port}/tcp").splitlines()[0].rsplit(":", 1)[1])


def wait_ready(name: str, ops: int) -> float:
    """Seconds until /readyz answers 200; fails early if the container exits."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        if podman("inspect", name, "--format", "{{.State.Running}}") != "true":
            raise RuntimeError("the container exited before it was ready:\n" + podman("logs", name, check=False))
        try:
            if httpx.get(f"http://127.0.0.1:{ops}/readyz", timeout=2.0).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(1.0)
    raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f} s:\n" + podman("logs", name, check=False))


def main() -> int:
    tag = (ROOT / "build" / "image" / "tag").read_text().strip()
    name = f"serving-image-test-{uuid.uuid4().hex[:8]}"
    publish = [arg for port in PORTS.values() for arg in ("-p", f"127.0.0.1::{port}")]
    hosts = [f"SERVING_{door}_HOST=0.0.0.0" for door in ("GRPC", "HTTP", "OPS")]  # inside the container only
    env = [arg for pair in hosts for arg in ("-e", pair)]
    podman("run", "-d", "--init", "--name", name, "--shm-size=1g", *publish, *env, tag, "serving", "run")
    try:
        ports = {door: published(name, port) for door, port in PORTS.items()}
        ready_s = wait_ready(name, ports["ops"])
        key = podman("exec", name, "cat", "/var/lib/serving/demo-api-key")
        embedded = httpx.post(
            f"http://127.0.0.1:{ports['http']}/v1/embeddings",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "minilm-l6", "input": ["hello from the image"]},
            timeout=60.0,
        )
        embedded.raise_for_status()
        vector = embedded.json()["data"][0]["embedding"]
        pieces: list[str] = []
        final: GenerateResult | None = None
        with Client(f"127.0.0.1:{ports['grpc']}", key) as client:
            for event in client.generate_stream("What is the capital of France?", max_tokens=24, temperature=0):
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                else:
                    final = event
        assert len(vector) == 384, f"embedding has {len(vector)} dimensions"
        assert final is not None and "".join(pieces) == final.text and final.usage.output_tokens > 0
        report = {
            "image": tag,
            "ready_s": round(ready_s, 1),
            "embedding_dimensions": len(vector),
            "streamed_pieces": len(pieces),
            "generated": final.text,
            "output_tokens": final.usage.output_tokens,
            "ports": ports,
        }
        print(json.dumps(report))
        return 0
    finally:
        podman("rm", "-f", "-t", "2", name, check=False)


if __name__ == "__main__":
    sys.exit(main())
