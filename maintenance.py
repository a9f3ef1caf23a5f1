"""Jobs beside serving: the daily retention, the DATA_DIR lock, `collector.py rebuild`, which
recomputes the read model from the local event log, and `collector.py dead-letters --retry`.

A module of its own so that collector.py stays the HTTP app and its configuration; the SQL
these jobs need lives in store.py (the event log) and readmodel.py (the read model)."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo

from eventmodel import EventLimits
from pathways import Pathways
from readmodel import ReadModel
from store import DB_FILENAME, RETENTION_LAST_RUN, DeadLetter, Store

logger = logging.getLogger(__name__)

LOCK_FILENAME = "collector.lock"
RETENTION_INTERVAL = timedelta(days=1)

Progress = Callable[[int, int], None]


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
