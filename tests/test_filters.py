"""What is not counted and why: each drop reason over real HTTP, with its header and its count,
and nothing else stored; ALLOWED_DOMAINS, ALLOWED_ORIGINS, GPC and DNT; the rate limiter,
over HTTP and directly (bounded memory after 100,000 addresses)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from conftest import Start
from helpers import BROWSER_UA, Client, FakeClock, drained, query, utc
from playwright.async_api import Browser

import stats
from collector import DROPS, LIMITER
from config import ConfigError, load_config
from filters import UNNAMED_REASONS, BotDetector, DropReason, RateLimiter, limiter_key

BODY = {"pathname": "/", "referrer": "", "domain": "example.com"}
TABLES_A_PAGE_VIEW_TOUCHES = ("outbox", "event_log", "pathway_state", "pageview_rows", "daily_stats", "visitors",
                              "dims", "salts")


async def post(client: Client, body: object = BODY, **headers: str) -> ClientResponse:
    headers = {"Content-Type": "text/plain", "X-Forwarded-For": "198.51.100.23", **headers}
    return await client.post("/api/pageview", data=json.dumps(body), headers=headers)


async def drop_counts(client: Client, data_dir: Path) -> list[tuple[str, str, str, int]]:
    await client.app[DROPS].flush()  # what the collector does every second and at shutdown
    return query(data_dir, "SELECT domain, day, reason, count FROM dropped_pageviews ORDER BY 1, 2, 3")


def nothing_stored(data_dir: Path) -> None:
    for table in TABLES_A_PAGE_VIEW_TOUCHES:
        assert query(data_dir, f"SELECT count(*) FROM {table}") == [(0,)], table


HEADLESS_UA = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 "
               "Safari/537.36")


@pytest.mark.parametrize(
    ("headers", "env", "reason"),
    [
        pytest.param({"User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"}, {},
                     "bot", id="crawler"),
        pytest.param({"User-Agent": "python-requests/2.32.3"}, {}, "bot", id="http-library"),
        pytest.param({"User-Agent": "x" * 1025}, {}, "bot", id="absurdly-long-agent"),
        pytest.param({"User-Agent": HEADLESS_UA}, {}, "headless", id="headless-chrome"),
        pytest.param({"User-Agent": "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) "
                                    "PhantomJS/2.1.1 Safari/538.1"}, {}, "headless", id="phantomjs"),
        pytest.param({"User-Agent": ""}, {}, "empty-user-agent", id="empty-agent"),
        pytest.param({"User-Agent": "   "}, {}, "empty-user-agent", id="blank-agent"),
        pytest.param({"Sec-Purpose": "prefetch;prerender"}, {}, "prefetch", id="sec-purpose-prerender"),
        pytest.param({"Sec-Purpose": "prefetch"}, {}, "prefetch", id="sec-purpose-prefetch"),
        pytest.param({"Purpose": "prefetch"}, {}, "prefetch", id="purpose"),
        pytest.param({"X-Moz": "prefetch"}, {}, "prefetch", id="x-moz"),
        pytest.param({"X-Purpose": "preview"}, {}, "prefetch", id="x-purpose-preview"),
        pytest.param({"Sec-GPC": "1"}, {}, "gpc", id="gpc-by-default"),
        pytest.param({"DNT": "1"}, {"RESPECT_DNT": "true"}, "dnt", id="dnt-when-asked"),
        pytest.param({}, {"ALLOWED_DOMAINS": "other.example"}, "domain-not-allowed", id="domain-not-allowed"),
    ],
)
async def test_each_drop_reason_answers_204_says_why_counts_and_stores_nothing_else(
    start_collector: Start, data_dir: Path, headers: dict[str, str], env: dict[str, str], reason: str
) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 23, 30)), TIMEZONE="Europe/Copenhagen", **env)
    for _ in range(2):
        response = await post(client, **headers)
        assert response.status == 204
        assert response.headers["X-Collector-Dropped"] == reason
    await drained(client)
    domain = "*" if reason == "domain-not-allowed" else "example.com"
    # the local day in TIMEZONE: 23:30 UTC is already 5 June in Copenhagen
    assert await drop_counts(client, data_dir) == [(domain, "2025-06-05", reason, 2)]
    nothing_stored(data_dir)


async def test_a_missing_user_agent_is_dropped(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()
    headers = {"Content-Type": "text/plain", "X-Forwarded-For": "198.51.100.23"}
    client.session.headers.pop("User-Agent")
    response = await client.post("/api/pageview", data=json.dumps(BODY), headers=headers,
                                 skip_auto_headers=["User-Agent"])
    assert response.headers["X-Collector-Dropped"] == "empty-user-agent"
    assert [row[2:] for row in await drop_counts(client, data_dir)] == [("empty-user-agent", 1)]


async def test_aiohttps_own_user_agent_is_a_bot(start_collector: Start) -> None:
    client = await start_collector()
    client.session.headers.pop("User-Agent")  # back to "Python/3.x aiohttp/..."
    assert (await post(client)).headers["X-Collector-Dropped"] == "bot"


async def test_a_browser_is_counted_and_gpc_dnt_have_their_defaults(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()
    counted = await post(client, DNT="1")  # DNT is not honoured unless RESPECT_DNT=true
    assert counted.status == 204 and "X-Collector-Dropped" not in counted.headers
    assert (await post(client, **{"Sec-GPC": "0"})).headers.get("X-Collector-Dropped") is None
    await drained(client)
    assert query(data_dir, "SELECT pageviews FROM daily_stats") == [(2,)]
    assert await drop_counts(client, data_dir) == []


async def test_gpc_can_be_ignored(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(RESPECT_GPC="false")
    assert "X-Collector-Dropped" not in (await post(client, **{"Sec-GPC": "1"})).headers
    await drained(client)
    assert query(data_dir, "SELECT pageviews FROM daily_stats") == [(1,)]


async def test_bad_input_from_a_bot_is_still_refused(start_collector: Start, data_dir: Path) -> None:
    """Validation comes before the filters: errors stay errors, whoever sends them."""
    client = await start_collector()
    response = await post(client, {"pathname": 7, "referrer": ""}, **{"User-Agent": "curl/8.5.0"})
    assert response.status == 400
    assert "X-Collector-Dropped" not in response.headers
    assert await drop_counts(client, data_dir) == []


@pytest.mark.parametrize(
    ("domain", "counted"),
    [
        pytest.param("example.com", True, id="exact"),
        pytest.param("Example.COM.", True, id="normalised"),
        pytest.param("blog.example.org", True, id="wildcard-subdomain"),
        pytest.param("a.b.example.org", True, id="wildcard-any-depth"),
        pytest.param("example.org", False, id="wildcard-not-the-apex"),
        pytest.param("badexample.org", False, id="wildcard-not-a-suffix-of-a-label"),
        pytest.param("www.example.com", False, id="exact-is-exact"),
        pytest.param("xn--bcher-kva.example", True, id="idna"),
        pytest.param("evil.test", False, id="other"),
    ],
)
async def test_allowed_domains(start_collector: Start, data_dir: Path, domain: str, counted: bool) -> None:
    client = await start_collector(ALLOWED_DOMAINS="example.com, *.example.org, bücher.example")
    response = await post(client, {**BODY, "domain": domain})
    assert response.status == 204
    assert response.headers.get("X-Collector-Dropped") == (None if counted else "domain-not-allowed")


def test_allowed_domains_refuses_what_is_not_a_hostname(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ALLOWED_DOMAINS"):
        load_config({"DATA_DIR": str(tmp_path), "ALLOWED_DOMAINS": "example.com, exa mple.org"})


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        pytest.param("https://example.com", True, id="exact"),
        pytest.param("http://example.com", False, id="other-scheme"),
        pytest.param("https://example.com:8443", False, id="other-port"),
        pytest.param("https://shop.example.net", True, id="wildcard"),
        pytest.param("https://a.b.example.net", True, id="wildcard-deeper"),
        pytest.param("https://example.net", False, id="wildcard-not-the-apex"),
        pytest.param("https://evil.test/.example.net", False, id="path-trick"),
        pytest.param("http://localhost:8080", True, id="exact-with-port"),
        pytest.param("https://evil.test", False, id="other"),
        pytest.param("null", False, id="null"),
    ],
)
async def test_allowed_origins_decide_who_gets_cors_headers(start_collector: Start, origin: str, allowed: bool) -> None:
    client = await start_collector(ALLOWED_ORIGINS="https://example.com, https://*.example.net, http://localhost:8080")
    preflight = await client.options("/api/pageview", headers={"Origin": origin,
                                                               "Access-Control-Request-Method": "POST"})
    posted = await post(client, Origin=origin)
    refused = await post(client, {"pathname": 1, "referrer": ""}, Origin=origin)
    for response in (preflight, posted, refused):
        assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
        assert response.headers["Vary"] == "Origin"
    assert posted.status == 204  # CORS decides who may read the answer; ALLOWED_DOMAINS what is counted
    if allowed:
        assert posted.headers["Access-Control-Expose-Headers"] == "X-Collector-Dropped"


async def test_any_origin_by_default(start_collector: Start) -> None:
    client = await start_collector()
    response = await post(client, Origin="https://anything.example")
    assert response.headers["Access-Control-Allow-Origin"] == "https://anything.example"


@pytest.mark.parametrize("value", ["example.com", "ftp://example.com", "https://exa mple.com", "https://x.com:99999"])
def test_allowed_origins_refuses_what_is_not_an_origin(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="ALLOWED_ORIGINS"):
        load_config({"DATA_DIR": str(tmp_path), "ALLOWED_ORIGINS": value})


# -- rate limiting ------------------------------------------------------------------------------------


async def test_beyond_the_burst_a_client_gets_429_with_retry_after(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(RATE_LIMIT_BURST="3", RATE_LIMIT_PER_SECOND="0.01")
    statuses = [(await post(client)).status for _ in range(3)]
    assert statuses == [204] * 3
    refused = await post(client, Origin="https://example.com")
    assert refused.status == 429
    assert await refused.json() == {"status": 429, "error": "too many page views from this address; try again in "
                                    f"{refused.headers['Retry-After']} s"}
    assert 1 <= int(refused.headers["Retry-After"]) <= 100
    assert refused.headers["Access-Control-Allow-Origin"] == "https://example.com"
    other = await post(client, **{"X-Forwarded-For": "198.51.100.24"})  # another address has its own bucket
    assert other.status == 204
    same_v6_network = [await post(client, **{"X-Forwarded-For": f"2001:db8:1:2::{n}"}) for n in range(1, 5)]
    assert [r.status for r in same_v6_network] == [204, 204, 204, 429]  # one /64, one bucket
    await drained(client)
    assert query(data_dir, "SELECT pageviews FROM daily_stats") == [(7,)]


async def test_zero_disables_the_rate_limit(start_collector: Start) -> None:
    client = await start_collector(RATE_LIMIT_BURST="1", RATE_LIMIT_PER_SECOND="0")
    assert not client.app[LIMITER].enabled
    assert [(await post(client)).status for _ in range(5)] == [204] * 5


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket_refills_at_its_rate() -> None:
    ticks = Ticks()
    limiter = RateLimiter(rate=2, burst=4, size=100, clock=ticks)
    assert [limiter.retry_after("203.0.113.1") for _ in range(4)] == [None] * 4
    assert limiter.retry_after("203.0.113.1") == 1  # half a second to the next token, rounded up
    ticks.now += 0.5
    assert limiter.retry_after("203.0.113.1") is None
    assert limiter.retry_after("203.0.113.1") == 1
    ticks.now += 10  # long idle: full again, and no more than the burst
    assert [limiter.retry_after("203.0.113.1") for _ in range(5)] == [None, None, None, None, 1]
    tenth = RateLimiter(rate=10, burst=50, size=100, clock=ticks)  # 0.1 s is not exact in binary
    assert [tenth.retry_after("203.0.113.3") for _ in range(51)] == [None] * 50 + [1]
    slow = RateLimiter(rate=0.1, burst=1, size=100, clock=ticks)
    assert slow.retry_after("203.0.113.2") is None
    assert slow.retry_after("203.0.113.2") == 10


def test_limiter_keys_are_ipv4_addresses_and_ipv6_64_networks() -> None:
    assert limiter_key("203.0.113.1") != limiter_key("203.0.113.2")
    assert limiter_key("2001:db8:1:2::1") == limiter_key("2001:db8:1:2:ffff::9")
    assert limiter_key("2001:db8:1:3::1") != limiter_key("2001:db8:1:2::1")
    assert limiter_key("unknown") == "unknown"


def test_memory_stays_bounded_after_100000_distinct_addresses() -> None:
    ticks = Ticks()
    limiter = RateLimiter(rate=10, burst=50, size=10_000, clock=ticks)
    for n in range(50_000):  # a flood of 100,000 new addresses, half of them IPv6, within one instant
        limiter.retry_after(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        limiter.retry_after(f"2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::1")
    assert len(limiter) == 10_000
    # a flood does not cost a recent address its limit: the evicted are the least recently seen
    for _ in range(49):  # it has used one of its 50
        assert limiter.retry_after("2001:db8:0:c34f::1") is None
    assert limiter.retry_after("2001:db8:0:c34f::1") is not None


def test_an_address_costs_the_limiter_a_few_hundred_bytes() -> None:
    limiter = RateLimiter(rate=10, burst=50, size=100_000, clock=Ticks())
    addresses = [f"10.0.{n >> 8}.{n & 255}" for n in range(5000)]
    tracemalloc.start()
    try:
        for address in addresses:
            limiter.retry_after(address)
        size, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size / len(limiter) < 400  # so RATE_LIMIT_TABLE_SIZE=100,000 stays under 40 MB


def test_full_buckets_are_pruned_as_requests_come() -> None:
    ticks = Ticks()
    limiter = RateLimiter(rate=10, burst=50, size=100_000, clock=ticks)
    for n in range(1000):
        limiter.retry_after(f"10.0.{n >> 8}.{n & 255}")
    ticks.now += 60  # every bucket is full again
    for _ in range(600):
        limiter.retry_after("203.0.113.7")
    assert len(limiter) == 1


# -- the user agent verdict and its cache -------------------------------------------------------------


def test_the_bot_verdict_is_cached_per_user_agent_and_bounded() -> None:
    bots = BotDetector(cache_size=3)
    for _ in range(3):
        assert bots.reason(BROWSER_UA) is None
        assert bots.reason("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)") == "bot"
    assert bots.misses == 2
    for n in range(10):
        bots.reason(f"{BROWSER_UA} Extra/{n}")
    assert bots.cached == 3


@pytest.mark.parametrize(
    "agent",
    [
        BROWSER_UA,
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/18.1 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 "
        "Mobile Safari/537.36",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
        "Safari/537.36 Edg/131.0.0.0",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Mobile/15E148 Instagram 300.0.0.0",
    ],
)
def test_browsers_are_people(agent: str) -> None:
    assert BotDetector().reason(agent) is None


async def test_a_headless_chromium_is_dropped(start_collector: Start, browser: Browser, data_dir: Path) -> None:
    """Debian's Chromium, headless and saying so in its user agent, loading the test page."""
    client = await start_collector()
    context = await browser.new_context()  # no user agent override, unlike the other page tests
    page = await context.new_page()
    async with page.expect_response("**/api/pageview") as answer:
        await page.goto(str(client.make_url("/test.html")))
    response = await answer.value
    assert response.status == 204
    assert await response.header_value("x-collector-dropped") == "headless"
    await context.close()
    await drained(client)
    assert [row[2:] for row in await drop_counts(client, data_dir)] == [("headless", 1)]


async def test_api_stats_reports_the_drops_of_the_period(start_collector: Start, data_dir: Path) -> None:
    clock = FakeClock(utc(2025, 6, 3, 12))
    client = await start_collector(clock=clock, ALLOWED_DOMAINS="example.com,other.example")
    assert (await post(client, **{"User-Agent": "curl/8.5.0"})).status == 204  # 3 June: outside "today"
    clock.now = utc(2025, 6, 4, 12)
    for headers in ({"User-Agent": "curl/8.5.0"}, {"User-Agent": "curl/8.5.0"}, {"Sec-GPC": "1"},
                    {"Sec-Purpose": "prefetch"}):
        assert (await post(client, **headers)).status == 204
    assert (await post(client, {**BODY, "domain": "other.example"}, **{"Sec-GPC": "1"})).status == 204
    assert (await post(client, {**BODY, "domain": "evil.test"})).status == 204
    assert (await post(client)).status == 204  # counted
    await drained(client)
    await client.app[DROPS].flush()

    today = await (await client.get("/api/stats", params={"domain": "example.com", "period": "today"})).json()
    assert today["dropped"] == {
        "total": 4,
        "by_reason": {"bot": 2, "headless": 0, "empty-user-agent": 0, "prefetch": 1, "gpc": 1, "dnt": 0},
        "domain_not_allowed": 1,
        "site_limit": 0,
    }
    week = await (await client.get("/api/stats", params={"domain": "example.com", "period": "7d"})).json()
    assert week["dropped"]["total"] == 5 and week["dropped"]["by_reason"]["bot"] == 3
    assert week["totals"]["pageviews"]["value"] == 1
    other = await (await client.get("/api/stats", params={"domain": "other.example", "period": "today"})).json()
    assert other["dropped"]["total"] == 1 and other["dropped"]["by_reason"]["gpc"] == 1


async def test_drop_counts_are_written_at_shutdown(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 12)))
    assert (await post(client, **{"Sec-GPC": "1"})).status == 204
    await client.close()  # no flush asked for: the shutdown writes what is pending
    assert query(data_dir, "SELECT domain, day, reason, count FROM dropped_pageviews") == [
        ("example.com", "2025-06-04", "gpc", 1)]


def test_stats_knows_every_drop_reason() -> None:
    assert set(stats.DROP_REASONS) == set(DropReason) - UNNAMED_REASONS
    assert UNNAMED_REASONS == {DropReason.DOMAIN_NOT_ALLOWED, DropReason.SITE_LIMIT}
