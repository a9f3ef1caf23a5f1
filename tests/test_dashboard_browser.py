"""The dashboard in a real headless Chromium, over the hand-worked fixture of test_stats: it
asks for the token, shows what /api/stats answers, switches period and site, refreshes the
current visitors every 30 s, loads in at most four same-origin requests, fits 375 px, and
raises no JavaScript error. Screenshots are kept under the test's tmp_path."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from browser import PageErrors, browser, new_page, wait_body  # noqa: F401  (browser is a fixture)
from conftest import Start
from helpers import FakeClock
from playwright.async_api import Browser, Page, Request, expect
from test_stats import FIXTURE, NOW, TZ, seed

from readmodel import ReadModel
from store import DB_FILENAME, Store

TOKEN = "dashboard-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def shown(name: str, value: Any) -> str:
    """What the dashboard should print for a figure (its formatValue, in Python)."""
    if value is None:
        return "—"
    if name == "bounce_rate":
        return f"{value:g}%"
    if name == "visit_duration":
        return f"{value}s" if value < 60 else f"{value // 60}m {value % 60}s"
    if name == "views_per_visit":
        return f"{value:g}"
    return f"{value:,}"


def unexpected(errors: PageErrors, status: int) -> list[str]:
    """Errors other than Chromium's own console line for the refused fetch the test provoked."""
    return [m for m in errors.messages if f"the server responded with a status of {status}" not in m]


async def api_stats(client: Any, domain: str, period: str) -> dict[str, Any]:
    response = await client.get("/api/stats", params={"domain": domain, "period": period}, headers=AUTH)
    body: dict[str, Any] = await response.json()
    return body


async def wait_loaded(page: Page, domain: str, period: str) -> None:
    await wait_body(page, "loaded", "^=", f"{domain}|{period}|")


async def seed_drops(data_dir: Path) -> None:
    """Drop counts as the collector's DropCounter writes them."""
    store = Store(data_dir / DB_FILENAME, ZoneInfo(TZ))
    ReadModel(store)  # its migrations are applied already: a store that does not know them refuses the file
    await store.open()
    try:
        await store.add_dropped([("example.com", "2025-06-09", "bot", 1200), ("example.com", "2025-06-10", "gpc", 3),
                                 ("*", "2025-06-10", "domain-not-allowed", 7), ("*", "2025-06-10", "site-limit", 2)])
    finally:
        await store.close()


def filtered(dropped: dict[str, Any]) -> str:
    """The dashboard's "Not counted" line for the API's dropped object (its renderFiltered, in Python)."""
    text = f"Not counted: {dropped['total']:,} page view{'' if dropped['total'] == 1 else 's'}"
    reasons = [f"{reason} {count:,}" for reason, count in dropped["by_reason"].items() if count]
    if reasons:
        text += f" ({', '.join(reasons)})"
    if dropped["domain_not_allowed"]:
        text += f"; {dropped['domain_not_allowed']:,} for domains outside ALLOWED_DOMAINS (all sites)"
    if dropped["site_limit"]:
        text += f"; {dropped['site_limit']:,} for new domains beyond MAX_SITES (all sites)"
    return text + "."


async def assert_shows(page: Page, stats: dict[str, Any]) -> None:
    assert await page.locator("#filtered").text_content() == filtered(stats["dropped"])
    for name, figure in stats["totals"].items():
        assert await page.locator(f"[data-metric={name}]").text_content() == shown(name, figure["value"]), name
    pages = await page.locator("#pages tbody tr").all_inner_texts()
    assert [row.split("\t") for row in pages] == [
        [p["pathname"], f"{p['pageviews']:,}", f"{p['visitors']:,}"] for p in stats["pages"]
    ]
    sources = await page.locator("#sources tbody tr").all_inner_texts()
    assert [row.split("\t")[0] for row in sources] == [s["source"] for s in stats["sources"]]
    assert await page.locator("#current").text_content() == str(stats["current_visitors"])
    assert await page.locator("#chart svg circle").count() == len(stats["series"])


async def test_the_dashboard_asks_for_the_token_and_shows_the_api_numbers(
    start_collector: Start, data_dir: Path, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    await seed(data_dir, FIXTURE)
    await seed_drops(data_dir)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ, STATS_TOKEN=TOKEN)
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 900})
    await page.clock.install()
    await page.goto(str(client.make_url("/dashboard")))

    await page.get_by_label("Stats token").fill(TOKEN)
    await page.get_by_role("button", name="Save").click()
    await wait_loaded(page, "example.com", "30d")
    await assert_shows(page, await api_stats(client, "example.com", "30d"))
    assert await page.locator("[data-change=pageviews]").text_content() == "—"  # nothing the 30 days before
    assert await page.locator("#filtered").text_content() == (
        "Not counted: 1,203 page views (bot 1,200, gpc 3); 7 for domains outside ALLOWED_DOMAINS (all sites)"
        "; 2 for new domains beyond MAX_SITES (all sites).")

    await page.get_by_label("Period").select_option("7d")
    await wait_loaded(page, "example.com", "7d")
    await assert_shows(page, await api_stats(client, "example.com", "7d"))
    assert await page.locator("[data-change=pageviews]").text_content() == "+300%"
    assert await page.locator("[data-change=bounce_rate]").text_content() == "+27.8 pt"
    await page.screenshot(path=tmp_path / "dashboard-desktop.png", full_page=True)

    await page.get_by_label("Period").select_option("custom")  # starts from the range on screen
    await wait_loaded(page, "example.com", "custom")
    assert await page.locator("body").get_attribute("data-loaded") == "example.com|custom|2025-06-04|2025-06-10"
    await page.get_by_label("From").fill("2025-06-09")
    await wait_loaded(page, "example.com", "custom|2025-06-09")
    custom = await client.get("/api/stats", headers=AUTH, params={
        "domain": "example.com", "period": "custom", "from": "2025-06-09", "to": "2025-06-10"})
    await assert_shows(page, await custom.json())

    await page.get_by_label("Site").select_option("other.org")
    await page.get_by_label("Period").select_option("7d")
    await wait_loaded(page, "other.org", "7d")
    await assert_shows(page, await api_stats(client, "other.org", "7d"))

    await page.get_by_label("Period").select_option("today")
    await wait_loaded(page, "other.org", "today")
    await assert_shows(page, await api_stats(client, "other.org", "today"))
    async with page.expect_request(lambda r: "/api/current-visitors?domain=other.org" in r.url):
        await page.clock.run_for(30_000)

    await page.set_viewport_size({"width": 375, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=tmp_path / "dashboard-375.png", full_page=True)
    await context.close()

    assert (tmp_path / "dashboard-desktop.png").stat().st_size > 0
    assert (tmp_path / "dashboard-375.png").stat().st_size > 0
    assert unexpected(errors, 401) == []


async def test_the_dashboard_loads_in_at_most_four_same_origin_requests(
    start_collector: Start, data_dir: Path, browser: Browser  # noqa: F811
) -> None:
    await seed(data_dir, FIXTURE)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ, STATS_TOKEN=TOKEN)
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 375, "height": 800})
    origin = str(client.make_url("/")).rstrip("/")
    await context.add_init_script(f"localStorage.setItem('statsToken', '{TOKEN}')")  # a token saved earlier
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    await page.goto(str(client.make_url("/dashboard")))
    await wait_loaded(page, "example.com", "30d")
    await page.wait_for_load_state("networkidle")
    urls = [request.url for request in requests]
    assert len(urls) <= 4, urls
    assert all(url.startswith(origin + "/") for url in urls), urls
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await context.close()
    assert errors.messages == []


async def test_a_remote_reader_without_a_configured_token_sees_how_to_set_one(
    start_collector: Start, data_dir: Path, browser: Browser  # noqa: F811
) -> None:
    await seed(data_dir, FIXTURE)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ)
    errors = PageErrors()
    context, page = await new_page(browser, errors, extra_http_headers={"X-Forwarded-For": "203.0.113.9"})
    await page.goto(str(client.make_url("/dashboard")))
    await page.get_by_role("alert").wait_for()
    assert "STATS_TOKEN" in (await page.get_by_role("alert").text_content() or "")
    await context.close()
    assert unexpected(errors, 403) == []


async def test_the_site_picker_works_with_any_number_of_sites(
    start_collector: Start, data_dir: Path, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    """5,000 sites (a collector without ALLOWED_DOMAINS, flooded up to a raised MAX_SITES): the
    picker builds one page of options, and the search box finds the others."""
    await seed(data_dir, FIXTURE)
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    with conn:
        conn.executemany("INSERT INTO daily_stats VALUES (?, '2025-06-10', 1, 1, 1, 1, 0)",
                         [(f"site{n:05}.example",) for n in range(5000)])
    conn.close()
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ, STATS_TOKEN=TOKEN)
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 900})
    await context.add_init_script(f"localStorage.setItem('statsToken', '{TOKEN}')")
    await page.goto(str(client.make_url("/dashboard")))
    await wait_loaded(page, "example.com", "30d")
    assert await page.locator("#site option").count() == 101  # a page of sites and a note, not 5,002
    assert await page.locator("#site option[disabled]").text_content() == "More sites: find them above"
    await page.screenshot(path=tmp_path / "sites-desktop.png", full_page=True)

    await page.get_by_label("Find a domain").fill("site04999")
    await expect(page.locator("#site option")).to_have_count(2)
    assert await page.locator("#site option").all_inner_texts() == ["example.com", "site04999.example"]
    await page.get_by_label("Site").select_option("site04999.example")
    await wait_loaded(page, "site04999.example", "30d")
    views = (await api_stats(client, "site04999.example", "30d"))["totals"]["pageviews"]["value"]
    assert await page.locator("[data-metric=pageviews]").text_content() == shown("pageviews", views) == "1"
    assert await page.locator("#pages tbody").inner_text() == "No page views in this period"
    assert await page.locator("#alert").is_hidden()

    await page.get_by_label("Find a domain").fill("no-such-site")
    await page.locator("#site option[disabled]").wait_for(state="attached")
    assert await page.locator("#site option").all_inner_texts() == ["site04999.example", "No site matches"]
    await page.set_viewport_size({"width": 375, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=tmp_path / "sites-375.png", full_page=True)
    await context.close()
    assert errors.messages == []


async def test_with_few_sites_there_is_no_search_box(start_collector: Start, data_dir: Path, browser: Browser) -> None:  # noqa: F811
    await seed(data_dir, FIXTURE)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ, STATS_TOKEN=TOKEN)
    errors = PageErrors()
    context, page = await new_page(browser, errors)
    await context.add_init_script(f"localStorage.setItem('statsToken', '{TOKEN}')")
    await page.goto(str(client.make_url("/dashboard")))
    await wait_loaded(page, "example.com", "30d")
    assert await page.locator("#site option").all_inner_texts() == ["example.com", "other.org"]
    assert not await page.get_by_label("Find a domain").is_visible()
    await context.close()
    assert errors.messages == []
