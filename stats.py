"""Statistics for the site owner: periods, and the read-only queries over the read model behind
/api/stats, /api/sites and /api/export. Every query runs on the store's reader connection.

A module of its own because store.py already carries the writer, the outbox and the read
model's arithmetic; this one only reads what those wrote."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite

from filters import OTHER_DOMAINS, PER_DOMAIN_REASONS

PERIODS = ("today", "yesterday", "7d", "30d", "month", "12mo", "custom")
DEFAULT_PERIOD = "30d"
DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
MAX_RANGE_DAYS = 3660  # ten years: a longer range is a typo, and its zero-filled series would be huge
CURRENT_WINDOW_MS = 5 * 60 * 1000
EXPORT_TABLES = ("daily", "pages", "sources")
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


async def current_visitors(db: aiosqlite.Connection, domain: str, now: datetime) -> int:
    """Distinct visitors with a page view in the last five minutes, from the raw rows. Their
    local day is the UTC day of the moment or one either side: three short ranges of the
    (site, day, ts_ms) key, whatever the time zone."""
    since = int(now.timestamp() * 1000) - CURRENT_WINDOW_MS
    utc_day = since // 86_400_000
    rows = await db.execute_fetchall(
        "SELECT count(DISTINCT r.visitor) FROM pageview_rows r JOIN dims s ON s.id = r.site "
        "WHERE s.kind = 'site' AND s.value = ? AND r.day IN (?, ?, ?) AND r.ts_ms >= ?",
        (domain, utc_day - 1, utc_day, utc_day + 1, since),
    )
    return int(next(iter(rows))[0])


DROP_REASONS = tuple(str(reason) for reason in PER_DOMAIN_REASONS)


async def dropped(db: aiosqlite.Connection, domain: str, span: DateRange) -> dict[str, Any]:
    """Page views not counted over the range: this domain's, by reason (every reason listed,
    zeros included), and those for any domain outside ALLOWED_DOMAINS (their names are not kept)."""
    rows = await db.execute_fetchall(
        "SELECT domain, reason, sum(count) FROM dropped_pageviews WHERE domain IN (?, ?) AND day BETWEEN ? AND ? "
        "GROUP BY 1, 2",
        (domain, OTHER_DOMAINS, span.first.isoformat(), span.last.isoformat()),
    )
    by_reason = dict.fromkeys(DROP_REASONS, 0)
    other = 0
    for name, reason, count in rows:
        if name == OTHER_DOMAINS:
            other += count
        else:
            by_reason[reason] = by_reason.get(reason, 0) + count
    return {"total": sum(by_reason.values()), "by_reason": by_reason, "domain_not_allowed": other}


async def overview(
    db: aiosqlite.Connection, domain: str, period: str, span: DateRange, limit: int, now: datetime, tz: ZoneInfo
) -> dict[str, Any]:
    """The whole answer of /api/stats."""
    before = span.previous()
    return {
        "domain": domain,
        "period": period,
        "from": span.first.isoformat(),
        "to": span.last.isoformat(),
        "previous": {"from": before.first.isoformat(), "to": before.last.isoformat()},
        "timezone": tz.key,
        "interval": "hour" if span.days == 1 else "day",
        "totals": totals_json(await totals(db, domain, span), await totals(db, domain, before)),
        "series": await series(db, domain, span, tz),
        "pages": await top(db, "page_stats", domain, span, limit),
        "sources": await top(db, "source_stats", domain, span, limit),
        "current_visitors": await current_visitors(db, domain, now),
        "dropped": await dropped(db, domain, span),
    }


async def sites(db: aiosqlite.Connection) -> list[dict[str, Any]]:
    rows = await db.execute_fetchall(
        "SELECT domain, min(day), max(day), sum(pageviews) FROM daily_stats GROUP BY domain ORDER BY domain"
    )
    return [{"domain": row[0], "first_day": row[1], "last_day": row[2], "pageviews": row[3]} for row in rows]


# -- export ----------------------------------------------------------------------------------------------

EXPORT_HEADERS = {
    "daily": ("date", "pageviews", "visitors", "visits", "bounces", "visit_duration_ms"),
    "pages": ("date", "pathname", "pageviews", "visitors"),
    "sources": ("date", "source", "pageviews", "visitors"),
}


async def export_rows(db: aiosqlite.Connection, table: str, domain: str, span: DateRange) -> list[Sequence[Any]]:
    """Rows of the CSV export: every day of the range for the daily totals (zeros included);
    for pages and sources, one row per day and item that had page views."""
    params = (domain, span.first.isoformat(), span.last.isoformat())
    if table == "daily":
        rows = await db.execute_fetchall(
            "SELECT day, pageviews, visitors, visits, bounces, duration_ms FROM daily_stats "
            "WHERE domain = ? AND day BETWEEN ? AND ?",
            params,
        )
        found = {row[0]: tuple(row) for row in rows}
        return [found.get(day, (day, 0, 0, 0, 0, 0)) for day in span.dates()]
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
    '.', or a bracketed IPv6 address, whose colons become '_')."""
    name = domain.strip("[]").replace(":", "_")
    return f"{name}-{table}-{span.first.isoformat()}-{span.last.isoformat()}.csv"
