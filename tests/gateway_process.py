"""Start a gateway as its own process (``serving gateway``) attached to the test session's Ray models."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import ray

from serving.settings import Settings


async def start_gateway_process(settings: Settings, **env: str) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    """Returns the process and its ports once it prints its readiness line."""
    environment = {
        **os.environ,
        "SERVING_DATA_DIR": str(settings.data_dir),
        "SERVING_MODEL_CACHE_DIR": str(settings.models_cache),
        "SERVING_SERVE_APP_NAME": settings.serve_app_name,
        "SERVING_ADMIN_TOKEN": settings.admin_token or "",
        **env,
    }
    # Like an operator's shell: ray.init in this test session set RAY_AUTH_MODE=token for itself, the gateway
    # must find the cluster's token (~/.ray/auth_token) on its own for an explicit --ray-address.
    environment.pop("RAY_AUTH_MODE", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "serving.cli", "gateway",
        "--ray-address", ray.get_runtime_context().gcs_address,
        "--grpc-port", "0", "--http-port", "0", "--ops-port", "0",
        env=environment, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    while line := await process.stdout.readline():  # wait on the gateway's own readiness line
        if line.startswith(b"READY "):
            return process, json.loads(line[6:])
    raise AssertionError(f"gateway exited before it was ready (code {await process.wait()})")
