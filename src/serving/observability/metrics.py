"""Every Prometheus metric the gateway exports, declared once on a registry the gateway owns.

Labels stay bounded (model, operation, status, reason, state: closed sets); partner ids appear only on the
usage counters that billing reads. ``docs/metrics.md`` is generated from this class
(``scripts/metrics_doc.py``), with the billing service's own metrics read from its ``BillingMetrics``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
_LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# The closed label sets (bounded cardinality).
SHED_REASONS = ("queue_full", "queue_timeout", "backpressure")
REPLICA_STATES = ("running", "starting", "updating", "recovering", "stopping")
# quota.limiter.exceeded; a prepaid balance too small (errors.InsufficientCredit), or held by requests in flight
QUOTA_REASONS = ("requests", "tokens", "tokens_request", "concurrency", "monthly_tokens", "balance", "balance_held")

# Read at scrape time by GpuCollector, only where CUDA exists: (name, type, help, labels).
GPU_METRICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("serving_gpu_utilization_ratio", "gauge", "GPU busy time over the last sample period (0-1).", ("device",)),
    ("serving_gpu_memory_used_bytes", "gauge", "GPU memory in use.", ("device",)),
    ("serving_gpu_memory_total_bytes", "gauge", "GPU memory in total.", ("device",)),
)


_REPLICA_TOTALS_KEPT = 1024  # (model, replica, total) entries: far more than live replicas ever report


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "serving_requests_total",
            "Requests finished, by model, operation and final status.",
            ["model", "operation", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "serving_request_duration_seconds",
            "Time from admission to the last byte of the response.",
            ["model", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "serving_requests_in_flight",
            "Requests admitted and not yet finished.",
            ["operation"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "serving_queue_wait_seconds",
            "Time admitted requests waited in the fair queue for a model slot.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.quota_rejections = Counter(
            "serving_quota_rejections_total",
            "Requests rejected by a quota limit, by the limit that rejected them.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.quota_fail_open = Counter(
            "serving_quota_fail_open_total",
            "Requests admitted unreserved because the quota store was unreachable (fail-open policy).",
            registry=self.registry,
        )
        self.partner_requests = Counter(
            "serving_partner_requests_total",
            "Requests per partner (billing input).",
            ["partner", "model", "operation", "status"],
            registry=self.registry,
        )
        self.partner_tokens = Counter(
            "serving_partner_tokens_total",
            "Tokens per partner and direction (billing input).",
            ["partner", "model", "direction"],
            registry=self.registry,
        )

        # Streaming generation, observed at the gateway (what the partner sees) and polled from the replicas.
        self.time_to_first_token = Histogram(
            "serving_generation_time_to_first_token_seconds",
            "Time from admission to the first generated text sent to the caller.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "serving_generation_inter_token_seconds",
            "Time between consecutive streamed chunks of one generation.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "serving_generation_output_tokens_total",
            "Output tokens generated and sent to callers (rate() gives tokens per second).",
            ["model"],
            registry=self.registry,
        )
        self.running_sequences = Gauge(
            "serving_generation_running_sequences",
            "Sequences decoding in the model replicas' running batches.",
            ["model"],
            registry=self.registry,
        )
        self.waiting_sequences = Gauge(
            "serving_generation_waiting_sequences",
            "Sequences accepted by the model replicas and waiting for a batch slot.",
            ["model"],
            registry=self.registry,
        )
        # The replicas' own step counts, read with the running/waiting gauges and added here as they grow.
        self.generation_steps = Counter(
            "serving_generation_steps_total",
            "Continuous-batching steps (forward passes) the generation replicas ran.",
            ["model"],
            registry=self.registry,
        )
        self.generation_step_rows = Counter(
            "serving_generation_step_rows_total",
            "Running rows summed over steps; ÷ serving_generation_step_capacity_total is the running-batch fill.",
            ["model"],
            registry=self.registry,
        )
        self.generation_step_capacity = Counter(
            "serving_generation_step_capacity_total",
            "The running-row cap summed over steps.",
            ["model"],
            registry=self.registry,
        )
        self.prefill_tokens = Counter(
            "serving_generation_prefill_tokens_total",
            "Prompt tokens computed by the generation replicas (÷ steps: prefill tokens per step).",
            ["model"],
            registry=self.registry,
        )
        self.prefix_cache_lookups = Counter(
            "serving_generation_prefix_cache_lookups_total",
            "Prompts looked up in the replicas' prefix caches, by result (hit: at least one cached block reused).",
            ["model", "result"],
            registry=self.registry,
        )
        self.prefix_cache_tokens = Counter(
            "serving_generation_prefix_cache_tokens_total",
            "Prompt tokens taken from the prefix cache instead of computed.",
            ["model"],
            registry=self.registry,
        )
        self.prefix_cache_bytes = Gauge(
            "serving_generation_prefix_cache_bytes",
            "Bytes of keys and values held in the prefix cache of the replica polled last.",
            ["model"],
            registry=self.registry,
        )
        self._replica_totals: dict[tuple[str, str, str], float] = {}  # (model, replica, total) → last seen

        # Batching and model execution, observed at the gateway around each call across the Ray boundary.
        self.batch_size = Histogram(
            "serving_batch_size_items",
            "Items in each gateway micro-batch sent to a model deployment (embed, classify).",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_fill = Histogram(
            "serving_batch_fill_ratio",
            "Items in each gateway micro-batch over the batch size cap (1 = a full batch).",
            ["model"],
            buckets=_FILL_BUCKETS,
            registry=self.registry,
        )
        self.model_execution = Histogram(
            "serving_model_execution_seconds",
            "Time of each micro-batch call to an embed/classify deployment as the gateway sees it: the Ray hop, "
            "replica batching and the model run.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shed = Counter(
            "serving_shed_requests_total",
            "Admitted requests turned away because the model was saturated (503), by reason: queue_full (the "
            "partner's fair-queue share is full), queue_timeout (waited too long for a slot), backpressure "
            "(the model replicas refused).",
            ["model", "reason"],
            registry=self.registry,
        )
        self.model_replicas = Gauge(
            "serving_model_replicas",
            "Replicas of each model deployment by state, as the Serve controller reports them (polled).",
            ["model", "state"],
            registry=self.registry,
        )

        # A graceful stop: when every request had finished and the counters became final (billing reads it).
        self.drained_at = Gauge(
            "serving_gateway_drained_timestamp_seconds",
            "Unix time at which a graceful stop had drained every request (counters final from then on); 0 while"
            " serving.",
            registry=self.registry,
        )
        # The usage ledger (one writer thread per gateway).
        self.ledger_backlog = Gauge(
            "serving_ledger_backlog_records",
            "Usage records journaled and not yet written to the ledger database.",
            registry=self.registry,
        )
        self.ledger_write_lag = Histogram(
            "serving_ledger_write_lag_seconds",
            "Time from a request's end to its usage record being stored in the ledger database.",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        # Admin changes, counted as each audit record commits (changes made with the CLI are in the audit log only).
        self.admin_changes = Counter(
            "serving_admin_changes_total",
            "Admin changes made through this gateway's admin API, each recorded in the audit log, by action"
            " (partner.create, key.issue, operator.role, ...: the closed set in docs/admin.md).",
            ["action"],
            registry=self.registry,
        )
        if _cuda_available():
            self.registry.register(GpuCollector())

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: the request path skips prometheus_client's per-call lock and
        label checks. No series is ever removed, so a remembered child stays the one the registry exports."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def init_models(self, models: list[str]) -> None:
        """Creates every model's reason series at zero, so that rate() and alerts see them before the first event."""
        for model in models:
            for reason in SHED_REASONS:
                self.shed.labels(model, reason)
            for reason in QUOTA_REASONS:
                self.quota_rejections.labels(model, reason)

    def bind_ledger_backlog(self, backlog: Callable[[], float]) -> None:
        """Reads the backlog at scrape time."""
        self.ledger_backlog.set_function(backlog)

    def observe_batch(self, model: str, items: int, max_batch_size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(items)
        self.batch_fill.labels(model).observe(min(1.0, items / max_batch_size))
        self.model_execution.labels(model).observe(seconds)

    def record_generation_load(self, model: str, stats: dict[str, Any]) -> None:
        """A generation replica's ``batch_stats()``: gauges set, its running totals added as they grew (a
        restarted replica starts again from zero, so a total that fell counts from zero). Totals are kept per
        replica, since each poll reaches one replica of the model."""
        self.running_sequences.labels(model).set(stats["running"])
        self.waiting_sequences.labels(model).set(stats["waiting"])
        cache = stats.get("prefix_cache", {})
        totals = {
            "steps": (self.generation_steps.labels(model), stats.get("steps", 0)),
            "rows": (self.generation_step_rows.labels(model), stats.get("row_steps", 0)),
            "capacity": (self.generation_step_capacity.labels(model), stats.get("capacity_steps", 0)),
            "prefill": (self.prefill_tokens.labels(model), stats.get("prefill_tokens", 0)),
            "hits": (self.prefix_cache_lookups.labels(model, "hit"), cache.get("hits", 0)),
            "misses": (self.prefix_cache_lookups.labels(model, "miss"), cache.get("misses", 0)),
            "cached": (self.prefix_cache_tokens.labels(model), cache.get("cached_tokens", 0)),
        }
        replica = str(stats.get("replica", ""))
        for key, (counter, total) in totals.items():
            last = self._replica_totals.get((model, replica, key), 0.0)
            counter.inc(total - last if total >= last else total)
            self._replica_totals.pop((model, replica, key), None)  # re-inserted last: the dict stays in poll order
            self._replica_totals[model, replica, key] = total
        while len(self._replica_totals) > _REPLICA_TOTALS_KEPT:  # replicas that are gone (restarts, scale-down)
            del self._replica_totals[next(iter(self._replica_totals))]
        self.prefix_cache_bytes.labels(model).set(cache.get("bytes", 0))

    def set_replicas(self, counts: dict[str, dict[str, int]]) -> None:
        """``counts``: model id → state → replicas; states outside ``REPLICA_STATES`` are not exported."""
        for model, states in counts.items():
            for state in REPLICA_STATES:
                self.model_replicas.labels(model, state).set(states.get(state, 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class GpuCollector(Collector):
    """GPU utilization and memory of this process's devices, read at scrape time (only when CUDA exists)."""

    def collect(self) -> Iterator[Metric]:
        import torch

        utilization, used, total = (
            GaugeMetricFamily(name, doc, labels=list(labels)) for name, _, doc, labels in GPU_METRICS
        )
        for index in range(torch.cuda.device_count()):
            device = str(index)
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            used.add_metric([device], total_bytes - free_bytes)
            total.add_metric([device], total_bytes)
            with contextlib.suppress(ModuleNotFoundError, RuntimeError):  # needs NVML; memory is still reported
                utilization.add_metric([device], torch.cuda.utilization(index) / 100)
        yield from (utilization, used, total)
