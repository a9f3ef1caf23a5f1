"""A real headless Chromium (Debian's package) driven by Playwright, for the page tests.

On a developer machine without Chromium the browser tests skip and say why; under CI
(CI=true) a missing browser is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Error, Page, async_playwright

# As the machine notes advise: no sandbox as root, and nothing that reaches for the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is not installed; .ci/run installs Debian's chromium package")
    pytest.skip("no Chromium on this machine: `apt-get install chromium` to run the browser tests")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


# Every *.test name is this machine: a page can come from http://site.test:PORT, an origin that is
# neither localhost nor the collector's, so the tracker's localhost rule and CORS both act for real.
TEST_DOMAIN_ARGS = ["--host-resolver-rules=MAP *.test 127.0.0.1"]


@pytest.fixture
async def site_browser() -> AsyncIterator[Browser]:
    """Chromium with TEST_DOMAIN_ARGS and, unlike Playwright's default, the back/forward cache on."""
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable,
            args=CHROMIUM_ARGS + TEST_DOMAIN_ARGS,
            ignore_default_args=["--disable-back-forward-cache"],
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class PageErrors:
    """Every uncaught exception and console error a page raised."""

    messages: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.messages.append(f"pageerror: {error}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.messages.append(f"console.error: {message.text}")


# Headless Chromium says "HeadlessChrome" in its user agent, and the collector drops headless
# browsers' page views; the page tests present a desktop Chrome's instead (test_filters checks
# that the unchanged one is dropped).
DESKTOP_CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


async def new_page(browser: Browser, errors: PageErrors, **context_options: object) -> tuple[BrowserContext, Page]:
    context_options.setdefault("user_agent", DESKTOP_CHROME)
    context = await browser.new_context(**context_options)  # type: ignore[arg-type]
    page = await context.new_page()
    errors.watch(page)
    return context, page


__all__ = [
    "CHROMIUM_ARGS",
    "DESKTOP_CHROME",
    "TEST_DOMAIN_ARGS",
    "Error",
    "PageErrors",
    "browser",
    "chromium_path",
    "new_page",
    "site_browser",
]


def css_string(text: str) -> str:
    """A CSS string literal of any text (for an attribute selector)."""
    return '"' + "".join(c if c.isalnum() or c in " |:/.-_" else f"\\{ord(c):x} " for c in text) + '"'


async def wait_body(page: Page, attribute: str, operator: str, value: str) -> None:
    """Wait until the page's body has data-<attribute> <operator> value (=, ^=, $=, *=), as the
    dashboard marks what it has shown. A locator waits from Playwright's own world: the
    dashboard's Content-Security-Policy forbids the eval that wait_for_function polls with."""
    await page.locator(f"body[data-{attribute}{operator}{css_string(value)}]").wait_for(state="attached")
