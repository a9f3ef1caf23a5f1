"""From nothing to the first counted page view, in a real headless Chromium: the empty dashboard
welcomes (the snippet with this collector's address, the test page, what was dropped and why)
and turns into the dashboard by itself; the test page says when a page view was not counted
and why; the dashboard's tables and words. Screenshots are kept under the test's tmp_path."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from browser import PageErrors, browser, new_page  # noqa: F401  (browser is a fixture)
from conftest import Start
from helpers import FakeClock, drained, poll
from playwright.async_api import Browser, Page, Request
from test_dashboard_browser import wait_loaded
from test_stats import FIXTURE, NOW, TZ, seed

import filters

ROOT = Path(__file__).resolve().parent.parent
PAGEVIEW = '{"pathname": "/hello", "referrer": "", "domain": "example.com"}'
WELCOME_POLL_MS = 5000


async def send(client: Any, **headers: str) -> str | None:
    """A page view; the reason it was not counted, or None when it was."""
    answer = await client.post("/api/pageview", data=PAGEVIEW, headers={"Content-Type": "text/plain", **headers})
    assert answer.status == 204
    reason: str | None = answer.headers.get(filters.DROPPED_HEADER)
    return reason


async def dropped_total(client: Any) -> int:
    total: int = (await (await client.get("/api/dropped")).json())["total"]
    return total


async def test_an_empty_dashboard_welcomes_and_turns_into_the_dashboard_by_itself(
    start_collector: Start, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    client = await start_collector()
    origin = str(client.make_url("/")).rstrip("/")
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 800})
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=origin)
    looks: list[Request] = []
    page.on("request", lambda request: looks.append(request) if "/api/sites" in request.url else None)
    start = time.time()
    await page.clock.install(time=start)
    await page.clock.pause_at(start + 1)  # the page's timers run only when the test says so
    await page.goto(origin + "/dashboard")

    welcome = page.locator("#welcome")
    await welcome.wait_for()
    assert await page.locator("#snippet").text_content() == f'<script defer src="{origin}/script.js"></script>'
    assert await page.get_by_role("link", name="test page").get_attribute("href") == "/test.html"
    assert await page.locator("#welcome-dropped").is_hidden()  # nothing dropped yet: nothing to explain
    assert await page.locator("#main").is_hidden() and await page.get_by_role("alert").is_hidden()
    await page.get_by_role("button", name="Copy").click()
    await page.get_by_text("Copied.").wait_for()
    assert await page.evaluate("navigator.clipboard.readText()") == await page.locator("#snippet").text_content()

    # A newcomer's first tries: curl with its own user agent, and a browser that sends GPC.
    assert await send(client, **{"User-Agent": "curl/8.5.0"}) == "bot"
    assert await send(client, **{"Sec-GPC": "1"}) == "gpc"
    await poll(lambda: _equals(dropped_total(client), 2), what="the drop counts to be written")
    assert len(looks) == 1
    await page.clock.run_for(WELCOME_POLL_MS - 100)
    assert len(looks) == 1  # a sane interval: not before WELCOME_POLL_MS
    await page.clock.run_for(100)
    await page.locator("#welcome-dropped [data-reason=gpc]").wait_for()
    dropped = await page.locator("#welcome-dropped").inner_text()
    assert dropped.startswith("2 page views arrived but were not counted, and why:")
    assert "bot (1): sent by a crawler, a bot or an HTTP library such as curl; to send one by hand, give a " \
        "browser's User-Agent: curl -A 'Mozilla/5.0 ...'." in dropped
    assert "gpc (1): the browser asks not to be tracked with Global Privacy Control" in dropped
    await page.screenshot(path=tmp_path / "welcome-desktop.png", full_page=True)
    await page.set_viewport_size({"width": 375, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=tmp_path / "welcome-375.png", full_page=True)

    assert await send(client) is None  # a browser's page view: counted
    await drained(client)
    await page.clock.run_for(WELCOME_POLL_MS)
    await wait_loaded(page, "example.com", "30d")
    assert await welcome.is_hidden()
    assert await page.locator("[data-metric=pageviews]").text_content() == "1"
    assert await page.locator("#filtered").text_content() == "Not counted: 2 page views (bot 1, gpc 1)."
    today = await page.locator("#chart svg circle title").last.text_content() or ""
    assert today.endswith(": 1 page view, 1 visitor")
    await page.screenshot(path=tmp_path / "first-pageview-375.png", full_page=True)
    await context.close()
    assert errors.messages == []


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Sec-GPC": "1"}, "204 received, NOT counted: gpc: this browser asks not to be tracked with Global Privacy"),
    ({}, "204 counted"),
])
async def test_the_test_page_says_whether_a_page_view_was_counted_and_why_not(
    start_collector: Start, tmp_path: Path, browser: Browser, headers: dict[str, str], expected: str  # noqa: F811
) -> None:
    client = await start_collector()
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 375, "height": 800}, extra_http_headers=headers)
    await page.goto(str(client.make_url("/test.html")))
    await page.get_by_role("log").get_by_text(expected).wait_for()
    why = page.locator("#why")
    assert await why.is_visible() == bool(headers)
    if headers:
        assert "docs/privacy-and-filtering.md" in (await why.text_content() or "")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    name = "gpc" if headers else "counted"
    await page.screenshot(path=tmp_path / f"test-page-{name}-375.png", full_page=True)
    await page.set_viewport_size({"width": 1280, "height": 800})
    await page.screenshot(path=tmp_path / f"test-page-{name}-desktop.png", full_page=True)
    await context.close()
    assert errors.messages == []


@pytest.mark.parametrize("page_file", ["dashboard.html", "test.html"])
def test_both_pages_can_explain_every_drop_reason(page_file: str) -> None:
    html = (ROOT / "static" / page_file).read_text()
    assert [reason for reason in filters.DropReason if f'"{reason}": "' not in html] == []


async def test_tables_keep_their_own_height_and_bars_follow_the_page_views_beside_them(
    start_collector: Start, data_dir: Path, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    await seed(data_dir, FIXTURE)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ)
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 900})
    await page.goto(str(client.make_url("/dashboard")))
    await wait_loaded(page, "example.com", "30d")
    pages, sources = page.locator("#pages"), page.locator("#sources")
    assert await pages.locator("tbody tr").count() > await sources.locator("tbody tr").count()
    pages_box, sources_box = await pages.bounding_box(), await sources.bounding_box()
    assert pages_box and sources_box and pages_box["y"] == sources_box["y"]  # side by side
    assert sources_box["height"] < pages_box["height"] - 20  # not stretched to the pages table's height
    assert await page.locator("#pages thead th").all_inner_texts() == ["Page", "Views", "Visitors"]
    for table in (pages, sources):
        rows = await table_rows(page, table.locator("tbody tr"))
        most = max(views for views, _ in rows)
        for views, fraction in rows:
            assert abs(fraction - views / most) < 0.01, (views, fraction)
    await page.screenshot(path=tmp_path / "dashboard-tables-desktop.png", full_page=True)
    await context.close()
    assert errors.messages == []


async def table_rows(page: Page, rows: Any) -> list[tuple[int, float]]:
    """Each row's page views (the number beside the name) and its bar's width as a share of the cell."""
    return [
        (int(row[0].replace(",", "")), float(row[1]))
        for row in await rows.evaluate_all(
            "rows => rows.map(r => [r.cells[1].textContent, "
            "r.querySelector('.bar').getBoundingClientRect().width / r.cells[0].getBoundingClientRect().width])"
        )
    ]


async def test_one_filtered_page_view_is_one_page_view(
    start_collector: Start, data_dir: Path, browser: Browser  # noqa: F811
) -> None:
    await seed(data_dir, FIXTURE)
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE=TZ)
    assert await send(client, **{"User-Agent": "curl/8.5.0"}) == "bot"
    await poll(lambda: _equals(dropped_total(client), 1), what="the drop count to be written")
    errors = PageErrors()
    context, page = await new_page(browser, errors)
    await page.goto(str(client.make_url("/dashboard")))
    await page.get_by_label("Period").wait_for()
    await page.get_by_label("Period").select_option("today")
    await wait_loaded(page, "example.com", "today")
    assert await page.locator("#filtered").text_content() == "Not counted: 1 page view (bot 1)."
    await context.close()
    assert errors.messages == []
