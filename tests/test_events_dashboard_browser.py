"""The dashboard's Events panel in a real headless Chromium, over test_event_stats's hand-worked
fixture: the panel shows what /api/stats answers (events, visitors, conversion rate), a click on
an event shows its properties, a new period asks again, it fits 375 px, and a site without
events says so. Screenshots, desktop and 375 px, with and without events, are kept under the
test's tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from browser import PageErrors, browser, css_string, new_page, wait_body  # noqa: F401  (browser is a fixture)
from conftest import Start
from helpers import Client, FakeClock
from playwright.async_api import Browser, BrowserContext, Page
from test_event_stats import FIXTURE, NOW, deliver, view

TOKEN = "dashboard-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUIET = [view(NOW.replace(hour=9), "quinn", "/", domain="quiet.example")]  # a site with page views only


async def stats(client: Any, **params: str) -> dict[str, Any]:
    response = await client.get("/api/stats", params={"domain": "example.com", **params}, headers=AUTH)
    body: dict[str, Any] = await response.json()
    return body


async def wait_loaded(page: Page, domain: str, period: str) -> None:
    await wait_body(page, "loaded", "^=", f"{domain}|{period}|")


async def wait_event(page: Page, period: str, name: str) -> None:
    """The event's properties shown for the period: data-event is domain|period|from|to|name."""
    await page.locator(f"body[data-event*={css_string(f'|{period}|')}][data-event$={css_string(f'|{name}')}]"
                       ).wait_for(state="attached")


def rate(value: float | None) -> str:
    return "—" if value is None else f"{value:g}%"


async def shown_events(page: Page) -> list[list[str]]:
    return [row.split("\t") for row in await page.locator("#events tbody tr").all_inner_texts()]


def expected_events(body: dict[str, Any]) -> list[list[str]]:
    return [[e["name"], f"{e['visitors']:,}", f"{e['count']:,}", rate(e["conversion_rate"])] for e in body["events"]]


async def shown_properties(page: Page) -> list[tuple[str, list[list[str]]]]:
    found = []
    for table in await page.locator("#event-properties table").all():
        caption = await table.locator("caption").inner_text()
        found.append((caption, [row.split("\t") for row in await table.locator("tbody tr").all_inner_texts()]))
    return found


def expected_properties(event: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    return [
        (f"{p['name']} ({p['count']} {'event' if p['count'] == 1 else 'events'})",
         [[v["value"], str(v["count"]), f"{round(100 * v['count'] / event['count'], 1):g}%"] for v in p["values"]])
        for p in event["properties"]
    ]


async def open_dashboard(start_collector: Start, data_dir: Path, browser: Browser  # noqa: F811
                         ) -> tuple[Client, PageErrors, BrowserContext, Page]:
    """The fixture's collector, and its dashboard at desktop width with the token, loaded."""
    await deliver(data_dir, FIXTURE + QUIET)
    client = await start_collector(clock=FakeClock(NOW), STATS_TOKEN=TOKEN)
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 900})
    await context.add_init_script(f"localStorage.setItem('statsToken', '{TOKEN}')")
    await page.goto(str(client.make_url("/dashboard")))
    await wait_loaded(page, "example.com", "30d")
    return client, errors, context, page


async def test_the_events_panel_shows_the_api_s_events_and_a_click_shows_the_properties(
    start_collector: Start, data_dir: Path, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    client, errors, context, page = await open_dashboard(start_collector, data_dir, browser)
    month = await stats(client, period="30d")
    assert await shown_events(page) == expected_events(month)
    assert await shown_events(page) == [["Signup", "3", "4", "75%"], ["Outbound Link: Click", "1", "2", "25%"],
                                        ["File Download", "1", "1", "25%"]]
    assert await page.locator("#event-detail").is_hidden()
    await page.screenshot(path=tmp_path / "events-desktop.png", full_page=True)

    await page.get_by_role("button", name="Signup").click()
    await wait_event(page, "30d", "Signup")
    signup = (await stats(client, period="30d", event="Signup"))["event"]
    assert await page.locator("#event-detail-title").inner_text() == "Signup"
    assert await page.locator("#event-summary").inner_text() == "4 events by 3 visitors, conversion rate 75%"
    assert await shown_properties(page) == expected_properties(signup)
    assert (await shown_properties(page))[0] == ("plan (4 events)", [["pro", "3", "75%"], ["free", "1", "25%"]])
    assert await page.get_by_role("button", name="Signup").get_attribute("aria-expanded") == "true"
    await page.screenshot(path=tmp_path / "events-properties-desktop.png", full_page=True)

    # Another period: the open event is asked for again, for that period.
    await page.get_by_label("Period").select_option("today")
    await wait_loaded(page, "example.com", "today")
    await wait_event(page, "today", "Signup")
    today = await stats(client, period="today", event="Signup")
    assert await shown_events(page) == expected_events(today)
    assert await shown_properties(page) == expected_properties(today["event"])

    await page.set_viewport_size({"width": 375, "height": 800})
    await page.get_by_role("button", name="Outbound Link: Click").click()
    await wait_event(page, "today", "Outbound Link: Click")
    assert await shown_properties(page) == [("url (2 events)", [["https://elsewhere.example/", "2", "100%"]])]
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=tmp_path / "events-properties-375.png", full_page=True)

    await page.get_by_role("button", name="Close").click()
    assert await page.locator("#event-detail").is_hidden()
    assert await page.get_by_role("button", name="Outbound Link: Click").get_attribute("aria-expanded") == "false"
    assert await page.locator("#alert").is_hidden()  # no request or drawing failed
    await context.close()
    assert errors.messages == []


async def test_a_site_without_events_says_so(
    start_collector: Start, data_dir: Path, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    client, errors, context, page = await open_dashboard(start_collector, data_dir, browser)
    await page.get_by_role("button", name="File Download").click()
    await wait_event(page, "30d", "File Download")

    await page.get_by_label("Site").select_option("quiet.example")
    await wait_loaded(page, "quiet.example", "30d")
    assert await shown_events(page) == [["No custom events in this period"]]
    assert await page.locator("#event-detail").is_hidden()  # the open event is not this site's
    assert await page.locator(".events-hint").is_hidden()
    await page.screenshot(path=tmp_path / "events-empty-desktop.png", full_page=True)
    await page.set_viewport_size({"width": 375, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=tmp_path / "events-empty-375.png", full_page=True)
    assert await page.locator("#alert").is_hidden()  # no request or drawing failed
    await context.close()
    assert errors.messages == []


async def test_an_event_filters_the_dashboard_to_the_visitors_who_did_it(
    start_collector: Start, data_dir: Path, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    client, errors, context, page = await open_dashboard(start_collector, data_dir, browser)
    await page.get_by_role("button", name="Signup").click()
    await wait_event(page, "30d", "Signup")
    await page.get_by_role("button", name="Only visitors with it").click()
    await page.locator(f"body[data-filters={css_string('event:Signup')}]").wait_for(state="attached")
    assert await page.locator("#filters .chip").all_inner_texts() == ["Event: Signup\n×"]
    assert "filter=event%3ASignup" in page.url
    filtered = await client.get("/api/stats", params={"domain": "example.com", "period": "30d",
                                                      "filter": "event:Signup"}, headers=AUTH)
    body = await filtered.json()
    assert await shown_events(page) == expected_events(body)
    shown_views = await page.locator("[data-metric=pageviews]").text_content()
    assert shown_views == f"{body['totals']['pageviews']['value']:,}"
    assert await page.locator("#event-detail").is_hidden()

    await page.get_by_role("button", name="Signup", exact=True).click()
    await wait_event(page, "30d", "Signup")
    assert (await page.locator("#event-summary").inner_text()).endswith(
        "; properties are not broken down while filters are on")
    assert await shown_properties(page) == []
    assert await page.get_by_role("button", name="Only visitors with it").is_hidden()  # it filters already
    await page.screenshot(path=tmp_path / "event-filter-desktop.png", full_page=True)
    await page.set_viewport_size({"width": 375, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=tmp_path / "event-filter-375.png", full_page=True)
    assert await page.locator("#alert").is_hidden()
    await context.close()
    assert errors.messages == []
