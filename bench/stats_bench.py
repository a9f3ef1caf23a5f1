"""Benchmark: how fast /api/stats answers over a large read model, unfiltered and filtered.

Fills a temporary DATA_DIR with N page views (default 1,000,000) over D days (90) across S
sites (5), written in bulk as visits of one to eight page views by visitors with a country,
browser, system and device, some of the visits from a campaign: raw rows into `pageview_rows`
(with their dictionary, `dims`, and each visit's facts on its first row, as the read model
keeps them), and the rollups (daily, hourly, page, source and dimension_stats) aggregated from
them by SQL. Then it starts the real app on a local port and times GET /api/stats over real HTTP:
unfiltered for four periods (from the rollups), then the 30 days with filters (from the raw
rows), each with the share of the period's page views it matches.

    python bench/stats_bench.py                 # the figures recorded in docs/performance.md
    python bench/stats_bench.py --views 100000  # a quicker run

Not a test: timings depend on the machine. The targets: a 30-day /api/stats under 100 ms, a
filtered one under 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

TABLES = ("pageview_rows", "dims", "daily_stats", "hourly_stats", "page_stats", "source_stats", "dimension_stats")
SITE_WEIGHTS = (0.40, 0.25, 0.15, 0.12, 0.08)
PAGES_PER_SITE = 500
REFERRERS = ["", "", "", "https://www.google.com/", "https://news.ycombinator.com/item",
             "https://duckduckgo.com/", "https://t.co/x"] + [f"https://blog{n}.example/post" for n in range(150)]
COUNTRIES = ["US", "DE", "GB", "FR", "IN", "DK", "NL", "BR", "CA", "JP", "SE", "ES", "IT", "PL", "AU"] + [
    f"{chr(65 + n // 26)}{chr(65 + n % 26)}" for n in range(30, 75)]
AGENTS = [("Chrome", "Windows", "desktop", 30), ("Chrome", "Android", "mobile", 22), ("Safari", "iOS", "mobile", 18),
          ("Safari", "macOS", "desktop", 8), ("Firefox", "Windows", "desktop", 5), ("Edge", "Windows", "desktop", 6),
          ("Firefox", "Linux", "desktop", 2), ("Samsung Internet", "Android", "mobile", 3),
          ("Safari", "iOS", "tablet", 3), ("Chrome", "macOS", "desktop", 3)]
VIEWS_PER_VISIT = ([1] * 45) + ([2] * 20) + ([3] * 15) + ([4] * 10) + ([5] * 5) + ([8] * 5)
# The filters timed on the biggest site's 30 days, from broad to narrow.
FILTERS = [
    ["browser:Chrome"], ["device:mobile"], ["source:(direct)"], ["country:US"], ["page:/page/1"],
    ["country:DE"], ["entry_page:/page/2"], ["utm_campaign:campaign-3"], ["country:US", "device:desktop"],
]


def sites(count: int) -> list[str]:
    return [f"site{n}.example" for n in range(1, count + 1)]


def page(rng: random.Random) -> str:
    return f"/page/{int(rng.paretovariate(1.2)) % PAGES_PER_SITE}"


def generate(views: int, days: int, site_count: int, now: datetime, rng: random.Random) -> list[tuple[object, ...]]:
    """Raw page views, visit after visit: (domain, ts_ms, day, hour, pathname, referrer, source,
    visitor, visit, country, browser, os, device, utm_source, utm_medium, utm_campaign). About one
    visitor in four comes back for another visit the same day."""
    domains = sites(site_count)
    weights = [SITE_WEIGHTS[i % len(SITE_WEIGHTS)] for i in range(site_count)]
    start_ms = int((now - timedelta(days=days)).timestamp() * 1000)
    span_ms = days * 86_400_000
    tz = ZoneInfo("UTC")
    country_weights = [1 / (n + 1) for n in range(len(COUNTRIES))]
    rows: list[tuple[object, ...]] = []
    visitor = visit = 0
    while len(rows) < views:
        domain = rng.choices(domains, weights)[0]
        visitor += 1
        country = rng.choices(COUNTRIES, country_weights)[0]
        browser, system, device, _ = rng.choices(AGENTS, [a[3] for a in AGENTS])[0]
        ts_ms = start_ms + rng.randrange(span_ms - 6 * 3_600_000)
        for _ in range(2 if rng.random() < 0.25 else 1):
            visit += 1
            campaign = (f"source-{rng.randrange(5)}", rng.choice(["email", "social", "cpc"]),
                        f"campaign-{rng.randrange(20)}") if rng.random() < 0.08 else ("", "", "")
            referrer = rng.choice(REFERRERS)
            for index in range(rng.choice(VIEWS_PER_VISIT)):
                day, hour, _ = local_day_hour(ts_ms, tz)
                own = referrer if index == 0 else f"https://{domain}/"
                rows.append((domain, ts_ms, day, hour, page(rng), own, referrer_source(own, domain), visitor, visit,
                             country, browser, system, device, *campaign))
                ts_ms += rng.randrange(10_000, 600_000)
            ts_ms += rng.randrange(1_900_000, 7_200_000)  # more than 30 minutes: the next visit
    return rows[:views]


KINDS = {"site": "domain", "page": "pathname", "referrer": "referrer", "source": "source", "country": "country",
         "browser": "browser", "os": "os", "device": "device", "utm_source": "utm_source",
         "utm_medium": "utm_medium", "utm_campaign": "utm_campaign"}
VIEW_COLUMNS = {"page": "pathname"}  # a filter's column in the `pageviews` view, where its name is not the same
ROLLUP_SQL = [
    "CREATE TEMP TABLE decoded AS SELECT * FROM pageviews",
    "INSERT INTO daily_stats SELECT domain, day, count(*), count(DISTINCT visitor), sum(id = visit), "
    "sum(id = visit AND views = 1), sum(duration_ms) FROM decoded GROUP BY domain, day",
    "INSERT INTO hourly_stats SELECT domain, hour, count(*), count(DISTINCT visitor) FROM raw GROUP BY domain, hour",
    "INSERT INTO page_stats SELECT domain, day, pathname, count(*), count(DISTINCT visitor) FROM decoded "
    "GROUP BY domain, day, pathname",
    "INSERT INTO source_stats SELECT domain, day, source, count(*), count(DISTINCT visitor) FROM decoded "
    "GROUP BY domain, day, source",
    *(f"INSERT INTO dimension_stats SELECT domain, '{name}', day, {name}, count(*), count(DISTINCT visitor), "
      f"sum(id = visit), sum(id = visit AND views = 1) FROM decoded GROUP BY domain, day, {name}"
      for name in ("country", "browser", "os", "device", "utm_source", "utm_medium", "utm_campaign", "entry_page")),
    "INSERT INTO dimension_stats SELECT domain, 'exit_page', day, exit_page, sum(views), count(DISTINCT visitor), "
    "count(*), sum(views = 1) FROM decoded WHERE id = visit GROUP BY domain, day, exit_page",
]
COLUMNS = ("site", "day", "ts_ms", "id", "visitor", "page", "referrer", "source", "country", "browser", "os", "device",
           "utm", "visit", "utm_source", "utm_medium", "utm_campaign", "entry", "views", "duration_ms", "exit")


def encoded(rows: list[tuple[object, ...]], dims: dict[tuple[str, object], int]) -> list[tuple[object, ...]]:
    """The raw rows as the read model keeps them: dictionary ids (0: unknown), each visit's
    campaign and entry page on its rows, its page views, duration and exit page on its first."""
    found: list[tuple[object, ...]] = []
    start = 0
    while start < len(rows):  # a visit's rows are next to each other
        visit, end = rows[start][8], start
        while end < len(rows) and rows[end][8] == visit:
            end += 1
        first, last = rows[start], rows[end - 1]
        facts = (end - start, int(last[1]) - int(first[1]), dims[("page", last[4])])  # type: ignore[call-overload]
        entry = dims[("page", first[4])]
        for index in range(start, end):
            (domain, ts_ms, day, _, pathname, referrer, source, visitor, _, country, browser, system, device,
             utm_source, utm_medium, utm_campaign) = rows[index]
            found.append((
                dims[("site", domain)], dims[("day", day)], ts_ms, index + 1, visitor, dims[("page", pathname)],
                dims[("referrer", referrer)], dims[("source", source)], dims[("country", country)],
                dims[("browser", browser)], dims[("os", system)], dims[("device", device)], 0, start + 1,
                dims[("utm_source", utm_source)], dims[("utm_medium", utm_medium)],
                dims[("utm_campaign", utm_campaign)], entry, *(facts if index == start else (0, 0, 0)),
            ))
        start = end
    return found


def fill(path: Path, rows: list[tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        kinds = ("site", "page", "referrer", "source", "country", "browser", "os", "device", "utm_source",
                 "utm_medium", "utm_campaign")
        columns = (0, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15)
        values = {(kind, row[column]) for row in rows for kind, column in zip(kinds, columns, strict=True)}
        conn.executemany("INSERT OR IGNORE INTO dims (kind, value) VALUES (?, ?)",
                         sorted(value for value in values if value[1] != ""))
        dims: dict[tuple[str, object], int] = {(kind, value): number for number, kind, value in
                                               conn.execute("SELECT id, kind, value FROM dims")}
        dims.update({(kind, ""): 0 for kind in kinds})
        days = {row[2] for row in rows}
        dims.update({("day", day): (datetime.fromisoformat(str(day)).date() - EPOCH).days for day in days})
        conn.executemany(f"INSERT INTO pageview_rows ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                         sorted(encoded(rows, dims)))
        conn.execute("CREATE TEMP TABLE raw (domain, hour, visitor)")
        conn.executemany("INSERT INTO raw VALUES (?, ?, ?)", [(row[0], row[3], row[7]) for row in rows])
        for sql in ROLLUP_SQL:
            conn.execute(sql)
        conn.commit()
        conn.execute("ANALYZE")
    finally:
        conn.close()


EPOCH = datetime(1970, 1, 1).date()


async def migrate(data_dir: Path) -> None:
    store = Store(data_dir / DB_FILENAME, ZoneInfo("UTC"))
    ReadModel(store)
    await store.open()
    await store.close()


def cpu_seconds() -> float:
    """CPU time of this process, every thread (the app's and its database threads)."""
    return time.process_time()


async def time_requests(base: str, params: list[tuple[str, str]], count: int) -> tuple[list[float], list[float]]:
    """Wall milliseconds per request, and the CPU milliseconds this process spent on each."""
    timings, cpu = [], []
    async with ClientSession() as session:
        for _ in range(3):  # warm the page cache and the connection
            async with session.get(f"{base}/api/stats", params=params) as response:
                assert response.status == 200, await response.text()
        for _ in range(count):
            started, used = time.perf_counter(), cpu_seconds()
            async with session.get(f"{base}/api/stats", params=params) as response:
                await response.read()
            timings.append((time.perf_counter() - started) * 1000)
            cpu.append((cpu_seconds() - used) * 1000)
    return timings, cpu


async def serve_and_time(data_dir: Path, domain: str, count: int) -> dict[str, tuple[list[float], list[float]]]:
    # RAW_RETENTION_DAYS above the data's span, so the daily job deletes nothing while we time.
    config = load_config({"DATA_DIR": str(data_dir), "SECRET_KEY": "b" * 40, "RAW_RETENTION_DAYS": "3650"})
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    try:
        timed = {period: await time_requests(base, [("domain", domain), ("period", period)], count)
                 for period in ("30d", "today", "7d", "12mo")}
        for filters in FILTERS:
            params = [("domain", domain), ("period", "30d"), *(("filter", f) for f in filters)]
            timed["30d " + " & ".join(filters)] = await time_requests(base, params, count)
        return timed
    finally:
        await runner.cleanup()


def shares(path: Path, domain: str, now: datetime) -> dict[str, float]:
    """The share of the site's 30 days' page views each filter matches."""
    first = (now.date() - timedelta(days=29)).isoformat()
    conn = sqlite3.connect(path)
    try:
        where = "FROM pageviews WHERE domain = ? AND day >= ?"
        total = conn.execute(f"SELECT count(*) {where}", (domain, first)).fetchone()[0]
        found = {}
        for filters in FILTERS:
            conditions = " AND ".join(f"{VIEW_COLUMNS.get(f.split(':')[0], f.split(':')[0])} = ?" for f in filters)
            values = [f.split(":", 1)[1] for f in filters]
            count = conn.execute(f"SELECT count(*) {where} AND {conditions}", (domain, first, *values)).fetchone()[0]
            found["30d " + " & ".join(filters)] = count / total
        found["rows"] = total
        return found
    finally:
        conn.close()


def report(label: str, timings: list[float], cpu: list[float], share: float | None) -> str:
    ordered = sorted(timings)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    matched = f" (matches {share:.1%})" if share is not None else ""
    return (f"{label:>36}: median {statistics.median(ordered):6.1f} ms, p95 {p95:6.1f} ms, "
            f"CPU median {statistics.median(cpu):6.1f} ms{matched}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--data-dir", type=Path, help="fill this DATA_DIR and keep it; if it holds a filled "
                        "database (of today), time that one again without filling")
    args = parser.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="stats-bench-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        if not (data_dir / DB_FILENAME).exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            asyncio.run(migrate(data_dir))
            rows = generate(args.views, args.days, args.sites, now, random.Random(1))
            fill(data_dir / DB_FILENAME, rows)
            del rows
            size = (data_dir / DB_FILENAME).stat().st_size / 1e6
            print(f"filled {args.views:,} page views over {args.days} days across {args.sites} sites "
                  f"in {time.perf_counter() - started:.1f} s ({size:.0f} MB)")
        biggest = sites(args.sites)[0]
        with sqlite3.connect(data_dir / DB_FILENAME) as conn:
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        print("rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
        matched = shares(data_dir / DB_FILENAME, biggest, now)
        print(f"GET /api/stats?domain={biggest} (the biggest site, {SITE_WEIGHTS[0]:.0%} of the page views; "
              f"{matched['rows']:,.0f} in its last 30 days), load average {os.getloadavg()[0]:.1f}:")
        for label, (timings, cpu) in asyncio.run(serve_and_time(data_dir, biggest, args.requests)).items():
            print("  " + report(label, timings, cpu, matched.get(label)))


if __name__ == "__main__":
    main()
