"""GET /openapi.json is kept true: its paths and methods are exactly the router's, and real
answers of every endpoint, successes and every error a test can provoke, match it: status,
content type, required headers and the JSON body's schema."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientResponse
from conftest import Start
from helpers import Client, drained
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from collector import __version__, create_app
from openapi import SCHEMAS, document

TRANSFORMER_SECRET = "transformer-secret-for-tests"
TOKEN = "a-stats-token-of-enough-length"
PAGEVIEW = {"pathname": "/a", "referrer": "", "domain": "example.com"}
EVENT = {"name": "Signup", "pathname": "/a", "domain": "example.com", "props": {"plan": "pro", "seats": 2}}
EVENT_PAYLOAD = {"visitorHash": "c" * 64, "domain": "example.com", "pathname": "/", "referrer": "", "name": "Signup",
                 "props": {}, "sessionContext": {"dailySaltRotation": "2025-06-04"}, "country": None, "browser": None,
                 "os": None, "device": None}
EVENT_ENVELOPE = {"eventId": "8e0b2a4c-5f1d-4c8e-9a3b-2d7f6e1c0b9a", "flowType": "visitor.v0",
                  "eventType": "visitor.event.v0", "validTime": "2025-06-04T10:15:30.123Z", "payload": EVENT_PAYLOAD}
BASE = "urn:openapi"


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def test_the_document_and_the_router_list_the_same_endpoints(make_config: Any) -> None:
    app = create_app(make_config())
    routed = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None  # aiohttp adds HEAD to every GET
    }
    assert routed == operations(document(__version__))


async def test_the_served_document_is_the_module_s(start_collector: Start) -> None:
    client = await start_collector()
    response = await client.get("/openapi.json")
    assert response.status == 200
    served = await response.json()
    assert served == json.loads(json.dumps(document(__version__)))
    assert served["openapi"].startswith("3.1")


class Conformance:
    """Checks answers against the document, as a client reading only the document would."""

    def __init__(self) -> None:
        self.doc = document(__version__)
        self.registry: Registry[Any] = Registry().with_resource(
            BASE, Resource.from_contents(self.doc, default_specification=DRAFT202012)
        )
        self.seen: set[tuple[str, str, str]] = set()

    def declared(self, method: str, path: str, status: int) -> tuple[str, dict[str, Any]]:
        responses = self.doc["paths"].get(path, {}).get(method.lower(), {}).get("responses", {})
        key = str(status)
        if key in responses:
            return f"/paths/{escape(path)}/{method.lower()}/responses/{key}", responses[key]
        name = {404: "NotFound", 405: "MethodNotAllowed"}[status]  # answered for any path
        return f"/components/responses/{name}", self.doc["components"]["responses"][name]

    async def check(self, response: ClientResponse, method: str, path: str) -> None:
        pointer, declared = self.declared(method, path, response.status)
        for name, spec in declared.get("headers", {}).items():
            if spec.get("required"):
                assert name in response.headers, f"{method} {path} {response.status}: no {name} header"
        body = await response.read()
        if not declared.get("content"):
            assert body == b"", f"{method} {path} {response.status}: a body where none is declared"
            return
        media = response.content_type
        assert media in declared["content"], f"{method} {path} {response.status}: {media} is not declared"
        if media == "application/json":
            schema = {"$ref": f"{BASE}#{pointer}/content/application~1json/schema"}
            Draft202012Validator(schema, registry=self.registry).validate(json.loads(body))
        self.seen.add((method, path, str(response.status)))


def escape(path: str) -> str:
    return path.replace("~", "~0").replace("/", "~1")


async def call(conformance: Conformance, client: Client, method: str, path: str, status: int,
               template: str | None = None, **kwargs: Any) -> None:
    response = await client.request(method, path, **kwargs)
    assert response.status == status, await response.text()
    await conformance.check(response, method, template or path.split("?")[0])


async def test_real_answers_of_every_endpoint_match_the_document(start_collector: Start) -> None:
    conformance = Conformance()
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=TRANSFORMER_SECRET, BODY_TIMEOUT_MS="300")
    json_type = {"Content-Type": "application/json"}
    secret = {"X-Secret": TRANSFORMER_SECRET}
    cases: list[tuple[str, str, int, dict[str, Any]]] = [
        ("GET", "/", 200, {}),
        ("GET", "/health", 200, {}),
        ("GET", "/script.js", 200, {}),
        ("GET", "/test.html", 200, {}),
        ("GET", "/dashboard", 200, {}),
        ("GET", "/openapi.json", 200, {}),
        ("POST", "/api/pageview", 204, {"json": PAGEVIEW}),
        ("POST", "/api/pageview", 204, {"json": {**PAGEVIEW, "utm": {"source": "news", "campaign": "spring"}}}),
        ("POST", "/api/pageview", 400, {"json": {**PAGEVIEW, "utm": {"gclid": "x"}}}),
        ("POST", "/api/pageview", 400, {"data": b"{nope", "headers": json_type}),
        ("POST", "/api/pageview", 413, {"data": b" " * 9000, "headers": json_type}),
        ("POST", "/api/pageview", 415, {"data": b"{}", "headers": {"Content-Type": "application/xml"}}),
        ("OPTIONS", "/api/pageview", 204, {"headers": {"Origin": "https://example.com",
                                                       "Access-Control-Request-Method": "POST"}}),
        ("GET", "/script.clicks.js", 200, {}),
        ("POST", "/api/event", 204, {"json": EVENT}),
        ("POST", "/api/event", 400, {"json": {**EVENT, "props": {"nested": {"no": 1}}}}),
        ("POST", "/api/event", 413, {"data": b" " * 17_000, "headers": json_type}),
        ("POST", "/api/event", 415, {"data": b"{}", "headers": {"Content-Type": "application/xml"}}),
        ("OPTIONS", "/api/event", 204, {"headers": {"Origin": "https://example.com",
                                                    "Access-Control-Request-Method": "POST"}}),
        ("POST", "/api/transformer", 200, {"json": EVENT_ENVELOPE, "headers": secret}),
        ("POST", "/api/transformer", 401, {"json": {}}),
        ("POST", "/api/transformer", 400, {"json": [], "headers": secret}),
        ("POST", "/api/transformer", 404, {"json": envelope(flowType="nobody.v0"), "headers": secret}),
        ("POST", "/api/transformer", 422, {"json": envelope(payload={"visitorHash": 1}), "headers": secret}),
        ("POST", "/api/transformer", 200, {"json": envelope(), "headers": secret}),
        ("POST", "/api/transformer", 413, {"data": b" " * 300_000, "headers": secret}),
        ("GET", "/api/stats?domain=example.com", 200, {}),
        ("GET", "/api/stats?domain=example.com&period=forever", 400, {}),
        ("GET", "/api/stats?domain=example.com&filter=utm_campaign:spring&filter=country:", 200, {}),
        ("GET", "/api/stats?domain=example.com&period=today&filter=page:/a", 200, {}),
        ("GET", "/api/stats?domain=example.com&filter=colour:red", 400, {}),
        ("GET", "/api/stats?domain=example.com", 403, {"headers": {"X-Forwarded-For": "198.51.100.7"}}),
        ("GET", "/api/sites", 200, {}),
        ("GET", "/api/sites?x=1", 400, {}),
        ("GET", "/api/current-visitors?domain=example.com", 200, {}),
        ("GET", "/api/current-visitors", 400, {}),
        ("GET", "/api/export?domain=example.com&from=2025-06-01&to=2025-06-04", 200, {}),
        ("GET", "/api/export?domain=example.com&table=nope", 400, {}),
        ("GET", "/api/export?domain=example.com&from=2025-06-01&to=2025-06-04&table=exit_pages", 200, {}),
        ("GET", "/nowhere", 404, {}),
        ("DELETE", "/health", 405, {}),
    ]
    for method, path, status, kwargs in cases:
        await call(conformance, client, method, path, status, **kwargs)
    await drained(client)  # the custom event above is counted: the answers list it, with its properties
    response = await client.get("/api/stats", params={"domain": "example.com", "period": "today", "event": "Signup"})
    body = await response.json()
    assert ([e["name"] for e in body["events"]], len(body["event"]["properties"])) == (["Signup"], 2)
    await conformance.check(response, "GET", "/api/stats")
    await call(conformance, client, "GET", "/api/stats?domain=example.com&event=", 400)
    for table in ("events", "event_properties"):
        export = f"/api/export?domain=example.com&from=2025-06-01&to=2025-06-04&table={table}"
        await call(conformance, client, "GET", export, 200)
    etag = (await client.get("/script.js")).headers["ETag"]
    await call(conformance, client, "GET", "/script.js", 304, headers={"If-None-Match": etag})
    await answer_408(conformance, client)


async def test_disabled_transformer_and_stats_token_answers_match_the_document(start_collector: Start) -> None:
    conformance = Conformance()
    client = await start_collector(STATS_TOKEN=TOKEN)
    await call(conformance, client, "POST", "/api/transformer", 404, json=envelope())
    for path in ("/api/stats?domain=example.com", "/api/sites", "/api/current-visitors?domain=a.com",
                 "/api/export?domain=a.com&from=2025-06-01&to=2025-06-04"):
        await call(conformance, client, "GET", path, 401)
        await call(conformance, client, "GET", path, 200, headers={"Authorization": f"Bearer {TOKEN}"})


async def answer_408(conformance: Conformance, client: Client) -> None:
    """A body that stalls: read the raw answer, then check it as if a client had."""
    app = client.app
    assert app is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /api/pageview HTTP/1.1\r\nHost: c\r\nContent-Type: text/plain\r\nContent-Length: 50\r\n\r\n{")
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408")
    assert b"Content-Type: application/json" in head
    _, declared = conformance.declared("POST", "/api/pageview", 408)
    assert "application/json" in declared["content"]
    Draft202012Validator({"$ref": f"{BASE}#/components/schemas/Error"}, registry=conformance.registry).validate(
        json.loads(body)
    )


def envelope(**changes: Any) -> dict[str, Any]:
    event = {
        "eventId": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "flowType": "visitor.v0",
        "eventType": "visitor.tracked.v0",
        "validTime": "2025-06-04T10:15:30.123Z",
        "payload": {
            "visitorHash": "a" * 64, "domain": "example.com", "pathname": "/", "referrer": "",
            "sessionContext": {"dailySaltRotation": "2025-06-04"},
        },
    }
    return {**event, **changes}


@pytest.mark.parametrize("status", ["400", "401", "403", "500", "503"])
def test_every_statistics_endpoint_documents_its_errors(status: str) -> None:
    doc = document(__version__)
    for path in ("/api/stats", "/api/sites", "/api/current-visitors", "/api/export"):
        assert status in doc["paths"][path]["get"]["responses"]


def test_every_error_in_the_document_has_the_one_error_shape() -> None:
    doc = document(__version__)
    answers = [answer for item in doc["paths"].values() for operation in item.values()
               for answer in operation["responses"].items()] + list(doc["components"]["responses"].items())
    for status, answer in answers:
        if not status.startswith(("4", "5")) or "application/json" not in answer.get("content", {}):
            continue
        if answer["content"]["application/json"]["schema"] != {"$ref": "#/components/schemas/Error"}:
            assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}


def test_the_pageview_schema_names_the_utm_keys_and_bounds_the_collector_takes() -> None:
    from pathways import MAX_UTM_LENGTH, UTM_KEYS

    utm = SCHEMAS["Pageview"]["properties"]["utm"]
    assert tuple(utm["properties"]) == UTM_KEYS and utm["additionalProperties"] is False
    assert {(p["minLength"], p["maxLength"]) for p in utm["properties"].values()} == {(1, MAX_UTM_LENGTH)}


def test_the_document_names_every_list_and_filter_the_answer_has() -> None:
    import stats

    schema = SCHEMAS["Stats"]
    assert set(stats.BREAKDOWNS) <= set(schema["required"])
    assert {name: listed["items"]["required"][0] for name, listed in schema["properties"].items()
            if name in stats.BREAKDOWNS} == {name: kind.key for name, kind in stats.BREAKDOWNS.items()}
    parameters = document(__version__)["paths"]["/api/stats"]["get"]["parameters"]
    filter_parameter = next(p for p in parameters if p["name"] == "filter")
    assert all(name in filter_parameter["description"] for name in stats.FILTER_DIMENSIONS)
