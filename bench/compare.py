"""Side by side: the CPU time per page view of two or more variants of the collector, alternating
in one run, so the machine's load (shared with colleagues) falls on each alike.

A variant is a source tree (a checkout of another commit, e.g. `git archive main | tar -x -C
/tmp/before`) and/or extra settings (`GC_FREEZE=0`), written NAME=DIR[,SETTING=VALUE...]; DIR `.`
is this checkout. Each round runs the bare aiohttp app once, then each variant: `wrk` at full
speed (bench/pageviews.lua, -c64) for --seconds, the CPU time of every thread counted until
the read model has caught up, split into the event loop's thread and the others (the store's
writer, aiosqlite's reader). Prints every round and the medians.

    python bench/compare.py before=/tmp/before after=. [--rounds 5] [--seconds 8] [--loop asyncio]

With --gc each variant runs with bench/gcprobe on its PYTHONPATH, which times every garbage
collection: the line gains the collector's CPU per page view (in the figures above) and its
collections per generation.

With --latency RATE it measures instead each variant's latency at RATE page views a second
offered by bench/open_loop.py (p50, p99) and its read model's largest lag (from /health).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py: wrk, the processes, the CPU clock)


@dataclass(frozen=True)
class Variant:
    name: str
    root: Path
    settings: dict[str, str]


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    root, *pairs = rest.split(",")
    settings = dict(pair.split("=", 1) for pair in pairs)
    return Variant(name, (Path(root) if root not in ("", ".") else run.ROOT).resolve(), settings)


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the process's main thread (the event loop) and of all its other threads."""
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        seconds = (int(fields[11]) + int(fields[12])) / run.CLOCK_TICKS
        if int(task.name) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


@dataclass
class Figures:
    rps: float
    cpu_us: float
    loop_us: float
    other_us: float
    per_commit: float
    gc_us: float = math.nan
    collections: list[int] = field(default_factory=list)


def settings(variant: Variant, loop: str, work: Path, port: int) -> dict[str, str]:
    return {"DATA_DIR": tempfile.mkdtemp(dir=work), "SECRET_KEY": run.SECRET, "EVENT_LOOP": loop,
            "LOG_LEVEL": "WARNING", "HOST": "127.0.0.1", "PORT": str(port), **variant.settings}


GC_PROBE = run.BENCH / "gcprobe"


def gc_totals(pid: int, probe: Path) -> dict[str, Any]:
    """The garbage collector's totals so far in the process (bench/gcprobe/sitecustomize.py)."""
    probe.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    run.wait_until(probe.exists, 10, "the garbage collector's totals")
    totals: dict[str, Any] = json.loads(probe.read_text())
    return totals


def measure(variant: Variant, loop: str, seconds: float, connections: int, work: Path,
            probe_gc: bool = False) -> Figures:
    port = run.free_port()
    url = f"http://127.0.0.1:{port}"
    script = str(variant.root / "collector.py")
    env = settings(variant, loop, work, port)
    probe = Path(env["DATA_DIR"]) / "gc-probe.json"
    if probe_gc:
        env |= {"PYTHONPATH": str(GC_PROBE), "GC_PROBE": str(probe)}
    with run.process([sys.executable, script], env, url + "/health") as child:
        run.wrk(url, 2, connections)  # warm-up
        run.wait_until(lambda: run.drained(url), 600, "the read model catching up after the warm-up")
        before = run.get_json(url + "/health") or {}
        gc_before = gc_totals(child.pid, probe) if probe_gc else None
        main0, other0 = thread_cpu(child.pid)
        measured = run.wrk(url, seconds, connections)
        after = run.get_json(url + "/health") or {}
        run.wait_until(lambda: run.drained(url), 600, "the read model catching up")
        main1, other1 = thread_cpu(child.pid)
        gc_after = gc_totals(child.pid, probe) if probe_gc else None
    requests = measured.requests
    commits = after["group_commit"]["commits"] - before["group_commit"]["commits"]
    events = after["group_commit"]["events"] - before["group_commit"]["events"]
    if measured.errors or measured.non_2xx:
        print(f"  {variant.name}: {measured.errors} errors, {measured.non_2xx} answers not 2xx", file=sys.stderr)
    loop_us, other_us = (main1 - main0) / requests * 1e6, (other1 - other0) / requests * 1e6
    figures = Figures(measured.rate, loop_us + other_us, loop_us, other_us, events / commits if commits else 0.0)
    if gc_before and gc_after:
        figures.gc_us = (gc_after["seconds"] - gc_before["seconds"]) / requests * 1e6
        figures.collections = [later - earlier for later, earlier
                               in zip(gc_after["collections"], gc_before["collections"], strict=True)]
    return figures


def latency(variant: Variant, loop: str, rate: int, seconds: float, work: Path) -> dict[str, float]:
    """bench/run.py's fixed_rate, for a variant: p50 and p99 at `rate` offered, and the lag."""
    port = run.free_port()
    url = f"http://127.0.0.1:{port}"
    script = str(variant.root / "collector.py")
    with run.process([sys.executable, script], settings(variant, loop, work, port), url + "/health"):
        command = [sys.executable, str(run.BENCH / "open_loop.py"), "127.0.0.1", str(port), "--rate", str(rate)]
        subprocess.run([*command, "--seconds", "2"], capture_output=True, check=True)  # warm-up
        run.wait_until(lambda: run.drained(url), 600, "the read model catching up after the warm-up")
        load = subprocess.Popen([*command, "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)
        lags = []
        while load.poll() is None:
            health = run.get_json(url + "/health")
            if health is not None:
                lags.append(float(health["lag_seconds"]))
            time.sleep(0.25)
        result = json.loads(load.communicate()[0])
    return {"p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "lag_max_s": max(lags, default=float("nan")),
            "achieved_rps": result["achieved_rps"]}


def compare_latency(variants: list[Variant], loop: str, rate: int, seconds: float, rounds: int) -> None:
    results: dict[str, list[dict[str, float]]] = {variant.name: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="collector-compare-") as tmp:
        for round_number in range(1, rounds + 1):
            for variant in variants if round_number % 2 else list(reversed(variants)):
                figures = latency(variant, loop, rate, seconds, Path(tmp))
                results[variant.name].append(figures)
                print(f"round {round_number} {variant.name}: {figures}, load {os.getloadavg()[0]:.1f}", flush=True)
    print("\nmedians:")
    for name, runs in results.items():
        print(f"  {name}: " + ", ".join(f"{key} {statistics.median(r[key] for r in runs):g}" for key in runs[0]))


def bare(loop: str, seconds: float, connections: int) -> Figures:
    with run.bare_app(loop) as (url, pid):
        run.wrk(url, 2, connections)
        main0, other0 = thread_cpu(pid)
        measured = run.wrk(url, seconds, connections)
        main1, other1 = thread_cpu(pid)
    loop_us, other_us = (main1 - main0) / measured.requests * 1e6, (other1 - other0) / measured.requests * 1e6
    return Figures(measured.rate, loop_us + other_us, loop_us, other_us, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=parse_variant, help="NAME=DIR[,SETTING=VALUE...]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--no-bare", action="store_true", help="skip the bare app (no ratios)")
    parser.add_argument("--gc", action="store_true", help="time the garbage collector too (bench/gcprobe)")
    parser.add_argument("--latency", type=int, metavar="RATE", help="open-loop latency at RATE page views/s instead")
    args = parser.parse_args()
    if args.latency:
        compare_latency(args.variants, args.loop, args.latency, args.seconds, args.rounds)
        return 0
    results: dict[str, list[Figures]] = {variant.name: [] for variant in args.variants}
    ceilings: list[Figures] = []
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="collector-compare-") as tmp:
        for round_number in range(1, args.rounds + 1):
            if not args.no_bare:
                ceiling = bare(args.loop, args.seconds, args.connections)
                ceilings.append(ceiling)
                print(f"round {round_number} bare: {ceiling.rps:7.0f}/s {ceiling.cpu_us:6.0f} µs", flush=True)
            order = args.variants if round_number % 2 else list(reversed(args.variants))
            for variant in order:
                figures = measure(variant, args.loop, args.seconds, args.connections, Path(tmp), args.gc)
                results[variant.name].append(figures)
                collected = (f", garbage collector {figures.gc_us:.1f} µs ({'/'.join(map(str, figures.collections))}"
                             " collections, youngest first)" if args.gc else "")
                print(f"round {round_number} {variant.name}: {figures.rps:7.0f}/s {figures.cpu_us:6.0f} µs "
                      f"(loop {figures.loop_us:.0f}, other threads {figures.other_us:.0f}{collected}), "
                      f"{figures.per_commit:.1f} per commit, load {os.getloadavg()[0]:.1f}", flush=True)
    print("\nmedians:")
    bare_cpu = statistics.median(c.cpu_us for c in ceilings) if ceilings else None
    bare_rps = statistics.median(c.rps for c in ceilings) if ceilings else None
    if ceilings:
        print(f"  bare: {bare_rps:.0f}/s, {bare_cpu:.0f} µs CPU per request")
    for name, runs in results.items():
        cpu = statistics.median(r.cpu_us for r in runs)
        rps = statistics.median(r.rps for r in runs)
        line = (f"  {name}: {rps:.0f}/s, {cpu:.0f} µs CPU per page view (loop "
                f"{statistics.median(r.loop_us for r in runs):.0f}, other threads "
                f"{statistics.median(r.other_us for r in runs):.0f}"
                + (f", garbage collector {statistics.median(r.gc_us for r in runs):.1f}" if args.gc else "") + ")")
        if bare_cpu and bare_rps:
            line += f"; {cpu / bare_cpu:.2f} × the bare app's CPU, {rps / bare_rps:.2f} of its throughput"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
