"""Custom events in a real headless Chromium: pages from http://site.test:PORT, the collector at
http://collector.test:PORT. A tagged button, a tagged link, an outbound link and a download link
each send their event exactly once, with the right properties, into the real SQLite file, and
the link still does what it does (navigates, opens a tab, downloads); /api/stats counts them once,
with their properties; collector.event from page code; the 404 page of docs/events.md; and nothing
from opted-out browsers and local pages."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from browser import PageErrors, new_page
from conftest import Start
from helpers import drained, poll, query
from playwright.async_api import Browser, Page, Request, Response

ROOT = Path(__file__).resolve().parent.parent
CLICKS = "/script.clicks.js"
# A boolean: wait_for_function would call a function it is given as the value.
READY = "typeof window.collector == 'object' && typeof window.collector.event == 'function'"

BODY = """
<button id="signup" data-collector-event="Signup" data-collector-event-plan="pro"
  data-collector-event-Source="hero"><span id="signup-label">Sign up</span></button>
<button id="stubborn" data-collector-event="Stubborn" onclick="event.stopPropagation()">Own handler</button>
<button id="plain">Not tagged</button>
<a id="tagged" href="/welcome" data-collector-event="Pricing Link" data-collector-event-position="top">Pricing</a>
<a id="outbound" href="http://elsewhere.test:{site_port}/landing?ref=shop#top">Elsewhere</a>
<a id="download" href="/files/report.pdf?token=secret">Report</a>
<a id="archive" href="/files/backup.tar.gz">Archive</a>
<a id="internal" href="/about?x=1">About</a>
<a id="mail" href="mailto:someone@example.com">Mail</a>
"""


def html(body: str, head: str = "") -> str:
    return ('<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f"<title>A site</title>{head}</head><body>{body}</body></html>")


@dataclass
class Sent:
    """Every event any page of the context sent, as the browser put it on the wire."""

    bodies: list[dict[str, Any]] = field(default_factory=list)

    def record(self, request: Request) -> None:
        if is_event(request):
            self.bodies.append(json.loads(request.post_data or "null"))

    def names(self) -> list[str]:
        return [body["name"] for body in self.bodies]


def is_event(request: Request) -> bool:
    return request.method == "POST" and request.url.endswith("/api/event")


def answered(response: Response) -> bool:
    return is_event(response.request)


@dataclass
class Site:
    collector: TestClient[Any, Any]
    browser: Browser
    port: int
    data_dir: Path
    errors: PageErrors = field(default_factory=PageErrors)

    def url(self, path: str, host: str = "site.test") -> str:
        return f"http://{host}:{self.port}{path}"

    @asynccontextmanager
    async def page(self, **context_options: Any) -> AsyncIterator[tuple[Page, Sent]]:
        context, page = await new_page(self.browser, self.errors, **context_options)
        sent = Sent()
        context.on("request", sent.record)
        try:
            yield page, sent
        finally:
            await context.close()

    async def marker(self, page: Page) -> None:
        """An event the page sends after everything before it: once it is answered, whatever the
        page sent earlier has reached the collector, so a count afterwards is final."""
        async with page.expect_response(answered) as info:
            await page.evaluate("collector.event('marker')")
        assert (await info.value).status == 204
        await drained(self.collector)

    def logged(self, name: str) -> list[dict[str, Any]]:
        """The events of this name in the real SQLite file, outbox and event log together."""
        rows = query(self.data_dir, "SELECT payload FROM outbox WHERE event_type = 'visitor.event.v0' "
                     "UNION ALL SELECT payload FROM event_log WHERE event_type = 'visitor.event.v0'")
        return [payload for (text,) in rows if (payload := json.loads(text))["name"] == name]

    async def arrived(self, name: str) -> dict[str, Any]:
        await poll(lambda: len(self.logged(name)) >= 1, what=f"the {name!r} event arriving")
        return self.logged(name)[0]


MakeSite = Callable[..., Awaitable[Site]]


@pytest.fixture
def site(start_collector: Start, aiohttp_server: Any, site_browser: Browser, data_dir: Path) -> MakeSite:
    async def make(script: str = CLICKS, attributes: str = "data-outbound-links data-file-downloads",
                   page: str = BODY) -> Site:
        collector = await start_collector()
        origin = f"http://collector.test:{collector.port}"
        not_found = docs_404_example().replace("https://stats.example.com", origin)
        holder: dict[str, int] = {}

        async def serve(request: web.Request) -> web.Response:
            tag = f'<script defer src="{origin}{script}" {attributes}></script>'
            return web.Response(text=html(page.format(site_port=holder["port"]) + tag), content_type="text/html")

        async def serve_file(request: web.Request) -> web.Response:
            return web.Response(body=b"%PDF-1.4 not really", content_type="application/octet-stream",
                                headers={"Content-Disposition": f'attachment; filename="{request.match_info["name"]}"'})

        async def serve_404(request: web.Request) -> web.Response:
            return web.Response(status=404, text=not_found, content_type="text/html")

        async def forward(request: web.Request) -> web.Response:
            """The site's own /stats/ paths, passed to the collector as a reverse proxy would."""
            names = ("Content-Type", "User-Agent")
            headers = {name: request.headers[name] for name in names if name in request.headers}
            path = "/" + request.match_info["rest"]
            async with collector.request(request.method, path, headers=headers, data=await request.read()) as answer:
                kept = {"Content-Type": answer.headers["Content-Type"]} if "Content-Type" in answer.headers else {}
                return web.Response(status=answer.status, body=await answer.read(), headers=kept)

        app = web.Application()
        app.router.add_get("/files/{name}", serve_file)
        app.router.add_get("/missing/{path:.*}", serve_404)
        app.router.add_route("*", "/stats/{rest:.*}", forward)
        app.router.add_get("/{path:.*}", serve)
        server = await aiohttp_server(app)
        holder["port"] = server.port
        return Site(collector, site_browser, server.port, data_dir)

    return make


def docs_404_example() -> str:
    """The 404 page of docs/events.md, exactly as the docs show it."""
    docs = (ROOT / "docs" / "events.md").read_text()
    section = docs.split("## A page that was not found", 1)[1]
    [page] = re.findall(r"```html\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    return str(page)


async def open_page(page: Page, url: str) -> None:
    """Load a page and wait until the tracker is there and its page view was answered."""
    async with page.expect_response(lambda r: r.url.endswith("/api/pageview")):
        await page.goto(url)
    await page.wait_for_function(READY)


# -- tagged elements ----------------------------------------------------------------------------------------


async def test_a_tagged_button_sends_its_event_once_with_its_properties(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop?coupon=secret"))
        async with page.expect_response(answered) as info:
            await page.click("#signup-label")  # a click on the button's content counts for the button
        assert (await info.value).status == 204
        await page.click("#stubborn")  # its own handler stops the click's propagation
        await page.click("#plain")
        await s.marker(page)
        assert sent.names() == ["Signup", "Stubborn", "marker"]
    [signup] = s.logged("Signup")
    # Attribute names are lower case in HTML: data-collector-event-Source is "source".
    assert (signup["pathname"], signup["domain"], signup["props"]) == ("/shop", "site.test",
                                                                      {"plan": "pro", "source": "hero"})
    assert signup["referrer"] == ""
    assert len(s.logged("Stubborn")) == 1
    assert s.errors.messages == []


async def test_a_tagged_link_sends_its_event_and_still_navigates(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        await page.click("#tagged")
        await page.wait_for_url(s.url("/welcome"))
        assert (await s.arrived("Pricing Link"))["props"] == {"position": "top"}
        await page.wait_for_function(READY)
        await s.marker(page)
        assert sent.names() == ["Pricing Link", "marker"]
    [event] = s.logged("Pricing Link")
    assert event["pathname"] == "/shop"  # where the click was, not where it led
    assert s.errors.messages == []


# -- outbound links and downloads ------------------------------------------------------------------------------


async def test_an_outbound_link_sends_its_event_once_and_still_navigates(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        await page.click("#outbound")
        await page.wait_for_url(s.url("/landing?ref=shop#top", host="elsewhere.test"))
        event = await s.arrived("Outbound Link: Click")
        # The url without its query and fragment, as the page view's path.
        assert event["props"] == {"url": s.url("/landing", host="elsewhere.test")}
        assert (event["pathname"], event["domain"]) == ("/shop", "site.test")
        await page.wait_for_function(READY)
        await s.marker(page)
        assert sent.names() == ["Outbound Link: Click", "marker"]
    assert len(s.logged("Outbound Link: Click")) == 1
    assert s.errors.messages == []


async def test_a_download_link_sends_its_event_once_and_the_file_still_downloads(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        async with page.expect_download() as info:
            await page.click("#download")
        download = await info.value
        assert download.suggested_filename == "report.pdf"
        assert await download.failure() is None
        event = await s.arrived("File Download")
        assert event["props"] == {"url": s.url("/files/report.pdf")}
        assert event["pathname"] == "/shop"
        # The download left the page where it was: it can go on sending.
        await page.click("#internal")
        await page.wait_for_url(s.url("/about?x=1"))
        await page.wait_for_function(READY)
        await s.marker(page)
        assert sent.names() == ["File Download", "marker"]  # an internal link is neither
    assert len(s.logged("File Download")) == 1
    assert s.errors.messages == []


async def test_middle_and_ctrl_clicks_open_a_tab_and_send_once(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        async with page.context.expect_page() as opened:
            await page.click("#outbound", button="middle")
        tab = await opened.value
        await tab.wait_for_url(s.url("/landing?ref=shop#top", host="elsewhere.test"))
        async with page.context.expect_page() as opened_again:
            await page.click("#tagged", modifiers=["ControlOrMeta"])
        await (await opened_again.value).wait_for_url(s.url("/welcome"))
        assert page.url == s.url("/shop")  # the page itself stayed
        await page.click("#signup", button="right")  # a context menu, not a click: nothing
        await s.marker(page)
        assert sorted(sent.names()) == ["Outbound Link: Click", "Pricing Link", "marker"]
    assert len(s.logged("Outbound Link: Click")) == 1
    assert len(s.logged("Pricing Link")) == 1
    assert s.errors.messages == []


async def test_data_file_downloads_names_its_own_types(site: MakeSite) -> None:
    s = await site(attributes='data-file-downloads="zip, tar.gz"')
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        async with page.expect_download():
            await page.click("#download")  # .pdf: not in this list
        async with page.expect_download():
            await page.click("#archive")
        assert (await s.arrived("File Download"))["props"] == {"url": s.url("/files/backup.tar.gz")}
        await page.click("#outbound")  # no data-outbound-links: nothing
        await page.wait_for_url(s.url("/landing?ref=shop#top", host="elsewhere.test"))
        await page.wait_for_function(READY)
        await s.marker(page)
        assert sent.names() == ["File Download", "marker"]
    assert s.errors.messages == []


async def test_without_the_attributes_only_tagged_elements_count(site: MakeSite) -> None:
    s = await site(attributes="")
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        async with page.expect_download():
            await page.click("#download")
        await page.click("#mail")
        async with page.expect_response(answered):
            await page.click("#signup")
        await page.click("#outbound")
        await page.wait_for_url(s.url("/landing?ref=shop#top", host="elsewhere.test"))
        await page.wait_for_function(READY)
        await s.marker(page)
        assert sent.names() == ["Signup", "marker"]
    assert s.errors.messages == []


async def test_the_base_script_has_the_api_and_no_click_tracking(site: MakeSite) -> None:
    s = await site(script="/script.js")
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        await page.click("#signup")
        async with page.expect_response(answered) as info:
            await page.evaluate("collector.event('Signup', {plan: 'pro', seats: 3, annual: true, price: 9.5})")
        assert (await info.value).status == 204
        await s.marker(page)
        assert sent.bodies[0] == {"name": "Signup", "pathname": "/shop", "domain": "site.test",
                                  "props": {"plan": "pro", "seats": 3, "annual": True, "price": 9.5}}
        assert sent.names() == ["Signup", "marker"]
    assert [event["props"] for event in s.logged("Signup")] == [{"plan": "pro", "seats": 3, "annual": True,
                                                                  "price": 9.5}]
    assert s.errors.messages == []


# -- in the statistics ---------------------------------------------------------------------------------------------


async def test_clicks_arrive_once_and_the_statistics_break_them_down(site: MakeSite) -> None:
    """A tagged button, an outbound link and a download link, clicked in the browser: each event
    is counted once in /api/stats, with its visitor and its properties."""
    s = await site()
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        async with page.expect_response(answered):
            await page.click("#signup")
        await page.click("#outbound")
        await page.wait_for_url(s.url("/landing?ref=shop#top", host="elsewhere.test"))
        await s.arrived("Outbound Link: Click")
        await open_page(page, s.url("/shop"))
        async with page.expect_download():
            await page.click("#download")
        await s.marker(page)
        assert sent.names() == ["Signup", "Outbound Link: Click", "File Download", "marker"]
    expected = {
        "Signup": [{"name": "plan", "count": 1, "values": [{"value": "pro", "count": 1}]},
                   {"name": "source", "count": 1, "values": [{"value": "hero", "count": 1}]}],
        "Outbound Link: Click": [{"name": "url", "count": 1, "values": [
            {"value": s.url("/landing", host="elsewhere.test"), "count": 1}]}],
        "File Download": [{"name": "url", "count": 1, "values": [{"value": s.url("/files/report.pdf"), "count": 1}]}],
    }
    for name, properties in expected.items():
        # 7 days: whichever side of midnight the clicks fell, they are in it.
        response = await s.collector.get("/api/stats", params={"domain": "site.test", "period": "7d", "event": name})
        body = await response.json()
        assert body["totals"]["visitors"]["value"] == 1  # one browser: one visitor, of the page views too
        assert {e["name"]: (e["count"], e["visitors"], e["conversion_rate"]) for e in body["events"]} == {
            "Signup": (1, 1, 100.0), "Outbound Link: Click": (1, 1, 100.0), "File Download": (1, 1, 100.0),
            "marker": (1, 1, 100.0)}
        assert (body["event"]["count"], body["event"]["properties"]) == (1, properties), name
    assert s.errors.messages == []


# -- collector.event from page code ------------------------------------------------------------------------------


async def test_the_404_page_example_of_the_docs_sends_its_event(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        async with page.expect_response(answered) as info:
            response = await page.goto(s.url("/missing/old-post?id=7"))
        assert response is not None and response.status == 404
        assert (await info.value).status == 204
        await s.marker(page)
        assert sent.names() == ["404", "marker"]
    [event] = s.logged("404")
    assert (event["pathname"], event["props"]) == ("/missing/old-post", {})
    # Chromium reports the page's own 404 status on the console; nothing else may be there.
    assert s.errors.messages == ["console.error: Failed to load resource: the server responded with a status of "
                                 "404 (Not Found)"]


async def test_events_follow_data_api_to_the_site_s_own_paths(site: MakeSite) -> None:
    s = await site(script="/script.js", attributes='data-api="/stats/api/pageview"')
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        async with page.expect_response(answered) as info:
            await page.evaluate("collector.event('Proxied')")
        response = await info.value
        assert (response.url, response.status) == (s.url("/stats/api/event"), 204)
    await drained(s.collector)
    assert len(s.logged("Proxied")) == 1
    assert s.errors.messages == []


async def test_a_bad_event_from_page_code_raises_nothing_in_the_page(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await open_page(page, s.url("/shop"))
        cyclic = "var o = {}; o.o = o; collector.event('Cyclic', o)"
        assert await page.evaluate(f"(() => {{ {cyclic}; return 'still here'; }})()") == "still here"
        async with page.expect_response(answered) as info:
            await page.evaluate("collector.event('', {nested: {no: 1}})")
        assert (await info.value).status == 400  # refused by the collector, silently for the page
        await s.marker(page)
        assert sent.names() == ["", "marker"]
    # Chromium notes the 400 on the console as it does any failed request; no exception reached the page.
    assert s.errors.messages == ["console.error: Failed to load resource: the server responded with a status of "
                                 "400 (Bad Request)"]


# -- what is never sent ------------------------------------------------------------------------------------------


async def test_an_opted_out_browser_sends_no_events(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await page.add_init_script("localStorage.setItem('collector_ignore', 'true')")
        await page.goto(s.url("/shop"))
        await page.wait_for_function(READY)
        await page.click("#signup")
        await page.evaluate("collector.event('Manual')")
        async with page.expect_download():
            await page.click("#download")
        await page.click("#outbound")
        await page.wait_for_url(s.url("/landing?ref=shop#top", host="elsewhere.test"))
        await page.wait_for_function(READY)
        await page.evaluate("localStorage.removeItem('collector_ignore')")  # opted in again: sends again
        await s.marker(page)
        assert sent.names() == ["marker"]
    assert s.errors.messages == []


async def test_a_local_page_sends_no_events(site: MakeSite) -> None:
    s = await site()
    async with s.page() as (page, sent):
        await page.goto(s.url("/shop", host="localhost"))
        await page.wait_for_function(READY)
        await page.click("#signup")
        await page.evaluate("collector.event('Manual')")
        async with page.expect_download():
            await page.click("#download")
        await page.click("#tagged")
        await page.wait_for_url(s.url("/welcome", host="localhost"))
        await page.wait_for_function(READY)
        # Only a request the page makes itself reaches the collector from here.
        api = f"http://collector.test:{s.collector.port}/api/event"
        async with page.expect_response(answered):
            await page.evaluate(f"fetch('{api}', {{method: 'POST', body: JSON.stringify("
                                "{name: 'marker', pathname: '/', domain: 'localhost'})})")
        assert sent.names() == ["marker"]
    await drained(s.collector)
    assert s.logged("Signup") == [] and s.logged("Manual") == [] and s.logged("File Download") == []
    assert s.errors.messages == []


# -- the collector's own test page ----------------------------------------------------------------------------------


async def test_the_test_page_event_buttons_send_events(
    start_collector: Start, site_browser: Browser, data_dir: Path
) -> None:
    client = await start_collector()
    errors = PageErrors()
    context, page = await new_page(site_browser, errors)
    async with page.expect_response(lambda r: r.url.endswith("/api/pageview")):
        await page.goto(str(client.make_url("/test.html")))
    for button in ("A tagged button (data-collector-event)", 'collector.event("Test Event", {plan: "pro"})'):
        async with page.expect_response(answered):
            await page.get_by_role("button", name=button).click()
    # Polled from here: the page's Content-Security-Policy forbids the eval that wait_for_function polls with.
    recorded = "document.getElementById('console').textContent.split('204 counted').length - 1"
    await poll(lambda: page.evaluate(f"{recorded} == 3"), what="three answers in the page's console")
    assert '"name":"Test Event"' in (await page.text_content("#console") or "")
    await context.close()
    await drained(client)
    rows = query(data_dir, "SELECT payload FROM event_log WHERE event_type = 'visitor.event.v0' ORDER BY seq")
    assert [(event["name"], event["pathname"], event["props"]) for event in (json.loads(row[0]) for row in rows)] == [
        ("Test Click", "/test.html", {"source": "test page"}),
        ("Test Event", "/test.html", {"plan": "pro"}),
    ]
    assert errors.messages == []
