"""Benchmark: what the router and the read model cost per event, without HTTP.

Feeds N visitor.tracked events (default 40,000; about 20,000 distinct visitors over two
sites, a few out of order) through the router in batches, on a real SQLite file in a
temporary directory, and prints events per second, the CPU time per event (every thread of
this process: the event loop and the store's writer) and the bytes written per event
(`/proc/self/io`: `wchar` is what went to write(2), WAL and checkpoints included, with the
final checkpoint at close; `write_bytes` what reached the block layer).

The events are visitor.tracked.v1 by default (a country, browser, system and device per
visitor, a campaign on one in ten); `--version v0` sends the original's payload.

With --kind events it measures the custom events' handler instead: the same visitors' page views
are counted first (not measured), then N visitor.event.v0 events of five names with realistic
properties (an outbound link's url among 300, a download's among 100, a plan, a number of seats)
go through the router, so each event finds its visitor linked, as live traffic mostly does.

The router runs as production runs it for our own events (`LocalSink`): `process_batch(...,
checked=True)` in one write, since `write` checked their contract when they were accepted.
`--validate` routes them through `Pathways.deliver` instead, which checks every event's
contract again, as for events that come from outside (all this bench measured before it had the option).
The garbage collector is set as the served process sets it once started
(`collector.settle_garbage_collector`); `--default-gc` keeps CPython's defaults.

    python bench/router_bench.py [--events N] [--batch 500] [--version v1|v0] [--kind pageviews|events] [--validate]
                                 [--default-gc]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector import settle_garbage_collector  # noqa: E402
from pathways import VISITOR_EVENT, VISITOR_TRACKED, VISITOR_TRACKED_V1, Event, Pathways, time_uuid  # noqa: E402
from readmodel import ReadModel  # noqa: E402
from store import DB_FILENAME, Store  # noqa: E402

COUNTRIES = ["US", "DE", "DK", "GB", "FR", "IN", "BR", "JP", None]
AGENTS = [("Chrome", "Windows", "desktop"), ("Safari", "iOS", "mobile"), ("Chrome", "Android", "mobile"),
          ("Firefox", "Linux", "desktop"), ("Safari", "macOS", "desktop"), ("Edge", "Windows", "desktop"),
          ("Samsung Internet", "Android", "tablet")]
CAMPAIGNS = [{"source": "newsletter", "medium": "email", "campaign": "spring"}, {"source": "mastodon"},
             {"campaign": "launch", "content": "banner"}]


def events(count: int, rng: random.Random, version: str = "v1") -> list[Event]:
    start = datetime(2025, 6, 4, 10, tzinfo=UTC)
    made = []
    for index in range(count):
        at = start + timedelta(milliseconds=index * 20 - (rng.randrange(5000) if index % 100 == 0 else 0))
        visitor = rng.randrange(count // 2)
        payload: dict[str, object] = {
            "visitorHash": hashlib.sha256(str(visitor).encode()).hexdigest(),
            "domain": rng.choice(["a.example", "b.example"]),
            "pathname": rng.choice(["/", "/a", "/b", "/c/d"]),
            "referrer": rng.choice(["", "https://google.com/"]),
            "sessionContext": {"dailySaltRotation": at.date().isoformat()},
        }
        if version == "v1":  # a visitor's country and agent stay the same; a campaign is the page's
            browser, system, device = AGENTS[visitor % len(AGENTS)]
            payload.update(country=COUNTRIES[visitor % len(COUNTRIES)], browser=browser, os=system, device=device,
                           utm=rng.choice(CAMPAIGNS) if rng.random() < 0.1 else {})
        made.append(Event(time_uuid(), "visitor.v0", f"visitor.tracked.{version}", at, payload))
    return made


def custom_events(count: int, rng: random.Random) -> list[Event]:
    """Custom events of the page views' visitors (the same hashes), in time order, a few late."""
    start = datetime(2025, 6, 4, 10, 0, 0, 10_000, tzinfo=UTC)
    made = []
    for index in range(count):
        at = start + timedelta(milliseconds=index * 20 - (rng.randrange(5000) if index % 100 == 0 else 0))
        name = rng.choice(["Signup", "Outbound Link: Click", "File Download", "404", "Purchase"])
        props: dict[str, str | int] = {}
        if name == "Outbound Link: Click":
            props = {"url": f"https://elsewhere{rng.randrange(300)}.example/page"}
        elif name == "File Download":
            props = {"url": f"https://a.example/files/report-{rng.randrange(100)}.pdf"}
        elif name == "Signup":
            props = {"plan": rng.choice(["free", "pro", "team"])}
        elif name == "Purchase":
            props = {"plan": rng.choice(["pro", "team"]), "seats": rng.randrange(1, 20)}
        payload: dict[str, object] = {
            "visitorHash": hashlib.sha256(str(rng.randrange(count // 2)).encode()).hexdigest(),
            "domain": rng.choice(["a.example", "b.example"]),
            "pathname": rng.choice(["/", "/a", "/b", "/c/d"]),
            "referrer": "",
            "name": name,
            "props": props,
            "sessionContext": {"dailySaltRotation": at.date().isoformat()},
        }
        # Any field the contract adds (issue 13's page view dimensions) as unknown (null).
        payload.update((key, None) for key in VISITOR_EVENT.schema.fields if key not in payload)
        made.append(Event(time_uuid(), "visitor.v0", "visitor.event.v0", at, payload))
    return made


async def route_checked(store: Store, pathways: Pathways, batch: Sequence[Event]) -> None:
    """One batch as `LocalSink` routes our own events: one write, contracts not checked again."""
    await store.write(lambda conn: pathways.process_batch(conn, batch, checked=True))


def io_counters() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().splitlines()
    return {name: int(value) for name, value in (line.split(": ") for line in lines)}


async def run(count: int, batch: int, kind: str = "pageviews", version: str = "v1",
              validate: bool = False, default_gc: bool = False) -> dict[str, float]:
    feed = events(count, random.Random(1), version)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / DB_FILENAME, ZoneInfo("UTC"))
        read_model = ReadModel(store)
        await store.open()
        pathways = Pathways(store)
        for contract in (VISITOR_TRACKED, VISITOR_TRACKED_V1):
            pathways.register(contract)
            pathways.handle(contract, read_model.record_pageviews)
        pathways.register(VISITOR_EVENT)
        pathways.handle(VISITOR_EVENT, read_model.events.record)
        if kind == "events":  # the visitors' page views first, then the events are what is measured
            for index in range(0, count, batch):
                await pathways.deliver(feed[index : index + batch])
            feed = custom_events(count, random.Random(2))
            checkpoint = sqlite3.connect(Path(tmp) / DB_FILENAME)  # the page views' WAL is not theirs to pay
            checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            checkpoint.close()
        if not default_gc:
            settle_garbage_collector()
        io_before, started, cpu = io_counters(), time.perf_counter(), time.process_time()
        for index in range(0, count, batch):
            if validate:
                await pathways.deliver(feed[index : index + batch])
            else:
                await route_checked(store, pathways, feed[index : index + batch])
        await store.close()  # its checkpoint writes what the WAL still holds into the file
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        io_after = io_counters()
    return {
        "events_per_s": count / elapsed,
        "cpu_us_per_event": cpu / count * 1e6,
        "wchar_kb_per_event": (io_after["wchar"] - io_before["wchar"]) / count / 1024,
        "write_bytes_kb_per_event": (io_after["write_bytes"] - io_before["write_bytes"]) / count / 1024,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--kind", choices=["pageviews", "events"], default="pageviews")
    parser.add_argument("--version", choices=("v1", "v0"), default="v1")
    parser.add_argument("--validate", action="store_true",
                        help="route through Pathways.deliver, checking every contract again")
    parser.add_argument("--default-gc", action="store_true", help="CPython's garbage collector settings")
    arguments = parser.parse_args()
    figures = asyncio.run(run(arguments.events, arguments.batch, arguments.kind, arguments.version,
                              arguments.validate, arguments.default_gc))
    print(f"{figures['events_per_s']:,.0f} events/s, {figures['cpu_us_per_event']:.0f} µs CPU per event, "
          f"{figures['wchar_kb_per_event']:.1f} KB written per event (wchar; "
          f"{figures['write_bytes_kb_per_event']:.1f} KB write_bytes), batches of {arguments.batch}, "
          f"{arguments.kind}, visitor.tracked.{arguments.version}"
          f"{', contracts checked again (deliver)' if arguments.validate else ', checked=True'}"
          f"{', default gc' if arguments.default_gc else ''}")
