"""Helpers the tests share: an injected clock, waiting for the emitter, reading the database."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from collector import EMITTER
from store import DB_FILENAME

Client = TestClient[web.Request, web.Application]  # the real app over real HTTP

SECRET = "this-is-a-test-secret-key-of-40-chars!!"
# A desktop browser's user agent: the collector drops page views from bots, HTTP libraries
# (aiohttp's own default user agent among them), headless browsers and empty user agents.
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


class FakeClock:
    """An injected clock that moves only when the test says so."""

    def __init__(self, moment: datetime) -> None:
        self.now = moment

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


async def poll(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10, what: str = "the condition") -> None:
    """Poll until the check holds, with a deadline: for what no event announces (a background
    job, another process)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout:g} s"
        await asyncio.sleep(0.01)


async def drained(client: Client) -> None:
    """Wait until every committed page view has been through the emitter and the router."""
    await asyncio.wait_for(client.app[EMITTER].wait_drained(), 10)


def query(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
        microsecond: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


async def raw_exchange(host: str, port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
