"""The metrics catalogue: the doc is generated from the one module, the real /metrics output passes
`promtool check metrics`, and the operational metrics (batching, execution, shed, ledger, replicas) are fed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from billing.metrics import BillingMetrics
from serving.domain import ClassifyRequest, EmbedRequest
from serving.errors import ModelNotFound, Overloaded
from serving.gateway.app import Gateway
from serving.gateway.core import CallContext
from serving.models.registry import ModelAdmission, ModelSpec
from serving.observability.catalogue import render
from serving.observability.metrics import GpuCollector
from serving.partners.auth import Authenticator
from serving.partners.store import PartnerStore
from serving.quota.admission import Admission
from serving.quota.memory import MemoryQuota
from serving.settings import Admission as AdmissionSettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def test_catalogue_doc_is_current() -> None:
    stale = "docs/metrics.md is stale: run .venv/bin/python scripts/metrics_doc.py"
    assert DOC.read_text() == render(BillingMetrics()), stale


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


async def scrape_until(ops_base: str, ready: str, deadline_s: float = 30.0) -> str:
    """Scrapes /metrics until a sample named ``ready`` has a nonzero value (polling with a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    async with httpx.AsyncClient(base_url=ops_base) as http:
        while True:
            text = (await http.get("/metrics")).text
            if any(value for _, value in samples(text).get(ready, [])):
                return text
            assert loop.time() < deadline, f"{ready} never appeared in /metrics"
            await asyncio.sleep(0)  # yields to the gateway on this loop; the deadline bounds the loop


async def test_real_metrics_are_fed_and_pass_promtool(
    gateway: Gateway, specs: list[ModelSpec], ops_base: str, api_key: str
) -> None:
    ctx = CallContext(api_key)
    await asyncio.gather(
        *(gateway.core.embed(ctx, EmbedRequest("minilm-l6", [f"text {i}"])) for i in range(4)),
        gateway.core.classify(ctx, ClassifyRequest("zero-shot", ["The striker scored."], ["sports", "finance"])),
    )
    with pytest.raises(ModelNotFound):  # a made-up model name must not become a series of its own
        await gateway.core.embed(ctx, EmbedRequest("no-such-model-4711", ["x"]))
    text = await scrape_until(ops_base, "serving_ledger_write_lag_seconds_count")
    assert "no-such-model-4711" not in text
    assert any(labels["model"] == "unknown" for labels, _ in samples(text)["serving_requests_total"])
    text = await scrape_until(ops_base, "serving_model_replicas")
    found = samples(text)
    batch_items = {labels["model"]: v for labels, v in found["serving_batch_size_items_sum"]}
    assert batch_items["minilm-l6"] >= 4 and batch_items["zero-shot"] >= 1
    assert {labels["model"] for labels, v in found["serving_model_execution_seconds_count"] if v} >= {
        "minilm-l6",
        "zero-shot",
    }
    assert all(labels_v[1] > 0 for labels_v in found["serving_batch_fill_ratio_count"])
    running = {labels["model"]: v for labels, v in found["serving_model_replicas"] if labels["state"] == "running"}
    assert set(running) == {spec.id for spec in specs} and all(n >= 1 for n in running.values())
    assert "serving_ledger_backlog_records" in found

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test-services.sh installs it (Debian package prometheus)"
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await process.communicate(text.encode())
    assert process.returncode == 0 and not output.strip(), output.decode()  # promtool prints every lint problem


async def test_the_fair_queue_reports_shed_requests_by_reason(
    specs: list[ModelSpec], store: PartnerStore, api_key: str
) -> None:
    shed: list[tuple[str, str]] = []
    tight = [replace(spec, admission=ModelAdmission(max_concurrency=1)) for spec in specs]
    caller = await Authenticator(store, 5.0).authenticate(api_key)

    full = Admission(
        MemoryQuota(), tight, AdmissionSettings(max_queue_per_partner=0), on_shed=lambda *a: shed.append(a)
    )
    await full.enter("minilm-l6", caller)  # holds the one slot
    with pytest.raises(Overloaded):
        await full.enter("minilm-l6", caller)
    full.leave("minilm-l6")

    slow = Admission(
        MemoryQuota(),
        tight,
        AdmissionSettings(max_queue_per_partner=4, max_wait_s=0.01),
        on_shed=lambda *a: shed.append(a),
    )
    await slow.enter("zero-shot", caller)
    with pytest.raises(Overloaded):
        await slow.enter("zero-shot", caller)  # nobody releases: the wait bound sheds it
    slow.leave("zero-shot")

    assert shed == [("minilm-l6", "queue_full"), ("zero-shot", "queue_timeout")]


def test_gpu_collector_reports_memory_and_utilization(monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector the gateway registers only where CUDA exists, run here against a stand-in torch.cuda."""
    import torch

    def utilization(index: int) -> int:
        if index == 1:
            raise ModuleNotFoundError("pynvml")  # no NVML: memory is still reported
        return 42

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (1_000, 4_000))
    monkeypatch.setattr(torch.cuda, "utilization", utilization)
    families = {f.name: {s.labels["device"]: s.value for s in f.samples} for f in GpuCollector().collect()}
    assert families == {
        "serving_gpu_utilization_ratio": {"0": 0.42},
        "serving_gpu_memory_used_bytes": {"0": 3_000, "1": 3_000},
        "serving_gpu_memory_total_bytes": {"0": 4_000, "1": 4_000},
    }
