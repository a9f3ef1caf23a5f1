"""Custom events in the read model: per site and local day, each event name's count and unique
visitors and each property value's count (rollups, kept for good), and one raw row per event
(kept RAW_RETENTION_DAYS), built from visitor.event.v0 events a batch at a time, on the store's
writer thread, inside the router's transaction.

A module of its own because readmodel.py is the page views' arithmetic (visits, bounces, the
visitor cache) and long already. The two share three things, which the ReadModel lends through
`Shared`: dictionary ids (`dims`), visitor numbers (an event and the page views of one visitor
and salt day carry the same number, so an `event:<name>` filter can join them), and the raw row
id sequence.

Bounded: per site and local day, at most `names_per_day` distinct names and
`property_values_per_day` rows of (name, property, value); beyond them an event counts under
`(other)` (see `_Day`), so a page that sends a new name or value with every event cannot grow
the file without limit. Which names and values fit under a bound depends on the order events
are counted in: the event log's, which rebuild replays, so it builds the same tables.

Unique visitors are exact, as the page views' are: a visitor is a (domain, visitor hash) pair,
so one salt day's, and whether it did a name before on the same local day is read from the raw
rows of that day (one query per batch)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

from pathways import Event
from store import Migration, Store

logger = logging.getLogger(__name__)

OTHER = "(other)"
# Kinds in `dims`: an event's name, and the page views' site and page (readmodel.SITE, readmodel.PAGE).
EVENT, SITE, PAGE = "event", "site", "page"
DEFAULT_NAMES_PER_DAY = 100
DEFAULT_PROPERTY_VALUES_PER_DAY = 1000

SCHEMA_0004 = """
-- Per site, local day and event name: events and unique visitors. `name` is the name as counted:
-- (other) for the names beyond EVENT_NAMES_PER_DAY that day.
CREATE TABLE event_stats (
    domain TEXT NOT NULL,
    day TEXT NOT NULL,
    name TEXT NOT NULL,
    events INTEGER NOT NULL,
    visitors INTEGER NOT NULL,
    PRIMARY KEY (domain, day, name)
) WITHOUT ROWID;
-- Per site, local day, event name, property and value: events. At most
-- EVENT_PROPERTY_VALUES_PER_DAY rows a site and day, then (name, property, '(other)') for a property
-- that has a row already and (name, '(other)', '(other)') for one that has not. Numbers and
-- booleans as JSON writes them (3, 9.5, true). Events counted under the name (other) have no rows.
CREATE TABLE event_prop_stats (
    domain TEXT NOT NULL,
    day TEXT NOT NULL,
    name TEXT NOT NULL,
    prop TEXT NOT NULL,
    value TEXT NOT NULL,
    events INTEGER NOT NULL,
    PRIMARY KEY (domain, day, name, prop, value)
) WITHOUT ROWID;
-- One row per event, kept RAW_RETENTION_DAYS. Clustered by site, local day, counted name and
-- visitor: whether a visitor did a name before that day is one key lookup, the visitors who did
-- a name on a site's days are one range (what an event:<name> filter joins to pageview_rows on
-- (site, day, visitor)), and retention cuts (site, day) ranges as for page views.
CREATE TABLE event_rows (
    site INTEGER NOT NULL,      -- dims: site
    day INTEGER NOT NULL,       -- the local day, as days since 1970-01-01
    name INTEGER NOT NULL,      -- dims: event, the name as counted
    visitor INTEGER NOT NULL,   -- the number the visitor's page view rows carry
    ts_ms INTEGER NOT NULL,
    id INTEGER NOT NULL,        -- from the page view rows' sequence (meta read_model_next_id)
    page INTEGER NOT NULL,      -- dims: page, where it happened
    PRIMARY KEY (site, day, name, visitor, ts_ms, id)
) WITHOUT ROWID;
CREATE VIEW custom_events AS
SELECT r.id, s.value AS domain, date(r.day * 86400, 'unixepoch') AS day, n.value AS name, r.visitor, r.ts_ms,
       p.value AS pathname
FROM event_rows r JOIN dims s ON s.id = r.site JOIN dims n ON n.id = r.name JOIN dims p ON p.id = r.page
"""

MIGRATIONS: tuple[Migration, ...] = (("0004_custom_events", SCHEMA_0004),)
ROLLUPS = ("event_stats", "event_prop_stats")


@dataclass(frozen=True)
class EventLimits:
    """EVENT_NAMES_PER_DAY and EVENT_PROPERTY_VALUES_PER_DAY."""

    names_per_day: int = DEFAULT_NAMES_PER_DAY
    property_values_per_day: int = DEFAULT_PROPERTY_VALUES_PER_DAY


class Shared(Protocol):
    """What the page views' read model lends the events' (readmodel.ReadModel)."""

    def local_day(self, ts_ms: int) -> tuple[str, int]:
        """The local day as the rollups label it, and as days since 1970-01-01."""

    def dim(self, conn: sqlite3.Connection, kind: str, value: str) -> int:
        """The dictionary id of a value, new if need be."""

    def visitor_numbers(self, conn: sqlite3.Connection,
                        visitors: Mapping[tuple[str, str], str]) -> dict[tuple[str, str], int]:
        """The number of each (domain, visitor hash) with its salt day, new if need be."""

    def take_ids(self, conn: sqlite3.Connection, count: int) -> int:
        """The first of `count` fresh raw row ids."""

    async def delete_raw_rows(self, table: str, key: str, cutoff: date, chunk: int) -> int:
        """A raw table's rows of local days before the cutoff, site by site, in small transactions."""


def property_text(value: str | int | float | bool) -> str:
    """A property value as the rollups keep it: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(slots=True)
class _Item:
    """One event as counted: its name and properties after the bounds."""

    domain: str
    day: str
    day_number: int
    ts_ms: int
    name: str
    pathname: str
    who: tuple[str, str]  # (domain, visitor hash)
    salt_day: str
    props: list[tuple[str, str]]


DayKey = tuple[str, str]  # (domain, local day)
Triple = tuple[str, str, str]  # (name, property, value)


@dataclass
class _Day:
    """What a site's day holds already, as far as this batch needs to know, and the bounds.

    Names: a known name counts under itself; a new one too while the day has fewer than
    names_per_day, else under (other). Property rows: while the day has fewer than
    property_values_per_day, any (name, property, value) counts under itself; after that a known
    row still does, a new value of a property that has a row counts under (name, property,
    (other)), and a property with no row yet under (name, (other), (other)). So a day holds at
    most names_per_day + 1 names and 2 * property_values_per_day + names_per_day + 1 property rows."""

    limits: EventLimits
    names: set[str]
    rows: int  # property rows the day has
    # Known rows and properties: every one of the day's when the batch could reach the bound (see
    # EventCounts._load); otherwise left empty, since every value then fits and needs no look-up.
    triples: set[Triple] = field(default_factory=set)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    precise: bool = False

    def name_for(self, name: str) -> str:
        if name in self.names:
            return name
        if len(self.names) - (OTHER in self.names) >= self.limits.names_per_day:
            return OTHER
        self.names.add(name)
        return name

    def property_for(self, name: str, prop: str, value: str) -> tuple[str, str]:
        triple = (name, prop, value)
        if not self.precise:  # the batch cannot reach the bound: every row counts under itself
            return prop, value
        if triple in self.triples:
            return prop, value
        if self.rows < self.limits.property_values_per_day:
            counted = triple
        elif (name, prop) in self.pairs:
            counted = (name, prop, OTHER)
        else:
            counted = (name, OTHER, OTHER)
        if counted not in self.triples:
            self.triples.add(counted)
            self.pairs.add(counted[:2])
            self.rows += 1
        return counted[1], counted[2]


class EventCounts:
    """The visitor.event.v0 handler, its raw rows' retention, and what rebuild clears."""

    def __init__(self, shared: Shared, store: Store, limits: EventLimits) -> None:
        self.shared = shared
        self.store = store
        self.limits = limits
        store.add_migrations(MIGRATIONS)

    # -- the handler ---------------------------------------------------------------------------------

    def record(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        """Count a batch of events, in order: bounds, unique visitors, raw rows and rollups,
        each table written once."""
        items = [self._item(event) for event in events]
        days = self._load(conn, items)
        for item in items:
            day = days[(item.domain, item.day)]
            item.name = day.name_for(item.name)
            item.props = [] if item.name == OTHER else [day.property_for(item.name, *pair) for pair in item.props]
        numbers = self.shared.visitor_numbers(conn, {item.who: item.salt_day for item in items})
        first_id = self.shared.take_ids(conn, len(items))
        dim = self.shared.dim
        rows = [
            (dim(conn, SITE, item.domain), item.day_number, dim(conn, EVENT, item.name), numbers[item.who],
             item.ts_ms, first_id + index, dim(conn, PAGE, item.pathname))
            for index, item in enumerate(items)
        ]
        new_visitors = self._first_sightings(conn, rows)
        totals: defaultdict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        values: defaultdict[tuple[str, str, str, str, str], int] = defaultdict(int)
        for item, row in zip(items, rows, strict=True):
            counts = totals[(item.domain, item.day, item.name)]
            counts[0] += 1
            if row[:4] in new_visitors:  # the visitor's first event of this name today
                new_visitors.remove(row[:4])
                counts[1] += 1
            for prop, value in item.props:
                values[(item.domain, item.day, item.name, prop, value)] += 1
        conn.executemany("INSERT INTO event_rows (site, day, name, visitor, ts_ms, id, page) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", sorted(rows))
        conn.executemany(
            "INSERT INTO event_stats (domain, day, name, events, visitors) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (domain, day, name) DO UPDATE SET events = events + excluded.events, "
            "visitors = visitors + excluded.visitors",
            [(*key, *counts) for key, counts in sorted(totals.items())],
        )
        conn.executemany(
            "INSERT INTO event_prop_stats (domain, day, name, prop, value, events) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (domain, day, name, prop, value) DO UPDATE SET events = events + excluded.events",
            [(*key, count) for key, count in sorted(values.items())],
        )

    def _item(self, event: Event) -> _Item:
        payload: dict[str, Any] = event.payload
        ts_ms = int(event.valid_time.timestamp() * 1000)
        day, day_number = self.shared.local_day(ts_ms)
        domain = payload["domain"]
        props = [(key, property_text(value)) for key, value in payload["props"].items()]
        return _Item(domain, day, day_number, ts_ms, payload["name"], payload["pathname"],
                     (domain, payload["visitorHash"]), payload["sessionContext"]["dailySaltRotation"], props)

    def _load(self, conn: sqlite3.Connection, items: list[_Item]) -> dict[DayKey, _Day]:
        """Each day's names and property row count; and where the batch's new rows could reach
        the bound, every property row the day has (at most twice the bound and a name each).

        Texts are looked up with bound parameters, one day at a time (a batch has a day or two
        of a site or a few), never through json_each: SQLite's JSON functions cut a string at a
        NUL character, which a name or a property may hold."""
        days: dict[DayKey, _Day] = {}
        candidates: defaultdict[DayKey, set[Triple]] = defaultdict(set)
        for item in items:  # the rows the item's properties could make, before the bounds
            candidates[(item.domain, item.day)].update((item.name, prop, value) for prop, value in item.props)
        for key in sorted({(item.domain, item.day) for item in items}):
            names = {name for (name,) in conn.execute(
                "SELECT name FROM event_stats WHERE domain = ? AND day = ?", key)}
            rows = int(conn.execute("SELECT count(*) FROM event_prop_stats WHERE domain = ? AND day = ?",
                                    key).fetchone()[0])
            day = days[key] = _Day(self.limits, names, rows)
            if rows + len(candidates[key]) > self.limits.property_values_per_day:
                day.precise = True
                day.triples = set(conn.execute(
                    "SELECT name, prop, value FROM event_prop_stats WHERE domain = ? AND day = ?", key).fetchall())
                day.pairs = {(name, prop) for name, prop, _ in day.triples}
        return days

    @staticmethod
    def _first_sightings(conn: sqlite3.Connection, rows: Sequence[tuple[int, ...]]) -> set[tuple[int, ...]]:
        """The (site, day, name, visitor) of the batch that the raw rows do not have yet: each is
        a visitor doing a name for the first time that day."""
        seen = {row[:4] for row in rows}
        found = conn.execute(
            "SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3 FROM json_each(?) j WHERE EXISTS "
            "(SELECT 1 FROM event_rows r WHERE r.site = j.value ->> 0 AND r.day = j.value ->> 1 "
            "AND r.name = j.value ->> 2 AND r.visitor = j.value ->> 3)",
            (json.dumps(sorted(seen)),),
        ).fetchall()
        return seen - {tuple(row) for row in found}

    # -- retention and rebuild ------------------------------------------------------------------

    async def delete_rows_before(self, cutoff: date, chunk: int = 5000) -> int:
        """Raw event rows of local days before the cutoff, as the page views'; the rollups stay."""
        return await self.shared.delete_raw_rows("event_rows", "(site, day, name, visitor, ts_ms, id)", cutoff, chunk)

    def clear(self, conn: sqlite3.Connection, from_day: str, from_day_number: int) -> None:
        """The rollups and raw rows of from_day on, before rebuild replays them."""
        for table in ROLLUPS:
            conn.execute(f"DELETE FROM {table} WHERE day >= ?", (from_day,))
        conn.execute("DELETE FROM event_rows WHERE day >= ?", (from_day_number,))

