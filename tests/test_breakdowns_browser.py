"""Issue 13 in a real headless Chromium: the dashboard's lists (countries with their names, browsers,
systems, devices, campaigns, entry and exit pages), filtering the whole dashboard by a click, the
filters as removable chips kept in the URL (a shared URL opens the same view; Back removes the
last filter), at desktop and 375 px width, empty and full; screenshots are kept under tmp_path.

And the "done when" of the issue: a page view from a known address (8.8.8.8, registered in the
US), a known user agent (Safari on an iPhone) and a campaign, sent by the real tracker in Chromium
over real HTTP, shows in every list it belongs to, in the API and on the dashboard, and its
campaign's filter narrows every number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from browser import PageErrors, css_string, new_page, wait_body
from conftest import Start
from helpers import Client, FakeClock, drained
from playwright.async_api import Browser, Page
from test_breakdowns import FIXTURE, NOW, assert_narrower
from test_breakdowns import stats as api
from test_stats import seed
from test_tracker_browser import PROXIED_REQUEST_HEADERS, PROXIED_RESPONSE_HEADERS, html

LISTS = ("entry_pages", "exit_pages", "countries", "browsers", "os", "devices", "utm_sources", "utm_mediums",
         "utm_campaigns")
COUNTRY_NAMES = {"DK": "Denmark", "DE": "Germany", "US": "United States", "NL": "Netherlands"}
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/17.5 Mobile/15E148 Safari/604.1")
KNOWN_ADDRESS = "8.8.8.8"  # Google Public DNS: registered in the US (docs/dimensions.md's known addresses)


def flag(code: str) -> str:
    """The dashboard draws a flag where a font colours regional indicators; this machine's
    headless Chromium has none (test_flags_are_drawn_only_where_a_font_colours_them)."""
    return ""


def shown(name: str, row: dict[str, Any]) -> str:
    """What the dashboard should print for a row's value (its `shown`, in Python)."""
    key = next(iter(row))
    value = row[key]
    if value is None:
        return "(none)" if name.startswith("utm_") else "(unknown)"
    if name == "countries":
        return f"{flag(value)} {COUNTRY_NAMES[value]}".strip()
    if name == "devices":
        return str(value).capitalize()
    return str(value)


def expected_rows(name: str, rows: list[dict[str, Any]]) -> list[list[str]]:
    if name == "entry_pages":
        return [[shown(name, r), f"{r['visitors']:,}", f"{r['visits']:,}",
                 "—" if r["bounce_rate"] is None else f"{r['bounce_rate']:g}%"] for r in rows]
    if name == "exit_pages":
        return [[shown(name, r), f"{r['visitors']:,}", f"{r['visits']:,}"] for r in rows]
    return [[shown(name, r), f"{r['visitors']:,}", f"{r['pageviews']:,}"] for r in rows]


async def table(page: Page, name: str) -> list[list[str]]:
    return [row.split("\t") for row in await page.locator(f"#{name} tbody tr").all_inner_texts()]


async def assert_lists(page: Page, stats: dict[str, Any]) -> None:
    """Every list of the answer, as the dashboard shows it; and the totals."""
    for name in LISTS:
        if stats[name]:
            assert await table(page, name) == expected_rows(name, stats[name]), name
        else:
            assert await table(page, name) == [["No page views in this period"]], name
    if stats["pages"]:
        assert [row[0] for row in await table(page, "pages")] == [p["pathname"] for p in stats["pages"]]
    for name, figure in stats["totals"].items():
        if name in ("pageviews", "visitors", "visits"):
            assert await page.locator(f"[data-metric={name}]").text_content() == f"{figure['value']:,}", name


async def wait_filters(page: Page, filters: str) -> None:
    await page.locator(f"body[data-filters={css_string(filters)}][data-loaded]").wait_for(state="attached")


async def test_the_lists_filter_the_dashboard_by_a_click_and_the_url_keeps_the_filters(
    start_collector: Start, data_dir: Path, tmp_path: Path, browser: Browser
) -> None:
    await seed(data_dir, FIXTURE, tz="UTC")
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE="UTC")
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 900})
    await page.goto(str(client.make_url("/dashboard?period=today")))
    await wait_filters(page, "")
    await assert_lists(page, await api(client))
    assert await page.locator("#filters").is_hidden()
    await page.screenshot(path=tmp_path / "lists-desktop.png", full_page=True)

    # A click on Denmark: the whole dashboard counts Danish page views only.
    await page.locator("#countries").get_by_role("button", name="Denmark").click()
    await wait_filters(page, "country:DK")
    danish = await api(client, "country:DK")
    await assert_lists(page, danish)
    assert_narrower(await api(client), danish)
    assert await page.locator("#filters .chip").all_inner_texts() == ["Country: Denmark\n×"]
    assert parse_qs(urlsplit(page.url).query) == {"site": ["example.com"], "period": ["today"],
                                                  "filter": ["country:DK"]}

    # And on the mobile devices: the filters combine, and narrow further.
    await page.locator("#devices").get_by_role("button", name="Mobile").click()
    await wait_filters(page, "country:DK|device:mobile")
    both = await api(client, "country:DK", "device:mobile")
    await assert_lists(page, both)
    assert_narrower(danish, both)
    await page.screenshot(path=tmp_path / "filtered-desktop.png", full_page=True)
    shared = page.url

    # A chip removes its filter; Back brings it back.
    await page.get_by_role("button", name="Remove filter Country: Denmark").click()
    await wait_filters(page, "device:mobile")
    await assert_lists(page, await api(client, "device:mobile"))
    await page.go_back()
    await wait_filters(page, "country:DK|device:mobile")

    # The shared URL opens the same view, at 375 px.
    phone, small = await new_page(browser, errors, viewport={"width": 375, "height": 800})
    await small.goto(shared)
    await wait_filters(small, "country:DK|device:mobile")
    await assert_lists(small, both)
    assert await small.evaluate("document.documentElement.scrollWidth") <= 375
    await small.screenshot(path=tmp_path / "filtered-375.png", full_page=True)

    # A page row and an unknown value filter too; a filter that matches nothing empties every list.
    await small.locator("#pages").get_by_role("button", name="/landing").click()
    await wait_filters(small, "country:DK|device:mobile|page:/landing")
    await small.goto(str(client.make_url("/dashboard?period=today&filter=browser:")))
    await wait_filters(small, "browser:")
    assert await small.locator("#filters .chip").all_inner_texts() == ["Browser: (unknown)\n×"]
    await assert_lists(small, await api(client, "browser:"))
    await small.goto(str(client.make_url("/dashboard?period=today&filter=country:DK&filter=country:DE")))
    await wait_filters(small, "country:DK|country:DE")
    await assert_lists(small, await api(client, "country:DK", "country:DE"))
    await small.screenshot(path=tmp_path / "empty-375.png", full_page=True)
    await page.set_viewport_size({"width": 1280, "height": 900})
    await page.goto(str(client.make_url("/dashboard?period=custom&from=2025-06-01&to=2025-06-05")))
    await wait_body(page, "loaded", "=", "example.com|custom|2025-06-01|2025-06-05")
    await assert_lists(page, await api(client, period="custom", **{"from": "2025-06-01", "to": "2025-06-05"}))
    await page.screenshot(path=tmp_path / "empty-desktop.png", full_page=True)
    await context.close()
    await phone.close()
    assert errors.messages == []
    for name in ("lists-desktop", "filtered-desktop", "filtered-375", "empty-375", "empty-desktop"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


async def test_a_tracked_page_view_shows_in_every_list_it_belongs_to_and_its_campaign_filters_everything(
    start_collector: Start, aiohttp_server: Any, site_browser: Browser, tmp_path: Path
) -> None:
    collector = await start_collector(TIMEZONE="UTC")
    # Two other visitors, from a link and without a campaign, straight to the collector over HTTP.
    for address, agent, path in (("130.225.0.1", "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 "
                                  "Firefox/133.0", "/"), ("193.0.6.139", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) "
                                                          "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
                                                          "Safari/537.36", "/pricing")):
        response = await collector.post("/api/pageview", json={"pathname": path, "referrer": "https://news.example/",
                                                               "domain": "site.test"},
                                        headers={"X-Forwarded-For": address, "User-Agent": agent})
        assert response.status == 204
    site = await aiohttp_server(site_app(collector))
    errors = PageErrors()
    context, page = await new_page(site_browser, errors, user_agent=IPHONE)
    landing = f"http://site.test:{site.port}/landing?utm_source=newsletter&utm_medium=email&utm_campaign=spring&x=1"
    async with page.expect_response(lambda r: r.url.endswith("/stats/api/pageview")) as answer:
        await page.goto(landing)
    assert (await answer.value).status == 204
    sent = json.loads((await answer.value).request.post_data or "{}")
    assert sent["utm"] == {"source": "newsletter", "medium": "email", "campaign": "spring"}
    await context.close()
    await drained(collector)

    stats = await api(collector, domain="site.test")
    belongs = {"pages": ("pathname", "/landing"), "sources": ("source", "(direct)"),
               "countries": ("country", "US"), "browsers": ("browser", "Safari"), "os": ("os", "iOS"),
               "devices": ("device", "mobile"), "utm_sources": ("utm_source", "newsletter"),
               "utm_mediums": ("utm_medium", "email"), "utm_campaigns": ("utm_campaign", "spring"),
               "entry_pages": ("pathname", "/landing"), "exit_pages": ("pathname", "/landing")}
    for name, (key, value) in belongs.items():
        assert any(row[key] == value and row["pageviews"] == 1 and row["visitors"] == 1 for row in stats[name]), name
    assert stats["totals"]["pageviews"]["value"] == 3
    spring = await api(collector, "utm_campaign:spring", domain="site.test")
    assert_narrower(stats, spring)
    assert {name: [row[key] for row in spring[name]] for name, (key, _) in belongs.items()} == {
        name: [value] for name, (key, value) in belongs.items()}
    assert (spring["totals"]["pageviews"]["value"], spring["totals"]["visits"]["value"]) == (1, 1)

    # On the dashboard: in every list, and a click on the campaign narrows everything to it.
    context, page = await new_page(site_browser, errors, viewport={"width": 1280, "height": 900})
    await page.goto(str(collector.make_url("/dashboard?site=site.test&period=today")))
    await wait_filters(page, "")
    assert await page.locator("#site").input_value() == "site.test"
    await assert_lists(page, stats)
    for name, (_, value) in belongs.items():
        texts = [row[0] for row in await table(page, name)]
        want = "United States" if name == "countries" else value.capitalize() if name == "devices" else value
        assert want in texts, (name, texts)
    await page.locator("#utm_campaigns").get_by_role("button", name="spring").click()
    await wait_filters(page, "utm_campaign:spring")
    await assert_lists(page, spring)
    assert await page.locator("[data-metric=pageviews]").text_content() == "1"
    await page.screenshot(path=tmp_path / "done-when.png", full_page=True)
    await context.close()
    assert errors.messages == []


def site_app(collector: Client) -> web.Application:
    """A site whose pages load the tracker through its own /stats/ proxy, which says the visitor
    came from KNOWN_ADDRESS (as a reverse proxy in front of the site would)."""
    page = html('<script defer src="/stats/script.js" data-api="/stats/api/pageview"></script>')

    def forward(path: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            headers = {name: request.headers[name] for name in PROXIED_REQUEST_HEADERS if name in request.headers}
            headers["X-Forwarded-For"] = KNOWN_ADDRESS
            async with collector.request(request.method, path, headers=headers, data=await request.read(),
                                         auto_decompress=False) as answer:
                kept = {name: answer.headers[name] for name in PROXIED_RESPONSE_HEADERS if name in answer.headers}
                return web.Response(status=answer.status, body=await answer.read(), headers=kept)
        return handler

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/stats/script.js", forward("/script.js"))
    app.router.add_post("/stats/api/pageview", forward("/api/pageview"))
    app.router.add_get("/{path:.*}", serve)
    return app


async def test_flags_are_drawn_only_where_a_font_colours_them(
    start_collector: Start, data_dir: Path, browser: Browser
) -> None:
    """Here no font colours regional indicators, so no flag; where one does (a page that says so
    before the dashboard's script runs), Denmark has its flag."""
    await seed(data_dir, FIXTURE, tz="UTC")
    client = await start_collector(clock=FakeClock(NOW), TIMEZONE="UTC")
    errors = PageErrors()
    context, page = await new_page(browser, errors)
    await page.goto(str(client.make_url("/dashboard?period=today")))
    await wait_filters(page, "")
    assert (await table(page, "countries"))[0][0] == "Denmark"
    # A canvas that colours every pixel stands in for a colour emoji font.
    await context.add_init_script(
        "CanvasRenderingContext2D.prototype.getImageData = function () { return { data: [255, 0, 0, 255] }; };")
    await page.reload()
    await wait_filters(page, "")
    assert (await table(page, "countries"))[0][0] == "\U0001F1E9\U0001F1F0 Denmark"
    await context.close()
    assert errors.messages == []
