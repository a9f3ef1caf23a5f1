"""The SQLite file: schema and migrations, the single writer with group commit, the outbox,
the local event log, pathway state, and the read model built from page view events."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time as clock
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import aiosqlite

from logrepeats import ALWAYS_LOG

if TYPE_CHECKING:
    from pathways import Event

logger = logging.getLogger(__name__)

DB_FILENAME = "collector.sqlite3"
QUICK_CHECK_SECONDS = 5.0  # the most start-up spends on PRAGMA quick_check
OUTAGE_LOG_INTERVAL = 60.0  # seconds: a storage outage that starts sooner after the last one is not logged again
PROBE_INTERVAL = 1.0  # seconds between two write probes of /health while writes fail
VISIT_GAP_MS = 30 * 60 * 1000
INGEST_PRIORITY_WAIT = 0.1  # seconds a read model transaction yields to waiting page views
DIRECT = "(direct)"
UNKNOWN_SOURCE = "(unknown)"

SCHEMA_0001 = """
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a sent row's seq is never reused
    flow_type TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    collected_at TEXT NOT NULL
);
CREATE TABLE event_log (
    seq INTEGER PRIMARY KEY,                -- the outbox seq, so the log keeps collection order
    event_id TEXT NOT NULL UNIQUE,
    flow_type TEXT NOT NULL,
    event_type TEXT NOT NULL,
    time_bucket TEXT NOT NULL,
    valid_time TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE pathway_state (
    event_id TEXT PRIMARY KEY,
    pathway TEXT NOT NULL,
    processed_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE pathway_failures (
    event_id TEXT PRIMARY KEY,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE dead_letters (
    event_id TEXT PRIMARY KEY,
    pathway TEXT NOT NULL,
    envelope TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

CREATE TABLE daily_stats (
    domain TEXT NOT NULL,
    day TEXT NOT NULL,
    pageviews INTEGER NOT NULL,
    visitors INTEGER NOT NULL,
    visits INTEGER NOT NULL,
    bounces INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (domain, day)
) WITHOUT ROWID;
CREATE TABLE hourly_stats (
    domain TEXT NOT NULL,
    hour TEXT NOT NULL,
    pageviews INTEGER NOT NULL,
    visitors INTEGER NOT NULL,
    PRIMARY KEY (domain, hour)
) WITHOUT ROWID;
CREATE TABLE page_stats (
    domain TEXT NOT NULL,
    day TEXT NOT NULL,
    pathname TEXT NOT NULL,
    pageviews INTEGER NOT NULL,
    visitors INTEGER NOT NULL,
    PRIMARY KEY (domain, day, pathname)
) WITHOUT ROWID;
CREATE TABLE source_stats (
    domain TEXT NOT NULL,
    day TEXT NOT NULL,
    source TEXT NOT NULL,
    pageviews INTEGER NOT NULL,
    visitors INTEGER NOT NULL,
    PRIMARY KEY (domain, day, source)
) WITHOUT ROWID;
CREATE TABLE pageviews (
    id INTEGER PRIMARY KEY,
    domain TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    day TEXT NOT NULL,
    pathname TEXT NOT NULL,
    referrer TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX pageviews_domain_ts ON pageviews (domain, ts_ms);

-- What is derived from visitor hashes lives only in these three tables, and only until the
-- end of the UTC day after the one their salt belongs to (forget_expired_visitors). Keys are
-- 64 bits of BLAKE2b over the domain, the hash (and for `seen`, what was seen): small keys
-- keep the inserts fast, and the hashes themselves are not kept.
CREATE TABLE visitor_state (
    visitor_key INTEGER PRIMARY KEY,
    domain TEXT NOT NULL,
    salt_day TEXT NOT NULL,
    last_ms INTEGER NOT NULL,
    visit_start_ms INTEGER NOT NULL,
    visit_pageviews INTEGER NOT NULL
);
CREATE INDEX visitor_state_domain_last ON visitor_state (domain, last_ms);  -- current visitors
CREATE TABLE visitor_hits (
    visitor_key INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    salt_day TEXT NOT NULL
);
CREATE INDEX visitor_hits_visitor ON visitor_hits (visitor_key, ts_ms);
CREATE TABLE seen (
    seen_key INTEGER PRIMARY KEY,   -- a visitor seen on a page, or coming from a source, on a day
    salt_day TEXT NOT NULL
);
"""

SCHEMA_0002 = """
-- Page views not counted, per domain (or '*' for domains outside ALLOWED_DOMAINS), local day
-- and reason: the only trace a dropped request leaves.
CREATE TABLE dropped_pageviews (
    domain TEXT NOT NULL,
    day TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (domain, day, reason)
) WITHOUT ROWID;
-- PRIVACY_MODE=ephemeral: one random salt per UTC day, shared by every collector on this file,
-- deleted once its day and the next are over (forget_salts).
CREATE TABLE salts (
    day TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    created_at TEXT NOT NULL
);
"""

MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("0001_initial", SCHEMA_0001),
    ("0002_dropped_pageviews_and_salts", SCHEMA_0002),
)


class StoreClosedError(RuntimeError):
    """The store was closed while a write was waiting."""


class DatabaseUnusableError(RuntimeError):
    """The database file cannot be used at all (corrupt, not a database, from a newer version):
    start-up stops with this message, which names the file and what is wrong."""


class StorageUnavailableError(RuntimeError):
    """A write failed because the storage did (disk full, I/O error, read-only): an outage, not
    a bug. Nothing of the failed transaction was kept; the caller may try again later."""


class ReadersBusyError(RuntimeError):
    """Too many statistics requests are already waiting for a connection."""


# SQLite's primary result codes that mean the storage, not the statement, failed.
STORAGE_FAILURES = frozenset({
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB,
})


def is_storage_failure(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.Error) and code is not None and code & 0xFF in STORAGE_FAILURES


@dataclass(frozen=True)
class WriteFailure:
    """The last failed write, for /health: what SQLite said, since when, how many failed since."""

    error: str
    since: float  # seconds since the epoch
    count: int


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    flow_type: str
    event_type: str
    payload: str
    collected_at: str


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One event of the local event log, as the local sink recorded it."""

    seq: int
    event_id: str
    flow_type: str
    event_type: str
    time_bucket: str
    valid_time: str
    payload: str


def iso_ms(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as Flowcore writes times."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


class Store:
    """One SQLite file in WAL mode: a single writer connection, a separate reader for the
    emitter and the store's own reads, and a small pool of statistics readers (`reading()`)."""

    def __init__(
        self,
        path: Path,
        tz: ZoneInfo,
        *,
        commit_max_events: int = 512,
        commit_delay: float = 0.001,
    ) -> None:
        self.path = path
        self.tz = tz
        self.outbox_changed = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._durable = False
        self._ingest_idle = asyncio.Event()  # set while no page view waits for its commit
        self._ingest_idle.set()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._group = _GroupCommit(self, commit_max_events, commit_delay)
        self._salts_in_wal = False  # a deleted salt may still be in the WAL's older frames
        self.outbox_commits = 0  # how many commits served how many appends: group commit at work
        self.outbox_appends = 0
        self.write_failure: WriteFailure | None = None  # set while writes fail, for /health
        self._outage_logged_at = -OUTAGE_LOG_INTERVAL
        self._outage_logged = False
        self._probed_at = -PROBE_INTERVAL
        self._statistics = _ReaderPool(path, STATISTICS_READERS, STATISTICS_QUEUE)

    async def open(self) -> None:
        """Open, check and migrate the file. A file that cannot be used raises
        DatabaseUnusableError naming it and what is wrong, with every connection closed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await aiosqlite.connect(self.path, isolation_level=None)
            await self._check_and_migrate()
            self._reader = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True)
            await self._reader.execute("PRAGMA busy_timeout = 5000")
        except (sqlite3.Error, StorageUnavailableError) as error:
            await self._close_connections()
            cause = error.__cause__ if isinstance(error, StorageUnavailableError) else error
            raise DatabaseUnusableError(_unusable(self.path, cause)) from error
        except BaseException:
            await self._close_connections()  # an open connection's thread would keep the process alive
            raise
        self._group.start()

    async def _check_and_migrate(self) -> None:
        for pragma in (
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = NORMAL",
            "PRAGMA busy_timeout = 5000",
            "PRAGMA cache_size = -16000",  # 16 MB: the read model's hot pages stay in memory
            # Deleted rows are zeroed in their page where that costs no extra I/O: a deleted
            # ephemeral salt must not linger in the file (forget_salts also truncates the WAL).
            "PRAGMA secure_delete = FAST",
        ):
            await self.writer.execute(pragma)
        await self._check_integrity()
        await self._migrate()

    async def _check_integrity(self) -> None:
        """quick_check reads every page once: a corrupt file stops start-up with its first
        problem, instead of failing page views one by one later. It takes about 2 s for a
        130 MB file in the page cache, 10 s from a cold disk (measured), so it gets
        QUICK_CHECK_SECONDS; a larger file starts without it finishing (corruption then shows
        as failed writes, in /health)."""
        started = clock.monotonic()
        # A connection of its own: an interrupted statement can leave its connection interrupted.
        async with aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
            interrupter = asyncio.create_task(_interrupt_after(conn, QUICK_CHECK_SECONDS))
            try:
                rows = await conn.execute_fetchall("PRAGMA quick_check(1)")
            except sqlite3.OperationalError as error:
                if "interrupted" not in str(error):
                    raise
                size = self.path.stat().st_size / 1e6
                logger.info("the integrity check of %s (%.0f MB) did not finish within %g s; starting without it",
                            self.path, size, QUICK_CHECK_SECONDS)
                return
            finally:
                interrupter.cancel()
        verdict = str(next(iter(rows))[0]) if rows else "no answer"
        verdict = " ".join(verdict.replace("*** in database main ***", "").split())  # one line
        if verdict != "ok":
            raise DatabaseUnusableError(f"{self.path} is corrupt (SQLite's quick_check: {verdict}); restore it from "
                                        "a backup, or move it away to start with an empty database")
        logger.debug("quick_check of %s: ok in %.2f s", self.path, clock.monotonic() - started)

    async def close(self) -> None:
        """Commit what is pending, then close every connection. Safe to call twice."""
        await self._group.stop()
        if self._writer is not None:
            with suppress(sqlite3.Error):  # on a full disk the checkpoint fails; the WAL keeps it all
                await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a small file behind
        await self._close_connections()

    async def _close_connections(self) -> None:
        await self._statistics.close()
        for conn in (self._reader, self._writer):
            if conn is not None:
                with suppress(Exception):
                    await conn.close()
        self._reader = self._writer = None

    @asynccontextmanager
    async def reading(self, *, may_refuse: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """A statistics connection of its own, never the one the emitter reads the outbox with:
        at most STATISTICS_READERS run at once, STATISTICS_QUEUE more may wait (beyond,
        ReadersBusyError, unless may_refuse is False: a stream already started). Their threads
        run at a lower scheduling priority, so page views go first."""
        if self._writer is None:
            raise StoreClosedError("the store is not open")
        async with self._statistics.connection(may_refuse) as conn:
            yield conn

    def statistics_load(self) -> dict[str, int]:
        """How many statistics requests hold a connection, and how many wait for one."""
        return self._statistics.load()

    async def counted_domains(self) -> set[str]:
        """Every domain with a counted page view: in the read model (one index seek per domain,
        not a scan of every day) or still on its way there in the outbox. Read at start-up: a
        file too damaged to read them raises DatabaseUnusableError."""
        try:
            rows = await self.reader.execute_fetchall(
                "WITH RECURSIVE d(domain) AS (SELECT min(domain) FROM daily_stats UNION ALL SELECT "
                "(SELECT min(domain) FROM daily_stats WHERE domain > d.domain) FROM d WHERE d.domain IS NOT NULL) "
                "SELECT domain FROM d WHERE domain IS NOT NULL "
                "UNION SELECT DISTINCT payload ->> '$.domain' FROM outbox WHERE event_type = 'visitor.tracked.v0'"
            )
        except sqlite3.DatabaseError as error:
            raise DatabaseUnusableError(_unusable(self.path, error)) from error
        return {str(row[0]) for row in rows if row[0] is not None}

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StoreClosedError("the store is not open")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreClosedError("the store is not open")
        return self._reader

    @asynccontextmanager
    async def transaction(self, *, durable: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """One write unit: the lock, because aiosqlite serializes statements, not transactions;
        IMMEDIATE, so the write lock is taken up front instead of failing at the first write.

        A durable transaction survives a power cut (synchronous=FULL: the WAL is fsynced at
        commit); the others survive a crash of the process, and a power cut can only lose a
        suffix of them, which redelivery redoes: in WAL order, a durable commit syncs them too."""
        if not durable and not self._ingest_idle.is_set():
            # Page views waiting for their commit go first; the read model catches up after,
            # and never waits more than INGEST_PRIORITY_WAIT for its turn.
            with suppress(TimeoutError):
                await asyncio.wait_for(self._ingest_idle.wait(), INGEST_PRIORITY_WAIT)
        async with self._write_lock:
            conn = self.writer
            try:
                if durable != self._durable:
                    await conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    await conn.execute("COMMIT")
                except BaseException:
                    await _rollback(conn)  # also after a failed COMMIT, or the next BEGIN would fail
                    raise
            except sqlite3.Error as error:
                if not is_storage_failure(error):
                    raise
                self._write_failed(str(error))
                raise StorageUnavailableError(f"writing to the database failed: {error}") from error
            self._write_succeeded()

    def _write_failed(self, error: str) -> None:
        """Count the failure; an outage is logged when it starts and when it ends, and on a disk
        that keeps filling up and freeing, at most once per OUTAGE_LOG_INTERVAL."""
        failure = self.write_failure
        if failure is not None:
            self.write_failure = WriteFailure(error, failure.since, failure.count + 1)
            return
        self.write_failure = WriteFailure(error, clock.time(), 1)
        self._outage_logged = clock.monotonic() - self._outage_logged_at >= OUTAGE_LOG_INTERVAL
        if self._outage_logged:
            self._outage_logged_at = clock.monotonic()
            logger.error("writes to %s fail: %s; page views are refused with 503 until it is fixed (free disk space, "
                         "check the disk); nothing accepted before is lost", self.path, error, extra=ALWAYS_LOG)

    def _write_succeeded(self) -> None:
        failure = self.write_failure
        if failure is not None:
            self.write_failure = None
            logger.log(logging.WARNING if self._outage_logged else logging.DEBUG,
                       "writes to %s work again, after %d failed transactions in %.0f s", self.path, failure.count,
                       clock.time() - failure.since, extra=ALWAYS_LOG)

    async def probe_write(self) -> None:
        """A small write, for /health while writes fail, at most once a second: so it notices
        the disk is back even when no page view comes. Raises StorageUnavailableError while
        writes still fail."""
        if clock.monotonic() - self._probed_at < PROBE_INTERVAL:
            return
        self._probed_at = clock.monotonic()
        async with self.transaction() as tx:
            await _put_meta(tx, "write_probe", iso_ms(datetime.now(UTC)))

    async def _migrate(self) -> None:
        await self.writer.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        applied = {row[0] for row in await self.writer.execute_fetchall("SELECT name FROM schema_migrations")}
        unknown = sorted(applied - {name for name, _ in MIGRATIONS})
        if unknown:
            raise DatabaseUnusableError(
                f"{self.path} was written by a newer version of the collector (unknown migration "
                f"{', '.join(unknown)}); run that version, or restore a backup made before it")
        for name, script in MIGRATIONS:
            if name in applied:
                continue
            async with self.transaction() as tx:
                for statement in _split_sql(script):
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (name, iso_ms(datetime.now(UTC))),
                )
            logger.info("applied migration %s", name)

    # -- outbox -----------------------------------------------------------------------------

    async def append_outbox(self, flow_type: str, event_type: str, payload: str, collected_at: str) -> None:
        """Return once the event is committed, sharing the commit with concurrent callers."""
        await self._group.append((flow_type, event_type, payload, collected_at))

    async def pending_outbox(self, limit: int) -> list[OutboxRow]:
        rows = await self.reader.execute_fetchall(
            "SELECT seq, flow_type, event_type, payload, collected_at FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [OutboxRow(*row) for row in rows]

    async def move_to_event_log(self, events: Sequence[LoggedEvent]) -> None:
        """Record sent events with their ids and take them off the outbox, atomically."""
        async with self.transaction() as tx:
            await self.log_events(tx, events)

    async def log_events(self, tx: aiosqlite.Connection, events: Sequence[LoggedEvent]) -> None:
        """The same inside the caller's transaction."""
        await tx.executemany(
            "INSERT INTO event_log (seq, event_id, flow_type, event_type, time_bucket, valid_time, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(e.seq, e.event_id, e.flow_type, e.event_type, e.time_bucket, e.valid_time, e.payload) for e in events],
        )
        await tx.executemany("DELETE FROM outbox WHERE seq = ?", [(e.seq,) for e in events])

    async def event_log_after(self, seq: int, limit: int) -> list[LoggedEvent]:
        rows = await self.reader.execute_fetchall(
            "SELECT seq, event_id, flow_type, event_type, time_bucket, valid_time, payload "
            "FROM event_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [LoggedEvent(*row) for row in rows]

    # -- drop counts and ephemeral salts ----------------------------------------------------------

    async def add_dropped(self, rows: Sequence[tuple[str, str, str, int]]) -> None:
        """Add (domain, day, reason, count) rows to the drop counts, in one transaction."""
        async with self.transaction() as tx:
            await tx.executemany(
                "INSERT INTO dropped_pageviews (domain, day, reason, count) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (domain, day, reason) DO UPDATE SET count = count + excluded.count",
                rows,
            )

    async def salt_for_day(self, day: str, candidate: bytes, keep_from: str) -> bytes:
        """The day's salt: `candidate` if no collector on this file made one first, else theirs
        (INSERT OR IGNORE, then read back, in one IMMEDIATE transaction, so all agree). Salts of
        days before keep_from are deleted in the same transaction."""
        async with self.transaction() as tx:
            deleted = await tx.execute("DELETE FROM salts WHERE day < ?", (keep_from,))
            if deleted.rowcount > 0:
                self._salts_in_wal = True  # the next forget_salts truncates the WAL
            await tx.execute(
                "INSERT OR IGNORE INTO salts (day, salt, created_at) VALUES (?, ?, ?)",
                (day, candidate, iso_ms(datetime.now(UTC))),
            )
            row = await _first_row(tx, "SELECT salt FROM salts WHERE day = ?", (day,))
        assert row is not None, "the salt was inserted or already there"
        return bytes(row[0])

    async def forget_salts(self, keep_from: str) -> int:
        """Delete the salts of days before keep_from, zeroing their bytes in the page, then
        truncate the WAL, whose older frames still hold them. Returns the salts deleted."""
        async with self._write_lock:
            conn = self.writer
            await conn.execute("PRAGMA secure_delete = ON")
            try:
                await conn.execute("BEGIN IMMEDIATE")
                cursor = await conn.execute("DELETE FROM salts WHERE day < ?", (keep_from,))
                await conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise
            finally:
                await conn.execute("PRAGMA secure_delete = FAST")
            deleted = cursor.rowcount
            if deleted > 0 or self._salts_in_wal:
                self._salts_in_wal = not await self._truncate_wal(conn)
        return deleted

    async def _truncate_wal(self, conn: aiosqlite.Connection) -> bool:
        """Checkpoint everything and truncate the WAL, without waiting for readers (the write
        lock is held, and page views wait for it): False when a reader was in the way."""
        await conn.execute("PRAGMA busy_timeout = 0")
        try:
            row = await _first_row(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            await conn.execute("PRAGMA busy_timeout = 5000")
        if row is not None and row[0]:
            logger.warning("the WAL could not be truncated after deleting old salts (a reader was busy); "
                           "the next maintenance run tries again")
            return False
        return True

    async def salt_days(self) -> list[str]:
        rows = await self.reader.execute_fetchall("SELECT day FROM salts ORDER BY day")
        return [row[0] for row in rows]

    async def get_meta(self, key: str) -> str | None:
        row = await _first_row(self.reader, "SELECT value FROM meta WHERE key = ?", (key,))
        return str(row[0]) if row else None

    async def set_meta(self, key: str, value: str) -> None:
        async with self.transaction() as tx:
            await _put_meta(tx, key, value)

    async def put_meta(self, tx: aiosqlite.Connection, key: str, value: str) -> None:
        await _put_meta(tx, key, value)

    # -- pathway state ------------------------------------------------------------------------

    async def claim_events(self, tx: aiosqlite.Connection, pathways_by_id: dict[str, str]) -> set[str]:
        """Mark events processed inside the caller's transaction; return the ids that were new."""
        now = iso_ms(datetime.now(UTC))
        rows = await tx.execute_fetchall(
            "INSERT OR IGNORE INTO pathway_state (event_id, pathway, processed_at) "
            "SELECT value ->> 0, value ->> 1, ? FROM json_each(?) RETURNING event_id",
            (now, json.dumps(list(pathways_by_id.items()))),
        )
        if rows:
            await _put_meta(tx, "last_processed_at", now)
        return {row[0] for row in rows}

    async def is_processed(self, event_id: str) -> bool:
        rows = await self.reader.execute_fetchall("SELECT 1 FROM pathway_state WHERE event_id = ?", (event_id,))
        return bool(rows)

    async def record_failure(self, event_id: str, pathway: str, envelope: str, error: str, max_attempts: int) -> int:
        """Count a failed attempt; at max_attempts move the event to the dead letters and mark it
        processed, so redeliveries are acknowledged. Returns the attempts so far."""
        now = iso_ms(datetime.now(UTC))
        async with self.transaction() as tx:
            row = await _first_row(
                tx,
                "INSERT INTO pathway_failures (event_id, attempts, last_error, updated_at) VALUES (?, 1, ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET attempts = attempts + 1, "
                "last_error = excluded.last_error, updated_at = excluded.updated_at RETURNING attempts",
                (event_id, error, now),
            )
            attempts = int(row[0]) if row else 1
            if attempts >= max_attempts:
                await tx.execute(
                    "INSERT OR REPLACE INTO dead_letters (event_id, pathway, envelope, error, attempts, failed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (event_id, pathway, envelope, error, attempts, now),
                )
                await tx.execute(
                    "INSERT OR IGNORE INTO pathway_state (event_id, pathway, processed_at) VALUES (?, ?, ?)",
                    (event_id, pathway, now),
                )
                await tx.execute("DELETE FROM pathway_failures WHERE event_id = ?", (event_id,))
        return attempts

    async def health(self, *, local_delivery: bool = True) -> dict[str, Any]:
        """Counts for /health; raises if the database does not answer. With local delivery,
        logged events past the local sink's cursor are still to be processed."""
        cursor = await self.get_meta("local_delivered_seq") if local_delivery else None
        delivered = int(cursor or 0) if local_delivery else 2**62
        row = await _first_row(
            self.reader,
            "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM event_log WHERE seq > ?), "
            "(SELECT count(*) FROM dead_letters), (SELECT value FROM meta WHERE key = 'last_processed_at')",
            (delivered,),
        )
        outbox, undelivered, dead, last = row or (0, 0, 0, None)
        return {"outbox": outbox, "undelivered": undelivered, "dead_letters": dead, "last_processed_at": last}

    # -- read model ---------------------------------------------------------------------------

    async def record_pageviews(self, tx: aiosqlite.Connection, events: Sequence[Event]) -> None:
        """The visitor.tracked.v0 handler: raw rows and rollups, inside the router's transaction."""
        views = [PageView.from_event(event, self.tz) for event in events]
        rollup = _Rollup()
        for view in views:
            rollup.count_view(view)
        await _count_new_visitors(tx, views, rollup)
        states = await _load_visitor_states(tx, {v.visitor_key for v in views})
        by_visitor: dict[int, list[PageView]] = defaultdict(list)
        for view in views:
            by_visitor[view.visitor_key].append(view)
        new_states = {}
        for key, visitor_views in by_visitor.items():
            new_states[key] = await self._advance_visitor(tx, states.get(key), visitor_views, rollup)
        await rollup.write(tx)
        await tx.executemany(
            "INSERT INTO pageviews (domain, ts_ms, day, pathname, referrer, source) VALUES (?, ?, ?, ?, ?, ?)",
            [(v.domain, v.ts_ms, v.day, v.pathname, v.referrer, v.source) for v in views],
        )
        await tx.executemany(
            "INSERT INTO visitor_hits (visitor_key, ts_ms, salt_day) VALUES (?, ?, ?)",
            [(v.visitor_key, v.ts_ms, v.salt_day) for v in views],
        )
        await tx.executemany(
            "INSERT INTO visitor_state (visitor_key, domain, salt_day, last_ms, visit_start_ms, visit_pageviews) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (visitor_key) DO UPDATE SET last_ms = excluded.last_ms, "
            "visit_start_ms = excluded.visit_start_ms, visit_pageviews = excluded.visit_pageviews",
            [
                (key, by_visitor[key][0].domain, s.salt_day, s.last_ms, s.visit_start_ms, s.visit_pageviews)
                for key, s in new_states.items()
            ],
        )

    async def _advance_visitor(
        self,
        tx: aiosqlite.Connection,
        state: VisitorState | None,
        views: list[PageView],
        rollup: _Rollup,
    ) -> VisitorState:
        """Fold a visitor's new page views into its visits. In order (the usual case) this is
        O(1) per view; a view older than the last one replays the visitor's whole day."""
        times = [v.ts_ms for v in views]
        last = state.last_ms if state else None
        if all((last is None or t >= last) and (i == 0 or t >= times[i - 1]) for i, t in enumerate(times)):
            for view in views:
                state = advance_visit(state, view.domain, view.ts_ms, view.salt_day, self.tz, rollup.tally)
            assert state is not None
            return state
        first = views[0]
        rows = await tx.execute_fetchall(
            "SELECT ts_ms FROM visitor_hits WHERE visitor_key = ? ORDER BY ts_ms", (first.visitor_key,)
        )
        before = [int(row[0]) for row in rows]
        after = sorted(before + times)
        _, old = replay_visits(first.domain, before, first.salt_day, self.tz)
        new_state, new = replay_visits(first.domain, after, first.salt_day, self.tz)
        rollup.tally.add(new)
        rollup.tally.add(old, sign=-1)
        return new_state

    async def forget_expired_visitors(self, today_utc: date) -> int:
        """Delete visitor hashes whose salt day ended more than a day ago; aggregates stay."""
        cutoff = (today_utc - timedelta(days=1)).isoformat()
        deleted = 0
        async with self.transaction() as tx:
            for table in ("visitor_state", "visitor_hits", "seen"):
                cursor = await tx.execute(f"DELETE FROM {table} WHERE salt_day < ?", (cutoff,))
                deleted += cursor.rowcount
        if deleted:
            logger.info("forgot %d visitor hash rows from before %s", deleted, cutoff)
        return deleted

    # -- retention and rebuild ------------------------------------------------------------------
    #
    # Retention deletes raw page views and logged events by whole local days, and records the
    # first day it kept (LOG_KEPT_FROM). So the kept log covers every day from then on in full,
    # and rebuild recomputes exactly those days; older days keep the aggregates live processing
    # built, which nothing left on disk could recompute.

    async def apply_retention(self, today: date, keep_days: int, now: datetime) -> RetentionResult:
        """Delete raw page views and logged events of local days before today - keep_days.
        Logged events the local sink has not delivered yet stay; aggregates stay. Deletes go in
        small transactions, so page views keep flowing while a large backlog is cut."""
        cutoff = today - timedelta(days=keep_days)
        cutoff_time = iso_ms(datetime.combine(cutoff, time(), tzinfo=self.tz))
        delivered = int(await self.get_meta(LOCAL_CURSOR) or 0)
        pageviews = await self._delete_in_chunks(
            "DELETE FROM pageviews WHERE id IN (SELECT id FROM pageviews WHERE day < ? LIMIT ?)",
            (cutoff.isoformat(),),
        )
        events = await self._delete_logged_before(delivered, cutoff_time)
        async with self.transaction() as tx:
            kept = await _first_row(tx, "SELECT value FROM meta WHERE key = ?", (LOG_KEPT_FROM,))
            if kept is None or str(kept[0]) < cutoff.isoformat():
                await _put_meta(tx, LOG_KEPT_FROM, cutoff.isoformat())
            await _put_meta(tx, RETENTION_LAST_RUN, iso_ms(now))
        if pageviews or events:
            logger.info("retention: deleted %d raw page views and %d logged events before %s", pageviews,
                        events, cutoff)
        return RetentionResult(cutoff, pageviews, events)

    async def _delete_in_chunks(self, sql: str, params: tuple[Any, ...], chunk: int = 5000) -> int:
        deleted = 0
        while True:
            async with self.transaction() as tx:
                cursor = await tx.execute(sql, (*params, chunk))
            deleted += cursor.rowcount
            if cursor.rowcount < chunk:
                return deleted

    async def _delete_logged_before(self, delivered: int, cutoff_time: str, chunk: int = 5000) -> int:
        """Logged events before the cutoff that the local sink delivered, with their rows in
        pathway_state: the sink's cursor is past them, so they are never delivered again and
        their de-duplication rows have no more use. (Events that came from Flowcore are not
        in the local log, so their rows stay and keep redeliveries harmless.)"""
        deleted = 0
        while True:
            async with self.transaction() as tx:
                rows = list(await tx.execute_fetchall(
                    "SELECT seq, event_id FROM event_log WHERE seq <= ? AND valid_time < ? LIMIT ?",
                    (delivered, cutoff_time, chunk),
                ))
                await tx.executemany("DELETE FROM pathway_state WHERE event_id = ?", [(row[1],) for row in rows])
                await tx.executemany("DELETE FROM event_log WHERE seq = ?", [(row[0],) for row in rows])
            deleted += len(rows)
            if len(rows) < chunk:
                return deleted

    async def rebuild_from_day(self) -> str | None:
        """The first local day the kept event log covers in full: the day retention kept from,
        or the log's first day if that is later; None when the log is empty (nothing to redo)."""
        row = await _first_row(self.reader, "SELECT min(valid_time) FROM event_log")
        if row is None or row[0] is None:
            return None
        first_day = datetime.fromisoformat(str(row[0])).astimezone(self.tz).date().isoformat()
        kept = await self.get_meta(LOG_KEPT_FROM)
        return max(first_day, kept) if kept else first_day

    async def count_replayable(self, event_type: str) -> int:
        row = await _first_row(self.reader, f"SELECT count(*) FROM event_log e WHERE {_REPLAYABLE}", (event_type,))
        return int(row[0]) if row else 0

    async def replayable_events(self, event_type: str, after_seq: int, limit: int) -> list[LoggedEvent]:
        """Logged events of this type that the router processed, dead letters left out: what
        live processing counted, whether or not the sink's cursor had moved past them."""
        rows = await self.reader.execute_fetchall(
            "SELECT seq, event_id, flow_type, event_type, time_bucket, valid_time, payload FROM event_log e "
            f"WHERE {_REPLAYABLE} AND seq > ? ORDER BY seq LIMIT ?",
            (event_type, after_seq, limit),
        )
        return [LoggedEvent(*row) for row in rows]

    async def clear_read_model(self, tx: aiosqlite.Connection, from_day: str) -> None:
        """Inside the rebuild's transaction: drop the aggregates and raw rows of from_day on,
        and every visitor hash (the replay puts back those still needed)."""
        for table in ("daily_stats", "page_stats", "source_stats", "pageviews"):
            await tx.execute(f"DELETE FROM {table} WHERE day >= ?", (from_day,))
        await tx.execute("DELETE FROM hourly_stats WHERE hour >= ?", (from_day,))
        for table in ("visitor_state", "visitor_hits", "seen"):
            await tx.execute(f"DELETE FROM {table}")


LOCAL_CURSOR = "local_delivered_seq"  # the local sink's delivery cursor (pathways.LocalSink.CURSOR)
LOG_KEPT_FROM = "log_kept_from"
RETENTION_LAST_RUN = "retention_last_run"
_REPLAYABLE = (
    "e.event_type = ? AND EXISTS (SELECT 1 FROM pathway_state p WHERE p.event_id = e.event_id) "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.event_id)"
)


@dataclass(frozen=True, slots=True)
class RetentionResult:
    kept_from: date
    pageviews_deleted: int
    events_deleted: int


# -- statistics readers ------------------------------------------------------------------------

STATISTICS_READERS = 2  # statistics queries at once: each has a connection, and a thread, of its own
STATISTICS_QUEUE = 32  # statistics requests that may wait for one; more get 503
READER_NICENESS = 10  # the statistics threads' scheduling priority below the event loop's (Linux)


class _ReaderPool:
    """Read-only connections, opened on first use, each serving one request at a time."""

    def __init__(self, path: Path, size: int, queue: int) -> None:
        self._path = path
        self._size = size
        self._queue = queue
        self._idle: list[aiosqlite.Connection] = []
        self._all: list[aiosqlite.Connection] = []
        self._free: asyncio.Semaphore | None = None
        self._waiting = 0
        self._busy = 0

    @asynccontextmanager
    async def connection(self, may_refuse: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        if self._free is None:
            self._free = asyncio.Semaphore(self._size)
        if may_refuse and self._free.locked() and self._waiting >= self._queue:
            raise ReadersBusyError(f"{self._waiting} statistics requests are already waiting")
        self._waiting += 1
        try:
            await self._free.acquire()
        finally:
            self._waiting -= 1
        self._busy += 1
        try:
            conn = self._idle.pop() if self._idle else await self._open()
            try:
                yield conn
            finally:
                self._idle.append(conn)
        finally:
            self._busy -= 1
            self._free.release()

    def load(self) -> dict[str, int]:
        return {"connections": self._size, "busy": self._busy, "waiting": self._waiting}

    async def _open(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(f"file:{self._path}?mode=ro", uri=True)
        self._all.append(conn)
        await conn.execute("PRAGMA busy_timeout = 5000")
        await conn.create_function("collector_lower_priority", 0, _lower_thread_priority)
        await conn.execute_fetchall("SELECT collector_lower_priority()")
        return conn

    async def close(self) -> None:
        connections, self._all, self._idle = self._all, [], []
        for conn in connections:
            with suppress(Exception):
                await conn.close()


def _lower_thread_priority() -> int:
    """Run in a statistics connection's own thread: on Linux the nice value is per thread, so
    the scheduler prefers the event loop and the writer when the CPU is short. Relative to the
    process's own (a collector started with `nice` keeps the order)."""
    with suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread) + READER_NICENESS
        os.setpriority(os.PRIO_PROCESS, thread, min(niceness, 19))
    return 0


# -- group commit -----------------------------------------------------------------------------


class _GroupCommit:
    """Collects outbox rows from concurrent requests and commits them in one transaction:
    when max_events wait, or max_delay after the first one arrived, whichever comes first."""

    def __init__(self, store: Store, max_events: int, max_delay: float) -> None:
        self._store = store
        self._max_events = max_events
        self._max_delay = max_delay
        self._pending: list[tuple[tuple[str, str, str, str], asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._wakeup.set()
        await self._task
        self._task = None

    async def append(self, row: tuple[str, str, str, str]) -> None:
        if self._task is None or self._stopping:
            raise StoreClosedError("the store is closing")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._store._ingest_idle.clear()
        self._wakeup.set()
        if len(self._pending) >= self._max_events:
            self._full.set()
        await future

    async def _run(self) -> None:
        while not (self._stopping and not self._pending):
            await self._wakeup.wait()
            if not self._stopping and len(self._pending) < self._max_events:
                try:
                    async with asyncio.timeout(self._max_delay):
                        await self._full.wait()
                except TimeoutError:
                    pass
            batch, self._pending = self._pending[: self._max_events], self._pending[self._max_events :]
            if not self._pending:
                self._wakeup.clear()
            self._full.clear()
            if batch:
                await self._commit(batch)
            if not self._pending:
                self._store._ingest_idle.set()

    async def _commit(self, batch: list[tuple[tuple[str, str, str, str], asyncio.Future[None]]]) -> None:
        try:
            async with self._store.transaction(durable=True) as tx:  # a 204 promises this survives
                await tx.executemany(
                    "INSERT INTO outbox (flow_type, event_type, payload, collected_at) VALUES (?, ?, ?, ?)",
                    [row for row, _ in batch],
                )
        except Exception as error:  # every waiting request learns of the failure; none is lost silently
            if isinstance(error, StorageUnavailableError):  # the store logged it; each request gets a 503
                logger.debug("outbox commit of %d events failed", len(batch), exc_info=True)
            else:
                logger.exception("outbox commit of %d events failed", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self._store.outbox_commits += 1
        self._store.outbox_appends += len(batch)
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        self._store.outbox_changed.set()


# -- the read model's arithmetic ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageView:
    domain: str
    visitor_key: int
    salt_day: str
    pathname: str
    referrer: str
    source: str
    ts_ms: int
    day: str
    hour: str

    @classmethod
    def from_event(cls, event: Event, tz: ZoneInfo) -> PageView:
        payload = event.payload
        ts_ms = int(event.valid_time.timestamp() * 1000)
        day, hour = local_day_hour(ts_ms, tz)
        return cls(
            domain=payload["domain"],
            visitor_key=key64(payload["domain"], payload["visitorHash"]),
            salt_day=payload["sessionContext"]["dailySaltRotation"],
            pathname=payload["pathname"],
            referrer=payload["referrer"],
            source=referrer_source(payload["referrer"], payload["domain"]),
            ts_ms=ts_ms,
            day=day,
            hour=hour,
        )


@dataclass(frozen=True, slots=True)
class VisitorState:
    salt_day: str
    last_ms: int
    visit_start_ms: int
    visit_pageviews: int


VISITS, BOUNCES, DURATION, VISITORS = 0, 1, 2, 3


class VisitorTally:
    """What one visitor's page views add to the day and hour totals: visits, bounces and
    duration per day of the visit's start, and the days and hours the visitor was seen in."""

    def __init__(self) -> None:
        self.days: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self.hours: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, other: VisitorTally, sign: int = 1) -> None:
        for key, values in other.days.items():
            totals = self.days[key]
            for index, value in enumerate(values):
                totals[index] += sign * value
        for hour, count in other.hours.items():
            self.hours[hour] += sign * count


def advance_visit(
    state: VisitorState | None, domain: str, ts_ms: int, salt_day: str, tz: ZoneInfo, tally: VisitorTally
) -> VisitorState:
    """One page view, in time order: extend the current visit or start a new one. A visit
    belongs to the day it started; it ends after 30 minutes without a page view. In time
    order, a day or an hour unlike the last view's is one the visitor has not been seen in."""
    day, hour = local_day_hour(ts_ms, tz)
    last_day, last_hour = local_day_hour(state.last_ms, tz) if state else ("", "")
    if day != last_day:
        tally.days[(domain, day)][VISITORS] += 1
    if hour != last_hour:
        tally.hours[(domain, hour)] += 1
    if state is not None and ts_ms - state.last_ms <= VISIT_GAP_MS:
        visit = tally.days[(domain, local_day_hour(state.visit_start_ms, tz)[0])]
        visit[DURATION] += ts_ms - state.last_ms
        if state.visit_pageviews == 1:
            visit[BOUNCES] -= 1
        return VisitorState(state.salt_day, ts_ms, state.visit_start_ms, state.visit_pageviews + 1)
    visit = tally.days[(domain, day)]
    visit[VISITS] += 1
    visit[BOUNCES] += 1
    return VisitorState(salt_day, ts_ms, ts_ms, 1)


def replay_visits(domain: str, times: Iterable[int], salt_day: str, tz: ZoneInfo) -> tuple[VisitorState, VisitorTally]:
    tally = VisitorTally()
    state: VisitorState | None = None
    for ts_ms in times:
        state = advance_visit(state, domain, ts_ms, salt_day, tz, tally)
    assert state is not None, "a visitor being replayed has at least one page view"
    return state, tally


class _Rollup:
    """The increments one batch of page views makes to the aggregate tables."""

    def __init__(self) -> None:
        self.pageviews: dict[tuple[str, str], int] = defaultdict(int)
        self.tally = VisitorTally()
        self.hour_views: dict[tuple[str, str], int] = defaultdict(int)
        self.pages: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.sources: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])

    def count_view(self, view: PageView) -> None:
        self.pageviews[(view.domain, view.day)] += 1
        self.hour_views[(view.domain, view.hour)] += 1
        self.pages[(view.domain, view.day, view.pathname)][0] += 1
        self.sources[(view.domain, view.day, view.source)][0] += 1

    def count_new_visitor(self, domain: str, scope: str, period: str, item: str) -> None:
        counts = self.pages if scope == "page" else self.sources
        counts[(domain, period, item)][1] += 1

    async def write(self, tx: aiosqlite.Connection) -> None:
        days = self.tally.days
        await tx.executemany(
            "INSERT INTO daily_stats (domain, day, pageviews, visitors, visits, bounces, duration_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (domain, day) DO UPDATE SET "
            "pageviews = pageviews + excluded.pageviews, visitors = visitors + excluded.visitors, "
            "visits = visits + excluded.visits, bounces = bounces + excluded.bounces, "
            "duration_ms = duration_ms + excluded.duration_ms",
            [
                (*key, self.pageviews.get(key, 0), days[key][VISITORS], days[key][VISITS], days[key][BOUNCES],
                 days[key][DURATION])
                for key in sorted(set(self.pageviews) | set(days))
            ],
        )
        hours = self.tally.hours
        await tx.executemany(
            "INSERT INTO hourly_stats (domain, hour, pageviews, visitors) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (domain, hour) DO UPDATE SET pageviews = pageviews + excluded.pageviews, "
            "visitors = visitors + excluded.visitors",
            [(*key, self.hour_views.get(key, 0), hours.get(key, 0)) for key in set(self.hour_views) | set(hours)],
        )
        for table, column, counts in (("page_stats", "pathname", self.pages), ("source_stats", "source", self.sources)):
            await tx.executemany(
                f"INSERT INTO {table} (domain, day, {column}, pageviews, visitors) VALUES (?, ?, ?, ?, ?) "
                f"ON CONFLICT (domain, day, {column}) DO UPDATE SET pageviews = pageviews + excluded.pageviews, "
                "visitors = visitors + excluded.visitors",
                [(*key, *values) for key, values in counts.items()],
            )


async def _count_new_visitors(tx: aiosqlite.Connection, views: Sequence[PageView], rollup: _Rollup) -> None:
    """Unique visitors per page and source (days and hours come from the visitor's timeline):
    a row in `seen` per first sighting. INSERT OR IGNORE ... RETURNING yields only the keys
    that were new, in one statement."""
    sightings: dict[int, tuple[str, str, str, str]] = {}
    rows = []
    for v in views:
        for scope, item in (("page", v.pathname), ("source", v.source)):
            key = key64(scope, v.day, item, str(v.visitor_key))
            sightings[key] = (v.domain, scope, v.day, item)
            rows.append((key, v.salt_day))
    new_keys = await tx.execute_fetchall(
        "INSERT OR IGNORE INTO seen (seen_key, salt_day) SELECT value ->> 0, value ->> 1 FROM json_each(?) "
        "RETURNING seen_key",
        (json.dumps(rows),),
    )
    for (key,) in new_keys:
        rollup.count_new_visitor(*sightings[key])


async def _load_visitor_states(tx: aiosqlite.Connection, keys: set[int]) -> dict[int, VisitorState]:
    rows = await tx.execute_fetchall(
        "SELECT visitor_key, salt_day, last_ms, visit_start_ms, visit_pageviews FROM visitor_state "
        "WHERE visitor_key IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted(keys)),),
    )
    return {row[0]: VisitorState(row[1], row[2], row[3], row[4]) for row in rows}


def key64(*parts: str) -> int:
    """A signed 64-bit key from BLAKE2b over the parts: an SQLite integer primary key. Parts
    are joined with a separator no valid part contains; surrogatepass keeps any string hashable."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@lru_cache(maxsize=4096)
def _local_minute(minute: int, tz: ZoneInfo) -> tuple[str, str]:
    moment = datetime.fromtimestamp(minute * 60, tz)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m-%dT%H")


def local_day_hour(ts_ms: int, tz: ZoneInfo) -> tuple[str, str]:
    """The day and hour in TIMEZONE. Every UTC offset in use is a whole number of minutes,
    so one cached lookup per minute serves every event in it."""
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


async def _first_row(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    # One call on the connection's thread, so the statement is done when it returns: a cursor
    # left open across an await keeps its read snapshot, and a reader sharing the connection
    # in between would see that old snapshot (it once made the emitter resend sent events).
    rows = await conn.execute_fetchall(sql, params)
    return tuple(next(iter(rows))) if rows else None


async def _interrupt_after(conn: aiosqlite.Connection, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await conn.interrupt()  # sqlite3's interrupt is safe from any thread; it stops the running statement


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back if a transaction is still open: after SQLITE_FULL or an I/O error SQLite may
    have rolled back already, and a ROLLBACK then fails, harmlessly."""
    with suppress(sqlite3.Error):
        if conn.in_transaction:
            await conn.execute("ROLLBACK")


def _unusable(path: Path, error: BaseException | None) -> str:
    """One line for an SQLite error at start-up: the file, what is wrong, what to do."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    if code == sqlite3.SQLITE_NOTADB:
        return f"{path} is not an SQLite database (or is encrypted); point DATA_DIR elsewhere, or move the file away"
    if code == sqlite3.SQLITE_CORRUPT:
        return f"{path} is corrupt ({error}); restore it from a backup, or move it away to start with an empty database"
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
        return (f"{path} cannot be opened for writing ({error}); the collector's user must be able to write it "
                "and its directory")
    if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return f"{path} cannot be written ({error}); free disk space, or check the disk"
    return f"{path} cannot be used: {error}"


async def _put_meta(tx: aiosqlite.Connection, key: str, value: str) -> None:
    await tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script; executescript would commit our transaction."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]
