"""GET /api/stats, /api/sites and /api/current-visitors against a fixture whose every answer
was worked out by hand (below), on a real SQLite file, through the real app over HTTP.

The fixture: TIMEZONE America/New_York (EDT, UTC-4, in June); now is 2025-06-10 14:00 local
(18:00 UTC). Times are local unless they end in Z. Every visitor is anonymous per UTC day.

  06-03  frank 10:00 /  and 10:20 /about (one visit of 20 min)            -- the previous 7 days
         gina  23:59 /edge (03:59Z on 06-04: a local 06-03 page view)      -- the previous 7 days
  06-04  hank  00:00 /edge; ivy 23:59:59 /edge                            -- custom range edges
  06-05  jack  00:00 /edge
  06-09  eve   12:00 / from news.example/b
         dave  23:30 /blog, 23:50 /, and 00:10 /pricing on 06-10: one visit of 40 min that
               belongs to 06-09, the day it started; its third page view counts on 06-10
  06-10  alice 09:00 / from news.example/a, 09:10 /blog (same-site referrer: direct),
               09:45 /blog (35 min later: a second visit, a bounce)
         carol 13:54 /  (6 min ago: not current); bob 13:58 /pricing from www.google.com (current)
         kim   13:59 /  on other.org (current there, not on example.com)

Per day on example.com: (page views, visitors, visits, bounces, duration ms)
  06-03 (3, 2, 2, 1, 1_200_000)   06-04 (2, 2, 2, 2, 0)   06-05 (1, 1, 1, 1, 0)
  06-09 (3, 2, 2, 1, 2_400_000)   06-10 (6, 4, 4, 3, 600_000)
7d = 06-04..06-10: (12, 9, 9, 7, 3_000_000): bounce rate 7/9 = 77.8 %, 333.3 s a visit, 1.33
views a visit. Previous 7 days 05-28..06-03: (3, 2, 2, 1, 1_200_000): 50.0 %, 600 s, 1.5.
Changes: page views +300 %, visitors and visits +350 %, bounce rate +27.8 points, duration
-44.4 %, views per visit -11.1 %.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import Start
from helpers import Client, FakeClock, utc

from pathways import VISITOR_EVENT, VISITOR_TRACKED, VISITOR_TRACKED_V1, Event, Pathways, time_uuid
from readmodel import ReadModel
from stats import local_hours, period_range
from store import DB_FILENAME, Store

TZ = "America/New_York"
NOW = utc(2025, 6, 10, 18)


def local(month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2025, month, day, hour, minute, second, tzinfo=ZoneInfo(TZ))


def view(at: datetime, who: str, path: str, referrer: str = "", domain: str = "example.com") -> Event:
    salt_day = at.astimezone(ZoneInfo("UTC")).date().isoformat()
    payload = {
        "visitorHash": hashlib.sha256(f"{who}:{salt_day}".encode()).hexdigest(),
        "domain": domain,
        "pathname": path,
        "referrer": referrer,
        "sessionContext": {"dailySaltRotation": salt_day},
    }
    return Event(time_uuid(), "visitor.v0", "visitor.tracked.v0", at, payload)


FIXTURE = [
    view(local(6, 3, 10), "frank", "/"),
    view(local(6, 3, 10, 20), "frank", "/about"),
    view(utc(2025, 6, 4, 3, 59), "gina", "/edge"),
    view(utc(2025, 6, 4, 4, 0), "hank", "/edge"),
    view(local(6, 4, 23, 59, 59), "ivy", "/edge"),
    view(local(6, 5, 0), "jack", "/edge"),
    view(local(6, 9, 12), "eve", "/", "https://news.example/b"),
    view(local(6, 9, 23, 30), "dave", "/blog"),
    view(local(6, 9, 23, 50), "dave", "/"),
    view(local(6, 10, 0, 10), "dave", "/pricing"),
    view(local(6, 10, 9), "alice", "/", "https://news.example/a"),
    view(local(6, 10, 9, 10), "alice", "/blog", "https://example.com/"),
    view(local(6, 10, 9, 45), "alice", "/blog"),
    view(local(6, 10, 13, 54), "carol", "/"),
    view(local(6, 10, 13, 58), "bob", "/pricing", "https://www.google.com/"),
    view(local(6, 10, 13, 59), "kim", "/", domain="other.org"),
]


async def seed(data_dir: Path, events: list[Event], tz: str = TZ) -> None:
    """Feed hand-made page views (and custom events) with chosen times through the real router
    and handlers."""
    store = Store(data_dir / DB_FILENAME, ZoneInfo(tz))
    read_model = ReadModel(store)
    await store.open()
    try:
        pathways = Pathways(store)
        for contract, handler in ((VISITOR_TRACKED, read_model.record_pageviews),
                                  (VISITOR_TRACKED_V1, read_model.record_pageviews),
                                  (VISITOR_EVENT, read_model.events.record)):
            pathways.register(contract)
            pathways.handle(contract, handler)
        await pathways.deliver(sorted(events, key=lambda e: e.valid_time))
    finally:
        await store.close()


@pytest.fixture
async def client(start_collector: Start, data_dir: Path) -> Any:
    await seed(data_dir, FIXTURE)
    return await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ)


async def get_stats(client: Any, **params: str) -> dict[str, Any]:
    response = await client.get("/api/stats", params={"domain": "example.com", **params})
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = await response.json()
    return body


def figures(body: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    return {name: (f["value"], f["previous"], f["change"]) for name, f in body["totals"].items()}


async def test_seven_days_totals_with_the_change_against_the_previous_seven(client: Client) -> None:
    body = await get_stats(client, period="7d")
    assert (body["from"], body["to"], body["previous"]) == ("2025-06-04", "2025-06-10",
                                                            {"from": "2025-05-28", "to": "2025-06-03"})
    assert (body["timezone"], body["interval"]) == (TZ, "day")
    assert figures(body) == {
        "pageviews": (12, 3, 300.0),
        "visitors": (9, 2, 350.0),
        "visits": (9, 2, 350.0),
        "bounce_rate": (77.8, 50.0, 27.8),  # the change in percentage points
        "visit_duration": (333, 600, -44.4),
        "views_per_visit": (1.33, 1.5, -11.1),
    }
    assert body["totals"]["visitors"]["label"] == "Unique visitors (summed over days)"


async def test_the_daily_series_is_zero_filled(client: Client) -> None:
    body = await get_stats(client, period="7d")
    assert [(p["time"], p["pageviews"], p["visitors"]) for p in body["series"]] == [
        ("2025-06-04", 2, 2), ("2025-06-05", 1, 1), ("2025-06-06", 0, 0), ("2025-06-07", 0, 0),
        ("2025-06-08", 0, 0), ("2025-06-09", 3, 2), ("2025-06-10", 6, 4),
    ]


async def test_top_pages_and_sources_by_visitors_then_page_views(client: Client) -> None:
    body = await get_stats(client, period="7d")
    assert body["pages"] == [
        {"pathname": "/", "pageviews": 4, "visitors": 4},
        {"pathname": "/edge", "pageviews": 3, "visitors": 3},
        {"pathname": "/blog", "pageviews": 3, "visitors": 2},
        {"pathname": "/pricing", "pageviews": 2, "visitors": 2},
    ]
    assert body["sources"] == [
        {"source": "(direct)", "pageviews": 9, "visitors": 7},
        {"source": "news.example", "pageviews": 2, "visitors": 2},
        {"source": "google.com", "pageviews": 1, "visitors": 1},
    ]
    limited = await get_stats(client, period="7d", limit="2")
    assert [p["pathname"] for p in limited["pages"]] == ["/", "/edge"]
    assert [s["source"] for s in limited["sources"]] == ["(direct)", "news.example"]


async def test_today_is_hourly_and_counts_the_visit_that_began_yesterday_there(client: Client) -> None:
    body = await get_stats(client, period="today")
    assert (body["from"], body["to"], body["interval"]) == ("2025-06-10", "2025-06-10", "hour")
    assert figures(body) == {
        "pageviews": (6, 3, 100.0),
        "visitors": (4, 2, 100.0),
        "visits": (4, 2, 100.0),
        "bounce_rate": (75.0, 50.0, 25.0),
        "visit_duration": (150, 1200, -87.5),
        "views_per_visit": (1.5, 1.5, 0.0),
    }
    hours = {p["time"]: (p["pageviews"], p["visitors"]) for p in body["series"]}
    assert len(body["series"]) == 24
    assert {hour: counts for hour, counts in hours.items() if counts != (0, 0)} == {
        "2025-06-10T00": (1, 1), "2025-06-10T09": (3, 1), "2025-06-10T13": (2, 2),
    }
    assert body["current_visitors"] == 1  # bob at 13:58; carol at 13:54 is more than 5 minutes ago


async def test_yesterday_month_and_twelve_months(client: Client) -> None:
    yesterday = await get_stats(client, period="yesterday")
    assert (yesterday["from"], yesterday["to"]) == ("2025-06-09", "2025-06-09")
    assert {p["time"]: p["pageviews"] for p in yesterday["series"] if p["pageviews"]} == {
        "2025-06-09T12": 1, "2025-06-09T23": 2,
    }
    month = await get_stats(client, period="month")
    assert (month["from"], month["to"], month["previous"]) == ("2025-06-01", "2025-06-10",
                                                               {"from": "2025-05-22", "to": "2025-05-31"})
    assert figures(month)["pageviews"] == (15, 0, None)  # nothing before: no change to report
    assert figures(month)["bounce_rate"] == (72.7, None, None)  # 8 bounces in 11 visits
    year = await get_stats(client, period="12mo")
    assert (year["from"], year["to"], len(year["series"])) == ("2024-06-11", "2025-06-10", 365)
    assert figures(await get_stats(client))["pageviews"][0] == 15  # the default period is 30d


async def test_custom_range_edges_follow_local_midnight(client: Client) -> None:
    one_day = await get_stats(client, period="custom", **{"from": "2025-06-04", "to": "2025-06-04"})
    assert figures(one_day)["pageviews"] == (2, 3, -33.3)  # hank 00:00 and ivy 23:59:59, not gina 23:59 the day before
    assert {p["time"]: p["pageviews"] for p in one_day["series"] if p["pageviews"]} == {
        "2025-06-04T00": 1, "2025-06-04T23": 1,
    }
    two_days = await get_stats(client, period="custom", **{"from": "2025-06-03", "to": "2025-06-05"})
    assert figures(two_days)["pageviews"] == (6, 0, None)
    assert [p["time"] for p in two_days["series"]] == ["2025-06-03", "2025-06-04", "2025-06-05"]


async def test_another_domain_and_an_unknown_one(client: Client) -> None:
    other = (await client.get("/api/stats", params={"domain": "other.org", "period": "today"}))
    body = await other.json()
    assert (figures(body)["pageviews"], body["current_visitors"]) == ((1, 0, None), 1)
    nobody = await get_stats(client, domain="Nobody.Example", period="7d")
    assert nobody["domain"] == "nobody.example"
    assert figures(nobody)["pageviews"] == (0, 0, None)
    assert figures(nobody)["bounce_rate"] == (None, None, None)


async def test_sites_and_current_visitors(client: Client) -> None:
    sites = await (await client.get("/api/sites")).json()
    assert sites == {"sites": [
        {"domain": "example.com", "first_day": "2025-06-03", "last_day": "2025-06-10", "pageviews": 15},
        {"domain": "other.org", "first_day": "2025-06-10", "last_day": "2025-06-10", "pageviews": 1},
    ], "next": None}
    current = await (await client.get("/api/current-visitors", params={"domain": "example.com"})).json()
    assert current == {"domain": "example.com", "current_visitors": 1}


async def test_a_utc_collector_splits_the_same_events_on_utc_days(start_collector: Start, data_dir: Path) -> None:
    await seed(data_dir, FIXTURE, tz="UTC")
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE="UTC")
    body = await get_stats(client, period="custom", **{"from": "2025-06-04", "to": "2025-06-04"})
    # In UTC, 06-04 holds gina (03:59Z) and hank (04:00Z); ivy (03:59:59Z on 06-05) moves to 06-05.
    assert figures(body)["pageviews"][0] == 2
    assert {p["time"]: p["pageviews"] for p in body["series"] if p["pageviews"]} == {"2025-06-04T03": 1,
                                                                                        "2025-06-04T04": 1}


ERRORS = [
    pytest.param({"period": "week"}, "period must be one of", id="unknown-period"),
    pytest.param({"period": "custom"}, "from is required", id="custom-without-from"),
    pytest.param({"period": "custom", "from": "2025-06-01"}, "to is required", id="custom-without-to"),
    pytest.param({"period": "custom", "from": "2025-6-1", "to": "2025-06-02"}, "from must be a date", id="bad-from"),
    pytest.param({"period": "custom", "from": "2025-06-01", "to": "2025-02-30"}, "to must be a date", id="bad-to"),
    pytest.param({"period": "custom", "from": "2025-06-02", "to": "2025-06-01"}, "must not be after", id="reversed"),
    pytest.param({"period": "custom", "from": "2000-01-01", "to": "2025-06-01"}, "at most 3660 days", id="too-long"),
    pytest.param({"period": "7d", "from": "2025-06-01"}, "only allowed with period=custom", id="from-without-custom"),
    pytest.param({"limit": "0"}, "limit must be", id="limit-zero"),
    pytest.param({"limit": "ten"}, "limit must be", id="limit-text"),
    pytest.param({"limit": "1001"}, "limit must be", id="limit-too-big"),
    pytest.param({"limit": "\u00b2"}, "limit must be", id="limit-superscript-digit"),
    pytest.param({"colour": "red"}, "unknown parameters: 'colour'", id="unknown-parameter"),
    pytest.param({"domain": ""}, "domain is required", id="no-domain"),
    pytest.param({"domain": "exa mple.com"}, "domain must be a hostname", id="bad-domain"),
]


@pytest.mark.parametrize(("params", "message"), ERRORS)
async def test_bad_parameters_get_a_400_naming_them(client: Client, params: dict[str, str], message: str) -> None:
    response = await client.get("/api/stats", params={"domain": "example.com", **params})
    assert response.status == 400
    body = await response.json()
    assert body["status"] == 400 and message in body["error"], body


async def test_a_repeated_parameter_is_refused(client: Client) -> None:
    response = await client.get("/api/stats?domain=example.com&period=7d&period=30d")
    assert (response.status, (await response.json())["error"]) == (400, "parameters given more than once: period")


def test_periods_end_today_and_the_previous_period_has_the_same_length() -> None:
    today = datetime(2024, 2, 29).date()
    assert period_range("12mo", today).first.isoformat() == "2023-03-01"
    month = period_range("month", today)
    assert (month.first.isoformat(), month.previous().first.isoformat(), month.previous().last.isoformat()) == (
        "2024-02-01", "2024-01-03", "2024-01-31")
    assert period_range("30d", today).days == 30


def test_local_hours_on_daylight_saving_days() -> None:
    zone = ZoneInfo(TZ)
    spring = local_hours(datetime(2025, 3, 9).date(), zone)
    autumn = local_hours(datetime(2025, 11, 2).date(), zone)
    assert len(spring) == 23 and "2025-03-09T02" not in spring
    assert len(autumn) == 24 and autumn[:3] == ["2025-11-02T00", "2025-11-02T01", "2025-11-02T02"]
    assert local_hours(datetime(2025, 6, 10).date(), zone)[-1] == "2025-06-10T23"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param("/api/sites?domain=example.com", "unknown parameters: 'domain'; expected after, limit, search",
                     id="sites"),
        pytest.param("/api/current-visitors", "domain is required, e.g. domain=example.com",
                     id="current-without-domain"),
        pytest.param("/api/current-visitors?domain=a..b", "domain must be a hostname such as example.com",
                     id="current-bad-domain"),
    ],
)
async def test_the_other_readers_refuse_bad_parameters_too(client: Client, path: str, message: str) -> None:
    response = await client.get(path)
    assert (response.status, (await response.json())["error"]) == (400, message)
