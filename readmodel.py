"""The read model: what the statistics read, built from visitor.tracked events a batch at a time.

Per batch it writes each table once (`executemany`): the raw page view rows, the visitors it had
not seen, and the rollups per domain and day, hour, page and source, and per dimension (country,
browser, system, device, campaign, entry and exit page). Visits, bounces and unique visitors are
worked out in memory, from a bounded cache of what each visitor (a derived key) has done today; a
visitor the cache no longer holds is read back from its raw rows.

The raw rows are shaped for filters: every dimension is an integer into one dictionary table
(`dims`), and the table is clustered by (site, day, time), so a site's period is one range of
the table itself. A new dimension is a column in `pageview_rows`, a kind in `dims`, a field in
`View` (and a join in the `pageviews` view that decodes the rows for people and tests).

A visit's own facts live on its first row (the row whose id is the visit's): its page views, its
duration and its exit page, updated as the visit goes on; every row of a visit carries the visit's
entry page and campaign. So a filtered query finds everything it counts in the rows it matches
(stats.py), and a visitor's rows can always be replayed into the same numbers.

Custom events are counted beside the page views, by `EventCounts` (eventmodel.py), which this
lends dictionary ids, visitor numbers and row ids.

Everything here runs on the store's writer thread, inside the router's transaction."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from eventmodel import EventCounts, EventLimits
from pathways import VISITOR_EVENT, VISITOR_TRACKED, VISITOR_TRACKED_V1, Event
from store import LOCAL_CURSOR, DatabaseUnusableError, Migration, Store, get_meta, put_meta, split_sql, unusable

logger = logging.getLogger(__name__)

VISIT_GAP_MS = 30 * 60 * 1000
DIRECT = "(direct)"
UNKNOWN_SOURCE = "(unknown)"
# Visitors whose day is kept in memory, about 2 KB each with their visit's first view (measured,
# docs/performance.md#memory-after-1000000-page-views); one the cache has dropped is read back.
VISITOR_CACHE_SIZE = 5_000
SMALL_SEEN = 16  # sightings kept in a tuple (smaller than a set) before a visitor gets a set
DIMS_CACHE_SIZE = 50_000  # dictionary entries kept in memory
REBUILD_BATCH = 1000
NEXT_ID = "read_model_next_id"  # meta: the next raw row id (ids are never reused)
UNKNOWN = 0  # the visitor and visit of a raw row written before visitors were linked to rows

# The dimensions a raw row carries, as (kind in `dims`, column of `pageview_rows`).
SITE, PAGE, REFERRER, SOURCE = "site", "page", "referrer", "source"
# visitor.tracked.v1's (issue 13): what was derived from the address and the user agent, and the
# page's campaign. UTM is a page view's own parameters as one JSON value (all five); the
# campaign columns of a row are its visit's: those its first page view came with.
COUNTRY, BROWSER, OS, DEVICE = "country", "browser", "os", "device"
UTM, UTM_SOURCE, UTM_MEDIUM, UTM_CAMPAIGN = "utm", "utm_source", "utm_medium", "utm_campaign"
# Rollup dimensions whose values are pages: where a visit started and where it ended.
ENTRY_PAGE, EXIT_PAGE = "entry_page", "exit_page"
# Every dimension of `dimension_stats`, in the order the API lists them.
DIMENSIONS = (COUNTRY, BROWSER, OS, DEVICE, UTM_SOURCE, UTM_MEDIUM, UTM_CAMPAIGN, ENTRY_PAGE, EXIT_PAGE)
NOT_KNOWN = ""  # a dimension's value in the rollups when it is unknown (a v0 page view, no campaign)

SCHEMA_0003 = """
-- Every dimension value once; raw rows refer to it by id.
CREATE TABLE dims (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,      -- site, page, referrer, source (and, with issue 13, country, browser, ...)
    value TEXT NOT NULL,
    UNIQUE (kind, value)
);
-- One row per page view, kept RAW_RETENTION_DAYS. Clustered by site, local day and time: a
-- site's period is one range of the table, and today's rows are appended at its end.
CREATE TABLE pageview_rows (
    site INTEGER NOT NULL,
    day INTEGER NOT NULL,       -- the local day, as days since 1970-01-01
    ts_ms INTEGER NOT NULL,
    id INTEGER NOT NULL,        -- unique; meta read_model_next_id holds the next one
    visitor INTEGER NOT NULL,   -- a number per visitor and salt day, not derived from the hash
    visit INTEGER NOT NULL,     -- the id of the visit's first page view
    page INTEGER NOT NULL,
    referrer INTEGER NOT NULL,
    source INTEGER NOT NULL,
    PRIMARY KEY (site, day, ts_ms, id)
) WITHOUT ROWID;
CREATE INDEX pageview_rows_visitor ON pageview_rows (visitor);  -- a visitor's day, read back
-- The only link from a visitor hash to the rows: 64 bits of BLAKE2b over the domain and the
-- hash, kept until the end of the UTC day after the salt's (forget_expired_visitors). Once it
-- is gone, a row's visitor number leads nowhere.
CREATE TABLE visitors (
    visitor_key INTEGER PRIMARY KEY,
    visitor INTEGER NOT NULL,
    salt_day TEXT NOT NULL
);
"""

# 0003's decoding view, as released (0005 replaces it with PAGEVIEWS_VIEW).
PAGEVIEWS_VIEW_0003 = """
CREATE VIEW pageviews AS
SELECT r.id, s.value AS domain, r.ts_ms, date(r.day * 86400, 'unixepoch') AS day, p.value AS pathname,
       f.value AS referrer, o.value AS source, r.visitor, r.visit
FROM pageview_rows r JOIN dims s ON s.id = r.site JOIN dims p ON p.id = r.page
JOIN dims f ON f.id = r.referrer JOIN dims o ON o.id = r.source
"""


def _upgrade_0003(conn: sqlite3.Connection) -> None:
    """Integer-coded raw rows clustered by site and day; visitors linked to their rows instead
    of `visitor_state`, `visitor_hits` and `seen`. A file of an earlier version keeps its raw
    rows, and the visitors it still remembers keep their visits."""
    for statement in split_sql(SCHEMA_0003):
        conn.execute(statement)
    next_id = _convert_rows(conn)
    for table in ("pageviews", "visitor_state", "visitor_hits", "seen"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute(PAGEVIEWS_VIEW_0003)
    put_meta(conn, NEXT_ID, str(next_id))


def _convert_rows(conn: sqlite3.Connection) -> int:
    """The old raw rows into the new table; returns the next free id."""
    for kind, column in ((SITE, "domain"), (PAGE, "pathname"), (REFERRER, "referrer"), (SOURCE, "source")):
        conn.execute(f"INSERT OR IGNORE INTO dims (kind, value) SELECT DISTINCT '{kind}', {column} FROM pageviews")
    conn.execute("CREATE TEMP TABLE old_links (id INTEGER PRIMARY KEY, visitor INTEGER, visit INTEGER)")
    for key, salt_day, rows in _old_visitors(conn):
        visitor, last_ms, visit = rows[0][0], None, 0
        links = []
        for row_id, ts_ms in rows:
            if last_ms is None or ts_ms - last_ms > VISIT_GAP_MS:
                visit = row_id
            links.append((row_id, visitor, visit))
            last_ms = ts_ms
        conn.executemany("INSERT INTO old_links VALUES (?, ?, ?)", links)
        conn.execute("INSERT INTO visitors VALUES (?, ?, ?)", (key, visitor, salt_day))
    conn.execute(
        "INSERT INTO pageview_rows (site, day, ts_ms, id, visitor, visit, page, referrer, source) "
        "SELECT s.id, CAST(julianday(v.day) - 2440587.5 AS INTEGER), v.ts_ms, v.id, coalesce(l.visitor, ?1), "
        "coalesce(l.visit, ?1), p.id, f.id, o.id FROM pageviews v "
        "JOIN dims s ON s.kind = 'site' AND s.value = v.domain JOIN dims p ON p.kind = 'page' AND p.value = v.pathname "
        "JOIN dims f ON f.kind = 'referrer' AND f.value = v.referrer "
        "JOIN dims o ON o.kind = 'source' AND o.value = v.source LEFT JOIN old_links l ON l.id = v.id",
        (UNKNOWN,),
    )
    conn.execute("DROP TABLE old_links")
    return int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM pageviews").fetchone()[0])


def _old_visitors(conn: sqlite3.Connection) -> Iterable[tuple[int, str, list[tuple[int, int]]]]:
    """The visitors the old tables still remember, each with its raw rows in time order. The old
    rows did not name their visitor; a visitor's hits and the rows of the same domain and
    millisecond pair up in order (two visitors in one millisecond on one site may swap rows)."""
    found = conn.execute(
        "WITH hits AS (SELECT s.domain, h.ts_ms, h.visitor_key, s.salt_day, row_number() OVER "
        "(PARTITION BY s.domain, h.ts_ms ORDER BY h.visitor_key) AS n FROM visitor_hits h JOIN visitor_state s "
        "USING (visitor_key)), rows AS (SELECT id, domain, ts_ms, row_number() OVER (PARTITION BY domain, ts_ms "
        "ORDER BY id) AS n FROM pageviews) "
        "SELECT hits.visitor_key, hits.salt_day, rows.id, rows.ts_ms FROM rows JOIN hits USING (domain, ts_ms, n) "
        "ORDER BY hits.visitor_key, rows.ts_ms, rows.id"
    ).fetchall()
    by_visitor: dict[int, tuple[str, list[tuple[int, int]]]] = {}
    for key, salt_day, row_id, ts_ms in found:
        by_visitor.setdefault(key, (salt_day, []))[1].append((row_id, ts_ms))
    return [(key, salt_day, rows) for key, (salt_day, rows) in by_visitor.items()]


# 0005 (issue 13): the dimensions of visitor.tracked.v1 in the raw rows, the visit's facts on its
# first row, and the rollups per dimension.
ROW_DIMENSIONS = (COUNTRY, BROWSER, OS, DEVICE, UTM, UTM_SOURCE, UTM_MEDIUM, UTM_CAMPAIGN)
VISIT_COLUMNS = ("entry", "views", "duration_ms", "exit")
SCHEMA_0005 = """
-- Per domain, dimension, local day and value: page views, unique visitors, visits and bounces.
-- Page views and visitors count on the page view's day; a visit and its bounce on the day it
-- started, under the values of its first page view (entry_page: that page; exit_page: its last
-- page, whose page views are the visit's). The value is '' when unknown.
CREATE TABLE dimension_stats (
    domain TEXT NOT NULL,
    dimension TEXT NOT NULL,   -- country, browser, os, device, utm_source, utm_medium, utm_campaign,
                               -- entry_page, exit_page
    day TEXT NOT NULL,
    value TEXT NOT NULL,
    pageviews INTEGER NOT NULL,
    visitors INTEGER NOT NULL,
    visits INTEGER NOT NULL,
    bounces INTEGER NOT NULL,
    PRIMARY KEY (domain, dimension, day, value)
) WITHOUT ROWID;
"""
# The raw rows decoded, for people and tests: '' where a dimension is unknown.
PAGEVIEWS_VIEW = """
CREATE VIEW pageviews AS
SELECT r.id, s.value AS domain, r.ts_ms, date(r.day * 86400, 'unixepoch') AS day, p.value AS pathname,
       f.value AS referrer, o.value AS source, r.visitor, r.visit,
       coalesce(c.value, '') AS country, coalesce(b.value, '') AS browser, coalesce(y.value, '') AS os,
       coalesce(d.value, '') AS device, coalesce(u.value, '') AS utm, coalesce(us.value, '') AS utm_source,
       coalesce(um.value, '') AS utm_medium, coalesce(uc.value, '') AS utm_campaign,
       coalesce(e.value, '') AS entry_page, r.views, r.duration_ms, coalesce(x.value, '') AS exit_page
FROM pageview_rows r JOIN dims s ON s.id = r.site JOIN dims p ON p.id = r.page
JOIN dims f ON f.id = r.referrer JOIN dims o ON o.id = r.source
LEFT JOIN dims c ON c.id = r.country LEFT JOIN dims b ON b.id = r.browser LEFT JOIN dims y ON y.id = r.os
LEFT JOIN dims d ON d.id = r.device LEFT JOIN dims u ON u.id = r.utm LEFT JOIN dims us ON us.id = r.utm_source
LEFT JOIN dims um ON um.id = r.utm_medium LEFT JOIN dims uc ON uc.id = r.utm_campaign
LEFT JOIN dims e ON e.id = r.entry LEFT JOIN dims x ON x.id = r.exit
"""


def _upgrade_0005(conn: sqlite3.Connection) -> None:
    """The new columns (0: unknown), the rollups per dimension, and what the kept rows can say of
    the days before: their page views knew no country, browser, system, device or campaign, so
    those count as unknown; entry and exit pages come from the visits of the kept raw rows, as
    the handler would have counted them, and as unknown for what those rows no longer hold."""
    for column in (*ROW_DIMENSIONS, *VISIT_COLUMNS):
        conn.execute(f"ALTER TABLE pageview_rows ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    for statement in split_sql(SCHEMA_0005):
        conn.execute(statement)
    conn.execute("DROP VIEW pageviews")
    conn.execute(PAGEVIEWS_VIEW)
    for statement in BACKFILL_0005:
        conn.execute(statement)


BACKFILL_0005 = [
    # A kept visit's facts, from its rows in time order; only visits whose first row is kept.
    "CREATE TEMP TABLE visit_facts AS SELECT DISTINCT visit, first_value(page) OVER w AS entry, "
    "last_value(page) OVER w AS exit, count(*) OVER w AS views, max(ts_ms) OVER w - min(ts_ms) OVER w AS duration "
    "FROM pageview_rows WHERE visit != 0 AND visit IN (SELECT id FROM pageview_rows WHERE id = visit) "
    "WINDOW w AS (PARTITION BY visit ORDER BY ts_ms, id ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)",
    "UPDATE pageview_rows AS r SET entry = f.entry, views = iif(r.id = r.visit, f.views, 0), "
    "duration_ms = iif(r.id = r.visit, f.duration, 0), exit = iif(r.id = r.visit, f.exit, 0) "
    "FROM visit_facts f WHERE f.visit = r.visit",
    "DROP TABLE visit_facts",
    *(f"INSERT INTO dimension_stats SELECT domain, '{name}', day, '', pageviews, visitors, visits, bounces "
      "FROM daily_stats" for name in (COUNTRY, BROWSER, OS, DEVICE, UTM_SOURCE, UTM_MEDIUM, UTM_CAMPAIGN)),
    f"INSERT INTO dimension_stats SELECT s.value, '{ENTRY_PAGE}', date(r.day * 86400, 'unixepoch'), p.value, "
    "count(*), count(DISTINCT r.visitor), sum(r.id = r.visit), sum(r.id = r.visit AND r.views = 1) "
    "FROM pageview_rows r JOIN dims s ON s.id = r.site JOIN dims p ON p.id = r.entry WHERE r.entry != 0 "
    "GROUP BY r.site, r.day, r.entry",
    f"INSERT INTO dimension_stats SELECT s.value, '{EXIT_PAGE}', date(r.day * 86400, 'unixepoch'), p.value, "
    "sum(r.views), count(DISTINCT r.visitor), count(*), sum(r.views = 1) "
    "FROM pageview_rows r JOIN dims s ON s.id = r.site JOIN dims p ON p.id = r.exit WHERE r.id = r.visit "
    "AND r.exit != 0 GROUP BY r.site, r.day, r.exit",
    # What the kept visits do not explain (days whose rows are gone, rows of forgotten visitors).
    "CREATE TEMP TABLE kept AS SELECT s.value AS domain, date(r.day * 86400, 'unixepoch') AS day, count(*) AS pv, "
    "count(DISTINCT r.visitor) AS people, sum(r.id = r.visit) AS visits, sum(r.id = r.visit AND r.views = 1) AS "
    "bounces FROM pageview_rows r JOIN dims s ON s.id = r.site WHERE r.entry != 0 GROUP BY r.site, r.day",
    *(f"INSERT INTO dimension_stats SELECT d.domain, '{name}', d.day, '', max(d.pageviews - coalesce(k.pv, 0), 0), "
      "max(d.visitors - coalesce(k.people, 0), 0), max(d.visits - coalesce(k.visits, 0), 0), "
      "max(d.bounces - coalesce(k.bounces, 0), 0) FROM daily_stats d LEFT JOIN kept k USING (domain, day) "
      "WHERE d.pageviews > coalesce(k.pv, 0) OR d.visits > coalesce(k.visits, 0)" for name in (ENTRY_PAGE, EXIT_PAGE)),
    "DROP TABLE kept",
]

MIGRATIONS: tuple[Migration, ...] = (
    ("0003_read_model_integer_rows", _upgrade_0003),
    ("0005_dimensions_and_visit_pages", _upgrade_0005),
)


# -- a page view, a visitor, and what a batch adds up to -------------------------------------------


@dataclass(slots=True, eq=False)
class View:
    """One page view as the read model counts it: the texts the rollups are keyed by, and the
    dictionary ids the raw row keeps (0: unknown). `advance` links it to its visit's first view,
    which holds the visit's facts (page views, duration, exit) and gives every row of the visit
    its entry page and campaign."""

    id: int
    ts_ms: int
    day: str  # the local day, as the rollups label it
    hour: str
    day_number: int  # the same day, as the raw rows keep it
    domain: str
    pathname: str
    referrer: str
    source: str
    country: str = NOT_KNOWN
    browser: str = NOT_KNOWN
    os: str = NOT_KNOWN
    device: str = NOT_KNOWN
    utm: str = NOT_KNOWN  # its own campaign parameters, as one JSON value
    utm_source: str = NOT_KNOWN  # its own
    utm_medium: str = NOT_KNOWN
    utm_campaign: str = NOT_KNOWN
    site: int = 0
    page: int = 0
    ref: int = 0
    src: int = 0
    country_id: int = 0
    browser_id: int = 0
    os_id: int = 0
    device_id: int = 0
    utm_id: int = 0
    utm_source_id: int = 0
    utm_medium_id: int = 0
    utm_campaign_id: int = 0
    visit: int = 0
    first: View | None = None  # the first page view of its visit (None for a first one: itself)
    views: int = 0  # on a visit's first view: the visit's page views, its duration and its exit page
    duration: int = 0
    exit: int = 0
    exit_path: str = NOT_KNOWN
    combination: tuple[str, ...] = ()  # on a visit's first view: what the visit counts under
    written: bool = False  # its row is in the file (or will be, with this batch)
    stored: tuple[int, ...] = ()  # read back from the file: its visit columns as they were

    def visit_columns(self) -> tuple[int, ...]:
        """The columns of its row that follow from its visit (the others are its own)."""
        first = self.first or self
        return (self.visit, first.utm_source_id, first.utm_medium_id, first.utm_campaign_id, first.page,
                self.views, self.duration, self.exit)

    def key(self) -> tuple[int, ...]:
        return (self.site, self.day_number, self.ts_ms, self.id)

    def row(self, visitor: int) -> tuple[int, ...]:
        """Its raw row: its own columns, then `visit_columns()` (spelled out: one tuple, not three)."""
        first = self.first or self
        return (self.site, self.day_number, self.ts_ms, self.id, visitor, self.page, self.ref, self.src,
                self.country_id, self.browser_id, self.os_id, self.device_id, self.utm_id, self.visit,
                first.utm_source_id, first.utm_medium_id, first.utm_campaign_id, first.page, self.views,
                self.duration, self.exit)


ROW_COLUMNS = ("site", "day", "ts_ms", "id", "visitor", "page", "referrer", "source", "country", "browser", "os",
               "device", "utm", "visit", "utm_source", "utm_medium", "utm_campaign", "entry", "views",
               "duration_ms", "exit")
INSERT_ROW = f"INSERT INTO pageview_rows ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * len(ROW_COLUMNS))})"
UPDATE_VISIT_COLUMNS = (
    "UPDATE pageview_rows SET visit = ?, utm_source = ?, utm_medium = ?, utm_campaign = ?, entry = ?, views = ?, "
    "duration_ms = ?, exit = ? WHERE site = ? AND day = ? AND ts_ms = ? AND id = ?"
)
# The usual change: a visit in the file went on, so only its first row's visit facts moved.
UPDATE_VISIT_FACTS = (
    "UPDATE pageview_rows SET views = ?, duration_ms = ?, exit = ? WHERE site = ? AND day = ? AND ts_ms = ? AND id = ?"
)


@dataclass(slots=True)
class Visitor:
    """What one visitor (a domain and a salt day's hash) has done so far, in time order."""

    id: int  # the number its raw rows carry
    salt_day: str
    last_ms: int = -1
    last_day: str = ""
    last_hour: str = ""
    visit: int = 0  # the current visit: its first page view's id, its day, its page views
    visit_day: str = ""
    visit_views: int = 0
    first: View | None = None  # the current visit's first page view
    seen: tuple[int, ...] | set[int] = ()  # (dimension, day, value id), for unique visitors
    exits: dict[int, int] = field(default_factory=dict)  # (day, exit page) -> its visits ending there

    def sighted(self, sighting: int) -> bool:
        """Whether this is the first sighting; most visitors have a few, kept in a small tuple."""
        seen = self.seen
        if sighting in seen:
            return False
        if isinstance(seen, set):
            seen.add(sighting)
        elif len(seen) < SMALL_SEEN:
            self.seen = (*seen, sighting)
        else:
            self.seen = {*seen, sighting}
        return True

    def sighted_all(self, sightings: tuple[int, ...]) -> None:
        """Sightings known to be new (those of a day the visitor had not been seen in)."""
        seen = self.seen
        if isinstance(seen, set):
            seen.update(sightings)
        elif len(seen) + len(sightings) <= SMALL_SEEN:
            self.seen = seen + sightings
        else:
            self.seen = {*seen, *sightings}


PAGEVIEWS, VISITORS, VISITS, BOUNCES, DURATION = range(5)
K = TypeVar("K", bound=tuple[str, ...])
COMBINED = (COUNTRY, BROWSER, OS, DEVICE, UTM_SOURCE, UTM_MEDIUM, UTM_CAMPAIGN, ENTRY_PAGE)  # see Tally.combinations
# A sighting's dimension, in the bits above its day and value (pages and sources have none: their
# dictionary ids differ, and are never 0).
COUNTRY_TAG, BROWSER_TAG, OS_TAG, DEVICE_TAG, UTM_SOURCE_TAG, UTM_MEDIUM_TAG, UTM_CAMPAIGN_TAG, ENTRY_PAGE_TAG = (
    tag << 56 for tag in range(1, 9))


def _day_totals() -> list[int]:
    return [0, 0, 0, 0, 0]


def _view_totals() -> list[int]:
    return [0, 0]


def _combination_totals() -> list[int]:
    return [0, 0, 0, 0]  # page views, visits, bounces, visitors first seen that day


def _dimension_totals() -> list[int]:
    return [0, 0, 0, 0]  # page views, visitors, visits, bounces


class Tally:
    """What a batch adds to the rollups: per (domain, day) page views, visitors, visits,
    bounces and duration; per hour, page and source page views and visitors; per (domain,
    dimension, day, value) page views, visitors, visits and bounces. `touched` lists first page
    views already in the file whose visit went on (their rows' visit columns are written again)."""

    def __init__(self) -> None:
        self.days: defaultdict[tuple[str, str], list[int]] = defaultdict(_day_totals)
        self.hours: defaultdict[tuple[str, str], list[int]] = defaultdict(_view_totals)
        self.pages: defaultdict[tuple[str, str, str], list[int]] = defaultdict(_view_totals)
        self.sources: defaultdict[tuple[str, str, str], list[int]] = defaultdict(_view_totals)
        self.dimensions: defaultdict[tuple[str, str, str, str], list[int]] = defaultdict(_dimension_totals)
        # Page views, visits, bounces and visitors new that day per (domain, day, country, browser,
        # os, device, utm source, medium, campaign, entry page): one count for a view instead of
        # eight; `spread` adds them to `dimensions`.
        self.combinations: defaultdict[tuple[str, ...], list[int]] = defaultdict(_combination_totals)
        self.touched: list[View] = []

    def spread(self) -> None:
        dimensions = self.dimensions
        for key, (views, visits, bounces, people) in self.combinations.items():
            domain, day = key[0], key[1]
            for dimension, value in zip(COMBINED, key[2:], strict=True):
                counts = dimensions[(domain, dimension, day, value)]
                counts[0] += views
                counts[1] += people
                counts[2] += visits
                counts[3] += bounces
        self.combinations.clear()

    def add(self, other: Tally, sign: int = 1) -> None:
        other.spread()
        for mine, theirs in ((self.days, other.days), (self.hours, other.hours), (self.pages, other.pages),
                             (self.sources, other.sources), (self.dimensions, other.dimensions)):
            for key, values in theirs.items():
                totals = mine[key]  # type: ignore[index]
                for index, value in enumerate(values):
                    totals[index] += sign * value

    def write(self, conn: sqlite3.Connection) -> None:
        self.spread()
        conn.executemany(
            "INSERT INTO daily_stats (domain, day, pageviews, visitors, visits, bounces, duration_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (domain, day) DO UPDATE SET "
            "pageviews = pageviews + excluded.pageviews, visitors = visitors + excluded.visitors, "
            "visits = visits + excluded.visits, bounces = bounces + excluded.bounces, "
            "duration_ms = duration_ms + excluded.duration_ms",
            _changed(self.days),
        )
        conn.executemany(
            "INSERT INTO hourly_stats (domain, hour, pageviews, visitors) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (domain, hour) DO UPDATE SET pageviews = pageviews + excluded.pageviews, "
            "visitors = visitors + excluded.visitors",
            _changed(self.hours),
        )
        for table, column, counts in (("page_stats", "pathname", self.pages), ("source_stats", "source", self.sources)):
            conn.executemany(
                f"INSERT INTO {table} (domain, day, {column}, pageviews, visitors) VALUES (?, ?, ?, ?, ?) "
                f"ON CONFLICT (domain, day, {column}) DO UPDATE SET pageviews = pageviews + excluded.pageviews, "
                "visitors = visitors + excluded.visitors",
                _changed(counts),
            )
        conn.executemany(
            "INSERT INTO dimension_stats (domain, dimension, day, value, pageviews, visitors, visits, bounces) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (domain, dimension, day, value) DO UPDATE SET "
            "pageviews = pageviews + excluded.pageviews, visitors = visitors + excluded.visitors, "
            "visits = visits + excluded.visits, bounces = bounces + excluded.bounces",
            _changed(self.dimensions),
        )
        # A visit's exit page moves, and a replay takes back what it had counted: a row can come
        # down to nothing, and then goes, as if it had never been counted.
        conn.executemany(
            "DELETE FROM dimension_stats WHERE domain = ? AND dimension = ? AND day = ? AND value = ? "
            "AND pageviews = 0 AND visitors = 0 AND visits = 0 AND bounces = 0",
            [key for key, values in self.dimensions.items() if min(values) < 0],
        )


def _changed(counts: Mapping[K, list[int]]) -> list[tuple[str | int, ...]]:
    """Rows to add, in key order (neighbouring keys share pages); all-zero changes left out."""
    return [(*key, *values) for key, values in sorted(counts.items()) if any(values)]


def advance(visitor: Visitor, view: View, tally: Tally) -> None:
    """One page view, in time order: count it, extend the current visit or start a new one. A
    visit belongs to the day it started and ends after 30 minutes without a page view. In time
    order, a day or an hour unlike the last view's is one the visitor has not been seen in."""
    day, hour, domain = view.day, view.hour, view.domain
    totals = tally.days[(domain, day)]
    hourly = tally.hours[(domain, hour)]
    page = tally.pages[(domain, day, view.pathname)]
    source = tally.sources[(domain, day, view.source)]
    totals[PAGEVIEWS] += 1
    hourly[0] += 1
    page[0] += 1
    source[0] += 1
    new_day = day != visitor.last_day
    if new_day:
        totals[VISITORS] += 1
    if hour != visitor.last_hour:
        hourly[1] += 1
    day_bits = view.day_number << 40  # dictionary ids are unique across kinds: pages and sources share bits
    if visitor.sighted(day_bits | view.page):
        page[1] += 1
    if visitor.sighted(day_bits | view.src):
        source[1] += 1
    first = visitor.first
    combinations = tally.combinations
    if first is not None and visitor.last_ms >= 0 and view.ts_ms - visitor.last_ms <= VISIT_GAP_MS:
        gap = view.ts_ms - visitor.last_ms
        visit = tally.days[(domain, visitor.visit_day)]
        visit[DURATION] += gap
        if visitor.visit_views == 1:
            visit[BOUNCES] -= 1
            combinations[first.combination][2] -= 1
        _move_exit(visitor, first, view, tally)
        visitor.visit_views += 1
        first.views, first.duration = visitor.visit_views, first.duration + gap
        if first.written:
            tally.touched.append(first)
        view.views = view.duration = view.exit = 0
        view.visit, view.first = visitor.visit, first
        if view.day_number == first.day_number and view.country_id == first.country_id \
                and view.browser_id == first.browser_id and view.os_id == first.os_id \
                and view.device_id == first.device_id:  # the usual case: nothing new to see
            combinations[first.combination][0] += 1
        else:
            key = _combination(view, first)
            combinations[key][0] += 1
            _see_dimensions(visitor, view, first, key, tally, new_day)
    else:
        totals[VISITS] += 1
        totals[BOUNCES] += 1
        visitor.visit, visitor.visit_day, visitor.visit_views = view.id, day, 1
        first = visitor.first = view
        view.views, view.duration, view.exit, view.exit_path = 1, 0, view.page, view.pathname
        view.visit = view.id  # `first` stays None, meaning itself: a cycle would outlive the cache (collector.py)
        key = view.combination = _combination(view, view)
        counts = combinations[key]
        counts[0] += 1
        counts[1] += 1
        counts[2] += 1
        _see_dimensions(visitor, view, view, key, tally, new_day)
        exits = tally.dimensions[(domain, EXIT_PAGE, day, view.pathname)]
        exits[0] += 1
        exits[2] += 1
        exits[3] += 1
        if _add_exit(visitor, view.day_number << 40 | view.page):
            exits[1] += 1
    visitor.last_ms, visitor.last_day, visitor.last_hour = view.ts_ms, day, hour


def _combination(view: View, first: View) -> tuple[str, ...]:
    """What a page view counts under besides its page and source: its own country, browser,
    system and device, its visit's campaign and entry page (see Tally.combinations)."""
    return (view.domain, view.day, view.country, view.browser, view.os, view.device, first.utm_source,
            first.utm_medium, first.utm_campaign, first.pathname)


def _see_dimensions(visitor: Visitor, view: View, first: View, key: tuple[str, ...], tally: Tally,
                    new_day: bool) -> None:
    """A visitor counts once per day and value of each dimension. On its first view of a day
    every value is new, and counts with the view's combination."""
    day_bits = view.day_number << 40
    sightings = (COUNTRY_TAG | day_bits | view.country_id, BROWSER_TAG | day_bits | view.browser_id,
                 OS_TAG | day_bits | view.os_id, DEVICE_TAG | day_bits | view.device_id,
                 UTM_SOURCE_TAG | day_bits | first.utm_source_id, UTM_MEDIUM_TAG | day_bits | first.utm_medium_id,
                 UTM_CAMPAIGN_TAG | day_bits | first.utm_campaign_id, ENTRY_PAGE_TAG | day_bits | first.page)
    if new_day:
        visitor.sighted_all(sightings)
        tally.combinations[key][3] += 1
        return
    domain, day = view.domain, view.day
    for dimension, value, sighting in zip(COMBINED, key[2:], sightings, strict=True):
        if visitor.sighted(sighting):
            tally.dimensions[(domain, dimension, day, value)][1] += 1


def _move_exit(visitor: Visitor, first: View, view: View, tally: Tally) -> None:
    """The visit goes on at `view`: its exit page, and with it the visit's page views, moves
    there (on the day the visit started)."""
    day, before = visitor.visit_day, visitor.visit_views
    old = tally.dimensions[(first.domain, EXIT_PAGE, day, first.exit_path)]
    old[0] -= before
    old[2] -= 1
    if before == 1:
        old[3] -= 1
    new = tally.dimensions[(first.domain, EXIT_PAGE, day, view.pathname)]
    new[0] += before + 1
    new[2] += 1
    day_bits = first.day_number << 40
    if _drop_exit(visitor, day_bits | first.exit):
        old[1] -= 1
    if _add_exit(visitor, day_bits | view.page):
        new[1] += 1
    first.exit, first.exit_path = view.page, view.pathname


def _add_exit(visitor: Visitor, key: int) -> bool:
    """One more of the visitor's visits ends at this (day, page); True if the first."""
    count = visitor.exits.get(key, 0)
    visitor.exits[key] = count + 1
    return count == 0


def _drop_exit(visitor: Visitor, key: int) -> bool:
    """One visit fewer ends at this (day, page); True if it was the last."""
    count = visitor.exits[key] - 1
    if count:
        visitor.exits[key] = count
        return False
    del visitor.exits[key]
    return True


def replay(visitor: Visitor, views: Iterable[View], tally: Tally) -> Visitor:
    for view in views:
        advance(visitor, view, tally)
    return visitor


def in_time_order(visitor: Visitor, views: Sequence[View]) -> bool:
    last = visitor.last_ms
    for view in views:
        if view.ts_ms < last:
            return False
        last = view.ts_ms
    return True


@dataclass
class _Batch:
    """The writes one batch makes, each table once."""

    tally: Tally = field(default_factory=Tally)
    rows: list[tuple[int, ...]] = field(default_factory=list)
    new_visitors: list[tuple[int, int, str]] = field(default_factory=list)
    moved: list[View] = field(default_factory=list)  # rows in the file whose visit columns changed

    def write(self, conn: sqlite3.Connection) -> None:
        conn.executemany(INSERT_ROW, sorted(self.rows))
        conn.executemany("INSERT INTO visitors (visitor_key, visitor, salt_day) VALUES (?, ?, ?)", self.new_visitors)
        changed = {view.id: view for view in (*self.moved, *self.tally.touched)}
        facts, whole = [], []
        for view in changed.values():
            columns = view.visit_columns()
            # What the file holds: `stored` if read back, else what this process wrote, whose
            # visit, campaign and entry never change afterwards (only a replay's views do).
            if not view.stored or view.stored[:5] == columns[:5]:
                facts.append((*columns[5:], *view.key()))
            else:
                whole.append((*columns, *view.key()))
        conn.executemany(UPDATE_VISIT_FACTS, facts)
        conn.executemany(UPDATE_VISIT_COLUMNS, whole)
        self.tally.write(conn)


# -- the read model ------------------------------------------------------------------------------------


class ReadModel:
    """The visitor.tracked handler, its retention and forgetting, and the replay behind rebuild;
    `events` is the visitor.event handler (eventmodel.py).

    Constructed before the store opens, it brings its schema to the store. Its caches are
    touched only on the store's writer thread; a rolled-back transaction empties them."""

    def __init__(self, store: Store, *, cache_size: int = VISITOR_CACHE_SIZE,
                 event_limits: EventLimits | None = None) -> None:
        self.store = store
        self.tz = store.tz
        self._cache_size = cache_size
        self._visitors: OrderedDict[int, Visitor] = OrderedDict()
        # Dictionary ids per kind and value (a dictionary per kind: no key tuple to build per lookup).
        self._dims: defaultdict[str, dict[str, int]] = defaultdict(dict)
        self._values: dict[int, str] = {0: NOT_KNOWN}  # the same entries by id (0: unknown)
        self._next_id: int | None = None
        store.add_migrations(MIGRATIONS)
        store.add_rollback_hook(self._forget_cached)
        self.events = EventCounts(self, store, event_limits or EventLimits())

    def _forget_cached(self) -> None:
        self._visitors.clear()
        self._forget_dims()
        self._next_id = None

    # -- the handler ------------------------------------------------------------------------------

    def record_pageviews(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        """The visitor.tracked.v0 handler: raw rows and rollups, in the router's transaction."""
        if self._next_id is None:
            self._next_id = int(get_meta(conn, NEXT_ID) or 1)
        by_visitor: dict[int, tuple[str, list[View]]] = {}
        for event in events:
            payload = event.payload
            view = self._view(payload, int(event.valid_time.timestamp() * 1000))
            key = key64(payload["domain"], payload["visitorHash"])
            seen = by_visitor.get(key)
            if seen is None:  # one string per day, not per visitor
                by_visitor[key] = (sys.intern(payload["sessionContext"]["dailySaltRotation"]), [view])
            else:
                seen[1].append(view)
        self._resolve_dims(conn, [view for _, views in by_visitor.values() for view in views])
        known = self._known_visitors(conn, [key for key in by_visitor if key not in self._visitors])
        # Before any is remembered: remembering one may push another of this batch out of the cache.
        states = {key: self._visitors.get(key) or known.get(key) for key in by_visitor}
        batch = _Batch()
        for key, (salt_day, views) in by_visitor.items():
            self._remember(key, self._advance(conn, states[key], salt_day, views, key, batch))
        batch.write(conn)
        put_meta(conn, NEXT_ID, str(self._next_id))

    def _view(self, payload: dict[str, Any], ts_ms: int) -> View:
        """A v1 page view with its dimensions; a v0 one (or a v1 one's unknowns) with ''."""
        assert self._next_id is not None
        view_id, self._next_id = self._next_id, self._next_id + 1
        day, hour, day_number = local_day_hour(ts_ms, self.tz)
        domain, referrer = payload["domain"], payload["referrer"]
        view = View(view_id, ts_ms, day, hour, day_number, domain, payload["pathname"], referrer,
                    referrer_source(referrer, domain), payload.get("country") or NOT_KNOWN,
                    payload.get("browser") or NOT_KNOWN, payload.get("os") or NOT_KNOWN,
                    payload.get("device") or NOT_KNOWN)
        utm = payload.get("utm")
        if utm:
            view.utm = utm_text(utm)
            view.utm_source, view.utm_medium, view.utm_campaign = (
                utm.get("source", NOT_KNOWN), utm.get("medium", NOT_KNOWN), utm.get("campaign", NOT_KNOWN))
        return view

    def _advance(self, conn: sqlite3.Connection, visitor: Visitor | None, salt_day: str, views: list[View],
                 key: int, batch: _Batch) -> Visitor:
        """Fold a visitor's new page views into its visits: in time order (the usual case) O(1)
        per view, else by replaying the visitor's day."""
        if visitor is None:
            visitor = Visitor(views[0].id, salt_day)
            batch.new_visitors.append((key, visitor.id, salt_day))
        if not in_time_order(visitor, views):
            return self._replay_day(conn, visitor, views, batch)
        replay(visitor, views, batch.tally)
        _add_rows(batch, visitor.id, views)
        return visitor

    def _replay_day(self, conn: sqlite3.Connection, visitor: Visitor, views: list[View], batch: _Batch) -> Visitor:
        """A view older than the visitor's last one: replay its raw rows with the new views in
        time order, take back what the old replay counted, and write again the rows whose visit
        columns moved."""
        earlier = self._rows_of(conn, [visitor.id]).get(visitor.id, [])
        batch.tally.add(_replayed(visitor, earlier)[1], sign=-1)
        again, tally = _replayed(visitor, sorted(earlier + views, key=lambda v: (v.ts_ms, v.id)))
        batch.tally.add(tally)
        batch.moved.extend(view for view in earlier if view.visit_columns() != view.stored)
        _add_rows(batch, visitor.id, views)
        return again

    def _remember(self, key: int, visitor: Visitor) -> None:
        visitors = self._visitors
        if key in visitors:
            visitors.move_to_end(key)
        visitors[key] = visitor  # a new key goes to the end
        if len(visitors) > self._cache_size:
            visitors.popitem(last=False)

    def _known_visitors(self, conn: sqlite3.Connection, keys: list[int]) -> dict[int, Visitor]:
        """Visitors the cache does not hold but the file does, rebuilt from their raw rows."""
        if not keys:
            return {}
        found = conn.execute(
            "SELECT visitor_key, visitor, salt_day FROM visitors WHERE visitor_key IN (SELECT value FROM json_each(?))",
            (json.dumps(keys),),
        ).fetchall()
        rows = self._rows_of(conn, [row[1] for row in found])
        scratch = Tally()  # what the replays count is counted already: one tally for them all
        return {key: replay(Visitor(number, salt_day), rows.get(number, []), scratch)
                for key, number, salt_day in found}

    def _rows_of(self, conn: sqlite3.Connection, visitors: list[int]) -> dict[int, list[View]]:
        """The raw rows of these visitors, as views in time order, each with its visit columns
        as stored (a replay that changes them writes them again)."""
        rows = conn.execute(
            "SELECT visitor, id, ts_ms, site, page, referrer, source, country, browser, os, device, utm, visit, "
            "utm_source, utm_medium, utm_campaign, entry, views, duration_ms, exit FROM pageview_rows "
            "WHERE visitor IN (SELECT value FROM json_each(?)) ORDER BY visitor, ts_ms, id",
            (json.dumps(visitors),),
        ).fetchall()
        # Their dictionary values from memory (a join per dimension and row cost more than the rest).
        texts = self._texts(conn, {dim_id for row in rows for dim_id in row[3:12]})
        found: dict[int, list[View]] = defaultdict(list)
        for (visitor, view_id, ts_ms, site, page, ref, src, country_id, browser_id, os_id, device_id, utm_id,
             *stored) in rows:
            day, hour, day_number = local_day_hour(ts_ms, self.tz)
            utm = texts[utm_id]
            view = View(view_id, ts_ms, day, hour, day_number, texts[site], texts[page], texts[ref], texts[src],
                        texts[country_id], texts[browser_id], texts[os_id], texts[device_id], utm, site=site,
                        page=page, ref=ref, src=src, country_id=country_id, browser_id=browser_id, os_id=os_id,
                        device_id=device_id, utm_id=utm_id, written=True, stored=tuple(stored))
            view.visit = stored[0]
            if utm:
                parameters = json.loads(utm)
                view.utm_source, view.utm_medium, view.utm_campaign = (
                    parameters.get("source", NOT_KNOWN), parameters.get("medium", NOT_KNOWN),
                    parameters.get("campaign", NOT_KNOWN))
                self._resolve_campaign(conn, view)
            found[visitor].append(view)
        return found

    def _resolve_dims(self, conn: sqlite3.Connection, views: list[View]) -> None:
        """Dictionary ids for the views' values: from memory, else the file, else new."""
        if len(self._values) > DIMS_CACHE_SIZE:
            self._forget_dims()  # a crude bound, rarely reached: the values in use come back at once
        dims, dim = self._dims, self._dim
        sites, pages, referrers, sources = dims[SITE], dims[PAGE], dims[REFERRER], dims[SOURCE]
        countries, browsers, systems, devices = dims[COUNTRY], dims[BROWSER], dims[OS], dims[DEVICE]
        campaigns = dims[UTM]
        for view in views:
            view.site = sites.get(view.domain) or dim(conn, SITE, view.domain)
            view.page = pages.get(view.pathname) or dim(conn, PAGE, view.pathname)
            view.ref = referrers.get(view.referrer) or dim(conn, REFERRER, view.referrer)
            view.src = sources.get(view.source) or dim(conn, SOURCE, view.source)
            if view.country:
                view.country_id = countries.get(view.country) or dim(conn, COUNTRY, view.country)
            if view.browser:
                view.browser_id = browsers.get(view.browser) or dim(conn, BROWSER, view.browser)
            if view.os:
                view.os_id = systems.get(view.os) or dim(conn, OS, view.os)
            if view.device:
                view.device_id = devices.get(view.device) or dim(conn, DEVICE, view.device)
            if view.utm:
                view.utm_id = campaigns.get(view.utm) or dim(conn, UTM, view.utm)
                self._resolve_campaign(conn, view)

    def _resolve_campaign(self, conn: sqlite3.Connection, view: View) -> None:
        """Dictionary ids for a view's own utm_source, utm_medium and utm_campaign."""
        if view.utm_source:
            view.utm_source_id = self.dim(conn, UTM_SOURCE, view.utm_source)
        if view.utm_medium:
            view.utm_medium_id = self.dim(conn, UTM_MEDIUM, view.utm_medium)
        if view.utm_campaign:
            view.utm_campaign_id = self.dim(conn, UTM_CAMPAIGN, view.utm_campaign)

    # -- what the custom events share (eventmodel.Shared) ---------------------------------------------

    def local_day(self, ts_ms: int) -> tuple[str, int]:
        day, _, number = local_day_hour(ts_ms, self.tz)
        return day, number

    def dim(self, conn: sqlite3.Connection, kind: str, value: str) -> int:
        return self._dims[kind].get(value) or self._dim(conn, kind, value)

    def take_ids(self, conn: sqlite3.Connection, count: int) -> int:
        if self._next_id is None:
            self._next_id = int(get_meta(conn, NEXT_ID) or 1)
        first, self._next_id = self._next_id, self._next_id + count
        put_meta(conn, NEXT_ID, str(self._next_id))
        return first

    def visitor_numbers(self, conn: sqlite3.Connection,
                        visitors: Mapping[tuple[str, str], str]) -> dict[tuple[str, str], int]:
        """The number the rows of each (domain, visitor hash) carry, given with its salt day: from
        the cache, else the file, else a new one, linked as a first page view links it (an event
        can come before the visitor's first page view, which then finds the link)."""
        keys = {who: key64(*who) for who in visitors}
        numbers = {who: cached.id for who, key in keys.items() if (cached := self._visitors.get(key)) is not None}
        missing = [key for who, key in keys.items() if who not in numbers]
        stored: dict[int, int] = dict(conn.execute(
            "SELECT visitor_key, visitor FROM visitors WHERE visitor_key IN (SELECT value FROM json_each(?))",
            (json.dumps(missing),),
        ).fetchall()) if missing else {}
        new = [who for who, key in keys.items() if who not in numbers and key not in stored]
        numbers.update((who, stored[key]) for who, key in keys.items() if key in stored)
        first = self.take_ids(conn, len(new)) if new else 0
        links = []
        for number, who in enumerate(new, start=first):
            numbers[who] = number
            links.append((keys[who], number, visitors[who]))
            self._remember(keys[who], Visitor(number, visitors[who]))  # no page views yet
        conn.executemany("INSERT INTO visitors (visitor_key, visitor, salt_day) VALUES (?, ?, ?)", links)
        return numbers

    def _dim(self, conn: sqlite3.Connection, kind: str, value: str) -> int:
        row = conn.execute("SELECT id FROM dims WHERE kind = ? AND value = ?", (kind, value)).fetchone()
        dim_id = int(row[0]) if row else int(
            conn.execute("INSERT INTO dims (kind, value) VALUES (?, ?)", (kind, value)).lastrowid or 0
        )
        self._dims[kind][value] = dim_id
        self._values[dim_id] = value
        return dim_id

    def _forget_dims(self) -> None:
        self._dims.clear()
        self._values.clear()
        self._values[0] = NOT_KNOWN

    def _texts(self, conn: sqlite3.Connection, ids: set[int]) -> dict[int, str]:
        """Dictionary values by id: from memory, else from the file (and then remembered)."""
        values = self._values
        missing = [dim_id for dim_id in ids if dim_id not in values]
        if missing:
            for dim_id, kind, value in conn.execute(
                "SELECT id, kind, value FROM dims WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(missing),)
            ):
                self._dims[kind][value] = dim_id
                values[dim_id] = value
        return values

    # -- the sites counted (MAX_SITES) ----------------------------------------------------------------

    async def counted_domains(self) -> set[str]:
        """Every domain with a counted page view (one index seek per domain of daily_stats, not
        a scan of every day), and every domain of an event on its way here: still in the outbox,
        or (local mode, where page views go straight into the event log) logged after the local
        sink's cursor when the last run stopped. Read at start-up: a file too damaged to read
        them raises DatabaseUnusableError."""
        waiting = "SELECT DISTINCT payload ->> '$.domain' FROM outbox"
        if self.store.log_directly:
            waiting += (" UNION SELECT DISTINCT payload ->> '$.domain' FROM event_log WHERE seq > coalesce("
                        f"(SELECT CAST(value AS INTEGER) FROM meta WHERE key = '{LOCAL_CURSOR}'), 0)")
        try:
            rows = await self.store.reader.execute_fetchall(
                "WITH RECURSIVE d(domain) AS (SELECT min(domain) FROM daily_stats UNION ALL SELECT "
                "(SELECT min(domain) FROM daily_stats WHERE domain > d.domain) FROM d WHERE d.domain IS NOT NULL) "
                f"SELECT domain FROM d WHERE domain IS NOT NULL UNION {waiting}"
            )
        except sqlite3.DatabaseError as error:
            raise DatabaseUnusableError(unusable(self.store.path, error)) from error
        return {str(row[0]) for row in rows if row[0] is not None}

    # -- forgetting, retention and rebuild --------------------------------------------------------

    async def forget_expired_visitors(self, today_utc: date) -> int:
        """Delete the links from visitor hashes whose salt day ended more than a day ago; the
        raw rows keep their visitor numbers, which now lead nowhere, and aggregates stay."""
        cutoff = (today_utc - timedelta(days=1)).isoformat()

        def work(conn: sqlite3.Connection) -> int:
            for key in [key for key, visitor in self._visitors.items() if visitor.salt_day < cutoff]:
                del self._visitors[key]
            return int(conn.execute("DELETE FROM visitors WHERE salt_day < ?", (cutoff,)).rowcount)

        deleted = await self.store.write(work)
        if deleted:
            logger.info("forgot %d visitor hash links from before %s", deleted, cutoff)
        return deleted

    async def delete_rows_before(self, cutoff: date, chunk: int = 5000) -> int:
        """Raw page views of local days before the cutoff; aggregates stay."""
        return await self.delete_raw_rows("pageview_rows", "(site, day, ts_ms, id)", cutoff, chunk)

    async def delete_raw_rows(self, table: str, key: str, cutoff: date, chunk: int = 5000) -> int:
        """Raw rows (page views', or events': eventmodel.Shared) of local days before the cutoff,
        site by site, in small transactions so page views keep flowing while a large backlog is
        cut. `key` is the table's primary key, which leads with (site, day)."""
        before = day_number(cutoff)

        def work(conn: sqlite3.Connection) -> int:
            deleted = 0
            for (site,) in conn.execute("SELECT id FROM dims WHERE kind = ?", (SITE,)).fetchall():
                deleted += conn.execute(
                    f"DELETE FROM {table} WHERE {key} IN (SELECT {key[1:-1]} FROM {table} WHERE site = ? AND day < ? "
                    "LIMIT ?)",
                    (site, before, chunk - deleted),
                ).rowcount
                if deleted >= chunk:
                    break
            return deleted

        total = 0
        while (deleted := await self.store.write(work)) > 0:
            total += deleted
        return total

    async def rebuild(self, from_day: str, progress: Callable[[int, int], None]) -> tuple[int, int]:
        """Recompute the read model from from_day on by replaying the logged page views, then the
        logged custom events, that live processing counted, each in log order, through the same
        handlers, in ONE transaction: a failed rebuild changes nothing. Returns (replayed,
        replayable).

        Page views first: an event finds its visitor's number whether its page views came before
        or after it (live, whichever came first made the link), and what the events' tables hold
        depends only on the order of the events among themselves."""
        return await self.store.write(lambda conn: self._replay_log(conn, from_day, progress))

    def _replay_log(self, conn: sqlite3.Connection, from_day: str, progress: Callable[[int, int], None]
                    ) -> tuple[int, int]:
        self._clear(conn, from_day)
        # Page views of both versions in log order, whichever was written, then the custom events.
        handlers = (((VISITOR_TRACKED.event_type, VISITOR_TRACKED_V1.event_type), self.record_pageviews),
                    ((VISITOR_EVENT.event_type,), self.events.record))
        total = sum(self.store.count_replayable(conn, kinds) for kinds, _ in handlers)
        done = replayed = 0
        progress(done, total)
        for kinds, handler in handlers:
            seq = 0
            while batch := self.store.replayable_events(conn, kinds, seq, REBUILD_BATCH):
                events = [event for event in map(Event.from_log, batch) if self._local_day(event) >= from_day]
                if events:
                    handler(conn, events)
                seq, done, replayed = batch[-1].seq, done + len(batch), replayed + len(events)
                progress(done, total)
        return replayed, total

    def _clear(self, conn: sqlite3.Connection, from_day: str) -> None:
        """The aggregates and raw rows of from_day on, and every visitor link (the replay puts
        back those still needed)."""
        self._forget_cached()
        for table in ("daily_stats", "page_stats", "source_stats", "dimension_stats"):
            conn.execute(f"DELETE FROM {table} WHERE day >= ?", (from_day,))
        conn.execute("DELETE FROM hourly_stats WHERE hour >= ?", (from_day,))
        conn.execute("DELETE FROM pageview_rows WHERE day >= ?", (day_number(date.fromisoformat(from_day)),))
        conn.execute("DELETE FROM visitors")
        self.events.clear(conn, from_day, day_number(date.fromisoformat(from_day)))

    def _local_day(self, event: Event) -> str:
        return local_day_hour(int(event.valid_time.timestamp() * 1000), self.tz)[0]


def _add_rows(batch: _Batch, visitor: int, views: Sequence[View]) -> None:
    """A visitor's new rows, once its views of this batch are counted (a first view's visit
    facts are then what this batch leaves them)."""
    rows = batch.rows
    for view in views:
        rows.append(view.row(visitor))
        view.written = True


# json.dumps with these options builds an encoder per call; one made once encodes the same.
_UTM_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def utm_text(utm: Mapping[str, str]) -> str:
    """A page view's campaign parameters as one dictionary value: JSON, keys in order."""
    return _UTM_ENCODER.encode(utm)


def _replayed(start: Visitor, views: Iterable[View]) -> tuple[Visitor, Tally]:
    """A visitor's page views from the start of its day, counted afresh."""
    tally = Tally()
    return replay(Visitor(start.id, start.salt_day), views, tally), tally


# -- derived keys, days, sources -----------------------------------------------------------------------


def key64(*parts: str) -> int:
    """A signed 64-bit key from BLAKE2b over the parts: an SQLite integer primary key. Parts
    are joined with a separator no valid part contains; surrogatepass keeps any string hashable."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


EPOCH = date(1970, 1, 1)


def day_number(day: date) -> int:
    return (day - EPOCH).days


@lru_cache(maxsize=4096)
def _local_minute(minute: int, tz: ZoneInfo) -> tuple[str, str, int]:
    moment = datetime.fromtimestamp(minute * 60, tz)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m-%dT%H"), day_number(moment.date())


def local_day_hour(ts_ms: int, tz: ZoneInfo) -> tuple[str, str, int]:
    """The day, the hour and the day's number in TIMEZONE. Every UTC offset in use is a whole
    number of minutes, so one cached lookup per minute serves every event in it."""
    return _local_minute(ts_ms // 60_000, tz)


def _bare_host(host: str) -> str:
    host = host.lower().rstrip(".")
    return host[4:] if host.startswith("www.") else host


@lru_cache(maxsize=4096)
def referrer_source(referrer: str, domain: str) -> str:
    """The referrer's host without www.; an empty or same-site referrer is (direct)."""
    if not referrer:
        return DIRECT
    try:
        host = urlsplit(referrer if "//" in referrer else "//" + referrer).hostname
    except ValueError:
        host = None
    if not host or any(c.isspace() for c in host):
        return UNKNOWN_SOURCE
    host = _bare_host(host)
    return DIRECT if host == _bare_host(domain) else host
