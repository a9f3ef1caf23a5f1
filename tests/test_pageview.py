"""POST /api/pageview over real HTTP: the event it becomes, every way it can be refused, CORS,
client addresses behind proxies, and group commit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from conftest import Start
from helpers import SECRET, Client, FakeClock, drained, query, utc
from multidict import CIMultiDict

import privacy
from collector import EMITTER, STORE, client_ip, proxy_ranges
from config import load_config

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"
# Worked out with coreutils' sha256sum, not with the code under test:
#   salt = sha256("2025-06-04:" + SECRET); hash = sha256("198.51.100.23:" + UA + ":" + salt)
HASH_FIREFOX = "1c55fc9a9ddfde364af68ee4bca06a1d416e51ad437aec0f135d8c2d0a879b40"
HASH_NO_AGENT = "33748eac054c8dc1bdef884513177e8934b55fd4a12983ca697770d00bce047d"


def independent_hash(ip: str, agent: str, day: str) -> str:
    salt = hashlib.sha256(f"{day}:{SECRET}".encode()).hexdigest()
    return hashlib.sha256(f"{ip}:{agent}:{salt}".encode()).hexdigest()


async def post(client: Client, body: object, **headers: str) -> ClientResponse:
    headers.setdefault("Content-Type", "text/plain")
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return await client.post("/api/pageview", data=data, headers=headers)


def stored_events(data_dir: Path) -> int:
    return int(query(data_dir, "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM event_log)")[0][0])


async def test_a_page_view_becomes_an_anonymous_event_and_is_counted(start_collector: Start, data_dir: Path) -> None:
    """EVENT_VERSION=v0: the original's event, byte for byte (test_dimensions covers v1)."""
    clock = FakeClock(utc(2025, 6, 4, 10, 15, 30, 123000))
    client = await start_collector(clock=clock, EVENT_VERSION="v0")
    response = await post(
        client,
        {"pathname": "/home", "referrer": "https://www.google.com/search", "domain": "example.com",
         "utm": {"source": "newsletter"}},  # accepted, and not in a v0 event
        **{"User-Agent": FIREFOX, "X-Forwarded-For": "198.51.100.23", "CF-IPCountry": "DK"},
    )
    assert response.status == 204
    await drained(client)

    [(event_id, flow_type, event_type, bucket, valid_time, payload)] = query(
        data_dir, "SELECT event_id, flow_type, event_type, time_bucket, valid_time, payload FROM event_log"
    )
    assert (flow_type, event_type) == ("visitor.v0", "visitor.tracked.v0")
    assert uuid.UUID(event_id).version == 1
    assert (bucket, valid_time) == ("20250604100000", "2025-06-04T10:15:30.123Z")
    assert payload == (
        f'{{"visitorHash":"{HASH_FIREFOX}","domain":"example.com","pathname":"/home",'
        '"referrer":"https://www.google.com/search","sessionContext":{"dailySaltRotation":"2025-06-04"}}'
    )
    assert HASH_FIREFOX == independent_hash("198.51.100.23", FIREFOX, "2025-06-04")
    assert query(data_dir, "SELECT * FROM daily_stats") == [("example.com", "2025-06-04", 1, 1, 1, 1, 0)]
    assert query(data_dir, "SELECT * FROM page_stats") == [("example.com", "2025-06-04", "/home", 1, 1)]
    assert query(data_dir, "SELECT * FROM source_stats") == [("example.com", "2025-06-04", "google.com", 1, 1)]
    assert query(data_dir, "SELECT event_id FROM pathway_state") == [(event_id,)]


@pytest.mark.parametrize("agent", [None, ""], ids=["missing", "empty"])
def test_a_missing_or_empty_user_agent_is_hashed_as_unknown(agent: str | None) -> None:
    """The seed hash keeps the original's rule; over HTTP such page views are now dropped as
    empty-user-agent before they are hashed (test_filters), but the vector must not drift."""
    assert privacy.visitor_hash("198.51.100.23", agent, "2025-06-04", SECRET) == HASH_NO_AGENT


LONG = "x" * 2049


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        pytest.param(b"{not json", {}, 400, "the body is not valid JSON", id="not-json"),
        pytest.param(b"\xff\xfe\x00", {}, 400, "the body is not valid JSON", id="not-utf8"),
        pytest.param(b"[" * 4000 + b"]" * 4000, {}, 400, "nested too deeply", id="deep-nesting"),
        pytest.param([1, 2], {}, 400, "the body must be a JSON object", id="array"),
        pytest.param("null", {}, 400, "the body must be a JSON object", id="null"),
        pytest.param({"pathname": "/", "referrer": "", "bogus": 1, "ip": "x"}, {}, 400,
                     "unknown fields: 'bogus', 'ip'", id="unknown-keys"),
        pytest.param({"referrer": ""}, {}, 400, "pathname is required", id="missing-pathname"),
        pytest.param({"pathname": 7, "referrer": ""}, {}, 400, "pathname must be a string", id="pathname-type"),
        pytest.param({"pathname": "", "referrer": ""}, {}, 400, "pathname must be 1 to 2048", id="pathname-empty"),
        pytest.param({"pathname": LONG, "referrer": ""}, {}, 400, "pathname must be 1 to 2048", id="pathname-long"),
        pytest.param({"pathname": "/\ud800", "referrer": ""}, {}, 400, "pathname is not valid Unicode",
                     id="lone-surrogate"),
        pytest.param({"pathname": "/"}, {}, 400, "referrer is required", id="missing-referrer"),
        pytest.param({"pathname": "/", "referrer": None}, {}, 400, "referrer must be a string", id="referrer-type"),
        pytest.param({"pathname": "/", "referrer": LONG}, {}, 400, "referrer must be 0 to 2048", id="referrer-long"),
        pytest.param({"pathname": "/", "referrer": "", "domain": ["a"]}, {}, 400, "domain must be a string",
                     id="domain-type"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "exa mple.com"}, {}, 400,
                     "domain must be a hostname", id="domain-not-a-host"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "a" * 254}, {}, 400, "domain must be 1 to 253",
                     id="domain-long"),
        pytest.param({"pathname": "/", "referrer": ""}, {"Origin": "null"}, 400, "domain is missing",
                     id="no-domain-anywhere"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "d.com", "utm": "x"}, {}, 400,
                     "utm must be an object", id="utm-type"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "d.com", "utm": {"source": "a", "gclid": "b"}},
                     {}, 400,
                     "utm has unknown keys: 'gclid'", id="utm-unknown-key"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "d.com", "utm": {"source": 5}}, {}, 400,
                     "utm.source must be a string", id="utm-value-type"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "d.com", "utm": {"medium": None}}, {}, 400,
                     "utm.medium must be a string", id="utm-value-null"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "d.com", "utm": {"campaign": "c" * 257}}, {}, 400,
                     "utm.campaign must be 1 to 256 characters", id="utm-value-long"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "d.com", "utm": {"term": ""}}, {}, 400,
                     "utm.term must be 1 to 256 characters", id="utm-value-empty"),
        pytest.param({"pathname": "/", "referrer": "", "domain": "d.com", "utm": {"content": "\ud800"}}, {}, 400,
                     "utm.content is not valid Unicode", id="utm-lone-surrogate"),
        pytest.param(b"{}" + b" " * 8191, {}, 413, "larger than 8192 bytes", id="oversized"),
        pytest.param({"pathname": "/", "referrer": ""}, {"Content-Type": "application/x-www-form-urlencoded"}, 415,
                     "Content-Type must be application/json or text/plain", id="form-content-type"),
    ],
)
async def test_bad_input_is_refused_with_a_message_and_nothing_is_stored(
    start_collector: Start, data_dir: Path, body: object, headers: dict[str, str], status: int, message: str
) -> None:
    client = await start_collector()
    response = await post(client, body, **headers)
    assert response.status == status
    answer = await response.json()
    assert set(answer) == {"status", "error"}
    assert answer["status"] == status
    assert message in answer["error"]
    assert stored_events(data_dir) == 0


async def test_a_body_over_the_limit_without_content_length_is_refused(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 1024

    response = await client.post("/api/pageview", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert stored_events(data_dir) == 0


@pytest.mark.parametrize(
    ("headers", "body_domain", "expected"),
    [
        pytest.param({"Origin": "https://Blog.Example.org:8443"}, None, "blog.example.org", id="origin"),
        pytest.param({"Origin": "null", "Referer": "https://shop.example.net/cart?x=1"}, None, "shop.example.net",
                     id="referer-when-origin-is-null"),
        pytest.param({"Referer": "http://[::1]:8080/"}, None, "[::1]", id="ipv6-referer"),
        pytest.param({"Origin": "https://a.example"}, "B.example.", "b.example", id="body-wins"),
        pytest.param({}, "bücher.example", "xn--bcher-kva.example", id="idna"),
    ],
)
async def test_the_domain_comes_from_the_body_else_origin_else_referer(
    start_collector: Start, data_dir: Path, headers: dict[str, str], body_domain: str | None, expected: str
) -> None:
    client = await start_collector()
    body = {"pathname": "/", "referrer": ""}
    if body_domain is not None:
        body["domain"] = body_domain
    assert (await post(client, body, **headers)).status == 204
    await drained(client)
    [(payload,)] = query(data_dir, "SELECT payload FROM event_log")
    assert json.loads(payload)["domain"] == expected


async def test_cors_preflight_and_reflected_origin(start_collector: Start) -> None:
    client = await start_collector()
    preflight = await client.options(
        "/api/pageview",
        headers={"Origin": "https://site.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"},
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://site.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]

    accepted = await post(client, {"pathname": "/", "referrer": ""}, Origin="https://other.example")
    assert accepted.status == 204
    assert accepted.headers["Access-Control-Allow-Origin"] == "https://other.example"
    refused = await post(client, {"pathname": 1, "referrer": ""}, Origin="https://other.example")
    assert refused.status == 400
    assert refused.headers["Access-Control-Allow-Origin"] == "https://other.example"


TRUSTED = proxy_ranges(load_config({"SECRET_KEY": SECRET, "DATA_DIR": "/nonexistent"}).server.trusted_proxies)


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        pytest.param("203.0.113.5", [("X-Forwarded-For", "1.2.3.4")], "203.0.113.5", id="untrusted-peer-ignored"),
        pytest.param("10.0.0.1", [("X-Forwarded-For", "1.2.3.4")], "1.2.3.4", id="trusted-peer"),
        pytest.param("10.0.0.1", [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.0.0.2")], "198.51.100.7",
                     id="right-most-untrusted-hop"),
        pytest.param("127.0.0.1", [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.8")],
                     "198.51.100.8", id="repeated-header"),
        pytest.param("127.0.0.1", [("X-Forwarded-For", "192.168.1.4, 10.1.1.1")], "192.168.1.4",
                     id="all-hops-trusted-takes-left-most"),
        pytest.param("127.0.0.1", [("X-Real-IP", "198.51.100.9"), ("X-Forwarded-For", "198.51.100.10")],
                     "198.51.100.10", id="forwarded-for-before-real-ip"),
        pytest.param("127.0.0.1", [("X-Real-IP", "198.51.100.9"), ("CF-Connecting-IP", "198.51.100.11")],
                     "198.51.100.9", id="real-ip-before-cloudflare"),
        pytest.param("127.0.0.1", [("CF-Connecting-IP", "2001:db8::5")], "2001:db8::5", id="cloudflare"),
        pytest.param("127.0.0.1", [("X-Forwarded-For", "garbage, 10.0.0.3"), ("X-Real-IP", "198.51.100.12")],
                     "198.51.100.12", id="unreadable-hop-falls-through"),
        pytest.param("127.0.0.1", [("X-Forwarded-For", "[2001:db8::1]:443")], "2001:db8::1", id="bracketed-v6-port"),
        pytest.param("127.0.0.1", [("X-Forwarded-For", "198.51.100.13:5555")], "198.51.100.13", id="v4-port"),
        pytest.param("::ffff:198.51.100.14", [], "198.51.100.14", id="v4-mapped-peer"),
        pytest.param("127.0.0.1", [], "127.0.0.1", id="no-headers"),
    ],
)
def test_client_ip(peer: str, headers: list[tuple[str, str]], expected: str) -> None:
    assert client_ip(peer, CIMultiDict(headers), TRUSTED) == expected


async def test_a_client_not_behind_a_trusted_proxy_cannot_choose_its_hash(
    start_collector: Start, data_dir: Path
) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 12)), TRUSTED_PROXIES="")
    body = {"pathname": "/", "referrer": "", "domain": "example.com"}
    assert (await post(client, body, **{"X-Forwarded-For": "198.51.100.23", "User-Agent": FIREFOX})).status == 204
    await drained(client)
    [(payload,)] = query(data_dir, "SELECT payload FROM event_log")
    assert json.loads(payload)["visitorHash"] == independent_hash("127.0.0.1", FIREFOX, "2025-06-04")


async def test_requests_arriving_together_share_a_commit(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()
    store = client.app[STORE]
    body = {"pathname": "/", "referrer": "", "domain": "example.com"}
    responses = await asyncio.gather(*(post(client, body) for _ in range(40)))
    assert [r.status for r in responses] == [204] * 40
    assert store.outbox_appends == 40
    assert store.outbox_commits < 40
    await drained(client)
    assert query(data_dir, "SELECT pageviews FROM daily_stats") == [(40,)]


async def test_service_endpoints(start_collector: Start) -> None:
    client = await start_collector()
    info = await (await client.get("/")).json()
    assert info["mode"] == "local"
    assert "POST /api/pageview" in info["endpoints"]
    health = await client.get("/health")
    assert health.status == 200
    body = await health.json()
    assert {"status", "mode", "version", "backlog", "dead_letters", "last_processed_at", "database"} <= set(body)
    assert body["status"] == "ok" and body["database"] == "ok"
    page = await client.get("/test.html")
    assert page.status == 200
    assert "/api/pageview" in await page.text()
    missing = await client.get("/nowhere")
    assert missing.status == 404
    assert await missing.json() == {"status": 404, "error": "no such endpoint: /nowhere"}
    wrong_method = await client.get("/api/pageview")
    assert wrong_method.status == 405
    assert "GET is not allowed" in (await wrong_method.json())["error"]


async def test_health_shows_how_many_seconds_the_read_model_is_behind(start_collector: Start) -> None:
    clock = FakeClock(utc(2025, 6, 4, 12))
    client = await start_collector(clock=clock)
    assert (await post(client, {"pathname": "/", "referrer": "", "domain": "example.com"})).status == 204
    await drained(client)
    assert (await (await client.get("/health")).json())["lag_seconds"] == 0
    await client.app[EMITTER].stop()  # the read model stops following, as under a flood
    assert (await post(client, {"pathname": "/", "referrer": "", "domain": "example.com"})).status == 204
    clock.advance(seconds=7.5)
    body = await (await client.get("/health")).json()
    assert (body["backlog"], body["lag_seconds"]) == (1, 7.5)


async def test_health_reports_the_backlog_and_last_processed_event(start_collector: Start) -> None:
    client = await start_collector()
    assert (await post(client, {"pathname": "/", "referrer": "", "domain": "example.com"})).status == 204
    await drained(client)
    body = await (await client.get("/health")).json()
    assert body["backlog"] == 0
    assert body["dead_letters"] == 0
    assert body["last_processed_at"].endswith("Z")
