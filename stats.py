"""Statistics for the site owner: periods, and the read-only queries over the read model behind
/api/stats, /api/sites and /api/export. Every query runs on a statistics connection of the
store (Store.reading), never on the one the emitter reads the outbox with.

A module of its own because store.py already carries the writer, the outbox and the read
model's arithmetic; this one only reads what those wrote."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite

from filters import NO_SITE, OTHER_DOMAINS, PER_DOMAIN_REASONS, DropReason
from pathways import MAX_EVENT_NAME_LENGTH

PERIODS = ("today", "yesterday", "7d", "30d", "month", "12mo", "custom")
DEFAULT_PERIOD = "30d"
DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
MAX_RANGE_DAYS = 3660  # ten years: a longer range is a typo, and its zero-filled series would be huge
CURRENT_WINDOW_MS = 5 * 60 * 1000
EXPORT_TABLES = ("daily", "pages", "sources", "countries", "browsers", "os", "devices", "utm_sources", "utm_mediums",
                 "utm_campaigns", "entry_pages", "exit_pages", "events", "event_properties")
# A cell starting with one of these is a formula to a spreadsheet (CSV injection): quote it.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
VISITORS_LABEL = "Unique visitors (summed over days)"


class StatsParameterError(ValueError):
    """A bad query parameter; the message names it."""


# -- periods --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DateRange:
    """Local days from first to last, both included."""

    first: date
    last: date

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def previous(self) -> DateRange:
        """The period of the same length that ends the day before this one starts."""
        return DateRange(self.first - timedelta(days=self.days), self.first - timedelta(days=1))

    def dates(self) -> list[str]:
        return [(self.first + timedelta(days=n)).isoformat() for n in range(self.days)]


def parse_day(name: str, text: str | None) -> date:
    if not text:
        raise StatsParameterError(f"{name} is required, as YYYY-MM-DD")
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise StatsParameterError(f"{name} must be a date as YYYY-MM-DD, not {text[:32]!r}") from None


def custom_range(first_text: str | None, last_text: str | None) -> DateRange:
    first, last = parse_day("from", first_text), parse_day("to", last_text)
    if first > last:
        raise StatsParameterError(f"from ({first}) must not be after to ({last})")
    span = DateRange(first, last)
    if span.days > MAX_RANGE_DAYS:
        raise StatsParameterError(f"from and to may be at most {MAX_RANGE_DAYS} days apart")
    return span


def period_range(period: str, today: date, first: str | None = None, last: str | None = None) -> DateRange:
    """The local days a period covers; every period ends today, except yesterday and custom."""
    if period == "custom":
        return custom_range(first, last)
    if first is not None or last is not None:
        raise StatsParameterError("from and to are only allowed with period=custom")
    if period == "today":
        return DateRange(today, today)
    if period == "yesterday":
        return DateRange(today - timedelta(days=1), today - timedelta(days=1))
    if period in ("7d", "30d"):
        return DateRange(today - timedelta(days=int(period[:-1]) - 1), today)
    if period == "month":
        return DateRange(today.replace(day=1), today)
    if period == "12mo":
        return DateRange(_one_year_before(today) + timedelta(days=1), today)
    raise StatsParameterError(f"period must be one of {', '.join(PERIODS)}, not {period[:32]!r}")


def _one_year_before(day: date) -> date:
    try:
        return day.replace(year=day.year - 1)
    except ValueError:  # 29 February
        return day.replace(year=day.year - 1, day=28)


def parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise StatsParameterError(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {text[:32]!r}")
    return int(text)


def local_hours(day: date, tz: ZoneInfo) -> list[str]:
    """The local hours of a day as hourly_stats labels them: 23 on a spring-forward day, and
    24 on a fall-back day (its repeated hour is one label, as the read model counts it)."""
    moment = datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)
    labels: list[str] = []
    while (local := moment.astimezone(tz)).date() <= day:
        label = local.strftime("%Y-%m-%dT%H")
        if local.date() == day and label not in labels:
            labels.append(label)
        moment += timedelta(hours=1)
    return labels


# -- figures ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    pageviews: int
    visitors: int
    visits: int
    bounces: int
    duration_ms: int

    def bounce_rate(self) -> float | None:
        return 100 * self.bounces / self.visits if self.visits else None

    def visit_duration(self) -> float | None:
        return self.duration_ms / self.visits / 1000 if self.visits else None

    def views_per_visit(self) -> float | None:
        return self.pageviews / self.visits if self.visits else None


def _rounded(value: float | None, digits: int) -> float | int | None:
    if value is None:
        return None
    return round(value) if digits == 0 else round(value, digits)


def percent_change(current: float | None, previous: float | None) -> float | None:
    """Change in percent of the previous value; None when there is nothing to compare with."""
    if current is None or not previous:
        return None
    return round(100 * (current - previous) / previous, 1)


def _figure(
    label: str, value: float | None, previous: float | None, digits: int, change: float | None
) -> dict[str, Any]:
    return {"label": label, "value": _rounded(value, digits), "previous": _rounded(previous, digits), "change": change}


def totals_json(now: Totals, before: Totals) -> dict[str, dict[str, Any]]:
    """Each headline figure with the previous period's and the change: in percent, except the
    bounce rate, whose change is in percentage points (a change of a percentage in percent
    misleads)."""
    bounce_now, bounce_before = now.bounce_rate(), before.bounce_rate()
    points = None if bounce_now is None or bounce_before is None else round(bounce_now - bounce_before, 1)
    return {
        "pageviews": _count("Page views", now.pageviews, before.pageviews),
        "visitors": _count(VISITORS_LABEL, now.visitors, before.visitors),
        "visits": _count("Visits", now.visits, before.visits),
        "bounce_rate": _figure("Bounce rate (%)", bounce_now, bounce_before, 1, points),
        "visit_duration": _ratio("Visit duration (s)", now.visit_duration(), before.visit_duration(), 0),
        "views_per_visit": _ratio("Views per visit", now.views_per_visit(), before.views_per_visit(), 2),
    }


def _count(label: str, value: int, previous: int) -> dict[str, Any]:
    return _figure(label, value, previous, 0, percent_change(value, previous))


def _ratio(label: str, value: float | None, previous: float | None, digits: int) -> dict[str, Any]:
    return _figure(label, value, previous, digits, percent_change(value, previous))


# -- queries ------------------------------------------------------------------------------------------


async def totals(db: aiosqlite.Connection, domain: str, span: DateRange) -> Totals:
    rows = await db.execute_fetchall(
        "SELECT coalesce(sum(pageviews), 0), coalesce(sum(visitors), 0), coalesce(sum(visits), 0), "
        "coalesce(sum(bounces), 0), coalesce(sum(duration_ms), 0) FROM daily_stats "
        "WHERE domain = ? AND day BETWEEN ? AND ?",
        (domain, span.first.isoformat(), span.last.isoformat()),
    )
    return Totals(*next(iter(rows)))


async def series(db: aiosqlite.Connection, domain: str, span: DateRange, tz: ZoneInfo) -> list[dict[str, Any]]:
    """Page views and visitors per hour for one day, per day otherwise; gaps filled with zeros."""
    if span.days == 1:
        labels = local_hours(span.first, tz)
        sql = "SELECT hour, pageviews, visitors FROM hourly_stats WHERE domain = ? AND hour BETWEEN ? AND ?"
    else:
        labels = span.dates()
        sql = "SELECT day, pageviews, visitors FROM daily_stats WHERE domain = ? AND day BETWEEN ? AND ?"
    found = {row[0]: (row[1], row[2]) for row in await db.execute_fetchall(sql, (domain, labels[0], labels[-1]))}
    return [{"time": label, "pageviews": found.get(label, (0, 0))[0], "visitors": found.get(label, (0, 0))[1]}
            for label in labels]


async def top(db: aiosqlite.Connection, table: str, domain: str, span: DateRange, limit: int) -> list[dict[str, Any]]:
    """Top pages or sources over the range: by visitors (summed over days), then page views."""
    column = {"page_stats": "pathname", "source_stats": "source"}[table]
    rows = await db.execute_fetchall(
        f"SELECT {column}, sum(pageviews) AS views, sum(visitors) AS people FROM {table} "
        "WHERE domain = ? AND day BETWEEN ? AND ? GROUP BY 1 ORDER BY people DESC, views DESC, 1 LIMIT ?",
        (domain, span.first.isoformat(), span.last.isoformat(), limit),
    )
    return [{column: row[0], "pageviews": row[1], "visitors": row[2]} for row in rows]


async def current_visitors(db: aiosqlite.Connection, domain: str, now: datetime,
                           filters: Sequence[Filter] = ()) -> int:
    """Distinct visitors with a page view in the last five minutes (that matches the filters),
    from the raw rows. Their local day is the UTC day of the moment or one either side: three
    short ranges of the (site, day, ts_ms) key, whatever the time zone."""
    since = int(now.timestamp() * 1000) - CURRENT_WINDOW_MS
    utc_day = since // 86_400_000
    conditions, params = await filter_conditions(db, filters)
    rows = await db.execute_fetchall(
        "SELECT count(DISTINCT r.visitor) FROM pageview_rows r WHERE r.site = (SELECT id FROM dims WHERE kind = "
        f"'site' AND value = ?){conditions} AND r.day IN (?, ?, ?) AND r.ts_ms >= ?",
        (domain, *params, utc_day - 1, utc_day, utc_day + 1, since),
    )
    return int(next(iter(rows))[0])


DROP_REASONS = tuple(str(reason) for reason in PER_DOMAIN_REASONS)


async def dropped(db: aiosqlite.Connection, domain: str, span: DateRange) -> dict[str, Any]:
    """Page views not counted over the range: this domain's, by reason (every reason listed,
    zeros included), and those for any domain outside ALLOWED_DOMAINS or beyond MAX_SITES
    (their names are not kept)."""
    rows = await db.execute_fetchall(
        "SELECT domain, reason, sum(count) FROM dropped_pageviews WHERE domain IN (?, ?) AND day BETWEEN ? AND ? "
        "GROUP BY 1, 2",
        (domain, OTHER_DOMAINS, span.first.isoformat(), span.last.isoformat()),
    )
    by_reason = dict.fromkeys(DROP_REASONS, 0)
    not_allowed = beyond_limit = 0
    for name, reason, count in rows:
        if name != OTHER_DOMAINS:
            by_reason[reason] = by_reason.get(reason, 0) + count
        elif reason == DropReason.SITE_LIMIT:
            beyond_limit += count
        else:
            not_allowed += count
    return {"total": sum(by_reason.values()), "by_reason": by_reason, "domain_not_allowed": not_allowed,
            "site_limit": beyond_limit}


async def dropped_so_far(db: aiosqlite.Connection) -> dict[str, Any]:
    """Page views not counted on any kept day, every site together: what an empty dashboard
    shows a newcomer whose first page views were dropped (a curl without a browser's user agent)."""
    rows = await db.execute_fetchall("SELECT reason, sum(count) FROM dropped_pageviews GROUP BY reason")
    by_reason = dict.fromkeys(DROP_REASONS, 0)
    not_allowed = beyond_limit = 0
    for reason, count in rows:
        if reason == DropReason.SITE_LIMIT:
            beyond_limit += count
        elif reason == DropReason.DOMAIN_NOT_ALLOWED:
            not_allowed += count
        else:
            by_reason[reason] = by_reason.get(reason, 0) + count
    return {"total": sum(by_reason.values()), "by_reason": by_reason, "domain_not_allowed": not_allowed,
            "site_limit": beyond_limit}


async def overview(
    db: aiosqlite.Connection, domain: str, period: str, span: DateRange, limit: int, now: datetime, tz: ZoneInfo,
    filters: Sequence[Filter] = (), event: str | None = None, spare: aiosqlite.Connection | None = None,
) -> dict[str, Any]:
    """The whole answer of /api/stats; with filters, its numbers count only the page views and
    visits that match them all (see `filtered`, which shares its work with `spare` if given);
    with `event`, that event's properties too."""
    before = span.previous()
    answer: dict[str, Any] = {
        "domain": domain,
        "period": period,
        "from": span.first.isoformat(),
        "to": span.last.isoformat(),
        "previous": {"from": before.first.isoformat(), "to": before.last.isoformat()},
        "timezone": tz.key,
        "interval": "hour" if span.days == 1 else "day",
    }
    if filters:
        return answer | await filtered(db, domain, span, limit, now, tz, filters, event, spare) | {
            "dropped": await dropped(db, domain, span)}
    current = await totals(db, domain, span)
    answer |= {
        "totals": totals_json(current, await totals(db, domain, before)),
        "series": await series(db, domain, span, tz),
        "pages": await top(db, "page_stats", domain, span, limit),
        "sources": await top(db, "source_stats", domain, span, limit),
        **{name: await breakdown(db, name, domain, span, limit) for name in BREAKDOWNS},
        "current_visitors": await current_visitors(db, domain, now),
        "dropped": await dropped(db, domain, span),
        "events": await events(db, domain, span, limit, current.visitors),
        "filters": [],
        "filtered_from": None,
    }
    if event is not None:
        answer["event"] = await event_breakdown(db, domain, span, event, limit, current.visitors)
    return answer


# -- breakdowns: countries, browsers, systems, devices, campaigns, entry and exit pages ---------------------


@dataclass(frozen=True)
class Breakdown:
    """A list of /api/stats: its rows' dimension in `dimension_stats` and their key."""

    dimension: str
    key: str

    @property
    def entry(self) -> bool:
        return self.dimension == "entry_page"

    @property
    def exit(self) -> bool:
        return self.dimension == "exit_page"

    def row(self, value: str, pageviews: int, visitors: int, visits: int | None, bounces: int | None
            ) -> dict[str, Any]:
        """A row as the API shows it: unknown (stored as '') is null; entry pages have their
        visits and bounce rate, exit pages their visits (exits)."""
        row: dict[str, Any] = {self.key: value or None, "pageviews": pageviews, "visitors": visitors}
        if self.entry or self.exit:
            row["visits"] = visits or 0
        if self.entry:
            row["bounce_rate"] = round(100 * (bounces or 0) / visits, 1) if visits else None
        return row


# The lists, by their name in the answer. Each is ordered by visitors, then page views.
BREAKDOWNS = {
    "countries": Breakdown("country", "country"),
    "browsers": Breakdown("browser", "browser"),
    "os": Breakdown("os", "os"),
    "devices": Breakdown("device", "device"),
    "utm_sources": Breakdown("utm_source", "utm_source"),
    "utm_mediums": Breakdown("utm_medium", "utm_medium"),
    "utm_campaigns": Breakdown("utm_campaign", "utm_campaign"),
    "entry_pages": Breakdown("entry_page", "pathname"),
    "exit_pages": Breakdown("exit_page", "pathname"),
}


async def breakdown(db: aiosqlite.Connection, name: str, domain: str, span: DateRange, limit: int
                    ) -> list[dict[str, Any]]:
    """A list from the rollups, for good (the raw rows are not needed)."""
    kind = BREAKDOWNS[name]
    rows = await db.execute_fetchall(
        "SELECT value, sum(pageviews) AS views, sum(visitors) AS people, sum(visits), sum(bounces) "
        "FROM dimension_stats WHERE domain = ? AND dimension = ? AND day BETWEEN ? AND ? GROUP BY value "
        "ORDER BY people DESC, views DESC, value LIMIT ?",
        (domain, kind.dimension, span.first.isoformat(), span.last.isoformat(), limit),
    )
    return [kind.row(*row) for row in rows]


# -- filters -------------------------------------------------------------------------------------------------

MAX_FILTERS = 20
MAX_FILTER_VALUE_LENGTH = 2048


@dataclass(frozen=True)
class FilterDimension:
    """What `filter=<name>:<value>` matches: raw page view rows `r` for which `condition` holds,
    given the value's id in `dims` (under `kind`); by default, rows whose `column` holds it."""

    name: str
    column: str
    kind: str
    condition: str = ""

    def predicate(self, value_id: int) -> tuple[str, tuple[int, ...]]:
        return self.condition or f"r.{self.column} = ?", (value_id,)


# event:<name>: the page views of the visitors who did the event that day (one seek of the
# event rows' key: site, day, name, visitor). The visitor hash lives one day, so "that day" is
# all that can be known; see docs/events.md.
DID_EVENT_THAT_DAY = ("EXISTS (SELECT 1 FROM event_rows e WHERE e.site = r.site AND e.day = r.day AND e.name = ? "
                      "AND e.visitor = r.visitor)")


FILTER_DIMENSIONS = {dimension.name: dimension for dimension in (
    FilterDimension("page", "page", "page"),
    FilterDimension("source", "source", "source"),
    FilterDimension("country", "country", "country"),
    FilterDimension("browser", "browser", "browser"),
    FilterDimension("os", "os", "os"),
    FilterDimension("device", "device", "device"),
    FilterDimension("utm_source", "utm_source", "utm_source"),
    FilterDimension("utm_medium", "utm_medium", "utm_medium"),
    FilterDimension("utm_campaign", "utm_campaign", "utm_campaign"),
    FilterDimension("entry_page", "entry", "page"),
    FilterDimension("event", "", "event", DID_EVENT_THAT_DAY),
)}


@dataclass(frozen=True)
class Filter:
    dimension: FilterDimension
    value: str | None  # None: unknown (a page view without a country, a visit without a campaign)

    def json(self) -> dict[str, Any]:
        return {"dimension": self.dimension.name, "value": self.value}


def parse_filters(texts: Sequence[str]) -> list[Filter]:
    """`filter=<dimension>:<value>`, each given as often as needed; an empty value means unknown."""
    if len(texts) > MAX_FILTERS:
        raise StatsParameterError(f"at most {MAX_FILTERS} filters, not {len(texts)}")
    parsed = []
    for text in texts:
        name, colon, value = text.partition(":")
        if not colon:
            raise StatsParameterError(f"filter must be <dimension>:<value>, not {text[:64]!r}")
        if name not in FILTER_DIMENSIONS:
            raise StatsParameterError(f"filter dimension must be one of {', '.join(FILTER_DIMENSIONS)}, "
                                      f"not {name[:32]!r}")
        if len(value) > MAX_FILTER_VALUE_LENGTH:
            raise StatsParameterError(f"a filter value must be at most {MAX_FILTER_VALUE_LENGTH} characters long")
        if name == "country":
            value = value.upper()
        parsed.append(Filter(FILTER_DIMENSIONS[name], value or None))
    return parsed


NOTHING = -1  # a value no row holds: the filter matches nothing


async def dim_id(db: aiosqlite.Connection, kind: str, value: str | None) -> int:
    """The dictionary id of a value; 0 for unknown, NOTHING for a value never seen."""
    if value is None:
        return 0 if kind != "event" else NOTHING  # every event has a name
    rows = list(await db.execute_fetchall("SELECT id FROM dims WHERE kind = ? AND value = ?", (kind, value)))
    return int(rows[0][0]) if rows else NOTHING


async def raw_rows_from(db: aiosqlite.Connection) -> date | None:
    """The first local day whose raw page view rows are all kept (None: retention has not run)."""
    rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'log_kept_from'"))
    return date.fromisoformat(rows[0][0]) if rows else None


@dataclass(frozen=True)
class RowSet:
    """The raw rows `r` of a site's days (numbers, as the rows have them) that match every
    filter: the filters' conditions and their parameters."""

    site: int
    first: int
    last: int
    conditions: str
    condition_params: tuple[Any, ...]

    @property
    def where(self) -> str:
        return f"r.site = ? AND r.day BETWEEN ? AND ?{self.conditions}"

    @property
    def params(self) -> tuple[Any, ...]:
        return (self.site, self.first, self.last, *self.condition_params)


async def filter_conditions(db: aiosqlite.Connection, filters: Sequence[Filter]) -> tuple[str, tuple[Any, ...]]:
    """The filters as SQL over a raw row `r` (each joined with AND, after whatever precedes) and
    their parameters."""
    sql, params = "", list[Any]()
    for condition in filters:
        predicate, values = condition.dimension.predicate(await dim_id(db, condition.dimension.kind, condition.value))
        sql += f" AND {predicate}"
        params.extend(values)
    return sql, tuple(params)


async def matching_rows(db: aiosqlite.Connection, domain: str, span: DateRange, filters: Sequence[Filter]
                        ) -> RowSet:
    return RowSet(await dim_id(db, "site", domain), day_number(span.first), day_number(span.last),
                  *await filter_conditions(db, filters))


EPOCH = date(1970, 1, 1)


def day_number(day: date) -> int:
    return (day - EPOCH).days


# Per (visitor, day) and what of a page view holds for its whole visit or visitor: the lists of
# those dimensions group these few rows, not every page view. In the order of its key, which
# keeps the lists' count of distinct visitors cheap (each is seen in ascending order).
VISITOR_DAYS = ("h AS MATERIALIZED (SELECT day, visitor, country, browser, os, device, utm_source, utm_medium, "
                "utm_campaign, entry, count(*) AS views FROM pageview_rows r WHERE {where} "
                "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)")
# The matching first page views of visits: each holds its visit's page views, duration and exit.
VISITS = ("f AS MATERIALIZED (SELECT day, visitor, entry, exit, views, duration_ms FROM pageview_rows r "
          "WHERE {where} AND r.id = r.visit)")
ROW_COLUMNS = {"country": "country", "browser": "browser", "os": "os", "device": "device", "utm_source": "utm_source",
               "utm_medium": "utm_medium", "utm_campaign": "utm_campaign", "entry_page": "entry"}
PEOPLE = "count(DISTINCT day << 32 | visitor)"  # visitors, as the rollups count them: per day


@dataclass(frozen=True)
class Statement:
    """One SQL statement of a filtered answer, and its parameters: the matching rows' where
    clause and parameters once for each `{where}` in it."""

    sql: str
    params: tuple[Any, ...]

    @classmethod
    def of(cls, rows: RowSet, arms: Sequence[str], tables: Sequence[str] = ()) -> Statement:
        sql = (f"WITH {', '.join(tables)} " if tables else "") + " UNION ALL ".join(arms)
        return cls(sql.replace("{where}", rows.where), rows.params * sql.count("{where}"))


# Each row a filtered statement gives: (figure, value, key, page views, visitors, visits,
# bounces, duration); a list's rows have their value and its id as key, the series' their day
# or hour. Rows of the same figure and key from other days add up (visitors are per day).
Found = tuple[str, str, int | None, int | None, int | None, int | None, int | None, int | None]


def _listed(name: str, grouped: str, limit: int | None) -> str:
    """A list's rows, its top `limit` if given (all, to be added up with other days' otherwise):
    `grouped` gives (value id, page views, visitors, visits, bounces)."""
    ranked = "" if limit is None else f" ORDER BY g.people DESC, g.views DESC, 2 LIMIT {int(limit)}"
    return (f"SELECT * FROM (SELECT '{name}', coalesce(d.value, ''), g.*, NULL FROM ({grouped}) g "
            f"LEFT JOIN dims d ON d.id = g.value_id{ranked})")


def _filtered_statement(rows: RowSet, hourly: Sequence[int], limit: int | None, pinned: Collection[str]
                        ) -> Statement:
    """Everything a filtered answer counts over some days, in one statement: the matching rows
    grouped per visitor and day (`h`: the series and the lists of what holds for a visit or a
    visitor), the matching first page views of visits (`f`: visits, bounces, duration, exit
    pages, and the entry pages' visits), and the rows themselves (pages, sources and, for one
    day, the hours). Not the `pinned` lists: their one row is the totals (`_pinned`)."""
    lists = {
        **{name: _listed(name, f"SELECT {ROW_COLUMNS[kind.dimension]} AS value_id, sum(views) AS views, {PEOPLE} "
                               "AS people, NULL, NULL FROM h GROUP BY 1", limit)
           for name, kind in BREAKDOWNS.items() if not kind.exit},
        "entry_visits": _listed("entry_visits", "SELECT entry AS value_id, NULL AS views, NULL AS people, count(*), "
                                                "sum(views = 1) FROM f GROUP BY entry", None),
        "exit_pages": _listed("exit_pages", f"SELECT exit AS value_id, sum(views) AS views, {PEOPLE} AS people, "
                                            "count(*), sum(views = 1) FROM f GROUP BY exit", limit),
        "pages": _listed("pages", f"SELECT page AS value_id, count(*) AS views, {PEOPLE} AS people, NULL, NULL "
                                  "FROM pageview_rows r WHERE {where} GROUP BY page", limit),
        "sources": _listed("sources", f"SELECT source AS value_id, count(*) AS views, {PEOPLE} AS people, NULL, NULL "
                                      "FROM pageview_rows r WHERE {where} GROUP BY source", limit),
    }
    skipped = {*pinned, *(["entry_visits"] if "entry_pages" in pinned else [])}
    arms = [
        "SELECT 'day', '', day, sum(views), count(DISTINCT visitor), NULL, NULL, NULL FROM h GROUP BY day",
        "SELECT 'visits', '', NULL, NULL, NULL, count(*), sum(views = 1), sum(duration_ms) FROM f",
        *(arm for name, arm in lists.items() if name not in skipped),
    ]
    if hourly:  # the hours of one day: the bucket of each page view by the hours' first milliseconds
        bucket = "CASE " + " ".join(f"WHEN ts_ms < {start} THEN {index}" for index, start in enumerate(hourly[1:])) \
            + f" ELSE {len(hourly) - 1} END"
        arms.append(f"SELECT 'hour', '', {bucket} AS hour, count(*), count(DISTINCT visitor), NULL, NULL, NULL "
                    "FROM pageview_rows r WHERE {where} GROUP BY hour")
    return Statement.of(rows, arms, (VISITOR_DAYS, VISITS))


def _totals_statement(rows: RowSet) -> Statement:
    """The headline figures alone, for the previous period: one narrow pass over the rows."""
    return Statement.of(rows, [
        "SELECT 'before', '', NULL, sum(views), sum(people), sum(visits), sum(bounces), sum(duration) FROM ("
        "SELECT count(*) AS views, count(DISTINCT r.visitor) AS people, sum(r.id = r.visit) AS visits, "
        "sum(r.id = r.visit AND r.views = 1) AS bounces, sum(iif(r.id = r.visit, r.duration_ms, 0)) AS duration "
        "FROM pageview_rows r WHERE {where} GROUP BY r.day)"])


LIST_OF_FILTER = {"page": "pages", "source": "sources", **{kind.dimension: name for name, kind in BREAKDOWNS.items()}}


def _pinned(filters: Sequence[Filter]) -> dict[str, str]:
    """The lists in which a filter leaves one value, the filter's (by list name): its row is
    the totals, with nothing to group."""
    return {LIST_OF_FILTER[condition.dimension.name]: condition.value or "" for condition in filters
            if condition.dimension.name in LIST_OF_FILTER}


def _day_parts(rows: RowSet, parts: int) -> list[RowSet]:
    """The rows' days in `parts` runs of consecutive days (fewer if there are fewer days)."""
    days = rows.last - rows.first + 1
    bounds = sorted({rows.first + days * part // parts for part in range(parts)} | {rows.last + 1})
    return [replace(rows, first=first, last=next_first - 1) for first, next_first in itertools.pairwise(bounds)]


async def run_shared(connections: Sequence[aiosqlite.Connection], statements: Sequence[Statement]
                     ) -> list[Found]:
    """The rows of every statement, which whichever connection is free takes next."""
    waiting = list(statements)
    found: list[Found] = []

    async def work(conn: aiosqlite.Connection) -> None:
        while waiting:
            statement = waiting.pop(0)
            found.extend(await conn.execute_fetchall(statement.sql, statement.params))  # type: ignore[arg-type]

    async with asyncio.TaskGroup() as group:
        for conn in connections:
            group.create_task(work(conn))
    return found


Sums = dict[str, dict[tuple[str, int | None], list[int]]]


def _added_up(found: Sequence[Found]) -> Sums:
    """Per figure and key (a list's value, a day, an hour), its numbers added up over the
    statements that found them."""
    sums: Sums = defaultdict(dict)
    for name, value, key, *numbers in found:
        total = sums[name].setdefault((value, key), [0] * len(numbers))
        for index, number in enumerate(numbers):
            total[index] += number or 0
    return sums


def _top(sums: Sums, name: str, limit: int) -> list[tuple[str, int, int, int, int]]:
    """A list's rows, most visitors first (then page views, then value): (value, page views,
    visitors, visits, bounces)."""
    rows = [(value, views, people, visits, bounces) for (value, _), (views, people, visits, bounces, _) in
            sums[name].items()]
    return sorted(rows, key=lambda row: (-row[2], -row[1], row[0]))[:limit]


async def filtered(db: aiosqlite.Connection, domain: str, span: DateRange, limit: int, now: datetime, tz: ZoneInfo,
                   filters: Sequence[Filter], event: str | None, spare: aiosqlite.Connection | None = None
                   ) -> dict[str, Any]:
    """The figures and lists of /api/stats counting only the raw page view rows that match every
    filter: page views, their visitors (per day, as the rollups count them), and the visits whose
    first page view matches (their page views, bounces, duration and exit page are on that
    row). Raw rows are kept RAW_RETENTION_DAYS: `filtered_from` says when a period reaches back
    before them (the days before count nothing). The custom events are those of the matching
    visitors (`filtered_events`); `event`'s figures likewise, without properties.

    With `spare`, each connection counts half of the days (the other's read is a snapshot of its
    own, as the statements of one connection are), and what they find is added up: every
    figure is a sum over days."""
    connections = [db] if spare is None else [db, spare]
    rows = await matching_rows(db, domain, span, filters)
    labels, starts = _hours(span, tz)
    kept_from = await raw_rows_from(db)
    previous = span.previous()
    parts = _day_parts(rows, len(connections))
    pinned = _pinned(filters)
    statements = [_filtered_statement(part, starts, limit if len(parts) == 1 else None, pinned) for part in parts]
    if not (kept_from and previous.last < kept_from):  # else its raw rows are gone: nothing of it matches
        before_rows = replace(rows, first=day_number(previous.first), last=day_number(previous.last))
        statements += [_totals_statement(part) for part in _day_parts(before_rows, len(connections))]
    sums = _added_up(await run_shared(connections, statements))
    per_day, per_hour = ({key: (views, people) for (_, key), (views, people, *_) in sums[name].items()}
                         for name in ("day", "hour"))
    _, _, visits, bounces, duration = sums["visits"].get(("", None), [0] * 5)
    current = Totals(sum(v for v, _ in per_day.values()), sum(p for _, p in per_day.values()), visits, bounces,
                     duration)
    before = Totals(*sums["before"].get(("", None), [0] * 5))
    for name, value in pinned.items():
        sums[name] = {(value, None): [current.pageviews, current.visitors, visits, bounces, 0]} \
            if current.pageviews else {}
    for (value, key), (_, _, entry_visits, entry_bounces, _) in sums["entry_visits"].items():
        if (value, key) in sums["entry_pages"]:
            sums["entry_pages"][(value, key)][2:4] = [entry_visits, entry_bounces]
    answer: dict[str, Any] = {
        "totals": totals_json(current, before),
        "series": _filtered_series(span, labels, per_day, per_hour),
        "pages": [{"pathname": value, "pageviews": views, "visitors": people}
                  for value, views, people, *_ in _top(sums, "pages", limit)],
        "sources": [{"source": value, "pageviews": views, "visitors": people}
                    for value, views, people, *_ in _top(sums, "sources", limit)],
        **{name: [kind.row(*row) for row in _top(sums, name, limit)] for name, kind in BREAKDOWNS.items()},
        "current_visitors": await current_visitors(db, domain, now, filters),
        "filters": [condition.json() for condition in filters],
        "filtered_from": kept_from.isoformat() if kept_from and span.first < kept_from else None,
        "events": await filtered_events(db, rows, limit, current.visitors),
    }
    if event is not None:
        named = await filtered_events(db, rows, 1, current.visitors, event)
        answer["event"] = {**(named[0] if named else {"name": event, "count": 0, "visitors": 0,
                                                     "conversion_rate": conversion_rate(0, current.visitors)}),
                           "properties": None}
    return answer


async def filtered_events(db: aiosqlite.Connection, rows: RowSet, limit: int, all_visitors: int,
                          name: str | None = None) -> list[dict[str, Any]]:
    """The custom events of the visitors with a matching page view, on the days they had one
    (a visitor is known one day at a time), from the raw event rows; `name` for one event. Each
    event row looks for such a page view through the visitor index: events are the fewer rows."""
    only, params = "", [rows.site, rows.first, rows.last]
    if name is not None:
        only = " AND e.name = ?"
        params.append(await dim_id(db, "event", name))
    found = await db.execute_fetchall(
        "SELECT n.value, count(*) AS count, count(DISTINCT e.day << 32 | e.visitor) AS people FROM event_rows e "
        f"JOIN dims n ON n.id = e.name WHERE e.site = ? AND e.day BETWEEN ? AND ?{only} AND EXISTS (SELECT 1 FROM "
        f"pageview_rows r WHERE r.visitor = e.visitor AND r.day = e.day AND {rows.where}) GROUP BY e.name "
        "ORDER BY people DESC, count DESC, n.value LIMIT ?",
        (*params, *rows.params, limit),
    )
    return [{"name": value, "count": count, "visitors": people,
             "conversion_rate": conversion_rate(people, all_visitors)} for value, count, people in found]


def _hours(span: DateRange, tz: ZoneInfo) -> tuple[list[str], list[int]]:
    """For a one-day period, its local hours and the first millisecond of each (a repeated hour
    of a fall-back day is one label, as the rollups count it); nothing otherwise."""
    if span.days != 1:
        return [], []
    labels = local_hours(span.first, tz)
    starts: list[int] = []
    moment = datetime.combine(span.first, time(), tzinfo=tz).astimezone(UTC)
    while (local := moment.astimezone(tz)).date() <= span.first:
        if local.date() == span.first and (not starts or labels.index(local.strftime("%Y-%m-%dT%H")) == len(starts)):
            starts.append(int(moment.timestamp() * 1000))
        moment += timedelta(hours=1)
    return labels, starts


def _filtered_series(span: DateRange, labels: Sequence[str], per_day: Mapping[int | None, tuple[int, int]],
                     per_hour: Mapping[int | None, tuple[int, int]]) -> list[dict[str, Any]]:
    if labels:
        found = per_hour
        return [{"time": label, "pageviews": found.get(index, (0, 0))[0], "visitors": found.get(index, (0, 0))[1]}
                for index, label in enumerate(labels)]
    return [{"time": day.isoformat(), "pageviews": per_day.get(day_number(day), (0, 0))[0],
             "visitors": per_day.get(day_number(day), (0, 0))[1]}
            for day in (span.first + timedelta(days=n) for n in range(span.days))]


# -- custom events ----------------------------------------------------------------------------------


def parse_event_name(text: str | None) -> str | None:
    if text is None:
        return None
    if not 1 <= len(text) <= MAX_EVENT_NAME_LENGTH:
        raise StatsParameterError(f"event must be an event name of 1 to {MAX_EVENT_NAME_LENGTH} characters")
    return text


def conversion_rate(visitors: int, all_visitors: int) -> float | None:
    """Visitors with the event in percent of the period's visitors, both summed over days; None
    when the period had no visitors. Above 100 only when events came from visitors with no page
    view counted that day (a page without the page view tracker, say)."""
    return round(100 * visitors / all_visitors, 1) if all_visitors else None


async def events(db: aiosqlite.Connection, domain: str, span: DateRange, limit: int,
                 all_visitors: int) -> list[dict[str, Any]]:
    """Each event name over the range: events, unique visitors (summed over days) and the
    conversion rate; by visitors, then events. (other) holds the names beyond the daily bound."""
    rows = await db.execute_fetchall(
        "SELECT name, sum(events) AS count, sum(visitors) AS people FROM event_stats "
        "WHERE domain = ? AND day BETWEEN ? AND ? GROUP BY name ORDER BY people DESC, count DESC, name LIMIT ?",
        (domain, span.first.isoformat(), span.last.isoformat(), limit),
    )
    return [{"name": name, "count": count, "visitors": people, "conversion_rate": conversion_rate(people, all_visitors)}
            for name, count, people in rows]


async def event_breakdown(db: aiosqlite.Connection, domain: str, span: DateRange, name: str, limit: int,
                          all_visitors: int) -> dict[str, Any]:
    """One event over the range: its figures, and for each of its properties the events that
    carried it and the top values (at most `limit` each), by events; zeros for a name not seen."""
    params = (domain, span.first.isoformat(), span.last.isoformat(), name)
    rows = await db.execute_fetchall(
        "SELECT coalesce(sum(events), 0), coalesce(sum(visitors), 0) FROM event_stats "
        "WHERE domain = ? AND day BETWEEN ? AND ? AND name = ?", params)
    count, people = next(iter(rows))
    values = await db.execute_fetchall(
        "SELECT prop, value, sum(events) FROM event_prop_stats WHERE domain = ? AND day BETWEEN ? AND ? AND name = ? "
        "GROUP BY prop, value", params)
    by_property: dict[str, list[tuple[str, int]]] = {}
    for prop, value, times in values:
        by_property.setdefault(prop, []).append((value, times))
    carried = {prop: sum(times for _, times in found) for prop, found in by_property.items()}
    properties = [
        {"name": prop, "count": carried[prop],
         "values": [{"value": value, "count": times}
                    for value, times in sorted(by_property[prop], key=lambda pair: (-pair[1], pair[0]))[:limit]]}
        for prop in sorted(carried, key=lambda prop: (-carried[prop], prop))
    ]
    return {"name": name, "count": count, "visitors": people,
            "conversion_rate": conversion_rate(people, all_visitors), "properties": properties}


DEFAULT_SITES_LIMIT = 100


def parse_sites_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_SITES_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise StatsParameterError(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {text[:32]!r}")
    return int(text)


# A site's days and page views, from each table that names sites: a site may have custom events
# and no page view yet (the event tables then give its days, and 0 page views).
SITE_SOURCES = ("SELECT domain, min(day), max(day), sum(pageviews) FROM daily_stats",
                "SELECT domain, min(day), max(day), 0 FROM event_stats")


async def sites(db: aiosqlite.Connection, limit: int, after: str = "", search: str = "") -> dict[str, Any]:
    """A page of the sites in domain order: those after the cursor `after` (the previous page's
    `next`), whose domain contains `search`. Each table's primary key (domain, day) gives the
    order, so a page reads only its own sites' rows, however many sites there are: the first
    `limit + 1` of each table hold the first `limit + 1` of both. NO_SITE (received events
    without a usable domain) comes after every other site, so the dashboard never opens on it."""
    if after == NO_SITE:
        return {"sites": [], "next": None}
    needle = search.lower()
    rows = await _site_rows(db, "domain > ? AND domain != ? AND instr(domain, ?) > 0", (after, NO_SITE, needle),
                            limit + 1)
    if len(rows) <= limit:  # the last page of named sites: NO_SITE follows them
        rows += await _site_rows(db, "domain = ? AND instr(domain, ?) > 0", (NO_SITE, needle), 1)
    page = [{"domain": domain, "first_day": first, "last_day": last, "pageviews": pageviews}
            for domain, first, last, pageviews in rows[:limit]]
    return {"sites": page, "next": page[-1]["domain"] if len(rows) > limit else None}


async def _site_rows(db: aiosqlite.Connection, where: str, params: tuple[str, ...],
                     limit: int) -> list[tuple[str, str, str, int]]:
    """The first `limit` sites that match, in domain order, each table's rows merged per domain."""
    merged: dict[str, tuple[str, str, str, int]] = {}
    for source in SITE_SOURCES:
        query = f"{source} WHERE {where} GROUP BY domain ORDER BY domain LIMIT ?"
        for domain, first, last, pageviews in await db.execute_fetchall(query, (*params, limit)):
            if known := merged.get(domain):
                first, last, pageviews = min(first, known[1]), max(last, known[2]), pageviews + known[3]
            merged[domain] = (domain, first, last, pageviews)
    return sorted(merged.values())[:limit]


# -- export ----------------------------------------------------------------------------------------------

EXPORT_HEADERS = {
    "daily": ("date", "pageviews", "visitors", "visits", "bounces", "visit_duration_ms"),
    "pages": ("date", "pathname", "pageviews", "visitors"),
    "sources": ("date", "source", "pageviews", "visitors"),
    "events": ("date", "name", "events", "visitors"),
    "event_properties": ("date", "name", "property", "value", "events"),
    # dimension_stats, one table per list of /api/stats (an unknown value is empty)
    **{name: ("date", kind.key, "pageviews", "visitors", "visits", "bounces") for name, kind in BREAKDOWNS.items()},
}


@dataclass(frozen=True)
class RollupExport:
    """A table exported as its rollup's rows: the query (domain, first and last day as
    parameters, the day first), and its text columns then its counts, as the CSV line has them."""

    sql: str
    texts: tuple[str, ...]
    counts: tuple[str, ...]


ROLLUP_EXPORTS = {
    # The custom event tables: one row per day and name, or day, name, property and value.
    "events": RollupExport("SELECT day, name, events, visitors FROM event_stats WHERE domain = ? AND day BETWEEN ? "
                           "AND ? ORDER BY day, events DESC, visitors DESC, name", ("name",), ("events", "visitors")),
    "event_properties": RollupExport("SELECT day, name, prop, value, events FROM event_prop_stats WHERE domain = ? AND "
                                     "day BETWEEN ? AND ? ORDER BY day, name, prop, events DESC, value",
                                     ("name", "prop", "value"), ("events",)),
    # One per list of /api/stats: a row per day and value.
    **{name: RollupExport(f"SELECT day, value, pageviews, visitors, visits, bounces FROM dimension_stats WHERE "
                          f"domain = ? AND dimension = '{kind.dimension}' AND day BETWEEN ? AND ? "
                          "ORDER BY day, pageviews DESC, visitors DESC, value",
                          ("value",), ("pageviews", "visitors", "visits", "bounces"))
       for name, kind in BREAKDOWNS.items()},
}


# Days per query of a streamed export: each query is short (its read snapshot too), and the
# text it returns is small, so a ten-year export never holds the event loop for long.
EXPORT_BLOCK_DAYS = {"daily": 366, **dict.fromkeys(EXPORT_TABLES[1:], 31)}
CRLF = "char(13, 10)"  # RFC 4180 line ends


def export_header(table: str) -> str:
    return to_csv(EXPORT_HEADERS[table], [])


def export_blocks(table: str, span: DateRange) -> list[DateRange]:
    """The range cut into the blocks a streamed export queries one after the other."""
    step = timedelta(days=EXPORT_BLOCK_DAYS[table])
    blocks, first = [], span.first
    while first <= span.last:
        blocks.append(DateRange(first, min(span.last, first + step - timedelta(days=1))))
        first += step
    return blocks


async def export_block(db: aiosqlite.Connection, table: str, domain: str, block: DateRange) -> str:
    """One block of the CSV export, as text. SQLite writes each line (the same text to_csv
    writes for export_rows; a test compares them), so the rows never become Python objects:
    the work runs in the connection's thread, mostly without the GIL, not on the event loop."""
    first, last = block.first.isoformat(), block.last.isoformat()
    if table == "daily":
        sql = (
            "WITH RECURSIVE days(day) AS (SELECT ? UNION ALL SELECT date(day, '+1 day') FROM days WHERE day < ?) "
            "SELECT days.day || ',' || coalesce(s.pageviews, 0) || ',' || coalesce(s.visitors, 0) || ',' || "
            "coalesce(s.visits, 0) || ',' || coalesce(s.bounces, 0) || ',' || coalesce(s.duration_ms, 0) || "
            f"{CRLF} FROM days LEFT JOIN daily_stats s ON s.domain = ? AND s.day = days.day ORDER BY days.day"
        )
        rows = await db.execute_fetchall(sql, (first, last, domain))
    elif table in ROLLUP_EXPORTS:
        export = ROLLUP_EXPORTS[table]
        line = " || ',' || ".join(["day", *(_csv_text_sql(column) for column in export.texts), *export.counts])
        sql = f"SELECT {line} || {CRLF} {export.sql[export.sql.index(' FROM '):]}"
        rows = await db.execute_fetchall(sql, (domain, first, last))
    else:
        source, column = {"pages": ("page_stats", "pathname"), "sources": ("source_stats", "source")}[table]
        sql = (
            f"SELECT day || ',' || {_csv_text_sql(column)} || ',' || pageviews || ',' || visitors || {CRLF} "
            f"FROM {source} WHERE domain = ? AND day BETWEEN ? AND ? ORDER BY day, pageviews DESC, visitors DESC, "
            f"{column}"
        )
        rows = await db.execute_fetchall(sql, (domain, first, last))
    return "".join([row[0] for row in rows])


def _csv_text_sql(column: str) -> str:
    """SQL for a text column as to_csv writes it: a leading formula character defused with an
    apostrophe, then the cell quoted (quotes doubled) if it holds a comma, a quote or a line
    break. char(39) is the apostrophe, char(34) the double quote. The usual cell needs
    neither, and costs a substr, an instr and a GLOB (which stops at a NUL, hence the instr)."""
    prefixes = "'=', '+', '-', '@', char(9), char(13)"
    plain = (f"substr({column}, 1, 1) NOT IN ({prefixes}) AND instr({column}, char(0)) = 0 "
             f"AND {column} NOT GLOB '*[,' || char(34, 13, 10) || ']*'")
    safe = f"(CASE WHEN substr({column}, 1, 1) IN ({prefixes}) THEN char(39) || {column} ELSE {column} END)"
    special = " OR ".join(f"instr({safe}, {char}) > 0" for char in ("','", "char(34)", "char(13)", "char(10)"))
    quoted = f"char(34) || replace({safe}, char(34), char(34) || char(34)) || char(34)"
    return f"(CASE WHEN {plain} THEN {column} WHEN {special} THEN {quoted} ELSE {safe} END)"


async def export_rows(db: aiosqlite.Connection, table: str, domain: str, span: DateRange) -> list[Sequence[Any]]:
    """Rows of the CSV export: every day of the range for the daily totals (zeros included);
    for pages and sources, one row per day and item that had page views. (The export streams
    export_block's text; these rows are what that text must say.)"""
    params = (domain, span.first.isoformat(), span.last.isoformat())
    if table == "daily":
        rows = await db.execute_fetchall(
            "SELECT day, pageviews, visitors, visits, bounces, duration_ms FROM daily_stats "
            "WHERE domain = ? AND day BETWEEN ? AND ?",
            params,
        )
        found = {row[0]: tuple(row) for row in rows}
        return [found.get(day, (day, 0, 0, 0, 0, 0)) for day in span.dates()]
    if table in ROLLUP_EXPORTS:
        return [tuple(row) for row in await db.execute_fetchall(ROLLUP_EXPORTS[table].sql, params)]
    source, column = {"pages": ("page_stats", "pathname"), "sources": ("source_stats", "source")}[table]
    rows = await db.execute_fetchall(
        f"SELECT day, {column}, pageviews, visitors FROM {source} WHERE domain = ? AND day BETWEEN ? AND ? "
        "ORDER BY day, pageviews DESC, visitors DESC, 2",
        params,
    )
    return [tuple(row) for row in rows]


def to_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180 line ends
    writer.writerow(header)
    writer.writerows([[_safe_cell(value) for value in row] for row in rows])
    return out.getvalue()


def _safe_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def export_filename(domain: str, table: str, span: DateRange) -> str:
    """Safe in a quoted header value: domains are normalised hostnames (letters, digits, '-', '_',
    '.', or a bracketed IPv6 address, whose colons become '_'), or NO_SITE ("no-site")."""
    name = "no-site" if domain == NO_SITE else domain.strip("[]").replace(":", "_")
    return f"{name}-{table}-{span.first.isoformat()}-{span.last.isoformat()}.csv"
