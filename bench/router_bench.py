"""Benchmark: how fast the router builds the read model, without HTTP.

Feeds N visitor.tracked.v0 events (default 40,000; about 20,000 distinct visitors over two
sites) through Pathways.deliver in batches, on a real SQLite file in a temporary directory,
and prints events per second and the time spent in each kind of SQL statement.

    python bench/router_bench.py [--events N] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pathways import VISITOR_TRACKED, Event, Pathways, time_uuid  # noqa: E402
from store import DB_FILENAME, Store  # noqa: E402

seconds_by_statement: collections.Counter[str] = collections.Counter()


def timed(method: Any) -> Any:
    async def wrapper(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return await method(self, sql, *args)
        finally:
            seconds_by_statement[" ".join(sql.split()[:5])] += time.perf_counter() - started

    return wrapper


def events(count: int, rng: random.Random) -> list[Event]:
    start = datetime(2025, 6, 4, 10, tzinfo=UTC)
    made = []
    for index in range(count):
        at = start + timedelta(milliseconds=index * 20)
        payload = {
            "visitorHash": hashlib.sha256(str(rng.randrange(count // 2)).encode()).hexdigest(),
            "domain": rng.choice(["a.example", "b.example"]),
            "pathname": rng.choice(["/", "/a", "/b", "/c/d"]),
            "referrer": rng.choice(["", "https://google.com/"]),
            "sessionContext": {"dailySaltRotation": at.date().isoformat()},
        }
        made.append(Event(time_uuid(), "visitor.v0", "visitor.tracked.v0", at, payload))
    return made


async def run(count: int, batch: int) -> None:
    aiosqlite.Connection.executemany = timed(aiosqlite.Connection.executemany)  # type: ignore[method-assign]
    aiosqlite.Connection.execute_fetchall = timed(aiosqlite.Connection.execute_fetchall)  # type: ignore[method-assign]
    feed = events(count, random.Random(1))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / DB_FILENAME, ZoneInfo("UTC"))
        await store.open()
        pathways = Pathways(store)
        pathways.register(VISITOR_TRACKED)
        pathways.handle(VISITOR_TRACKED, store.record_pageviews)
        started, cpu = time.perf_counter(), time.process_time()
        for index in range(0, count, batch):
            await pathways.deliver(feed[index : index + batch])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        await store.close()
    print(f"{count / elapsed:,.0f} events/s ({count:,} events in {elapsed:.2f} s; {cpu / count * 1e6:.0f} µs CPU each)")
    for statement, seconds in seconds_by_statement.most_common(8):
        print(f"  {seconds:6.2f} s  {statement}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=500)
    arguments = parser.parse_args()
    asyncio.run(run(arguments.events, arguments.batch))
