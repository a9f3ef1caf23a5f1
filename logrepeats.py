"""Log lines that repeat: the first is written, the repeats are counted, and the count is written
with the next one after a quiet interval. A full disk fails every request and the emitter every
second; a descriptor limit fails every accept(): without this, the log grows by megabytes a
minute and buries the one line that says what is wrong.

A module of its own because both the logging set-up and the event loop's error handler in
collector.py's main() use it, and neither belongs to the HTTP app."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("collector")

REPEAT_INTERVAL = 60.0  # seconds a repeated warning or error stays quiet after it was written
ACCEPT_INTERVAL = 1.0  # seconds between two lines about failing accept() calls
MAX_KEYS = 1000  # distinct repeated messages remembered
# accept() fails with these when the process or the system runs out of descriptors or memory.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Clock = Callable[[], float]
# extra= for a record RepeatFilter must let through: the start and end of an outage, which their
# writer already limits.
ALWAYS_LOG = {"always_log": True}


class RepeatFilter(logging.Filter):
    """On a handler: a warning or error identical to one written less than `interval` ago (same
    logger, level, message template and exception) is dropped and counted; the next one after
    the interval is written with the count, and without the traceback the first one showed.
    The arguments are left out of the comparison on purpose: "outbox commit of 64 events
    failed" and "... of 3 events failed" are the same failure."""

    def __init__(self, interval: float = REPEAT_INTERVAL, clock: Clock = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._seen: OrderedDict[tuple[Any, ...], list[float]] = OrderedDict()  # key: [written at, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "always_log", False):
            return True
        key = _key(record)
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} (repeated {int(seen[1])} more times in the last {now - seen[0]:.0f} s)"
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        if len(self._seen) > MAX_KEYS:
            self._seen.popitem(last=False)
        return True


def _key(record: logging.LogRecord) -> tuple[Any, ...]:
    error = record.exc_info[1] if record.exc_info else None
    return record.name, record.levelno, str(record.msg), type(error).__name__, str(error)


def install(handlers: list[logging.Handler], interval: float = REPEAT_INTERVAL) -> None:
    """Put one RepeatFilter on each handler (records from every logger pass through them)."""
    repeats = RepeatFilter(interval)
    for handler in handlers:
        handler.addFilter(repeats)


class LoopErrors:
    """The event loop's exception handler: accept() failing for want of descriptors or memory is
    written at most once per `interval`, as one line with a count and no traceback; the rest
    goes to the loop's default handler (and through RepeatFilter)."""

    def __init__(self, interval: float = ACCEPT_INTERVAL, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._written_at = -interval
        self._dropped = 0
        self._last_error = ""
        self._flush: asyncio.TimerHandle | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            self._accept_failed(loop, error)
        elif isinstance(error, ValueError) and "_start_serving" in context.get("message", ""):
            # asyncio's accept retry timer firing after the server closed (at shutdown): harmless
            logger.debug("accept retry after the server closed: %s", error)
        else:
            loop.default_exception_handler(context)

    def _accept_failed(self, loop: asyncio.AbstractEventLoop, error: OSError) -> None:
        self._last_error = error.strerror or str(error)
        now = self._clock()
        if now - self._written_at >= self.interval:
            self._write(now)
            return
        self._dropped += 1
        if self._flush is None:
            self._flush = loop.call_later(self._written_at + self.interval - now, self._write_dropped)

    def _write_dropped(self) -> None:
        self._flush = None
        if self._dropped:
            self._write(self._clock())

    def _write(self, now: float) -> None:
        repeats = f"; {self._dropped} more times in the last {now - self._written_at:.1f} s" if self._dropped else ""
        logger.error("accepting a connection failed: %s (this process may hold %s file descriptors)%s",
                     self._last_error, descriptor_limit(), repeats, extra=ALWAYS_LOG)  # already limited here
        self._written_at, self._dropped = now, 0


def descriptor_limit() -> str:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def raise_descriptor_limit(ceiling: int = 1 << 20) -> tuple[int, int]:
    """Raise the soft file-descriptor limit to the hard one (at most `ceiling`): each connection
    is a descriptor, and a default soft limit of 1,024 is reached by a thousand slow clients.
    Returns the soft limit before and after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            logger.warning("could not raise the file-descriptor limit from %d to %d: %s", soft, target, error)
            return soft, soft
        return soft, target
    return soft, soft
