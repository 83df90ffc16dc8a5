"""The report: baselines averaged over their interleaved runs, the ratio table, noise notes, the machine,
printed as Markdown tables and optionally written as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib.common import Config, Measurement, Ratio, fmt, mean_of
from benchlib.cpu import CPU_PREFIX, cpu_json, cpu_means, cpu_notes, cpu_ratios, cpu_table
from benchlib.overhead import overhead_means, overhead_notes, overhead_ratios
from benchlib.scaleout import workers_means, workers_notes, workers_ratios
from benchlib.sweep import SWEEP_PREFIX, sweep_ratios, sweep_table

# (label, numerator, denominator, target ≥): the whole-stack rows.
STACK_RATIOS: list[tuple[str, str, str, float | None]] = [
    ("A ÷ raw (1 thread)", "A", "raw-1t", 0.8),
    ("A ÷ raw (2 threads)", "A", "raw-2t", 0.8),
    ("A ÷ raw (1 thread, batch 64)", "A", "raw-1t-b64", None),
    ("B ÷ bare grpc.aio", "B", "echo", 0.5),
    ("C(i) plain Serve no-op ÷ bare grpc.aio", "C-i", "echo", None),
    ("C(ii) plain Serve MiniLM ÷ raw (1 thread)", "C-ii", "raw-1t", None),
    ("C(ii) plain Serve MiniLM ÷ raw (2 threads)", "C-ii", "raw-2t", None),
    ("C(i) ÷ B (plain Serve vs stack, no-op)", "C-i", "B", None),
    ("C(ii) ÷ A (plain Serve vs stack, MiniLM)", "C-ii", "A", None),
    ("C-http(i) plain Serve over HTTP, no-op ÷ bare grpc.aio", "C-http-i", "echo", None),
    ("C-http(ii) plain Serve over HTTP, MiniLM ÷ raw (1 thread)", "C-http-ii", "raw-1t", None),
    ("C-http(i) ÷ B (plain Serve over HTTP vs stack, no-op)", "C-http-i", "B", None),
    ("C-http(ii) ÷ A (plain Serve over HTTP vs stack, MiniLM)", "C-http-ii", "A", None),
    ("A ÷ C-http(ii) (stack vs plain Serve over HTTP, MiniLM)", "A", "C-http-ii", None),
    ("A ÷ A0 (what gateway micro-batching buys, MiniLM)", "A", "A0", None),
    ("B ÷ B0 (what gateway micro-batching buys, no-op)", "B", "B0", None),
    ("A0 ÷ raw (1 thread)", "A0", "raw-1t", None),
    ("B0 ÷ bare grpc.aio", "B0", "echo", None),
]


def baselines(results: dict[str, Measurement]) -> list[Measurement]:
    """Rows measured twice, as their means; added to ``results`` under their own keys."""
    means = []
    if "echo#1" in results:
        means.append(mean_of(results, ["echo#1", "echo#2"], "echo", "bare grpc.aio baseline (mean of 2 runs)"))
    if "raw-1t#1" in results:
        means.append(mean_of(results, ["raw-1t#1", "raw-1t#2"], "raw-1t", "raw 1-thread baseline (mean of 2 runs)"))
    means += overhead_means(results)
    means += cpu_means(results)
    means += workers_means(results)
    results.update({m.key: m for m in means})
    return means


def ratios(results: dict[str, Measurement], levels: list[int]) -> list[Ratio]:
    stack = [
        Ratio(label, num, den, results[num].rate / results[den].rate, target)
        for label, num, den, target in STACK_RATIOS
        if num in results and den in results
    ]
    stack += overhead_ratios(results) + sweep_ratios(results, levels) + cpu_ratios(results)
    return stack + workers_ratios(results)


def noise_notes(results: dict[str, Measurement]) -> list[str]:
    """What in this run makes its ratios less trustworthy (the machine is shared and has 2 cores)."""
    notes = []
    for a, b in (("echo#1", "echo#2"), ("raw-1t#1", "raw-1t#2")):
        if a in results and b in results:
            drift = abs(results[a].rate - results[b].rate) / max(results[a].rate, results[b].rate)
            if drift > 0.15:
                notes.append(f"{a} and {b} differ by {drift:.0%}: the CPU was not steady during this run")
    if "raw-2t" in results and results["raw-2t"].rate < results["raw-1t"].rate:
        notes.append(
            "the 2-thread raw baseline ran slower than the 1-thread one: the second core was busy (other work),"
            " so ratios against raw-2t overstate the stack"
        )
    return notes + overhead_notes(results) + workers_notes(results)


def measurement_table(rows: list[Measurement]) -> str:
    lines = [
        "| key | measurement | rate | unit | p50 ms | p99 ms | mean replica batch |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.key, r.label, f"{r.rate:.1f}", r.unit, fmt(r.p50_ms), fmt(r.p99_ms), fmt(r.mean_batch)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[Ratio]) -> str:
    lines = ["| ratio | value | target | verdict |", "|---|---:|---:|---|"]
    for r in rows:
        unit = f" {r.unit}" if r.unit else ""
        value = f"{r.value:.0f}{unit}" if r.unit == "µs" else f"{r.value:+.2f}{unit}" if r.unit else f"{r.value:.2f}"
        target = "-" if r.target is None else f"{r.op} {r.target:g}{unit}"
        verdict = {None: "-", True: "meets", False: "BELOW target" if r.op == "≥" else "ABOVE target"}[r.meets]
        lines.append(f"| {r.label} | {value} | {target} | {verdict} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu_model": model, "loadavg_1m": os.getloadavg()[0]}


def report(
    measured: list[Measurement],
    cfg: Config,
    setup: list[str],
    before: dict[str, Any],
    json_path: Path | None,
    levels: list[int],
    idle_cores: dict[str, float] | None = None,
) -> None:
    """``setup`` holds the lines describing the configuration (batching first); ``levels`` the sweep's;
    ``idle_cores`` the bench process's CPU rate with no load, per CPU-row variant."""
    idle = idle_cores or {}
    results = {m.key: m for m in measured}
    means = baselines(results)
    table = ratios(results, levels)
    after = machine()
    print()
    print(
        f"machine: {before['cpus']} CPUs, {before['cpu_model']}; load average (1 min) "
        f"{before['loadavg_1m']:.2f} before, {after['loadavg_1m']:.2f} after"
    )
    print(
        f"concurrency {cfg.concurrency}, warm-up {cfg.warmup_s:g} s + {cfg.duration_s:g} s measured per row; "
        f"raw baseline batch {cfg.raw_batch}; device {cfg.device}, dtype {cfg.dtype}"
    )
    for line in setup:
        print(line)
    print()
    if any(m.key.startswith(CPU_PREFIX) for m in measured):
        print(
            f"CPU rows: {cfg.cpu_warmup} requests of warm-up, then {cfg.cpu_requests} measured, "
            f"concurrency {cfg.concurrency} (and 1 where marked)"
        )
    print()
    if main_rows := [m for m in measured if not m.key.startswith((SWEEP_PREFIX, CPU_PREFIX))]:
        print(measurement_table(main_rows))
        print()
    if any(m.key.startswith(SWEEP_PREFIX) for m in measured):
        print(sweep_table(results, levels))
        print()
    if any(m.key.startswith(CPU_PREFIX) for m in measured):
        print(cpu_table(results, idle))
        print()
    for base in means:
        latency = f", p50 {base.p50_ms:.1f} ms (mean of the runs' p50)" if base.key.startswith(("G", "W")) else ""
        cpu = "" if base.cpu_us is None else f", {base.cpu_us:.0f} µs CPU per request"
        print(f"{base.label}: {base.rate:.1f} {base.unit}{latency}{cpu}")
    print()
    print(ratio_table(table))
    notes = noise_notes(results) + cpu_notes(results, idle)
    for note_line in notes:
        print(f"note: {note_line}")
    if json_path is not None:
        payload = {
            "machine": {"before": before, "after": after},
            "config": {**asdict(cfg), "batching": setup[0] if setup else "", "setup": setup},
            "measurements": [asdict(m) for m in measured],
            "baselines": [asdict(m) for m in means],
            "ratios": [asdict(r) | {"meets": r.meets} for r in table],
            "notes": notes,
            "cpu": cpu_json(results, idle),
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {json_path}")
