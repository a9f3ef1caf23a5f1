"""Who may read the statistics (STATS_TOKEN, or loopback through the trusted-proxy rules), and
the CSV export's exact content, over the hand-worked fixture of test_stats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Start
from helpers import FakeClock
from test_stats import FIXTURE, NOW, TZ, seed, view

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
    assert (await client.get(path, headers={"X-Forwarded-For": "127.0.0.1"})).status == 200
    refused = await client.get(path, headers=ELSEWHERE)
    body = await refused.json()
    assert refused.status == 403 and body["status"] == 403
    assert "STATS_TOKEN" in body["error"] and "Authorization: Bearer" in body["error"]


async def test_a_forwarded_header_from_an_untrusted_peer_changes_nothing(start_collector: Start, seeded: Path) -> None:
    client = await start(start_collector, TRUSTED_PROXIES="")
    # 127.0.0.1 is no proxy now, so its X-Forwarded-For is not believed: the client is loopback.
    assert (await client.get(READ_ENDPOINTS[0], headers=ELSEWHERE)).status == 200


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
    assert config.stats_token == TOKEN and TOKEN not in repr(config)


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
