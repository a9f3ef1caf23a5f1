"""The test page in a real headless Chromium: it loads, sends its page view, raises no error."""

from __future__ import annotations

import re
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
    # A locator waits from Playwright's own world: the page's policy forbids the eval that
    # wait_for_function would need.
    await page.locator("#console").filter(has_text=re.compile(r"204[\s\S]*204")).wait_for()
    await context.close()
    await drained(client)
    assert query(data_dir, "SELECT pathname FROM pageviews ORDER BY id") == [("/test.html",), ("/about",)]
    assert errors.messages == []
