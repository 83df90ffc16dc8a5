"""Rows S: a concurrency sweep through the whole stack (1 → 256 closed-loop callers, one text per request),
on MiniLM and on the no-op model, against a gateway whose per-partner queue holds the largest level.

Two readings per model: throughput must not fall as concurrency rises (each level ÷ the best lower level,
≥ 0.9 allowing for this machine's run-to-run noise), and p99 at 256 ÷ p99 at 1. Past saturation a closed
loop's latency grows with concurrency by Little's law (mean latency ≈ callers ÷ throughput), so the sweep
also prints p99 at 256 ÷ that floor (how much worse than a perfectly fair FIFO the tail is) and the p99
ratio at the last level below saturation (the first level within 10 % of the peak throughput).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from benchlib.common import EMBED_MODEL, NOOP_MODEL, Config, Measurement, Ratio, fmt

SWEEP_PREFIX = "S-"
DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NO_FALL = 0.9  # throughput at a level ÷ the best lower level: a drop below this is a fall, not noise
SATURATED = 0.9  # a level within this share of the peak throughput counts as saturated
UNIT = {NOOP_MODEL: "req/s", EMBED_MODEL: "texts/s"}
NAME = {NOOP_MODEL: "no-op", EMBED_MODEL: "MiniLM"}

Run = Callable[[str, str, str, str, Config], Awaitable[Measurement]]


def sweep_key(model: str, concurrency: int) -> str:
    return f"{SWEEP_PREFIX}{NAME[model]}-c{concurrency}"


def sweep_steps(
    run: Run, models: list[str], levels: list[int], cfg: Config
) -> list[Callable[[], Awaitable[Measurement]]]:
    """``run(key, label, unit, model, cfg)`` per (model, level), levels rising."""
    steps: list[Callable[[], Awaitable[Measurement]]] = []
    for model in models:
        for level in levels:
            key = sweep_key(model, level)
            label = f"S: {NAME[model]} through the whole stack, {level} concurrent callers"
            level_cfg = dataclasses.replace(cfg, concurrency=level)

            def step(
                key: str = key, label: str = label, model: str = model, c: Config = level_cfg
            ) -> Awaitable[Measurement]:
                return run(key, label, UNIT[model], model, c)

            steps.append(step)
    return steps


def sweep_rows(results: dict[str, Measurement], model: str, levels: list[int]) -> list[tuple[int, Measurement]]:
    return [(c, results[sweep_key(model, c)]) for c in levels if sweep_key(model, c) in results]


def saturation_level(rows: list[tuple[int, Measurement]]) -> int:
    peak = max(m.rate for _, m in rows)
    return next(c for c, m in rows if m.rate >= SATURATED * peak)


def sweep_ratios(results: dict[str, Measurement], levels: list[int]) -> list[Ratio]:
    ratios: list[Ratio] = []
    for model in (EMBED_MODEL, NOOP_MODEL):
        rows = sweep_rows(results, model, levels)
        if len(rows) < 2:
            continue
        name = NAME[model]
        worst = min((m.rate / max(p.rate for _, p in rows[:i]), c) for i, (c, m) in enumerate(rows) if i > 0)
        ratios.append(
            Ratio(
                f"S {name}: lowest throughput ÷ best at lower concurrency (at c={worst[1]})", "", "", worst[0], NO_FALL
            )
        )
        (c_lo, lo), (c_hi, hi) = rows[0], rows[-1]
        ratios.append(Ratio(f"S {name}: p99 at c={c_hi} ÷ p99 at c={c_lo}", "", "", hi.p99_ms / lo.p99_ms, None))
        floor_ms = 1000 * c_hi / hi.rate if hi.rate else float("nan")
        ratios.append(
            Ratio(
                f"S {name}: p99 at c={c_hi} ÷ Little's-law mean latency ({floor_ms:.0f} ms)",
                "",
                "",
                hi.p99_ms / floor_ms,
                None,
            )
        )
        sat = saturation_level(rows)
        below = [(c, m) for c, m in rows if c < sat]
        if below:
            c_b, m_b = below[-1]
            ratios.append(
                Ratio(
                    f"S {name}: p99 at c={c_b} (last below saturation at c={sat}) ÷ p99 at c={c_lo}",
                    "",
                    "",
                    m_b.p99_ms / lo.p99_ms,
                    None,
                )
            )
    return ratios


def sweep_table(results: dict[str, Measurement], levels: list[int]) -> str:
    lines = [
        "| model | concurrency | rate | unit | ÷ c=1 | p50 ms | p99 ms | mean replica batch |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for model in (EMBED_MODEL, NOOP_MODEL):
        rows = sweep_rows(results, model, levels)
        for c, m in rows:
            scale = m.rate / rows[0][1].rate if rows[0][1].rate else float("nan")
            cells = [
                NAME[model],
                str(c),
                f"{m.rate:.1f}",
                m.unit,
                f"{scale:.2f}",
                fmt(m.p50_ms),
                fmt(m.p99_ms),
                fmt(m.mean_batch),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
