"""Flowcore mode against a strict fake Flowcore on a real local port: the full loop, outages,
a refused key, restarts with a backlog, and every status of /api/transformer."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Start
from fake_flowcore import FakeFlowcore
from helpers import Client, FakeClock, drained, poll, query, utc

from config import ConfigError, load_config
from pathways import parse_retry_after, same_second_batches
from store import DB_FILENAME, OutboxRow

SECRET = "transformer-secret-for-tests"


@pytest.fixture
async def fake() -> AsyncIterator[FakeFlowcore]:
    platform = FakeFlowcore()
    await platform.start()
    yield platform
    await platform.close()


def flowcore_env(fake: FakeFlowcore, **overrides: str) -> dict[str, str]:
    return {
        "FLOWCORE_TENANT": fake.tenant,
        "FLOWCORE_API_KEY": fake.api_key,
        "FLOWCORE_WEBHOOK_BASEURL": fake.url,
        "FLOWCORE_TRANSFORMER_SECRET": SECRET,
        "FLOWCORE_RETRY_BASE_MS": "5",
        "FLOWCORE_RETRY_MAX_MS": "40",
        "FLOWCORE_TIMEOUT_MS": "500",
        **overrides,
    }


async def pageview(client: Client, path: str, **headers: str) -> int:
    body = json.dumps({"pathname": path, "referrer": "", "domain": "example.com"})
    response = await client.post("/api/pageview", data=body, headers={"Content-Type": "text/plain", **headers})
    return response.status


async def health(client: Client) -> dict[str, Any]:
    return await (await client.get("/health")).json()  # type: ignore[no-any-return]



def transformer_url(client: Client) -> str:
    return str(client.make_url("/api/transformer"))


V0_PAYLOAD = {
    "visitorHash": "1c55fc9a9ddfde364af68ee4bca06a1d416e51ad437aec0f135d8c2d0a879b40",
    "domain": "example.com",
    "pathname": "/home",
    "referrer": "",
    "sessionContext": {"dailySaltRotation": "2025-06-04"},
}
# 198.51.100.23 is a documentation address: no country
V1_PAYLOAD = {**V0_PAYLOAD, "country": None, "browser": "Firefox", "os": "Linux", "device": "desktop", "utm": {}}


@pytest.mark.parametrize("version, payload", [("v1", V1_PAYLOAD), ("v0", V0_PAYLOAD)])
async def test_the_full_loop_with_the_exact_payload_and_headers(
    start_collector: Start, fake: FakeFlowcore, data_dir: Path, version: str, payload: dict[str, Any]
) -> None:
    clock = FakeClock(utc(2025, 6, 4, 10, 15, 30, 123000))
    client = await start_collector(clock=clock, **flowcore_env(fake, EVENT_VERSION=version))
    agent = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", "X-Forwarded-For": "198.51.100.23"}
    assert await pageview(client, "/home", **agent) == 204
    clock.advance(seconds=2)
    assert await pageview(client, "/about", **agent) == 204
    await fake.wait_for_events(2)

    first, second = fake.ingestions
    assert first.path == f"/events/acme/flow-analytics/visitor.v0/visitor.tracked.{version}"
    assert first.headers["Authorization"] == fake.api_key
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["x-flowcore-metadata-json"] == "e30="
    assert json.loads(base64.b64decode(first.headers["x-flowcore-metadata-json"])) == {}
    assert first.headers["x-flowcore-valid-time"] == "2025-06-04T10:15:30.123Z"
    assert second.headers["x-flowcore-valid-time"] == "2025-06-04T10:15:32.123Z"
    assert first.body == [payload]
    assert list(first.body[0]) == list(payload)  # the v0 keys first, in the original's order
    await poll(lambda: _backlog_is(client, 0))
    assert query(data_dir, "SELECT event_id FROM event_log ORDER BY seq") == [
        (first.event_ids[0],), (second.event_ids[0],)
    ]
    assert query(data_dir, "SELECT count(*) FROM daily_stats") == [(0,)]  # nothing comes back by itself

    answers = await fake.deliver(transformer_url(client), SECRET)
    assert answers == [(200, "OK"), (200, "OK")]
    assert query(data_dir, "SELECT pageviews, visitors, visits, bounces, duration_ms FROM daily_stats") == [
        (2, 1, 1, 0, 2000)
    ]
    body = await health(client)
    assert body["mode"] == "flowcore"
    assert body["flowcore"]["target"] == fake.url + f"/events/acme/flow-analytics/visitor.v0/visitor.tracked.{version}"
    assert body["flowcore"]["last_success_at"] is not None
    assert body["flowcore"]["consecutive_failures"] == 0
    assert body["last_processed_at"] is not None


async def _backlog_is(client: Client, count: int) -> bool:
    return bool((await health(client))["backlog"] == count)


async def test_an_outage_costs_nothing_but_delay(start_collector: Start, fake: FakeFlowcore) -> None:
    clock = FakeClock(utc(2025, 6, 4, 10, 0, 0))
    client = await start_collector(clock=clock, **flowcore_env(fake))
    collected: dict[str, str] = {}

    async def visit(index: int) -> None:
        path = f"/p/{index}"
        collected[path] = clock.now.strftime("%Y-%m-%dT%H:%M:%S")
        assert await pageview(client, path) == 204
        clock.advance(milliseconds=400)

    fake.fail_always(503, retry_after="0")
    for index in range(10):
        await visit(index)
    await fake.wait_for_refusals(3)
    await fake.refuse_connections()
    for index in range(10, 20):
        await visit(index)
    await poll(lambda: _failures_at_least(client, 5))
    assert (await health(client))["backlog"] == 20

    fake.heal()
    await fake.accept_connections()
    await fake.wait_for_events(20)
    await poll(lambda: _backlog_is(client, 0))
    paths = [event["payload"]["pathname"] for event in fake.events]
    assert paths == [f"/p/{i}" for i in range(20)]  # in order, each exactly once
    for ingestion in fake.ingestions:
        seconds = {collected[payload["pathname"]] for payload in ingestion.body}
        assert len(seconds) == 1  # one batch, one second
        assert ingestion.headers["x-flowcore-valid-time"].startswith(seconds.pop())
    assert (await health(client))["flowcore"]["consecutive_failures"] == 0


async def _failures_at_least(client: Client, count: int) -> bool:
    return bool((await health(client))["flowcore"]["consecutive_failures"] >= count)


async def test_a_request_without_an_answer_is_retried(start_collector: Start, fake: FakeFlowcore) -> None:
    client = await start_collector(**flowcore_env(fake, FLOWCORE_TIMEOUT_MS="100"))
    fake.hang()
    assert await pageview(client, "/slow") == 204
    await poll(lambda: _failures_at_least(client, 1))
    assert "no answer within 0.1 s" in (await health(client))["flowcore"]["last_error"]
    fake.release()
    await fake.wait_for_events(1)
    assert [e["payload"]["pathname"] for e in fake.events] == ["/slow"]


async def test_a_refused_key_halts_sending_keeps_everything_and_shows_in_health(
    start_collector: Start, fake: FakeFlowcore, data_dir: Path
) -> None:
    client = await start_collector(**flowcore_env(fake, FLOWCORE_API_KEY="fc_wrong_key"))
    for index in range(5):
        assert await pageview(client, f"/p/{index}") == 204
    await fake.wait_for_refusals(1)
    await poll(lambda: _halted(client))
    body = await health(client)
    assert body["status"] == "halted"
    assert body["flowcore"]["last_error"] == "HTTP 401: Invalid API key"
    assert body["backlog"] == 5
    assert "fc_wrong_key" not in json.dumps(body)
    assert len(fake.refusals) == 1  # halted: it did not keep knocking
    await client.close()

    fixed = await start_collector(**flowcore_env(fake))  # the configuration fixed, the collector restarted
    await fake.wait_for_events(5)
    await poll(lambda: _backlog_is(fixed, 0))
    assert [e["payload"]["pathname"] for e in fake.events] == [f"/p/{i}" for i in range(5)]
    assert query(data_dir, "SELECT count(*) FROM outbox") == [(0,)]


async def _halted(client: Client) -> bool:
    return bool((await health(client))["flowcore"]["halted"])


async def test_an_unknown_data_core_halts_with_the_platform_message(start_collector: Start, fake: FakeFlowcore) -> None:
    client = await start_collector(**flowcore_env(fake, FLOWCORE_DATA_CORE="no-such-core"))
    assert await pageview(client, "/") == 204
    await poll(lambda: _halted(client))
    error = (await health(client))["flowcore"]["last_error"]
    assert error.startswith("HTTP 404: EventType not found with name = acme/no-such-core/visitor.v0/visitor.tracked.v1")


async def test_a_data_core_without_the_v1_event_type_halts_and_says_what_to_do(
    start_collector: Start, fake: FakeFlowcore, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.event_types = frozenset({"visitor.v0/visitor.tracked.v0"})  # set up from the original's flowcore.yaml
    client = await start_collector(**flowcore_env(fake))
    for path in ("/a", "/b", "/c"):
        assert await pageview(client, path) == 204
    await poll(lambda: _halted(client))
    body = await health(client)
    assert body["status"] == "halted" and body["outbox"] == 3
    advice = "apply the new flowcore.yaml or set EVENT_VERSION=v0"
    assert body["flowcore"]["last_error"] == (
        "HTTP 404: EventType not found with name = acme/flow-analytics/visitor.v0/visitor.tracked.v1; the data "
        f"core may not have the event type visitor.v0/visitor.tracked.v1 yet: {advice} "
        "(`flowcore data-core apply -f flowcore.yaml`), then restart"
    )
    assert advice in caplog.text
    assert fake.events == []
    await client.close()

    # EVENT_VERSION=v0 and a restart: the backlog written as v1 goes as the v0 events it extends
    client = await start_collector(**flowcore_env(fake, EVENT_VERSION="v0"))
    assert await pageview(client, "/d") == 204
    await fake.wait_for_events(4)
    await poll(lambda: _backlog_is(client, 0))
    assert [(e["eventType"], e["payload"]["pathname"]) for e in fake.events] == [
        ("visitor.tracked.v0", path) for path in ("/a", "/b", "/c", "/d")
    ]
    assert all(list(e["payload"]) == list(V0_PAYLOAD) for e in fake.events)
    assert query(data_dir, "SELECT DISTINCT event_type FROM event_log") == [("visitor.tracked.v0",)]
    assert (await fake.deliver(transformer_url(client), SECRET)) == [(200, "OK")] * 4
    await poll(lambda: query(data_dir, "SELECT sum(pageviews) FROM daily_stats") == [(4,)])


async def test_a_restart_with_a_backlog_drains_it_and_sends_nothing_twice(
    start_collector: Start, fake: FakeFlowcore
) -> None:
    await fake.refuse_connections()
    client = await start_collector(**flowcore_env(fake))
    for index in range(30):
        assert await pageview(client, f"/p/{index}") == 204
    await poll(lambda: _failures_at_least(client, 2))
    await client.close()

    await fake.accept_connections()
    restarted = await start_collector(**flowcore_env(fake))
    await fake.wait_for_events(30)
    await poll(lambda: _backlog_is(restarted, 0))
    counts = Counter(e["payload"]["pathname"] for e in fake.events)
    assert counts == Counter({f"/p/{i}": 1 for i in range(30)})


async def test_retryable_statuses_and_retry_after_are_honoured(start_collector: Start, fake: FakeFlowcore) -> None:
    for status in (408, 429, 500, 502, 504):
        fake.fail_next(status, retry_after="0")
    client = await start_collector(**flowcore_env(fake))
    assert await pageview(client, "/") == 204
    await fake.wait_for_events(1)
    assert [status for status, _ in fake.refusals] == [408, 429, 500, 502, 504]
    assert not (await health(client))["flowcore"]["halted"]


def test_batches_hold_events_of_one_second() -> None:
    def row(seq: int, at: str) -> OutboxRow:
        return OutboxRow(seq, "visitor.v0", "visitor.tracked.v0", "{}", at)

    rows = [row(1, "2025-06-04T10:00:00.100Z"), row(2, "2025-06-04T10:00:00.900Z"),
            row(3, "2025-06-04T10:00:01.000Z"), row(4, "2025-06-04T10:00:00.950Z")]
    assert [[r.seq for r in batch] for batch in same_second_batches(rows)] == [[1, 2], [3], [4]]


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"FLOWCORE_TENANT": "acme"}, "FLOWCORE_API_KEY"),
        ({"FLOWCORE_API_KEY": "fc_x_y"}, "FLOWCORE_TENANT"),
        ({"FLOWCORE_TENANT": "a", "FLOWCORE_API_KEY": "k", "FLOWCORE_WEBHOOK_BASEURL": "ftp://x"},
         "FLOWCORE_WEBHOOK_BASEURL"),
        ({"FLOWCORE_TENANT": "a", "FLOWCORE_API_KEY": "k", "FLOWCORE_BATCH_SIZE": "0"}, "FLOWCORE_BATCH_SIZE"),
    ],
)
def test_a_half_configured_flowcore_stops_start_up(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_config({"DATA_DIR": str(tmp_path), **env})


def test_start_up_logs_the_mode_and_target_never_the_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from collector import log_start

    caplog.set_level(logging.INFO)
    config = load_config({"DATA_DIR": str(tmp_path), "FLOWCORE_TENANT": "acme", "FLOWCORE_API_KEY": "fc_abc_SECRETKEY"})
    log_start(config)
    assert "mode flowcore" in caplog.text
    assert "https://webhook.api.flowcore.io/events/acme/flow-analytics/visitor.v0/visitor.tracked.v1" in caplog.text
    assert "FLOWCORE_TRANSFORMER_SECRET is not set" in caplog.text
    assert "SECRETKEY" not in caplog.text and "SECRETKEY" not in repr(config)


# -- /api/transformer -----------------------------------------------------------------------------------

HASH = "a" * 64


def envelope(event_id: str = "6f0e2c90-4128-11f0-9d3a-7b1c2e4f5a61", **changes: Any) -> dict[str, Any]:
    event = {
        "eventId": event_id,
        "timeBucket": "20250604100000",
        "tenant": "acme",
        "dataCoreId": "0b7c7d4e-3f65-4a8a-9a3e-6a4d2f1b9c10",
        "flowType": "visitor.v0",
        "eventType": "visitor.tracked.v0",
        "metadata": {},
        "payload": {"visitorHash": HASH, "domain": "example.com", "pathname": "/home",
                    "referrer": "https://google.com", "sessionContext": {"dailySaltRotation": "2025-06-04"}},
        "validTime": "2025-06-04T10:15:30.123Z",
    }
    event.update(changes)
    return event


async def post_event(client: Client, body: Any, secret: str | None = SECRET) -> tuple[int, Any]:
    headers = {"X-Secret": secret} if secret is not None else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post("/api/transformer", data=data, headers={"Content-Type": "application/json", **headers})
    text = await response.text()
    return response.status, (text if response.status == 200 else json.loads(text))


@pytest.mark.parametrize(
    ("body", "secret", "status", "message"),
    [
        pytest.param(envelope(), None, 401, "missing or wrong X-Secret", id="no-secret"),
        pytest.param(envelope(), "wrong", 401, "missing or wrong X-Secret", id="wrong-secret"),
        pytest.param(b"{oops", SECRET, 400, "not valid JSON", id="malformed-json"),
        pytest.param([envelope()], SECRET, 400, "envelope must be a JSON object", id="not-an-object"),
        pytest.param(envelope(eventId=""), SECRET, 400, "envelope.eventId", id="no-event-id"),
        pytest.param(envelope(flowType=None), SECRET, 400, "envelope.flowType", id="no-flow-type"),
        pytest.param(envelope(payload="x"), SECRET, 400, "envelope.payload", id="payload-not-object"),
        pytest.param(envelope(validTime="noon"), SECRET, 400, "envelope.validTime", id="bad-valid-time"),
        pytest.param(envelope(eventType="visitor.left.v0"), SECRET, 404, "no pathway visitor.v0/visitor.left.v0",
                     id="unknown-event-type"),
        pytest.param(envelope(flowType="order.v0"), SECRET, 404, "no pathway order.v0", id="unknown-flow-type"),
        pytest.param(envelope(payload={**envelope()["payload"], "ip": "1.2.3.4"}), SECRET, 422,
                     "unknown keys: 'ip'", id="extra-payload-key"),
        pytest.param(envelope(payload={**envelope()["payload"], "visitorHash": "short"}), SECRET, 422,
                     "payload.visitorHash", id="bad-hash"),
    ],
)
async def test_transformer_refusals(
    start_collector: Start, data_dir: Path, body: Any, secret: str | None, status: int, message: str
) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET)
    answer_status, answer = await post_event(client, body, secret)
    assert answer_status == status
    assert answer["status"] == status and message in answer["error"]
    assert query(data_dir, "SELECT count(*) FROM pathway_state") == [(0,)]


async def test_transformer_processes_once_and_acknowledges_redelivery(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET)
    assert await post_event(client, envelope()) == (200, "OK")
    assert await post_event(client, envelope()) == (200, "OK")
    legacy = envelope("7a1e2c90-4128-11f0-9d3a-7b1c2e4f5a61")
    legacy["aggregator"] = legacy.pop("flowType")
    assert await post_event(client, legacy) == (200, "OK")
    assert query(data_dir, "SELECT pageviews, visitors, visits FROM daily_stats") == [(2, 1, 1)]
    assert query(data_dir, "SELECT count(*) FROM pathway_state") == [(2,)]


def add_failing_trigger(data_dir: Path) -> None:
    """A real failure inside the handler's transaction: SQLite refuses page views of /boom."""
    with sqlite3.connect(data_dir / DB_FILENAME, timeout=10) as conn:
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON pageview_rows WHEN NEW.page IN "
                     "(SELECT id FROM dims WHERE kind = 'page' AND value = '/boom') "
                     "BEGIN SELECT RAISE(ABORT, 'the disk said no'); END")


def drop_failing_trigger(data_dir: Path) -> None:
    with sqlite3.connect(data_dir / DB_FILENAME, timeout=10) as conn:
        conn.execute("DROP TRIGGER boom")


async def test_a_failing_handler_is_retried_in_the_request_then_dead_lettered_with_503(
    start_collector: Start, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET, HANDLER_MAX_ATTEMPTS="3")
    await asyncio.to_thread(add_failing_trigger, data_dir)  # in a thread: the app's writer shares this loop
    boom = envelope(payload={**envelope()["payload"], "pathname": "/boom"})
    response = await client.post("/api/transformer", json=boom, headers={"X-Secret": SECRET})
    assert response.status == 503  # one the platform redelivers; it does not redeliver a 500
    assert response.headers["Retry-After"] == "30"
    assert "kept in the dead letters" in (await response.json())["error"]
    assert caplog.text.count("failed, attempt") == 3  # three quick attempts inside the request
    assert query(data_dir, "SELECT attempts, error LIKE '%the disk said no%' FROM dead_letters") == [(3, 1)]
    assert query(data_dir, "SELECT count(*) FROM pathway_state") == [(0,)]  # not marked processed
    assert (await health(client))["dead_letters"] == 1

    status, _ = await post_event(client, boom)  # redelivered while still failing
    assert status == 503
    assert query(data_dir, "SELECT attempts FROM dead_letters") == [(6,)]

    await asyncio.to_thread(drop_failing_trigger, data_dir)  # the fix
    assert await post_event(client, boom) == (200, "OK")  # the next delivery succeeds and clears it
    assert query(data_dir, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert await post_event(client, boom) == (200, "OK")  # and one more changes nothing
    assert query(data_dir, "SELECT sum(pageviews) FROM daily_stats") == [(1,)]
    assert (await health(client))["dead_letters"] == 0


async def test_transformer_is_disabled_without_a_secret(start_collector: Start) -> None:
    client = await start_collector()
    status, answer = await post_event(client, envelope())
    assert status == 404 and "FLOWCORE_TRANSFORMER_SECRET" in answer["error"]


async def test_redelivery_twice_and_out_of_order_gives_the_live_counts(
    start_collector: Start, fake: FakeFlowcore, data_dir: Path
) -> None:
    clock = FakeClock(utc(2025, 6, 4, 10, 0))
    client = await start_collector(clock=clock, **flowcore_env(fake))
    for index, gap in enumerate([0, 5, 10, 31, 2, 45]):
        clock.advance(minutes=gap)
        assert await pageview(client, f"/p/{index}", **{"X-Forwarded-For": f"198.51.100.{index % 2}"}) == 204
    await fake.wait_for_events(6)
    events = list(fake.events)
    answers = await fake.deliver(transformer_url(client), SECRET, events[::-1])
    answers += await fake.deliver(transformer_url(client), SECRET, events[2:] + events[:2], legacy=True)
    assert {status for status, _ in answers} == {200}
    shuffled = query(data_dir, "SELECT * FROM daily_stats")

    local_dir = data_dir.parent / "local"
    clock.now = utc(2025, 6, 4, 10, 0)
    local = await start_collector(clock=clock, DATA_DIR=str(local_dir))
    for index, gap in enumerate([0, 5, 10, 31, 2, 45]):
        clock.advance(minutes=gap)
        assert await pageview(local, f"/p/{index}", **{"X-Forwarded-For": f"198.51.100.{index % 2}"}) == 204
    await drained(local)
    assert shuffled == query(local_dir, "SELECT * FROM daily_stats")



async def test_an_answer_without_event_ids_halts_keeps_the_events_and_is_not_resent(
    start_collector: Start, fake: FakeFlowcore, data_dir: Path
) -> None:
    client = await start_collector(**flowcore_env(fake))
    fake.answer_without_event_ids()
    assert await pageview(client, "/garbled") == 204
    await poll(lambda: _halted(client))
    body = await health(client)
    assert body["status"] == "halted"
    assert "answered without 1 eventIds" in body["flowcore"]["last_error"]
    assert body["backlog"] == 1 and query(data_dir, "SELECT count(*) FROM outbox") == [(1,)]  # kept
    assert await pageview(client, "/after") == 204  # page views are still taken, and wait
    await poll(lambda: _backlog_is(client, 2))
    assert len(fake.ingestions) == 1  # the platform stored it once; it was not sent again


def test_the_originals_postgres_setting_is_reported_as_ignored_without_its_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from collector import log_start

    caplog.set_level(logging.INFO)
    dsn = "postgresql://postgres:hunter2-pw@localhost:5433/pathway_db"
    config = load_config({"DATA_DIR": str(tmp_path), "POSTGRES_CONNECTION_STRING": dsn})
    log_start(config)
    [line] = [record.getMessage() for record in caplog.records if "POSTGRES_CONNECTION_STRING" in record.getMessage()]
    assert line.startswith("POSTGRES_CONNECTION_STRING is set but ignored: ")
    assert "lives in the SQLite file" in line
    assert "hunter2" not in caplog.text and "hunter2" not in repr(config)
    caplog.clear()
    log_start(load_config({"DATA_DIR": str(tmp_path)}))
    assert "POSTGRES" not in caplog.text


async def test_the_secret_header_can_be_named(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET,
                                   FLOWCORE_TRANSFORMER_SECRET_HEADER="X-Proxy-Secret")
    response = await client.post("/api/transformer", json=envelope(), headers={"X-Secret": SECRET})
    assert response.status == 401 and "X-Proxy-Secret" in (await response.json())["error"]
    response = await client.post("/api/transformer", json=envelope(), headers={"X-Proxy-Secret": SECRET})
    assert response.status == 200
    with pytest.raises(ConfigError, match="FLOWCORE_TRANSFORMER_SECRET_HEADER"):
        load_config({"DATA_DIR": str(data_dir), "FLOWCORE_TRANSFORMER_SECRET_HEADER": "X Secret"})


def test_the_event_version_advice_is_for_a_refused_v1_event_only() -> None:
    from pathways import missing_event_type_hint

    def row(event_type: str) -> OutboxRow:
        return OutboxRow(1, "visitor.v0", event_type, "{}", "2025-06-04T10:00:00.000Z")

    not_found = "EventType not found with name = acme/flow-analytics/visitor.v0/visitor.tracked.v1"
    assert "set EVENT_VERSION=v0" in missing_event_type_hint(row("visitor.tracked.v1"), 404, not_found)
    assert "set EVENT_VERSION=v0" in missing_event_type_hint(row("visitor.tracked.v1"), 400, not_found)
    assert missing_event_type_hint(row("visitor.tracked.v1"), 401, "Invalid API key") == ""
    assert missing_event_type_hint(row("visitor.tracked.v0"), 404, not_found) == ""
    assert missing_event_type_hint(row("visitor.event.v0"), 404, not_found) == ""
