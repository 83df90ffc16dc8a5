"""What every part of the benchmark shares: paths, model names, the request texts, the result types and the
closed-loop load driver (used by the gRPC client worker and by the driver-side plain-Serve runs)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

LOADTESTS = Path(__file__).resolve().parents[1]
REPO = LOADTESTS.parent
CACHE_DIR = REPO / ".cache" / "models"
ENTRY_SCRIPT = LOADTESTS / "bench.py"
EMBED_MODEL = "minilm-l6"
NOOP_MODEL = "noop"
APP_PREFIX = "bench"
RAY_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Short, realistic, varied requests (10-20 words). 40 of them, so 32 concurrent clients keep changing texts.
SENTENCES: tuple[str, ...] = (
    "The delivery arrived two days late and the box was badly damaged on one side.",
    "Can you recommend a quiet hotel near the train station with free breakfast included?",
    "Our quarterly revenue grew by eight percent, driven mostly by subscriptions in Europe.",
    "I forgot my password again and the reset email never shows up in my inbox.",
    "The new firmware update drains the battery much faster than the previous version did.",
    "Please cancel my order because I found the same jacket cheaper at a local store.",
    "Heavy rain is expected across the northern region for the rest of the week.",
    "The onboarding tutorial was clear, but the export feature is hard to find.",
    "Customers in Brazil report that the checkout page fails when they pay with cards.",
    "She trained for six months before running her first marathon in under four hours.",
    "Is it possible to change the shipping address after the order has been confirmed?",
    "The restaurant serves excellent pasta, although the service was slow on Friday night.",
    "We need to migrate the billing database to the new cluster before the end of March.",
    "My flight was overbooked and the airline offered a voucher instead of a refund.",
    "The report shows that most support tickets concern login problems and failed payments.",
    "After the latest update, the app crashes whenever I try to upload a photo.",
    "A gentle introduction to linear algebra for engineers who want to understand neural networks.",
    "The museum opens a new exhibition about ancient trade routes across the Mediterranean next month.",
    "How do I configure two-factor authentication for every account in my organization?",
    "The hotel room was spotless, the staff were friendly, and the view was stunning.",
    "Our team will present the roadmap for the mobile app at the Thursday meeting.",
    "The invoice lists a charge for premium support that we never agreed to pay.",
    "Scientists found that the coral reef recovered faster than expected after the storm.",
    "I would like to upgrade my plan, but the pricing page does not load.",
    "The laptop keyboard feels great, yet the trackpad sometimes ignores light taps.",
    "Traffic on the main bridge will be closed overnight for maintenance work this weekend.",
    "Please send me a summary of the contract terms before we sign on Monday.",
    "The recipe calls for fresh basil, ripe tomatoes, garlic, and a splash of olive oil.",
    "Why does the dashboard show different numbers than the exported spreadsheet for last month?",
    "The city council approved a plan to add protected bike lanes on five major streets.",
    "My package tracking has not updated in a week and nobody answers the phone.",
    "The conference keynote focused on privacy, open standards, and responsible use of data.",
    "We are hiring a backend engineer with experience in distributed systems and Python.",
    "The printer keeps jamming on double-sided jobs even after we replaced the rollers.",
    "Local farmers expect a smaller harvest this year because of the long dry summer.",
    "Could you explain why my electricity bill doubled although our usage stayed the same?",
    "The documentation is thorough, but a few code samples use deprecated function names.",
    "Two new species of frogs were discovered in the rainforest during the spring survey.",
    "I love how quickly the support team resolved my issue with the broken charger.",
    "The training course covers negotiation, giving feedback, and running effective meetings.",
)


@dataclass(frozen=True)
class Config:
    concurrency: int
    warmup_s: float
    duration_s: float
    raw_batch: int
    device: str = "cpu"  # "auto": CUDA when present (the registry's default), else CPU
    dtype: str = "float32"  # float16 / bfloat16 take effect on CUDA only (serving.models.runner.resolve_dtype)
    cpu_requests: int = 3000  # rows CPU: requests measured per row (after cpu_warmup requests of warm-up)
    cpu_warmup: int = 500


@dataclass
class Measurement:
    key: str
    label: str
    unit: str
    rate: float
    p50_ms: float
    p99_ms: float
    completed: int
    seconds: float
    mean_batch: float | None = None
    cpu_us: float | None = None  # rows CPU: the gateway (bench) process's CPU time per request, µs
    cpu_cores: float | None = None  # rows CPU: that process's CPU seconds per wall second while measured


@dataclass
class Ratio:
    """A row of the ratio table: ``value`` compared with ``target`` by ``op`` (``≥`` or ``≤``)."""

    label: str
    numerator: str
    denominator: str
    value: float
    target: float | None
    op: str = "≥"
    unit: str = ""  # "" for a plain ratio, "ms" for a latency difference, "µs" for CPU time per request

    @property
    def meets(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.op == "≥" else self.value <= self.target


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class LoadStats:
    completed: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)


async def drive(
    call: Callable[[int], Awaitable[object]], concurrency: int, warmup_s: float, duration_s: float
) -> LoadStats:
    """``concurrency`` closed-loop callers; counts completions inside the window after the warm-up."""
    start = time.perf_counter() + warmup_s
    end = start + duration_s
    done: list[tuple[float, float]] = []

    async def caller(index: int) -> None:
        while (sent := time.perf_counter()) < end:
            await call(index)
            index += concurrency
            finished = time.perf_counter()
            done.append((finished, finished - sent))

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    window = [latency for finished, latency in done if start <= finished <= end]
    return LoadStats(completed=len(window), seconds=duration_s, latencies_s=window)


async def drive_count(call: Callable[[int], Awaitable[object]], concurrency: int, count: int) -> LoadStats:
    """``concurrency`` closed-loop callers sending exactly ``count`` calls between them; ``seconds`` is the wall
    time from the first send to the last completion."""
    sent_so_far = 0
    latencies: list[float] = []

    async def caller() -> None:
        nonlocal sent_so_far
        while sent_so_far < count:
            index = sent_so_far
            sent_so_far += 1
            sent = time.perf_counter()
            await call(index)
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(min(concurrency, count))))
    return LoadStats(completed=len(latencies), seconds=time.perf_counter() - started, latencies_s=latencies)


def measurement(key: str, label: str, unit: str, stats: LoadStats, items_per_call: int = 1) -> Measurement:
    lat_ms = [s * 1000 for s in stats.latencies_s]
    return Measurement(
        key=key,
        label=label,
        unit=unit,
        rate=stats.completed * items_per_call / stats.seconds,
        p50_ms=percentile(lat_ms, 0.50),
        p99_ms=percentile(lat_ms, 0.99),
        completed=stats.completed,
        seconds=stats.seconds,
    )


def mean_of(results: dict[str, Measurement], keys: list[str], key: str, label: str) -> Measurement:
    """A row measured several times (interleaved): the mean rate, and the mean of the runs' p50 and p99."""
    runs = [results[k] for k in keys]
    return Measurement(
        key,
        label,
        runs[0].unit,
        sum(r.rate for r in runs) / len(runs),
        sum(r.p50_ms for r in runs) / len(runs),
        sum(r.p99_ms for r in runs) / len(runs),
        sum(r.completed for r in runs),
        sum(r.seconds for r in runs),
    )
