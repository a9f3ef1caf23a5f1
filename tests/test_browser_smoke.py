"""The test page in a real headless Chromium: it loads, sends its page view, raises no error."""

from __future__ import annotations

from pathlib import Path

from browser import PageErrors, new_page
from conftest import Start
from helpers import drained, query
from playwright.async_api import Browser


async def test_the_test_page_sends_a_page_view_without_errors(
    start_collector: Start, data_dir: Path, browser: Browser
) -> None:
    client = await start_collector()
    errors = PageErrors()
    context, page = await new_page(browser, errors)
    async with page.expect_response(lambda r: r.url.endswith("/api/pageview")) as answer:
        await page.goto(str(client.make_url("/test.html")))
    assert (await answer.value).status == 204
    await page.get_by_role("button", name="About").click()
    await page.wait_for_function("document.getElementById('console').textContent.split('204').length > 2")
    await context.close()
    await drained(client)
    assert query(data_dir, "SELECT pathname FROM pageviews ORDER BY id") == [("/test.html",), ("/about",)]
    assert errors.messages == []
