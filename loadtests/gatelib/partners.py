"""The gate's partners, created through the admin API on the ops listener of the gateway under test (never the
partner port): its custom plans first (``PUT /admin/v1/plans/{name}``), then one partner per config entry, named
after the run so that runs never collide, each with a fresh API key."""

from __future__ import annotations

import httpx

from gatelib.config import GateConfig
from gatelib.outcomes import PartnerRun


class SetupError(RuntimeError):
    pass


def _check(response: httpx.Response, what: str) -> dict[str, object]:
    if response.status_code >= 300:
        raise SetupError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    body = response.json()
    if not isinstance(body, dict):
        raise SetupError(f"{what}: unexpected body {body!r}")
    return body


def create_partners(ops_base: str, admin_token: str, config: GateConfig, run_id: str) -> list[PartnerRun]:
    headers = {"authorization": f"Bearer {admin_token}"}
    partners: list[PartnerRun] = []
    with httpx.Client(base_url=f"{ops_base}/admin/v1", headers=headers, timeout=30.0) as admin:
        for plan in config.plans:
            _check(admin.put(f"/plans/{plan.name}", json=plan.body()), f"plan {plan.name}")
        for spec in config.partners:
            name = f"{spec.name}-{run_id}"
            created = _check(admin.post("/partners", json={"name": name, "plan": spec.plan}), f"partner {name}")
            key = _check(admin.post(f"/partners/{created['id']}/keys"), f"key for {name}")
            partners.append(PartnerRun(name, str(created["id"]), str(key["api_key"]), spec.share, spec.expect_429))
    return partners
