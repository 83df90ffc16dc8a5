"""The Kubernetes manifests: each overlay builds with kustomize and every rendered object validates against
the strict Kubernetes schemas (kubernetes-validate) or the CRD schemas in k8s/schemas/ (see its README)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

K8S = Path(__file__).resolve().parent.parent / "k8s"
KUBERNETES_VERSION = "1.33"
# The CRDs themselves, vendored whole at pinned operator versions (k8s/schemas/README.md).
_CRDS = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
OVERLAYS = ["dev", "prod"]


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (1.27+) must be on PATH to render k8s/ with its built-in kustomize (see README)"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, checked the way ``kubectl apply --validate=strict`` does:
    a field the CRD does not declare is an error (the API server would drop it silently), except under
    ``x-kubernetes-preserve-unknown-fields``. ``nullable`` admits null. CEL rules (``x-kubernetes-validations``) run
    only in an API server and are not checked here."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key not in ("description", "nullable"):
            out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserves = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserves:
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(name: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((K8S / "schemas" / name).read_text())
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict(served["schema"]["openAPIV3Schema"])


def validate(obj: dict[str, Any]) -> None:
    crd = _CRDS.get((obj["apiVersion"], obj["kind"]))
    if crd is None:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        return
    jsonschema.Draft202012Validator(crd_schema(crd, obj["apiVersion"].rsplit("/", 1)[1])).validate(obj)


def by_kind(objs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]
    return obj


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates(overlay: str) -> None:
    objs = render(overlay)
    assert len(objs) > 10
    for obj in objs:
        try:
            validate(obj)
        except Exception as exc:
            raise AssertionError(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is invalid: {exc}") from exc


def test_a_misspelt_field_fails_validation() -> None:
    """The validator is strict for built-in kinds and for the CRDs (a typo is not silently dropped)."""
    objs = render("dev")
    deployment = json.loads(json.dumps(one(objs, "StatefulSet", "gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate(deployment)
    rayservice = json.loads(json.dumps(one(objs, "RayService", "serving-models")))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containerz"] = []
    with pytest.raises(jsonschema.ValidationError):
        validate(rayservice)
    monitor = json.loads(json.dumps(one(objs, "ServiceMonitor", "gateway")))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serve_config_deploys_the_registry_models(overlay: str) -> None:
    from serving.models.registry import load_registry

    rayservice = one(render(overlay), "RayService", "serving-models")
    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    names = {app.name for app in config.applications}
    assert names == {f"models-{spec.id}" for spec in load_registry()}  # SERVING_SERVE_APP_NAME=models
    for app in config.applications:
        module, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        assert app.args["model"] == app.name.removeprefix("models-")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == "1"
    for group in groups.values():
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]


def test_app_builder_rejects_unknown_models() -> None:
    from serving.models.app_builder import build_app
    from serving.models.registry import RegistryError

    with pytest.raises(RegistryError):
        build_app({"model": "no-such-model"})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_have_probes_and_resources(overlay: str) -> None:
    objs = render(overlay)
    for workload in by_kind(objs, "Deployment") + by_kind(objs, "StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
    gateway = one(objs, "StatefulSet", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert gateway["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert one(objs, "HorizontalPodAutoscaler", "gateway")["spec"]["scaleTargetRef"]["name"] == "gateway"
    assert {p["metadata"]["name"] for p in by_kind(objs, "PodDisruptionBudget")} >= {"gateway", "billing"}
    assert by_kind(objs, "NetworkPolicy")


def test_dev_runs_redis_and_postgres_and_prod_uses_external_secrets() -> None:
    dev, prod = render("dev"), render("prod")
    assert {"redis", "postgres"} <= {o["metadata"]["name"] for o in dev}
    assert not {"redis", "postgres"} & {o["metadata"]["name"] for o in prod}
    dev_secrets = {o["metadata"]["name"] for o in by_kind(dev, "Secret")}
    assert not by_kind(prod, "Secret")  # created outside the repo
    for objs in (dev, prod):
        for kind, name in (("StatefulSet", "gateway"), ("Deployment", "billing")):  # billing's API: the admin token
            container = one(objs, kind, name)["spec"]["template"]["spec"]["containers"][0]
            env = container["env"]
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            if objs is prod:
                assert refs == {"serving-dsn", "serving-admin"}, name
            else:  # generated, with a content hash suffix that kustomize also writes into the references
                assert refs <= dev_secrets
                assert {r.rsplit("-", 1)[0] for r in refs} == {"serving-dsn", "serving-admin"}, name
        billing = one(objs, "Deployment", "billing")["spec"]["template"]["spec"]["containers"][0]
        [token] = [e for e in billing["env"] if e["name"] == "BILLING_ADMIN_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"]["name"].startswith("serving-admin")
        assert token["valueFrom"]["secretKeyRef"]["key"] == "token"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboards_and_rules_are_provisioned(overlay: str) -> None:
    objs = render(overlay)
    dashboards = [o for o in by_kind(objs, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard")]
    [configmap] = dashboards
    on_disk = {p.name: p.read_text() for p in (K8S / "base" / "dashboards").glob("*.json")}
    assert configmap["data"] == on_disk
    [rule] = by_kind(objs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())["spec"]
    assert {o["metadata"]["name"] for o in by_kind(objs, "ServiceMonitor")} == {"gateway", "billing"}
    assert by_kind(objs, "PodMonitor")


def gateway_config(objs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    [config] = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("gateway-config")]
    data: dict[str, str] = config["data"]
    return data


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector with matchLabels only (what these manifests use) against an object's labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


OPS_PORT = 8090
PARTNER_PORTS = {50051, 8000}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ops_port_is_private_and_scraped(overlay: str) -> None:
    """The ops listener (metrics, admin API, health) listens on the pod IP, is absent from the partner Service,
    is what the gateway ServiceMonitor scrapes (job "gateway", billing's Prometheus job), and only Prometheus and
    billing may reach it."""
    objs = render(overlay)
    deployment = one(objs, "StatefulSet", "gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "http": 8000, "ops": OPS_PORT}
    config = gateway_config(objs)
    assert config["SERVING_OPS_HOST"] == "0.0.0.0" and int(config["SERVING_OPS_PORT"]) == OPS_PORT

    partner = one(objs, "Service", "gateway")
    assert {(p["name"], p["port"]) for p in partner["spec"]["ports"]} == {("grpc", 50051), ("http", 8000)}
    assert not {p["targetPort"] for p in partner["spec"]["ports"]} & {"ops", OPS_PORT}
    ops = one(objs, "Service", "gateway-ops")
    assert selects({"matchLabels": ops["spec"]["selector"]}, pod_labels)
    assert ops["spec"]["ports"] == [{"name": "ops", "port": OPS_PORT, "targetPort": "ops", "appProtocol": "http"}]
    assert ops["spec"]["clusterIP"] == "None" and ops["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert ops["spec"]["publishNotReadyAddresses"] is True  # a draining pod stays a scrape target

    monitor = one(objs, "ServiceMonitor", "gateway")["spec"]
    services = [o for o in by_kind(objs, "Service") if selects(monitor["selector"], o["metadata"].get("labels", {}))]
    assert [o["metadata"]["name"] for o in services] == ["gateway-ops"]
    assert [(e["port"], e["path"]) for e in monitor["endpoints"]] == [("ops", "/metrics")]
    job = ops["metadata"]["labels"][monitor["jobLabel"]]
    billing = one(objs, "Deployment", "billing")["spec"]["template"]["spec"]["containers"][0]
    billing_env = {e["name"]: e.get("value") for e in billing["env"]}
    assert billing_env["BILLING_MODE"] == "prometheus" and billing_env["BILLING_PROMETHEUS_JOB"] == job == "gateway"

    # Who may reach the gateway's ports: every ingress rule of every policy that selects its pods.
    ray = {"ray.io/is-ray-node": "yes"}
    billing_pods = one(objs, "Deployment", "billing")["spec"]["template"]["metadata"]["labels"]
    admitted: dict[str, set[int | None]] = {}  # source -> ports (None: every port)
    for policy in by_kind(objs, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], pod_labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            rule_ports: set[int | None] = {p["port"] for p in rule.get("ports", [])} or {None}
            for peer in rule.get("from", [{}]):
                if not peer:
                    source = "anywhere"
                elif "namespaceSelector" in peer and "podSelector" not in peer:
                    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
                    source = "monitoring"
                elif selects(peer["podSelector"], billing_pods):
                    source = "billing"
                elif selects(peer["podSelector"], ray):
                    source = "ray"
                else:
                    raise AssertionError(f"{policy['metadata']['name']}: unexpected peer {peer}")
                admitted.setdefault(source, set()).update(rule_ports)
    assert admitted["anywhere"] == PARTNER_PORTS  # partners: the front doors only
    assert OPS_PORT in admitted["monitoring"] and OPS_PORT in admitted["billing"]
    assert admitted["ray"] == {None}  # the Ray cluster talks to its driver on ports it picks
    assert set(admitted) == {"anywhere", "monitoring", "billing", "ray"}


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration.removesuffix("s"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_stop_fits_the_termination_grace_period(overlay: str) -> None:
    """SIGKILL must not cut a graceful stop short: preStop, the drain (SERVING_SHUTDOWN_GRACE_S) and the wait for
    Prometheus' final scrape (SERVING_FINAL_SCRAPE_WAIT_S, at least one scrape interval) fit, with margin."""
    objs = render(overlay)
    pod = one(objs, "StatefulSet", "gateway")["spec"]["template"]["spec"]
    config = gateway_config(objs)
    grace, final_wait = float(config["SERVING_SHUTDOWN_GRACE_S"]), float(config["SERVING_FINAL_SCRAPE_WAIT_S"])
    [endpoint] = one(objs, "ServiceMonitor", "gateway")["spec"]["endpoints"]
    assert final_wait >= _seconds(endpoint["interval"]) + _seconds(endpoint["scrapeTimeout"])
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + final_wait + 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_journals_survive_a_reschedule(overlay: str) -> None:
    """Each gateway replica has a stable name (its SERVING_GATEWAY_ID) and its own persistent journal volume, kept
    when the StatefulSet scales down, so records not yet in PostgreSQL are replayed when the pod comes back."""
    gateway = one(render(overlay), "StatefulSet", "gateway")
    spec = gateway["spec"]
    [claim] = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    data_dir = gateway_config(render(overlay))["SERVING_DATA_DIR"]
    assert {"name": claim["metadata"]["name"], "mountPath": data_dir} in container["volumeMounts"]
    assert claim["metadata"]["name"] not in {v["name"] for v in pod["volumes"]}  # not an emptyDir any more
    [gateway_id] = [e for e in container["env"] if e["name"] == "SERVING_GATEWAY_ID"]
    assert gateway_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # gateway-0, gateway-1, ...
    assert (
        spec["serviceName"] == "gateway-ops" and spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_billing_is_probed_over_http_and_closes_each_month(overlay: str) -> None:
    objs = render(overlay)
    billing = one(objs, "Deployment", "billing")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe"):
        assert billing[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    cron = one(objs, "CronJob", "billing-close-month")
    assert cron["spec"]["schedule"] == "30 1 1 * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]["template"]
    [close] = job["spec"]["containers"]
    assert close["command"] == ["billing", "close", "previous-month"] and close["image"] == billing["image"]
    assert {e["name"] for e in close["env"]} >= {e["name"] for e in billing["env"]} - {
        "BILLING_ADMIN_TOKEN",
        "BILLING_HOST",
        "BILLING_PORT",
    }
    # The billing Service must not send API traffic to the CronJob's pods.
    selector = one(objs, "Service", "billing")["spec"]["selector"]
    assert not selector.items() <= job["metadata"]["labels"].items()


def _image_name_make_builds() -> str:
    """The repository name image/build.sh tags (``serving:<git revision>`` and ``serving:latest``)."""
    [line] = [line for line in (K8S.parent / "image" / "build.sh").read_text().splitlines() if "IMAGE_NAME:-" in line]
    return line.split("IMAGE_NAME:-", 1)[1].split("}", 1)[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_platform_container_runs_the_image_make_builds(overlay: str) -> None:
    objs = render(overlay)
    pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    pods += [o["spec"]["jobTemplate"]["spec"]["template"]["spec"] for o in by_kind(objs, "CronJob")]
    ray = one(objs, "RayService", "serving-models")["spec"]["rayClusterConfig"]
    pods += [ray["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in ray["workerGroupSpecs"]]
    ours = {c["image"] for pod in pods for c in pod["containers"] if not c["image"].startswith(("redis:", "postgres:"))}
    [image] = ours  # one image for every role
    repository = image.rsplit(":", 1)[0]
    assert repository.rsplit("/", 1)[1] == _image_name_make_builds(), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_head_state_survives_a_restart_and_upgrades_start_a_new_cluster(overlay: str) -> None:
    spec = one(render(overlay), "RayService", "serving-models")["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"} and spec["rayClusterDeletionDelaySeconds"] >= 60
    fault_tolerance = spec["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert fault_tolerance["redisAddress"] and fault_tolerance["externalStorageNamespace"] == "serving-models"
    if overlay == "prod":
        assert fault_tolerance["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "serving-dsn"
