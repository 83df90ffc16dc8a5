"""Where the gateway's CPU goes: the bench's ON gateway under load from a client subprocess, profiled.

    HF_HUB_OFFLINE=1 .venv/bin/python loadtests/profile_gateway.py --door grpc --seconds 10 --quota redis

It starts what ``bench.py`` starts for its CPU rows (a local Ray with the no-op and MiniLM deployments, the
real ``Gateway`` with everything on: key lookup, MemoryQuota or RedisQuota on a metered plan, fair queue,
ledger, metrics, the access log into a file) in this process, warms it up with ``--warmup`` requests at
``--concurrency`` from a ``phased`` client subprocess (``benchlib.workers``) over the chosen front door (gRPC
Embed, POST /v1/embed or POST /v1/embeddings), then loads it for ``--seconds`` while py-spy samples this
process (``py-spy record --pid <this pid>``). It prints the samples per thread and the top functions by own
and by cumulative samples, aggregated by function (``--function``), and by package. ``--out`` keeps the raw
or speedscope profile.

By default py-spy samples only the thread holding the GIL (``--gil``): the gateway is bound by its one
interpreter, so that is where its Python CPU goes. Native threads (grpc's C core, Ray's C++ core worker) and
C code run without the GIL are not in that view; ``--all-threads`` samples every thread py-spy judges
running instead (with ``--native`` for C/C++ frames), but in this VM py-spy's idle detection leaks: blocking
waits (``select``, ``Condition.wait``, ``waitpid``) then show up as samples.

Where py-spy cannot attach (no ptrace), ``--profiler auto`` falls back to cProfile on the event-loop thread
(Ray's and the ledger's threads are then not seen).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchlib.common import EMBED_MODEL, NOOP_MODEL
from benchlib.workers import DOORS

if TYPE_CHECKING:
    from benchlib.stack import Stack as BenchStack

PY_SPY = Path(sys.executable).parent / "py-spy"
RAW_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>.*):(?P<line>\d+)\)$")
# Entry frames under every sample of their thread: left out of the cumulative table.
ENTRY_FRAMES = {
    "<module>",
    "main",
    "run",
    "Runner.run",
    "BaseEventLoop.run_until_complete",
    "BaseEventLoop.run_forever",
    "Thread._bootstrap",
    "Thread._bootstrap_inner",
    "Thread.run",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--door", choices=DOORS, default="grpc")
    parser.add_argument("--quota", choices=("memory", "redis"), default="redis")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds profiled under load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=500, help="requests of warm-up before profiling")
    parser.add_argument("--model", choices=(NOOP_MODEL, EMBED_MODEL), default=NOOP_MODEL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--format", choices=("raw", "speedscope"), default="raw", help="py-spy output format")
    parser.add_argument("--all-threads", action="store_true", help="every running thread, not only the GIL holder")
    parser.add_argument("--native", action="store_true", help="py-spy --native: C/C++ frames too (slower)")
    parser.add_argument("--nonblocking", action="store_true", help="py-spy --nonblocking: never pause the process")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the py-spy profile (or cProfile stats) here")
    return parser.parse_args(argv)


# --- reading a profile -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    thread: str
    frames: tuple[str, ...]  # root first, "function (file:line)", the line is the function's first line
    weight: int


def shorten(path: str) -> str:
    """A file path relative to the sys.path entry that holds it (site-packages/..., src/serving/...)."""
    for root in sorted((p for p in sys.path if p), key=len, reverse=True):
        if path.startswith(root.rstrip("/") + "/"):
            return path[len(root.rstrip("/")) + 1 :]
    return path


def frame_name(name: str, file: str, line: int | str) -> str:
    return f"{name} ({shorten(file)}:{line})"


def read_raw(path: Path) -> list[Stack]:
    """py-spy's raw (collapsed) format with ``--threads``: "thread (tid): name;frame;frame count" per line."""
    stacks = []
    for text in path.read_text().splitlines():
        if not text.strip():
            continue
        trace, _, count = text.rpartition(" ")
        parts = trace.split(";")
        has_thread = parts[0].startswith("thread (")
        thread = parts[0].split(": ", 1)[-1] if has_thread else "?"
        frames = []
        for part in parts[1:] if has_thread else parts:
            match = RAW_FRAME.match(part)
            frames.append(frame_name(match["name"], match["file"], match["line"]) if match else part)
        stacks.append(Stack(thread, tuple(frames), int(count)))
    return stacks


def read_speedscope(path: Path) -> list[Stack]:
    data = json.loads(path.read_text())
    names = [frame_name(f["name"], f.get("file") or "?", f.get("line") or 0) for f in data["shared"]["frames"]]
    stacks = []
    for profile in data["profiles"]:  # one per thread, named 'Thread <tid> "<name>"'
        name = profile["name"].split('"')[1] if profile["name"].count('"') == 2 else ""
        thread = name or profile["name"]
        interval = min(profile["weights"] or [1.0])  # seconds per sample
        for sample, weight in zip(profile["samples"], profile["weights"], strict=True):
            # --threads puts a "thread (<tid>): <name>" frame at the root: the thread is already known
            frames = tuple(names[i] for i in sample if not names[i].startswith("thread ("))
            stacks.append(Stack(thread, frames, round(weight / interval)))
    return stacks


def package(frame: str) -> str:
    """The top-level package or stdlib module of a frame: grpc, ray, serving, asyncio, ..."""
    match = RAW_FRAME.match(frame)
    file = match["file"] if match else frame
    first = file.split("/")[0] if not file.startswith("/") else file
    return first.removesuffix(".py") if first != "src" else file.split("/")[1]


def table(
    title: str,
    counts: Iterable[tuple[str, float]],
    total: float,
    top: int,
    unit: str = "samples",
    what: str = "function",
) -> str:
    lines = [title, f"{'%':>6} {unit:>9}  {what}"]
    for name, count in sorted(counts, key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / total:6.1f} {count:9.0f}  {name}")
    return "\n".join(lines)


def function_of(frame: str) -> str:
    match = RAW_FRAME.match(frame)
    return match["name"] if match else frame


def report_stacks(stacks: list[Stack], top: int, gil: bool) -> str:
    total = sum(s.weight for s in stacks) or 1
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for s in stacks:
        threads[s.thread] += s.weight
        if s.frames:
            own[s.frames[-1]] += s.weight
            packages[package(s.frames[-1])] += s.weight
        for frame in set(s.frames):  # once per sample, however deep the recursion
            cumulative[frame] += s.weight
    inner = [(f, n) for f, n in cumulative.items() if function_of(f) not in ENTRY_FRAMES]
    which = "the GIL holder only" if gil else "threads py-spy judged running"
    return "\n\n".join(
        [
            f"{total} samples ({which})",
            table("by thread", threads.items(), total, top, what="thread"),
            table(f"top {top} by own samples", own.items(), total, top),
            table(f"top {top} by cumulative samples (thread entry frames left out)", inner, total, top),
            table("by package (own samples)", packages.items(), total, 15, what="package"),
        ]
    )


def report_cprofile(profile: cProfile.Profile, top: int) -> str:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in stats.values()) or 1.0

    def name(key: tuple[str, int, str]) -> str:
        return frame_name(key[2], key[0], key[1])

    own = [(name(k), 1000 * v[2]) for k, v in stats.items()]
    cumulative = [(name(k), 1000 * v[3]) for k, v in stats.items()]
    return "\n\n".join(
        [
            f"cProfile, event-loop thread only: {total:.2f} s in profiled functions",
            table(f"top {top} by own time", own, 1000 * total, top, "ms"),
            table(f"top {top} by cumulative time (a share can pass 100 %)", cumulative, 1000 * total, top, "ms"),
        ]
    )


# --- profiling -----------------------------------------------------------------------------------------------


def py_spy_works() -> str | None:
    """None when py-spy can read this process's stacks; otherwise why not."""
    if not PY_SPY.exists():
        return f"{PY_SPY} not found"
    try:
        done = subprocess.run(
            [str(PY_SPY), "dump", "--pid", str(os.getpid())], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "py-spy dump timed out"
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip()[-500:]


class PySpy:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Starts ``py-spy record`` and returns once it samples."""
        a = self.args
        flags = ["--native"] * a.native + ["--nonblocking"] * a.nonblocking + ["--gil"] * (not a.all_threads)
        self.proc = await asyncio.create_subprocess_exec(
            *[str(PY_SPY), "record", "--pid", str(os.getpid()), "--rate", str(a.rate)],
            *["--duration", str(max(1, round(a.seconds))), "--format", a.format, "--function", "--threads"],
            *flags,
            *["-o", str(self.out)],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        first = (await self.proc.stdout.readline()).decode()
        if "Sampling" not in first:
            rest = (await self.proc.stdout.read()).decode()
            raise RuntimeError(f"py-spy did not start: {first}{rest}")

    async def finish(self) -> list[Stack]:
        assert self.proc is not None and self.proc.stdout is not None
        output = (await self.proc.stdout.read()).decode()
        if await self.proc.wait() != 0:
            raise RuntimeError(f"py-spy failed: {output}")
        return read_raw(self.out) if self.args.format == "raw" else read_speedscope(self.out)


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of this process, with its name, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    threads: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return threads


def report_threads(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], requests: int) -> str:
    """Every thread's CPU over the profiled window, grouped by thread name: what py-spy's GIL view cannot show
    (grpc's C core and Ray's C++ core-worker threads run without the GIL)."""
    by_name: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        by_name[name] = by_name.get(name, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    total = sum(by_name.values()) or 1.0
    lines = [f"CPU by thread (all threads, /proc; {total:.2f} s in all)", "   %    µs/req  thread"]
    for name, cpu in sorted(by_name.items(), key=lambda item: -item[1])[:15]:
        lines.append(f"{100 * cpu / total:5.1f} {1e6 * cpu / max(requests, 1):8.0f}  {name}")
    return "\n".join(lines)


async def profile(args: argparse.Namespace, stack: BenchStack, use_py_spy: bool) -> None:
    from benchlib.cpu import access_log_to
    from benchlib.overhead import start_overhead
    from benchlib.stack import open_store
    from benchlib.workers import phased_run

    variant = "redis" if args.quota == "redis" else "on"
    tmp = stack.tmp
    store = open_store(tmp / "serving.db")
    overhead = await start_overhead(stack, store, args.redis_url, only=(variant,))
    cprofile = cProfile.Profile()
    out = args.out or tmp / f"profile.{args.format}"
    spy = PySpy(args, out)
    try:
        print(overhead.note, flush=True)
        if variant not in overhead.targets:
            raise SystemExit("the Redis quota gateway did not start (see the note above); try --quota memory")
        target = overhead.targets[variant] if args.door == "grpc" else overhead.http_targets[variant]
        job = {
            "door": args.door,
            "target": target,
            "api_key": overhead.api_key,
            "model": args.model,
            "concurrency": args.concurrency,
            "warmup": args.warmup,
            "seconds": args.seconds + 1.0,  # the load outlasts the sampling
        }

        threads_before: dict[int, tuple[str, float]] = {}

        async def start_profiler() -> None:
            threads_before.update(thread_cpu())
            if use_py_spy:
                await spy.start()
            else:
                cprofile.enable()

        print(f"warm-up ({args.warmup} requests), then {args.seconds:g} s profiled over {args.door}...", flush=True)
        with access_log_to(tmp / "access.log"):
            phased = await phased_run(job, on_warm=start_profiler)
        threads_after = thread_cpu()
        cprofile.disable()
        stacks = await spy.finish() if use_py_spy else []
    finally:
        await overhead.stop()
        store.close()
    load = phased.load
    print(
        f"\n{args.door}, gateway ON ({args.quota} quota), {args.model}, concurrency {args.concurrency}: "
        f"{load.completed / load.seconds:.0f} req/s, gateway CPU {1e6 * phased.cpu_s / load.completed:.0f} µs per "
        f"request ({phased.cpu_s / phased.wall_s:.2f} cores busy; under the profiler)\n"
    )
    print(report_threads(threads_before, threads_after, load.completed) + "\n")
    if use_py_spy:
        print(report_stacks(stacks, args.top, gil=not args.all_threads))
        if args.out:
            print(f"\nwrote {args.out} (py-spy {args.format})")
    else:
        print(report_cprofile(cprofile, args.top))
        if args.out:
            cprofile.dump_stats(str(args.out))
            print(f"\nwrote {args.out} (pstats)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_py_spy = args.profiler == "py-spy"
    if args.profiler == "auto":
        why_not = py_spy_works()
        use_py_spy = why_not is None
        print("profiler: py-spy" if use_py_spy else f"profiler: cProfile (py-spy cannot attach: {why_not})")
    from benchlib.stack import Hardware, start_stack, stop_stack

    from serving import eventloop
    from serving.settings import load_settings

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="profile-gateway-") as tmp:
        print("starting Ray and deploying the models...", flush=True)
        try:
            stack = start_stack(Path(tmp), Hardware(), with_plain=False)
            eventloop.run(profile(args, stack, use_py_spy), load_settings().event_loop)  # the gateway's own loop
        finally:
            stop_stack()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
