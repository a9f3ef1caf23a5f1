"""The collector as a real process: killed with SIGKILL it loses nothing, stopped with SIGTERM
it shuts down cleanly, and no IP address or user agent reaches its files or its log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import BROWSER_UA, query, raw_exchange

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CollectorProcess:
    """`python collector.py [args]` in a subprocess, its output appended to one log file. It runs
    in the log's directory, not the checkout, so a developer's .env there plays no part."""

    def __init__(self, data_dir: Path, log_path: Path, *args: str, **env: str) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATA_DIR": str(data_dir), "HOST": "127.0.0.1", "PORT": str(self.port),
                    "PYTHONUNBUFFERED": "1", **env}
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "collector.py"), *self.args], env=self.env, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.log_path.parent,
            )
        await self.poll_health(lambda body: body["status"] == "ok")

    async def poll_health(self, ready: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        """Poll /health until `ready` holds, with a deadline."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.process is not None and self.process.poll() is None, self.log_path.read_text()
                try:
                    async with session.get(self.url + "/health") as response:
                        body: dict[str, Any] = await response.json()
                        if ready(body):
                            return body
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"not ready in {timeout} s: {self.log_path.read_text()}"
                await asyncio.sleep(0.05)

    def stop(self, sig: signal.Signals) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.process = None
        return code


Running = Callable[..., CollectorProcess]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    made: list[CollectorProcess] = []

    def make(*args: str, **env: str) -> CollectorProcess:
        collector = CollectorProcess(tmp_path / "data", tmp_path / "collector.log", *args, **env)
        made.append(collector)
        return collector

    yield make
    for collector in made:
        if collector.process is not None:
            collector.process.kill()
            collector.process.wait()


async def send_pageviews(url: str, count: int, headers: dict[str, str] | None = None) -> list[int]:
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as session:

        async def one(index: int) -> int:
            body = json.dumps({"pathname": f"/p/{index}", "referrer": "", "domain": "example.com"})
            async with session.post(url + "/api/pageview", data=body,
                                    headers={"Content-Type": "text/plain", **(headers or {})}) as response:
                return response.status

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def test_a_collector_killed_after_answering_loses_nothing_and_counts_once(
    running: Running, tmp_path: Path
) -> None:
    collector = running(RATE_LIMIT_PER_SECOND="0")  # all from one address, as fast as it goes
    await collector.start()
    statuses = await send_pageviews(collector.url, 300)
    assert statuses == [204] * 300
    collector.stop(signal.SIGKILL)

    await collector.start()
    await collector.poll_health(lambda body: body["backlog"] == 0 and body["last_processed_at"] is not None)
    data = tmp_path / "data"
    assert query(data, "SELECT sum(pageviews) FROM daily_stats") == [(300,)]
    assert query(data, "SELECT count(*), count(DISTINCT event_id) FROM event_log") == [(300, 300)]
    assert query(data, "SELECT count(*) FROM pathway_state") == [(300,)]
    counts = dict(query(data, "SELECT pathname, count(*) FROM pageviews GROUP BY pathname"))
    assert counts == {f"/p/{i}": 1 for i in range(300)}
    assert collector.stop(signal.SIGTERM) == 0


async def test_sigterm_finishes_what_was_accepted_and_closes_cleanly(running: Running, tmp_path: Path) -> None:
    collector = running(RATE_LIMIT_PER_SECOND="0")
    await collector.start()
    assert await send_pageviews(collector.url, 100) == [204] * 100
    assert collector.stop(signal.SIGTERM) == 0
    data = tmp_path / "data"
    assert query(data, "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM event_log)") == [(100,)]
    assert "the database is closed" in (tmp_path / "collector.log").read_text()
    await collector.start()  # a restart resumes the outbox where it stopped
    await collector.poll_health(lambda body: body["backlog"] == 0)
    assert query(data, "SELECT sum(pageviews) FROM daily_stats") == [(100,)]
    assert collector.stop(signal.SIGINT) == 0


IPV4 = "198.51.100.231"
IPV6 = "2001:db8:feed:beef::77"
AGENT = "PrivacyProbe/7.3 (Distinctive; Agent-4471)"
# The v1 dimensions read these (RIPE NCC's addresses, registered in NL) while they are in memory;
# the browser's version is distinctive, so a version kept anywhere would be found.
KNOWN_IPV4 = "193.0.6.139"
KNOWN_IPV6 = "2001:67c:2e8:22::c100:68b"
KNOWN_AGENT = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
               "CriOS/131.0.6778.4471 Mobile/15E148 Safari/604.1")


@pytest.mark.parametrize("mode", ["seed", "ephemeral"])
async def test_no_ip_address_or_user_agent_reaches_the_files_or_the_log(
    running: Running, tmp_path: Path, mode: str
) -> None:
    collector = running(LOG_LEVEL="DEBUG", ACCESS_LOG="true", PRIVACY_MODE=mode)
    await collector.start()
    url = collector.url + "/api/pageview"
    async with aiohttp.ClientSession() as session:
        requests: list[tuple[str, dict[str, str], bytes]] = [
            ("POST", {"X-Forwarded-For": IPV4}, b'{"pathname": "/", "referrer": "", "domain": "example.com"}'),
            ("POST", {"X-Real-IP": IPV6}, b'{"pathname": "/a", "referrer": "", "domain": "example.com"}'),
            ("POST", {"X-Forwarded-For": IPV4}, b"{broken"),
            ("POST", {"X-Forwarded-For": IPV6}, b'{"pathname": 1, "referrer": ""}'),
            ("POST", {"X-Forwarded-For": IPV4}, b" " * 9000),
            ("OPTIONS", {"X-Forwarded-For": IPV4, "Origin": "https://example.com"}, b""),
            ("GET", {"X-Forwarded-For": IPV6}, b""),
        ]
        for method, headers, body in requests:
            headers = {**headers, "User-Agent": AGENT, "Content-Type": "text/plain"}
            async with session.request(method, url, data=body, headers=headers) as response:
                assert response.status < 500
        utm = b'"utm": {"source": "news", "campaign": "spring"}'
        dimensioned: list[tuple[dict[str, str], bytes]] = [
            ({"X-Forwarded-For": KNOWN_IPV4}, b'{"pathname": "/v1", "referrer": "", "domain": "x.com", ' + utm + b"}"),
            ({"X-Real-IP": KNOWN_IPV6}, b'{"pathname": "/v1b", "referrer": "", "domain": "example.com"}'),
            ({"X-Forwarded-For": KNOWN_IPV4, "CF-IPCountry": "SE"},
             b'{"pathname": "/v1c", "referrer": "", ' + utm + b"}"),
            ({"X-Forwarded-For": KNOWN_IPV6}, b'{"pathname": "/v1d", "referrer": "", "utm": {"source": 1}}'),
        ]
        for headers, body in dimensioned:
            headers = {**headers, "User-Agent": KNOWN_AGENT, "Content-Type": "text/plain", "Origin": "https://example.com"}
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status < 500
    await collector.poll_health(lambda body: body["backlog"] == 0 and body["last_processed_at"] is not None)
    assert collector.stop(signal.SIGTERM) == 0
    # the new code path ran: the dimensions are in the events, the address and user agent are not
    events = [json.loads(payload) for (payload,) in query(tmp_path / "data", "SELECT payload FROM event_log")]
    dimensions = [(e["pathname"], e["country"], e["browser"], e["os"], e["device"], e["utm"]) for e in events
                  if e["pathname"].startswith("/v1")]
    assert sorted(dimensions) == [
        ("/v1", "NL", "Chrome", "iOS", "mobile", {"source": "news", "campaign": "spring"}),
        ("/v1b", "NL", "Chrome", "iOS", "mobile", {}),
        ("/v1c", "SE", "Chrome", "iOS", "mobile", {"source": "news", "campaign": "spring"}),
    ]

    log = (tmp_path / "collector.log").read_bytes()
    assert b"POST /api/pageview" in log  # the access log did run
    files = {path: path.read_bytes() for path in (tmp_path / "data").iterdir() if path.is_file()}
    assert any(path.name.endswith(".sqlite3") for path in files)
    needles = (IPV4, IPV6, "2001:db8:feed", AGENT, "PrivacyProbe", KNOWN_IPV4, KNOWN_IPV6, "2001:67c:2e8",
               KNOWN_AGENT, "6778.4471", "17_4_1", "CriOS", "iPhone OS")
    for needle in needles:
        for name, content in [("log", log), *((str(path), data) for path, data in files.items())]:
            assert needle.encode() not in content, f"{needle!r} found in {name}"
            assert needle.encode("utf-16-le") not in content, f"{needle!r} (UTF-16) found in {name}"




async def test_main_applies_the_server_limits_and_timeouts(running: Running, tmp_path: Path) -> None:
    collector = running(BODY_TIMEOUT_MS="300", KEEPALIVE_TIMEOUT_MS="500")
    await collector.start()
    long_line = b"GET /health?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: c\r\n\r\n"
    many_headers = b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(70)) + b"\r\n"
    for raw in (long_line, many_headers, b"GET /health HTTP/1.1\r\nHost c\r\n\r\n"):
        answer = await raw_exchange("127.0.0.1", collector.port, raw)
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"Traceback" not in answer
    # half a body, then nothing: 408, and the connection is closed
    started = time.monotonic()
    half = b"POST /api/pageview HTTP/1.1\r\nHost: c\r\nContent-Type: text/plain\r\nContent-Length: 60\r\n\r\n{\"pa"
    answer = await raw_exchange("127.0.0.1", collector.port, half)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
    # headers that never end: the connection is closed without an answer once KEEPALIVE_TIMEOUT_MS runs out
    started = time.monotonic()
    assert await raw_exchange("127.0.0.1", collector.port, b"GET /health HTTP/1.1\r\nHost: c\r\n") == b""
    assert time.monotonic() - started < 5
    await collector.poll_health(lambda body: body["status"] == "ok")  # still up
    assert collector.stop(signal.SIGTERM) == 0
    log = (tmp_path / "collector.log").read_text()
    assert "refused a malformed HTTP request (LineTooLong)" in log
    assert "Error handling request from" not in log and "Traceback" not in log
