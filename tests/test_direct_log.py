"""Local mode commits a page view straight into the event log, in its group commit, and the router
takes it from there: as a real process, killed with SIGKILL while page views stream in, it loses
no page view it answered 204, counts none twice, and `rebuild` recomputes the same figures. A
backlog an earlier run in Flowcore mode left in the outbox is logged after what was logged
directly, and counted once."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import BROWSER_UA, query
from test_process import ROOT, CollectorProcess, Running


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """Collector processes on one data directory (test_process's), each killed if a test leaves it running."""
    made: list[CollectorProcess] = []

    def make(*args: str, **env: str) -> CollectorProcess:
        made.append(CollectorProcess(tmp_path / "data", tmp_path / "collector.log", *args, **env))
        return made[-1]

    yield make
    for collector in made:
        if collector.process is not None:
            collector.process.kill()
            collector.process.wait()


RATE_LIMIT_OFF = {"RATE_LIMIT_PER_SECOND": "0"}  # every page view comes from one address, as fast as it goes


async def stream_until_killed(collector: CollectorProcess, prefix: str, count: int, kill_after: int) -> set[str]:
    """`count` page views at once, each to its own path; SIGKILL once `kill_after` were answered,
    with the others still in flight. Returns the paths answered 204."""
    counted: set[str] = set()
    enough = asyncio.Event()
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as session:

        async def one(path: str) -> None:
            body = json.dumps({"pathname": path, "referrer": "", "domain": "example.com"})
            try:
                async with session.post(collector.url + "/api/pageview", data=body,
                                        headers={"Content-Type": "text/plain"}) as response:
                    if response.status == 204:
                        counted.add(path)
            except aiohttp.ClientError:
                return  # killed before it answered: either outcome is allowed, never both
            if len(counted) >= kill_after:
                enough.set()

        sending = asyncio.gather(*(one(f"/{prefix}/{index}") for index in range(count)))
        await asyncio.wait_for(enough.wait(), 30)
        collector.stop(signal.SIGKILL)
        await sending
    return counted


def counted_paths(data: Path) -> dict[str, int]:
    return dict(query(data, "SELECT pathname, count(*) FROM pageviews GROUP BY pathname"))


def read_model_figures(data: Path) -> list[tuple[Any, ...]]:
    return query(data, "SELECT domain, day, pageviews, visitors, visits, bounces FROM daily_stats ORDER BY domain, day")


async def test_killed_while_page_views_stream_in_it_loses_none_it_answered_and_counts_none_twice(
    running: Running, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    collector = running(**RATE_LIMIT_OFF)
    answered: set[str] = set()
    for round_number in range(3):  # killed at a different point of the commits and the read model's steps each time
        await collector.start()
        answered |= await stream_until_killed(collector, f"r{round_number}", 400, kill_after=50 + 100 * round_number)

    await collector.start()
    await collector.poll_health(lambda body: body["backlog"] == 0)
    counted = counted_paths(data)
    assert answered <= counted.keys()  # every 204 was durable
    assert set(counted.values()) == {1}  # and nothing counted twice
    assert query(data, "SELECT count(*) FROM outbox") == [(0,)]  # local mode does not use it
    assert query(data, "SELECT count(*), count(DISTINCT event_id), count(DISTINCT seq) FROM event_log") == [
        (len(counted),) * 3]
    assert query(data, "SELECT count(*) FROM pathway_state") == [(len(counted),)]
    cursor = query(data, "SELECT value FROM meta WHERE key = 'local_delivered_seq'")
    assert query(data, "SELECT max(seq) FROM event_log") == [(int(cursor[0][0]),)]
    live = read_model_figures(data)
    assert sum(int(row[2]) for row in live) == len(counted)
    assert collector.stop(signal.SIGTERM) == 0

    rebuilt = subprocess.run([sys.executable, str(ROOT / "collector.py"), "rebuild"], env=collector.env,
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert read_model_figures(data) == live  # the log holds every page view the read model counted
    assert counted_paths(data) == counted


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_outbox_left_in_flowcore_mode_is_logged_after_the_direct_log_and_counted_once(
    running: Running, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    unreachable = f"http://127.0.0.1:{unused_port()}"  # Flowcore down: the page views wait in the outbox
    flowcore = running(FLOWCORE_TENANT="acme", FLOWCORE_API_KEY="fc_0123456789abcdef_s3cr3t",
                       FLOWCORE_WEBHOOK_BASEURL=unreachable, **RATE_LIMIT_OFF)
    await flowcore.start()
    assert await send(flowcore, "flowcore", 40) == {204}
    assert flowcore.stop(signal.SIGTERM) == 0
    assert query(data, "SELECT count(*) FROM outbox") == [(40,)]

    local = running(**RATE_LIMIT_OFF)
    await local.start()
    assert await send(local, "local", 60) == {204}
    await local.poll_health(lambda body: body["backlog"] == 0)
    counted = counted_paths(data)
    assert counted == {**{f"/flowcore/{i}": 1 for i in range(40)}, **{f"/local/{i}": 1 for i in range(60)}}
    assert query(data, "SELECT count(*) FROM outbox") == [(0,)]
    assert query(data, "SELECT count(*), count(DISTINCT event_id), count(DISTINCT seq) FROM event_log") == [
        (100, 100, 100)]
    # The backlog's seqs follow those of every event logged before it was moved: the cursor never passed it.
    first_moved = query(data, "SELECT min(seq) FROM event_log WHERE payload ->> '$.pathname' LIKE '/flowcore/%'")
    outbox_seqs = query(data, "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
    assert int(first_moved[0][0]) > 40 and int(outbox_seqs[0][0]) >= 100
    assert local.stop(signal.SIGTERM) == 0


async def send(collector: CollectorProcess, prefix: str, count: int) -> set[int]:
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as session:

        async def one(index: int) -> int:
            body = json.dumps({"pathname": f"/{prefix}/{index}", "referrer": "", "domain": "example.com"})
            async with session.post(collector.url + "/api/pageview", data=body,
                                    headers={"Content-Type": "text/plain"}) as response:
                return response.status

        return set(await asyncio.gather(*(one(index) for index in range(count))))
