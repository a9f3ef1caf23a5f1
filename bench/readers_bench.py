"""Benchmark: do readers starve writers? Page view latency while clients export ten years of CSV.

Fills a temporary DATA_DIR with ten years of rollups for one site (every day in daily_stats,
PAGES pages and SOURCES sources a day in page_stats and source_stats), starts
`python collector.py` on it, and drives page views with `wrk` at about 1,000 a second offered
(50 connections with a think time, as bench/run.py's latency figure) for a baseline; then again
while EXPORTERS clients (threads of this script, another process than the collector) each loop
`GET /api/export` over ten years, cycling through the daily, pages and sources tables.

    python bench/readers_bench.py               # the figure recorded in docs/performance.md
    python bench/readers_bench.py --seconds 10  # a quicker run

It prints the page view p50 and p99 of both runs, the exports completed, and the collector's CPU
time. Not a test: the target (issue 10) is a page view p99 under 250 ms with four exporters.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import collector, cpu_seconds, fixed_rate_wrk  # noqa: E402

from readmodel import ReadModel  # noqa: E402
from store import DB_FILENAME, Store  # noqa: E402

DOMAIN = "example.com"  # one of bench/pageviews.lua's domains, so the exported site also takes page views
YEARS_DAYS = 3652
PAGES = 30
SOURCES = 12
TABLES = ("daily", "pages", "sources")


async def migrate(data_dir: Path) -> None:
    store = Store(data_dir / DB_FILENAME, ZoneInfo("UTC"))
    ReadModel(store)  # the read model's migrations too: the file as the collector leaves it
    await store.open()
    await store.close()


def fill(data_dir: Path, last: date) -> dict[str, int]:
    """Ten years of rollups for DOMAIN, ending `last`."""
    days = [(last - timedelta(days=n)).isoformat() for n in range(YEARS_DAYS)]
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with conn:
        conn.executemany("INSERT INTO daily_stats VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [(DOMAIN, day, 900, 400, 500, 250, 500 * 95_000) for day in days])
        conn.executemany("INSERT INTO page_stats VALUES (?, ?, ?, ?, ?)",
                         [(DOMAIN, day, f"/page/{n}", 30 - n // 2, 20 - n // 3) for day in days for n in range(PAGES)])
        conn.executemany("INSERT INTO source_stats VALUES (?, ?, ?, ?, ?)",
                         [(DOMAIN, day, f"source{n}.example", 40 - n, 30 - n) for day in days for n in range(SOURCES)])
    counts = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
              for table in ("daily_stats", "page_stats", "source_stats")}
    conn.close()
    return counts


class Exporters:
    """Threads that each fetch ten years of CSV in a loop until stopped."""

    def __init__(self, url: str, count: int, first: date, last: date) -> None:
        self.url, self.first, self.last = url, first, last
        self.stop = threading.Event()
        self.done = 0
        self.bytes = 0
        self.failures = 0
        self.threads = [threading.Thread(target=self.loop, args=(n,), daemon=True) for n in range(count)]

    def loop(self, index: int) -> None:
        turn = index
        while not self.stop.is_set():
            table = TABLES[turn % len(TABLES)]
            turn += 1
            query = f"domain={DOMAIN}&from={self.first}&to={self.last}&table={table}"
            try:
                with urllib.request.urlopen(f"{self.url}/api/export?{query}", timeout=60) as response:
                    self.bytes += len(response.read())
                self.done += 1
            except OSError:
                self.failures += 1

    def __enter__(self) -> Exporters:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def measure(data_dir: Path, seconds: float, exporters: int) -> dict[str, Any]:
    last = date.today()
    first = last - timedelta(days=YEARS_DAYS - 1)
    with collector(data_dir, RAW_RETENTION_DAYS="3650") as (url, pid):
        fixed_rate_wrk(url, 2)  # warm-up
        cpu_before = cpu_seconds(pid)
        baseline = fixed_rate_wrk(url, seconds)
        cpu_baseline = cpu_seconds(pid) - cpu_before
        with Exporters(url, exporters, first, last) as running:
            time.sleep(1)  # every exporter has started its first export
            cpu_before = cpu_seconds(pid)
            loaded = fixed_rate_wrk(url, seconds)
            cpu_loaded = cpu_seconds(pid) - cpu_before
            exports, exported, failures = running.done, running.bytes, running.failures
        wal = data_dir / (DB_FILENAME + "-wal")
        wal_mb = wal.stat().st_size / 1e6 if wal.exists() else 0.0
    return {
        "baseline_rps": round(baseline.rate), "baseline_p50_ms": baseline.p50_ms, "baseline_p99_ms": baseline.p99_ms,
        "baseline_errors": baseline.errors + baseline.non_2xx, "baseline_cpu_s": round(cpu_baseline, 1),
        "exporters": exporters,
        "loaded_rps": round(loaded.rate), "loaded_p50_ms": loaded.p50_ms, "loaded_p99_ms": loaded.p99_ms,
        "loaded_errors": loaded.errors + loaded.non_2xx, "loaded_cpu_s": round(cpu_loaded, 1),
        "exports_completed": exports, "exported_mb": round(exported / 1e6, 1), "export_failures": failures,
        "wal_mb_after": round(wal_mb, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each page view run")
    parser.add_argument("--exporters", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="readers-bench-") as tmp:
        data_dir = Path(tmp)
        asyncio.run(migrate(data_dir))
        counts = fill(data_dir, date.today())
        print("filled ten years for " + DOMAIN + ": " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
        figures = measure(data_dir, args.seconds, args.exporters)
    for key, value in figures.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
