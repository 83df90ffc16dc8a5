"""Application builder for a Serve config file (KubeRay ``RayService.spec.serveConfigV2``).

Each Serve application in the config imports ``serving.models.app_builder:build_app`` with
``args: {model: <model id>, cache_dir: <dir>, registry: <optional registry path>}`` and gets exactly the
application ``serving run`` deploys for that model (``deployment.build_application``), so the embedded default
and the cluster run the same deployments. Name each application ``<serve_app_name>-<model id>`` so that
``serving gateway`` finds it.
"""

from __future__ import annotations

from pathlib import Path

from ray import serve

from serving.models.deployment import build_application
from serving.models.registry import RegistryError, load_registry


def build_app(args: dict[str, str]) -> serve.Application:
    model = args.get("model")
    if not model:
        raise RegistryError("the Serve application args need 'model' (a model id from the registry)")
    registry = args.get("registry")
    specs = {spec.id: spec for spec in load_registry(Path(registry) if registry else None)}
    if model not in specs:
        raise RegistryError(f"model {model!r} is not in the registry; it has {sorted(specs)}")
    return build_application(specs[model], Path(args.get("cache_dir") or "var/models"))
