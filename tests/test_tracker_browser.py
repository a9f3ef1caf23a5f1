"""The tracker in a real headless Chromium: pages come from http://site.test:PORT, the collector
is http://collector.test:PORT, so every page view is a real cross-origin request; each one is
followed into the read model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from browser import PageErrors, new_page
from conftest import Start
from helpers import SECRET, Client, drained, query
from playwright.async_api import Browser, Page, Request, Response

import privacy

NEWS = "https://news.example/"


def html(script_tag: str) -> str:
    return (
        '<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>A site</title></head><body><p>A page of the site.</p>{script_tag}</body></html>"
    )


# A page as docs/tracker.md's reverse-proxy section has it: script and API under the site's own /stats/.
FIRST_PARTY_PAGE = html('<script defer src="/stats/script.js" data-api="/stats/api/pageview"></script>')


@dataclass
class Setup:
    """A collector, a site, and a browser for them. Every path of the site serves one page that
    loads the script from the collector's origin, except /first-party/*, which loads it through
    the site's own /stats/ proxy."""

    collector: Client
    browser: Browser
    site_port: int
    errors: PageErrors = field(default_factory=PageErrors)

    @property
    def collector_origin(self) -> str:
        return f"http://collector.test:{self.collector.port}"

    def site(self, path: str, host: str = "site.test") -> str:
        return f"http://{host}:{self.site_port}{path}"

    @asynccontextmanager
    async def page(self, **context_options: Any) -> AsyncIterator[tuple[Page, Sent]]:
        context, page = await new_page(self.browser, self.errors, **context_options)
        sent = Sent()
        page.on("request", sent.record)
        try:
            yield page, sent
        finally:
            await context.close()


@dataclass
class Sent:
    """Every page view the page sent, in order, as the browser put it on the wire."""

    bodies: list[dict[str, Any]] = field(default_factory=list)

    def record(self, request: Request) -> None:
        if is_pageview(request):
            self.bodies.append(json.loads(request.post_data or "null"))


def is_pageview(request: Request) -> bool:
    return request.method == "POST" and request.url.endswith("/api/pageview")


def answered(response: Response) -> bool:
    return is_pageview(response.request)


MakeSetup = Callable[[str], Awaitable[Setup]]


@pytest.fixture
def setup(start_collector: Start, aiohttp_server: Any, site_browser: Browser) -> MakeSetup:
    async def make(script_attributes: str) -> Setup:
        collector = await start_collector()
        src = f"http://collector.test:{collector.port}/script.js"
        attributes = script_attributes.replace("{port}", str(collector.port))
        page = html(f'<script defer src="{src}" {attributes}></script>')

        async def serve(request: web.Request) -> web.Response:
            return web.Response(text=page, content_type="text/html")

        async def serve_first_party(request: web.Request) -> web.Response:
            return web.Response(text=FIRST_PARTY_PAGE, content_type="text/html")

        app = web.Application()
        app.router.add_get("/first-party/{path:.*}", serve_first_party)
        app.router.add_get("/stats/script.js", proxy_to(collector, "/script.js"))
        app.router.add_post("/stats/api/pageview", proxy_to(collector, "/api/pageview"))
        app.router.add_get("/{path:.*}", serve)
        site = await aiohttp_server(app)
        return Setup(collector, site_browser, site.port)

    return make


# The address a reverse proxy in front of the site would put in X-Forwarded-For.
VISITOR_ADDRESS = "203.0.113.9"
PROXIED_REQUEST_HEADERS = ("Accept-Encoding", "Content-Type", "If-None-Match", "User-Agent")
PROXIED_RESPONSE_HEADERS = ("Cache-Control", "Content-Encoding", "Content-Type", "ETag")


def proxy_to(collector: Client, path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """What docs/tracker.md's nginx or Caddy lines do: forward to the collector, say who asked."""

    async def forward(request: web.Request) -> web.Response:
        headers = {name: request.headers[name] for name in PROXIED_REQUEST_HEADERS if name in request.headers}
        headers["X-Forwarded-For"] = VISITOR_ADDRESS
        body = await request.read()
        async with collector.request(request.method, path, headers=headers, data=body, auto_decompress=False) as answer:
            kept = {name: answer.headers[name] for name in PROXIED_RESPONSE_HEADERS if name in answer.headers}
            return web.Response(status=answer.status, body=await answer.read(), headers=kept)

    return forward


async def view(page: Page, action: str) -> dict[str, Any]:
    """Run `action` in the page and wait until the page view it sends has been answered 204."""
    async with page.expect_response(answered) as info:
        await page.evaluate(action)
    response = await info.value
    assert response.status == 204
    sent: dict[str, Any] = json.loads(response.request.post_data or "null")
    return sent


def pageview_rows(data_dir: Path) -> list[tuple[str, str, str]]:
    return [tuple(row) for row in query(data_dir, "SELECT domain, pathname, referrer FROM pageviews ORDER BY id")]


def daily_pageviews(data_dir: Path) -> int:
    return sum(row[0] for row in query(data_dir, "SELECT pageviews FROM daily_stats"))


MARKER = (
    "fetch('{api}', {{method: 'POST', "
    "body: JSON.stringify({{pathname: '/marker', referrer: '', domain: '{domain}'}})}})"
)


async def send_marker(page: Page, setup: Setup, domain: str) -> None:
    """A page view the page itself sends after everything before it: once it is answered, any
    page view the tracker had sent earlier has been seen by the browser and the collector."""
    async with page.expect_response(answered) as info:
        await page.evaluate(MARKER.format(api=setup.collector_origin + "/api/pageview", domain=domain))
    assert (await info.value).status == 204


# -- what a visit sends --------------------------------------------------------------------------------------


async def test_load_push_state_and_back_each_send_one_view(setup: MakeSetup, data_dir: Path) -> None:
    s = await setup("")
    landing, pricing = s.site("/landing.html"), s.site("/pricing")
    async with s.page() as (page, sent):
        async with page.expect_response(answered) as info:
            await page.goto(landing + "?utm_source=news#top", referer=NEWS)
        response = await info.value
        assert response.status == 204
        assert response.headers["access-control-allow-origin"] == s.site("")
        assert sent.bodies == [
            {"pathname": "/landing.html", "referrer": NEWS, "domain": "site.test", "utm": {"source": "news"}}
        ]
        await drained(s.collector)
        assert daily_pageviews(data_dir) == 1

        second = await view(page, "history.pushState({}, '', '/pricing?plan=pro')")
        assert second == {"pathname": "/pricing", "referrer": landing, "domain": "site.test"}
        await drained(s.collector)
        assert daily_pageviews(data_dir) == 2

        third = await view(page, "history.back()")  # the landing page's URL again, with its campaign
        assert third == {"pathname": "/landing.html", "referrer": pricing, "domain": "site.test",
                         "utm": {"source": "news"}}
        await drained(s.collector)
        assert daily_pageviews(data_dir) == 3

        # The same path with another query or fragment is not a new page: nothing is sent.
        await page.evaluate("history.replaceState({}, '', '/landing.html?tab=2')")
        await page.evaluate("history.pushState({}, '', '/landing.html#comments')")
        await send_marker(page, s, "site.test")
        assert len(sent.bodies) == 4 and sent.bodies[3]["pathname"] == "/marker"

        # The page keeps no trace: no cookie, nothing in storage.
        assert await page.evaluate("[document.cookie, localStorage.length, sessionStorage.length]") == ["", 0, 0]
        assert await page.context.cookies() == []

    await drained(s.collector)
    assert pageview_rows(data_dir) == [
        ("site.test", "/landing.html", NEWS),
        ("site.test", "/pricing", landing),
        ("site.test", "/landing.html", pricing),
        ("site.test", "/marker", ""),
    ]
    pages = query(data_dir, "SELECT pathname, pageviews FROM page_stats ORDER BY pathname")
    assert pages == [("/landing.html", 2), ("/marker", 1), ("/pricing", 1)]
    assert query(data_dir, "SELECT source, pageviews FROM source_stats WHERE source = 'news.example'") == [
        ("news.example", 1)
    ]
    assert s.errors.messages == []


async def test_replace_state_to_a_new_path_sends_a_view(setup: MakeSetup) -> None:
    s = await setup("")
    async with s.page() as (page, sent):
        async with page.expect_response(answered):
            await page.goto(s.site("/"))
        moved = await view(page, "history.replaceState(null, '', '/welcome')")
        assert moved == {"pathname": "/welcome", "referrer": s.site("/"), "domain": "site.test"}
    assert s.errors.messages == []


async def test_the_manual_api_and_the_original_name(setup: MakeSetup, data_dir: Path) -> None:
    s = await setup("")
    async with s.page() as (page, sent):
        async with page.expect_response(answered):
            await page.goto(s.site("/app"))
        assert await view(page, "collector.pageview()") == {
            "pathname": "/app",
            "referrer": s.site("/app"),
            "domain": "site.test",
        }
        assert await view(page, "collector.pageview('/checkout/done', 'https://shop.example/cart')") == {
            "pathname": "/checkout/done",
            "referrer": "https://shop.example/cart",
            "domain": "site.test",
        }
        assert await view(page, "trackPageview('/legacy')") == {
            "pathname": "/legacy",
            "referrer": s.site("/app"),
            "domain": "site.test",
        }
        assert await page.evaluate("window.trackPageview === window.collector.pageview")
    await drained(s.collector)
    assert [row[1] for row in pageview_rows(data_dir)] == ["/app", "/app", "/checkout/done", "/legacy"]
    assert s.errors.messages == []


async def test_data_domain_and_data_api(setup: MakeSetup, data_dir: Path) -> None:
    # data-api pointing at the collector under another name: the attribute, not the script's origin, decides.
    s = await setup('data-domain="example.com" data-api="http://api.collector.test:{port}/api/pageview"')
    async with s.page() as (page, sent):
        async with page.expect_response(answered) as info:
            await page.goto(s.site("/"))
        response = await info.value
    assert response.url == f"http://api.collector.test:{s.collector.port}/api/pageview"
    assert sent.bodies == [{"pathname": "/", "referrer": "", "domain": "example.com"}]
    await drained(s.collector)
    assert pageview_rows(data_dir) == [("example.com", "/", "")]
    assert s.errors.messages == []


async def test_first_party_paths_behind_a_reverse_proxy(setup: MakeSetup, data_dir: Path) -> None:
    s = await setup("")
    async with s.page() as (page, sent):
        async with page.expect_response(answered) as info:
            await page.goto(s.site("/first-party/shop"))
        response = await info.value
        agent = await page.evaluate("navigator.userAgent")
    assert response.url == s.site("/stats/api/pageview")
    assert response.status == 204
    assert sent.bodies == [{"pathname": "/first-party/shop", "referrer": "", "domain": "site.test"}]
    await drained(s.collector)
    [(text,)] = query(data_dir, "SELECT payload FROM event_log")
    payload = json.loads(text)
    # The proxy is on loopback, in the default TRUSTED_PROXIES, so its X-Forwarded-For is believed.
    day = payload["sessionContext"]["dailySaltRotation"]
    assert payload["visitorHash"] == privacy.visitor_hash(VISITOR_ADDRESS, agent, day, SECRET)
    assert s.errors.messages == []


# -- campaigns ----------------------------------------------------------------------------------------------

SECRETS_IN_THE_QUERY = {"token": "tok-5f1e9c", "email": "someone%40mail.example", "gclid": "gclid-77aa", "q": "private"}


def query_string(**parameters: str) -> str:
    return "?" + "&".join(f"{name}={value}" for name, value in parameters.items())


@pytest.mark.parametrize(
    ("parameters", "utm"),
    [
        pytest.param(
            {"utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "spring+sale",
             "utm_term": "running%20shoes", "utm_content": "hero-%C3%A6%C3%B8%C3%A5"},
            {"source": "newsletter", "medium": "email", "campaign": "spring sale", "term": "running shoes",
             "content": "hero-æøå"},
            id="all-five",
        ),
        pytest.param({"ref": "producthunt"}, {"source": "producthunt"}, id="ref-alias"),
        pytest.param({"source": "mastodon", "utm_medium": "social"}, {"source": "mastodon", "medium": "social"},
                     id="source-alias"),
        pytest.param({"ref": "a", "utm_source": "b", "source": "c"}, {"source": "b"}, id="utm-source-wins"),
        pytest.param({"ref": "a", "source": "c"}, {"source": "a"}, id="ref-before-source"),
        pytest.param({"utm_source": "", "utm_campaign": "x"}, {"campaign": "x"}, id="empty-values-left-out"),
        pytest.param({}, None, id="none"),
    ],
)
async def test_the_campaign_parameters_and_nothing_else_of_the_query_leave_the_page(
    setup: MakeSetup, data_dir: Path, parameters: dict[str, str], utm: dict[str, str] | None
) -> None:
    s = await setup("")
    requests: list[Request] = []
    async with s.page() as (page, sent):
        page.on("request", lambda request: requests.append(request) if is_pageview(request) else None)
        async with page.expect_response(answered) as info:
            await page.goto(s.site("/offer") + query_string(**SECRETS_IN_THE_QUERY, **parameters) + "#frag-3c1")
        assert (await info.value).status == 204
        [request] = requests
        on_the_wire = request.url + json.dumps(await request.all_headers()) + (request.post_data or "")
    expected = {"pathname": "/offer", "referrer": "", "domain": "site.test"} | ({"utm": utm} if utm else {})
    assert sent.bodies == [expected]
    for secret in (*SECRETS_IN_THE_QUERY.values(), "someone", "frag-3c1", "token", "gclid"):
        assert secret not in on_the_wire, f"{secret!r} left the page"
    await drained(s.collector)
    [(text,)] = query(data_dir, "SELECT payload FROM event_log")
    assert json.loads(text)["utm"] == (utm or {})
    assert s.errors.messages == []


async def test_long_campaign_values_are_cut_to_what_the_collector_takes(setup: MakeSetup, data_dir: Path) -> None:
    s = await setup("")
    # 255 letters and an emoji (two UTF-16 units): cutting at 256 units would split it, so it goes whole or not
    long_value = "a" * 255 + "%F0%9F%98%80" + "b" * 50
    async with s.page() as (page, sent):
        async with page.expect_response(answered) as info:
            await page.goto(s.site("/") + query_string(utm_campaign=long_value, utm_term="c" * 300))
        assert (await info.value).status == 204
    [body] = sent.bodies
    assert body["utm"] == {"campaign": "a" * 255, "term": "c" * 256}
    await drained(s.collector)
    assert daily_pageviews(data_dir) == 1
    assert s.errors.messages == []


# -- what is never sent -------------------------------------------------------------------------------------


async def test_an_opted_out_browser_sends_nothing(setup: MakeSetup, data_dir: Path) -> None:
    s = await setup("")
    async with s.page() as (page, sent):
        await page.add_init_script("localStorage.setItem('collector_ignore', 'true')")
        await page.goto(s.site("/private"))
        await page.evaluate("history.pushState({}, '', '/elsewhere'); history.back()")
        await page.wait_for_function("location.pathname === '/private'")
        await page.evaluate("collector.pageview('/manual')")
        await send_marker(page, s, "site.test")
        assert [body["pathname"] for body in sent.bodies] == ["/marker"]
    await drained(s.collector)
    assert [row[1] for row in pageview_rows(data_dir)] == ["/marker"]
    assert s.errors.messages == []


async def test_storage_that_throws_does_not_stop_counting(setup: MakeSetup) -> None:
    s = await setup("")
    async with s.page() as (page, sent):
        await page.add_init_script(
            "Object.defineProperty(window, 'localStorage', "
            "{get() { throw new DOMException('denied', 'SecurityError'); }})"
        )
        async with page.expect_response(answered):
            await page.goto(s.site("/"))
        assert [body["pathname"] for body in sent.bodies] == ["/"]
    assert s.errors.messages == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_local_page_sends_nothing_without_include_localhost(
    setup: MakeSetup, data_dir: Path, host: str
) -> None:
    s = await setup("")
    async with s.page() as (page, sent):
        await page.goto(s.site("/dev", host=host))
        await page.evaluate("history.pushState({}, '', '/dev/next'); collector.pageview('/manual')")
        await send_marker(page, s, host)
        assert [body["pathname"] for body in sent.bodies] == ["/marker"]
    await drained(s.collector)
    assert [row[1] for row in pageview_rows(data_dir)] == ["/marker"]
    assert s.errors.messages == []


async def test_a_local_page_counts_with_include_localhost(setup: MakeSetup) -> None:
    s = await setup("data-include-localhost")
    async with s.page() as (page, sent):
        async with page.expect_response(answered):
            await page.goto(s.site("/dev", host="localhost"))
        assert sent.bodies == [{"pathname": "/dev", "referrer": "", "domain": "localhost"}]
    assert s.errors.messages == []


# -- pages not shown yet, pages shown again ----------------------------------------------------------------------

# Before any script of the page runs: the document claims to be hidden (a background tab) or
# prerendering, until the test calls window.reveal(), which changes it as Chromium would.
HIDDEN = """
(() => {
  let hidden = true;
  const prerender = %s;
  Object.defineProperty(document, 'visibilityState', {get: () => hidden ? 'hidden' : 'visible'});
  Object.defineProperty(document, 'hidden', {get: () => hidden});
  Object.defineProperty(document, 'prerendering', {get: () => prerender && hidden});
  window.reveal = () => {
    hidden = false;
    document.dispatchEvent(new Event(prerender ? 'prerenderingchange' : 'visibilitychange'));
  };
  window.hide = () => { hidden = true; document.dispatchEvent(new Event('visibilitychange')); };
})();
"""


@pytest.mark.parametrize("prerendered", [pytest.param(False, id="background-tab"), pytest.param(True, id="prerender")])
async def test_a_page_opened_unseen_counts_once_it_is_shown(
    setup: MakeSetup, data_dir: Path, prerendered: bool
) -> None:
    s = await setup("")
    async with s.page() as (page, sent):
        await page.add_init_script(HIDDEN % json.dumps(prerendered))
        await page.goto(s.site("/later"), referer=NEWS)
        await page.evaluate("history.replaceState({}, '', '/later/normalised')")  # a router at start-up
        assert sent.bodies == []
        shown = await view(page, "reveal()")
        assert shown == {"pathname": "/later/normalised", "referrer": NEWS, "domain": "site.test"}
        # Hidden and shown again (another tab, then back) is the same page view.
        await page.evaluate("hide(); reveal()")
        await send_marker(page, s, "site.test")
        assert [body["pathname"] for body in sent.bodies] == ["/later/normalised", "/marker"]
    await drained(s.collector)
    assert daily_pageviews(data_dir) == 2
    assert s.errors.messages == []


async def test_a_back_forward_cache_restore_sends_a_view(setup: MakeSetup) -> None:
    s = await setup("")
    article, other = s.site("/article"), s.site("/other")
    async with s.page() as (page, sent):
        async with page.expect_response(answered):
            await page.goto(article)
        async with page.expect_response(answered):
            await page.goto(other)
        # Back to a page kept whole in the cache: no load, no script run, only a pageshow.
        restored = await view(page, "history.back()")
        # A restored page keeps its first navigation entry; a page loaded afresh would say back_forward.
        entry = "performance.getEntriesByType('navigation')[0]"
        reasons = await page.evaluate(f"JSON.stringify({entry}.notRestoredReasons)")
        assert await page.evaluate(f"{entry}.type") == "navigate", f"not restored from the cache: {reasons}"
        assert restored == {"pathname": "/article", "referrer": article, "domain": "site.test"}
        assert sent.bodies == [
            {"pathname": "/article", "referrer": "", "domain": "site.test"},
            {"pathname": "/other", "referrer": "", "domain": "site.test"},
            restored,
        ]
    assert s.errors.messages == []


# -- transport -----------------------------------------------------------------------------------------------------


async def test_without_fetch_nothing_is_sent_and_nothing_is_thrown_into_the_page(setup: MakeSetup) -> None:
    """Every browser with URLSearchParams (which the script needs) has fetch; one whose fetch was
    taken away by something else on the page still gets no error from the tracker."""
    s = await setup("")
    async with s.page() as (page, sent):
        await page.add_init_script("delete window.fetch")
        await page.goto(s.site("/no-fetch"))
        await page.evaluate("collector.pageview('/again'); collector.event('Signup')")
        assert sent.bodies == []
    assert [message for message in s.errors.messages if "pageerror" in message] == []


async def test_a_collector_that_is_down_raises_nothing_in_the_page(setup: MakeSetup) -> None:
    s = await setup('data-api="http://down.test:9/api/pageview"')
    async with s.page() as (page, sent):
        async with page.expect_event("requestfailed", lambda request: is_pageview(request)):
            await page.goto(s.site("/"))
        await page.evaluate("collector.pageview('/again')")
        assert await page.evaluate("typeof collector.pageview") == "function"
    assert [message for message in s.errors.messages if "pageerror" in message] == []


# -- the collector's own test page ----------------------------------------------------------------------------------


async def test_the_test_page_buttons_drive_the_real_script(
    start_collector: Start, site_browser: Browser, data_dir: Path
) -> None:
    client = await start_collector()
    errors = PageErrors()
    context, page = await new_page(site_browser, errors)
    recorded = "document.getElementById('console').textContent.split('204 counted').length - 1"
    async with page.expect_response(answered):
        await page.goto(str(client.make_url("/test.html")))
    for button in ("About", "Blog post", "Back", "Send /custom/manual-event"):
        async with page.expect_response(answered):
            await page.get_by_role("button", name=button).click()
    await page.wait_for_function(f"{recorded} === 5")
    await page.get_by_role("button", name="Opt this browser out").click()
    await page.get_by_role("button", name="Pricing").click()
    assert "this browser sends nothing" in (await page.text_content("#console") or "")
    await page.get_by_role("button", name="Opt this browser back in").click()
    async with page.expect_response(answered):
        await page.get_by_role("button", name="Home").click()
    await page.wait_for_function(f"{recorded} === 6")
    await context.close()
    await drained(client)
    assert [row[1] for row in pageview_rows(data_dir)] == [
        "/test.html",
        "/about",
        "/blog/hello-world",
        "/about",
        "/custom/manual-event",
        "/",
    ]
    assert errors.messages == []
