"""The SQLite file: connections and migrations, the single writer with its group commit, the
outbox, the local event log, pathway state and dead letters, meta, salts and drop counts.

The read model's tables live in the same file, but readmodel.py owns them (their schema comes
in through `add_migrations`); nothing here knows what a page view is."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
import threading
import time as clock
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import aiosqlite

from logrepeats import ALWAYS_LOG

logger = logging.getLogger(__name__)

DB_FILENAME = "collector.sqlite3"
BUSY_TIMEOUT_MS = 5000
QUICK_CHECK_SECONDS = 5.0  # the most start-up spends on PRAGMA quick_check
OUTAGE_LOG_INTERVAL = 60.0  # seconds: a storage outage that starts sooner after the last one is not logged again
PROBE_INTERVAL = 1.0  # seconds between two write probes of /health while writes fail

# 0001 and 0002 are history: they also created the read model's first tables, which
# readmodel.py's migrations take on from there. A migration never changes once released.
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

CREATE TABLE visitor_state (
    visitor_key INTEGER PRIMARY KEY,
    domain TEXT NOT NULL,
    salt_day TEXT NOT NULL,
    last_ms INTEGER NOT NULL,
    visit_start_ms INTEGER NOT NULL,
    visit_pageviews INTEGER NOT NULL
);
CREATE INDEX visitor_state_domain_last ON visitor_state (domain, last_ms);
CREATE TABLE visitor_hits (
    visitor_key INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    salt_day TEXT NOT NULL
);
CREATE INDEX visitor_hits_visitor ON visitor_hits (visitor_key, ts_ms);
CREATE TABLE seen (
    seen_key INTEGER PRIMARY KEY,
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

Step = str | Callable[[sqlite3.Connection], None]  # an SQL script, or a function for what SQL cannot say
Migration = tuple[str, Step]

MIGRATIONS: tuple[Migration, ...] = (
    ("0001_initial", SCHEMA_0001),
    ("0002_dropped_pageviews_and_salts", SCHEMA_0002),
)

LOCAL_CURSOR = "local_delivered_seq"  # the local sink's delivery cursor (pathways.LocalSink.CURSOR)
LAST_PROCESSED_AT = "last_processed_at"
LOG_KEPT_FROM = "log_kept_from"
RETENTION_LAST_RUN = "retention_last_run"

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]


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


LoggedRow = tuple[int, str, str, str, str, str, str]  # LoggedEvent's fields, in its order


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event whose handler kept failing: kept with its envelope until a delivery or
    `collector.py dead-letters --retry` processes it."""

    event_id: str
    pathway: str
    envelope: str
    error: str
    attempts: int
    failed_at: str


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """What the store reports about itself on /health."""

    outbox: int  # events committed and not yet through the sink
    undelivered: int  # logged events the local sink has not delivered to the router yet
    dead_letters: int
    last_processed_at: str | None
    oldest_waiting_at: str | None  # when the oldest event of the backlog was collected
    retention_last_run: str | None
    commits: int  # group commit at work: how many commits served how many page views
    committed_events: int

    @property
    def backlog(self) -> int:
        return self.outbox + self.undelivered

    def lag_seconds(self, now: datetime) -> float:
        """How far the read model is behind: the age of the oldest event it has not seen."""
        if self.oldest_waiting_at is None:
            return 0.0
        return round(max(0.0, (now - datetime.fromisoformat(self.oldest_waiting_at)).total_seconds()), 3)


def iso_ms(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as Flowcore writes times."""
    if moment.tzinfo is UTC:  # every page view's time: half the cost of converting it and isoformat's
        return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 (%-formatting is the fastest here)
            moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
            moment.microsecond // 1000)
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def create_private_file(path: Path) -> None:
    """Create the file with mode 0600, whatever the umask, unless it exists already."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


class Store:
    """One SQLite file in WAL mode: a single writer on its own thread, a separate reader for the
    emitter and the store's own reads, and a small pool of statistics readers (`reading()`)."""

    def __init__(self, path: Path, tz: ZoneInfo, *, commit_max_events: int = 512, log_directly: bool = False) -> None:
        self.path = path
        self.tz = tz
        # Local mode: an event is committed straight into the event log (`append_log`), and the
        # outbox only holds what an earlier run in Flowcore mode (or an older version) left.
        self.log_directly = log_directly
        self.outbox_changed = asyncio.Event()  # events were committed, to the outbox or the log
        self._writer = _Writer()
        self._reader: aiosqlite.Connection | None = None
        self._group = _GroupCommit(self._writer, self._transaction, commit_max_events, self._committed, _insert_outbox)
        self._log_group = _GroupCommit(self._writer, self._transaction, commit_max_events, self._committed,
                                       _insert_log)
        self._migrations: list[Migration] = list(MIGRATIONS)
        self._rollback_hooks: list[Callable[[], None]] = []
        self._durable = False
        self._salts_in_wal = False  # a deleted salt may still be in the WAL's older frames
        self.outbox_commits = 0  # how many commits served how many appends: group commit at work
        self.outbox_appends = 0
        # Set while writes fail, for /health. Written on the writer's thread, read on the loop:
        # one attribute, replaced whole.
        self.write_failure: WriteFailure | None = None
        self._outage_logged_at = -OUTAGE_LOG_INTERVAL
        self._outage_logged = False
        self._probed_at = -PROBE_INTERVAL
        self._statistics = _ReaderPool(path, STATISTICS_READERS, STATISTICS_QUEUE)

    def add_migrations(self, migrations: Sequence[Migration]) -> None:
        """Another owner's schema steps (the read model's), applied after the store's own."""
        if self._reader is not None:
            raise RuntimeError("migrations must be added before the store is opened")
        known = {name for name, _ in self._migrations}
        for name, _ in migrations:
            if name in known:
                raise ValueError(f"migration {name} is registered twice")
        self._migrations.extend(migrations)

    def add_rollback_hook(self, hook: Callable[[], None]) -> None:
        """Called on the writer's thread after any transaction rolls back: whoever keeps state
        beside the file (the read model's caches) forgets what the rollback undid."""
        self._rollback_hooks.append(hook)

    async def open(self) -> None:
        """Open, check and migrate the file. A file that cannot be used raises
        DatabaseUnusableError naming it and what is wrong, with every connection closed and
        the writer's thread ended."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_private_file(self.path)  # SQLite gives its WAL and SHM files the database's mode
        self._writer.start()
        try:
            await self._writer.call(self._connect)
            await self._check_integrity()
            await self._run(self._migrate)
            self._reader = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True)
            await self._reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except (sqlite3.Error, StorageUnavailableError) as error:
            await self._close_connections()
            cause = error.__cause__ if isinstance(error, StorageUnavailableError) else error
            raise DatabaseUnusableError(unusable(self.path, cause)) from error
        except BaseException:
            await self._close_connections()  # an open connection's thread would keep the process alive
            raise

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

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in (
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = NORMAL",
            f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
            "PRAGMA cache_size = -8000",  # 8 MB: the read model's hot pages (16 MB: 9 MB more RSS, no CPU saved)
            # Deleted rows are zeroed in their page where that costs no extra I/O: a deleted
            # ephemeral salt must not linger in the file (forget_salts also truncates the WAL).
            "PRAGMA secure_delete = FAST",
        ):
            conn.execute(pragma)
        self._writer.conn = conn

    async def close(self) -> None:
        """Commit what is pending, then close every connection. Safe to call twice."""
        if self._writer.conn is not None:
            await self._group.drain()
            await self._log_group.drain()
        await self._close_connections()

    async def _close_connections(self) -> None:
        """Every connection, and the writer's thread; whatever state opening or a failing disk left."""
        if self._writer.conn is not None:
            with suppress(Exception):  # on a full disk the checkpoint fails; the WAL keeps it all
                await self._run(_close_writer)
            self._writer.conn = None
        self._writer.stop()
        await self._statistics.close()
        if self._reader is not None:
            with suppress(Exception):
                await self._reader.close()
        self._reader = None

    @asynccontextmanager
    async def reading(self, *, may_refuse: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        """A statistics connection of its own, never the one the emitter reads the outbox with:
        at most STATISTICS_READERS run at once, STATISTICS_QUEUE more may wait (beyond,
        ReadersBusyError, unless may_refuse is False: a stream already started). Their threads
        run at a lower scheduling priority, so page views go first."""
        if self._reader is None:
            raise StoreClosedError("the store is not open")
        async with self._statistics.connection(may_refuse) as conn:
            yield conn

    @asynccontextmanager
    async def spare_reading(self, wanted: bool = True) -> AsyncIterator[aiosqlite.Connection | None]:
        """For a request inside `reading()`: a second statistics connection if `wanted` and one
        is idle right now (None otherwise; it never waits)."""
        if not wanted or self._reader is None:
            yield None
            return
        async with self._statistics.spare() as conn:
            yield conn

    def statistics_load(self) -> dict[str, int]:
        """How many statistics requests hold a connection, and how many wait for one."""
        return self._statistics.load()

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreClosedError("the store is not open")
        return self._reader

    def ingest_waiting(self) -> bool:
        """Whether page views are waiting for their commit (the read model then takes small steps)."""
        return self._group.waiting() or self._log_group.waiting()

    async def write(self, work: Work[T], *, durable: bool = False) -> T:
        """Run `work(conn)` as one transaction on the writer's thread: one hop for the whole of it.

        IMMEDIATE, so the write lock is taken up front instead of failing at the first write.
        A durable transaction survives a power cut (synchronous=FULL: the WAL is fsynced at
        commit); the others survive a crash of the process, and a power cut can only lose a
        suffix of them, which redelivery redoes: in WAL order, a durable commit syncs them too."""
        return await self._run(lambda conn: self._transaction(conn, work, durable))

    async def _run(self, work: Work[T]) -> T:
        """work(conn) on the writer's thread, outside any transaction."""
        return await self._writer.call(lambda: work(self._writer.connection()))

    def _transaction(self, conn: sqlite3.Connection, work: Work[T], durable: bool) -> T:
        """On the writer's thread. A failure of the storage (disk full, I/O error) becomes
        StorageUnavailableError, after a rollback, and is counted for /health."""
        try:
            if durable != self._durable:
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)  # also after a failed COMMIT, or the next BEGIN would fail
                for hook in self._rollback_hooks:
                    hook()
                raise
        except sqlite3.Error as error:
            if not is_storage_failure(error):
                raise
            self._write_failed(str(error))
            raise StorageUnavailableError(f"writing to the database failed: {error}") from error
        self._write_succeeded()
        return result

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
            logger.error("writes to %s fail: %s; page views and events are refused with 503 until it is fixed "
                         "(free disk space, check the disk); nothing accepted before is lost", self.path, error,
                         extra=ALWAYS_LOG)

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
        await self.write(lambda conn: put_meta(conn, "write_probe", iso_ms(datetime.now(UTC))))

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Every registered migration not applied yet. A file with a migration this version does
        not know (the store's own and every owner's added ones) was written by a newer version:
        DatabaseUnusableError names the migration."""
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = {str(row[0]) for row in conn.execute("SELECT name FROM schema_migrations")}
        unknown = sorted(done - {name for name, _ in self._migrations})
        if unknown:
            raise DatabaseUnusableError(
                f"{self.path} was written by a newer version of the collector (unknown migration "
                f"{', '.join(unknown)}); run that version, or restore a backup made before it")
        for name, step in self._migrations:
            applied = self._transaction(conn, functools.partial(_apply, name=name, step=step), False)
            if applied:
                logger.info("applied migration %s", name)

    # -- outbox and event log ---------------------------------------------------------------------

    async def append_outbox(self, flow_type: str, event_type: str, payload: str, collected_at: str) -> None:
        """Return once the event is committed, sharing the commit with concurrent callers."""
        await self._group.append((flow_type, event_type, payload, collected_at))

    async def append_log(self, event: tuple[str, str, str, str, str, str]) -> None:
        """Local mode: the same, straight into the event log: (event_id, flow_type, event_type,
        time_bucket, valid_time, payload), its seq assigned in the commit. The local sink's cursor
        then says what the router has processed."""
        await self._log_group.append(event)

    def _committed(self, events: int) -> None:
        self.outbox_commits += 1
        self.outbox_appends += events
        self.outbox_changed.set()

    async def pending_outbox(self, limit: int) -> list[OutboxRow]:
        rows = await self.reader.execute_fetchall(
            "SELECT seq, flow_type, event_type, payload, collected_at FROM outbox ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [OutboxRow(*row) for row in rows]

    async def move_to_event_log(self, events: Sequence[LoggedEvent]) -> None:
        """Record sent events with their ids and take them off the outbox, atomically."""
        await self.write(lambda conn: self.log_events(conn, events))

    def log_events(self, conn: sqlite3.Connection, events: Sequence[LoggedEvent]) -> None:
        """The same inside the caller's transaction. With log_directly, the events take new seqs
        after every logged event's (the router's cursor may be past their outbox seqs)."""
        if self.log_directly:
            _insert_log(conn, [(e.event_id, e.flow_type, e.event_type, e.time_bucket, e.valid_time, e.payload)
                               for e in events])
            conn.executemany("DELETE FROM outbox WHERE seq = ?", [(e.seq,) for e in events])
            return
        conn.executemany(
            "INSERT INTO event_log (seq, event_id, flow_type, event_type, time_bucket, valid_time, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(e.seq, e.event_id, e.flow_type, e.event_type, e.time_bucket, e.valid_time, e.payload) for e in events],
        )
        conn.executemany("DELETE FROM outbox WHERE seq = ?", [(e.seq,) for e in events])

    async def log_sent(self, events: Sequence[LoggedEvent]) -> None:
        """Events the platform accepted, with its ids, into the event log and off the outbox. One
        may be there already: the platform can deliver it to /api/transformer before its answer
        to the sender arrives, and the transformer logs what it receives (log_received)."""

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO event_log (seq, event_id, flow_type, event_type, time_bucket, valid_time, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                [(e.seq, e.event_id, e.flow_type, e.event_type, e.time_bucket, e.valid_time, e.payload)
                 for e in events],
            )
            conn.executemany("DELETE FROM outbox WHERE seq = ?", [(e.seq,) for e in events])

        await self.write(work)

    def log_received(self, conn: sqlite3.Connection, event: LoggedEvent) -> None:
        """Inside the router's transaction: a delivered event into the event log, unless it is
        there already (one this collector sent). Its seq is taken from the outbox's AUTOINCREMENT
        sequence, so no outbox row sent later can ever need the same seq."""
        if conn.execute("SELECT 1 FROM event_log WHERE event_id = ?", (event.event_id,)).fetchone():
            return
        _insert_log(conn, [(event.event_id, event.flow_type, event.event_type, event.time_bucket, event.valid_time,
                            event.payload)])

    def logged_after(self, conn: sqlite3.Connection, seq: int, limit: int) -> list[LoggedRow]:
        """The same inside the caller's transaction (on the writer's thread: no hop to a reader),
        as rows of LoggedEvent's fields: the router reads thousands a second."""
        return conn.execute(
            "SELECT seq, event_id, flow_type, event_type, time_bucket, valid_time, payload "
            "FROM event_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()

    async def event_log_after(self, seq: int, limit: int) -> list[LoggedEvent]:
        rows = await self.reader.execute_fetchall(
            "SELECT seq, event_id, flow_type, event_type, time_bucket, valid_time, payload "
            "FROM event_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [LoggedEvent(*row) for row in rows]

    # -- drop counts and ephemeral salts ------------------------------------------------------------

    async def add_dropped(self, rows: Sequence[tuple[str, str, str, int]]) -> None:
        """Add (domain, day, reason, count) rows to the drop counts, in one transaction."""

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO dropped_pageviews (domain, day, reason, count) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (domain, day, reason) DO UPDATE SET count = count + excluded.count",
                rows,
            )

        await self.write(work)

    async def salt_for_day(self, day: str, candidate: bytes, keep_from: str) -> bytes:
        """The day's salt: `candidate` if no collector on this file made one first, else theirs
        (INSERT OR IGNORE, then read back, in one IMMEDIATE transaction, so all agree). Salts of
        days before keep_from are deleted in the same transaction."""

        def work(conn: sqlite3.Connection) -> bytes:
            if conn.execute("DELETE FROM salts WHERE day < ?", (keep_from,)).rowcount > 0:
                self._salts_in_wal = True  # the next forget_salts truncates the WAL
            conn.execute(
                "INSERT OR IGNORE INTO salts (day, salt, created_at) VALUES (?, ?, ?)",
                (day, candidate, iso_ms(datetime.now(UTC))),
            )
            return bytes(conn.execute("SELECT salt FROM salts WHERE day = ?", (day,)).fetchone()[0])

        return await self.write(work)

    async def forget_salts(self, keep_from: str) -> int:
        """Delete the salts of days before keep_from, zeroing their bytes in the page, then
        truncate the WAL, whose older frames still hold them. Returns the salts deleted."""
        return await self._run(lambda conn: self._forget_salts(conn, keep_from))

    def _forget_salts(self, conn: sqlite3.Connection, keep_from: str) -> int:
        conn.execute("PRAGMA secure_delete = ON")
        try:
            deleted = self._transaction(
                conn, lambda c: c.execute("DELETE FROM salts WHERE day < ?", (keep_from,)).rowcount, False
            )
        finally:
            conn.execute("PRAGMA secure_delete = FAST")
        if deleted > 0 or self._salts_in_wal:
            self._salts_in_wal = not _truncate_wal(conn)
        return int(deleted)

    # -- meta ---------------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        row = await _first_row(self.reader, "SELECT value FROM meta WHERE key = ?", (key,))
        return str(row[0]) if row else None

    async def set_meta(self, key: str, value: str) -> None:
        await self.write(lambda conn: put_meta(conn, key, value))

    # -- pathway state ------------------------------------------------------------------------------

    def claim_events(self, conn: sqlite3.Connection, pathways_by_id: dict[str, str]) -> set[str]:
        """Mark events processed inside the caller's transaction; return the ids that were new."""
        now = iso_ms(datetime.now(UTC))
        rows = conn.execute(
            "INSERT OR IGNORE INTO pathway_state (event_id, pathway, processed_at) "
            "SELECT value ->> 0, value ->> 1, ? FROM json_each(?) RETURNING event_id",
            (now, json.dumps(list(pathways_by_id.items()))),
        ).fetchall()
        if rows:
            put_meta(conn, LAST_PROCESSED_AT, now)
        return {row[0] for row in rows}

    async def record_failure(self, event_id: str, pathway: str, envelope: str, error: str, max_attempts: int) -> int:
        """Count a failed attempt; at max_attempts move the event to the dead letters and mark it
        processed, so redeliveries are acknowledged. Returns the attempts so far."""
        now = iso_ms(datetime.now(UTC))

        def work(conn: sqlite3.Connection) -> int:
            attempts = int(conn.execute(
                "INSERT INTO pathway_failures (event_id, attempts, last_error, updated_at) VALUES (?, 1, ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET attempts = attempts + 1, "
                "last_error = excluded.last_error, updated_at = excluded.updated_at RETURNING attempts",
                (event_id, error, now),
            ).fetchone()[0])
            if attempts >= max_attempts:
                conn.execute(
                    "INSERT OR REPLACE INTO dead_letters (event_id, pathway, envelope, error, attempts, failed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (event_id, pathway, envelope, error, attempts, now),
                )
                conn.execute(
                    "INSERT OR IGNORE INTO pathway_state (event_id, pathway, processed_at) VALUES (?, ?, ?)",
                    (event_id, pathway, now),
                )
                conn.execute("DELETE FROM pathway_failures WHERE event_id = ?", (event_id,))
            return attempts

        return await self.write(work)

    def unclaim(self, conn: sqlite3.Connection, event_id: str) -> None:
        """Forget that an event was processed, inside a transaction that processes it again."""
        conn.execute("DELETE FROM pathway_state WHERE event_id = ?", (event_id,))

    async def dead_letter(self, event_id: str, pathway: str, envelope: str, error: str, attempts: int) -> None:
        """Keep a failing event in the dead letters, or add to its attempts. It is NOT marked
        processed: a later delivery runs its handler again."""
        await self.write(lambda conn: conn.execute(
            "INSERT INTO dead_letters (event_id, pathway, envelope, error, attempts, failed_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO UPDATE SET error = excluded.error, "
            "attempts = attempts + excluded.attempts, failed_at = excluded.failed_at",
            (event_id, pathway, envelope, error, attempts, iso_ms(datetime.now(UTC))),
        ))

    async def dead_letters(self) -> list[DeadLetter]:
        sql = f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters {_DEAD_LETTER_ORDER}"
        return [DeadLetter(*row) for row in await self.reader.execute_fetchall(sql)]

    def clear_dead_letter(self, conn: sqlite3.Connection, event_id: str) -> None:
        """Inside the transaction that processed the event at last."""
        conn.execute("DELETE FROM dead_letters WHERE event_id = ?", (event_id,))
        conn.execute("DELETE FROM pathway_failures WHERE event_id = ?", (event_id,))

    async def health(self, *, local_delivery: bool = True) -> StoreHealth:
        """Counts for /health; raises if the database does not answer. With local delivery,
        logged events past the local sink's cursor are still to be processed."""
        cursor = await self.get_meta(LOCAL_CURSOR) if local_delivery else None
        delivered = int(cursor or 0) if local_delivery else 2**62
        row = await _first_row(
            self.reader,
            "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM event_log WHERE seq > ?1), "
            "(SELECT count(*) FROM dead_letters), (SELECT value FROM meta WHERE key = ?2), "
            "coalesce((SELECT valid_time FROM event_log WHERE seq > ?1 ORDER BY seq LIMIT 1), "
            "(SELECT collected_at FROM outbox ORDER BY seq LIMIT 1)), "
            "(SELECT value FROM meta WHERE key = ?3)",
            (delivered, LAST_PROCESSED_AT, RETENTION_LAST_RUN),
        )
        outbox, undelivered, dead, last, oldest, retention = row or (0, 0, 0, None, None, None)
        return StoreHealth(outbox, undelivered, dead, last, oldest, retention, self.outbox_commits,
                           self.outbox_appends)

    # -- the event log's retention, and what rebuild reads -----------------------------------------
    #
    # Retention deletes logged events by whole local days, and records the first day it kept
    # (LOG_KEPT_FROM). So the kept log covers every day from then on in full, and rebuild
    # recomputes exactly those days; older days keep the aggregates live processing built,
    # which nothing left on disk could recompute.

    async def delete_logged_before(self, cutoff: datetime, *, local_delivery: bool = True, chunk: int = 5000) -> int:
        """Logged events collected before the cutoff, in small transactions so page views keep
        flowing while a large backlog is cut. With local delivery, only those the local sink
        delivered, with their rows in pathway_state: the sink's cursor is past them, so they are
        never delivered again and their de-duplication rows have no more use. Without it
        (Flowcore mode) every logged event was sent or received already, and their ids stay in
        pathway_state: the platform may deliver an old event again."""
        delivered = int(await self.get_meta(LOCAL_CURSOR) or 0) if local_delivery else 2**62
        cutoff_time = iso_ms(cutoff)

        def work(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT seq, event_id FROM event_log WHERE seq <= ? AND valid_time < ? LIMIT ?",
                (delivered, cutoff_time, chunk),
            ).fetchall()
            if local_delivery:
                conn.executemany("DELETE FROM pathway_state WHERE event_id = ?", [(row[1],) for row in rows])
            conn.executemany("DELETE FROM event_log WHERE seq = ?", [(row[0],) for row in rows])
            return len(rows)

        deleted = 0
        while (count := await self.write(work)) > 0:
            deleted += count
            if count < chunk:
                break
        return deleted

    async def record_retention(self, kept_from: str, now: datetime) -> None:
        """The first local day the kept log covers in full, and when retention last ran."""

        def work(conn: sqlite3.Connection) -> None:
            kept = conn.execute("SELECT value FROM meta WHERE key = ?", (LOG_KEPT_FROM,)).fetchone()
            if kept is None or str(kept[0]) < kept_from:
                put_meta(conn, LOG_KEPT_FROM, kept_from)
            put_meta(conn, RETENTION_LAST_RUN, iso_ms(now))

        await self.write(work)

    def local_midnight(self, day: str) -> datetime:
        return datetime.combine(datetime.fromisoformat(day).date(), time(), tzinfo=self.tz)

    async def rebuild_from_day(self) -> str | None:
        """The first local day the kept event log covers in full: the day retention kept from,
        or the log's first day if that is later; None when the log is empty (nothing to redo)."""
        row = await _first_row(self.reader, "SELECT min(valid_time) FROM event_log")
        if row is None or row[0] is None:
            return None
        first_day = datetime.fromisoformat(str(row[0])).astimezone(self.tz).date().isoformat()
        kept = await self.get_meta(LOG_KEPT_FROM)
        return max(first_day, kept) if kept else first_day

    def count_replayable(self, conn: sqlite3.Connection, event_types: Sequence[str]) -> int:
        sql = f"SELECT count(*) FROM event_log e WHERE {_replayable(event_types)}"
        return int(conn.execute(sql, tuple(event_types)).fetchone()[0])

    def replayable_events(self, conn: sqlite3.Connection, event_types: Sequence[str], after_seq: int,
                          limit: int) -> list[LoggedEvent]:
        """Logged events of these types that the router processed, dead letters left out: what
        live processing counted, whether or not the sink's cursor had moved past them."""
        rows = conn.execute(
            "SELECT seq, event_id, flow_type, event_type, time_bucket, valid_time, payload FROM event_log e "
            f"WHERE {_replayable(event_types)} AND seq > ? ORDER BY seq LIMIT ?",
            (*event_types, after_seq, limit),
        ).fetchall()
        return [LoggedEvent(*row) for row in rows]


def put_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


_DEAD_LETTER_COLUMNS = "event_id, pathway, envelope, error, attempts, failed_at"
_DEAD_LETTER_ORDER = "ORDER BY failed_at, event_id"


def _replayable(event_types: Sequence[str]) -> str:
    return (
        f"e.event_type IN ({', '.join('?' * len(event_types))}) "
        "AND EXISTS (SELECT 1 FROM pathway_state p WHERE p.event_id = e.event_id) "
        "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.event_id)"
    )


async def read_dead_letters(path: Path) -> list[DeadLetter]:
    """The dead letters of a database file, oldest first, through a read-only connection: a
    running collector may hold the file (and DATA_DIR's lock) meanwhile."""
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = await conn.execute_fetchall(f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters {_DEAD_LETTER_ORDER}")
    return [DeadLetter(*row) for row in rows]


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return str(row[0]) if row else None


def _apply(conn: sqlite3.Connection, name: str, step: Step) -> bool:
    """One migration in the caller's transaction, unless it was applied (by another process, too)."""
    if conn.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
        return False
    if isinstance(step, str):
        for statement in split_sql(step):
            conn.execute(statement)
    else:
        step(conn)
    conn.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, iso_ms(datetime.now(UTC))))
    return True


def _truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint everything and truncate the WAL, without waiting for readers (this runs on
    the writer's thread, and page views wait for it): False when a reader was in the way."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if busy:
        logger.warning("the WAL could not be truncated after deleting old salts (a reader was busy); "
                       "the next maintenance run tries again")
        return False
    return True


def _close_writer(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a small file behind
    finally:
        conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: after SQLITE_FULL or an I/O error SQLite may
    have rolled back already, and a ROLLBACK then fails, harmlessly."""
    with suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


async def _interrupt_after(conn: aiosqlite.Connection, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await conn.interrupt()  # sqlite3's interrupt is safe from any thread; it stops the running statement


def unusable(path: Path, error: BaseException | None) -> str:
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


async def _first_row(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    # One call on the connection's thread, so the statement is done when it returns: a cursor
    # left open across an await keeps its read snapshot, and a reader sharing the connection
    # in between would see that old snapshot (it once made the emitter resend sent events).
    rows = await conn.execute_fetchall(sql, params)
    return tuple(next(iter(rows))) if rows else None


def split_sql(script: str) -> list[str]:
    """Statements of a migration script; executescript would commit our transaction."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


# -- statistics readers ------------------------------------------------------------------------------

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

    @asynccontextmanager
    async def spare(self) -> AsyncIterator[aiosqlite.Connection | None]:
        """A connection if one is idle and no request waits for it, else None, at once: a
        request that already holds one may share its work with it, and two such requests never
        wait on each other."""
        if self._free is None or self._free.locked():
            yield None
            return
        async with self.connection(may_refuse=False) as conn:
            yield conn

    def load(self) -> dict[str, int]:
        return {"connections": self._size, "busy": self._busy, "waiting": self._waiting}

    async def _open(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(f"file:{self._path}?mode=ro", uri=True)
        self._all.append(conn)
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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


# -- the writer's thread ------------------------------------------------------------------------------

Job = Callable[[], None]


class _Writer:
    """The one write connection and the thread it lives on. A job is a whole transaction (one
    hop between the event loop and the thread), so jobs never interleave.

    Page view commits are urgent: they go before any other waiting job, but not twice in a
    row while another job waits, so under a steady stream of page views the read model still
    advances, in the small steps it takes while page views wait."""

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self._ready = threading.Condition()
        self._urgent: deque[Job] = deque()
        self._other: deque[Job] = deque()
        self._last_was_urgent = False
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the queued jobs finish, then end the thread."""
        if self._thread is None:
            return
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()
        self._thread = None

    def submit(self, job: Job, *, urgent: bool = False) -> None:
        with self._ready:
            if self._thread is None or self._stopping:
                raise StoreClosedError("the store is closed")
            (self._urgent if urgent else self._other).append(job)
            self._ready.notify()

    async def call(self, work: Callable[[], T]) -> T:
        """Run work() on the writer's thread and return its result (or raise its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = work()
            except BaseException as error:  # the caller gets it, whatever it is
                _call_soon(loop, _fail, future, error)
            else:
                _call_soon(loop, _succeed, future, result)

        self.submit(job)
        return await future

    def connection(self) -> sqlite3.Connection:
        if self.conn is None:
            raise StoreClosedError("the store is not open")
        return self.conn

    def _next(self) -> Job | None:
        with self._ready:
            while not (self._urgent or self._other):
                if self._stopping:
                    return None
                self._ready.wait()
            take_urgent = bool(self._urgent) and not (self._last_was_urgent and self._other)
            self._last_was_urgent = take_urgent
            return self._urgent.popleft() if take_urgent else self._other.popleft()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                job()
            except BaseException:  # a job reports its own errors; this thread must not die
                logger.exception("a job on the database writer's thread failed")


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _succeed(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


# -- group commit ---------------------------------------------------------------------------------

OutboxValues = tuple[str, ...]  # an outbox row's columns, or (with log_directly) an event log row's but its seq
Transaction = Callable[[sqlite3.Connection, Work[None], bool], None]
Insert = Callable[[sqlite3.Connection, list[OutboxValues]], None]


class _GroupCommit:
    """Commits outbox rows from concurrent requests together. A commit starts as soon as the
    writer is free and takes every row that arrived until then (at most max_events): while one
    commit's fsync runs, the next commit's rows gather, and the event loop keeps serving."""

    def __init__(self, writer: _Writer, transaction: Transaction, max_events: int,
                 committed: Callable[[int], None], insert: Insert) -> None:
        self._writer = writer
        self._insert = insert
        self._transaction = transaction
        self._max_events = max_events
        self._committed = committed
        self._lock = threading.Lock()  # the loop appends, the writer's thread takes
        self._pending: list[tuple[OutboxValues, asyncio.Future[None]]] = []
        self._scheduled = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def waiting(self) -> bool:
        return self._scheduled

    async def append(self, row: OutboxValues) -> None:
        if self._closing:
            raise StoreClosedError("the store is closing")
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._pending.append((row, future))
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            self._writer.submit(self._commit, urgent=True)
        await future

    async def drain(self) -> None:
        """Refuse new rows, and return once every accepted one is committed."""
        self._closing = True
        while self._scheduled:
            await self._writer.call(lambda: None)  # the commits queued before it run first

    def _commit(self) -> None:
        """On the writer's thread: one durable transaction for the rows waiting now."""
        with self._lock:
            batch, self._pending = self._pending[: self._max_events], self._pending[self._max_events :]
            if self._pending:
                self._writer.submit(self._commit, urgent=True)
            else:
                self._scheduled = False
        if not batch:
            return
        assert self._loop is not None
        rows = [row for row, _ in batch]
        try:
            # durable: a 204 promises this survives a power cut
            self._transaction(self._writer.connection(), lambda conn: self._insert(conn, rows), True)
        except Exception as error:  # every waiting request learns of the failure; none is lost silently
            if isinstance(error, StorageUnavailableError):  # the store logged it; each request gets a 503
                logger.debug("outbox commit of %d events failed", len(batch), exc_info=True)
            else:
                logger.exception("outbox commit of %d events failed", len(batch))
            _call_soon(self._loop, _settle_batch, batch, error, self._committed)
            return
        _call_soon(self._loop, _settle_batch, batch, None, self._committed)


def _insert_outbox(conn: sqlite3.Connection, rows: list[OutboxValues]) -> None:
    conn.executemany("INSERT INTO outbox (flow_type, event_type, payload, collected_at) VALUES (?, ?, ?, ?)", rows)


def _insert_log(conn: sqlite3.Connection, rows: list[OutboxValues]) -> None:
    """Rows of (event_id, flow_type, event_type, time_bucket, valid_time, payload) into the event
    log, their seqs taken from the outbox's AUTOINCREMENT sequence: so no outbox row (a later run
    in Flowcore mode) can ever need the same seq, and the log stays in the order of its commits."""
    reserved = conn.execute("UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'outbox' RETURNING seq",
                            (len(rows),)).fetchone()
    if reserved is None:  # nothing was ever appended to the outbox: start its sequence after the log
        start = int(conn.execute("SELECT coalesce(max(seq), 0) FROM event_log").fetchone()[0])
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (start + len(rows),))
        reserved = (start + len(rows),)
    first = int(reserved[0]) - len(rows) + 1
    conn.executemany(
        "INSERT INTO event_log (seq, event_id, flow_type, event_type, time_bucket, valid_time, payload) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(first + index, *row) for index, row in enumerate(rows)],
    )


def _settle_batch(batch: list[tuple[OutboxValues, asyncio.Future[None]]], error: Exception | None,
                  committed: Callable[[int], None]) -> None:
    """On the event loop: answer every request of the commit."""
    for _, future in batch:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    if error is None:
        committed(len(batch))
