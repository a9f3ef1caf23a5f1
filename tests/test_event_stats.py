"""Custom events in the read model and the statistics, on real SQLite files and over real HTTP:
counts and unique visitors per name and day, worked out by hand; the property values; the
bounds on names and values under a flood; an event and its visitor's page views linked by one
visitor number; exact whatever the batches, the order of arrival or a forgetful cache; a rolled
back batch leaves nothing behind; retention of the raw rows; rebuild reproduces every table;
/api/stats `events` and `event`, /api/export's event tables.

The hand-worked fixture (UTC; now is 2025-06-10 18:00). Visitors are anonymous per UTC day.

  06-09  alice  10:00 page view /; 10:01 Signup {plan: pro, seats: 3}; 10:02 Signup {plan: pro}
         bob    11:00 Signup {plan: free, annual: true} (before any page view); 11:05 page view /pricing
  06-10  alice  09:00 Signup {plan: pro} (a new salt day: a new visitor, and no page view)
         carol  09:30 page view /; 09:31 and 09:32 Outbound Link: Click {url: https://elsewhere.example/}
         dave   10:00 page view /docs; 10:01 File Download {url: https://example.com/a.pdf}
         kim    10:00 Signup on other.org

7d (06-04..06-10) on example.com: visitors 2 + 2 = 4 (summed over days; alice's event-only day
adds none). Signup: 4 events, visitors 2 (06-09) + 1 (06-10) = 3, 75.0 %; Outbound Link: Click:
2 events, 1 visitor, 25.0 %; File Download: 1, 1, 25.0 %. Signup's properties: plan 4 (pro 3,
free 1), annual 1 (true 1), seats 1 (3 1)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import Start
from helpers import SECRET, FakeClock, drained, query, utc

import collector
from eventmodel import OTHER, EventLimits
from maintenance import apply_retention, rebuild
from pathways import VISITOR_EVENT, VISITOR_TRACKED, Event, Pathways, time_uuid
from readmodel import ReadModel
from store import DB_FILENAME, Store

NOW = utc(2025, 6, 10, 18)
EVENT_TABLES = ("event_stats", "event_prop_stats")
PAGE_VIEW_TABLES = ("daily_stats", "hourly_stats", "page_stats", "source_stats")


def who_hash(who: str, at: datetime) -> str:
    return hashlib.sha256(f"{who}:{at.date().isoformat()}".encode()).hexdigest()


def view(at: datetime, who: str, path: str = "/", domain: str = "example.com") -> Event:
    payload = {"visitorHash": who_hash(who, at), "domain": domain, "pathname": path, "referrer": "",
               "sessionContext": {"dailySaltRotation": at.date().isoformat()}}
    return Event(time_uuid(), "visitor.v0", "visitor.tracked.v0", at, payload)


def event(at: datetime, who: str, name: str, props: dict[str, Any] | None = None, path: str = "/",
          domain: str = "example.com") -> Event:
    payload: dict[str, Any] = {
        "visitorHash": who_hash(who, at), "domain": domain, "pathname": path, "referrer": "", "name": name,
        "props": props or {}, "sessionContext": {"dailySaltRotation": at.date().isoformat()}}
    # Any field the contract adds (the page view dimensions of issue 13, null when unknown) as unknown.
    payload.update((key, None) for key in VISITOR_EVENT.schema.fields if key not in payload)
    VISITOR_EVENT.validate(payload)
    return Event(time_uuid(), "visitor.v0", "visitor.event.v0", at, payload)


OUT = {"url": "https://elsewhere.example/"}
FIXTURE = [
    view(utc(2025, 6, 9, 10), "alice"),
    event(utc(2025, 6, 9, 10, 1), "alice", "Signup", {"plan": "pro", "seats": 3}),
    event(utc(2025, 6, 9, 10, 2), "alice", "Signup", {"plan": "pro"}),
    event(utc(2025, 6, 9, 11), "bob", "Signup", {"plan": "free", "annual": True}, path="/pricing"),
    view(utc(2025, 6, 9, 11, 5), "bob", "/pricing"),
    event(utc(2025, 6, 10, 9), "alice", "Signup", {"plan": "pro"}),
    view(utc(2025, 6, 10, 9, 30), "carol"),
    event(utc(2025, 6, 10, 9, 31), "carol", "Outbound Link: Click", OUT),
    event(utc(2025, 6, 10, 9, 32), "carol", "Outbound Link: Click", OUT),
    view(utc(2025, 6, 10, 10), "dave", "/docs"),
    event(utc(2025, 6, 10, 10, 1), "dave", "File Download", {"url": "https://example.com/a.pdf"}, path="/docs"),
    event(utc(2025, 6, 10, 10), "kim", "Signup", domain="other.org"),
]


Handler = Callable[[sqlite3.Connection, Sequence[Event]], None]


@asynccontextmanager
async def pipeline(path: Path, *, cache_size: int = 1000, limits: EventLimits | None = None,
                   wrap: Callable[[Handler], Handler] | None = None) -> AsyncIterator[Pathways]:
    """The router with both handlers, as the collector wires them, on a real SQLite file."""
    store = Store(path / DB_FILENAME, ZoneInfo("UTC"))
    model = ReadModel(store, cache_size=cache_size, event_limits=limits)
    await store.open()
    pathways = Pathways(store, retry_delay=0.001)
    pathways.register(VISITOR_TRACKED)
    pathways.handle(VISITOR_TRACKED, model.record_pageviews)
    pathways.register(VISITOR_EVENT)
    pathways.handle(VISITOR_EVENT, wrap(model.events.record) if wrap else model.events.record)
    try:
        yield pathways
    finally:
        await store.close()


async def deliver(path: Path, events: list[Event], size: int = 500, **options: Any) -> None:
    async with pipeline(path, **options) as pathways:
        for start in range(0, len(events), size):
            await pathways.deliver(events[start : start + size])


def tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    return {table: query(path, f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4") for table in EVENT_TABLES}


def by_visitor(path: Path) -> set[frozenset[tuple[Any, ...]]]:
    """The raw rows of events and page views, grouped by the visitor number they carry (the
    numbers themselves depend on the order of processing; who is grouped with whom must not)."""
    rows = query(path, "SELECT visitor, 'event', domain, day, name, ts_ms, pathname FROM custom_events "
                       "UNION ALL SELECT visitor, 'view', domain, day, '', ts_ms, pathname FROM pageviews")
    groups: dict[int, set[tuple[Any, ...]]] = {}
    for visitor, *row in rows:
        groups.setdefault(visitor, set()).add(tuple(row))
    return {frozenset(group) for group in groups.values()}


# -- the read model ------------------------------------------------------------------------------------


async def test_counts_visitors_and_properties_per_name_and_day(tmp_path: Path) -> None:
    await deliver(tmp_path, FIXTURE)
    assert query(tmp_path, "SELECT * FROM event_stats ORDER BY domain, day, name") == [
        ("example.com", "2025-06-09", "Signup", 3, 2),
        ("example.com", "2025-06-10", "File Download", 1, 1),
        ("example.com", "2025-06-10", "Outbound Link: Click", 2, 1),
        ("example.com", "2025-06-10", "Signup", 1, 1),
        ("other.org", "2025-06-10", "Signup", 1, 1),
    ]
    assert query(tmp_path, "SELECT * FROM event_prop_stats ORDER BY domain, day, name, prop, value") == [
        ("example.com", "2025-06-09", "Signup", "annual", "true", 1),
        ("example.com", "2025-06-09", "Signup", "plan", "free", 1),
        ("example.com", "2025-06-09", "Signup", "plan", "pro", 2),
        ("example.com", "2025-06-09", "Signup", "seats", "3", 1),
        ("example.com", "2025-06-10", "File Download", "url", "https://example.com/a.pdf", 1),
        ("example.com", "2025-06-10", "Outbound Link: Click", "url", "https://elsewhere.example/", 2),
        ("example.com", "2025-06-10", "Signup", "plan", "pro", 1),
    ]
    # One raw row per event, where it happened, with the number its visitor's page views carry:
    # bob's event came before his page view, and still shares its number.
    assert query(tmp_path, "SELECT count(*) FROM custom_events") == [(len(FIXTURE) - 4,)]
    linked = ("SELECT e.name, e.pathname, v.pathname FROM custom_events e JOIN pageviews v "
              "ON v.visitor = e.visitor AND v.day = e.day ORDER BY e.ts_ms")
    assert query(tmp_path, linked) == [
        ("Signup", "/", "/"), ("Signup", "/", "/"), ("Signup", "/pricing", "/pricing"),
        ("Outbound Link: Click", "/", "/"), ("Outbound Link: Click", "/", "/"), ("File Download", "/docs", "/docs"),
    ]
    # alice on 06-10 and kim did no page view: visitors of their own, linked from their hashes.
    assert query(tmp_path, "SELECT count(*) FROM visitors") == [(6,)]
    # The page views are counted as before: bob's event did not make his page view a second visit.
    assert query(tmp_path, "SELECT day, pageviews, visitors, visits FROM daily_stats ORDER BY day") == [
        ("2025-06-09", 2, 2, 2), ("2025-06-10", 2, 2, 2)]


def traffic(seed: int, visitors: int = 15, count: int = 300) -> list[Event]:
    """Page views and events of several visitors over two days, names and values repeating."""
    rng = random.Random(seed)
    start = utc(2025, 6, 9, 20)
    made = []
    for _ in range(count):
        at = start + timedelta(minutes=rng.randrange(8 * 60))  # across the UTC midnight
        who = f"v{rng.randrange(visitors)}"
        if rng.random() < 0.4:
            made.append(view(at, who, rng.choice(["/", "/a", "/b"])))
        else:
            keys = rng.sample(["plan", "size", "ok"], rng.randrange(3))
            props = {key: rng.choice(["x", "y", 1, True]) for key in keys}
            made.append(event(at, who, rng.choice(["Signup", "Buy", "404"]), props, rng.choice(["/", "/a"])))
    return sorted(made, key=lambda e: e.valid_time)


async def test_the_same_numbers_whatever_the_batches_the_order_or_the_cache(tmp_path: Path) -> None:
    events = traffic(7)
    await deliver(tmp_path / "once", events)
    expected, grouped = tables(tmp_path / "once"), by_visitor(tmp_path / "once")
    assert sum(row[3] for row in expected["event_stats"]) == sum(e.event_type == "visitor.event.v0" for e in events)
    await deliver(tmp_path / "ones", events, size=1, cache_size=1)
    shuffled = list(events)
    random.Random(7).shuffle(shuffled)
    await deliver(tmp_path / "shuffled", shuffled, size=9, cache_size=2)
    for name in ("ones", "shuffled"):
        assert tables(tmp_path / name) == expected, name
        assert by_visitor(tmp_path / name) == grouped, name
    # Unique visitors per name and day are the distinct hashes, counted independently here.
    distinct: dict[tuple[str, str], set[str]] = {}
    for e in events:
        if e.event_type == "visitor.event.v0":
            distinct.setdefault((e.valid_time.date().isoformat(), e.payload["name"]), set()).add(
                e.payload["visitorHash"])
    assert {(row[1], row[2]): row[4] for row in expected["event_stats"]} == {
        key: len(hashes) for key, hashes in distinct.items()}


async def test_a_batch_that_rolls_back_leaves_nothing_behind(tmp_path: Path) -> None:
    events = traffic(11, count=80)
    failures = iter([True])

    def fail_once_after(handler: Handler) -> Handler:
        def handle(conn: sqlite3.Connection, batch: Sequence[Event]) -> None:
            handler(conn, batch)
            if len(batch) > 1 and next(failures, False):
                raise RuntimeError("the transaction fails after the events' work")

        return handle

    await deliver(tmp_path / "failing", events, size=20, wrap=fail_once_after)
    await deliver(tmp_path / "clean", events, size=20)
    assert next(failures, None) is None  # it did fail once
    assert tables(tmp_path / "failing") == tables(tmp_path / "clean")
    assert by_visitor(tmp_path / "failing") == by_visitor(tmp_path / "clean")
    ids = "SELECT count(*), count(DISTINCT id) FROM (SELECT id FROM custom_events UNION ALL SELECT id FROM pageviews)"
    assert query(tmp_path / "failing", ids) == [(80, 80)]


async def test_names_and_values_beyond_the_bounds_count_under_other(tmp_path: Path) -> None:
    at = utc(2025, 6, 10, 9)
    # (name, props) -> what they count under, with 2 names and 3 property rows a day
    steps: list[tuple[str, dict[str, Any]]] = [
        ("A", {"k": 1}),  # A; (A, k, 1): 1 row
        ("B", {"k": 1}),  # B; (B, k, 1): 2 rows
        ("C", {"k": 9}),  # a third name: (other), and no properties
        ("A", {"k": 2}),  # (A, k, 2): 3 rows, the bound
        ("A", {"k": 3}),  # a new value of a property with rows: (A, k, (other))
        ("A", {"j": "x"}),  # a property with no row yet: (A, (other), (other))
        ("B", {"k": 1}),  # a known row still counts under itself
        ("D", {}),  # (other)
        ("A", {"k": 4, "j": "y"}),
    ]
    events = [event(at + timedelta(seconds=n), f"v{n % 3}", name, props) for n, (name, props) in enumerate(steps)]
    await deliver(tmp_path, events, size=1, limits=EventLimits(names_per_day=2, property_values_per_day=3))
    assert query(tmp_path, "SELECT name, events, visitors FROM event_stats ORDER BY name") == [
        (OTHER, 2, 2), ("A", 5, 3), ("B", 2, 2)]
    assert query(tmp_path, "SELECT name, prop, value, events FROM event_prop_stats ORDER BY 1, 2, 3") == [
        ("A", OTHER, OTHER, 2), ("A", "k", OTHER, 2), ("A", "k", "1", 1), ("A", "k", "2", 1), ("B", "k", "1", 2)]
    # The raw rows keep the name as counted, so (other) has its visitors too.
    assert query(tmp_path, "SELECT name, count(*) FROM custom_events GROUP BY 1 ORDER BY 1") == [
        (OTHER, 2), ("A", 5), ("B", 2)]


async def test_a_known_row_is_found_whatever_characters_it_holds(tmp_path: Path) -> None:
    """At the bound, known names and rows are looked up exactly: a NUL character (which SQLite's
    JSON functions cut strings at) or any other character does not make them look new."""
    at = utc(2025, 6, 10, 9)
    odd = ["a\x00b", "ü \"' ,\n🎉", "(other) "]
    events = [event(at + timedelta(seconds=n), "v", text, {text: text}) for n in range(2) for text in odd]
    await deliver(tmp_path, events, size=1, limits=EventLimits(names_per_day=3, property_values_per_day=3))
    assert sorted(query(tmp_path, "SELECT name, events FROM event_stats")) == sorted((text, 2) for text in odd)
    assert sorted(query(tmp_path, "SELECT name, prop, value, events FROM event_prop_stats")) == sorted(
        (text, text, text, 2) for text in odd)


async def test_a_flood_of_names_and_properties_stays_within_the_bounds(tmp_path: Path) -> None:
    limits = EventLimits(names_per_day=5, property_values_per_day=40)
    rng = random.Random(3)
    at = utc(2025, 6, 10, 9)
    flood = [event(at + timedelta(milliseconds=n), f"v{n % 50}", f"name {rng.randrange(10**9)}",
                   {f"key {rng.randrange(10**9)}": f"value {rng.randrange(10**9)}" for _ in range(30)})
             for n in range(400)]
    await deliver(tmp_path, flood, size=97, limits=limits)
    names = query(tmp_path, "SELECT name, events FROM event_stats")
    assert len(names) == limits.names_per_day + 1 and sum(count for _, count in names) == 400
    rows = query(tmp_path, "SELECT count(*), sum(events) FROM event_prop_stats")[0]
    bound = 2 * limits.property_values_per_day + limits.names_per_day + 1
    assert rows[0] <= bound
    counted = dict(names)
    assert rows[1] == 30 * (400 - counted[OTHER])  # every property of an event counted under a name
    assert query(tmp_path, "SELECT count(*) FROM dims WHERE kind = 'event'") == [(limits.names_per_day + 1,)]


# -- retention and rebuild -----------------------------------------------------------------------------


async def test_retention_deletes_old_raw_event_rows_and_keeps_the_rollups(tmp_path: Path) -> None:
    await deliver(tmp_path, FIXTURE)
    before = tables(tmp_path)
    store = Store(tmp_path / DB_FILENAME, ZoneInfo("UTC"))
    read_model = ReadModel(store)
    await store.open()
    try:
        result = await apply_retention(store, read_model, NOW.date(), 0, NOW)  # keep today only
    finally:
        await store.close()
    assert result.event_rows_deleted == 3  # the three events of 06-09
    assert {row[0] for row in query(tmp_path, "SELECT day FROM custom_events")} == {"2025-06-10"}
    assert tables(tmp_path) == before


TZ = "America/New_York"
BODY = {"Content-Type": "text/plain"}
# (UTC time, address, kind, name or path, props); local (EDT) days 06-08 and 06-09.
SENT: list[tuple[datetime, str, str, str, dict[str, Any]]] = [
    (utc(2025, 6, 8, 13), "198.51.100.1", "view", "/", {}),
    (utc(2025, 6, 8, 13, 1), "198.51.100.1", "event", "Signup", {"plan": "pro"}),
    (utc(2025, 6, 8, 13, 2), "198.51.100.2", "event", "Signup", {"plan": "free"}),
    (utc(2025, 6, 8, 13, 3), "198.51.100.2", "view", "/pricing", {}),
    (utc(2025, 6, 8, 13, 4), "198.51.100.3", "event", "Buy", {"plan": "pro", "seats": 2}),
    (utc(2025, 6, 8, 13, 5), "198.51.100.3", "event", "Third", {"x": 1}),  # beyond 2 names: (other)
    (utc(2025, 6, 8, 13, 6), "198.51.100.1", "event", "Signup", {"plan": "team"}),  # beyond 3 values
    (utc(2025, 6, 8, 13, 7), "198.51.100.1", "event", "Signup", {"coupon": "x"}),  # a new property, beyond
    (utc(2025, 6, 9, 3, 30), "198.51.100.4", "event", "Signup", {"plan": "pro"}),  # 23:30 on the local 8th
    (utc(2025, 6, 9, 14), "198.51.100.1", "view", "/", {}),
    (utc(2025, 6, 9, 14, 1), "198.51.100.1", "event", "Signup", {"plan": "pro"}),
    (utc(2025, 6, 9, 14, 2), "198.51.100.5", "event", "Outbound Link: Click", {"url": "https://a.example/"}),
]
LIMITS = {"EVENT_NAMES_PER_DAY": "2", "EVENT_PROPERTY_VALUES_PER_DAY": "3"}


async def send(start_collector: Start, clock: FakeClock) -> None:
    client = await start_collector(clock=clock, TIMEZONE=TZ, RATE_LIMIT_PER_SECOND="0", **LIMITS)
    for at, address, kind, name, props in SENT:
        clock.now = at
        body = ({"pathname": name, "referrer": "", "domain": "example.com"} if kind == "view" else
                {"name": name, "pathname": "/", "domain": "example.com", "props": props})
        response = await client.post(f"/api/{'pageview' if kind == 'view' else 'event'}", data=json.dumps(body),
                                      headers={**BODY, "X-Forwarded-For": address})
        assert response.status == 204, await response.text()
    await drained(client)
    await client.close()


def everything(data_dir: Path) -> dict[str, Any]:
    snapshot: dict[str, Any] = tables(data_dir)
    for table in PAGE_VIEW_TABLES:
        snapshot[table] = query(data_dir, f"SELECT * FROM {table} ORDER BY 1, 2, 3")
    snapshot["grouped"] = by_visitor(data_dir)
    snapshot["visitors"] = query(data_dir, "SELECT visitor_key, salt_day FROM visitors ORDER BY 1")
    return snapshot


async def test_rebuild_reproduces_the_event_tables_exactly(start_collector: Start, data_dir: Path) -> None:
    clock = FakeClock(SENT[0][0])
    await send(start_collector, clock)
    live = everything(data_dir)
    assert (OTHER, 1, 1) in [row[2:] for row in live["event_stats"]]  # the bounds were reached
    assert ("example.com", "2025-06-08", "Signup", OTHER, OTHER, 1) in live["event_prop_stats"]
    with sqlite3.connect(data_dir / DB_FILENAME) as conn:  # spoil them, as a bug in a handler might
        conn.execute("UPDATE event_stats SET events = 99")
        conn.execute("DELETE FROM event_prop_stats WHERE value = 'pro'")
        conn.execute("DELETE FROM event_rows WHERE id IN (SELECT id FROM event_rows LIMIT 2)")
    conn.close()

    summary = await rebuild(data_dir, ZoneInfo(TZ), clock.now, event_limits=EventLimits(2, 3))
    assert (summary.from_day, summary.replayed, summary.skipped) == ("2025-06-08", len(SENT), 0)
    assert everything(data_dir) == live

    # The command reads the bounds from the settings, as the running collector does.
    env = {"DATA_DIR": str(data_dir), "SECRET_KEY": SECRET, "TIMEZONE": TZ, **LIMITS}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert await asyncio.to_thread(collector.main, ["rebuild"]) == 0
    again = everything(data_dir)
    assert again.pop("visitors") == []  # forgotten now: the command's today is long after 06-09
    assert again == {name: value for name, value in live.items() if name != "visitors"}


# -- the statistics API ----------------------------------------------------------------------------------


@pytest.fixture
async def client(start_collector: Start, data_dir: Path) -> Any:
    await deliver(data_dir, FIXTURE)
    return await start_collector(clock=FakeClock(NOW))


async def get_stats(client: Any, **params: str) -> dict[str, Any]:
    response = await client.get("/api/stats", params={"domain": "example.com", "period": "7d", **params})
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_stats_list_each_event_with_visitors_and_conversion_rate(client: Any) -> None:
    body = await get_stats(client)
    assert body["totals"]["visitors"]["value"] == 4
    assert body["events"] == [
        {"name": "Signup", "count": 4, "visitors": 3, "conversion_rate": 75.0},
        {"name": "Outbound Link: Click", "count": 2, "visitors": 1, "conversion_rate": 25.0},
        {"name": "File Download", "count": 1, "visitors": 1, "conversion_rate": 25.0},
    ]
    assert "event" not in body
    assert (await get_stats(client, limit="1"))["events"] == body["events"][:1]
    today = await get_stats(client, period="today")
    assert [(e["name"], e["count"], e["visitors"], e["conversion_rate"]) for e in today["events"]] == [
        ("Outbound Link: Click", 2, 1, 50.0), ("File Download", 1, 1, 50.0), ("Signup", 1, 1, 50.0)]
    other = await client.get("/api/stats", params={"domain": "other.org"})
    assert (await other.json())["events"] == [  # events, and no page view: no rate
        {"name": "Signup", "count": 1, "visitors": 1, "conversion_rate": None}]


async def test_stats_break_one_event_down_by_its_properties(client: Any) -> None:
    body = await get_stats(client, event="Signup")
    assert body["event"] == {
        "name": "Signup", "count": 4, "visitors": 3, "conversion_rate": 75.0,
        "properties": [
            {"name": "plan", "count": 4, "values": [{"value": "pro", "count": 3}, {"value": "free", "count": 1}]},
            {"name": "annual", "count": 1, "values": [{"value": "true", "count": 1}]},
            {"name": "seats", "count": 1, "values": [{"value": "3", "count": 1}]},
        ],
    }
    assert (await get_stats(client, event="Signup", limit="1"))["event"]["properties"][0]["values"] == [
        {"value": "pro", "count": 3}]
    assert (await get_stats(client, event="Never"))["event"] == {
        "name": "Never", "count": 0, "visitors": 0, "conversion_rate": 0.0, "properties": []}
    response = await client.get("/api/stats", params={"domain": "example.com", "event": ""})
    assert response.status == 400
    assert (await response.json())["error"] == "event must be an event name of 1 to 120 characters"


async def test_export_has_the_event_tables(client: Any) -> None:
    params = {"domain": "example.com", "from": "2025-06-09", "to": "2025-06-10"}
    response = await client.get("/api/export", params={**params, "table": "events"})
    assert response.status == 200
    assert response.headers["Content-Disposition"] == (
        'attachment; filename="example.com-events-2025-06-09-2025-06-10.csv"')
    assert (await response.text()).splitlines() == [
        "date,name,events,visitors", "2025-06-09,Signup,3,2", "2025-06-10,Outbound Link: Click,2,1",
        "2025-06-10,File Download,1,1", "2025-06-10,Signup,1,1"]
    response = await client.get("/api/export", params={**params, "table": "event_properties"})
    assert (await response.text()).splitlines() == [
        "date,name,property,value,events", "2025-06-09,Signup,annual,true,1", "2025-06-09,Signup,plan,pro,2",
        "2025-06-09,Signup,plan,free,1", "2025-06-09,Signup,seats,3,1",
        "2025-06-10,File Download,url,https://example.com/a.pdf,1",
        "2025-06-10,Outbound Link: Click,url,https://elsewhere.example/,2", "2025-06-10,Signup,plan,pro,1"]
