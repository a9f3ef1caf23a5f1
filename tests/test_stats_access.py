"""Who may read the statistics (STATS_TOKEN, or a loopback socket with no forwarding header), and
the CSV export's exact content, over the hand-worked fixture of test_stats."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import Start
from helpers import FakeClock
from test_stats import FIXTURE, NOW, TZ, seed, view

from collector import create_app, is_loopback_socket
from config import ConfigError, load_config

TOKEN = "s3cret-token-for-the-stats"
READ_ENDPOINTS = [
    "/api/stats?domain=example.com&period=7d",
    "/api/sites",
    "/api/current-visitors?domain=example.com",
    "/api/export?domain=example.com&from=2025-06-01&to=2025-06-10",
]
ELSEWHERE = {"X-Forwarded-For": "203.0.113.9"}  # the test client's peer, 127.0.0.1, is a trusted proxy


@pytest.fixture
async def seeded(data_dir: Path) -> Path:
    await seed(data_dir, FIXTURE)
    return data_dir


async def start(start_collector: Start, **env: str) -> Any:
    return await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ, **env)


@pytest.mark.parametrize("path", READ_ENDPOINTS)
async def test_without_a_token_loopback_reads_and_others_are_told_how_to_set_one(
    start_collector: Start, seeded: Path, path: str
) -> None:
    client = await start(start_collector)
    assert (await client.get(path)).status == 200
    refused = await client.get(path, headers=ELSEWHERE)
    body = await refused.json()
    assert refused.status == 403 and body["status"] == 403
    assert "STATS_TOKEN" in body["error"] and "Authorization: Bearer" in body["error"]


# A forwarded loopback address, as a client on a private network (or behind a proxy on this
# machine) could send it: with the default TRUSTED_PROXIES these once read the statistics.
FORWARDED_LOOPBACK = [
    {"X-Forwarded-For": "127.0.0.1"},
    {"X-Forwarded-For": "127.0.0.1, 10.1.2.3"},
    {"X-Forwarded-For": "::1"},
    {"X-Real-IP": "::1"},
    {"X-Real-IP": "127.0.0.1"},
    {"CF-Connecting-IP": "127.0.0.1"},
    {"Forwarded": "for=127.0.0.1"},
    {"Forwarded": 'for="[::1]"'},
]


@pytest.mark.parametrize("trusted", [None, "", "127.0.0.0/8"])
@pytest.mark.parametrize("headers", FORWARDED_LOOPBACK, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
async def test_a_forwarded_address_never_grants_access(
    start_collector: Start, seeded: Path, headers: dict[str, str], trusted: str | None
) -> None:
    client = await start(start_collector, **({} if trusted is None else {"TRUSTED_PROXIES": trusted}))
    for path in READ_ENDPOINTS:
        refused = await client.get(path, headers=headers)
        assert refused.status == 403, path
        message = (await refused.json())["error"]
        assert "proxy" in message and "STATS_TOKEN" in message and "Authorization: Bearer" in message


@pytest.mark.parametrize("trust_the_network", [False, True])
async def test_a_client_on_the_network_is_refused_whatever_it_forwards(
    aiohttp_client: Any, make_config: Any, seeded: Path, trust_the_network: bool
) -> None:
    """A real socket from this machine's network address (not loopback): refused, with or
    without a forwarded loopback address, even when its network is a trusted proxy range (as
    the private ranges are by default: a LAN, Docker or Kubernetes client)."""
    address = network_address()
    trusted = {"TRUSTED_PROXIES": f"{address}/32,127.0.0.0/8"} if trust_the_network else {}
    config = make_config(TIMEZONE=TZ, **trusted)
    server = TestServer(create_app(config, clock=FakeClock(NOW)), host=address)
    client = await aiohttp_client(server)
    assert client.server.host == address
    for headers in ({}, *FORWARDED_LOOPBACK):
        response = await client.get(READ_ENDPOINTS[0], headers=headers)
        assert response.status == 403, headers
        assert "STATS_TOKEN" in (await response.json())["error"]


def network_address() -> str:
    """This machine's address on its network (where its default route leaves): a socket from it
    to itself has a peer that is not loopback. No packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        address = str(probe.getsockname()[0])
    assert not address.startswith("127."), "this machine has no network address besides loopback"
    return address


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True), ("10.1.2.3", False),
     ("192.168.1.5", False), ("fe80::1", False), ("", False), (None, False), ("not an address", False)],
)
def test_only_a_loopback_socket_peer_is_local(peer: str | None, loopback: bool) -> None:
    assert is_loopback_socket(peer) is loopback


@pytest.mark.parametrize("path", READ_ENDPOINTS)
async def test_with_a_token_every_reader_needs_it_even_on_loopback(
    start_collector: Start, seeded: Path, path: str
) -> None:
    client = await start(start_collector, STATS_TOKEN=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        response = await client.get(path, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in (await response.json())["error"]
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.get(path, headers=ok)).status == 200
    assert (await client.get(path, headers={**ok, **ELSEWHERE})).status == 200


async def test_a_token_header_that_is_not_utf8_is_a_401_not_a_crash(start_collector: Start, seeded: Path) -> None:
    client = await start(start_collector, STATS_TOKEN=TOKEN)
    response = await client.get(READ_ENDPOINTS[1], headers={"Authorization": "Bearer \udcff\udcfe".encode(
        "utf-8", "surrogateescape").decode("latin-1")})
    assert response.status == 401


async def test_collection_and_the_dashboard_page_stay_open(start_collector: Start, seeded: Path) -> None:
    client = await start(start_collector, STATS_TOKEN=TOKEN)
    sent = await client.post("/api/pageview", json={"pathname": "/", "referrer": "", "domain": "example.com"},
                             headers=ELSEWHERE)
    assert sent.status == 204
    page = await client.get("/dashboard", headers=ELSEWHERE)
    assert page.status == 200 and page.content_type == "text/html"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("STATS_TOKEN", "short"), ("STATS_TOKEN", "has a space in it here"), ("RAW_RETENTION_DAYS", "0"),
     ("RAW_RETENTION_DAYS", "a month")],
)
def test_bad_settings_name_their_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({"DATA_DIR": str(tmp_path), name: value})


def test_the_token_is_not_in_the_config_repr(tmp_path: Path) -> None:
    config = load_config({"DATA_DIR": str(tmp_path), "STATS_TOKEN": TOKEN})
    assert config.stats.token == TOKEN and TOKEN not in repr(config)


# -- export -------------------------------------------------------------------------------------------


async def export(client: Any, **params: str) -> tuple[str, str]:
    response = await client.get("/api/export", params={"domain": "example.com", **params})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    return response.headers["Content-Disposition"], await response.text()


async def test_the_daily_export_has_every_day_of_the_range(start_collector: Start, seeded: Path) -> None:
    client = await start(start_collector)
    disposition, text = await export(client, **{"from": "2025-06-03", "to": "2025-06-06"})
    assert disposition == 'attachment; filename="example.com-daily-2025-06-03-2025-06-06.csv"'
    assert text == (
        "date,pageviews,visitors,visits,bounces,visit_duration_ms\r\n"
        "2025-06-03,3,2,2,1,1200000\r\n"
        "2025-06-04,2,2,2,2,0\r\n"
        "2025-06-05,1,1,1,1,0\r\n"
        "2025-06-06,0,0,0,0,0\r\n"
    )


async def test_the_pages_and_sources_exports(start_collector: Start, seeded: Path) -> None:
    client = await start(start_collector)
    span = {"from": "2025-06-09", "to": "2025-06-10"}
    disposition, pages = await export(client, table="pages", **span)
    assert disposition == 'attachment; filename="example.com-pages-2025-06-09-2025-06-10.csv"'
    assert pages == (
        "date,pathname,pageviews,visitors\r\n"
        "2025-06-09,/,2,2\r\n"
        "2025-06-09,/blog,1,1\r\n"
        "2025-06-10,/,2,2\r\n"
        "2025-06-10,/pricing,2,2\r\n"
        "2025-06-10,/blog,2,1\r\n"
    )
    disposition, sources = await export(client, table="sources", **span)
    assert disposition == 'attachment; filename="example.com-sources-2025-06-09-2025-06-10.csv"'
    assert sources == (
        "date,source,pageviews,visitors\r\n"
        "2025-06-09,(direct),2,1\r\n"
        "2025-06-09,news.example,1,1\r\n"
        "2025-06-10,(direct),4,3\r\n"
        "2025-06-10,google.com,1,1\r\n"
        "2025-06-10,news.example,1,1\r\n"
    )


async def test_export_quotes_commas_and_defuses_formulas(start_collector: Start, data_dir: Path) -> None:
    at = FIXTURE[-3].valid_time
    await seed(data_dir, [view(at, "x", '/a,"b"'), view(at, "y", "=HYPERLINK(\"http://evil\")")])
    client = await start(start_collector)
    _, text = await export(client, table="pages", **{"from": "2025-06-10", "to": "2025-06-10"})
    assert text == (
        "date,pathname,pageviews,visitors\r\n"
        '2025-06-10,"/a,""b""",1,1\r\n'
        "2025-06-10,\"'=HYPERLINK(\"\"http://evil\"\")\",1,1\r\n"
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"to": "2025-06-10"}, "from is required", id="no-from"),
        pytest.param({"from": "2025-06-10"}, "to is required", id="no-to"),
        pytest.param({"from": "2025-06-10", "to": "2025-06-10", "table": "visits"}, "table must be", id="bad-table"),
        pytest.param({"from": "2025-06-10", "to": "2025-06-10", "period": "7d"}, "unknown parameters", id="period"),
    ],
)
async def test_export_refuses_bad_parameters(start_collector: Start, seeded: Path, params: dict[str, str],
                                             message: str) -> None:
    client = await start(start_collector)
    response = await client.get("/api/export", params={"domain": "example.com", **params})
    assert response.status == 400 and message in (await response.json())["error"]
