"""Repeated log lines are written once, then counted; accept() failures at most once a second.
Real logging handlers and a real event loop, with an injected clock."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import resource

import pytest
from helpers import poll

from logrepeats import ALWAYS_LOG, LoopErrors, RepeatFilter, raise_descriptor_limit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> tuple[logging.Logger, io.StringIO, Clock]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    clock = Clock()
    handler.addFilter(RepeatFilter(60, clock))
    log = logging.getLogger("test-repeats")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log, stream, clock


def fail(log: logging.Logger, count: int) -> None:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        log.exception("outbox commit of %d events failed", count)


def test_a_repeated_error_is_written_once_then_with_its_count(
    logged: tuple[logging.Logger, io.StringIO, Clock]
) -> None:
    log, stream, clock = logged
    for count in range(100):  # the arguments differ; the failure is the same
        fail(log, count)
        clock.now += 0.1
    assert stream.getvalue().count("outbox commit of") == 1
    assert stream.getvalue().count("Traceback") == 1
    clock.now += 60
    fail(log, 7)
    last = stream.getvalue().splitlines()[-1]
    assert last == "outbox commit of 7 events failed (repeated 99 more times in the last 70 s)"
    assert stream.getvalue().count("Traceback") == 1  # the repeat leaves out the traceback


def test_different_errors_and_info_lines_are_not_held_back(logged: tuple[logging.Logger, io.StringIO, Clock]) -> None:
    log, stream, _ = logged
    fail(log, 1)
    log.error("something else")
    for _ in range(3):
        log.info("listening on %s", "x")
        log.warning("an outage starts", extra=ALWAYS_LOG)
    text = stream.getvalue()
    assert "something else" in text
    assert text.count("listening on x") == 3 and text.count("an outage starts") == 3


def test_accept_errors_are_written_at_most_once_a_second_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="collector")
    clock = Clock()
    handler = LoopErrors(1.0, clock)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "accepting a connection failed" in r.getMessage()]

    loop = asyncio.new_event_loop()
    try:
        error = OSError(errno.EMFILE, "Too many open files")
        for _ in range(500):  # one tick's worth of failed accept() calls
            handler(loop, {"message": "socket.accept() out of system resource", "exception": error})
        assert len(lines()) == 1 and "Too many open files" in lines()[0] and "more times" not in lines()[0]
        clock.now += 1.0
        # the handler's timer writes the count of those it held back, a second after the first line
        loop.run_until_complete(poll(lambda: len(lines()) == 2, 5, "the line with the count"))
        assert "499 more times in the last 1.0 s" in lines()[1]
        handler(loop, {"message": "Exception in callback BaseSelectorEventLoop._start_serving(...)",
                       "exception": ValueError("Invalid file descriptor: -1")})  # the retry timer, after close
    finally:
        loop.close()
    assert [r.levelname for r in caplog.records if "Invalid file descriptor" in r.getMessage()] == ["DEBUG"]


def test_other_loop_errors_go_to_the_default_handler(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        LoopErrors()(loop, {"message": "Task exception was never retrieved", "exception": RuntimeError("boom")})
    finally:
        loop.close()
    assert "Task exception was never retrieved" in caplog.text and "boom" in caplog.text


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lowered = max(64, min(soft, hard) // 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        before, after = raise_descriptor_limit()
        assert before == lowered
        assert after == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(hard, 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
