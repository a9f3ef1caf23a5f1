"""Benchmark: how fast /api/stats answers over a large read model.

Fills a temporary DATA_DIR with N page views (default 1,000,000) over D days (90) across S
sites (5), written in bulk: raw rows into `pageview_rows` (with their dictionary, `dims`), and
the rollups (daily, hourly, page and source) aggregated from them by SQL. Then it
starts the real app on a local port and times GET /api/stats over real HTTP.

    python bench/stats_bench.py                 # the figure recorded in docs/performance.md
    python bench/stats_bench.py --views 100000  # a quicker run

Not a test: timings depend on the machine. The target is a 30-day /api/stats under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from aiohttp import ClientSession, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector import create_app  # noqa: E402
from config import load_config  # noqa: E402
from readmodel import ReadModel, local_day_hour, referrer_source  # noqa: E402
from store import DB_FILENAME, Store  # noqa: E402

TABLES = ("pageview_rows", "dims", "daily_stats", "hourly_stats", "page_stats", "source_stats")
SITE_WEIGHTS = (0.40, 0.25, 0.15, 0.12, 0.08)
PAGES_PER_SITE = 500
REFERRERS = ["", "", "", "https://www.google.com/", "https://news.ycombinator.com/item",
             "https://duckduckgo.com/", "https://t.co/x"] + [f"https://blog{n}.example/post" for n in range(150)]


def sites(count: int) -> list[str]:
    return [f"site{n}.example" for n in range(1, count + 1)]


def generate(views: int, days: int, site_count: int, now: datetime, rng: random.Random) -> list[tuple[object, ...]]:
    """Raw page views: (domain, ts_ms, day, hour, pathname, referrer, source, visitor)."""
    domains = sites(site_count)
    weights = [SITE_WEIGHTS[i % len(SITE_WEIGHTS)] for i in range(site_count)]
    start_ms = int((now - timedelta(days=days)).timestamp() * 1000)
    span_ms = days * 86_400_000
    tz = ZoneInfo("UTC")
    rows: list[tuple[object, ...]] = []
    for domain in rng.choices(domains, weights, k=views):
        ts_ms = start_ms + rng.randrange(span_ms)
        day, hour, _ = local_day_hour(ts_ms, tz)
        page = f"/page/{int(rng.paretovariate(1.2)) % PAGES_PER_SITE}"
        referrer = rng.choice(REFERRERS)
        visitor = rng.randrange(views // 4)  # about four page views per visitor over the period
        rows.append((domain, ts_ms, day, hour, page, referrer, referrer_source(referrer, domain), visitor))
    return rows


AGGREGATE_SQL = [
    *(f"INSERT OR IGNORE INTO dims (kind, value) SELECT DISTINCT '{kind}', {column} FROM raw"
      for kind, column in (("site", "domain"), ("page", "pathname"), ("referrer", "referrer"), ("source", "source"))),
    # A visitor's page views of the fixture are one visit: its number stands for both.
    "INSERT INTO pageview_rows (site, day, ts_ms, id, visitor, visit, page, referrer, source) "
    "SELECT s.id, CAST(julianday(r.day) - 2440587.5 AS INTEGER), r.ts_ms, r.rowid, r.visitor + 1, r.visitor + 1, "
    "p.id, f.id, o.id FROM raw r JOIN dims s ON s.kind = 'site' AND s.value = r.domain "
    "JOIN dims p ON p.kind = 'page' AND p.value = r.pathname JOIN dims f ON f.kind = 'referrer' "
    "AND f.value = r.referrer JOIN dims o ON o.kind = 'source' AND o.value = r.source",
    # Visits, bounces and durations are shaped like real traffic, not replayed visit by visit.
    "INSERT INTO daily_stats SELECT domain, day, count(*), count(DISTINCT visitor), "
    "count(DISTINCT visitor) * 13 / 10, count(DISTINCT visitor) * 6 / 10, count(DISTINCT visitor) * 95000 "
    "FROM raw GROUP BY domain, day",
    "INSERT INTO hourly_stats SELECT domain, hour, count(*), count(DISTINCT visitor) FROM raw GROUP BY domain, hour",
    "INSERT INTO page_stats SELECT domain, day, pathname, count(*), count(DISTINCT visitor) FROM raw "
    "GROUP BY domain, day, pathname",
    "INSERT INTO source_stats SELECT domain, day, source, count(*), count(DISTINCT visitor) FROM raw "
    "GROUP BY domain, day, source",
]


def fill(path: Path, rows: list[tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TEMP TABLE raw (domain, ts_ms, day, hour, pathname, referrer, source, visitor)")
        conn.executemany("INSERT INTO raw VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        for sql in AGGREGATE_SQL:
            conn.execute(sql)
        conn.commit()
        conn.execute("ANALYZE")
    finally:
        conn.close()


async def migrate(data_dir: Path) -> None:
    store = Store(data_dir / DB_FILENAME, ZoneInfo("UTC"))
    ReadModel(store)
    await store.open()
    await store.close()


async def time_requests(base: str, params: dict[str, str], count: int) -> list[float]:
    timings = []
    async with ClientSession() as session:
        for _ in range(3):  # warm the page cache and the connection
            async with session.get(f"{base}/api/stats", params=params) as response:
                assert response.status == 200, await response.text()
        for _ in range(count):
            started = time.perf_counter()
            async with session.get(f"{base}/api/stats", params=params) as response:
                await response.read()
            timings.append((time.perf_counter() - started) * 1000)
    return timings


async def serve_and_time(data_dir: Path, domain: str, count: int) -> dict[str, list[float]]:
    # RAW_RETENTION_DAYS above the data's span, so the daily job deletes nothing while we time.
    config = load_config({"DATA_DIR": str(data_dir), "SECRET_KEY": "b" * 40, "RAW_RETENTION_DAYS": "3650"})
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        return {period: await time_requests(f"http://127.0.0.1:{port}", {"domain": domain, "period": period}, count)
                for period in ("30d", "today", "7d", "12mo")}
    finally:
        await runner.cleanup()


def report(label: str, timings: list[float]) -> str:
    ordered = sorted(timings)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    return (f"{label:>5}: median {statistics.median(ordered):6.1f} ms, p95 {p95:6.1f} ms, "
            f"min {ordered[0]:6.1f} ms, max {ordered[-1]:6.1f} ms ({len(ordered)} requests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="stats-bench-") as tmp:
        data_dir = Path(tmp)
        started = time.perf_counter()
        asyncio.run(migrate(data_dir))
        rows = generate(args.views, args.days, args.sites, now, random.Random(1))
        fill(data_dir / DB_FILENAME, rows)
        size = (data_dir / DB_FILENAME).stat().st_size / 1e6
        print(f"filled {args.views:,} page views over {args.days} days across {args.sites} sites "
              f"in {time.perf_counter() - started:.1f} s ({size:.0f} MB)")
        biggest = sites(args.sites)[0]
        with sqlite3.connect(data_dir / DB_FILENAME) as conn:
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        print("rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
        timings = asyncio.run(serve_and_time(data_dir, biggest, args.requests))
        print(f"GET /api/stats?domain={biggest} (the biggest site, {SITE_WEIGHTS[0]:.0%} of the page views):")
        for period, values in timings.items():
            print("  " + report(period, values))


if __name__ == "__main__":
    main()
