"""In a real headless Chromium: Swagger UI at /swagger, from the swagger extra's files on this
origin, renders every operation of /openapi.json under a policy that allows no inline script or
style and nothing from elsewhere; and the dashboard shows received events without a usable domain
under "(no site)", never as the site it opens on. Screenshots are kept under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import PageErrors, browser, new_page  # noqa: F401  (browser is a fixture)
from conftest import Start
from helpers import FakeClock, utc
from playwright.async_api import Browser, Request
from test_dashboard_browser import TOKEN, wait_loaded
from test_flowcore import SECRET, envelope
from test_receive import original

import openapi
from filters import NO_SITE


async def test_swagger_ui_renders_the_document_from_this_origin_under_a_strict_policy(
    start_collector: Start, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    client = await start_collector()
    policy = (await client.get("/swagger")).headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "style-src 'self';" in policy and "unsafe" not in policy
    operations = sum(len(methods) for methods in openapi.document("0").get("paths", {}).values())
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 900})
    origin = str(client.make_url("/")).rstrip("/")
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request))
    await page.goto(str(client.make_url("/swagger")))
    await page.locator(".opblock").nth(operations - 1).wait_for()
    assert await page.locator(".opblock").count() == operations
    await page.locator(".opblock-summary").first.click()  # expand one: the details render too
    await page.get_by_role("button", name="Try it out").first.wait_for()
    await page.screenshot(path=tmp_path / "swagger-desktop.png")
    await page.set_viewport_size({"width": 375, "height": 800})
    await page.screenshot(path=tmp_path / "swagger-375.png")
    await context.close()
    assert errors.messages == []  # a blocked script, style or fetch would be a console error
    assert requests and all(request.url.startswith(origin + "/") for request in requests)


async def test_without_the_extra_swagger_says_how_to_get_it(
    start_collector: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await start_collector()
    monkeypatch.setattr(openapi, "swagger_ui_dir", lambda: None)
    for path in ("/swagger", "/swagger/swagger-ui-bundle.js"):
        response = await client.get(path)
        assert response.status == 404
        assert "pip install '.[swagger]'" in (await response.json())["error"]
    monkeypatch.undo()
    assert (await client.get("/swagger/nothing.js")).status == 404
    script = await client.get("/swagger/swagger-ui-bundle.js")
    assert script.status == 200 and script.headers["Content-Type"] == "text/javascript; charset=utf-8"


async def test_the_dashboard_lists_no_site_last_and_shows_it(
    start_collector: Start, tmp_path: Path, browser: Browser  # noqa: F811
) -> None:
    client = await start_collector(clock=FakeClock(utc(2025, 6, 4, 12)), STATS_TOKEN=TOKEN,
                                   FLOWCORE_TRANSFORMER_SECRET=SECRET)
    for index, domain in enumerate(["", "zz.example", "", "not a host"]):
        event = envelope(f"e-{index}", payload=original(domain=domain, pathname=f"/p/{index}"))
        response = await client.post("/api/transformer", json=event, headers={"X-Secret": SECRET})
        assert response.status == 200
    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 900})
    await context.add_init_script(f"localStorage.setItem('statsToken', '{TOKEN}')")
    await page.goto(str(client.make_url("/dashboard")))
    await wait_loaded(page, "zz.example", "30d")  # opens on the real site
    site = page.get_by_label("Site")
    assert await site.locator("option").all_inner_texts() == ["zz.example", NO_SITE]
    await site.select_option(NO_SITE)
    await wait_loaded(page, NO_SITE, "30d")
    assert await page.locator("[data-metric=pageviews]").text_content() == "3"
    await page.screenshot(path=tmp_path / "dashboard-no-site-desktop.png", full_page=True)
    await page.set_viewport_size({"width": 375, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await page.screenshot(path=tmp_path / "dashboard-no-site-375.png", full_page=True)
    await context.close()
    assert errors.messages == []
