"""Benchmark: how long `collector.py rebuild` takes over a large local event log.

Writes N logged page view events (default 200,000) over D days (30) across 5 sites straight
into `event_log` and `pathway_state` (as live processing leaves them), then times
maintenance.rebuild, which replays them through the real handler, with the garbage collector
set as the command sets it (`collector.settle_garbage_collector`; `--default-gc`: CPython's).

    python bench/rebuild_bench.py [--events 200000] [--days 30] [--default-gc]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector import settle_garbage_collector  # noqa: E402
from maintenance import rebuild  # noqa: E402
from store import DB_FILENAME, Store, iso_ms  # noqa: E402


def events(count: int, days: int, now: datetime, rng: random.Random) -> list[tuple[object, ...]]:
    start = now - timedelta(days=days)
    times = sorted(start + timedelta(seconds=rng.randrange(days * 86_400)) for _ in range(count))
    rows: list[tuple[object, ...]] = []
    for seq, at in enumerate(times, start=1):
        salt_day = at.date().isoformat()
        payload = {
            "visitorHash": hashlib.sha256(f"{rng.randrange(count // 4)}:{salt_day}".encode()).hexdigest(),
            "domain": f"site{rng.randrange(1, 6)}.example",
            "pathname": f"/page/{int(rng.paretovariate(1.2)) % 500}",
            "referrer": rng.choice(["", "", "https://www.google.com/", "https://news.example/x"]),
            "sessionContext": {"dailySaltRotation": salt_day},
        }
        rows.append((seq, str(uuid.uuid4()), "visitor.v0", "visitor.tracked.v0", "", iso_ms(at),
                     json.dumps(payload, separators=(",", ":"))))
    return rows


async def migrate(data_dir: Path) -> None:
    store = Store(data_dir / DB_FILENAME, ZoneInfo("UTC"))
    await store.open()
    await store.close()


def fill(path: Path, rows: list[tuple[object, ...]]) -> None:
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO event_log VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO pathway_state VALUES (?, 'visitor.v0/visitor.tracked.v0', '')",
                         [(row[1],) for row in rows])
        conn.execute("INSERT INTO meta VALUES ('local_delivered_seq', ?)", (str(len(rows)),))
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--default-gc", action="store_true", help="CPython's garbage collector settings")
    args = parser.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="rebuild-bench-") as tmp:
        data_dir = Path(tmp)
        asyncio.run(migrate(data_dir))
        fill(data_dir / DB_FILENAME, events(args.events, args.days, now, random.Random(1)))
        if not args.default_gc:
            settle_garbage_collector()
        started = time.perf_counter()
        summary = asyncio.run(rebuild(data_dir, ZoneInfo("UTC"), now))
        seconds = time.perf_counter() - started
        print(f"rebuild: replayed {summary.replayed:,} events from {summary.from_day} in {seconds:.1f} s "
              f"({summary.replayed / seconds:,.0f} events/s){', default gc' if args.default_gc else ''}")


if __name__ == "__main__":
    main()
