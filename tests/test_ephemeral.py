"""PRIVACY_MODE=ephemeral: a random salt per UTC day that rotates at UTC midnight, is deleted
48 hours after its day began, is shared by every collector on the same database, and once gone
leaves nothing in the files from which a visitor's hash could be recomputed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import Start
from helpers import BROWSER_UA, SECRET, Client, FakeClock, drained, poll, query, utc

import privacy
from collector import STORE
from maintenance import MAINTENANCE_INTERVAL, maintenance_pause
from store import DB_FILENAME, Store

ADDRESS = "198.51.100.23"
EPHEMERAL = {"PRIVACY_MODE": "ephemeral"}


async def visit(client: Client, data_dir: Path, domain: str = "example.com", address: str = ADDRESS) -> str:
    """Send one page view; return the visitor hash of the event it became."""
    response = await client.post(
        "/api/pageview",
        data=json.dumps({"pathname": "/", "referrer": "", "domain": domain}),
        headers={"Content-Type": "text/plain", "X-Forwarded-For": address},
    )
    assert response.status == 204 and "X-Collector-Dropped" not in response.headers
    await drained(client)
    payload = json.loads(query(data_dir, "SELECT payload FROM event_log ORDER BY seq DESC LIMIT 1")[0][0])
    assert re.fullmatch(r"[0-9a-f]{64}", payload["visitorHash"])
    return str(payload["visitorHash"])


def salts(data_dir: Path) -> dict[str, bytes]:
    return {day: bytes(salt) for day, salt in query(data_dir, "SELECT day, salt FROM salts ORDER BY day")}


async def test_the_salt_rotates_at_utc_midnight_and_is_deleted_48_hours_after_its_day_began(
    start_collector: Start, data_dir: Path
) -> None:
    clock = FakeClock(utc(2025, 6, 4, 21, 59))
    client = await start_collector(clock=clock, TIMEZONE="Europe/Copenhagen", **EPHEMERAL)
    first = await visit(client, data_dir)
    clock.advance(minutes=2)  # local midnight in Copenhagen: not the salt's
    assert await visit(client, data_dir) == first
    assert await visit(client, data_dir, address="198.51.100.24") != first
    assert await visit(client, data_dir, domain="other.example") != first  # the site is in the hash
    assert list(salts(data_dir)) == ["2025-06-04"]
    assert len(salts(data_dir)["2025-06-04"]) == 32

    clock.now = utc(2025, 6, 5, 0, 0, 1)
    second = await visit(client, data_dir)
    assert second != first
    assert list(salts(data_dir)) == ["2025-06-04", "2025-06-05"]  # yesterday's is kept through today

    clock.now = utc(2025, 6, 5, 23, 59, 59)  # 4 June's salt is 47:59:59 old: still there
    assert await visit(client, data_dir) == second
    assert list(salts(data_dir)) == ["2025-06-04", "2025-06-05"]

    clock.now = utc(2025, 6, 6, 0, 0, 0)  # 48 hours: deleted at the first page view of the day
    assert await visit(client, data_dir) not in (first, second)
    assert list(salts(data_dir)) == ["2025-06-05", "2025-06-06"]
    events = [json.loads(row[0]) for row in query(data_dir, "SELECT payload FROM event_log")]
    assert {event["sessionContext"]["dailySaltRotation"] for event in events} == {
        "2025-06-04", "2025-06-05", "2025-06-06"}


async def test_the_maintenance_job_deletes_old_salts_at_start_up(start_collector: Start, data_dir: Path) -> None:
    clock = FakeClock(utc(2025, 6, 4, 12))
    client = await start_collector(clock=clock, **EPHEMERAL)
    await visit(client, data_dir)
    await client.close()
    assert list(salts(data_dir)) == ["2025-06-04"]

    later = await start_collector(clock=FakeClock(utc(2025, 6, 6, 0, 5)), **EPHEMERAL)  # no page view comes
    await poll(lambda: not salts(data_dir), what="the start-up maintenance deleting the old salt")
    await later.close()


async def test_two_collectors_on_one_database_agree_on_a_visitors_hash(data_dir: Path) -> None:
    """Two stores on one file, as two collector processes would have, asking at the same moment."""
    path = data_dir / DB_FILENAME
    first, second = Store(path, ZoneInfo("UTC")), Store(path, ZoneInfo("UTC"))
    await first.open()
    await second.open()
    try:
        hashers = [privacy.VisitorHasher("ephemeral", SECRET, privacy.DailySalts(store)) for store in (first, second)]
        hashes = await asyncio.gather(*(h("2025-06-04", "example.com", ADDRESS, BROWSER_UA) for h in hashers))
        assert hashes[0] == hashes[1]
        assert len(salts(data_dir)) == 1
    finally:
        await first.close()
        await second.close()


async def test_a_restarted_collector_keeps_the_days_salt(start_collector: Start, data_dir: Path) -> None:
    clock = FakeClock(utc(2025, 6, 4, 12))
    client = await start_collector(clock=clock, **EPHEMERAL)
    before = await visit(client, data_dir)
    await client.close()
    again = await start_collector(clock=clock, **EPHEMERAL)
    assert await visit(again, data_dir) == before


def database_bytes(data_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in data_dir.iterdir() if path.name.startswith(DB_FILENAME)}


async def test_once_its_salt_is_gone_a_hash_cannot_be_recomputed(start_collector: Start, data_dir: Path) -> None:
    clock = FakeClock(utc(2025, 6, 4, 12))
    client = await start_collector(clock=clock, **EPHEMERAL)
    old_hash = await visit(client, data_dir)
    old_salt = salts(data_dir)["2025-06-04"]
    # While the salt lives, whoever reads the database can test a guess: the check below means something.
    assert privacy.ephemeral_hash(old_salt, "example.com", ADDRESS, BROWSER_UA) == old_hash
    assert any(old_salt in content for content in database_bytes(data_dir).values())

    for day in (5, 6, 7):  # three more days of traffic, salts created and deleted
        clock.now = utc(2025, 6, day, 0, 1)
        await visit(client, data_dir)
        await visit(client, data_dir, address=f"203.0.113.{day}")
    # What the maintenance job runs: the rows went at the first page view of 6 June, but the
    # WAL's older frames still held them until this truncates it (without it, this test fails).
    assert await client.app[STORE].forget_salts(privacy.previous_day("2025-06-07")) == 0

    assert "2025-06-04" not in salts(data_dir)
    for name, content in database_bytes(data_dir).items():
        for form in (old_salt, old_salt.hex().encode(), old_salt.hex().upper().encode()):
            assert form not in content, f"the deleted salt is still in {name}"
    for salt in salts(data_dir).values():
        assert privacy.ephemeral_hash(salt, "example.com", ADDRESS, BROWSER_UA) != old_hash
    # and the secret key, which recomputes every seed-mode salt, is no help
    seed_salt = hashlib.sha256(f"2025-06-04:{SECRET}".encode()).hexdigest()
    assert hashlib.sha256(f"{ADDRESS}:{BROWSER_UA}:{seed_salt}".encode()).hexdigest() != old_hash
    assert privacy.visitor_hash(ADDRESS, BROWSER_UA, "2025-06-04", SECRET) != old_hash


def test_the_ephemeral_hash_separates_its_fields() -> None:
    salt = bytes(range(32))
    assert privacy.ephemeral_hash(salt, "a.example", "1.2.3.4", "UA") != privacy.ephemeral_hash(
        salt, "a.exampl", "e1.2.3.4", "UA")
    assert privacy.ephemeral_hash(salt, "a", "b", None) == privacy.ephemeral_hash(salt, "a", "b", "unknown")
    assert privacy.ephemeral_hash(bytes(32), "a", "b", "c") != privacy.ephemeral_hash(salt, "a", "b", "c")


async def test_seed_mode_keeps_no_salt(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 12)))
    assert await visit(client, data_dir) == privacy.visitor_hash(ADDRESS, BROWSER_UA, "2025-06-04", SECRET)
    assert salts(data_dir) == {}


async def test_a_dropped_page_view_makes_no_salt_and_no_hash(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 12)), **EPHEMERAL)
    response = await client.post(
        "/api/pageview", data=json.dumps({"pathname": "/", "referrer": "", "domain": "example.com"}),
        headers={"Content-Type": "text/plain", "User-Agent": "Mozilla/5.0 (compatible; bingbot/2.0)"},
    )
    assert response.headers["X-Collector-Dropped"] == "bot"
    await drained(client)
    assert salts(data_dir) == {}
    assert query(data_dir, "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM event_log)") == [(0,)]


def test_the_maintenance_job_wakes_just_after_utc_midnight() -> None:
    assert maintenance_pause(utc(2025, 6, 4, 12)) == MAINTENANCE_INTERVAL
    assert maintenance_pause(utc(2025, 6, 4, 23, 59)) == 61
    assert maintenance_pause(utc(2025, 6, 4, 23, 59, 59, 900_000)) == pytest.approx(1.1)
    assert maintenance_pause(utc(2025, 6, 5, 1, 30).astimezone(ZoneInfo("Asia/Tokyo"))) == MAINTENANCE_INTERVAL
