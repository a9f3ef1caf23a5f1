"""Bounds that keep one collector safe from its readers and from invented domains: MAX_SITES,
/api/sites in pages, statistics on connections of their own with a bounded queue, and the
CSV export streamed in blocks whose text SQLite writes (checked against the Python writer)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite
import pytest
from conftest import Start
from helpers import FakeClock, drained, query, utc
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_stats import FIXTURE, NOW, TZ, seed

import stats
from collector import DROPS, STORE
from filters import NO_SITE
from pathways import time_uuid
from readmodel import ReadModel
from store import DB_FILENAME, LOCAL_CURSOR, READER_NICENESS, STATISTICS_QUEUE, STATISTICS_READERS, Store

DAY = utc(2025, 6, 4, 12)


async def post(client: Any, domain: str, path: str = "/") -> Any:
    body = json.dumps({"pathname": path, "referrer": "", "domain": domain})
    return await client.post("/api/pageview", data=body, headers={"Content-Type": "text/plain"})


# -- MAX_SITES ---------------------------------------------------------------------------------------------


async def test_a_new_domain_beyond_max_sites_is_dropped_and_counted(
    start_collector: Start, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    client = await start_collector(clock=FakeClock(DAY), MAX_SITES="3", RATE_LIMIT_PER_SECOND="0")
    for domain in ("a.example", "b.example", "c.example"):
        response = await post(client, domain)
        assert response.status == 204 and "X-Collector-Dropped" not in response.headers
    for index in range(50):  # a flood of invented domains
        response = await post(client, f"invented{index}.example")
        assert (response.status, response.headers["X-Collector-Dropped"]) == (204, "site-limit")
    again = await post(client, "b.example", "/again")  # a domain already counted still is
    assert again.status == 204 and "X-Collector-Dropped" not in again.headers
    await drained(client)
    await client.app[DROPS].flush()

    assert query(data_dir, "SELECT DISTINCT domain FROM daily_stats ORDER BY 1") == [
        ("a.example",), ("b.example",), ("c.example",)]
    # drops beyond the limit are counted under no name: the flood added one row, not fifty
    assert query(data_dir, "SELECT domain, day, reason, count FROM dropped_pageviews") == [
        ("*", "2025-06-04", "site-limit", 50)]
    body = await (await client.get("/api/stats", params={"domain": "a.example", "period": "today"})).json()
    assert body["dropped"]["site_limit"] == 50 and body["dropped"]["domain_not_allowed"] == 0
    health = await (await client.get("/health")).json()
    assert health["sites"]["counted"] == 3 and health["sites"]["max"] == 3 and health["sites"]["limit_reached"]
    assert "ALLOWED_DOMAINS" in health["sites"]["advice"]
    warnings = [r.getMessage() for r in caplog.records if "MAX_SITES" in r.getMessage()]
    assert len(warnings) == 1 and "ALLOWED_DOMAINS" in warnings[0]  # said once, not per page view


async def test_the_sites_already_counted_are_known_after_a_restart(start_collector: Start, data_dir: Path) -> None:
    first = await start_collector(clock=FakeClock(DAY), MAX_SITES="2")
    for domain in ("a.example", "b.example"):
        assert "X-Collector-Dropped" not in (await post(first, domain)).headers
    await drained(first)
    await first.close()

    second = await start_collector(clock=FakeClock(DAY), MAX_SITES="2")
    assert (await post(second, "c.example")).headers["X-Collector-Dropped"] == "site-limit"
    assert "X-Collector-Dropped" not in (await post(second, "a.example")).headers
    assert (await (await second.get("/health")).json())["sites"]["limit_reached"]


async def test_dropped_page_views_do_not_make_a_site(start_collector: Start) -> None:
    client = await start_collector(clock=FakeClock(DAY), MAX_SITES="1")
    body = json.dumps({"pathname": "/", "referrer": "", "domain": "bot.example"})
    bot = await client.post("/api/pageview", data=body, headers={"Content-Type": "text/plain", "User-Agent": "curl/8"})
    assert bot.headers["X-Collector-Dropped"] == "bot"
    assert "X-Collector-Dropped" not in (await post(client, "real.example")).headers


async def test_custom_events_meet_the_same_site_limit(start_collector: Start, data_dir: Path) -> None:
    """An event for a new domain beyond MAX_SITES is dropped like a page view (but not added to
    the drop counts, which count page views); an event for a site counted already goes in."""
    client = await start_collector(clock=FakeClock(DAY), MAX_SITES="1")
    assert "X-Collector-Dropped" not in (await post(client, "a.example")).headers

    async def event(domain: str) -> Any:
        body = json.dumps({"name": "Signup", "pathname": "/", "domain": domain})
        return await client.post("/api/event", data=body, headers={"Content-Type": "text/plain"})

    beyond = await event("invented.example")
    assert (beyond.status, beyond.headers["X-Collector-Dropped"]) == (204, "site-limit")
    known = await event("a.example")
    assert known.status == 204 and "X-Collector-Dropped" not in known.headers
    await drained(client)
    await client.app[DROPS].flush()
    assert query(data_dir, "SELECT payload ->> '$.domain' FROM event_log WHERE event_type = 'visitor.event.v0'") == [
        ("a.example",)]
    assert query(data_dir, "SELECT count(*) FROM dropped_pageviews") == [(0,)]


async def test_counted_domains_include_those_still_in_the_outbox(data_dir: Path) -> None:
    store = Store(data_dir / DB_FILENAME, ZoneInfo("UTC"))
    read_model = ReadModel(store)
    await store.open()
    try:
        await store.append_outbox("visitor.v0", "visitor.tracked.v0", json.dumps({"domain": "waiting.example"}),
                                  "2025-06-04T12:00:00.000Z")
        await store.append_outbox("visitor.v0", "visitor.event.v0", json.dumps({"domain": "event.example"}),
                                  "2025-06-04T12:00:00.000Z")
        conn = sqlite3.connect(data_dir / DB_FILENAME)
        with conn:
            conn.executemany("INSERT INTO daily_stats VALUES (?, ?, 1, 1, 1, 1, 0)",
                             [(f"site{n:03}.example", f"2025-06-{day:02}") for n in range(40) for day in (1, 2, 3)])
        conn.close()
        domains = await read_model.counted_domains()
    finally:
        await store.close()
    assert domains == {f"site{n:03}.example" for n in range(40)} | {"waiting.example", "event.example"}


async def test_counted_domains_include_those_logged_directly_but_not_yet_routed(data_dir: Path) -> None:
    """Local mode logs page views straight into the event log; those after the local sink's
    cursor when a run stopped are on their way to the read model, so their sites count."""
    store = Store(data_dir / DB_FILENAME, ZoneInfo("UTC"), log_directly=True)
    read_model = ReadModel(store)
    await store.open()
    try:
        for domain in ("routed.example", "waiting.example"):
            await store.append_log((time_uuid(), "visitor.v0", "visitor.tracked.v0", "20250604120000",
                                    "2025-06-04T12:00:00.000Z", json.dumps({"domain": domain})))
        first_seq = query(data_dir, "SELECT min(seq) FROM event_log")[0][0]
        await store.set_meta(LOCAL_CURSOR, str(first_seq))  # the first was routed, the second not yet
        domains = await read_model.counted_domains()
    finally:
        await store.close()
    assert domains == {"waiting.example"}


# -- /api/sites in pages ------------------------------------------------------------------------------------


def many_sites(data_dir: Path, count: int) -> list[str]:
    """`count` sites straight into the read model (two days each); schema() made the tables."""
    domains = [f"site{n:05}.example" for n in range(count)]
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with conn:
        conn.executemany("INSERT INTO daily_stats VALUES (?, ?, ?, 1, 1, 1, 0)",
                         [(d, day, n + 1) for n, d in enumerate(domains) for day in ("2025-06-03", "2025-06-04")])
    conn.close()
    return domains


async def schema(data_dir: Path) -> None:
    store = Store(data_dir / DB_FILENAME, ZoneInfo("UTC"))
    await store.open()
    await store.close()


async def test_sites_come_in_pages_that_cover_every_site_once(start_collector: Start, data_dir: Path) -> None:
    await schema(data_dir)
    domains = many_sites(data_dir, 250)
    client = await start_collector(clock=FakeClock(DAY))
    first = await (await client.get("/api/sites")).json()
    assert len(first["sites"]) == stats.DEFAULT_SITES_LIMIT == 100
    assert first["sites"][0] == {"domain": "site00000.example", "first_day": "2025-06-03", "last_day": "2025-06-04",
                                 "pageviews": 2}
    seen, after = [], None
    while True:
        params = {"limit": "70", **({"after": after} if after else {})}
        page = await (await client.get("/api/sites", params=params)).json()
        seen += [site["domain"] for site in page["sites"]]
        after = page["next"]
        if after is None:
            break
        assert after == page["sites"][-1]["domain"]
    assert seen == domains


async def every_site(client: Any, limit: int) -> list[dict[str, Any]]:
    """Every site, `limit` a page, following `next` to the end; no page longer than `limit`."""
    seen: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"limit": str(limit), **({"after": after} if after else {})}
        page = await (await client.get("/api/sites", params=params)).json()
        assert len(page["sites"]) <= limit
        seen += page["sites"]
        if (after := page["next"]) is None:
            return seen


async def test_the_sites_without_a_name_come_last_in_every_paging(start_collector: Start, data_dir: Path) -> None:
    """NO_SITE ("(no site)", received events without a usable domain) sorts before letters, yet is
    listed after every named site, on the last page, whatever the page size."""
    await schema(data_dir)
    domains = many_sites(data_dir, 5)
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with conn:
        conn.execute("INSERT INTO daily_stats VALUES (?, '2025-06-04', 1, 1, 1, 1, 0)", (NO_SITE,))
    conn.close()
    client = await start_collector(clock=FakeClock(DAY))
    for limit in (1, 2, 5, 6, 100):
        assert [site["domain"] for site in await every_site(client, limit)] == [*domains, NO_SITE], limit
    found = await (await client.get("/api/sites", params={"search": "no site"})).json()
    assert [site["domain"] for site in found["sites"]] == [NO_SITE]


async def test_sites_with_custom_events_only_are_listed_and_their_days_count(
        start_collector: Start, data_dir: Path) -> None:
    """A site may send custom events before (or without) any page view: it is a site all the same,
    in its place in every paging, and an event's day widens a site's first and last days."""
    client = await start_collector(clock=FakeClock(DAY))  # its start-up makes the event tables
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with conn:
        conn.executemany("INSERT INTO daily_stats VALUES (?, ?, ?, 1, 1, 1, 0)",
                         [("a.example", "2025-06-03", 2), ("c.example", "2025-06-04", 3), (NO_SITE, "2025-06-04", 1)])
        conn.executemany("INSERT INTO event_stats VALUES (?, ?, 'Signup', 1, 1)",
                         [("b.example", "2025-06-02"), ("c.example", "2025-06-01"), ("c.example", "2025-06-05"),
                          ("d.example", "2025-06-04")])
    conn.close()
    expected = [("a.example", "2025-06-03", "2025-06-03", 2), ("b.example", "2025-06-02", "2025-06-02", 0),
                ("c.example", "2025-06-01", "2025-06-05", 3), ("d.example", "2025-06-04", "2025-06-04", 0),
                (NO_SITE, "2025-06-04", "2025-06-04", 1)]
    for limit in (1, 2, 3, 100):
        seen = [(site["domain"], site["first_day"], site["last_day"], site["pageviews"])
                for site in await every_site(client, limit)]
        assert seen == expected, limit
    found = await (await client.get("/api/sites", params={"search": "b.ex"})).json()
    assert [site["domain"] for site in found["sites"]] == ["b.example"]


async def test_sites_can_be_searched(start_collector: Start, data_dir: Path) -> None:
    await schema(data_dir)
    many_sites(data_dir, 250)
    client = await start_collector(clock=FakeClock(DAY))
    found = await (await client.get("/api/sites", params={"search": "SITE0024"})).json()
    assert [site["domain"] for site in found["sites"]] == [f"site0024{n}.example" for n in range(10)]
    assert found["next"] is None
    params = {"search": "0024", "limit": "4", "after": "site00242.example"}
    paged = await (await client.get("/api/sites", params=params)).json()
    assert [site["domain"] for site in paged["sites"]] == [f"site0024{n}.example" for n in (3, 4, 5, 6)]
    assert paged["next"] == "site00246.example"


@pytest.mark.parametrize(
    ("params", "message"),
    [({"limit": "0"}, "limit must be a whole number from 1 to 1000"),
     ({"limit": "1001"}, "limit must be a whole number from 1 to 1000"),
     ({"limit": "ten"}, "limit must be a whole number"),
     ({"after": "a" * 254}, "after must be at most 253 characters"),
     ({"search": "s" * 254}, "search must be at most 253 characters"),
     ({"page": "2"}, "unknown parameters: 'page'")],
)
async def test_sites_refuse_bad_parameters(start_collector: Start, params: dict[str, str], message: str) -> None:
    client = await start_collector()
    response = await client.get("/api/sites", params=params)
    assert response.status == 400 and message in (await response.json())["error"]


# -- statistics connections -----------------------------------------------------------------------------------


async def test_statistics_wait_in_a_bounded_queue_and_page_views_go_on(start_collector: Start, data_dir: Path) -> None:
    await seed(data_dir, FIXTURE)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ)
    store = client.app[STORE]
    path = "/api/stats?domain=example.com&period=7d"
    async with store.reading() as _, store.reading() as _:  # every statistics connection is taken
        assert store.statistics_load() == {"connections": STATISTICS_READERS, "busy": 2, "waiting": 0}
        waiting = [asyncio.create_task(client.get(path)) for _ in range(STATISTICS_QUEUE)]
        await asyncio.wait_for(until(lambda: store.statistics_load()["waiting"] == STATISTICS_QUEUE), 10)
        refused = await client.get(path)
        assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
        assert "too many statistics requests" in (await refused.json())["error"]
        # page views do not wait for statistics, nor does the emitter (it reads on its own connection)
        assert (await post(client, "example.com")).status == 204
        await drained(client)
        assert (await client.get("/health")).status == 200
        assert not any(task.done() for task in waiting)
    answers = await asyncio.gather(*waiting)
    assert [answer.status for answer in answers] == [200] * STATISTICS_QUEUE
    assert store.statistics_load()["busy"] == 0


async def test_a_filtered_answer_takes_a_spare_connection_only_when_one_is_idle(
    start_collector: Start, data_dir: Path
) -> None:
    """A filtered request shares its work with the other statistics connection if it is idle,
    and never waits for it: two filtered requests at once each keep to their own."""
    await seed(data_dir, FIXTURE)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ)
    store = client.app[STORE]
    async with store.reading() as _:
        async with store.spare_reading() as spare:
            assert spare is not None and store.statistics_load()["busy"] == 2
        async with store.spare_reading(wanted=False) as spare:
            assert spare is None
        async with store.reading() as _, store.spare_reading() as spare:
            assert spare is None
    path = "/api/stats?domain=example.com&period=7d&filter=page:/"
    answers = await asyncio.gather(*(client.get(path) for _ in range(6)))
    bodies = [await answer.json() for answer in answers]
    assert [answer.status for answer in answers] == [200] * 6 and all(body == bodies[0] for body in bodies)
    assert store.statistics_load()["busy"] == 0


async def until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0)


async def test_a_slow_statistics_query_does_not_hold_up_the_emitter(start_collector: Start) -> None:
    """A query that runs for seconds on a statistics connection: page views are committed and
    delivered meanwhile. On the connection the emitter reads the outbox with, they would wait."""
    client = await start_collector(clock=FakeClock(DAY))
    store = client.app[STORE]
    async with store.reading() as db:
        slow = asyncio.create_task(db.execute_fetchall(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
            "SELECT count(*) FROM c"))
        try:
            for index in range(20):
                assert (await post(client, "example.com", f"/{index}")).status == 204
            await drained(client)
            assert not slow.done()
        finally:
            await db.interrupt()  # sqlite3's interrupt, from this thread: the query stops
            with pytest.raises(sqlite3.OperationalError, match="interrupted"):
                await slow


# -- the CSV export -------------------------------------------------------------------------------------------


EXPORT_HEADER = ("date", "pathname", "pageviews", "visitors")


# Mostly the characters that matter to CSV and to spreadsheets, and any other (no lone surrogates:
# a page view's text cannot hold one).
CSV_CHARACTERS = st.sampled_from(',"\r\n\t=+-@\' /')
CELL_TEXT = st.text(alphabet=st.one_of(CSV_CHARACTERS, st.characters(exclude_categories=["Cs"])), min_size=1,
                    max_size=30)


@settings(max_examples=500, deadline=None)
@given(CELL_TEXT)
@example("\x00\r")
@example("=1+1")
@example("a,b")
@example('say "hi"')
@example("\n")
@example("\t-")
def test_sqlite_writes_a_text_cell_as_the_csv_module_does(value: str) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (pathname TEXT)")
        conn.execute("INSERT INTO t VALUES (?)", (value,))
        [(sql_line,)] = conn.execute(
            f"SELECT '2025-06-04,' || {stats._csv_text_sql('pathname')} || ',1,2' || char(13, 10) FROM t")
    finally:
        conn.close()
    expected = stats.to_csv(EXPORT_HEADER, [("2025-06-04", value, 1, 2)]).split("\r\n", 1)[1]
    assert sql_line == expected


@pytest.mark.parametrize("table", stats.EXPORT_TABLES)
async def test_a_ten_year_export_streams_what_the_rows_say(start_collector: Start, data_dir: Path, table: str) -> None:
    await seed(data_dir, FIXTURE)
    first, last = date(2015, 6, 13), date(2025, 6, 10)  # 3,651 days, the fixture's at the end
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with conn:  # older days as well, across block boundaries, with cells to quote and defuse
        conn.executemany("INSERT INTO page_stats VALUES ('example.com', ?, ?, ?, 1)",
                         [((first + timedelta(days=n)).isoformat(), path, 7 - k)
                          for n in range(0, 3000, 29) for k, path in enumerate(["/a,b", '/"q"', "=1+1", "/plain"])])
        conn.executemany("INSERT INTO daily_stats VALUES ('example.com', ?, 5, 4, 3, 2, 1000)",
                         [((first + timedelta(days=n)).isoformat(),) for n in range(0, 3000, 31)])
    conn.close()
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ)
    response = await client.get("/api/export", params={"domain": "example.com", "table": table,
                                                       "from": first.isoformat(), "to": last.isoformat()})
    assert response.status == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    text = await response.text()
    async with aiosqlite.connect(data_dir / DB_FILENAME) as db:
        rows = await stats.export_rows(db, table, "example.com", stats.DateRange(first, last))
    assert text == stats.to_csv(stats.EXPORT_HEADERS[table], rows)
    if table == "daily":
        assert text.count("\r\n") == 1 + (last - first).days + 1
    assert len(stats.export_blocks(table, stats.DateRange(first, last))) > 1


async def test_statistics_threads_run_below_the_event_loop(start_collector: Start) -> None:
    """Linux keeps a nice value per thread: each statistics connection's thread has the
    process's plus 10 (READER_NICENESS), so the loop and the writer go first."""
    client = await start_collector()
    assert (await client.get("/api/sites")).status == 200
    own = os.getpriority(os.PRIO_PROCESS, 0)
    niceness = {int(Path(task, "stat").read_text().rsplit(")", 1)[1].split()[16])
                for task in Path("/proc/self/task").iterdir()}
    assert min(own + READER_NICENESS, 19) in niceness and own in niceness
