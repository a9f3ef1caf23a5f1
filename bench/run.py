"""The performance benchmark, in one command: `python bench/run.py` (`--quick` for a short run).

In one run on this machine it measures, with `wrk` (Debian package) driving HTTP from another
process over loopback:

1. the ceiling: a bare aiohttp app whose handler only reads the JSON body and answers 204;
2. the collector on its embedded default (a temporary DATA_DIR), with the same request mix:
   varied paths, referrers, domains and client addresses (X-Forwarded-For from the trusted
   loopback proxy), a real browser's user agent; its throughput as a fraction of the ceiling,
   the CPU time per request of every thread of each process (/proc/PID/stat; the collector's
   until its read model has caught up), how many database commits served how many requests,
   and how long the read model takes to catch up after the burst; with asyncio's loop and,
   when installed, uvloop;
3. latency (p50, p99) at 1,000 page views per second offered by an open-loop client
   (bench/open_loop.py: a fixed arrival rate), with the read model's lag sampled from /health;
4. peak resident memory after N page views (1,000,000 by default), once the read model has
   caught up;
5. the emitter's drain rate into a local fake Flowcore (a backlog prefilled in the outbox);
6. the /api/stats timings of bench/stats_bench.py (1,000,000 page views over 90 days);
7. page view latency while four clients export ten years of CSV in a loop (bench/readers_bench.py).

It prints every figure; docs/performance.md records them. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "pageviews.lua"
SECRET = "benchmark-secret-key-0123456789abcdef"


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of every thread of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str) -> None:
    """Poll with a deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def get_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def answers(url: str) -> bool:
    """Whether anything answers HTTP there (an error status counts)."""
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def wrk(url: str, seconds: float, connections: int, **env: str) -> WrkResult:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(LUA), url]
    output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=True).stdout
    match = re.search(r"BENCH requests=(\d+) duration_us=(\d+) non2xx=(\d+) errors=(\d+) p50_us=(\d+) p99_us=(\d+)",
                      output)
    if not match:
        raise SystemExit(f"bench: could not read wrk's output:\n{output}")
    requests, duration, non_2xx, errors, p50, p99 = map(int, match.groups())
    return WrkResult(requests, duration / 1e6, non_2xx, errors, p50 / 1000, p99 / 1000)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def process(command: list[str], env: dict[str, str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()
    child = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(lambda: child.poll() is not None or answers(ready_url), 30, f"{command[1]} answering")
        if child.poll() is not None:
            log.seek(0)
            raise SystemExit(f"bench: {command} exited:\n{log.read().decode(errors='replace')}")
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        log.close()


@contextmanager
def collector(data_dir: Path, event_loop: str = "asyncio", **env: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"DATA_DIR": str(data_dir), "HOST": "127.0.0.1", "PORT": str(port), "SECRET_KEY": SECRET,
                "EVENT_LOOP": event_loop, "LOG_LEVEL": "WARNING", **env}
    with process([sys.executable, "collector.py"], settings, url + "/health") as child:
        yield url, child.pid


@contextmanager
def bare_app(event_loop: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"BENCH_UVLOOP": "1" if event_loop == "uvloop" else "0"}
    with process([sys.executable, str(BENCH / "bare_app.py"), str(port)], env, url + "/") as child:
        yield url, child.pid


def drained(url: str) -> bool:
    health = get_json(url + "/health")
    return health is not None and health["backlog"] == 0


def throughput(loop: str, seconds: float, connections: int, work: Path) -> dict[str, Any]:
    with bare_app(loop) as (url, pid):
        wrk(url, 2, connections)  # warm-up
        cpu = cpu_seconds(pid)
        ceiling = wrk(url, seconds, connections)
        bare_cpu = cpu_seconds(pid) - cpu
    data_dir = work / f"throughput-{loop}"
    with collector(data_dir, loop) as (url, pid):
        wrk(url, 2, connections)
        wait_until(lambda: drained(url), 600, "the read model catching up after the warm-up")
        before = get_json(url + "/health") or {}
        cpu = cpu_seconds(pid)
        measured = wrk(url, seconds, connections)
        after = get_json(url + "/health") or {}
        catch_up_started = time.monotonic()
        wait_until(lambda: drained(url), 600, "the read model catching up")
        catch_up = time.monotonic() - catch_up_started
        collector_cpu = cpu_seconds(pid) - cpu  # the /health polls while catching up add well under 1 %
    commits = after["group_commit"]["commits"] - before["group_commit"]["commits"]
    events = after["group_commit"]["events"] - before["group_commit"]["events"]
    return {
        "loop": loop,
        "ceiling_rps": round(ceiling.rate),
        "ceiling_p50_ms": ceiling.p50_ms,
        "ceiling_p99_ms": ceiling.p99_ms,
        "collector_rps": round(measured.rate),
        "collector_p50_ms": measured.p50_ms,
        "collector_p99_ms": measured.p99_ms,
        "fraction_of_ceiling": round(measured.rate / ceiling.rate, 3),
        "ceiling_cpu_us_per_request": round(bare_cpu / ceiling.requests * 1e6),
        "collector_cpu_us_per_request": round(collector_cpu / measured.requests * 1e6),
        "cpu_ratio": round((collector_cpu / measured.requests) / (bare_cpu / ceiling.requests), 2),
        "lag_at_end_s": after.get("lag_seconds"),
        "errors": measured.errors + measured.non_2xx,
        "commits": commits,
        "events_committed": events,
        "events_per_commit": round(events / commits, 1) if commits else None,
        "read_model_catch_up_s": round(catch_up, 1),
    }


def fixed_rate_wrk(url: str, seconds: float, rate: int = 1000, connections: int = 50) -> WrkResult:
    """wrk at about `rate` page views a second offered: connections with a think time
    (bench/readers_bench.py's load)."""
    think_ms = max(1, round(connections * 1000 / rate) - 2)  # about 2 ms of service time per request
    return wrk(url, seconds, connections, BENCH_THINK_MS=str(think_ms))


def fixed_rate(seconds: float, work: Path, loop: str = "asyncio", rate: int = 1000) -> dict[str, Any]:
    """An open-loop client at `rate` page views a second; the read model's lag sampled meanwhile."""
    with collector(work / f"latency-{loop}", loop) as (url, pid):
        port = int(url.rsplit(":", 1)[1])
        command = [sys.executable, str(BENCH / "open_loop.py"), "127.0.0.1", str(port)]
        subprocess.run([*command, "--rate", str(rate), "--seconds", "2"], capture_output=True, check=True)  # warm-up
        load = subprocess.Popen([*command, "--rate", str(rate), "--seconds", str(seconds)], stdout=subprocess.PIPE,
                                text=True)
        lags = []
        while load.poll() is None:
            health = get_json(url + "/health")
            if health is not None:
                lags.append(float(health["lag_seconds"]))
            time.sleep(0.25)
        result: dict[str, Any] = json.loads(load.communicate()[0])
        started = time.monotonic()
        wait_until(lambda: drained(url), 600, "the read model catching up")
        result.update(loop=loop, lag_max_s=max(lags, default=None), lag_samples=len(lags),
                      catch_up_after_s=round(time.monotonic() - started, 2))
    return result


def memory(pageviews: int, connections: int, work: Path) -> dict[str, Any]:
    """wrk until the collector has committed `pageviews`, then SIGINT (wrk then reports)."""
    with collector(work / "memory") as (url, pid):
        started = time.monotonic()
        command = ["wrk", "-t1", f"-c{connections}", "-d24h", "--timeout", "10s", "-s", str(LUA), url]
        load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        wait_until(lambda: committed(url) >= pageviews, 24 * 3600, f"{pageviews:,} page views committed")
        load.send_signal(signal.SIGINT)
        load.communicate(timeout=60)
        sent = time.monotonic() - started
        wait_until(lambda: drained(url), 3600, "the read model catching up")
        total = time.monotonic() - started
        counted = committed(url)
        peak = peak_rss_mb(pid)
    return {"pageviews": counted, "send_s": round(sent, 1), "until_all_counted_s": round(total, 1),
            "peak_rss_mb": round(peak, 1)}


def committed(url: str) -> int:
    health = get_json(url + "/health")
    return int(health["group_commit"]["events"]) if health else 0


def prefill_outbox(data_dir: Path, events: int, per_second: int) -> None:
    """A backlog as an outage leaves it: `per_second` page views collected in each second."""
    with collector(data_dir):  # creates the schema, then stops
        pass
    payload = {"visitorHash": "ab" * 32, "domain": "example.com", "pathname": "/", "referrer": "",
               "sessionContext": {"dailySaltRotation": "2026-01-01"}}
    rows = []
    for index in range(events):
        payload["pathname"] = f"/p/{index % 500}"
        second, milli = divmod(index, per_second)
        collected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1767225600 + second)) + f".{milli % 1000:03d}Z"
        rows.append(("visitor.v0", "visitor.tracked.v0", json.dumps(payload, separators=(",", ":")), collected))
    conn = sqlite3.connect(data_dir / "collector.sqlite3")
    with conn:
        conn.executemany("INSERT INTO outbox (flow_type, event_type, payload, collected_at) VALUES (?, ?, ?, ?)",
                         rows)
    conn.close()


def drain(events: int, work: Path, batch_size: int = 1000) -> dict[str, Any]:
    data_dir = work / "drain"
    prefill_outbox(data_dir, events, per_second=batch_size)
    port = free_port()
    fake_url = f"http://127.0.0.1:{port}"
    fake = subprocess.Popen([sys.executable, str(BENCH / "fake_flowcore_server.py"), str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        env = {"FLOWCORE_TENANT": "acme", "FLOWCORE_API_KEY": "fc_0123456789abcdef_s3cr3t",
               "FLOWCORE_WEBHOOK_BASEURL": fake_url, "FLOWCORE_BATCH_SIZE": str(batch_size)}
        started = time.monotonic()
        with collector(data_dir, **env) as (url, _):
            wait_until(lambda: drained(url), 600, "the outbox draining into the fake Flowcore")
            elapsed = time.monotonic() - started
    finally:
        fake.terminate()
        stored = fake.communicate(timeout=30)[0].strip()
    return {"events": events, "batch_size": batch_size, "seconds": round(elapsed, 2),
            "events_per_s": round(events / elapsed), "fake_flowcore": stored}


def stats_timings(views: int) -> str:
    output = subprocess.run([sys.executable, str(BENCH / "stats_bench.py"), "--views", str(views)],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return output.strip()


def readers_figures(seconds: float) -> str:
    output = subprocess.run([sys.executable, str(BENCH / "readers_bench.py"), "--seconds", f"{seconds:g}"],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return output.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: 8 s, 100,000 page views")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each throughput run (full speed)")
    parser.add_argument("--latency-seconds", type=float, default=30.0, help="length of the open-loop run")
    parser.add_argument("--rate", type=int, default=1000, help="page views a second offered in the open-loop run")
    parser.add_argument("--only", choices=["throughput", "latency"], help="run only these figures")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--pageviews", type=int, default=1_000_000, help="page views for the memory run")
    parser.add_argument("--drain-events", type=int, default=100_000)
    parser.add_argument("--stats-views", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.pageviews, args.drain_events, args.stats_views = 8.0, 100_000, 20_000, 100_000
        args.latency_seconds = 10.0
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    loops = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        loops.append("uvloop")
    except ImportError:
        print("bench: uvloop is not installed (pip install '.[speed]'): measuring asyncio's loop only")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="collector-bench-") as tmp:
        work = Path(tmp)
        for loop in loops if args.only in (None, "throughput") else ():
            results[f"throughput_{loop}"] = report(f"throughput ({loop})", throughput(loop, args.seconds,
                                                                                    args.connections, work))
        for loop in loops if args.only in (None, "latency") else ():
            results[f"latency_{loop}"] = report(f"open-loop latency at {args.rate:,} page views/s ({loop})",
                                                fixed_rate(args.latency_seconds, work, loop, args.rate))
        if args.only is None:
            results["drain"] = report("emitter drain into a fake Flowcore", drain(args.drain_events, work))
            results["memory"] = report(f"memory after {args.pageviews:,} page views",
                                       memory(args.pageviews, args.connections, work))
    if args.only is None:
        print("\n== /api/stats (bench/stats_bench.py)\n" + stats_timings(args.stats_views))
        print("\n== page views while four clients export ten years of CSV (bench/readers_bench.py)\n"
              + readers_figures(args.seconds))
    print("\n" + json.dumps(results, indent=2))
    return 0


def report(title: str, figures: dict[str, Any]) -> dict[str, Any]:
    print(f"\n== {title}")
    for key, value in figures.items():
        print(f"  {key}: {value}")
    sys.stdout.flush()
    return figures


if __name__ == "__main__":
    sys.exit(main())
