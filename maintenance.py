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


async def apply_retention(store: Store, read_model: ReadModel, today: date, keep_days: int, now: datetime, *,
                          local_delivery: bool = True) -> RetentionResult:
    """Delete raw page views and logged events of local days before today - keep_days. Logged
    events the local sink has not delivered yet stay; aggregates stay."""
    cutoff = today - timedelta(days=keep_days)
    pageviews = await read_model.delete_rows_before(cutoff)
    events = await store.delete_logged_before(store.local_midnight(cutoff.isoformat()),
                                              local_delivery=local_delivery)
    await store.record_retention(cutoff.isoformat(), now)
    if pageviews or events:
        logger.info("retention: deleted %d raw page views and %d logged events before %s", pageviews, events, cutoff)
    return RetentionResult(cutoff, pageviews, events)


# -- the data directory's lock ------------------------------------------------------------------------


class DataDirBusyError(RuntimeError):
    """Another process (a running collector, or a rebuild) holds DATA_DIR's lock."""


class DataDirNotWritableError(RuntimeError):
    """DATA_DIR cannot be created or written by this process's user."""


def lock_data_dir(data_dir: Path) -> int:
    """An exclusive flock on DATA_DIR/collector.lock, held until the descriptor closes; the
    kernel drops it when the process dies, so a crash never leaves a stale lock."""
    try:
        make_private_dir(data_dir)
        descriptor = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    except PermissionError:
        raise DataDirNotWritableError(not_writable_message(data_dir)) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise DataDirBusyError(f"{data_dir} is in use by a running collector (or a rebuild)") from None
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


def not_writable_message(data_dir: Path) -> str:
    """One line: which directory, which user, and how to fix it (in a container, a bind mount
    owned by root is the usual cause)."""
    uid, path = os.getuid(), data_dir.resolve()
    return (f"DATA_DIR {path} is not writable by user id {uid}: make it writable for that user (chown {uid} {path}), "
            "use a named Docker volume, or set DATA_DIR to a directory it can write")


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
