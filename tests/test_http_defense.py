"""Defensive HTTP over a real server and raw sockets: oversized request lines and headers get a
short 4xx and the server stays up, slow clients are cut off in time, every answer carries the
security headers, and each page's Content-Security-Policy matches what the page holds."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time

import pytest
from conftest import Start
from helpers import Client, raw_exchange

from collector import STATIC_DIR
from http_defense import CLIENT_MAX_SIZE, LINGERING_TIME, MAX_HEADERS, MAX_LINE_SIZE

PAGEVIEW = json.dumps({"pathname": "/", "referrer": "", "domain": "example.com"}).encode()


async def exchange(client: Client, raw: bytes, timeout: float = 10) -> bytes:
    assert client.port is not None
    return await raw_exchange(str(client.host), client.port, raw, timeout)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def request(path: str = "/health", headers: str = "", body: bytes = b"", method: str = "GET") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: collector\r\nConnection: close\r\n{headers}\r\n"
    return head.encode("latin-1") + body


def assert_no_internals(answer: bytes) -> None:
    """aiohttp's parser answers a short reason (quoting at most 100 bytes of the offending input)."""
    body = answer.split(b"\r\n\r\n", 1)[1]
    for word in (b"Traceback", b"File \"", b".py", b"Error"):
        assert word not in body, answer


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(request("/health?" + "a" * MAX_LINE_SIZE), id="request-line-over-4KiB"),
        pytest.param(request(headers="X-Big: " + "b" * 9000 + "\r\n"), id="header-field-over-8KiB"),
        pytest.param(request(headers="".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADERS + 5))), id="too-many-headers"),
        pytest.param(b"GET /health HTTP/1.1\r\nHost collector\r\n\r\n", id="header-without-colon"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), id="tls-on-the-http-port"),
        pytest.param(b"GET /health HTTP/1.1\r\nHost: c\r\nContent-Length: -5\r\n\r\n", id="negative-length"),
        pytest.param(b"GET /health HTTP/1.1\r\nHost: c\r\nX: a\x00b\r\n\r\n", id="nul-in-a-header"),
    ],
)
async def test_malformed_or_oversized_requests_get_a_short_400_and_the_server_stays_up(
    start_collector: Start, raw: bytes
) -> None:
    client = await start_collector()
    answer = await exchange(client, raw)
    assert status_of(answer) == 400
    assert_no_internals(answer)
    assert len(answer) < 1024
    assert (await client.get("/health")).status == 200


async def test_an_oversized_body_is_refused_on_every_endpoint(start_collector: Start) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET="s3cret")
    big = b"{" + b" " * CLIENT_MAX_SIZE + b"}"
    response = await client.post("/api/transformer", data=big, headers={"X-Secret": "s3cret"})
    assert response.status == 413
    assert (await response.json())["status"] == 413
    response = await client.post("/api/pageview", data=big, headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert await response.json() == {"status": 413, "error": "the body is larger than 8192 bytes"}


async def test_a_client_that_sends_half_a_body_and_stalls_gets_408_and_is_disconnected(start_collector: Start) -> None:
    client = await start_collector(BODY_TIMEOUT_MS="300")
    head = request("/api/pageview", f"Content-Type: application/json\r\nContent-Length: {len(PAGEVIEW)}\r\n",
                   method="POST").replace(b"Connection: close\r\n", b"")
    started = time.monotonic()
    answer = await exchange(client, head + PAGEVIEW[:10], timeout=5)  # read() returns when the server closes
    # answered after 0.3 s; closed once aiohttp's lingering read of the rest of the body gives up
    assert time.monotonic() - started < 0.3 + LINGERING_TIME + 1
    assert status_of(answer) == 408
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body) == {"status": 408, "error": "the request body did not arrive within 0.3 s"}
    assert b"\r\nConnection: close\r\n" in answer


async def test_a_chunked_body_that_stalls_gets_408(start_collector: Start) -> None:
    client = await start_collector(BODY_TIMEOUT_MS="300")
    head = request("/api/pageview", "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", method="POST")
    answer = await exchange(client, head + b"5\r\n{\"pat\r\n", timeout=5)
    assert status_of(answer) == 408


async def test_a_client_that_sends_its_headers_slowly_is_cut_off(start_collector: Start) -> None:
    client = await start_collector(KEEPALIVE_TIMEOUT_MS="400")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    started = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: collector\r\n")  # and never the blank line
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
    assert 0.3 < time.monotonic() - started < 3
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(start_collector: Start) -> None:
    client = await start_collector(KEEPALIVE_TIMEOUT_MS="400")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: collector\r\n\r\n")
    await writer.drain()
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.read(), 5)  # returns at EOF, when the server closes the idle connection
    assert reader.at_eof()
    writer.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200), ("GET", "/health", 200), ("GET", "/script.js", 200), ("GET", "/openapi.json", 200),
        ("GET", "/api/sites", 200), ("GET", "/nowhere", 404), ("DELETE", "/health", 405),
        ("POST", "/api/pageview", 415), ("OPTIONS", "/api/pageview", 204), ("POST", "/api/transformer", 404),
    ],
)
async def test_every_answer_carries_the_security_headers(
    start_collector: Start, method: str, path: str, status: int
) -> None:
    client = await start_collector()
    response = await client.request(method, path, headers={"Content-Type": "application/xml"})
    assert response.status == status
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert response.headers["Server"] == "flow-analytics-collector"


def inline_hash(block: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"


@pytest.mark.parametrize(
    ("path", "file", "referrer", "script_extra"),
    [
        ("/dashboard", "dashboard.html", "no-referrer", ""),
        ("/test.html", "test.html", "strict-origin-when-cross-origin", "'self' "),
    ],
)
async def test_each_page_has_a_policy_with_the_hashes_of_its_own_inline_blocks(
    start_collector: Start, path: str, file: str, referrer: str, script_extra: str
) -> None:
    client = await start_collector()
    response = await client.get(path)
    html = await response.text()
    assert html == (STATIC_DIR / file).read_text()
    # Every inline block, in order (the dashboard has its own script and style per panel group).
    scripts = " ".join(map(inline_hash, re.findall(r"<script>(.*?)</script>", html, re.S)))
    styles = " ".join(map(inline_hash, re.findall(r"<style>(.*?)</style>", html, re.S)))
    assert scripts and styles
    assert html.count("<script>") == scripts.count("sha256") and html.count("<style>") == styles.count("sha256")
    policy = response.headers["Content-Security-Policy"]
    assert policy == (
        f"default-src 'none'; script-src {script_extra}{scripts}; style-src {styles}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    assert "unsafe" not in policy
    assert response.headers["Referrer-Policy"] == referrer
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert " style=" not in html  # an inline style attribute would need 'unsafe-inline'
