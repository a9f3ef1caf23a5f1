"""Several collectors, one event log: two real collector processes in Flowcore mode write to one
(fake) data core, which delivers every event to both, as one transformer per collector would. Each
builds the complete read model, and the two agree, even when one is killed and comes back."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from fake_flowcore import FakeFlowcore
from helpers import BROWSER_UA, SECRET, poll, query
from test_process import CollectorProcess

TRANSFORMER_SECRET = "scale-out-transformer-secret"
READ_MODEL = ("daily_stats", "hourly_stats", "page_stats", "source_stats")


@pytest.fixture
async def platform() -> AsyncIterator[FakeFlowcore]:
    fake = FakeFlowcore()
    await fake.start()
    yield fake
    await fake.close()


def collector(tmp_path: Path, name: str, fake: FakeFlowcore) -> CollectorProcess:
    return CollectorProcess(
        tmp_path / name, tmp_path / f"{name}.log",
        SECRET_KEY=SECRET,  # seed mode: every collector must hash with the same key
        FLOWCORE_TENANT=fake.tenant, FLOWCORE_API_KEY=fake.api_key, FLOWCORE_WEBHOOK_BASEURL=fake.url,
        FLOWCORE_TRANSFORMER_SECRET=TRANSFORMER_SECRET, FLOWCORE_RETRY_BASE_MS="10", FLOWCORE_RETRY_MAX_MS="200",
        RATE_LIMIT_PER_SECOND="0",
    )


async def send(url: str, paths: list[str]) -> None:
    """Page views from one browser (one address, one user agent): one visitor, wherever it lands."""
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as session:
        for path in paths:
            body = json.dumps({"pathname": path, "referrer": "", "domain": "example.com"})
            async with session.post(url + "/api/pageview", data=body, headers={"Content-Type": "text/plain"}) as answer:
                assert answer.status == 204, await answer.text()


def counted(data_dir: Path) -> int:
    [(total,)] = query(data_dir, "SELECT coalesce(sum(pageviews), 0) FROM daily_stats")
    return int(total)


async def test_two_collectors_behind_a_balancer_each_count_every_page_view_exactly_once(
    platform: FakeFlowcore, tmp_path: Path
) -> None:
    first, second = collector(tmp_path, "a", platform), collector(tmp_path, "b", platform)
    try:
        await first.start()
        await second.start()
        targets = [platform.fan_out_to(c.url + "/api/transformer", TRANSFORMER_SECRET) for c in (first, second)]

        await asyncio.gather(send(first.url, [f"/a/{i}" for i in range(40)]),
                             send(second.url, [f"/b/{i}" for i in range(30)]))
        second.stop(signal.SIGKILL)  # one collector dies; the platform keeps its deliveries waiting
        await send(first.url, [f"/a/{i}" for i in range(40, 60)])
        await second.start()
        await send(second.url, [f"/b/{i}" for i in range(30, 40)])

        total = 100
        await platform.wait_for_events(total, timeout=30)
        for target in targets:
            await platform.wait_for_delivered(target, total)
            assert target.failed == []
        assert targets[1].redeliveries  # the dead collector's events were delivered again once it was back
        for data_dir in (first.data_dir, second.data_dir):
            await poll(lambda: counted(data_dir) == total, timeout=30, what=f"{total} page views counted")  # noqa: B023
    finally:
        for process in (first, second):
            if process.process is not None:
                process.stop(signal.SIGTERM)

    assert len({event["eventId"] for event in platform.events}) == total  # the platform stored each once
    a, b = first.data_dir, second.data_dir
    expected = {f"/a/{i}" for i in range(60)} | {f"/b/{i}" for i in range(40)}
    for data_dir in (a, b):
        assert dict(query(data_dir, "SELECT pathname, count(*) FROM pageviews GROUP BY pathname")) == {
            path: 1 for path in expected}
        assert query(data_dir, "SELECT count(*), count(DISTINCT event_id) FROM event_log") == [(total, total)]
        assert query(data_dir, "SELECT count(*) FROM pathway_state") == [(total,)]
        assert query(data_dir, "SELECT visitors FROM daily_stats") == [(1,)]  # one browser, seen by both
    for table in READ_MODEL:
        in_order = f"SELECT * FROM {table} ORDER BY 1, 2, 3"
        assert query(a, in_order) == query(b, in_order)
    assert sorted(query(a, "SELECT event_id FROM event_log")) == sorted(query(b, "SELECT event_id FROM event_log"))
