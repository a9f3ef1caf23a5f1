"""Defensive HTTP: the server's limits on requests and slow clients, the security headers every
answer carries, and a Content-Security-Policy per HTML page built from the page itself.

Kept apart from collector.py so the limits and headers are read in one place; collector.py
installs them in create_app() and passes server_options() to the server in main() (and the
tests pass them to theirs).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

# Every body the collector accepts is small: a page view is at most 8 KiB, a Flowcore envelope at
# most 256 KiB. aiohttp's own default (1 MiB) would let any endpoint buffer four times that.
CLIENT_MAX_SIZE = 256 * 1024
# The longest legitimate request line is a statistics query (a domain, two dates, a limit); 4 KiB
# is ample. Header fields keep aiohttp's 8 KiB: a collector on a subdomain of a site can receive
# that site's cookies. 64 header fields is far above what browsers and a proxy or two send.
MAX_LINE_SIZE = 4096
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 64
# After answering without reading the whole body (a 413, a 408), aiohttp keeps reading and
# discarding it for this long so the client sees the answer rather than a reset connection.
# aiohttp's 10 s would let a client that stalls hold the connection that much longer.
LINGERING_TIME = 2.0

SERVER = "flow-analytics-collector"
# Not a page: nothing may load, frame or run from it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
INLINE_STYLE = re.compile(r"<style>(.*?)</style>", re.S)


@dataclass(frozen=True)
class Page:
    """An HTML page the collector serves, and what its policy allows beyond the inline blocks."""

    path: Path
    referrer_policy: str
    script_src: str = ""  # sources besides the page's own inline scripts, e.g. "'self'"
    style_src: str = ""  # sources besides the page's own inline styles


def server_options(keepalive_timeout: float) -> dict[str, Any]:
    """The settings of aiohttp's request handler: for web.run_app() and for the tests' servers.

    keepalive_timeout also bounds a client that opens a connection and sends its headers slowly:
    aiohttp closes a connection still waiting for a complete request when it runs out."""
    return {
        "max_line_size": MAX_LINE_SIZE,
        "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS,
        "keepalive_timeout": keepalive_timeout,
        "lingering_time": LINGERING_TIME,
    }


def inline_hashes(pattern: re.Pattern[str], html: str) -> list[str]:
    """CSP source expressions for each inline block, hashed exactly as the browser hashes them."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(block.encode("utf-8")).digest()).decode("ascii") + "'"
        for block in pattern.findall(html)
    ]


def page_policy(page: Page) -> str:
    """A policy that allows exactly the page's inline script and style blocks (by hash), requests
    to its own origin, and data: images (the empty favicon); nothing from anywhere else."""
    html = page.path.read_text(encoding="utf-8")
    scripts = " ".join(filter(None, [page.script_src, *inline_hashes(INLINE_SCRIPT, html)])) or "'none'"
    styles = " ".join(filter(None, [page.style_src, *inline_hashes(INLINE_STYLE, html)])) or "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@dataclass(frozen=True)
class PagePolicies:
    """For each page's URL path, its Content-Security-Policy and Referrer-Policy."""

    csp: Mapping[str, str]
    referrer: Mapping[str, str]


def page_policies(pages: Mapping[str, Page]) -> PagePolicies:
    return PagePolicies(
        csp={url: page_policy(page) for url, page in pages.items()},
        referrer={url: page.referrer_policy for url, page in pages.items()},
    )


def api_headers() -> dict[str, str]:
    """The security headers of an API answer (no page), for answers built ahead of time."""
    return {"Server": SERVER, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": API_POLICY}


def install(app: web.Application, pages: Mapping[str, Page]) -> None:
    """Set the security headers on every answer, errors included, just before it is sent."""
    policies = page_policies(pages)

    async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        if headers.get("Server") == SERVER:  # an API answer that came with api_headers() already
            return
        headers["Server"] = SERVER  # not aiohttp's, which names Python's and its own version
        headers.setdefault("X-Content-Type-Options", "nosniff")
        # The API's answers are no documents; a strict policy costs the sites that call it nothing.
        headers["Referrer-Policy"] = policies.referrer.get(request.path, "no-referrer")
        headers["Content-Security-Policy"] = policies.csp.get(request.path, API_POLICY)
        if response.status == 408:  # a client too slow to send its body gets no second request
            headers["Connection"] = "close"
            response.force_close()

    app.on_response_prepare.append(security_headers)
    quiet_parse_errors()


class ParseErrorFilter(logging.Filter):
    """aiohttp logs a request it cannot parse, or an error that escaped the app, as "Error handling
    request from <address>". The address must not reach the log. For a malformed request the
    traceback tells nothing either (anyone can send one): one INFO line naming the kind is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Error handling request from %s":
            return True
        error = record.exc_info[1] if record.exc_info else None
        record.args = ()
        if isinstance(error, HttpProcessingError):
            record.msg = f"refused a malformed HTTP request ({type(error).__name__})"
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        else:
            record.msg = "error handling a request"
        return True


def quiet_parse_errors() -> None:
    """Install ParseErrorFilter on aiohttp's server logger, once."""
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(item, ParseErrorFilter) for item in server_logger.filters):
        server_logger.addFilter(ParseErrorFilter())
