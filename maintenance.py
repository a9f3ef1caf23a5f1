"""Every job beside serving (retention, forgetting visitor keys and ephemeral salts, writing
the drop counts, and their schedule), the DATA_DIR lock, `collector.py rebuild`, which
recomputes the read model from the local event log, and `collector.py dead-letters --retry`.

A module of its own so that collector.py stays the HTTP app and its configuration; the SQL
these jobs need lives in store.py (the event log) and readmodel.py (the read model)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import pwd
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from eventmodel import EventLimits
from filters import DropCounter
from pathways import Pathways
from privacy import previous_day
from readmodel import ReadModel
from store import DB_FILENAME, RETENTION_LAST_RUN, DeadLetter, StorageUnavailableError, Store

logger = logging.getLogger(__name__)

LOCK_FILENAME = "collector.lock"
RETENTION_INTERVAL = timedelta(days=1)
MAINTENANCE_INTERVAL = 600.0  # seconds between runs of forgetting and retention
DROP_FLUSH_INTERVAL = 1.0  # seconds: what a crash can lose of the drop counts

Progress = Callable[[int, int], None]
Clock = Callable[[], datetime]


class Jobs:
    """The jobs that run beside serving, started and stopped together: forgetting visitor keys,
    retention and old salts at start-up, every MAINTENANCE_INTERVAL and just after each UTC
    midnight (when an ephemeral salt's 48 hours end); the drop counts every second."""

    def __init__(self, store: Store, read_model: ReadModel, drops: DropCounter, keep_days: int, clock: Clock, *,
                 local_delivery: bool = True) -> None:
        self.store, self.read_model, self.drops = store, read_model, drops
        self.keep_days = keep_days
        self.local_delivery = local_delivery  # whether the local sink delivers (logged events it has not stay)
        self.clock = clock
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._maintain(), name="maintenance"),
                       asyncio.create_task(self._write_drop_counts(), name="drop-counts")]

    async def stop(self) -> None:
        """Stop both; the drop counts' last flush writes what the final requests dropped."""
        self._stop.set()
        for task in self._tasks:
            with suppress(Exception):
                await task

    async def _maintain(self) -> None:
        while not self._stop.is_set():
            try:
                await self.run_once()
            except Exception:
                logger.exception("maintenance failed; it runs again in %d s", MAINTENANCE_INTERVAL)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), maintenance_pause(self.clock()))

    async def run_once(self) -> None:
        now = self.clock()
        today = now.astimezone(UTC).date()
        await self.read_model.forget_expired_visitors(today)
        await enforce_retention(self.store, self.read_model, self.keep_days, now, local_delivery=self.local_delivery)
        await self.store.forget_salts(previous_day(today.isoformat()))

    async def _write_drop_counts(self) -> None:
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), DROP_FLUSH_INTERVAL)
            try:
                await self.drops.flush()
            except StorageUnavailableError as error:  # the store logs the outage; one line here
                logger.warning("writing the drop counts failed (%s); they are kept for the next try", error)
            except Exception:
                logger.exception("writing the drop counts failed; they are kept for the next try")


def maintenance_pause(now: datetime) -> float:
    """Seconds to the next run: the interval, or just past the next UTC midnight if sooner."""
    utc = now.astimezone(UTC)
    midnight = datetime.combine(utc.date() + timedelta(days=1), time(), tzinfo=UTC)
    return max(1.0, min(MAINTENANCE_INTERVAL, (midnight - utc).total_seconds() + 1))


async def enforce_retention(
    store: Store, read_model: ReadModel, keep_days: int, now: datetime, *, local_delivery: bool = True
) -> None:
    """RAW_RETENTION_DAYS, at most once a day; the last run is kept in the store, so restarts
    do not make it run more often (nor skip it)."""
    last = await store.get_meta(RETENTION_LAST_RUN)
    if last is not None and now - datetime.fromisoformat(last) < RETENTION_INTERVAL:
        return
    await apply_retention(store, read_model, now.astimezone(store.tz).date(), keep_days, now,
                          local_delivery=local_delivery)


@dataclass(frozen=True, slots=True)
class RetentionResult:
    kept_from: date
    pageviews_deleted: int
    events_deleted: int
    event_rows_deleted: int = 0  # raw rows of custom events (events_deleted: of the event log)


async def apply_retention(store: Store, read_model: ReadModel, today: date, keep_days: int, now: datetime, *,
                          local_delivery: bool = True) -> RetentionResult:
    """Delete raw page views, raw custom events and logged events of local days before today -
    keep_days. Logged events the local sink has not delivered yet stay; aggregates stay."""
    cutoff = today - timedelta(days=keep_days)
    pageviews = await read_model.delete_rows_before(cutoff)
    event_rows = await read_model.events.delete_rows_before(cutoff)
    events = await store.delete_logged_before(store.local_midnight(cutoff.isoformat()),
                                              local_delivery=local_delivery)
    await store.record_retention(cutoff.isoformat(), now)
    if pageviews or event_rows or events:
        logger.info("retention: deleted %d raw page views, %d raw custom events and %d logged events before %s",
                    pageviews, event_rows, events, cutoff)
    return RetentionResult(cutoff, pageviews, events, event_rows)


# -- the data directory's lock ------------------------------------------------------------------------


class DataDirBusyError(RuntimeError):
    """Another process (a running collector, or a rebuild) holds DATA_DIR's lock."""


class DataDirError(RuntimeError):
    """DATA_DIR cannot be used: the message says why and what to do, in one line."""


# What the collector writes in DATA_DIR besides the lock: each must be writable if it exists.
DATA_FILES = (DB_FILENAME, DB_FILENAME + "-wal", DB_FILENAME + "-shm")


def lock_data_dir(data_dir: Path) -> int:
    """An exclusive flock on DATA_DIR/collector.lock, held until the descriptor closes; the
    kernel drops it when the process dies, so a crash never leaves a stale lock. DATA_DIR is created
    0700; one that is a file, read-only or not writable by this user raises DataDirError."""
    try:
        make_private_dir(data_dir)
        descriptor = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise DataDirError(data_dir_problem(data_dir, error)) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        check_writable(data_dir)
    except BlockingIOError:
        os.close(descriptor)
        raise DataDirBusyError(f"{data_dir} is in use by a running collector (or a rebuild)") from None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def make_private_dir(path: Path) -> None:
    """DATA_DIR and any parent it needs; DATA_DIR itself 0700 when created here, whatever the
    umask: it holds the secret key and the database."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:  # another process made it first: theirs, as it is
        return
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; chmod's is not


def check_writable(data_dir: Path) -> None:
    """SQLite creates its -wal and -shm files beside the database, so the directory must be
    writable too, and so must any of those files already there (one left by another user)."""
    for path in (data_dir, *(data_dir / name for name in DATA_FILES)):
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path == data_dir else 0)):
            problem = errno.EROFS if _read_only(path) else errno.EACCES
            raise DataDirError(data_dir_problem(data_dir, OSError(problem, os.strerror(problem), str(path))))


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def data_dir_problem(data_dir: Path, error: OSError) -> str:
    """One line: what is wrong with DATA_DIR, and what to do about it."""
    where = f"DATA_DIR {data_dir}"
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{where} is not a directory (it, or a directory above it, is a file); set DATA_DIR to a directory"
    if error.errno == errno.EROFS:
        return f"{where} is on a read-only file system; mount it writable, or set DATA_DIR to a writable directory"
    if error.errno in (errno.EACCES, errno.EPERM):
        user, uid = process_user(), os.geteuid()
        return (f"{where} is not writable by the collector's user {user} (user id {uid}): {error.filename} "
                f"refused it; make it writable for that user (chown -R {uid} {data_dir}), use a named Docker "
                "volume, or set DATA_DIR to a directory it can write")
    if error.errno == errno.ENOSPC:
        return f"{where}: no space left on its device; free some space"
    return f"{where} cannot be used: {error.strerror or error}"


def process_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# -- rebuild ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RebuildSummary:
    from_day: str | None
    replayed: int
    skipped: int  # logged events of days before from_day, whose aggregates were kept


async def rebuild(data_dir: Path, tz: ZoneInfo, now: datetime, progress: Progress | None = None, *,
                  event_limits: EventLimits | None = None) -> RebuildSummary:
    """Recompute the read model from the local event log, for the days the kept log covers in
    full (see Store.rebuild_from_day), in one transaction: a failed rebuild changes nothing.
    The bounds on custom events must be the ones live processing had, or (other) differs."""
    descriptor = lock_data_dir(data_dir)
    store = Store(data_dir / DB_FILENAME, tz)
    read_model = ReadModel(store, event_limits=event_limits)
    try:
        await store.open()
        summary = await _replay_log(store, read_model, progress or (lambda done, total: None))
        await read_model.forget_expired_visitors(now.astimezone(UTC).date())
        return summary
    finally:
        await store.close()
        os.close(descriptor)


async def _replay_log(store: Store, read_model: ReadModel, progress: Progress) -> RebuildSummary:
    from_day = await store.rebuild_from_day()
    if from_day is None:
        return RebuildSummary(None, 0, 0)
    replayed, total = await read_model.rebuild(from_day, progress)
    return RebuildSummary(from_day, replayed, total - replayed)


# -- dead letters -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryResult:
    letter: DeadLetter
    error: str | None  # None: processed at last, and the dead letter is gone


async def retry_dead_letters(data_dir: Path, tz: ZoneInfo, wire: Callable[[Store], Pathways]) -> list[RetryResult]:
    """Run every dead letter's event once more, oldest first, each in its own transaction, while
    holding DATA_DIR's lock (so no collector delivers the same event meanwhile)."""
    descriptor = lock_data_dir(data_dir)
    store = Store(data_dir / DB_FILENAME, tz)
    pathways = wire(store)  # before opening: the read model adds its migrations
    try:
        await store.open()
        return [RetryResult(letter, await pathways.retry_dead_letter(letter)) for letter in await store.dead_letters()]
    finally:
        await store.close()
        os.close(descriptor)


def progress_bar(stream: TextIO, width: int = 32) -> Progress:
    """A one-line bar redrawn in place, for a terminal only (a log file gets the summary)."""

    def show(done: int, total: int) -> None:
        filled = width * done // total if total else width
        stream.write(f"\rrebuild [{'#' * filled}{'.' * (width - filled)}] {done}/{total} events")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show if stream.isatty() else (lambda done, total: None)
