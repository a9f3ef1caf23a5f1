"""The privacy-first analytics collector: configuration, the HTTP app, and main().

Run it with `python collector.py`. With no configuration it collects into a local SQLite
event log under ./data; see env.example for every setting.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping

import filters
import http_defense
import openapi
import privacy
import stats
from config import MIN_STATS_TOKEN_LENGTH, Config, ConfigError, IPNetwork, load_config, with_secret_key
from filters import MAX_DOMAIN_LENGTH, FilterSettings, normalize_host
from maintenance import DataDirBusyError, Jobs, lock_data_dir, progress_bar, rebuild
from pathways import (
    MAX_PATH_LENGTH,
    VISITOR_TRACKED,
    ContractError,
    Emitter,
    EnvelopeError,
    FlowcoreSink,
    LocalSink,
    Outcome,
    Pathways,
    Sink,
    UnknownPathwayError,
    parse_envelope,
    secret_matches,
)
from readmodel import ReadModel, local_day_hour
from store import DB_FILENAME, Store, StoreClosedError

__version__ = "0.1.0"

logger = logging.getLogger("collector")

SERVICE_NAME = "flow-analytics-collector"
MAX_PAGEVIEW_BYTES = 8 * 1024
LOCAL_BATCH_SIZE = 500  # events per local delivery transaction
LOCAL_BUSY_BATCH_SIZE = 100  # the same while page views wait for their commit
# No client address and no user agent: the access log must not undo what hashing protects.
ACCESS_LOG_FORMAT = '"%r" %s %b %Tfs'

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Clock = Callable[[], datetime]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# -- errors -----------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer in the one error shape: {"status": N, "error": "what is wrong"}."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"status": status, "error": message}, status=status, headers=headers)


@web.middleware
async def errors_and_cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON in one shape, without internals; CORS headers go on every
    answer of the collection endpoint, errors included, so a browser can read them."""
    try:
        response = await handler(request)
    except ApiError as error:
        response = error_response(error.status, error.message, error.headers)
    except (ContractError, stats.StatsParameterError) as error:
        response = error_response(400, str(error))
    except StoreClosedError:
        response = error_response(503, "the collector is shutting down; try again")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None  # a 405 must say
        response = error_response(error.status, _http_error_message(request, error), allow)
    except Exception:
        logger.exception("unexpected error on %s %s", request.method, request.path)
        response = error_response(500, "internal error")
    if request.path in CORS_PATHS:
        add_cors_headers(request, response)
    return response


def _http_error_message(request: web.Request, error: web.HTTPException) -> str:
    if error.status == 404:
        return f"no such endpoint: {request.path}"
    if error.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    return error.reason


# -- the tracker script -------------------------------------------------------------------------------------------

# A day: an upgrade reaches every browser within a day, and a revalidation after that is a 304.
SCRIPT_CACHE_CONTROL = "public, max-age=86400"


@dataclass(frozen=True)
class Script:
    """static/script.js as served: prepared once, in plain and gzip form, with its ETag."""

    body: bytes
    gzipped: bytes
    etag: str


def load_script(path: Path) -> Script:
    body = strip_script(path.read_text(encoding="utf-8")).encode("utf-8")
    return Script(body, gzip.compress(body, 9, mtime=0), hashlib.sha256(body).hexdigest()[:20])


def strip_script(source: str) -> str:
    """The source without its indentation, blank lines and whole-line // comments: the
    script stays readable in the repository and small on the wire, with no build step.
    Line by line is safe because the file has no multi-line literals or block comments
    (a test checks)."""
    lines = (line.strip() for line in source.splitlines())
    return "".join(line + "\n" for line in lines if line and not line.startswith("//"))


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether Accept-Encoding allows gzip, by name or through *, with a quality above 0."""
    qualities: dict[str, float] = {}
    for item in accept_encoding.lower().split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        qualities[coding] = _quality(params)
    return qualities.get("gzip", qualities.get("*", 0.0)) > 0


def _quality(params: Sequence[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def script_handler(script: Script) -> Handler:
    async def serve_script(request: web.Request) -> web.Response:
        gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        # The two encodings are two representations, so each has its own strong ETag.
        etag = script.etag + ("-gzip" if gzipped else "")
        headers = {
            "Cache-Control": SCRIPT_CACHE_CONTROL,
            "ETag": f'"{etag}"',
            "Vary": "Accept-Encoding",
            # Loadable by pages that isolate themselves (COEP) or load it with crossorigin.
            "Cross-Origin-Resource-Policy": "cross-origin",
            "Access-Control-Allow-Origin": "*",
            "X-Content-Type-Options": "nosniff",
        }
        if any(tag.value in (script.etag, script.etag + "-gzip", "*") for tag in request.if_none_match or ()):
            return web.Response(status=304, headers=headers)
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        body = script.gzipped if gzipped else script.body
        return web.Response(body=body, content_type="application/javascript", charset="utf-8", headers=headers)

    return serve_script


# -- the collection endpoint --------------------------------------------------------------------------------

CORS_PATHS = {"/api/pageview"}
# A counted page view's answer, but for CORS: built once, copied into each response.
COUNTED = CIMultiDict(http_defense.api_headers())
PAGEVIEW_FIELDS = ("pathname", "referrer", "domain")
BODY_TYPES = ("application/json", "text/plain")


@dataclass(frozen=True)
class PageviewInput:
    pathname: str
    referrer: str
    domain: str


def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Reflect the Origin when ALLOWED_ORIGINS admits it; the answer depends on it either way."""
    response.headers["Vary"] = "Origin"
    origin = request.headers.get("Origin")
    if origin and request.app[CONFIG].allowed_origins.allows(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = filters.DROPPED_HEADER


async def pageview_preflight(request: web.Request) -> web.Response:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "86400",
        },
    )


async def pageview(request: web.Request) -> web.Response:
    """Turn a page view into an anonymous visitor.tracked.v0 event; 204 once it is committed.

    The order: the rate limit (before any work), then validation (so bad input gets its 4xx
    whoever sent it), then the filters (a dropped page view answers 204 and says why), then
    the hash and the write."""
    app = request.app
    config = app[CONFIG]
    ip = client_ip(request.remote, request.headers, app[PROXY_RANGES])
    wait = app[LIMITER].retry_after(ip)
    if wait is not None:
        raise ApiError(429, f"too many page views from this address; try again in {wait} s",
                       {"Retry-After": str(wait)})
    if request.content_type not in BODY_TYPES:
        raise ApiError(415, f"Content-Type must be application/json or text/plain, not {request.content_type}")
    fields = parse_pageview(await read_body(request, MAX_PAGEVIEW_BYTES), request.headers)
    now = app[CLOCK]()
    reason = app[FILTER].drop_reason(fields.domain, request.headers)
    if reason is not None:
        app[DROPS].count(fields.domain, local_day_hour(int(now.timestamp() * 1000), config.timezone)[0], reason)
        return web.Response(status=204, headers={filters.DROPPED_HEADER: reason})
    day = privacy.salt_day(now)
    payload = {
        "visitorHash": await app[HASHER](day, fields.domain, ip, request.headers.get("User-Agent")),
        "domain": fields.domain,
        "pathname": fields.pathname,
        "referrer": fields.referrer,
        "sessionContext": {"dailySaltRotation": day},
    }
    await request.app[PATHWAYS].write(VISITOR_TRACKED, payload, now)
    return web.Response(status=204, headers=COUNTED)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes the limit, and with 408 when it does not
    arrive within BODY_TIMEOUT_MS (the connection is then closed)."""
    if request.content.is_eof():  # the whole body came with the headers (the usual case): no timer
        return await _read_limited(request, limit)
    timeout = request.app[CONFIG].body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await _read_limited(request, limit)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s") from None


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None:
        if request.content_length > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes")
        return await request.read()  # the length is known and small: one read
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None


def parse_pageview(body: bytes, headers: Mapping[str, str]) -> PageviewInput:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(data) - set(PAGEVIEW_FIELDS))
    if unknown:
        names = ", ".join(repr(name[:64]) for name in unknown[:10])
        raise ApiError(400, f"unknown fields: {names}; expected pathname, referrer and domain")
    pathname = _text_field(data, "pathname", 1, MAX_PATH_LENGTH)
    referrer = _text_field(data, "referrer", 0, MAX_PATH_LENGTH)
    if "domain" in data:
        domain = normalize_host(_text_field(data, "domain", 1, MAX_DOMAIN_LENGTH))
        if domain is None:
            raise ApiError(400, "domain must be a hostname such as example.com")
    else:
        domain = domain_from_headers(headers)
    return PageviewInput(pathname, referrer, domain)


def _text_field(data: Mapping[str, Any], name: str, low: int, high: int) -> str:
    if name not in data:
        raise ApiError(400, f"{name} is required")
    value = data[name]
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    if not low <= len(value) <= high:
        raise ApiError(400, f"{name} must be {low} to {high} characters long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{name} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def domain_from_headers(headers: Mapping[str, str]) -> str:
    """The host of the Origin header, else of the Referer header."""
    for name in ("Origin", "Referer"):
        try:
            host = urlsplit(headers.get(name, "")).hostname
        except ValueError:
            continue
        if host:
            domain = normalize_host(f"[{host}]" if ":" in host else host)
            if domain is not None:
                return domain
    raise ApiError(400, "domain is missing, and neither an Origin nor a Referer header names a host")


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress | None:
    """An address as proxies write it: bare, bracketed IPv6, or with a port; None if not one."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# IPv4 numbers carry this bit, so that they never match an IPv6 range or the other way round.
_V4_TAG = 1 << 128


@lru_cache(maxsize=4096)
def _address(text: str) -> tuple[int, str] | None:
    """An address as (a number to match against ranges, its canonical text). IPv4 takes a fast
    path through inet_pton: the ipaddress module is several microseconds per parse."""
    bare = text.strip()
    if bare.count(":") == 1:
        bare = bare.split(":", 1)[0]
    try:
        return _V4_TAG | int.from_bytes(socket.inet_pton(socket.AF_INET, bare), "big"), bare
    except (OSError, ValueError):  # not IPv4; ValueError also covers NULs and undecodable bytes
        address = parse_ip(text)
    if address is None:
        return None
    return (_V4_TAG if address.version == 4 else 0) | int(address), str(address)


ProxyRanges = tuple[tuple[int, int], ...]


def proxy_ranges(proxies: tuple[IPNetwork, ...]) -> ProxyRanges:
    """Each trusted network as (network number, mask), both tagged like _address's numbers:
    worked out once at start-up (hashing the networks per request was a measurable cost)."""
    return tuple(
        ((_V4_TAG if net.version == 4 else 0) | int(net.network_address), _V4_TAG | int(net.netmask))
        for net in proxies
    )


def _trusted(number: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(number & mask == network for network, mask in ranges)


def client_ip(peer: str | None, headers: MultiMapping[str], ranges: ProxyRanges) -> str:
    """The socket peer, unless it is a trusted proxy: then X-Forwarded-For (its right-most
    address that is not itself a trusted proxy), else X-Real-IP, else CF-Connecting-IP."""
    peer_address = _address(peer or "")
    if peer_address is None:
        return peer or "unknown"
    if not _trusted(peer_address[0], ranges):
        return peer_address[1]
    forwarded = _from_forwarded_for(headers, ranges)
    if forwarded is not None:
        return forwarded
    for name in ("X-Real-IP", "CF-Connecting-IP"):
        address = _address(headers.get(name, ""))
        if address is not None:
            return address[1]
    return peer_address[1]


def _from_forwarded_for(headers: MultiMapping[str], ranges: tuple[tuple[int, int], ...]) -> str | None:
    values = headers.getall("X-Forwarded-For", [])
    hops = [hop for value in values for hop in value.split(",") if hop.strip()]
    last: str | None = None
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return None  # a hop we cannot read: nothing left of it can be trusted
        if not _trusted(address[0], ranges):
            return address[1]
        last = address[1]
    return last  # every hop is a trusted proxy: the left-most is the origin


# -- the transformer endpoint: Flowcore delivers events back to the router ---------------------------------

MAX_ENVELOPE_BYTES = 256 * 1024


async def transformer(request: web.Request) -> web.Response:
    """One Flowcore event envelope (flowType or the legacy aggregator). 200 OK once processed
    or when it was processed before; 500 when its handler failed, so the sender delivers it again."""
    secret = request.app[CONFIG].transformer_secret
    if not secret:
        raise ApiError(404, "the transformer endpoint is disabled: set FLOWCORE_TRANSFORMER_SECRET to enable it")
    if not secret_matches(secret, request.headers.get("X-Secret")):
        raise ApiError(401, "missing or wrong X-Secret header")
    raw = parse_json(await read_body(request, MAX_ENVELOPE_BYTES))
    try:
        event = parse_envelope(raw)
        outcome = await request.app[PATHWAYS].process(event)
    except EnvelopeError as error:
        raise ApiError(400, str(error)) from None
    except UnknownPathwayError as error:
        raise ApiError(404, str(error)) from None
    except ContractError as error:
        raise ApiError(422, str(error)) from None
    if outcome is Outcome.FAILED:
        raise ApiError(500, f"the handler of {event.key} failed on event {event.event_id}; deliver it again")
    if outcome is Outcome.DEAD_LETTERED:
        raise ApiError(500, f"the handler of {event.key} kept failing; event {event.event_id} is in the dead letters")
    return web.Response(text="OK")


# -- service endpoints ----------------------------------------------------------------------------------------

ENDPOINTS = {
    "POST /api/pageview": "Record a page view: JSON {pathname, referrer, domain?}, as application/json or text/plain. "
    "204; X-Collector-Dropped says why one was not counted; 429 beyond the rate limit.",
    "POST /api/transformer": "Flowcore delivers events here (X-Secret); enabled by FLOWCORE_TRANSFORMER_SECRET.",
    "GET /health": "Status, mode, version, backlog and the read model's lag in seconds, dead letters, last processed "
    "event.",
    "GET /script.js": "The tracker script to put on a site's pages (see the README).",
    "GET /test.html": "A test page that sends page views to this collector.",
    "GET /api/stats": "Statistics of a domain over a period: ?domain=&period=today|yesterday|7d|30d|month|12mo|"
    "custom&from=&to=&limit=. Needs STATS_TOKEN, or a loopback client.",
    "GET /api/sites": "The domains seen, with their first and last day.",
    "GET /api/current-visitors": "Distinct visitors of ?domain= in the last five minutes.",
    "GET /api/export": "CSV of ?domain=&from=&to=, daily totals or table=pages|sources.",
    "GET /dashboard": "The statistics dashboard.",
    "GET /openapi.json": "The OpenAPI 3.1 document of every endpoint and every error.",
    "GET /": "This list.",
}


async def index(request: web.Request) -> web.Response:
    return web.json_response(
        {"service": SERVICE_NAME, "version": __version__, "mode": request.app[CONFIG].mode, "endpoints": ENDPOINTS}
    )


async def health(request: web.Request) -> web.Response:
    config, store = request.app[CONFIG], request.app[STORE]
    about = {"mode": config.mode, "version": __version__}
    try:
        async with asyncio.timeout(5):
            counts = await store.health(local_delivery=config.flowcore is None)
    except Exception as error:
        logger.error("health check: the database does not answer: %s", error)
        return web.json_response({"status": "unavailable", **about, "database": "unavailable"}, status=503)
    body: dict[str, Any] = {
        "status": "ok",
        **about,
        "database": "ok",
        "backlog": counts.backlog,
        "lag_seconds": counts.lag_seconds(request.app[CLOCK]()),
        "outbox": counts.outbox,
        "dead_letters": counts.dead_letters,
        "last_processed_at": counts.last_processed_at,
        "group_commit": {"commits": counts.commits, "events": counts.committed_events},
        "retention_last_run": counts.retention_last_run,
    }
    sink = request.app[SINK]
    body.update(sink.describe())
    if sink.halted:
        body["status"] = "halted"
    return web.json_response(body)


async def test_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "test.html", headers={"Cache-Control": "no-cache"})


# -- statistics: /api/stats, /api/sites, /api/current-visitors, /api/export, /dashboard --------------------------

STATS_PARAMETERS = frozenset({"domain", "period", "from", "to", "limit"})
EXPORT_PARAMETERS = frozenset({"domain", "from", "to", "table"})
PRIVATE = {"Cache-Control": "no-store"}
LOOPBACK_ONLY = (
    "the statistics answer only clients on this machine; to read them from elsewhere, set STATS_TOKEN "
    f"to a secret of at least {MIN_STATS_TOKEN_LENGTH} characters, restart, and send 'Authorization: Bearer <token>'"
)


def require_reader(request: web.Request) -> None:
    """With STATS_TOKEN: the bearer token, compared in constant time. Without: loopback clients
    only, judged on the address a trusted proxy forwarded, so a proxy on this machine does not
    make every visitor local."""
    config = request.app[CONFIG]
    if config.stats_token:
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not secret_matches(config.stats_token, token.strip()):
            raise ApiError(401, "the statistics need the header 'Authorization: Bearer <STATS_TOKEN>'",
                           {"WWW-Authenticate": 'Bearer realm="statistics"'})
        return
    address = parse_ip(client_ip(request.remote, request.headers, request.app[PROXY_RANGES]))
    if address is None or not address.is_loopback:
        raise ApiError(403, LOOPBACK_ONLY)


def query_params(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query string as single values; unknown or repeated parameters are refused."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        names = ", ".join(repr(name[:32]) for name in unknown[:10])
        raise ApiError(400, f"unknown parameters: {names}; expected {', '.join(sorted(allowed)) or 'none'}")
    repeated = sorted(name for name in set(request.query) if len(request.query.getall(name)) > 1)
    if repeated:
        raise ApiError(400, f"parameters given more than once: {', '.join(repeated)}")
    return dict(request.query)


def domain_param(params: Mapping[str, str]) -> str:
    text = params.get("domain", "")
    if not text:
        raise ApiError(400, "domain is required, e.g. domain=example.com")
    domain = normalize_host(text) if len(text) <= MAX_DOMAIN_LENGTH else None
    if domain is None:
        raise ApiError(400, "domain must be a hostname such as example.com")
    return domain


def local_now(request: web.Request) -> datetime:
    return request.app[CLOCK]().astimezone(request.app[CONFIG].timezone)


async def stats_api(request: web.Request) -> web.Response:
    require_reader(request)
    params = query_params(request, STATS_PARAMETERS)
    domain = domain_param(params)
    period = params.get("period", stats.DEFAULT_PERIOD)
    span = stats.period_range(period, local_now(request).date(), params.get("from"), params.get("to"))
    limit = stats.parse_limit(params.get("limit"))
    config, store = request.app[CONFIG], request.app[STORE]
    body = await stats.overview(store.reader, domain, period, span, limit, request.app[CLOCK](), config.timezone)
    return web.json_response(body, headers=PRIVATE)


async def sites_api(request: web.Request) -> web.Response:
    require_reader(request)
    query_params(request, frozenset())
    return web.json_response({"sites": await stats.sites(request.app[STORE].reader)}, headers=PRIVATE)


async def current_visitors_api(request: web.Request) -> web.Response:
    require_reader(request)
    domain = domain_param(query_params(request, frozenset({"domain"})))
    count = await stats.current_visitors(request.app[STORE].reader, domain, request.app[CLOCK]())
    return web.json_response({"domain": domain, "current_visitors": count}, headers=PRIVATE)


async def export_api(request: web.Request) -> web.Response:
    require_reader(request)
    params = query_params(request, EXPORT_PARAMETERS)
    domain = domain_param(params)
    span = stats.custom_range(params.get("from"), params.get("to"))
    table = params.get("table", "daily")
    if table not in stats.EXPORT_TABLES:
        raise ApiError(400, f"table must be one of {', '.join(stats.EXPORT_TABLES)}, not {table[:32]!r}")
    rows = await stats.export_rows(request.app[STORE].reader, table, domain, span)
    disposition = f'attachment; filename="{stats.export_filename(domain, table, span)}"'
    return web.Response(
        text=stats.to_csv(stats.EXPORT_HEADERS[table], rows),
        content_type="text/csv",
        charset="utf-8",
        headers={**PRIVATE, "Content-Disposition": disposition},
    )


async def dashboard(request: web.Request) -> web.FileResponse:
    # Its Content-Security-Policy (hashes of its inline script and style) comes from http_defense.
    return web.FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-cache"})


# -- the application ---------------------------------------------------------------------------------------------

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONFIG = web.AppKey("config", Config)
PROXY_RANGES: web.AppKey[ProxyRanges] = web.AppKey("proxy_ranges")
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
STORE = web.AppKey("store", Store)
READ_MODEL = web.AppKey("read_model", ReadModel)
PATHWAYS = web.AppKey("pathways", Pathways)
EMITTER = web.AppKey("emitter", Emitter)
SINK: web.AppKey[Sink] = web.AppKey("sink")
FILTER = web.AppKey("filter", filters.PageviewFilter)
LIMITER = web.AppKey("limiter", filters.RateLimiter)
DROPS = web.AppKey("drops", filters.DropCounter)
SESSION: web.AppKey[aiohttp.ClientSession | None] = web.AppKey("session")
HASHER = web.AppKey("hasher", privacy.VisitorHasher)


def utc_now() -> datetime:
    return datetime.now(UTC)


# The HTML pages: the dashboard sends no referrer anywhere; the test page keeps the browser's
# default, as a site's page would, and loads the tracker from its own origin.
PAGES = {
    "/dashboard": http_defense.Page(STATIC_DIR / "dashboard.html", "no-referrer"),
    "/test.html": http_defense.Page(STATIC_DIR / "test.html", "strict-origin-when-cross-origin", "'self'"),
}


def create_app(config: Config, *, clock: Clock = utc_now) -> web.Application:
    app = web.Application(middlewares=[errors_and_cors], client_max_size=http_defense.CLIENT_MAX_SIZE)
    http_defense.install(app, PAGES)
    app[CONFIG] = config
    app[PROXY_RANGES] = proxy_ranges(config.trusted_proxies)
    app[CLOCK] = clock
    app[FILTER] = filters.PageviewFilter(
        FilterSettings(config.allowed_domains, config.respect_gpc, config.respect_dnt), filters.BotDetector()
    )
    app[LIMITER] = filters.RateLimiter(
        config.rate_limit_per_second, config.rate_limit_burst, config.rate_limit_table_size
    )
    # One context per resource, opened in this order and closed in the reverse: a failure half
    # way through start-up closes exactly what was opened.
    for context in (data_dir_lock, database, outbound_session, delivery, background_jobs):
        app.cleanup_ctx.append(context)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/script.js", script_handler(load_script(STATIC_DIR / "script.js")))
    app.router.add_post("/api/pageview", pageview)
    app.router.add_route("OPTIONS", "/api/pageview", pageview_preflight)
    app.router.add_post("/api/transformer", transformer)
    app.router.add_get("/test.html", test_page)
    app.router.add_get("/api/stats", stats_api)
    app.router.add_get("/api/sites", sites_api)
    app.router.add_get("/api/current-visitors", current_visitors_api)
    app.router.add_get("/api/export", export_api)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/openapi.json", openapi.handler(__version__))
    return app


async def database(app: web.Application) -> AsyncIterator[None]:
    """The store with its read model and router, and what hashes visitors; closed last."""
    config = app[CONFIG]
    secret_key = with_secret_key(config).secret_key  # DATA_DIR is locked by now
    store = Store(config.data_dir / DB_FILENAME, config.timezone)
    read_model = ReadModel(store)
    try:
        await store.open()
        pathways = Pathways(store, max_attempts=config.handler_max_attempts)
        pathways.register(VISITOR_TRACKED)
        pathways.handle(VISITOR_TRACKED, read_model.record_pageviews)
        app[STORE], app[READ_MODEL], app[PATHWAYS] = store, read_model, pathways
        salts = privacy.DailySalts(store) if config.privacy_mode == privacy.EPHEMERAL else None
        app[HASHER] = privacy.VisitorHasher(config.privacy_mode, secret_key, salts)
        app[DROPS] = filters.DropCounter(store)
        yield
    finally:
        await store.close()
        logger.info("stopped; the database is closed")


async def outbound_session(app: web.Application) -> AsyncIterator[None]:
    """The one HTTP client session, in Flowcore mode."""
    session = aiohttp.ClientSession() if app[CONFIG].flowcore else None
    app[SESSION] = session
    try:
        yield
    finally:
        if session is not None:
            await session.close()


async def delivery(app: web.Application) -> AsyncIterator[None]:
    """The sink and the emitter that drains the outbox into it; on the way out the emitter
    finishes its request, and what is left waits in the outbox."""
    config, store, session = app[CONFIG], app[STORE], app[SESSION]
    sink: Sink
    if config.flowcore is not None and session is not None:  # a batch is one request to the webhook
        sink, batch_size = FlowcoreSink(store, session, config.flowcore), config.flowcore.batch_size
        busy_batch_size = batch_size
    else:
        sink, batch_size = LocalSink(store, app[PATHWAYS]), LOCAL_BATCH_SIZE
        busy_batch_size = LOCAL_BUSY_BATCH_SIZE
    emitter = Emitter(store, sink, batch_size, busy_batch_size)
    app[SINK], app[EMITTER] = sink, emitter
    emitter.start()
    try:
        yield
    finally:
        await emitter.stop()


async def background_jobs(app: web.Application) -> AsyncIterator[None]:
    """Retention, forgetting, salts and drop counts (maintenance.py); stopped first."""
    jobs = Jobs(app[STORE], app[READ_MODEL], app[DROPS], app[CONFIG].raw_retention_days, app[CLOCK])
    jobs.start()
    # What start-up made lives as long as the process: out of the collector's way, so its
    # collections only walk what requests make.
    gc.freeze()
    try:
        yield
    finally:
        await jobs.stop()


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """uvloop when asked for, or when installed and not declined; else asyncio's own loop."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("EVENT_LOOP=uvloop, but uvloop is not installed: pip install '.[speed]'") from None
        else:
            logger.info("event loop: uvloop")
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def log_start(config: Config) -> None:
    """The mode and where events go; never a key or a secret."""
    logger.info(
        "%s %s: mode %s, data in %s, listening on %s:%d, days in %s",
        SERVICE_NAME, __version__, config.mode, config.data_dir.resolve(), config.host, config.port,
        config.timezone.key,
    )
    if config.flowcore is not None:
        target = config.flowcore.events_url(VISITOR_TRACKED.flow_type, VISITOR_TRACKED.event_type)
        logger.info("sending events to Flowcore: %s", target)
        if not config.transformer_secret:
            logger.warning("FLOWCORE_TRANSFORMER_SECRET is not set: /api/transformer is disabled, so events sent "
                           "to Flowcore will not come back to build statistics here")
    if config.transformer_secret:
        logger.info("POST /api/transformer is enabled")
    logger.info(
        "privacy mode %s; counting %s; rate limit %s",
        config.privacy_mode,
        "any domain" if config.allowed_domains is None else "ALLOWED_DOMAINS only",
        f"{config.rate_limit_per_second:g}/s, burst {config.rate_limit_burst}" if config.rate_limit_per_second
        else "off",
    )


# -- the data directory's lock, and rebuild ---------------------------------------------------------------------


async def data_dir_lock(app: web.Application) -> AsyncIterator[None]:
    """The running collector holds DATA_DIR's lock, so a rebuild cannot start under it."""
    descriptor = lock_data_dir(app[CONFIG].data_dir)
    try:
        yield
    finally:
        os.close(descriptor)


def rebuild_command(config: Config) -> int:
    try:
        summary = asyncio.run(rebuild(config.data_dir, config.timezone, utc_now(), progress_bar(sys.stderr)))
    except DataDirBusyError:
        print(f"collector rebuild: refused: a collector is running on {config.data_dir}; stop it, then run "
              "`python collector.py rebuild` again", file=sys.stderr)
        return 1
    if summary.from_day is None:
        print("rebuild: the local event log is empty; the read model is unchanged")
    else:
        print(f"rebuild: recomputed the read model from {summary.from_day} ({config.timezone.key} days) by "
              f"replaying {summary.replayed} logged page views; aggregates of earlier days were kept"
              + (f" ({summary.skipped} older logged events not replayed)" if summary.skipped else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = list(sys.argv[1:] if argv is None else argv)
    if command not in ([], ["rebuild"]):
        print("usage: python collector.py [rebuild]", file=sys.stderr)
        return 2
    try:
        config = load_config(os.environ)
    except ConfigError as error:
        print(f"collector: configuration error: {error}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config.log_level)
    if command == ["rebuild"]:
        return rebuild_command(config)
    log_start(config)
    try:
        loop = new_event_loop(config.event_loop)
    except ConfigError as error:
        print(f"collector: configuration error: {error}", file=sys.stderr)
        return 2
    try:
        web.run_app(
            create_app(config),
            loop=loop,
            host=config.host,
            port=config.port,
            access_log=logging.getLogger("aiohttp.access") if config.access_log else None,
            access_log_format=ACCESS_LOG_FORMAT,
            shutdown_timeout=10.0,
            print=None,
            **http_defense.server_options(config.keepalive_timeout),
        )
    except DataDirBusyError as error:
        print(f"collector: {error}; stop it first", file=sys.stderr)
        return 1
    except ConfigError as error:
        print(f"collector: configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
