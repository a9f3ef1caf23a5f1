"""The router and the read model, driven with hand-made events on a real SQLite file:
de-duplication, dead letters, visits, bounces, durations, time zones and forgetting hashes."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import query, utc

from pathways import (
    VISITOR_TRACKED,
    ContractError,
    EnvelopeError,
    Event,
    Outcome,
    Pathways,
    UnknownPathwayError,
    parse_envelope,
    time_uuid,
)
from readmodel import ReadModel, referrer_source
from store import DB_FILENAME, Store

READ_MODEL = ("daily_stats", "hourly_stats", "page_stats", "source_stats")


def visitor(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def pageview(
    at: datetime, who: str = "alice", path: str = "/", referrer: str = "", domain: str = "example.com"
) -> Event:
    payload = {
        "visitorHash": visitor(who),
        "domain": domain,
        "pathname": path,
        "referrer": referrer,
        "sessionContext": {"dailySaltRotation": at.date().isoformat()},
    }
    return Event(time_uuid(), "visitor.v0", "visitor.tracked.v0", at, payload)


OpenPipeline = Callable[..., Awaitable[Pathways]]


@pytest.fixture
async def open_pipeline(tmp_path: Path) -> AsyncIterator[OpenPipeline]:
    """Factory: a store, its read model and a router on a fresh file; every one opened is closed
    afterwards. `handler`, if given, makes the handler from the read model."""
    opened: list[Store] = []

    async def open_one(tz: str = "UTC", handler: Any = None, name: str = "a", **options: Any) -> Pathways:
        store = Store(tmp_path / name / DB_FILENAME, ZoneInfo(tz))
        read_model = ReadModel(store)
        await store.open()
        opened.append(store)
        pathways = Pathways(store, **options)
        pathways.register(VISITOR_TRACKED)
        pathways.handle(VISITOR_TRACKED, handler(read_model) if handler else read_model.record_pageviews)
        return pathways

    yield open_one
    for store in opened:
        await store.close()


def read_model(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    return {table: query(path, f"SELECT * FROM {table} ORDER BY 1, 2, 3") for table in READ_MODEL}


def day_row(path: Path, day: str, domain: str = "example.com") -> tuple[Any, ...]:
    [row] = query(path, "SELECT pageviews, visitors, visits, bounces, duration_ms FROM daily_stats "
                        "WHERE domain = ? AND day = ?", (domain, day))
    return row


async def test_visits_split_after_a_30_minute_gap_with_bounces_and_durations(
    open_pipeline: OpenPipeline, tmp_path: Path
) -> None:
    pathways = await open_pipeline()
    at = utc(2025, 6, 4, 10)
    events = [
        pageview(at, "alice", "/"),
        pageview(at + timedelta(minutes=5), "bob", "/pricing"),
        pageview(at + timedelta(minutes=10), "alice", "/blog"),
        pageview(at + timedelta(minutes=40), "alice", "/blog"),  # exactly 30 min later: the same visit
        pageview(at + timedelta(minutes=71), "alice", "/"),  # 31 min later: a new visit, a bounce
    ]
    await pathways.deliver(events)
    # alice: visit 1 = 10:00, 10:10, 10:40 (40 min); visit 2 = 11:11 (bounce). bob: one view (bounce).
    assert day_row(tmp_path / "a", "2025-06-04") == (5, 2, 3, 2, 40 * 60_000)
    assert query(tmp_path / "a", "SELECT pathname, pageviews, visitors FROM page_stats ORDER BY pathname") == [
        ("/", 2, 1), ("/blog", 2, 1), ("/pricing", 1, 1)
    ]
    assert query(tmp_path / "a", "SELECT hour, pageviews, visitors FROM hourly_stats ORDER BY hour") == [
        ("2025-06-04T10", 4, 2), ("2025-06-04T11", 1, 1)
    ]


async def test_events_out_of_order_give_the_same_read_model(open_pipeline: OpenPipeline, tmp_path: Path) -> None:
    at = utc(2025, 6, 4, 9, 50)
    rng = random.Random(7)
    events = []
    for who in ("alice", "bob", "carol", "dave"):
        moment = at
        for _ in range(rng.randint(1, 8)):
            moment += timedelta(minutes=rng.choice([1, 7, 29, 30, 31, 45, 200]))
            events.append(pageview(moment, who, rng.choice(["/", "/a", "/b"]),
                                   rng.choice(["", "https://news.example/x", "https://www.example.com/"])))
    in_order = await open_pipeline(name="in-order")
    await in_order.deliver(sorted(events, key=lambda e: e.valid_time))
    shuffled = await open_pipeline(name="shuffled")
    mixed = list(events)
    rng.shuffle(mixed)
    for event in mixed[:5]:
        assert await shuffled.process(event) is Outcome.PROCESSED
    await shuffled.deliver(mixed[5:])
    assert read_model(tmp_path / "shuffled") == read_model(tmp_path / "in-order")


async def test_the_same_event_twice_changes_the_counts_once(open_pipeline: OpenPipeline, tmp_path: Path) -> None:
    pathways = await open_pipeline()
    event = pageview(utc(2025, 6, 4, 10))
    assert await pathways.process(event) is Outcome.PROCESSED
    assert await pathways.process(event) is Outcome.DUPLICATE
    await pathways.deliver([event, pageview(utc(2025, 6, 4, 10, 1), "bob")])
    assert day_row(tmp_path / "a", "2025-06-04") == (2, 2, 2, 2, 0)
    repeated = pageview(utc(2025, 6, 4, 10, 2), "carol")
    await pathways.deliver([repeated, repeated])
    assert day_row(tmp_path / "a", "2025-06-04") == (3, 3, 3, 3, 0)
    assert query(tmp_path / "a", "SELECT count(*) FROM pageviews") == [(3,)]


async def test_a_handler_that_keeps_failing_ends_in_the_dead_letters_and_later_events_flow(
    open_pipeline: OpenPipeline, tmp_path: Path
) -> None:
    def fails_on_boom(read_model: ReadModel) -> Callable[[sqlite3.Connection, Sequence[Event]], None]:
        def handle(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
            if any(e.payload["pathname"] == "/boom" for e in events):
                raise RuntimeError("the handler cannot take /boom")
            read_model.record_pageviews(conn, events)

        return handle

    pathways = await open_pipeline(handler=fails_on_boom, max_attempts=3, retry_delay=0.001)
    at = utc(2025, 6, 4, 10)
    bad = pageview(at + timedelta(minutes=1), "bob", "/boom")
    await pathways.deliver([pageview(at), bad, pageview(at + timedelta(minutes=2), "carol")])

    [(event_id, pathway, envelope, error, attempts)] = query(
        tmp_path / "a", "SELECT event_id, pathway, envelope, error, attempts FROM dead_letters"
    )
    assert (event_id, pathway, attempts) == (bad.event_id, "visitor.v0/visitor.tracked.v0", 3)
    assert "the handler cannot take /boom" in error
    assert json.loads(envelope)["payload"]["pathname"] == "/boom"
    assert day_row(tmp_path / "a", "2025-06-04")[0] == 2
    # a redelivery of the dead letter is acknowledged and changes nothing
    assert await pathways.process(bad) is Outcome.DUPLICATE
    later = pageview(at + timedelta(minutes=3), "dave")
    await pathways.deliver([later])
    assert day_row(tmp_path / "a", "2025-06-04")[0] == 3


async def test_a_dead_letter_of_local_delivery_is_counted_once_when_retried_after_a_fix(
    open_pipeline: OpenPipeline, tmp_path: Path
) -> None:
    broken = [True]

    def fails_until_fixed(model: ReadModel) -> Callable[[sqlite3.Connection, Sequence[Event]], None]:
        def handler(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
            if broken[0] and any(e.payload["pathname"] == "/boom" for e in events):
                raise RuntimeError("the handler cannot take /boom")
            model.record_pageviews(conn, events)

        return handler

    pathways = await open_pipeline(handler=fails_until_fixed, max_attempts=2, retry_delay=0.001)
    at = utc(2025, 6, 4, 10)
    await pathways.deliver([pageview(at), pageview(at + timedelta(minutes=1), "bob", "/boom")])
    [letter] = await pathways.store.dead_letters()
    assert "cannot take /boom" in (await pathways.retry_dead_letter(letter) or "")  # still broken: it stays
    [letter] = await pathways.store.dead_letters()
    assert letter.attempts == 3
    broken[0] = False
    assert await pathways.retry_dead_letter(letter) is None
    assert await pathways.store.dead_letters() == []
    assert day_row(tmp_path / "a", "2025-06-04")[0] == 2
    assert query(tmp_path / "a", "SELECT count(*) FROM pathway_state") == [(2,)]


async def test_process_reports_failures_until_the_event_is_dead_lettered(
    open_pipeline: OpenPipeline, tmp_path: Path
) -> None:
    def always_fails(conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('half-done', 'x')")
        raise RuntimeError("down")

    pathways = await open_pipeline(handler=lambda read_model: always_fails, max_attempts=2)
    event = pageview(utc(2025, 6, 4, 10))
    assert await pathways.process(event) is Outcome.FAILED
    assert query(tmp_path / "a", "SELECT count(*) FROM pathway_state") == [(0,)]
    assert query(tmp_path / "a", "SELECT count(*) FROM meta WHERE key = 'half-done'") == [(0,)]  # rolled back
    assert await pathways.process(event) is Outcome.DEAD_LETTERED
    assert await pathways.process(event) is Outcome.DUPLICATE


async def test_a_payload_that_breaks_the_contract_is_refused(open_pipeline: OpenPipeline) -> None:
    pathways = await open_pipeline()
    event = pageview(utc(2025, 6, 4, 10))
    for broken in (
        {**event.payload, "extra": 1},
        {**event.payload, "visitorHash": "z" * 64},
        {**event.payload, "sessionContext": {}},
        {k: v for k, v in event.payload.items() if k != "referrer"},
    ):
        with pytest.raises(ContractError):
            await pathways.process(Event(event.event_id, event.flow_type, event.event_type, event.valid_time, broken))
    with pytest.raises(UnknownPathwayError):
        await pathways.process(Event("id", "visitor.v0", "visitor.left.v0", event.valid_time, event.payload))


def test_envelopes_with_flow_type_or_legacy_aggregator() -> None:
    base = {"eventId": "e1", "eventType": "visitor.tracked.v0", "payload": {}, "validTime": "2025-06-04T10:15:30.123Z"}
    assert parse_envelope({**base, "flowType": "visitor.v0"}).flow_type == "visitor.v0"
    assert parse_envelope({**base, "aggregator": "visitor.v0", "flowType": "other"}).flow_type == "visitor.v0"
    for broken, message in (
        ({**base}, "flowType"),
        ({**base, "flowType": "visitor.v0", "eventId": ""}, "eventId"),
        ({**base, "flowType": "visitor.v0", "payload": []}, "payload"),
        ({**base, "flowType": "visitor.v0", "validTime": "yesterday"}, "validTime"),
        ({**base, "flowType": "visitor.v0", "validTime": "2025-06-04T10:15:30"}, "validTime"),
    ):
        with pytest.raises(EnvelopeError, match=message):
            parse_envelope(broken)
    with pytest.raises(EnvelopeError):
        parse_envelope([base])


async def test_days_and_hours_follow_a_non_utc_time_zone(open_pipeline: OpenPipeline, tmp_path: Path) -> None:
    pathways = await open_pipeline(tz="America/New_York")  # UTC-5 in January
    await pathways.deliver([
        pageview(utc(2025, 1, 15, 4, 50), "alice", "/late"),  # 23:50 on the 14th, local
        pageview(utc(2025, 1, 15, 5, 10), "alice", "/early"),  # 00:10 on the 15th: the same visit
        pageview(utc(2025, 1, 15, 7, 0), "alice", "/"),  # 02:00 on the 15th: a new visit
    ])
    path = tmp_path / "a"
    # The visit that crosses midnight belongs to the day it started, with its whole duration.
    assert day_row(path, "2025-01-14") == (1, 1, 1, 0, 20 * 60_000)
    assert day_row(path, "2025-01-15") == (2, 1, 1, 1, 0)
    assert query(path, "SELECT hour FROM hourly_stats ORDER BY hour") == [
        ("2025-01-14T23",), ("2025-01-15T00",), ("2025-01-15T02",)
    ]


async def test_half_hour_offsets_split_days_on_the_local_minute(open_pipeline: OpenPipeline, tmp_path: Path) -> None:
    pathways = await open_pipeline(tz="Asia/Kolkata")  # UTC+5:30
    await pathways.deliver([pageview(utc(2025, 6, 4, 18, 29), "a"), pageview(utc(2025, 6, 4, 18, 31), "b")])
    assert query(tmp_path / "a", "SELECT day, pageviews FROM daily_stats ORDER BY day") == [
        ("2025-06-04", 1), ("2025-06-05", 1)
    ]


async def test_visitor_hashes_are_forgotten_after_the_next_utc_day_and_aggregates_stay(tmp_path: Path) -> None:
    store = Store(tmp_path / DB_FILENAME, ZoneInfo("UTC"))
    model = ReadModel(store)
    await store.open()
    pathways = Pathways(store)
    pathways.register(VISITOR_TRACKED)
    pathways.handle(VISITOR_TRACKED, model.record_pageviews)
    try:
        await pathways.deliver([pageview(utc(2025, 6, 4, 23, 59), "alice"), pageview(utc(2025, 6, 5, 0, 1), "bob")])
        before = read_model(tmp_path)

        def salt_days() -> list[str]:
            return [row[0] for row in query(tmp_path, "SELECT salt_day FROM visitors ORDER BY 1")]

        assert salt_days() == ["2025-06-04", "2025-06-05"]
        assert await model.forget_expired_visitors(date(2025, 6, 5)) == 0
        assert salt_days() == ["2025-06-04", "2025-06-05"]
        await model.forget_expired_visitors(date(2025, 6, 6))  # the end of the 5th: the 4th's hashes go
        assert salt_days() == ["2025-06-05"]
        # a forgotten visitor who comes back (a late event) is a new visitor, counted once more
        await pathways.deliver([pageview(utc(2025, 6, 4, 23, 59, 30), "alice")])
        assert day_row(tmp_path, "2025-06-04")[:2] == (2, 2)
        await model.forget_expired_visitors(date(2025, 6, 7))
        assert salt_days() == []
        # nothing of the hashes themselves was ever kept in the read model
        for table in ("visitors", "pageview_rows", "dims"):
            assert visitor("alice") not in str(query(tmp_path, f"SELECT * FROM {table}"))
        assert {t: rows for t, rows in read_model(tmp_path).items() if t != "daily_stats"} == {
            t: rows for t, rows in before.items() if t != "daily_stats"} | {
            "hourly_stats": [("example.com", "2025-06-04T23", 2, 2), ("example.com", "2025-06-05T00", 1, 1)],
            "page_stats": [("example.com", "2025-06-04", "/", 2, 2), ("example.com", "2025-06-05", "/", 1, 1)],
            "source_stats": [("example.com", "2025-06-04", "(direct)", 2, 2),
                             ("example.com", "2025-06-05", "(direct)", 1, 1)]}
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("referrer", "domain", "source"),
    [
        ("", "example.com", "(direct)"),
        ("https://www.example.com/page", "example.com", "(direct)"),
        ("https://example.com/page", "www.example.com", "(direct)"),
        ("https://www.Google.com/search?q=x", "example.com", "google.com"),
        ("android-app://com.slack/", "example.com", "com.slack"),
        ("news.ycombinator.com/item?id=1", "example.com", "news.ycombinator.com"),
        ("http://[::1", "example.com", "(unknown)"),
        ("not a url", "example.com", "(unknown)"),
    ],
)
def test_referrer_source(referrer: str, domain: str, source: str) -> None:
    assert referrer_source(referrer, domain) == source


async def test_the_write_ahead_log_stays_bounded_under_a_stream_of_batches(
    open_pipeline: OpenPipeline, tmp_path: Path
) -> None:
    """SQLite's WAL restarts only after a checkpoint that nothing outran: the file must not
    grow with the number of events (once, with checkpoints off, it reached 22 GB in a run)."""
    pathways = await open_pipeline()
    start = utc(2025, 6, 4, 10)
    for batch in range(40):
        await pathways.deliver([
            pageview(start + timedelta(seconds=batch * 60 + i), f"v{batch}-{i % 50}", f"/p/{i % 30}")
            for i in range(250)
        ])
    wal = tmp_path / "a" / (DB_FILENAME + "-wal")
    assert wal.stat().st_size < 16 * 1024 * 1024
