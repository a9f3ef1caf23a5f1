"""The read model on real SQLite files: a file of the previous version migrates forward exactly,
the visitor cache may forget anyone and the numbers stay the same, a rolled-back batch leaves no
trace in memory, and page view commits go before the read model's steps."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import query, utc

from pathways import VISITOR_TRACKED, VISITOR_TRACKED_V1, Event, Pathways, time_uuid
from readmodel import ReadModel, View, Visitor
from store import DB_FILENAME, Store, _Writer

ROLLUPS = ("daily_stats", "hourly_stats", "page_stats", "source_stats", "dimension_stats")
# Every raw row by what it is, not by its ids (which follow the order events came in): its visit's
# facts included, so a replay that got a visit wrong shows here.
ROWS = ("SELECT ts_ms, domain, pathname, referrer, source, country, browser, os, device, utm, utm_source, utm_medium, "
        "utm_campaign, entry_page, views, duration_ms, exit_page, id = visit FROM pageviews ORDER BY " + ", ".join(
            str(n) for n in range(1, 19)))
OLD_FILE = Path(__file__).resolve().parent / "fixtures" / "read_model_v1.sql"


def view(at: datetime, who: str, path: str = "/", referrer: str = "", event_id: str | None = None,
         **dimensions: Any) -> Event:
    """A visitor.tracked.v0 page view; with dimensions (country=, browser=, os=, device=, utm=), a v1 one."""
    payload = {"visitorHash": hashlib.sha256(who.encode()).hexdigest(), "domain": "example.com", "pathname": path,
               "referrer": referrer, "sessionContext": {"dailySaltRotation": at.date().isoformat()}}
    if not dimensions:
        return Event(event_id or time_uuid(), "visitor.v0", "visitor.tracked.v0", at, payload)
    v1 = {**payload, "country": None, "browser": None, "os": None, "device": None, "utm": {}, **dimensions}
    return Event(event_id or time_uuid(), "visitor.v0", "visitor.tracked.v1", at, v1)


def rollups(path: Path, tables: Sequence[str] = ROLLUPS) -> dict[str, list[tuple[Any, ...]]]:
    return {table: query(path, f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4") for table in tables}


Handler = Callable[[sqlite3.Connection, Sequence[Event]], None]


@asynccontextmanager
async def pipeline(path: Path, *, cache_size: int = 1000,
                   wrap: Callable[[Handler], Handler] | None = None) -> AsyncIterator[Pathways]:
    store = Store(path / DB_FILENAME, ZoneInfo("UTC"))
    model = ReadModel(store, cache_size=cache_size)
    await store.open()
    pathways = Pathways(store, retry_delay=0.001)
    for contract in (VISITOR_TRACKED, VISITOR_TRACKED_V1):
        pathways.register(contract)
        pathways.handle(contract, wrap(model.record_pageviews) if wrap else model.record_pageviews)
    try:
        yield pathways
    finally:
        await store.close()


# -- migrating forward -------------------------------------------------------------------------------

T = utc(2025, 6, 4, 10)
# What the file of the previous version holds (tests/data/read_model_v1.sql), with its event ids.
BEFORE = [
    view(T, "alice", "/", "https://news.example/a", "00000000-0000-1000-8000-000000000001"),
    view(T + timedelta(minutes=1), "bob", "/pricing", event_id="00000000-0000-1000-8000-000000000002"),
    view(T + timedelta(minutes=5), "alice", "/blog", event_id="00000000-0000-1000-8000-000000000003"),
    view(T + timedelta(minutes=5), "carol", "/", event_id="00000000-0000-1000-8000-000000000004"),
    view(T - timedelta(days=3), "old", "/archive", event_id="00000000-0000-1000-8000-000000000005"),
    view(T + timedelta(minutes=20), "alice", "/", event_id="00000000-0000-1000-8000-000000000006"),
]
AFTER = [
    view(T + timedelta(minutes=40), "alice", "/"),  # 20 minutes on: the same visit, "/" seen before
    view(T + timedelta(hours=2), "bob", "/pricing"),  # a new visit, the page seen before today
    view(T + timedelta(hours=2), "dave", "/blog"),
]


def old_file(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    conn.executescript(OLD_FILE.read_text())
    conn.close()


async def test_a_file_of_the_previous_version_migrates_forward_exactly(tmp_path: Path) -> None:
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    old_file(old)
    old_rollups = rollups(old, ROLLUPS[:-1])
    old_rows = query(old, "SELECT id, domain, ts_ms, day, pathname, referrer, source FROM pageviews ORDER BY id")
    async with pipeline(old) as pathways:
        assert rollups(old, ROLLUPS[:-1]) == old_rollups  # nothing counted is lost
        assert query(old, "SELECT id, domain, ts_ms, day, pathname, referrer, source FROM pageviews ORDER BY id") \
            == old_rows
        # the visitors the old tables remembered keep their rows; the forgotten one's are nobody's
        assert query(old, "SELECT count(*) FROM visitors") == [(3,)]
        assert query(old, "SELECT visitor FROM pageviews WHERE pathname = '/archive'") == [(0,)]
        await pathways.deliver(AFTER)
        assert await pathways.process(BEFORE[2]) is not None  # an old event again: acknowledged, not counted
    async with pipeline(fresh) as pathways:
        await pathways.deliver(BEFORE + AFTER)
    migrated, counted = rollups(old), rollups(fresh)
    # The forgotten visitor's visit (the 1st) is nobody's: its entry and exit page are unknown.
    forgotten = [("example.com", name, "2025-06-01", "/archive", 1, 1, 1, 1) for name in ("entry_page", "exit_page")]
    assert [row for row in counted["dimension_stats"] if row[2] == "2025-06-01" and row[3]] == forgotten
    counted["dimension_stats"] = sorted(
        [row for row in counted["dimension_stats"] if row not in forgotten]
        + [(*row[:3], "", *row[4:]) for row in forgotten]
    )
    assert migrated == counted
    visits = ("SELECT ts_ms, pathname, dense_rank() OVER (ORDER BY visitor), dense_rank() OVER (ORDER BY visit) "
              "FROM pageviews WHERE day = '2025-06-04' ORDER BY ts_ms, pathname")
    assert query(old, visits) == query(fresh, visits)
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
    assert query(old, schema) == query(fresh, schema)  # a migrated file is a fresh file


# -- the cache and rollbacks ------------------------------------------------------------------------


def day_of_traffic(seed: int, visitors: int = 12, views: int = 120) -> list[Event]:
    """Views of several visitors over a day, with gaps around the 30-minute visit boundary; most
    are v1 page views with a country, browser, system and device of their visitor's, and some
    came with a campaign; a few are v0."""
    import random

    rng = random.Random(seed)
    clocks = {f"v{n}": utc(2025, 6, 4, 6) + timedelta(minutes=rng.randrange(600)) for n in range(visitors)}
    kinds = {who: {"country": rng.choice(["DK", "DE", None]), "browser": rng.choice(["Chrome", "Firefox"]),
                   "os": rng.choice(["Linux", "iOS", None]), "device": rng.choice(["desktop", "mobile", None])}
             for who in clocks}
    campaigns = [{}, {}, {"source": "news", "medium": "email", "campaign": "spring"}, {"campaign": "autumn"}]
    made = []
    for _ in range(views):
        who = rng.choice(sorted(clocks))
        # Never two views of a visitor in one millisecond: which of them came first (and so began
        # or ended a visit) would depend on the order they arrived in.
        clocks[who] += timedelta(minutes=rng.choice([0, 1, 5, 29, 30, 31, 90])) or timedelta(seconds=1)
        path = rng.choice(["/", "/a", "/b", "/c"])
        referrer = rng.choice(["", "https://news.example/x", "https://www.example.com/"])
        if rng.random() < 0.1:
            made.append(view(clocks[who], who, path, referrer))
        else:
            made.append(view(clocks[who], who, path, referrer, **kinds[who], utm=rng.choice(campaigns)))
    return sorted(made, key=lambda e: e.valid_time)


async def deliver_in_batches(pathways: Pathways, events: list[Event], size: int) -> None:
    for start in range(0, len(events), size):
        await pathways.deliver(events[start : start + size])


async def test_a_visitor_the_cache_forgot_is_read_back_from_its_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = day_of_traffic(3)
    async with pipeline(tmp_path / "big") as pathways:
        await deliver_in_batches(pathways, events, 7)
    async with pipeline(tmp_path / "tiny", cache_size=1) as pathways:
        await deliver_in_batches(pathways, events, 7)
    assert rollups(tmp_path / "tiny") == rollups(tmp_path / "big")
    assert query(tmp_path / "tiny", ROWS) == query(tmp_path / "big", ROWS)
    assert "failed" not in caplog.text  # each batch went through at once, not one by one after a failure


async def test_out_of_order_views_with_a_forgetful_cache_give_the_same_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import random

    events = day_of_traffic(5)
    async with pipeline(tmp_path / "ordered") as pathways:
        await pathways.deliver(events)
    shuffled = list(events)
    random.Random(5).shuffle(shuffled)
    async with pipeline(tmp_path / "shuffled", cache_size=2) as pathways:
        await deliver_in_batches(pathways, shuffled, 5)
    assert rollups(tmp_path / "shuffled") == rollups(tmp_path / "ordered")
    assert query(tmp_path / "shuffled", ROWS) == query(tmp_path / "ordered", ROWS)
    assert "failed" not in caplog.text
    visits = "SELECT count(DISTINCT visit), count(DISTINCT visitor) FROM pageviews"
    assert query(tmp_path / "shuffled", visits) == query(tmp_path / "ordered", visits)


async def test_a_restart_mid_day_reads_its_visitors_and_values_back_to_the_same_numbers(tmp_path: Path) -> None:
    """After a restart the caches are empty: visitors and their dictionary values (campaigns
    included) come back from the file, late views replay a visit read back, and the visits that
    go on are written as a process that never stopped writes them."""
    import random

    events = day_of_traffic(8, visitors=8, views=160)
    async with pipeline(tmp_path / "once") as pathways:
        await deliver_in_batches(pathways, events, 9)
    rest = events[80:]
    random.Random(8).shuffle(rest)  # late views too, of visitors known only from the file
    async with pipeline(tmp_path / "restarted") as pathways:
        await deliver_in_batches(pathways, events[:80], 9)
    for part in (rest[:40], rest[40:]):
        async with pipeline(tmp_path / "restarted", cache_size=3) as pathways:
            await deliver_in_batches(pathways, part, 9)
    assert rollups(tmp_path / "restarted") == rollups(tmp_path / "once")
    assert query(tmp_path / "restarted", ROWS) == query(tmp_path / "once", ROWS)


def views_alive() -> int:
    return sum(isinstance(thing, View) for thing in gc.get_objects())


async def test_what_the_cache_lets_go_is_freed_without_the_cycle_collector(tmp_path: Path) -> None:
    """The collector process scans old objects rarely (collector.settle_garbage_collector), so a
    view the visitor cache drops must be freed by reference counting alone, not left in a cycle.
    With the cycle collector off, the views alive at the end are the two cached visitors' visits
    only, however many visitors came and went."""
    events = day_of_traffic(6, visitors=40, views=200)
    gc.collect()
    gc.disable()
    try:
        async with pipeline(tmp_path / "small", cache_size=2) as pathways:
            before = views_alive()
            await deliver_in_batches(pathways, events, 10)
            after = views_alive()
    finally:
        gc.enable()
    assert after - before <= 2


async def test_a_batch_that_rolls_back_leaves_nothing_behind_in_memory(tmp_path: Path) -> None:
    """The handler counts a batch in memory, then the transaction fails after it: the retry one
    by one must count every view exactly once, as if the failed attempt never happened."""
    events = day_of_traffic(9, visitors=4, views=40)
    failures = iter([True])

    def fail_once_after(handler: Handler) -> Handler:
        def handle(conn: sqlite3.Connection, batch: Sequence[Event]) -> None:
            handler(conn, batch)
            if len(batch) > 1 and next(failures, False):
                raise RuntimeError("the transaction fails after the read model's work")

        return handle

    async with pipeline(tmp_path / "failing", wrap=fail_once_after) as pathways:
        await deliver_in_batches(pathways, events, 20)
    async with pipeline(tmp_path / "clean") as pathways:
        await deliver_in_batches(pathways, events, 20)
    assert next(failures, None) is None  # it did fail once
    assert rollups(tmp_path / "failing") == rollups(tmp_path / "clean")
    assert query(tmp_path / "failing", ROWS) == query(tmp_path / "clean", ROWS)
    assert query(tmp_path / "failing", "SELECT count(*), count(DISTINCT id) FROM pageviews") == [(40, 40)]


# -- page views first -------------------------------------------------------------------------------


async def test_page_view_commits_go_before_the_read_models_steps(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_FILENAME, ZoneInfo("UTC"))
    await store.open()
    try:
        release = threading.Event()
        held = asyncio.ensure_future(store.write(lambda conn: release.wait(10)))  # the writer is busy

        def step(conn: sqlite3.Connection) -> int:  # what a read model step would find committed
            return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

        steps = [asyncio.ensure_future(store.write(step)) for _ in range(2)]
        await asyncio.sleep(0)  # the steps queue up behind the held job, then the page views
        views = [asyncio.ensure_future(store.append_outbox("visitor.v0", "visitor.tracked.v0", "{}",
                                                           "2025-06-04T10:00:00.000Z")) for _ in range(3)]
        await asyncio.sleep(0)
        assert store.ingest_waiting()
        release.set()
        await asyncio.gather(held, *views)
        assert await asyncio.gather(*steps) == [3, 3]  # the page views were committed first, together
        assert (store.outbox_commits, store.outbox_appends) == (1, 3)
        assert not store.ingest_waiting()
    finally:
        await store.close()


def test_the_writer_alternates_so_urgent_jobs_never_starve_the_others() -> None:
    writer = _Writer()
    writer.start()
    order: list[str] = []
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    def record(name: str) -> Callable[[], None]:
        return lambda: order.append(name)

    try:
        writer.submit(hold)
        assert started.wait(10)  # the writer is busy with it: what follows queues up
        for name in ("u1", "u2", "u3"):
            writer.submit(record(name), urgent=True)
        for name in ("o1", "o2"):
            writer.submit(record(name))
        writer.submit(done.set)
        release.set()
        assert done.wait(10)
    finally:
        writer.stop()
    assert order == ["u1", "o1", "u2", "o2", "u3"]


def test_a_visitor_remembers_every_sighting_past_the_small_tuple() -> None:
    visitor = Visitor(1, "2025-06-04")
    sightings = [day << 40 | page for day in (20243, 20244) for page in range(20)]
    assert [visitor.sighted(s) for s in sightings] == [True] * 40
    assert isinstance(visitor.seen, set)
    assert not any(visitor.sighted(s) for s in sightings)


def imported_modules(module: str) -> set[str]:
    import ast

    tree = ast.parse((Path(__file__).resolve().parent.parent / f"{module}.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_the_store_knows_neither_the_router_nor_the_read_model_and_ingestion_never_imports_reporting() -> None:
    assert not imported_modules("store") & {"pathways", "readmodel", "stats"}
    assert not imported_modules("pathways") & {"readmodel", "stats"}
