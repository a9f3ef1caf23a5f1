"""Every job beside serving (retention, forgetting visitor keys and ephemeral salts, writing
the drop counts, and their schedule), the DATA_DIR lock, and `collector.py rebuild`, which
recomputes the read model from the local event log.

A module of its own so that collector.py stays the HTTP app and its configuration; the SQL
these jobs need lives in store.py (the event log) and readmodel.py (the read model)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from filters import DropCounter
from privacy import previous_day
from readmodel import ReadModel
from store import DB_FILENAME, RETENTION_LAST_RUN, Store

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

    def __init__(self, store: Store, read_model: ReadModel, drops: DropCounter, keep_days: int, clock: Clock) -> None:
        self.store, self.read_model, self.drops = store, read_model, drops
        self.keep_days = keep_days
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
        await enforce_retention(self.store, self.read_model, self.keep_days, now)
        await self.store.forget_salts(previous_day(today.isoformat()))

    async def _write_drop_counts(self) -> None:
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), DROP_FLUSH_INTERVAL)
            try:
                await self.drops.flush()
            except Exception:
                logger.exception("writing the drop counts failed; they are kept for the next try")


def maintenance_pause(now: datetime) -> float:
    """Seconds to the next run: the interval, or just past the next UTC midnight if sooner."""
    utc = now.astimezone(UTC)
    midnight = datetime.combine(utc.date() + timedelta(days=1), time(), tzinfo=UTC)
    return max(1.0, min(MAINTENANCE_INTERVAL, (midnight - utc).total_seconds() + 1))


async def enforce_retention(store: Store, read_model: ReadModel, keep_days: int, now: datetime) -> None:
    """RAW_RETENTION_DAYS, at most once a day; the last run is kept in the store, so restarts
    do not make it run more often (nor skip it)."""
    last = await store.get_meta(RETENTION_LAST_RUN)
    if last is not None and now - datetime.fromisoformat(last) < RETENTION_INTERVAL:
        return
    await apply_retention(store, read_model, now.astimezone(store.tz).date(), keep_days, now)


@dataclass(frozen=True, slots=True)
class RetentionResult:
    kept_from: date
    pageviews_deleted: int
    events_deleted: int


async def apply_retention(store: Store, read_model: ReadModel, today: date, keep_days: int,
                          now: datetime) -> RetentionResult:
    """Delete raw page views and logged events of local days before today - keep_days. Logged
    events the local sink has not delivered yet stay; aggregates stay."""
    cutoff = today - timedelta(days=keep_days)
    pageviews = await read_model.delete_rows_before(cutoff)
    events = await store.delete_logged_before(store.local_midnight(cutoff.isoformat()))
    await store.record_retention(cutoff.isoformat(), now)
    if pageviews or events:
        logger.info("retention: deleted %d raw page views and %d logged events before %s", pageviews, events, cutoff)
    return RetentionResult(cutoff, pageviews, events)


# -- the data directory's lock ------------------------------------------------------------------------


class DataDirBusyError(RuntimeError):
    """Another process (a running collector, or a rebuild) holds DATA_DIR's lock."""


def lock_data_dir(data_dir: Path) -> int:
    """An exclusive flock on DATA_DIR/collector.lock, held until the descriptor closes; the
    kernel drops it when the process dies, so a crash never leaves a stale lock."""
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise DataDirBusyError(f"{data_dir} is in use by a running collector (or a rebuild)") from None
    return descriptor


# -- rebuild ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RebuildSummary:
    from_day: str | None
    replayed: int
    skipped: int  # logged events of days before from_day, whose aggregates were kept


async def rebuild(data_dir: Path, tz: ZoneInfo, now: datetime, progress: Progress | None = None) -> RebuildSummary:
    """Recompute the read model from the local event log, for the days the kept log covers in
    full (see Store.rebuild_from_day), in one transaction: a failed rebuild changes nothing."""
    descriptor = lock_data_dir(data_dir)
    store = Store(data_dir / DB_FILENAME, tz)
    read_model = ReadModel(store)
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


def progress_bar(stream: TextIO, width: int = 32) -> Progress:
    """A one-line bar redrawn in place, for a terminal only (a log file gets the summary)."""

    def show(done: int, total: int) -> None:
        filled = width * done // total if total else width
        stream.write(f"\rrebuild [{'#' * filled}{'.' * (width - filled)}] {done}/{total} events")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return show if stream.isatty() else (lambda done, total: None)
