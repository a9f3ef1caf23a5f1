"""POST /api/event over real HTTP: the visitor.event.v0 event it becomes, every way it can be
refused (the contract's bounds on names and properties among them), the page view's rules
(filters, rate limit, CORS, group commit), and the router's de-duplication, in local and
Flowcore mode. How the read model counts them: test_event_stats.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from conftest import Start
from fake_flowcore import FakeFlowcore
from helpers import SECRET, FakeClock, drained, poll, query, utc

from collector import DROPS, MAX_EVENT_BYTES, STORE, __version__
from openapi import document
from pathways import (
    MAX_EVENT_NAME_LENGTH,
    MAX_EVENT_PROPS,
    MAX_PAYLOAD_BYTES,
    MAX_PROP_KEY_LENGTH,
    MAX_PROP_VALUE_LENGTH,
    VISITOR_EVENT,
    ContractError,
)

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"
TRANSFORMER_SECRET = "transformer-secret-for-tests"
SIGNUP = {"name": "Signup", "pathname": "/pricing", "domain": "example.com", "props": {"plan": "pro"}}
EVENT_TYPE = "SELECT count(*) FROM {} WHERE event_type = 'visitor.event.v0'"


async def post(client: TestClient[Any, Any], body: object, **headers: str) -> ClientResponse:
    headers = {"Content-Type": "text/plain", "X-Forwarded-For": "198.51.100.23", **headers}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return await client.post("/api/event", data=data, headers=headers)


def stored(data_dir: Path) -> int:
    """Events kept anywhere: waiting in the outbox or in the event log."""
    return sum(query(data_dir, EVENT_TYPE.format(table))[0][0] for table in ("outbox", "event_log"))


def logged_payloads(data_dir: Path) -> list[dict[str, Any]]:
    sql = "SELECT payload FROM event_log WHERE event_type = 'visitor.event.v0' ORDER BY seq"
    return [json.loads(text) for (text,) in query(data_dir, sql)]


def independent_hash(ip: str, agent: str, day: str) -> str:
    salt = hashlib.sha256(f"{day}:{SECRET}".encode()).hexdigest()
    return hashlib.sha256(f"{ip}:{agent}:{salt}".encode()).hexdigest()


# -- what an event becomes ------------------------------------------------------------------------------------


async def test_an_event_becomes_an_anonymous_visitor_event_in_the_log(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 10, 15, 30, 123000)))
    body = {"name": "Purchase", "pathname": "/checkout", "referrer": "https://shop.example/cart",
            "domain": "Example.COM", "props": {"plan": "pro", "amount": 49.5, "seats": 3, "trial": False}}
    response = await post(client, body, **{"User-Agent": FIREFOX})
    assert response.status == 204
    await drained(client)

    [(event_id, flow_type, event_type, valid_time, payload)] = query(
        data_dir, "SELECT event_id, flow_type, event_type, valid_time, payload FROM event_log")
    assert (flow_type, event_type, valid_time) == ("visitor.v0", "visitor.event.v0", "2025-06-04T10:15:30.123Z")
    assert uuid.UUID(event_id).version == 1
    assert json.loads(payload) == {
        "visitorHash": independent_hash("198.51.100.23", FIREFOX, "2025-06-04"),
        "domain": "example.com",
        "pathname": "/checkout",
        "referrer": "https://shop.example/cart",
        "name": "Purchase",
        "props": {"plan": "pro", "amount": 49.5, "seats": 3, "trial": False},
        "sessionContext": {"dailySaltRotation": "2025-06-04"},
        # derived as for a page view (198.51.100.23 is a documentation address: no country)
        "country": None, "browser": "Firefox", "os": "Linux", "device": "desktop",
    }
    # Routed and claimed, so a redelivery changes nothing; no page view counted for it.
    assert query(data_dir, "SELECT event_id, pathway FROM pathway_state") == [(event_id, "visitor.v0/visitor.event.v0")]
    assert query(data_dir, "SELECT count(*) FROM daily_stats") == [(0,)]
    assert query(data_dir, "SELECT count(*) FROM pageviews") == [(0,)]


async def test_optional_fields_take_their_defaults_and_the_domain_comes_from_origin(
    start_collector: Start, data_dir: Path
) -> None:
    client = await start_collector()
    response = await post(client, {"name": "404", "pathname": "/missing"}, Origin="https://Blog.example.org")
    assert response.status == 204
    await drained(client)
    [payload] = logged_payloads(data_dir)
    assert (payload["domain"], payload["referrer"], payload["props"]) == ("blog.example.org", "", {})


async def test_the_bounds_themselves_are_accepted(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()
    bodies: list[dict[str, Any]] = [
        {"name": "n" * MAX_EVENT_NAME_LENGTH, "pathname": "/"},
        {"name": "Many", "pathname": "/", "props": {f"key{i}": i for i in range(MAX_EVENT_PROPS)}},
        {"name": "Long", "pathname": "/", "props": {"k" * MAX_PROP_KEY_LENGTH: "v" * MAX_PROP_VALUE_LENGTH}},
        {"name": "Numbers", "pathname": "/", "props": {"max": 2**53 - 1, "min": -(2**53 - 1), "x": -1.5e300,
                                                       "empty": "", "yes": True}},
        {"name": "Unicode 🎉", "pathname": "/ü", "props": {"ключ": "значение", "emoji": "🎉" * 100}},
    ]
    for body in bodies:
        response = await post(client, {**body, "domain": "example.com"})
        assert response.status == 204, await response.text()
    await drained(client)
    assert [payload["name"] for payload in logged_payloads(data_dir)] == [body["name"] for body in bodies]
    for payload in logged_payloads(data_dir):
        VISITOR_EVENT.validate(payload)


# -- what is refused ------------------------------------------------------------------------------------------

OK = {"name": "Signup", "pathname": "/"}
TOO_MANY = {f"k{i}": "v" for i in range(MAX_EVENT_PROPS + 1)}


def with_props(props: object) -> dict[str, object]:
    return {**OK, "props": props}


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        pytest.param(b"{not json", {}, 400, "the body is not valid JSON", id="not-json"),
        pytest.param([OK], {}, 400, "the body must be a JSON object", id="array"),
        pytest.param({**OK, "props": {}, "ip": "1.2.3.4"}, {}, 400,
                     "unknown fields: 'ip'; expected name, pathname, domain, referrer and props", id="unknown-key"),
        pytest.param({"pathname": "/"}, {}, 400, "name is required", id="no-name"),
        pytest.param({"name": "", "pathname": "/"}, {}, 400, "name must be 1 to 120", id="empty-name"),
        pytest.param({"name": "n" * 121, "pathname": "/"}, {}, 400, "name must be 1 to 120", id="long-name"),
        pytest.param({"name": 404, "pathname": "/"}, {}, 400, "name must be a string", id="name-type"),
        pytest.param({"name": "\ud800", "pathname": "/"}, {}, 400, "name is not valid Unicode", id="name-surrogate"),
        pytest.param({"name": "x"}, {}, 400, "pathname is required", id="no-pathname"),
        pytest.param({**OK, "pathname": ""}, {}, 400, "pathname must be 1 to 2048", id="empty-pathname"),
        pytest.param({**OK, "referrer": None}, {}, 400, "referrer must be a string", id="referrer-type"),
        pytest.param({**OK, "domain": "exa mple"}, {}, 400, "domain must be a hostname", id="domain"),
        pytest.param(OK, {"Origin": "null"}, 400, "domain is missing", id="no-domain-anywhere"),
        pytest.param(with_props(None), {}, 400, "props must be an object", id="props-null"),
        pytest.param(with_props(["a"]), {}, 400, "props must be an object", id="props-array"),
        pytest.param(with_props(TOO_MANY), {}, 400, "props has 31 keys; at most 30 are allowed", id="31-props"),
        pytest.param(with_props({"": "v"}), {}, 400, "props key '' must be 1 to 300", id="empty-key"),
        pytest.param(with_props({"k" * 301: "v"}), {}, 400, "must be 1 to 300 characters", id="long-key"),
        pytest.param(with_props({"k": "v" * 2001}), {}, 400, "props value of 'k' must be 0 to 2000", id="long-value"),
        pytest.param(with_props({"k": {"a": 1}}), {}, 400, "props value of 'k' must be a string, a number or a "
                     "boolean (nothing nested, no null)", id="nested-object"),
        pytest.param(with_props({"k": [1]}), {}, 400, "nothing nested", id="nested-array"),
        pytest.param(with_props({"k": None}), {}, 400, "no null", id="null-value"),
        pytest.param(with_props({"k": 2**53}), {}, 400, "props value of 'k' must be within", id="unsafe-integer"),
        pytest.param(b'{"name": "x", "pathname": "/", "props": {"k": NaN}}', {}, 400,
                     "props value of 'k' must be a finite number", id="nan"),
        pytest.param(b'{"name": "x", "pathname": "/", "props": {"k": -Infinity}}', {}, 400, "finite", id="infinity"),
        pytest.param(b'{"name": "x", "pathname": "/", "props": {"k": 1e400}}', {}, 400, "finite", id="overflow"),
        pytest.param(with_props({"\udfff": "v"}), {}, 400, "is not valid Unicode", id="key-surrogate"),
        pytest.param(with_props({"k": "\ud800"}), {}, 400, "is not valid Unicode", id="value-surrogate"),
        pytest.param(b" " * (MAX_EVENT_BYTES + 1), {}, 413, f"larger than {MAX_EVENT_BYTES} bytes", id="oversized"),
        pytest.param(OK, {"Content-Type": "application/x-www-form-urlencoded"}, 415,
                     "Content-Type must be application/json or text/plain", id="form-content-type"),
    ],
)
async def test_bad_input_is_refused_with_a_message_and_nothing_is_stored(
    start_collector: Start, data_dir: Path, body: object, headers: dict[str, str], status: int, message: str
) -> None:
    client = await start_collector()
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
    headers = {"Origin": "https://example.com", **headers}
    response = await post(client, data, **headers)
    assert response.status == status
    answer = await response.json()
    assert set(answer) == {"status", "error"} and answer["status"] == status
    assert message in answer["error"]
    assert response.headers["Access-Control-Allow-Origin"] == headers["Origin"]  # the page can read why
    assert stored(data_dir) == 0


async def test_a_flood_of_property_bytes_is_bounded_by_the_body_and_the_payload(
    start_collector: Start, data_dir: Path
) -> None:
    """Within every per-field bound, the whole body has one more (16 KiB), and the payload as
    JSON one more (48 KiB, under Flowcore's 64 KB): escaping makes a two-byte character six
    bytes, so a body of them nearly fills the payload; one crafted to overflow it is refused
    with a message, never stored."""
    client = await start_collector()
    big = {f"k{i}": "v" * MAX_PROP_VALUE_LENGTH for i in range(MAX_EVENT_PROPS)}
    answer = await post(client, {**SIGNUP, "props": big})
    assert answer.status == 413
    assert (await answer.json())["error"] == f"the body is larger than {MAX_EVENT_BYTES} bytes"

    wide = {**SIGNUP, "name": "é" * MAX_EVENT_NAME_LENGTH, "pathname": "/", "props": {
        f"k{i}": "é" * MAX_PROP_VALUE_LENGTH for i in range(4)}}
    assert (await post(client, fill(wide))).status == 204
    await drained(client)
    [(payload,)] = query(data_dir, "SELECT payload FROM event_log")
    assert MAX_PAYLOAD_BYTES * 0.95 < len(payload) <= MAX_PAYLOAD_BYTES

    # The domain from a long Origin instead of the body, the referrer left out: both join the
    # payload without taking room in the body.
    del wide["domain"]
    origin = "https://" + ".".join(["a" * 63] * 3) + "." + "b" * 57
    answer = await post(client, fill(wide), Origin=origin)
    assert answer.status == 400
    assert f"at most {MAX_PAYLOAD_BYTES} are allowed" in (await answer.json())["error"]
    assert stored(data_dir) == 1


def fill(body: dict[str, Any]) -> bytes:
    """The body with its pathname grown by two-byte characters to the body limit."""
    room = MAX_EVENT_BYTES - len(json.dumps({**body, "pathname": "/"}, ensure_ascii=False).encode())
    encoded = json.dumps({**body, "pathname": "/" + "é" * (room // 2)}, ensure_ascii=False).encode()
    assert MAX_EVENT_BYTES - 2 <= len(encoded) <= MAX_EVENT_BYTES
    return encoded


@pytest.mark.parametrize(
    "payload_change",
    [
        pytest.param({"props": TOO_MANY}, id="31-props"),
        pytest.param({"props": {"k": {"nested": True}}}, id="nested"),
        pytest.param({"props": {"k": float("nan")}}, id="nan"),
        pytest.param({"props": {"k" * 301: 1}}, id="long-key"),
        pytest.param({"props": "a=b"}, id="props-not-an-object"),
        pytest.param({"name": ""}, id="empty-name"),
        pytest.param({"extra": 1}, id="unknown-key"),
    ],
)
def test_the_contract_refuses_what_the_endpoint_refuses(payload_change: dict[str, Any]) -> None:
    """Events that come in through Flowcore meet the contract, not the endpoint: it holds the bounds."""
    with pytest.raises(ContractError):
        VISITOR_EVENT.validate({**event_payload(), **payload_change})


def event_payload(**changes: Any) -> dict[str, Any]:
    return {"visitorHash": "b" * 64, "domain": "example.com", "pathname": "/", "referrer": "", "name": "Signup",
            "props": {"plan": "pro"}, "sessionContext": {"dailySaltRotation": "2025-06-04"}, "country": "DK",
            "browser": "Firefox", "os": "Linux", "device": "desktop", **changes}


def envelope(**payload_changes: Any) -> dict[str, Any]:
    return {"eventId": str(uuid.uuid4()), "flowType": "visitor.v0", "eventType": "visitor.event.v0",
            "validTime": "2025-06-04T10:15:30.123Z", "payload": event_payload(**payload_changes)}


# -- the page view's rules ---------------------------------------------------------------------------------------


async def test_a_bot_s_event_is_dropped_with_its_reason_and_not_counted_as_a_dropped_page_view(
    start_collector: Start, data_dir: Path
) -> None:
    client = await start_collector()
    response = await post(client, SIGNUP, **{"User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"})
    assert response.status == 204
    assert response.headers["X-Collector-Dropped"] == "bot"
    gpc = await client.post("/api/event", data=json.dumps(SIGNUP), headers={"Sec-GPC": "1"})
    assert (gpc.status, gpc.headers["X-Collector-Dropped"]) == (204, "gpc")
    await client.app[DROPS].flush()
    assert query(data_dir, "SELECT count(*) FROM dropped_pageviews") == [(0,)]
    assert stored(data_dir) == 0


async def test_allowed_domains_apply_to_events(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(ALLOWED_DOMAINS="example.com")
    elsewhere = await post(client, {**SIGNUP, "domain": "other.example"})
    assert (elsewhere.status, elsewhere.headers["X-Collector-Dropped"]) == (204, "domain-not-allowed")
    assert (await post(client, SIGNUP)).status == 204
    await drained(client)
    assert [payload["domain"] for payload in logged_payloads(data_dir)] == ["example.com"]


async def test_page_views_and_events_share_one_rate_limit(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(RATE_LIMIT_BURST="2", RATE_LIMIT_PER_SECOND="0.01")
    pageview = {"pathname": "/", "referrer": "", "domain": "example.com"}
    headers = {"Content-Type": "text/plain", "X-Forwarded-For": "198.51.100.23"}
    assert (await client.post("/api/pageview", data=json.dumps(pageview), headers=headers)).status == 204
    assert (await post(client, SIGNUP)).status == 204
    refused = await post(client, SIGNUP, Origin="https://example.com")
    assert refused.status == 429
    wait = refused.headers["Retry-After"]
    assert await refused.json() == {"status": 429, "error": f"too many events from this address; try again in {wait} s"}
    assert refused.headers["Access-Control-Allow-Origin"] == "https://example.com"
    assert (await post(client, SIGNUP, **{"X-Forwarded-For": "198.51.100.24"})).status == 204
    await drained(client)
    assert stored(data_dir) == 2


async def test_cors_preflight_and_reflected_origin(start_collector: Start) -> None:
    client = await start_collector(ALLOWED_ORIGINS="https://site.example")
    preflight = await client.options("/api/event", headers={
        "Origin": "https://site.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://site.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    accepted = await post(client, SIGNUP, Origin="https://site.example")
    assert accepted.status == 204
    assert accepted.headers["Access-Control-Allow-Origin"] == "https://site.example"
    assert accepted.headers["Access-Control-Expose-Headers"] == "X-Collector-Dropped"
    stranger = await post(client, SIGNUP, Origin="https://stranger.example")
    assert stranger.status == 204 and "Access-Control-Allow-Origin" not in stranger.headers


async def test_events_and_page_views_arriving_together_share_commits(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()
    pageview = json.dumps({"pathname": "/", "referrer": "", "domain": "example.com"})
    answers = await asyncio.gather(
        *(post(client, SIGNUP) for _ in range(20)),
        *(client.post("/api/pageview", data=pageview, headers={"Content-Type": "text/plain"}) for _ in range(20)),
    )
    assert [answer.status for answer in answers] == [204] * 40
    store = client.app[STORE]
    assert store.outbox_appends == 40 and store.outbox_commits < 40
    await drained(client)
    assert stored(data_dir) == 20
    assert query(data_dir, "SELECT pageviews FROM daily_stats") == [(20,)]


def test_the_openapi_document_states_the_endpoint_s_limits() -> None:
    operation = document(__version__)["paths"]["/api/event"]["post"]
    assert f"{MAX_EVENT_BYTES // 1024} KiB" in operation["responses"]["413"]["description"]
    schema = document(__version__)["components"]["schemas"]["Event"]
    assert schema["properties"]["name"]["maxLength"] == MAX_EVENT_NAME_LENGTH
    assert schema["properties"]["props"]["maxProperties"] == MAX_EVENT_PROPS


# -- the router: routed, de-duplicated, kept for the read model -----------------------------------------------


async def test_the_transformer_routes_events_once_and_refuses_a_flood(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=TRANSFORMER_SECRET)
    secret = {"X-Secret": TRANSFORMER_SECRET}
    event = envelope()
    for _ in range(2):  # a redelivery is acknowledged and changes nothing
        answer = await client.post("/api/transformer", json=event, headers=secret)
        assert (answer.status, await answer.text()) == (200, "OK")
    assert query(data_dir, "SELECT event_id, pathway FROM pathway_state") == [
        (event["eventId"], "visitor.v0/visitor.event.v0")]
    flood = await client.post("/api/transformer", json=envelope(props=TOO_MANY), headers=secret)
    assert flood.status == 422
    assert "payload.props has 31 keys; at most 30 are allowed" in (await flood.json())["error"]
    assert query(data_dir, "SELECT count(*) FROM pathway_state") == [(1,)]


@pytest.fixture
async def fake() -> AsyncIterator[FakeFlowcore]:
    platform = FakeFlowcore()
    await platform.start()
    yield platform
    await platform.close()


async def test_in_flowcore_mode_an_event_goes_to_its_event_type_and_comes_back_once(
    start_collector: Start, fake: FakeFlowcore, data_dir: Path
) -> None:
    client = await start_collector(
        clock=FakeClock(utc(2025, 6, 4, 10, 15, 30, 123000)),
        FLOWCORE_TENANT=fake.tenant, FLOWCORE_API_KEY=fake.api_key, FLOWCORE_WEBHOOK_BASEURL=fake.url,
        FLOWCORE_TRANSFORMER_SECRET=TRANSFORMER_SECRET,
    )
    pageview = json.dumps({"pathname": "/", "referrer": "", "domain": "example.com"})
    assert (await client.post("/api/pageview", data=pageview, headers={"Content-Type": "text/plain"})).status == 204
    assert (await post(client, SIGNUP)).status == 204
    await fake.wait_for_events(2)
    paths = sorted(ingestion.path for ingestion in fake.ingestions)
    assert paths == ["/events/acme/flow-analytics/visitor.v0/visitor.event.v0",
                     "/events/acme/flow-analytics/visitor.v0/visitor.tracked.v1"]
    [sent] = [event for event in fake.events if event["eventType"] == "visitor.event.v0"]
    assert (sent["payload"]["name"], sent["payload"]["props"]) == ("Signup", {"plan": "pro"})
    url = str(client.make_url("/api/transformer"))
    assert await fake.deliver(url, TRANSFORMER_SECRET) == [(200, "OK"), (200, "OK")]
    assert await fake.deliver(url, TRANSFORMER_SECRET, [sent]) == [(200, "OK")]  # again: nothing changes
    assert sorted(query(data_dir, "SELECT pathway FROM pathway_state")) == [
        ("visitor.v0/visitor.event.v0",), ("visitor.v0/visitor.tracked.v1",)]
    assert query(data_dir, "SELECT pageviews FROM daily_stats") == [(1,)]


async def test_a_data_core_without_the_event_type_halts_sending_and_keeps_everything(
    start_collector: Start, data_dir: Path
) -> None:
    """What docs/events.md warns of: flowcore.yaml not applied, so the platform refuses the event
    type. Sending stops, nothing is lost, and /health names the cause."""
    platform = FakeFlowcore(event_types=frozenset({"visitor.v0/visitor.tracked.v0", "visitor.v0/visitor.tracked.v1"}))
    await platform.start()
    try:
        client = await start_collector(FLOWCORE_TENANT=platform.tenant, FLOWCORE_API_KEY=platform.api_key,
                                       FLOWCORE_WEBHOOK_BASEURL=platform.url)
        pageview = json.dumps({"pathname": "/", "referrer": "", "domain": "example.com"})
        assert (await post(client, SIGNUP)).status == 204
        assert (await client.post("/api/pageview", data=pageview, headers={"Content-Type": "text/plain"})).status == 204
        await platform.wait_for_refusals(1)

        async def halted() -> bool:
            return (await (await client.get("/health")).json())["status"] == "halted"  # type: ignore[no-any-return]

        await poll(halted, what="the sink halting")
        health = await (await client.get("/health")).json()
        assert "EventType not found" in health["flowcore"]["last_error"]
        assert platform.events == []
        assert query(data_dir, "SELECT event_type FROM outbox ORDER BY seq") == [("visitor.event.v0",),
                                                                                 ("visitor.tracked.v1",)]
    finally:
        await platform.close()
