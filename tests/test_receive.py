"""What /api/transformer receives: every event the original collector's contract accepted (read
leniently, counted under NO_SITE when its domain is no hostname), kept in the local event log in
Flowcore mode so `rebuild` replays it, and dead letters that `collector.py dead-letters` lists and
retries, each exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import Start
from fake_flowcore import FakeFlowcore
from helpers import SECRET as SECRET_KEY
from helpers import FakeClock, poll, query, utc
from test_flowcore import SECRET, add_failing_trigger, drop_failing_trigger, envelope, flowcore_env, pageview

import collector
from config import load_config
from filters import NO_SITE
from maintenance import DataDirBusyError, rebuild, retry_dead_letters
from pathways import VISITOR_TRACKED, ContractError, read_visitor_tracked

NOW = utc(2025, 6, 4, 12)
VALID = utc(2025, 6, 4, 10, 15, 30)
HASH = "a" * 64


def original(**changes: Any) -> dict[str, Any]:
    """A payload as the original collector wrote it."""
    payload: dict[str, Any] = {"visitorHash": HASH, "domain": "example.com", "pathname": "/home", "referrer": "",
                               "sessionContext": {"dailySaltRotation": "2025-06-04"}}
    payload.update(changes)
    return payload


@pytest.mark.parametrize(
    ("payload", "domain", "pathname", "salt_day"),
    [
        pytest.param(original(), "example.com", "/home", "2025-06-04", id="as-we-write-it"),
        pytest.param(original(domain=""), NO_SITE, "/home", "2025-06-04", id="empty-domain"),
        pytest.param(original(domain="not a host!"), NO_SITE, "/home", "2025-06-04", id="domain-not-a-hostname"),
        pytest.param(original(domain="x" * 300), NO_SITE, "/home", "2025-06-04", id="domain-too-long"),
        pytest.param(original(domain="WWW.Example.COM."), "www.example.com", "/home", "2025-06-04", id="domain-case"),
        pytest.param({k: v for k, v in original().items() if k != "domain"}, NO_SITE, "/home", "2025-06-04",
                     id="no-domain-as-early-versions-wrote"),
        pytest.param(original(pathname=""), "example.com", "", "2025-06-04", id="empty-pathname"),
        pytest.param(original(visitorHash="Z" * 64), "example.com", "/home", "2025-06-04", id="hash-not-hex"),
        pytest.param(original(sessionContext={"dailySaltRotation": "2025-06-04", "rotatesAt": "midnight"}),
                     "example.com", "/home", "2025-06-04", id="unknown-nested-key-stripped"),
        pytest.param(original(sessionContext={"dailySaltRotation": ""}), "example.com", "/home", "2025-06-04",
                     id="empty-salt-day-is-the-valid-days"),
        pytest.param(original(sessionContext={"dailySaltRotation": "2025-02-30"}), "example.com", "/home",
                     "2025-06-04", id="salt-day-not-a-date"),
    ],
)
def test_the_original_contract_is_read_leniently(payload: dict[str, Any], domain: str, pathname: str,
                                                  salt_day: str) -> None:
    read = read_visitor_tracked(payload, VALID, NOW)
    assert read["domain"] == domain and read["pathname"] == pathname
    assert read["sessionContext"] == {"dailySaltRotation": salt_day}
    assert set(read) == set(VISITOR_TRACKED.schema.fields)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param(original(ip="198.51.100.7"), "unknown keys: 'ip'", id="unknown-top-level-key"),
        pytest.param(original(visitorHash="a" * 63), "visitorHash must be 64 characters", id="short-hash"),
        pytest.param({k: v for k, v in original().items() if k != "pathname"}, "pathname is required",
                     id="no-pathname"),
        pytest.param(original(referrer=7), "referrer must be a string", id="referrer-not-a-string"),
        pytest.param(original(sessionContext="2025-06-04"), "sessionContext must be an object", id="flat-context"),
        pytest.param(original(sessionContext={"dailySaltRotation": "1999-12-31"}), "outside 2000-01-01 to tomorrow",
                     id="salt-day-before-2000"),
        pytest.param(original(sessionContext={"dailySaltRotation": "2025-06-06"}), "outside 2000-01-01 to tomorrow",
                     id="salt-day-after-tomorrow"),
        pytest.param(original(pathname="/\ud800"), "lone surrogate", id="unstorable-text"),
    ],
)
def test_what_even_the_original_could_not_count_is_refused(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        read_visitor_tracked(payload, VALID, NOW)


@pytest.mark.parametrize("valid_time", ["1999-12-31T23:59:59.999Z", "2099-01-01T00:00:00.000Z"])
async def test_a_valid_time_outside_the_sane_window_gets_422(start_collector: Start, data_dir: Path,
                                                             valid_time: str) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET)
    response = await client.post("/api/transformer", json=envelope(validTime=valid_time), headers={"X-Secret": SECRET})
    assert response.status == 422
    assert "envelope.validTime" in (await response.json())["error"]
    assert query(data_dir, "SELECT count(*) FROM pathway_state") == [(0,)]


async def test_events_without_a_usable_domain_count_under_no_site_never_first(
    start_collector: Start, data_dir: Path
) -> None:
    client = await start_collector(clock=FakeClock(NOW), FLOWCORE_TRANSFORMER_SECRET=SECRET)
    events = [
        envelope("e-1", payload=original(domain="")),
        envelope("e-2", payload=original(domain="::not-a-host::", pathname="")),
        envelope("e-3", payload=original(domain="b.example")),
        envelope("e-4", payload={k: v for k, v in original(visitorHash="Q" * 64).items() if k != "domain"}),
    ]
    for event in events:
        response = await client.post("/api/transformer", json=event, headers={"X-Secret": SECRET})
        assert (response.status, await response.text()) == (200, "OK")
    sites = (await (await client.get("/api/sites")).json())["sites"]
    assert [site["domain"] for site in sites] == ["b.example", NO_SITE]
    assert [site["pageviews"] for site in sites] == [1, 3]
    stats = await client.get("/api/stats", params={"domain": NO_SITE, "period": "today"})
    assert stats.status == 200
    body = await stats.json()
    assert body["domain"] == NO_SITE and body["totals"]["pageviews"]["value"] == 3
    export = await client.get("/api/export", params={"domain": NO_SITE, "from": "2025-06-04", "to": "2025-06-04"})
    assert export.status == 200 and 'filename="no-site-daily-' in export.headers["Content-Disposition"]
    visitors = await client.get("/api/current-visitors", params={"domain": NO_SITE})
    assert visitors.status == 200
    assert query(data_dir, "SELECT DISTINCT domain FROM pageviews ORDER BY domain") == [(NO_SITE,), ("b.example",)]


# -- the event log in Flowcore mode -------------------------------------------------------------------------


async def test_in_flowcore_mode_every_received_event_is_logged_and_rebuild_replays_them_all(
    start_collector: Start, data_dir: Path
) -> None:
    fake = FakeFlowcore()
    await fake.start()
    try:
        clock = FakeClock(utc(2025, 6, 4, 10))
        client = await start_collector(clock=clock, TIMEZONE="UTC", **flowcore_env(fake))
        for index in range(3):  # this collector's own page views, sent and delivered back
            assert await pageview(client, f"/own/{index}") == 204
            clock.advance(minutes=1)
        await fake.wait_for_events(3)
        await poll(lambda: query(data_dir, "SELECT count(*) FROM outbox") == [(0,)])
        others = [envelope(f"from-another-collector-{i}", payload=original(pathname=f"/other/{i}"))
                  for i in range(4)]
        delivered = fake.events[:1] + others[:2] + fake.events[1:] + others[2:] + fake.events[:1] + others[:1]
        answers = await fake.deliver(str(client.make_url("/api/transformer")), SECRET, delivered)
        assert {status for status, _ in answers} == {200}
        live = query(data_dir, "SELECT * FROM daily_stats")
        assert query(data_dir, "SELECT sum(pageviews) FROM daily_stats") == [(7,)]
        logged = query(data_dir, "SELECT event_id, seq FROM event_log ORDER BY seq")
        assert sorted(event_id for event_id, _ in logged) == sorted(
            [e["eventId"] for e in fake.events] + [e["eventId"] for e in others]
        )  # each once, whoever produced it
        assert len({seq for _, seq in logged}) == 7
        await client.close()

        summary = await rebuild(data_dir, ZoneInfo("UTC"), utc(2025, 6, 5))
        assert summary.replayed == 7
        assert query(data_dir, "SELECT * FROM daily_stats") == live
    finally:
        await fake.close()


async def test_an_event_delivered_back_before_the_senders_answer_is_logged_once(
    start_collector: Start, data_dir: Path
) -> None:
    """The platform may deliver an event to the transformer before the batch's answer reaches the
    sender: the sink then finds it logged already, and neither the log nor the outbox get stuck."""
    fake = FakeFlowcore()
    await fake.start()
    try:
        client = await start_collector(**flowcore_env(fake))
        fake.deliver_before_answering(str(client.make_url("/api/transformer")), SECRET)
        for index in range(5):
            assert await pageview(client, f"/p/{index}") == 204
        await fake.wait_for_events(5)
        await poll(lambda: query(data_dir, "SELECT count(*) FROM outbox") == [(0,)])
        assert query(data_dir, "SELECT count(*), count(DISTINCT event_id) FROM event_log") == [(5, 5)]
        assert query(data_dir, "SELECT sum(pageviews) FROM daily_stats") == [(5,)]
        assert not (await (await client.get("/health")).json())["flowcore"]["last_error"]
    finally:
        await fake.close()


async def test_retention_in_flowcore_mode_deletes_old_logged_events_but_keeps_their_ids(
    start_collector: Start, data_dir: Path
) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 12)), FLOWCORE_TENANT="acme",
                                   FLOWCORE_API_KEY="fc_x_y", FLOWCORE_TRANSFORMER_SECRET=SECRET,
                                   FLOWCORE_WEBHOOK_BASEURL="http://127.0.0.1:9", RAW_RETENTION_DAYS="2")
    old = envelope("old-event", validTime="2025-05-01T10:00:00.000Z",
                   payload=original(sessionContext={"dailySaltRotation": "2025-05-01"}))
    new = envelope("new-event")
    for event in (old, new):
        response = await client.post("/api/transformer", json=event, headers={"X-Secret": SECRET})
        assert response.status == 200
    await client.close()
    # A day later: retention runs at start (whether or not it ran during the first start).
    client = await start_collector(clock=FakeClock(utc(2025, 6, 5, 12)), FLOWCORE_TENANT="acme",
                                   FLOWCORE_API_KEY="fc_x_y", FLOWCORE_TRANSFORMER_SECRET=SECRET,
                                   FLOWCORE_WEBHOOK_BASEURL="http://127.0.0.1:9", RAW_RETENTION_DAYS="2")
    await poll(lambda: query(data_dir, "SELECT event_id FROM event_log") == [("new-event",)])
    assert query(data_dir, "SELECT count(*) FROM pathway_state") == [(2,)]  # a redelivery stays harmless
    response = await client.post("/api/transformer", json=old, headers={"X-Secret": SECRET})
    assert response.status == 200
    assert query(data_dir, "SELECT sum(pageviews) FROM daily_stats") == [(2,)]


# -- dead letters ---------------------------------------------------------------------------------------------


async def test_the_dead_letters_command_lists_them_and_retries_each_exactly_once(
    start_collector: Start, data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET=SECRET, HANDLER_MAX_ATTEMPTS="1")
    await asyncio.to_thread(add_failing_trigger, data_dir)
    booms = [envelope(f"boom-{i}", payload=original(pathname="/boom", visitorHash=str(i) * 64)) for i in range(2)]
    for event in [*booms, envelope("fine")]:
        await client.post("/api/transformer", json=event, headers={"X-Secret": SECRET})
    config = load_config({"DATA_DIR": str(data_dir), "SECRET_KEY": SECRET_KEY, "FLOWCORE_TRANSFORMER_SECRET": SECRET})

    assert await asyncio.to_thread(collector.dead_letters_command, config, False) == 0  # readable while running
    listing = capsys.readouterr().out
    assert "boom-0  visitor.v0/visitor.tracked.v0  1 attempts" in listing and "boom-1" in listing
    assert "2 dead letters; after a fix" in listing
    assert await asyncio.to_thread(collector.dead_letters_command, config, True) == 1  # refused while running
    assert "a collector is running" in capsys.readouterr().err
    await client.close()

    assert await asyncio.to_thread(collector.dead_letters_command, config, True) == 1  # not fixed yet
    assert "failed again" in capsys.readouterr().out
    assert query(data_dir, "SELECT event_id, attempts FROM dead_letters ORDER BY event_id") == [
        ("boom-0", 2), ("boom-1", 2)]

    await asyncio.to_thread(drop_failing_trigger, data_dir)
    assert await asyncio.to_thread(collector.dead_letters_command, config, True) == 0
    assert "retried 2 dead letters: 2 processed, 0 still failing" in capsys.readouterr().out
    assert query(data_dir, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert query(data_dir, "SELECT sum(pageviews) FROM daily_stats") == [(3,)]
    assert query(data_dir, "SELECT count(*) FROM pageviews WHERE pathname = '/boom'") == [(2,)]

    monkeypatch.chdir(data_dir.parent)  # no .env but the test's
    monkeypatch.setenv("DATA_DIR", str(data_dir))  # and through main(), as an operator runs it
    monkeypatch.setenv("SECRET_KEY", SECRET_KEY)
    assert await asyncio.to_thread(collector.main, ["dead-letters", "--retry"]) == 0
    assert "retried 0 dead letters" in capsys.readouterr().out
    assert await asyncio.to_thread(collector.main, ["dead-letters"]) == 0
    assert capsys.readouterr().out.strip() == "0 dead letters"
    assert query(data_dir, "SELECT sum(pageviews) FROM daily_stats") == [(3,)]  # each counted once


async def test_retrying_dead_letters_takes_the_data_dir_lock(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()
    config = load_config({"DATA_DIR": str(data_dir)})
    with pytest.raises(DataDirBusyError):
        await retry_dead_letters(data_dir, ZoneInfo("UTC"), lambda store: collector.wire_pathways(
            store, collector.new_read_model(store, config), config))
    await client.close()


def test_dead_letters_without_a_database_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config({"DATA_DIR": str(tmp_path / "none")})
    assert collector.dead_letters_command(config, False) == 1
    assert "there is no database" in capsys.readouterr().err
