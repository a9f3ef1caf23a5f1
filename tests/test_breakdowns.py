"""Issue 13: countries, browsers, systems, devices, campaigns, entry and exit pages in /api/stats,
and filters, against a fixture whose every answer was worked out by hand (below), through the real
router, handler and app over HTTP; then properties that tie the filtered numbers (raw rows) to the
rollups on random traffic.

The fixture: TIMEZONE UTC, now 2025-06-10 18:00. No referrers (every source is (direct)).

  06-09  erin  US Chrome Android mobile   23:50 /blog                             (yesterday)
  06-10  alice DK Firefox Linux desktop   09:00 /landing 09:05 /pricing 09:10 /signup, with
                                          utm_source=newsletter, utm_medium=email,
                                          utm_campaign=spring on the first: one visit of 10 min
                                          10:00 /  (50 min later: a second visit, no campaign, a bounce)
         bob   DE Chrome Windows desktop  11:00 /pricing  (a bounce)
         carol DK Safari iOS mobile       12:00 /landing with utm_source=newsletter,
                                          utm_campaign=spring; 12:20 /pricing: one visit of 20 min
         dave  v0 (nothing known)         13:00 /  (a bounce)
         frank DK Chrome Linux desktop    17:57 /blog  (a bounce; current)

Today: 9 page views, 5 visitors, 6 visits, 4 bounces (66.7 %), 1,800 s over 6 visits (300 s),
1.5 views a visit. A campaign belongs to the visit whose first page view came with it: alice's
first visit (3 page views) and carol's (2) are spring's; alice's second is not. Entry pages:
/landing (alice, carol: 5 page views, 2 visits, no bounce), / (alice's second, dave: 2, 2, both
bounced), /blog (frank), /pricing (bob). Exit pages: /pricing (bob, carol: 3 page views, 2
visits), / (alice's second, dave), /signup (alice's first: 3 page views), /blog (frank).
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite
import pytest
from conftest import Start
from helpers import FakeClock, utc
from test_event_stats import event
from test_stats import seed

import stats as stats_module
from pathways import Event, time_uuid
from store import DB_FILENAME

NOW = utc(2025, 6, 10, 18)
DK_FIREFOX = {"country": "DK", "browser": "Firefox", "os": "Linux", "device": "desktop"}
SPRING = {"source": "newsletter", "medium": "email", "campaign": "spring"}


def view(at: datetime, who: str, path: str, dimensions: dict[str, Any] | None, utm: dict[str, str] | None = None,
         domain: str = "example.com", referrer: str = "") -> Event:
    """A visitor.tracked.v1 page view; with dimensions None, a v0 one."""
    salt_day = at.date().isoformat()
    payload: dict[str, Any] = {
        "visitorHash": hashlib.sha256(f"{who}:{salt_day}".encode()).hexdigest(), "domain": domain,
        "pathname": path, "referrer": referrer, "sessionContext": {"dailySaltRotation": salt_day},
    }
    if dimensions is None:
        return Event(time_uuid(), "visitor.v0", "visitor.tracked.v0", at, payload)
    return Event(time_uuid(), "visitor.v0", "visitor.tracked.v1", at, {**payload, **dimensions, "utm": utm or {}})


FIXTURE = [
    view(utc(2025, 6, 9, 23, 50), "erin", "/blog", {"country": "US", "browser": "Chrome", "os": "Android",
                                                    "device": "mobile"}),
    view(utc(2025, 6, 10, 9), "alice", "/landing", DK_FIREFOX, SPRING),
    view(utc(2025, 6, 10, 9, 5), "alice", "/pricing", DK_FIREFOX),
    view(utc(2025, 6, 10, 9, 10), "alice", "/signup", DK_FIREFOX),
    view(utc(2025, 6, 10, 10), "alice", "/", DK_FIREFOX),
    view(utc(2025, 6, 10, 11), "bob", "/pricing", {"country": "DE", "browser": "Chrome", "os": "Windows",
                                                   "device": "desktop"}),
    view(utc(2025, 6, 10, 12), "carol", "/landing", {"country": "DK", "browser": "Safari", "os": "iOS",
                                                     "device": "mobile"}, {"source": "newsletter",
                                                                            "campaign": "spring"}),
    view(utc(2025, 6, 10, 12, 20), "carol", "/pricing", {"country": "DK", "browser": "Safari", "os": "iOS",
                                                         "device": "mobile"}),
    view(utc(2025, 6, 10, 13), "dave", "/", None),
    view(utc(2025, 6, 10, 17, 57), "frank", "/blog", {"country": "DK", "browser": "Chrome", "os": "Linux",
                                                      "device": "desktop"}),
]


@pytest.fixture
async def client(start_collector: Start, data_dir: Path) -> Any:
    await seed(data_dir, FIXTURE, tz="UTC")
    return await start_collector(clock=FakeClock(NOW), TIMEZONE="UTC")


async def stats(client: Any, *filters: str, **params: str) -> dict[str, Any]:
    query = [*{"domain": "example.com", "period": "today", **params}.items(), *(("filter", f) for f in filters)]
    response = await client.get("/api/stats", params=query)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def rows(body: dict[str, Any], name: str) -> list[tuple[Any, ...]]:
    """A list as tuples: (value, page views, visitors[, visits[, bounce rate]])."""
    return [tuple(row.values()) for row in body[name]]


def values(body: dict[str, Any]) -> dict[str, Any]:
    return {name: figure["value"] for name, figure in body["totals"].items()}


# -- the lists, unfiltered (from the rollups) ---------------------------------------------------------------


async def test_every_list_of_today_as_worked_out_by_hand(client: Any) -> None:
    body = await stats(client)
    assert values(body) == {"pageviews": 9, "visitors": 5, "visits": 6, "bounce_rate": 66.7, "visit_duration": 300,
                            "views_per_visit": 1.5}
    assert rows(body, "countries") == [("DK", 7, 3), (None, 1, 1), ("DE", 1, 1)]
    assert rows(body, "browsers") == [("Chrome", 2, 2), ("Firefox", 4, 1), ("Safari", 2, 1), (None, 1, 1)]
    assert rows(body, "os") == [("Linux", 5, 2), ("iOS", 2, 1), (None, 1, 1), ("Windows", 1, 1)]
    assert rows(body, "devices") == [("desktop", 6, 3), ("mobile", 2, 1), (None, 1, 1)]
    assert rows(body, "utm_sources") == [(None, 4, 4), ("newsletter", 5, 2)]
    assert rows(body, "utm_mediums") == [(None, 6, 5), ("email", 3, 1)]
    assert rows(body, "utm_campaigns") == [(None, 4, 4), ("spring", 5, 2)]
    assert rows(body, "entry_pages") == [("/landing", 5, 2, 2, 0.0), ("/", 2, 2, 2, 100.0), ("/blog", 1, 1, 1, 100.0),
                                         ("/pricing", 1, 1, 1, 100.0)]
    assert rows(body, "exit_pages") == [("/pricing", 3, 2, 2), ("/", 2, 2, 2), ("/signup", 3, 1, 1), ("/blog", 1, 1, 1)]
    assert (body["filters"], body["filtered_from"], body["current_visitors"]) == ([], None, 1)
    limited = await stats(client, limit="1")
    assert [len(limited[name]) for name in ("countries", "entry_pages", "exit_pages")] == [1, 1, 1]


async def test_yesterday_is_erin_alone(client: Any) -> None:
    body = await stats(client, period="yesterday")
    assert rows(body, "countries") == [("US", 1, 1)]
    assert rows(body, "entry_pages") == [("/blog", 1, 1, 1, 100.0)]
    assert rows(body, "utm_campaigns") == [(None, 1, 1)]


# -- filters (from the raw rows) -------------------------------------------------------------------------


async def test_a_campaign_filter_counts_the_visits_it_brought_and_their_page_views(client: Any) -> None:
    body = await stats(client, "utm_campaign:spring")
    assert values(body) == {"pageviews": 5, "visitors": 2, "visits": 2, "bounce_rate": 0.0, "visit_duration": 900,
                            "views_per_visit": 2.5}
    assert rows(body, "countries") == [("DK", 5, 2)]
    assert rows(body, "browsers") == [("Firefox", 3, 1), ("Safari", 2, 1)]
    assert rows(body, "devices") == [("desktop", 3, 1), ("mobile", 2, 1)]
    assert rows(body, "utm_campaigns") == [("spring", 5, 2)]
    assert rows(body, "utm_mediums") == [("email", 3, 1), (None, 2, 1)]
    assert rows(body, "pages") == [("/landing", 2, 2), ("/pricing", 2, 2), ("/signup", 1, 1)]
    assert rows(body, "sources") == [("(direct)", 5, 2)]
    assert rows(body, "entry_pages") == [("/landing", 5, 2, 2, 0.0)]
    assert rows(body, "exit_pages") == [("/signup", 3, 1, 1), ("/pricing", 2, 1, 1)]
    assert body["filters"] == [{"dimension": "utm_campaign", "value": "spring"}]
    assert [(p["time"], p["pageviews"], p["visitors"]) for p in body["series"] if p["pageviews"]] == [
        ("2025-06-10T09", 3, 1), ("2025-06-10T12", 2, 1)]
    assert (body["current_visitors"], body["totals"]["pageviews"]["previous"]) == (0, 0)


async def test_a_page_filter_counts_its_page_views_and_the_visits_that_began_there(client: Any) -> None:
    body = await stats(client, "page:/pricing")
    assert values(body) == {"pageviews": 3, "visitors": 3, "visits": 1, "bounce_rate": 100.0, "visit_duration": 0,
                            "views_per_visit": 3.0}
    assert rows(body, "pages") == [("/pricing", 3, 3)]
    assert rows(body, "countries") == [("DK", 2, 2), ("DE", 1, 1)]
    assert rows(body, "entry_pages") == [("/landing", 2, 2, 0, None), ("/pricing", 1, 1, 1, 100.0)]
    assert rows(body, "exit_pages") == [("/pricing", 1, 1, 1)]


async def test_filters_combine_with_and_and_unknown_is_an_empty_value(client: Any) -> None:
    both = await stats(client, "country:DK", "device:mobile")
    assert values(both)["pageviews"] == 2 and rows(both, "browsers") == [("Safari", 2, 1)]
    assert values(both)["visit_duration"] == 1200
    unknown = await stats(client, "country:")
    assert rows(unknown, "pages") == [("/", 1, 1)] and unknown["filters"] == [{"dimension": "country", "value": None}]
    nothing = await stats(client, "country:DK", "country:DE")
    assert values(nothing)["pageviews"] == 0 and nothing["countries"] == []
    never_seen = await stats(client, "browser:Lynx")
    assert values(never_seen)["visits"] == 0 and values(never_seen)["bounce_rate"] is None
    entry = await stats(client, "entry_page:/landing")
    assert rows(entry, "pages") == [("/landing", 2, 2), ("/pricing", 2, 2), ("/signup", 1, 1)]
    lower_case = await stats(client, "country:dk")
    assert values(lower_case)["pageviews"] == 7


async def test_current_visitors_and_the_previous_period_follow_the_filters(client: Any) -> None:
    assert (await stats(client, "country:DK"))["current_visitors"] == 1
    assert (await stats(client, "country:DE"))["current_visitors"] == 0
    us = await stats(client, "country:US")
    assert (us["totals"]["pageviews"]["value"], us["totals"]["pageviews"]["previous"]) == (0, 1)
    week = await stats(client, "country:US", period="7d")
    assert [p["pageviews"] for p in week["series"]] == [0, 0, 0, 0, 0, 1, 0]


async def test_a_filtered_period_before_the_kept_raw_rows_says_from_when_it_counts(
    start_collector: Start, data_dir: Path
) -> None:
    await seed(data_dir, FIXTURE, tz="UTC")
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE="UTC", RAW_RETENTION_DAYS="30")
    for _ in range(100):  # the daily retention run at start-up records the first day it keeps
        body = await stats(client, "country:DK", period="12mo")
        if body["filtered_from"]:
            break
        await client.get("/health")
    assert body["filtered_from"] == "2025-05-11"
    assert (await stats(client, "country:DK", period="7d"))["filtered_from"] is None
    assert (await stats(client, period="12mo"))["filtered_from"] is None


# -- custom events under filters, and the event:<name> filter ------------------------------------------------

# Today's custom events beside the fixture: alice's Signup in her first visit, carol's Signup, bob's
# Download, and zed's Signup without any page view.
EVENTS = [
    event(utc(2025, 6, 10, 9, 6), "alice", "Signup"),
    event(utc(2025, 6, 10, 11, 1), "bob", "Download"),
    event(utc(2025, 6, 10, 12, 10), "carol", "Signup"),
    event(utc(2025, 6, 10, 14), "zed", "Signup"),
]


@pytest.fixture
async def with_events(start_collector: Start, data_dir: Path) -> Any:
    await seed(data_dir, FIXTURE + EVENTS, tz="UTC")
    return await start_collector(clock=FakeClock(NOW), TIMEZONE="UTC")


def named(body: dict[str, Any]) -> list[tuple[str, int, int, float | None]]:
    return [(e["name"], e["count"], e["visitors"], e["conversion_rate"]) for e in body["events"]]


async def test_filtered_events_are_those_of_the_matching_visitors_that_day(with_events: Any) -> None:
    assert named(await stats(with_events)) == [("Signup", 3, 3, 60.0), ("Download", 1, 1, 20.0)]
    assert named(await stats(with_events, "utm_campaign:spring")) == [("Signup", 2, 2, 100.0)]
    assert named(await stats(with_events, "country:DE")) == [("Download", 1, 1, 100.0)]
    assert named(await stats(with_events, "browser:Chrome", "os:Linux")) == []  # frank did none
    dk = await stats(with_events, "country:DK", event="Signup")
    assert dk["event"] == {"name": "Signup", "count": 2, "visitors": 2, "conversion_rate": 66.7, "properties": None}
    unseen = await stats(with_events, "country:DK", event="Refund")
    assert unseen["event"] == {"name": "Refund", "count": 0, "visitors": 0, "conversion_rate": 0.0, "properties": None}


async def test_an_event_filter_counts_the_page_views_of_the_visitors_who_did_it_that_day(with_events: Any) -> None:
    body = await stats(with_events, "event:Signup")  # alice (two visits, one a bounce) and carol; zed has no page view
    assert values(body) == {"pageviews": 6, "visitors": 2, "visits": 3, "bounce_rate": 33.3, "visit_duration": 600,
                            "views_per_visit": 2.0}
    assert rows(body, "countries") == [("DK", 6, 2)]
    assert named(body) == [("Signup", 2, 2, 100.0)]
    assert body["filters"] == [{"dimension": "event", "value": "Signup"}]
    carol = await stats(with_events, "event:Signup", "browser:Safari")
    assert values(carol)["pageviews"] == 2 and values(carol)["visitors"] == 1
    for nothing in ("event:Refund", "event:"):
        assert values(await stats(with_events, nothing))["pageviews"] == 0, nothing


FILTER_ERRORS = [
    pytest.param("country", "filter must be <dimension>:<value>", id="no-colon"),
    pytest.param("colour:red", "filter dimension must be one of page, source, country", id="unknown-dimension"),
    pytest.param("page:" + "/" * 2049, "at most 2048 characters", id="too-long"),
]


@pytest.mark.parametrize(("text", "message"), FILTER_ERRORS)
async def test_a_bad_filter_gets_a_400_naming_it(client: Any, text: str, message: str) -> None:
    response = await client.get("/api/stats", params={"domain": "example.com", "filter": text})
    body = await response.json()
    assert response.status == 400 and message in body["error"], body


async def test_at_most_twenty_filters(client: Any) -> None:
    response = await client.get("/api/stats", params=[("domain", "example.com")] + [("filter", "os:iOS")] * 21)
    assert (response.status, (await response.json())["error"]) == (400, "at most 20 filters, not 21")


async def test_the_export_has_a_table_per_list(client: Any) -> None:
    response = await client.get("/api/export", params={"domain": "example.com", "from": "2025-06-10",
                                                       "to": "2025-06-10", "table": "entry_pages"})
    assert response.status == 200
    assert (await response.text()).splitlines() == [
        "date,pathname,pageviews,visitors,visits,bounces",
        "2025-06-10,/landing,5,2,2,0", "2025-06-10,/,2,2,2,2", "2025-06-10,/blog,1,1,1,1",
        "2025-06-10,/pricing,1,1,1,1",
    ]
    countries = await client.get("/api/export", params={"domain": "example.com", "from": "2025-06-09",
                                                        "to": "2025-06-10", "table": "countries"})
    assert (await countries.text()).splitlines()[1:] == [
        "2025-06-09,US,1,1,1,1", "2025-06-10,DK,7,3,4,2", "2025-06-10,,1,1,1,1", "2025-06-10,DE,1,1,1,1"]


# -- properties: the raw rows and the rollups agree -------------------------------------------------------


def traffic(seed_number: int, count: int = 400) -> list[Event]:
    """Random visitors on two days, some v0, with campaigns on some first page views."""
    rng = random.Random(seed_number)
    people = {f"p{n}": {"country": rng.choice(["DK", "DE", "US", None]), "browser": rng.choice(["Chrome", "Safari"]),
                        "os": rng.choice(["iOS", "Linux", None]), "device": rng.choice(["mobile", "desktop", None])}
              for n in range(40)}
    clocks = {who: utc(2025, 6, 9, 6) + timedelta(minutes=rng.randrange(1500)) for who in people}
    made = []
    for _ in range(count):
        who = rng.choice(sorted(people))
        clocks[who] += timedelta(minutes=rng.choice([1, 3, 20, 29, 31, 45, 120]))
        utm = rng.choice([{}, {}, {}, SPRING, {"source": "mastodon"}, {"campaign": "autumn", "term": "x"}])
        made.append(view(clocks[who], who, rng.choice(["/", "/a", "/b", "/c"]), None if rng.random() < 0.1 else
                         people[who], utm, referrer=rng.choice(["", "https://news.example/x"])))
    return sorted(made, key=lambda event: event.valid_time)


# What a filter on each dimension matches, and the list whose row for that value must agree.
AGREEING = {"country": "countries", "browser": "browsers", "os": "os", "device": "devices",
            "utm_source": "utm_sources", "utm_medium": "utm_mediums", "utm_campaign": "utm_campaigns",
            "entry_page": "entry_pages", "page": "pages", "source": "sources"}


@pytest.mark.parametrize("seed_number", [1, 2])
async def test_a_filter_on_a_value_counts_what_its_row_in_the_list_says(
    start_collector: Start, data_dir: Path, seed_number: int
) -> None:
    """For every value of every dimension: the filtered answer's page views and visitors are the
    row's in the unfiltered list (rollups), and where a visit has one value (all but page and
    source) its visits and bounce rate too; the list of that dimension is that one row; and
    every list of the filtered answer adds up to its page views."""
    await seed(data_dir, traffic(seed_number), tz="UTC")
    client = await start_collector(clock=FakeClock(utc(2025, 6, 10, 20)), TIMEZONE="UTC")
    checked = 0
    for period in ("7d", "today"):
        whole = await stats(client, period=period, limit="1000")
        exported = {name: await exported_visits(client, name, whole["from"], whole["to"])
                    for name in AGREEING.values() if name not in ("pages", "sources")}
        for dimension, name in AGREEING.items():
            key = "pathname" if name in ("pages", "entry_pages") else dimension
            for row in whole[name]:
                value = row[key] or ""
                part = await stats(client, f"{dimension}:{value}", period=period, limit="1000")
                label = f"{period} {dimension}:{value}"
                counted = (values(part)["pageviews"], values(part)["visitors"])
                assert counted == (row["pageviews"], row["visitors"]), label
                assert part[name] == [row], label
                if dimension not in ("page", "source"):  # a visit has one value: its visits agree too
                    visits, bounces = exported[name].get(value, (0, 0))
                    assert (values(part)["visits"], values(part)["bounce_rate"]) == (
                        visits, round(100 * bounces / visits, 1) if visits else None), label
                for listed in AGREEING.values():
                    assert sum(r["pageviews"] for r in part[listed]) == row["pageviews"], f"{label} {listed}"
                assert sum(r["visits"] for r in part["exit_pages"]) == values(part)["visits"], label
                checked += 1
    assert checked > 40  # every dimension had values to filter on, on both days


async def exported_visits(client: Any, table: str, first: str, last: str) -> dict[str, tuple[int, int]]:
    """Visits and bounces per value of a list, from its rollup as /api/export gives it."""
    response = await client.get("/api/export", params={"domain": "example.com", "from": first, "to": last,
                                                       "table": table})
    found: dict[str, tuple[int, int]] = {}
    for line in list(csv.reader(io.StringIO(await response.text())))[1:]:
        visits, bounces = found.get(line[1], (0, 0))
        found[line[1]] = (visits + int(line[4]), bounces + int(line[5]))
    return found


@pytest.mark.parametrize("seed_number", [3])
async def test_every_filter_narrows_every_number_and_and_narrows_further(
    start_collector: Start, data_dir: Path, seed_number: int
) -> None:
    await seed(data_dir, traffic(seed_number), tz="UTC")
    client = await start_collector(clock=FakeClock(utc(2025, 6, 10, 20)), TIMEZONE="UTC")
    whole = await stats(client, period="7d", limit="1000")
    one = await stats(client, "device:mobile", period="7d", limit="1000")
    two = await stats(client, "device:mobile", "country:DK", period="7d", limit="1000")
    for wider, narrower in ((whole, one), (one, two)):
        assert_narrower(wider, narrower)
    assert 0 < values(two)["pageviews"] < values(one)["pageviews"] < values(whole)["pageviews"]


def assert_narrower(wider: dict[str, Any], narrower: dict[str, Any]) -> None:
    """Every count of `narrower` is at most the same count of `wider`."""
    for name in ("pageviews", "visitors", "visits"):
        assert narrower["totals"][name]["value"] <= wider["totals"][name]["value"], name
    for before, after in zip(wider["series"], narrower["series"], strict=True):
        assert after["pageviews"] <= before["pageviews"] and after["visitors"] <= before["visitors"]
    for name in (*AGREEING.values(), "exit_pages"):
        key = next(k for k in (narrower[name] or wider[name] or [{}])[0] if k not in ("pageviews", "visitors",
                                                                                       "visits", "bounce_rate")) \
            if (narrower[name] or wider[name]) else None
        wide = {row[key]: row for row in wider[name]} if key else {}
        for row in narrower[name]:
            for count in ("pageviews", "visitors", "visits"):
                if count in row:
                    assert row[count] <= wide[row[key]][count], (name, row)


# -- one connection or two: the same answer --------------------------------------------------------------


@pytest.mark.parametrize("seed_number", [4])
async def test_a_filtered_answer_shared_between_two_connections_is_the_one_connections(
    data_dir: Path, seed_number: int
) -> None:
    """With a spare connection, each counts part of the days and what they find is added up
    (the lists' top rows chosen after): the answer is the same as one connection's, for periods
    whose days split across the traffic's two days and for short lists with ties."""
    await seed(data_dir, [*traffic(seed_number), *events_of(seed_number)], tz="UTC")
    now, tz = utc(2025, 6, 10, 20), ZoneInfo("UTC")
    path = f"file:{data_dir / DB_FILENAME}?mode=ro"
    async with aiosqlite.connect(path, uri=True) as db, aiosqlite.connect(path, uri=True) as spare:
        compared = 0
        for first, last in (("2025-06-09", "2025-06-10"), ("2025-06-08", "2025-06-11"), ("2025-06-10", "2025-06-10")):
            span = stats_module.custom_range(first, last)
            for texts in (["browser:Chrome"], ["page:/a"], ["country:DK", "device:mobile"], ["event:Signup"]):
                filters = stats_module.parse_filters(texts)
                for limit in (2, 100):
                    alone = await stats_module.overview(db, "example.com", "custom", span, limit, now, tz, filters,
                                                        "Signup")
                    shared = await stats_module.overview(db, "example.com", "custom", span, limit, now, tz, filters,
                                                         "Signup", spare)
                    assert shared == alone, (first, last, texts, limit)
                    compared += alone["totals"]["pageviews"]["value"] > 0
    assert compared >= 20


def events_of(seed_number: int) -> list[Event]:
    """Signups of some of `traffic`'s visitors, a minute after one of their page views."""
    signups = []
    for seen in random.Random(seed_number).sample(traffic(seed_number), 40):
        signup = event(seen.valid_time + timedelta(minutes=1), "", "Signup")
        signups.append(replace(signup, payload={**signup.payload, "visitorHash": seen.payload["visitorHash"]}))
    return signups
