"""Property-based fuzzing (hypothesis) of POST /api/pageview, POST /api/event and POST
/api/transformer over real HTTP: arbitrary bytes, JSON of every shape, odd and huge Unicode,
hostile headers. Never a 5xx,
the server keeps answering, and afterwards the database is consistent: SQLite's integrity check
passes, every stored payload keeps the event contract, and the counts match the accepted requests.

Hypothesis drives a plain function, so it runs in a worker thread and sends each request to the
app's event loop; one real app (one SQLite file) per test, not per example.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from conftest import Start
from helpers import Client, drained, query
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pathways import MAX_EVENT_PROPS, UTM_KEYS, VISITOR_EVENT, VISITOR_TRACKED, VISITOR_TRACKED_V1

T = TypeVar("T")
EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SECRET = "fuzz-transformer-secret"

# -- strategies ---------------------------------------------------------------------------------------
def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Like one_of, whose branches are equally likely, but with weights."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])



ODD = ["\x00", "\ud800", "\udfff", "\u202e", "\u200f", "\ufeff", "\uffff", "\U0010ffff", "é", "\u0301", "𝕏",
       "<script>", "../", "%00", "\\", '"', "\u2028"]
# Long strings are built by repetition: drawing 2,000 characters one by one is slow for nothing.
odd_text = st.one_of(
    st.text(max_size=64),
    st.lists(st.sampled_from(ODD), max_size=20).map("".join),
    st.builds(lambda part, length: (part * length)[:length],
              st.text(min_size=1, max_size=4) | st.sampled_from(ODD), st.integers(2040, 2060) | st.integers(1, 5000)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | odd_text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(odd_text, children, max_size=5),
    max_leaves=20,
)
pageview_shaped = st.fixed_dictionaries(
    {},
    optional={"pathname": odd_text | json_values, "referrer": odd_text | json_values,
              "domain": odd_text | st.sampled_from(["example.com", "ünïcode.example", "[::1]", "a" * 300]),
              "utm": json_values | st.dictionaries(st.sampled_from([*UTM_KEYS, "gclid"]) | odd_text,
                                                   odd_text | json_values, max_size=6)},
)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as a browser or an attacker would send it: escaped, or raw (lone surrogates raw too)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# Page views a browser could send, with odd but valid text, so many examples reach the database.
valid_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300)
valid_pageviews = st.fixed_dictionaries(
    {"pathname": st.builds(lambda rest: "/" + rest, valid_text), "referrer": valid_text},
    optional={"domain": st.sampled_from(["example.com", "ünïcode.example", "[::1]", "xn--bcher-kva.example", "a.b"]),
              "utm": st.dictionaries(st.sampled_from(UTM_KEYS), valid_text.filter(lambda t: 0 < len(t) <= 256),
                                     max_size=5)},
)
json_bodies = st.builds(encode, weighted((2, json_values | pageview_shaped), (3, valid_pageviews)), st.booleans())
bodies = weighted((6, json_bodies), (1, st.binary(max_size=2000)), (1, st.just(b" " * 9000)))
# Header values a client library will send: no control characters; anything else goes.
header_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=200)
addresses = st.one_of(st.ip_addresses().map(str), header_text)
ODD_TYPES = ["text/plain; charset=utf-16", "application/json; charset=latin-1", "multipart/form-data; boundary=x",
             "application/x-www-form-urlencoded", "*/*", ";;;", "text/plain; q"]


# Most examples get past the Content-Type check and the body's parser, so they reach the
# validation and the database; the rest hammer the checks in front.
content_types = weighted((4, st.sampled_from(["application/json", "text/plain"])), (1, st.sampled_from(ODD_TYPES)),
                         (1, header_text))
hostile_headers = st.fixed_dictionaries(
    {"Content-Type": content_types},
    optional={
        "X-Forwarded-For": st.one_of(st.lists(addresses, max_size=300).map(", ".join), st.just("1." * 3000),
                                     header_text),
        "X-Real-IP": addresses,
        "CF-Connecting-IP": addresses,
        "CF-IPCountry": st.sampled_from(["DK", "XX", "T1", "dk", "EU", ""]) | header_text,
        "Origin": st.sampled_from(["null", "https://example.com", "file://", "https://[::1]:99", "http://a b"])
        | header_text,
        "Referer": header_text,
        "User-Agent": st.one_of(header_text, st.just(""), st.just("Mozilla/5.0 " + "x" * 7000)),
        "Sec-GPC": header_text,
        "DNT": header_text,
        "X-Secret": header_text,
        "Accept-Encoding": header_text,
    },
)

# -- running hypothesis against the app ---------------------------------------------------------------------


class Bridge:
    """Runs coroutines on the app's loop from hypothesis's worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)


async def post(client: Client, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """The status and body; a page view answered 204 but dropped (X-Collector-Dropped: a bot, a
    consent signal) is reported as 202 here, so only the counted ones are compared with the database."""
    async with client.post(path, data=body, headers=headers, skip_auto_headers=["Content-Type"]) as response:
        dropped = response.status == 204 and "X-Collector-Dropped" in response.headers
        return (202 if dropped else response.status), await response.read()


async def in_thread(test: Callable[[], None]) -> None:
    await asyncio.to_thread(test)


def assert_sane(status: int, body: bytes) -> None:
    assert status < 500, (status, body)
    if status >= 400 and body:
        error = json.loads(body)
        assert error["status"] == status and isinstance(error["error"], str) and error["error"]
        assert b"Traceback" not in body


CONTRACTS = {c.event_type: c for c in (VISITOR_TRACKED, VISITOR_TRACKED_V1, VISITOR_EVENT)}


async def database_is_consistent(data_dir: Path) -> None:
    [(check,)] = await asyncio.to_thread(query, data_dir, "PRAGMA integrity_check")
    assert check == "ok"
    sql = "SELECT event_type, payload FROM outbox UNION ALL SELECT event_type, payload FROM event_log"
    rows = await asyncio.to_thread(query, data_dir, sql)
    for event_type, payload in rows:
        CONTRACTS[event_type].validate(json.loads(payload))


# -- the properties -----------------------------------------------------------------------------------------


async def test_pageview_never_fails_on_hostile_input(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(BODY_TIMEOUT_MS="5000")
    bridge = Bridge(asyncio.get_running_loop())
    accepted = []

    @FUZZ
    @given(body=bodies, headers=hostile_headers)
    def property(body: bytes, headers: dict[str, str]) -> None:
        status, answer = bridge.run(post(client, "/api/pageview", body, headers))
        assert_sane(status, answer)
        if status == 204:
            accepted.append(1)

    await in_thread(property)
    print(f"pageview fuzz: {len(accepted)} of {EXAMPLES}+ accepted")
    assert accepted, "no example was a valid page view: the fuzzing is not reaching the database"
    assert (await client.get("/health")).status == 200
    await drained(client)
    await database_is_consistent(data_dir)
    [(logged, left)] = await asyncio.to_thread(
        query, data_dir, "SELECT (SELECT count(*) FROM event_log), (SELECT count(*) FROM outbox)"
    )
    assert logged + left == len(accepted)
    [(counted,)] = await asyncio.to_thread(query, data_dir, "SELECT coalesce(sum(pageviews), 0) FROM daily_stats")
    assert counted == len(accepted)


# Events: shapes that break every rule of the props, and valid ones with odd but valid text.
prop_values = st.one_of(odd_text, st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                        json_values)
props_shaped = st.one_of(
    st.dictionaries(odd_text, prop_values, max_size=8),
    st.dictionaries(st.text(max_size=4), st.integers(), min_size=MAX_EVENT_PROPS - 1, max_size=MAX_EVENT_PROPS + 2),
    json_values,
)
event_shaped = st.fixed_dictionaries(
    {},
    optional={"name": odd_text | json_values, "pathname": odd_text | json_values, "referrer": odd_text | json_values,
              "domain": odd_text | st.sampled_from(["example.com", "[::1]", "a" * 300]), "props": props_shaped,
              "extra": json_values},
)
valid_props = st.dictionaries(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40),
    st.one_of(valid_text, st.integers(-(2**53) + 1, 2**53 - 1), st.floats(allow_nan=False, allow_infinity=False),
              st.booleans()),
    max_size=MAX_EVENT_PROPS,
)
valid_events = st.fixed_dictionaries(
    {"name": st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=120),
     "pathname": st.builds(lambda rest: "/" + rest, valid_text)},
    optional={"referrer": valid_text, "props": valid_props,
              "domain": st.sampled_from(["example.com", "ünïcode.example", "[::1]", "a.b"])},
)
event_bodies = weighted(
    (6, st.builds(encode, weighted((2, json_values | event_shaped), (3, valid_events)), st.booleans())),
    (1, st.binary(max_size=2000)),
    (1, st.just(b'{"name": "x", "pathname": "/", "props": {"n": NaN, "i": Infinity}}')),
)


async def test_event_never_fails_on_hostile_input(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(BODY_TIMEOUT_MS="5000")
    bridge = Bridge(asyncio.get_running_loop())
    accepted = []

    @FUZZ
    @given(body=event_bodies, headers=hostile_headers)
    def property(body: bytes, headers: dict[str, str]) -> None:
        status, answer = bridge.run(post(client, "/api/event", body, headers))
        assert_sane(status, answer)
        if status == 204:
            accepted.append(1)

    await in_thread(property)
    print(f"event fuzz: {len(accepted)} of {EXAMPLES}+ accepted")
    assert accepted, "no example was a valid event: the fuzzing is not reaching the database"
    assert (await client.get("/health")).status == 200
    await drained(client)
    await database_is_consistent(data_dir)
    [(logged, left, claimed)] = await asyncio.to_thread(
        query, data_dir, "SELECT (SELECT count(*) FROM event_log), (SELECT count(*) FROM outbox), "
        "(SELECT count(*) FROM pathway_state WHERE pathway = 'visitor.v0/visitor.event.v0')"
    )
    assert logged + left == len(accepted) == claimed
    [(counted,)] = await asyncio.to_thread(query, data_dir, "SELECT coalesce(sum(pageviews), 0) FROM daily_stats")
    assert counted == 0  # an event is not a page view


payload_shaped = st.fixed_dictionaries(
    {},
    optional={
        "visitorHash": st.one_of(st.just("a" * 64), st.text(alphabet="0123456789abcdef", min_size=60, max_size=68),
                                 json_values),
        "domain": odd_text | json_values,
        "pathname": odd_text | json_values,
        "referrer": odd_text | json_values,
        "sessionContext": st.one_of(st.just({"dailySaltRotation": "2025-06-04"}),
                                    st.fixed_dictionaries({"dailySaltRotation": odd_text}), json_values),
        "extra": json_values,
    },
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "eventId": st.one_of(st.uuids().map(str), odd_text, json_values),
        "flowType": st.one_of(st.just("visitor.v0"), odd_text, json_values),
        "aggregator": st.one_of(st.just("visitor.v0"), odd_text),
        "eventType": st.one_of(st.just("visitor.tracked.v0"), odd_text, json_values),
        "validTime": st.one_of(st.just("2025-06-04T10:15:30.123Z"), st.datetimes().map(lambda d: d.isoformat()),
                               odd_text, json_values),
        "timeBucket": st.one_of(st.just("20250604100000"), odd_text, json_values),
        "payload": payload_shaped | json_values,
        "metadata": json_values,
    },
)
valid_envelopes = st.builds(
    lambda hash_, path, domain: {
        "eventId": str(uuid.uuid4()), "flowType": "visitor.v0", "eventType": "visitor.tracked.v0",
        "validTime": "2025-06-04T10:15:30.123Z",
        "payload": {"visitorHash": hash_, "domain": domain, "pathname": path, "referrer": "",
                    "sessionContext": {"dailySaltRotation": "2025-06-04"}},
    },
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    st.builds(lambda rest: "/" + rest, valid_text) | odd_text,
    st.sampled_from(["example.com", "ünïcode.example", "a.b"]) | st.sampled_from(["x.example"]) | odd_text,
)
valid_event_envelopes = st.builds(
    lambda hash_, event, props: {
        "eventId": str(uuid.uuid4()), "flowType": "visitor.v0", "eventType": "visitor.event.v0",
        "validTime": "2025-06-04T10:15:30.123Z",
        "payload": {"visitorHash": hash_, "domain": "example.com", "pathname": event["pathname"], "referrer": "",
                    "name": event["name"], "props": props, "sessionContext": {"dailySaltRotation": "2025-06-04"},
                    "country": None, "browser": "Firefox", "os": None, "device": "mobile"},
    },
    st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    valid_events,
    valid_props | props_shaped,
)
KNOWN_GOOD_EVENT = {
    "eventId": "5d1c9a7e-0b7a-4c47-9d3e-2f4b6a8c0e11", "flowType": "visitor.v0", "eventType": "visitor.event.v0",
    "validTime": "2025-06-04T10:15:30.123Z",
    "payload": {"visitorHash": "e" * 64, "domain": "example.com", "pathname": "/", "referrer": "", "name": "Signup",
                "props": {"plan": "pro"}, "sessionContext": {"dailySaltRotation": "2025-06-04"}, "country": None,
                "browser": None, "os": None, "device": None},
}
transformer_bodies = st.one_of(
    st.binary(max_size=2000),
    st.builds(encode, weighted((2, envelopes | json_values), (3, valid_envelopes), (1, valid_event_envelopes)),
              st.booleans()),
)


async def test_transformer_never_fails_on_hostile_input(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET, BODY_TIMEOUT_MS="5000")
    bridge = Bridge(asyncio.get_running_loop())
    processed: set[str] = set()
    pageviews: set[str] = set()

    @FUZZ
    @given(body=transformer_bodies, headers=hostile_headers, right_secret=st.integers(0, 9))
    @example(body=json.dumps(KNOWN_GOOD_EVENT).encode(), headers={}, right_secret=1)  # reached every run
    def property(body: bytes, headers: dict[str, str], right_secret: int) -> None:
        if right_secret:  # mostly the right secret, so the envelope itself is exercised
            headers = {**headers, "X-Secret": SECRET}
        status, answer = bridge.run(post(client, "/api/transformer", body, headers))
        assert_sane(status, answer)
        if status == 200:
            assert answer == b"OK"
            envelope = json.loads(body)
            processed.add(envelope["eventId"])
            if envelope["eventType"] == "visitor.tracked.v0":
                pageviews.add(envelope["eventId"])

    await in_thread(property)
    print(f"transformer fuzz: {len(processed)} of {EXAMPLES}+ processed")
    assert processed, "no example was a valid event: the fuzzing is not reaching the handler"
    assert processed - pageviews, "no custom event was valid: the fuzzing is not reaching the event pathway"
    assert (await client.get("/health")).status == 200
    await database_is_consistent(data_dir)
    [(handled,)] = await asyncio.to_thread(query, data_dir, "SELECT count(*) FROM pathway_state")
    assert handled == len(processed)
    [(counted,)] = await asyncio.to_thread(query, data_dir, "SELECT coalesce(sum(pageviews), 0) FROM daily_stats")
    assert counted == len(pageviews)
    for (payload,) in await asyncio.to_thread(query, data_dir, "SELECT domain FROM pageviews"):
        assert isinstance(payload, str)


# -- raw bytes in the headers: what no client library sends, an attacker can --------------------------------

header_bytes = st.binary(max_size=300).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
RAW_HEADERS = ["X-Secret", "User-Agent", "X-Forwarded-For", "X-Real-IP", "Origin", "Referer", "Content-Type",
               "Authorization", "Sec-GPC", "DNT"]


async def raw_post(client: Client, path: str, headers: dict[str, bytes], body: bytes) -> tuple[int, bytes]:
    head = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers.items())
    request = (f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
               .encode() + head + b"\r\n" + body)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head_part, _, body_part = answer.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    if status >= 400 and b"application/json" not in head_part:
        assert status == 400 and b"Traceback" not in body_part, answer  # the HTTP parser's own short refusal
        return status, b""
    return status, body_part


async def test_raw_header_bytes_never_cause_a_5xx(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET)
    bridge = Bridge(asyncio.get_running_loop())
    bodies = {
        "/api/pageview": b'{"pathname": "/", "referrer": "", "domain": "example.com"}',
        "/api/event": b'{"name": "Signup", "pathname": "/", "domain": "example.com", "props": {"plan": "pro"}}',
        "/api/transformer": b'{"pathname": "/", "referrer": "", "domain": "example.com"}',
    }

    @FUZZ
    @given(path=st.sampled_from(sorted(bodies)),
           headers=st.dictionaries(st.sampled_from(RAW_HEADERS), header_bytes, max_size=5))
    def property(path: str, headers: dict[str, bytes]) -> None:
        headers = {"Content-Type": b"text/plain", **headers}
        status, answer = bridge.run(raw_post(client, path, headers, bodies[path]))
        assert_sane(status, answer)

    await in_thread(property)
    assert (await client.get("/health")).status == 200
    await drained(client)
    await database_is_consistent(data_dir)
