"""The privacy-first analytics collector: configuration, the HTTP app, and main().

Run it with `flow-analytics-collector` (installed) or `python collector.py`; `--help` lists the
commands and every setting. With no configuration it collects into a local SQLite event log
under ./data.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import gzip
import hashlib
import ipaddress
import logging
import os
import socket
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from dotenv import dotenv_values
from multidict import CIMultiDict, MultiMapping

import dimensions
import filters
import http_defense
import logrepeats
import openapi
import privacy
import stats
from config import (
    DEFAULTS,
    FEATURES,
    IGNORED_SETTINGS,
    MIN_STATS_TOKEN_LENGTH,
    Config,
    ConfigError,
    IPNetwork,
    load_config,
    with_secret_key,
)
from eventmodel import EventLimits
from filters import MAX_DOMAIN_LENGTH, NO_SITE, FilterSettings, normalize_host
from maintenance import (
    DataDirBusyError,
    DataDirError,
    Jobs,
    lock_data_dir,
    progress_bar,
    rebuild,
    retry_dead_letters,
)
from pathways import (
    DIMENSION_FIELDS,
    EVENT_PROPS,
    MAX_EVENT_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_UTM_LENGTH,
    UTM_KEYS,
    VISITOR_EVENT,
    VISITOR_TRACKED,
    VISITOR_TRACKED_V1,
    Contract,
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
from pathways import parse_json as decode_json
from readmodel import ReadModel, local_day_hour
from store import (
    DB_FILENAME,
    DatabaseUnusableError,
    ReadersBusyError,
    StorageUnavailableError,
    Store,
    StoreClosedError,
    read_dead_letters,
    unusable,
)

__version__ = "0.1.0"

logger = logging.getLogger("collector")

SERVICE_NAME = "flow-analytics-collector"
MAX_PAGEVIEW_BYTES = 8 * 1024
LOCAL_BATCH_SIZE = 500  # events per local delivery transaction
LOCAL_BUSY_BATCH_SIZE = 100  # the same while page views wait for their commit
# No client address and no user agent: the access log must not undo what hashing protects. The
# last field is why a page view was not counted (X-Collector-Dropped), "-" for any other answer.
ACCESS_LOG_FORMAT = '"%r" %s %b %Tfs %{X-Collector-Dropped}o'

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
    except StorageUnavailableError:  # the store logged it once; /health names it
        response = error_response(503, "the collector cannot write to its database right now (its disk is full or "
                                  f"failing); nothing was stored; try again in {STORAGE_RETRY_AFTER} s",
                                  {"Retry-After": str(STORAGE_RETRY_AFTER)})
    except ReadersBusyError:
        response = error_response(503, "too many statistics requests at once; try again in a second",
                                  {"Retry-After": "1"})
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


STORAGE_RETRY_AFTER = 30  # seconds: a full disk is not fixed in less


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
    """A tracker script as served: prepared once, in plain and gzip form, with its ETag."""

    body: bytes
    gzipped: bytes
    etag: str


def load_script(*paths: Path) -> Script:
    """The files one after the other, as one script: /script.clicks.js is script.js and then
    script.clicks.js, so a page loads one file whichever it chose."""
    body = "".join(strip_script(path.read_text(encoding="utf-8")) for path in paths).encode("utf-8")
    return Script(body, gzip.compress(body, 9, mtime=0), hashlib.sha256(body).hexdigest()[:20])


def strip_script(source: str) -> str:
    """The source without its indentation, blank lines and whole-line // comments, and without
    the line breaks that JavaScript does not need (after { ; , and before }: no semicolon is
    ever inserted there): the script stays readable in the repository and small on the wire,
    with no build step. Line by line is safe because the file has no multi-line literals or
    block comments, and a line with a // after its code keeps its line break (a test checks)."""
    lines = [line.strip() for line in source.splitlines()]
    code = [line for line in lines if line and not line.startswith("//")]
    joined = []
    for line, following in zip(code, [*code[1:], ""], strict=True):
        joinable = line.endswith(("{", ";", ",")) or following.startswith("}")
        joined.append(line if joinable and "//" not in line else line + "\n")
    return "".join(joined)


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


# -- the collection endpoints: /api/pageview and /api/event ------------------------------------------------
#
# Both take the same path: the rate limit (before any work), the content type, the body, then
# validation (so bad input gets its 4xx whoever sent it), then the filters (a dropped request
# answers 204 and says why), then the visitor hash and the write. The steps are shared below.

CORS_PATHS = {"/api/pageview", "/api/event"}
# A counted page view's or event's answer, but for CORS: built once, copied into each response.
COUNTED = CIMultiDict(http_defense.api_headers())
PAGEVIEW_FIELDS = ("pathname", "referrer", "domain", "utm")
EVENT_FIELDS = ("name", "pathname", "domain", "referrer", "props")
BODY_TYPES = ("application/json", "text/plain")
USUAL_BODY_TYPES = frozenset({"text/plain;charset=UTF-8", "text/plain", "application/json"})
# Room for a generous set of properties; the payload's own bound (pathways.MAX_PAYLOAD_BYTES) still holds.
MAX_EVENT_BYTES = 16 * 1024


@dataclass(frozen=True)
class PageviewInput:
    pathname: str
    referrer: str
    domain: str
    utm: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EventInput:
    name: str
    pathname: str
    referrer: str
    domain: str
    props: dict[str, str | int | float | bool]


def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Reflect the Origin when ALLOWED_ORIGINS admits it; the answer depends on it either way."""
    response.headers["Vary"] = "Origin"
    origin = request.headers.get("Origin")
    if origin and request.app[CONFIG].collection.allowed_origins.allows(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = filters.DROPPED_HEADER


async def collection_preflight(request: web.Request) -> web.Response:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "86400",
        },
    )


async def pageview(request: web.Request) -> web.Response:
    """Turn a page view into an anonymous visitor.tracked.v1 event (v0 with EVENT_VERSION=v0);
    204 once it is committed.

    The order: the rate limit (before any work), then validation (so bad input gets its 4xx
    whoever sent it), then the filters (a dropped page view answers 204 and says why), then
    the hash and the write."""
    app, headers = request.app, request.headers
    ip = admit(request, app, "page views")
    fields = parse_pageview(await read_body(request, MAX_PAGEVIEW_BYTES), headers)
    now = app[CLOCK]()
    config = app[CONFIG]
    reason = app[FILTER].drop_reason(fields.domain, headers)
    if reason is not None:
        app[DROPS].count(fields.domain, local_day_hour(int(now.timestamp() * 1000), config.stats.timezone)[0], reason)
        return dropped(reason)
    day = privacy.salt_day(now)
    payload: dict[str, Any] = {
        "visitorHash": await app[HASHER](day, fields.domain, ip, headers.get("User-Agent")),
        "domain": fields.domain,
        "pathname": fields.pathname,
        "referrer": fields.referrer,
        "sessionContext": {"dailySaltRotation": day},
    }
    if config.events.version == "v1":
        payload.update(derived_dimensions(request, app, ip), utm=dict(fields.utm))
    await app[PATHWAYS].write(tracked_contract(config), payload, now)
    return web.Response(status=204, headers=COUNTED)


def tracked_contract(config: Config) -> Contract:
    """The page view event this collector writes: EVENT_VERSION's."""
    return VISITOR_TRACKED_V1 if config.events.version == "v1" else VISITOR_TRACKED


def derived_dimensions(request: web.Request, app: web.Application, ip: str) -> dict[str, str | None]:
    """Country, browser, system and device class, while the address and user agent are in
    memory (unknown, all null, with EVENT_VERSION=v0)."""
    if app[CONFIG].events.version != "v1":
        return dict.fromkeys(DIMENSION_FIELDS)
    headers = request.headers
    found = app[DIMENSIONS].derive(ip, headers.get("User-Agent"),
                                   cdn_country(request.remote, headers, app[PROXY_RANGES]))
    return {"country": found.country, "browser": found.browser, "os": found.os, "device": found.device}


async def event(request: web.Request) -> web.Response:
    """Turn a custom event into an anonymous visitor.event.v0 event; 204 once it is committed.

    The page view's rules throughout; a dropped event is not added to the drop counts, which
    count page views (the statistics compare them with the page views counted)."""
    app = request.app
    ip = admit(request, app, "events")
    fields = parse_event(await read_body(request, MAX_EVENT_BYTES), request.headers)
    now = app[CLOCK]()
    reason = app[FILTER].drop_reason(fields.domain, request.headers)
    if reason is not None:
        return dropped(reason)
    day = privacy.salt_day(now)
    payload = {
        "visitorHash": await visitor_hash(request, ip, fields.domain, day),
        "domain": fields.domain,
        "pathname": fields.pathname,
        "referrer": fields.referrer,
        "name": fields.name,
        "props": fields.props,
        "sessionContext": {"dailySaltRotation": day},
        **derived_dimensions(request, app, ip),
    }
    await app[PATHWAYS].write(VISITOR_EVENT, payload, now)
    return web.Response(status=204, headers=COUNTED)


def admit(request: web.Request, app: web.Application, what: str) -> str:
    """The client's address, once the rate limit (shared by page views and events) and the
    content type let the request in."""
    headers = request.headers
    ip = client_ip(request.remote, headers, app[PROXY_RANGES])
    wait = app[LIMITER].retry_after(ip)
    if wait is not None:
        raise ApiError(429, f"too many {what} from this address; try again in {wait} s", {"Retry-After": str(wait)})
    # What the tracker and most clients send, taken as it is; aiohttp parses anything else.
    if headers.get("Content-Type") not in USUAL_BODY_TYPES and request.content_type not in BODY_TYPES:
        raise ApiError(415, f"Content-Type must be application/json or text/plain, not {request.content_type}")
    return ip


def dropped(reason: str) -> web.Response:
    return web.Response(status=204, headers={filters.DROPPED_HEADER: reason})


async def visitor_hash(request: web.Request, ip: str, domain: str, day: str) -> str:
    return await request.app[HASHER](day, domain, ip, request.headers.get("User-Agent"))


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes the limit, and with 408 when it does not
    arrive within BODY_TIMEOUT_MS (the connection is then closed)."""
    if request.content.is_eof():  # the whole body came with the headers (the usual case): no timer
        return await _read_limited(request, limit)
    timeout = request.app[CONFIG].server.body_timeout
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
        return decode_json(body)
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None


def parse_object(body: bytes, fields: Sequence[str]) -> dict[str, Any]:
    """The body as a JSON object of no other keys than `fields`."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    if not data.keys() <= set(fields):
        unknown = sorted(set(data) - set(fields))
        names = ", ".join(repr(name[:64]) for name in unknown[:10])
        raise ApiError(400, f"unknown fields: {names}; expected {', '.join(fields[:-1])} and {fields[-1]}")
    return data


def parse_pageview(body: bytes, headers: Mapping[str, str]) -> PageviewInput:
    data = parse_object(body, PAGEVIEW_FIELDS)
    pathname = _text_field(data, "pathname", 1, MAX_PATH_LENGTH)
    referrer = _text_field(data, "referrer", 0, MAX_PATH_LENGTH)
    utm = parse_utm(data["utm"]) if "utm" in data else {}
    return PageviewInput(pathname, referrer, body_domain(data, headers), utm)


def parse_event(body: bytes, headers: Mapping[str, str]) -> EventInput:
    data = parse_object(body, EVENT_FIELDS)
    name = _text_field(data, "name", 1, MAX_EVENT_NAME_LENGTH)
    pathname = _text_field(data, "pathname", 1, MAX_PATH_LENGTH)
    referrer = _text_field(data, "referrer", 0, MAX_PATH_LENGTH) if "referrer" in data else ""
    props = data.get("props", {})
    problem = EVENT_PROPS.problem(props)
    if problem is not None:
        raise ApiError(400, f"props {problem}")
    return EventInput(name, pathname, referrer, body_domain(data, headers), props)


def body_domain(data: Mapping[str, Any], headers: Mapping[str, str]) -> str:
    """The body's domain, else the host of the Origin or Referer header."""
    if "domain" not in data:
        return domain_from_headers(headers)
    domain = normalize_host(_text_field(data, "domain", 1, MAX_DOMAIN_LENGTH))
    if domain is None:
        raise ApiError(400, "domain must be a hostname such as example.com")
    return domain


def parse_utm(value: Any) -> Mapping[str, str]:
    """The page's campaign parameters: an object of source, medium, campaign, term and content,
    each optional, each a string of 1 to 256 characters."""
    if not isinstance(value, dict):
        raise ApiError(400, "utm must be an object such as {\"source\": \"newsletter\"}")
    unknown = sorted(set(value) - set(UTM_KEYS))
    if unknown:
        names = ", ".join(repr(name[:64]) for name in unknown[:10])
        raise ApiError(400, f"utm has unknown keys: {names}; expected {', '.join(UTM_KEYS)}")
    for key in value:
        _text_field(value, key, 1, MAX_UTM_LENGTH, f"utm.{key}")
    return value


def _text_field(data: Mapping[str, Any], key: str, low: int, high: int, name: str = "") -> str:
    name = name or key
    if key not in data:
        raise ApiError(400, f"{name} is required")
    value = data[key]
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
    for network, mask in ranges:  # a plain loop: any() over a generator costs four times more per request
        if number & mask == network:
            return True
    return False


def client_ip(peer: str | None, headers: MultiMapping[str], ranges: ProxyRanges) -> str:
    """The socket peer, unless it is a trusted proxy: then X-Forwarded-For (its right-most
    address that is not itself a trusted proxy), else X-Real-IP, else CF-Connecting-IP."""
    trusted_peer = _peer(peer or "", ranges)
    if trusted_peer is None:
        return peer or "unknown"
    peer_text, trusted = trusted_peer
    if not trusted:
        return peer_text
    forwarded = _from_forwarded_for(headers, ranges)
    if forwarded is not None:
        return forwarded
    for name in ("X-Real-IP", "CF-Connecting-IP"):
        address = _address(headers.get(name, ""))
        if address is not None:
            return address[1]
    return peer_text


@lru_cache(maxsize=1024)
def _peer(peer: str, ranges: ProxyRanges) -> tuple[str, bool] | None:
    """The socket peer's canonical text and whether it is a trusted proxy: the same few peers
    (the proxies) send nearly every request."""
    address = _address(peer)
    return None if address is None else (address[1], _trusted(address[0], ranges))


def cdn_country(peer: str | None, headers: MultiMapping[str], ranges: ProxyRanges) -> str | None:
    """CF-IPCountry, believed only from a trusted proxy (anyone else could name any country)."""
    value = headers.get("CF-IPCountry")
    if value is None:
        return None
    peer_address = _address(peer or "")
    return value if peer_address is not None and _trusted(peer_address[0], ranges) else None


def _from_forwarded_for(headers: MultiMapping[str], ranges: tuple[tuple[int, int], ...]) -> str | None:
    values = headers.getall("X-Forwarded-For", [])
    if len(values) == 1 and "," not in values[0]:  # one hop, the usual case: its address, trusted or not
        address = _address(values[0])
        return None if address is None else address[1]
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
DEAD_LETTER_RETRY_AFTER = 30  # seconds: a failing handler (a full disk, a bug) is seldom fixed sooner


async def transformer(request: web.Request) -> web.Response:
    """One Flowcore event envelope (flowType or the legacy aggregator). 200 OK once processed
    or when it was processed before; 503 with Retry-After when its handler kept failing (the
    event waits in the dead letters), so the sender delivers it again."""
    config = request.app[CONFIG]
    secret = config.flowcore.transformer_secret
    if not secret:
        raise ApiError(404, "the transformer endpoint is disabled: set FLOWCORE_TRANSFORMER_SECRET to enable it")
    if not secret_matches(secret, request.headers.get(config.flowcore.transformer_secret_header)):
        raise ApiError(401, f"missing or wrong {config.flowcore.transformer_secret_header} header")
    raw = parse_json(await read_body(request, MAX_ENVELOPE_BYTES))
    try:
        event = parse_envelope(raw)
        outcome = await request.app[PATHWAYS].receive(event)
    except EnvelopeError as error:
        raise ApiError(400, str(error)) from None
    except UnknownPathwayError as error:
        raise ApiError(404, str(error)) from None
    except ContractError as error:
        raise ApiError(422, str(error)) from None
    if outcome is Outcome.DEAD_LETTERED:
        # 503, not 500: the platform's transformers redeliver on 408, 425, 429, 502, 503 and 504 only
        raise ApiError(503, f"the handler of {event.key} failed on event {event.event_id}; it is kept in the dead "
                       "letters; deliver it again later", {"Retry-After": str(DEAD_LETTER_RETRY_AFTER)})
    return web.Response(text="OK")


# -- service endpoints ----------------------------------------------------------------------------------------

ENDPOINTS = {
    "POST /api/pageview": "Record a page view: JSON {pathname, referrer, domain?, utm?}, as application/json or "
    "text/plain. 204; X-Collector-Dropped says why one was not counted; 429 beyond the rate limit.",
    "POST /api/event": "Record a custom event: JSON {name, pathname, domain?, referrer?, props?}, by the page view's "
    "rules; see docs/events.md.",
    "POST /api/transformer": "Flowcore delivers events here (X-Secret); enabled by FLOWCORE_TRANSFORMER_SECRET.",
    "GET /health": "Status, mode, version, backlog and the read model's lag in seconds, dead letters, last processed "
    "event.",
    "GET /script.js": "The tracker script to put on a site's pages (see docs/tracker.md).",
    "GET /script.clicks.js": "The tracker script with click tracking: tagged elements, outbound links, downloads "
    "(docs/events.md).",
    "GET /test.html": "A test page that sends page views to this collector.",
    "GET /api/stats": "Statistics of a domain over a period: ?domain=&period=today|yesterday|7d|30d|month|12mo|"
    "custom&from=&to=&limit=&filter=<dimension>:<value> (repeatable, AND), and event= for one custom event's "
    "properties. Needs STATS_TOKEN, or a loopback client.",
    "GET /api/sites": "The domains seen, with their first and last day: ?limit= (100) &after= (the previous page's "
    "next) &search= (part of the domain).",
    "GET /api/current-visitors": "Distinct visitors of ?domain= in the last five minutes.",
    "GET /api/dropped": "Page views not counted so far, every site together, by reason.",
    "GET /api/export": "CSV of ?domain=&from=&to=, daily totals or table=" + "|".join(stats.EXPORT_TABLES[1:]) + ".",
    "GET /dashboard": "The statistics dashboard.",
    "GET /openapi.json": "The OpenAPI 3.1 document of every endpoint and every error.",
    "GET /swagger": "Swagger UI over /openapi.json, when the swagger extra is installed.",
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
            counts = await store.health(local_delivery=config.flowcore.webhook is None)
            if store.write_failure is not None:
                with suppress(StorageUnavailableError):
                    await store.probe_write()  # so it says ok again once the disk is back, traffic or not
    except Exception as error:
        logger.error("health check: the database does not answer: %s", error)
        return web.json_response({"status": "unavailable", **about, "database": "unavailable"}, status=503)
    failure = store.write_failure
    if failure is not None:
        return web.json_response({
            "status": "unavailable", **about, "database": "not writable",
            "write_error": failure.error,
            "write_error_since": datetime.fromtimestamp(failure.since, UTC).isoformat(timespec="seconds"),
            "failed_writes": failure.count,
            "backlog": counts.backlog,
        }, status=503, headers={"Retry-After": str(STORAGE_RETRY_AFTER)})
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
        "sites": sites_health(request.app[FILTER].sites),
        "statistics": store.statistics_load(),
    }
    sink = request.app[SINK]
    body.update(sink.describe())
    if sink.halted:
        body["status"] = "halted"
    return web.json_response(body)


def sites_health(sites: filters.SiteLimit) -> dict[str, Any]:
    status: dict[str, Any] = {"counted": len(sites), "max": sites.max_sites, "limit_reached": sites.reached}
    if sites.reached:
        status["advice"] = sites.advice
    return status


async def test_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "test.html", headers={"Cache-Control": "no-cache"})


# -- statistics: /api/stats, /api/sites, /api/current-visitors, /api/export, /dashboard --------------------------

STATS_PARAMETERS = frozenset({"domain", "period", "from", "to", "limit", "event", "filter"})
REPEATABLE = frozenset({"filter"})  # filter=<dimension>:<value>, as often as needed (AND)
SITES_PARAMETERS = frozenset({"limit", "after", "search"})
EXPORT_PARAMETERS = frozenset({"domain", "from", "to", "table"})
PRIVATE = {"Cache-Control": "no-store"}
SET_A_TOKEN = (
    f"set STATS_TOKEN to a secret of at least {MIN_STATS_TOKEN_LENGTH} characters, restart, and send "
    "'Authorization: Bearer <token>'"
)
LOOPBACK_ONLY = "the statistics answer only clients on this machine; to read them from elsewhere, " + SET_A_TOKEN
FORWARDED_REFUSED = ("the statistics answer only clients on this machine, and this request came through a proxy "
                     "(it has a forwarding header); behind a reverse proxy, " + SET_A_TOKEN)
# Headers a proxy adds; a request that has any of them is not judged to be local, whoever sent it.
FORWARDING_HEADERS = ("X-Forwarded-For", "X-Real-IP", "CF-Connecting-IP", "Forwarded")


def require_reader(request: web.Request) -> None:
    """With STATS_TOKEN: the bearer token, compared in constant time. Without: loopback only,
    and loopback means the socket: a loopback peer with no forwarding header at all. A forwarded
    address never grants access, since whoever can reach a trusted proxy (or is on a trusted
    private range) can write one; and a proxy on this machine makes every visitor's socket local."""
    config = request.app[CONFIG]
    if config.stats.token:
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not secret_matches(config.stats.token, token.strip()):
            raise ApiError(401, "the statistics need the header 'Authorization: Bearer <STATS_TOKEN>'",
                           {"WWW-Authenticate": 'Bearer realm="statistics"'})
        return
    if not is_loopback_socket(request.remote):
        raise ApiError(403, LOOPBACK_ONLY)
    if any(name in request.headers for name in FORWARDING_HEADERS):
        raise ApiError(403, FORWARDED_REFUSED)


def is_loopback_socket(peer: str | None) -> bool:
    """Whether the socket peer is a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x)."""
    address = parse_ip(peer) if peer else None
    return address is not None and address.is_loopback


def query_params(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query string as single values; unknown or repeated parameters are refused."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        names = ", ".join(repr(name[:32]) for name in unknown[:10])
        raise ApiError(400, f"unknown parameters: {names}; expected {', '.join(sorted(allowed)) or 'none'}")
    repeated = sorted(name for name in set(request.query) - REPEATABLE if len(request.query.getall(name)) > 1)
    if repeated:
        raise ApiError(400, f"parameters given more than once: {', '.join(repeated)}")
    return dict(request.query)


def domain_param(params: Mapping[str, str]) -> str:
    text = params.get("domain", "")
    if not text:
        raise ApiError(400, "domain is required, e.g. domain=example.com")
    if text == NO_SITE:  # received events whose domain was empty or not a hostname
        return text
    domain = normalize_host(text) if len(text) <= MAX_DOMAIN_LENGTH else None
    if domain is None:
        raise ApiError(400, "domain must be a hostname such as example.com")
    return domain


def local_now(request: web.Request) -> datetime:
    return request.app[CLOCK]().astimezone(request.app[CONFIG].stats.timezone)


async def stats_api(request: web.Request) -> web.Response:
    require_reader(request)
    params = query_params(request, STATS_PARAMETERS)
    domain = domain_param(params)
    period = params.get("period", stats.DEFAULT_PERIOD)
    span = stats.period_range(period, local_now(request).date(), params.get("from"), params.get("to"))
    limit = stats.parse_limit(params.get("limit"))
    event_name = stats.parse_event_name(params.get("event"))
    filters = stats.parse_filters(request.query.getall("filter", []))
    config = request.app[CONFIG]
    store = request.app[STORE]
    async with store.reading() as db, store.spare_reading(wanted=bool(filters)) as spare:
        body = await stats.overview(db, domain, period, span, limit, request.app[CLOCK](), config.stats.timezone,
                                    filters, event_name, spare)
    return web.json_response(body, headers=PRIVATE)


async def sites_api(request: web.Request) -> web.Response:
    """A page of the sites; `next` is the `after` of the following page (null on the last)."""
    require_reader(request)
    params = query_params(request, SITES_PARAMETERS)
    limit = stats.parse_sites_limit(params.get("limit"))
    after = params.get("after", "")
    search = params.get("search", "")
    for name, value in (("after", after), ("search", search)):
        if len(value) > MAX_DOMAIN_LENGTH:
            raise ApiError(400, f"{name} must be at most {MAX_DOMAIN_LENGTH} characters long")
    async with request.app[STORE].reading() as db:
        body = await stats.sites(db, limit, after, search)
    return web.json_response(body, headers=PRIVATE)


async def dropped_api(request: web.Request) -> web.Response:
    require_reader(request)
    query_params(request, frozenset())
    return web.json_response(await stats.dropped_so_far(request.app[STORE].reader), headers=PRIVATE)


async def current_visitors_api(request: web.Request) -> web.Response:
    require_reader(request)
    domain = domain_param(query_params(request, frozenset({"domain"})))
    async with request.app[STORE].reading() as db:
        count = await stats.current_visitors(db, domain, request.app[CLOCK]())
    return web.json_response({"domain": domain, "current_visitors": count}, headers=PRIVATE)


async def export_api(request: web.Request) -> web.StreamResponse:
    """The CSV, streamed a block of days at a time: each block is one short query on a
    statistics connection, taken for that block only, so a slow client holds no connection
    and no read snapshot, and a ten-year export never holds the event loop for long."""
    require_reader(request)
    params = query_params(request, EXPORT_PARAMETERS)
    domain = domain_param(params)
    span = stats.custom_range(params.get("from"), params.get("to"))
    table = params.get("table", "daily")
    if table not in stats.EXPORT_TABLES:
        raise ApiError(400, f"table must be one of {', '.join(stats.EXPORT_TABLES)}, not {table[:32]!r}")
    store = request.app[STORE]
    blocks = stats.export_blocks(table, span)
    async with store.reading() as db:  # the first block before the answer starts: a refusal is still a 503
        text = stats.export_header(table) + await stats.export_block(db, table, domain, blocks[0])
    disposition = f'attachment; filename="{stats.export_filename(domain, table, span)}"'
    response = web.StreamResponse(headers={**PRIVATE, "Content-Disposition": disposition})
    response.content_type, response.charset = "text/csv", "utf-8"
    await response.prepare(request)
    await response.write(text.encode())
    for block in blocks[1:]:
        async with store.reading(may_refuse=False) as db:
            text = await stats.export_block(db, table, domain, block)
        await response.write(text.encode())
    await response.write_eof()
    return response


SWAGGER_MISSING = ("Swagger UI is not installed here: pip install '.[swagger]' and restart; the OpenAPI document "
                   "is at /openapi.json")
ASSET_CACHE_CONTROL = "public, max-age=86400"


async def swagger_page(request: web.Request) -> web.FileResponse:
    # Its Content-Security-Policy (scripts and styles from this origin only) comes from http_defense.
    if openapi.swagger_ui_dir() is None:
        raise ApiError(404, SWAGGER_MISSING)
    return web.FileResponse(STATIC_DIR / "swagger.html", headers={"Cache-Control": "no-cache"})


async def swagger_asset(request: web.Request) -> web.FileResponse:
    asset, directory = request.match_info["asset"], openapi.swagger_ui_dir()
    if directory is None:
        raise ApiError(404, SWAGGER_MISSING)
    if asset == "init.js":
        path = STATIC_DIR / "swagger-init.js"
    elif asset in openapi.SWAGGER_ASSETS:
        path = directory / asset
    else:
        raise ApiError(404, f"no such file of Swagger UI: {asset[:64]!r}")
    kind = "text/css" if asset.endswith(".css") else "text/javascript"  # as documented, whatever mimetypes says
    headers = {"Cache-Control": ASSET_CACHE_CONTROL, "Content-Type": f"{kind}; charset=utf-8"}
    return web.FileResponse(path, headers=headers)


async def dashboard(request: web.Request) -> web.FileResponse:
    # Its Content-Security-Policy (hashes of its inline script and style) comes from http_defense.
    return web.FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-cache"})


# -- the application ---------------------------------------------------------------------------------------------

def static_dir() -> Path:
    """static/ beside this file in a checkout (and an editable install); in an installed wheel,
    the package directory pyproject.toml installs it as."""
    here = Path(__file__).resolve().parent
    checkout = here / "static"
    return checkout if checkout.is_dir() else here / "flow_analytics_collector_static"


STATIC_DIR = static_dir()
CLICKS_SCRIPT = (STATIC_DIR / "script.js", STATIC_DIR / "script.clicks.js")
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
DIMENSIONS = web.AppKey("dimensions", dimensions.DimensionReader)


def utc_now() -> datetime:
    return datetime.now(UTC)


# The HTML pages: the dashboard sends no referrer anywhere; the test page keeps the browser's
# default, as a site's page would, and loads the tracker from its own origin.
PAGES = {
    "/dashboard": http_defense.Page(STATIC_DIR / "dashboard.html", "no-referrer"),
    "/test.html": http_defense.Page(STATIC_DIR / "test.html", "strict-origin-when-cross-origin", "'self'"),
    "/swagger": http_defense.Page(STATIC_DIR / "swagger.html", "no-referrer", "'self'", style_src="'self'"),
}


def create_app(config: Config, *, clock: Clock = utc_now) -> web.Application:
    app = web.Application(middlewares=[errors_and_cors], client_max_size=http_defense.CLIENT_MAX_SIZE)
    http_defense.install(app, PAGES)
    app[CONFIG] = config
    app[PROXY_RANGES] = proxy_ranges(config.server.trusted_proxies)
    app[CLOCK] = clock
    app[FILTER] = filters.PageviewFilter(
        FilterSettings(config.collection.allowed_domains, config.privacy.respect_gpc, config.privacy.respect_dnt),
        filters.BotDetector(),
        filters.SiteLimit(config.collection.max_sites),
    )
    app[LIMITER] = filters.RateLimiter(
        config.collection.rate_limit_per_second, config.collection.rate_limit_burst,
        config.collection.rate_limit_table_size,
    )
    try:
        app[DIMENSIONS] = dimensions.DimensionReader(config.events.geoip_database)
    except ValueError as error:
        raise ConfigError(f"GEOIP_DATABASE: {error}") from None
    # One context per resource, opened in this order and closed in the reverse: a failure half
    # way through start-up closes exactly what was opened.
    for context in (data_dir_lock, database, outbound_session, delivery, background_jobs):
        app.cleanup_ctx.append(context)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/script.js", script_handler(load_script(STATIC_DIR / "script.js")))
    app.router.add_get("/script.clicks.js", script_handler(load_script(*CLICKS_SCRIPT)))
    app.router.add_post("/api/pageview", pageview)
    app.router.add_route("OPTIONS", "/api/pageview", collection_preflight)
    app.router.add_post("/api/event", event)
    app.router.add_route("OPTIONS", "/api/event", collection_preflight)
    app.router.add_post("/api/transformer", transformer)
    app.router.add_get("/test.html", test_page)
    app.router.add_get("/api/stats", stats_api)
    app.router.add_get("/api/sites", sites_api)
    app.router.add_get("/api/current-visitors", current_visitors_api)
    app.router.add_get("/api/dropped", dropped_api)
    app.router.add_get("/api/export", export_api)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/openapi.json", openapi.handler(__version__))
    app.router.add_get("/swagger", swagger_page)
    app.router.add_get("/swagger/{asset}", swagger_asset)
    return app


async def database(app: web.Application) -> AsyncIterator[None]:
    """The store with its read model and router, and what hashes visitors; closed last."""
    config = app[CONFIG]
    secret_key = with_secret_key(config).privacy.secret_key  # DATA_DIR is locked by now
    # Local mode: page views go straight into the event log in their group commit.
    store = Store(config.server.data_dir / DB_FILENAME, config.stats.timezone,
                  log_directly=config.flowcore.webhook is None)
    read_model = new_read_model(store, config)
    try:
        await store.open()
        app[FILTER].sites.load(await read_model.counted_domains())  # MAX_SITES counts the sites already kept
        pathways = wire_pathways(store, read_model, config)
        app[STORE], app[READ_MODEL], app[PATHWAYS] = store, read_model, pathways
        salts = privacy.DailySalts(store) if config.privacy.mode == privacy.EPHEMERAL else None
        app[HASHER] = privacy.VisitorHasher(config.privacy.mode, secret_key, salts)
        app[DROPS] = filters.DropCounter(store)
        yield
    finally:
        await store.close()
        logger.info("stopped; the database is closed")


def wire_pathways(store: Store, read_model: ReadModel, config: Config) -> Pathways:
    """The contracts and their handlers: for the running collector and `dead-letters --retry`."""
    pathways = Pathways(store, max_attempts=config.events.handler_max_attempts,
                        log_received=config.flowcore.webhook is not None)
    for contract in (VISITOR_TRACKED, VISITOR_TRACKED_V1):  # both are received, whichever this one writes
        pathways.register(contract)
        pathways.handle(contract, read_model.record_pageviews)
    pathways.register(VISITOR_EVENT)
    pathways.handle(VISITOR_EVENT, read_model.events.record)
    return pathways


def new_read_model(store: Store, config: Config) -> ReadModel:
    """The read model with the configured bounds on custom events (before the store opens)."""
    return ReadModel(store, event_limits=event_limits(config))


def event_limits(config: Config) -> EventLimits:
    return EventLimits(config.events.names_per_day, config.events.property_values_per_day)


async def outbound_session(app: web.Application) -> AsyncIterator[None]:
    """The one HTTP client session, in Flowcore mode."""
    session = aiohttp.ClientSession() if app[CONFIG].flowcore.webhook else None
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
    if config.flowcore.webhook is not None and session is not None:  # a batch is one request to the webhook
        sink = FlowcoreSink(store, session, config.flowcore.webhook, send_v0=config.events.version == "v0")
        batch_size = config.flowcore.webhook.batch_size
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
    config = app[CONFIG]
    jobs = Jobs(app[STORE], app[READ_MODEL], app[DROPS], config.stats.raw_retention_days, app[CLOCK],
                local_delivery=config.flowcore.webhook is None)
    jobs.start()
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
        "%s %s: mode %s, data in %s, days in %s",
        SERVICE_NAME, __version__, config.mode, config.server.data_dir.resolve(), config.stats.timezone.key,
    )
    if config.flowcore.webhook is not None:
        contract = tracked_contract(config)
        target = config.flowcore.webhook.events_url(contract.flow_type, contract.event_type)
        logger.info("sending events to Flowcore: %s", target)
        if not config.flowcore.transformer_secret:
            logger.warning("FLOWCORE_TRANSFORMER_SECRET is not set: /api/transformer is disabled, so events sent "
                           "to Flowcore will not come back to build statistics here")
    if config.flowcore.transformer_secret:
        logger.info("POST /api/transformer is enabled; it reads the secret from the %s header",
                    config.flowcore.transformer_secret_header)
    for name in config.ignored_settings:
        logger.warning("%s is set but ignored: %s", name, IGNORED_SETTINGS[name])
    countries = (f"GEOIP_DATABASE {config.events.geoip_database}" if config.events.geoip_database
                 else "the built-in registry data")
    logger.info("page views become %s events%s", tracked_contract(config).event_type,
                "" if config.events.version == "v0" else f"; countries from {countries}")
    logger.info(
        "privacy mode %s; counting %s; rate limit %s",
        config.privacy.mode,
        "any domain" if config.collection.allowed_domains is None else "ALLOWED_DOMAINS only",
        f"{config.collection.rate_limit_per_second:g}/s, burst {config.collection.rate_limit_burst}"
        if config.collection.rate_limit_per_second else "off",
    )


def base_url(config: Config) -> str:
    """The collector's address as a browser on this machine reaches it."""
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):  # every interface: this machine's own name is the one to open
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}"


def log_addresses(config: Config) -> None:
    """Where to look next, once the collector listens: the first thing a newcomer needs."""
    logger.info("listening on %s:%d", config.server.host, config.server.port)
    base = base_url(config)
    readers = ""
    if not config.stats.token:
        readers = " (from this machine only, unless STATS_TOKEN is set)"
        if any(Path(marker).exists() for marker in ("/.dockerenv", "/run/.containerenv")):  # host is not loopback
            readers = " (set STATS_TOKEN to open it: in a container, a browser on the host is not this machine)"
    logger.info("dashboard: %s/dashboard%s", base, readers)
    logger.info("test page: %s/test.html", base)
    logger.info('snippet for your pages: <script defer src="%s/script.js"></script> '
                "(with the address your visitors reach this collector at)", base)


# -- the data directory's lock, and rebuild ---------------------------------------------------------------------


async def data_dir_lock(app: web.Application) -> AsyncIterator[None]:
    """The running collector holds DATA_DIR's lock, so a rebuild cannot start under it."""
    descriptor = lock_data_dir(app[CONFIG].server.data_dir)
    try:
        yield
    finally:
        os.close(descriptor)


def rebuild_command(config: Config) -> int:
    settle_garbage_collector()  # the replay makes and drops views as the served read model does: 10 % faster
    try:
        summary = asyncio.run(rebuild(config.server.data_dir, config.stats.timezone, utc_now(),
                                      progress_bar(sys.stderr), event_limits=event_limits(config)))
    except DataDirBusyError:
        print(f"collector rebuild: refused: a collector is running on {config.server.data_dir}; stop it, then run "
              "the rebuild again", file=sys.stderr)
        return 1
    except (DataDirError, DatabaseUnusableError) as error:
        logger.debug("rebuild failed", exc_info=True)
        print(f"collector rebuild: {error}", file=sys.stderr)
        return 1
    if summary.from_day is None:
        print("rebuild: the local event log is empty; the read model is unchanged")
    else:
        print(f"rebuild: recomputed the read model from {summary.from_day} ({config.stats.timezone.key} days) by "
              f"replaying {summary.replayed} logged page views and custom events; aggregates of earlier days were kept"
              + (f" ({summary.skipped} older logged events not replayed)" if summary.skipped else ""))
    return 0


def dead_letters_command(config: Config, retry: bool) -> int:
    """`collector.py dead-letters`: the events whose handler kept failing (readable while the
    collector runs). With --retry, after a fix, each runs once more; the collector must be stopped."""
    path = config.server.data_dir / DB_FILENAME
    if not path.exists():
        print(f"collector dead-letters: there is no database in {config.server.data_dir}", file=sys.stderr)
        return 1
    if not retry:
        try:
            letters = asyncio.run(read_dead_letters(path))
        except sqlite3.DatabaseError as error:
            logger.debug("reading the dead letters failed", exc_info=True)
            print(f"collector dead-letters: {unusable(path, error)}", file=sys.stderr)
            return 1
        for letter in letters:
            print(f"{letter.event_id}  {letter.pathway}  {letter.attempts} attempts, last at {letter.failed_at}: "
                  f"{letter.error}")
        print(f"{len(letters)} dead letters" + (
            "; after a fix, stop the collector and run `python collector.py dead-letters --retry`" if letters else ""))
        return 0
    try:
        results = asyncio.run(
            retry_dead_letters(config.server.data_dir, config.stats.timezone,
                               lambda store: wire_pathways(store, new_read_model(store, config), config))
        )
    except DataDirBusyError:
        print(f"collector dead-letters: refused: a collector is running on {config.server.data_dir}; stop it, then run "
              "`python collector.py dead-letters --retry` again", file=sys.stderr)
        return 1
    except (DataDirError, DatabaseUnusableError) as error:
        logger.debug("retrying the dead letters failed", exc_info=True)
        print(f"collector dead-letters: {error}", file=sys.stderr)
        return 1
    for result in results:
        outcome = "processed" if result.error is None else f"failed again: {result.error}"
        print(f"{result.letter.event_id}  {result.letter.pathway}: {outcome}")
    failed = sum(result.error is not None for result in results)
    print(f"retried {len(results)} dead letters: {len(results) - failed} processed, {failed} still failing")
    return 1 if failed else 0


# -- the command line ----------------------------------------------------------------------------------------

DOTENV_FILE = ".env"
SERVE, REBUILD, DEAD_LETTERS = "serve", "rebuild", "dead-letters"


def command_line() -> argparse.ArgumentParser:
    """`--help` names every command and every setting with its default, by feature, from config.FEATURES."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [-h] [--version] [COMMAND]",
        description="A privacy-first web analytics collector: anonymous page views into SQLite (or Flowcore),\n"
        "statistics in a dashboard. Without a command it serves.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    commands.add_parser(SERVE, help="collect page views and serve the dashboard (the default)")
    commands.add_parser(REBUILD, help="recompute the statistics from the local event log (stop the collector first)")
    dead_letters = commands.add_parser(DEAD_LETTERS, help="list the events whose handler kept failing")
    dead_letters.add_argument("--retry", action="store_true",
                              help="run each once more, after a fix (stop the collector first)")
    # A further command adds its parser here and a branch in run_command().
    return parser


def settings_help(width: int = 100) -> str:
    lines = [
        "settings:",
        "  Read once at start-up from the environment, and from a .env file in the working directory",
        "  (the environment wins). A bad value stops start-up with a message naming it.",
        "",
    ]
    for feature in FEATURES:
        lines.append(f"  {feature.TITLE}:")
        for setting in feature.SETTINGS:
            lines.append(f"    {setting.name}={setting.default}" if setting.default else f"    {setting.name} (unset)")
            lines += textwrap.wrap(setting.help, width, initial_indent=" " * 8, subsequent_indent=" " * 8,
                                   break_on_hyphens=False)  # X-Real-IP stays whole
        lines.append("")
    return "\n".join(lines).rstrip()


def read_dotenv(path: Path) -> dict[str, str]:
    """The settings in a .env file, parsed by python-dotenv as written: no ${VAR} expansion, so a
    secret with a $ in it stays whole and the file means what `docker run --env-file` reads.
    A name that is no setting is ignored with a warning (a typo would otherwise pass silently)."""
    if not path.is_file():
        return {}
    values = {name: value for name, value in dotenv_values(path, interpolate=False).items() if value is not None}
    known = set(DEFAULTS) | set(IGNORED_SETTINGS)  # the original's, which start-up reports as ignored
    unknown = sorted(set(values) - known)
    if unknown:
        logger.warning("%s: ignoring %s: not a setting (see --help)", path, ", ".join(unknown))
    logger.info("settings read from %s (the environment wins)", path.resolve())
    return {name: value for name, value in values.items() if name in known}


def run_command(args: argparse.Namespace, config: Config) -> int:
    if args.command == REBUILD:
        return rebuild_command(config)
    if args.command == DEAD_LETTERS:
        return dead_letters_command(config, retry=args.retry)
    return serve(config)


def main(argv: Sequence[str] | None = None) -> int:
    existing = list(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logrepeats.install([h for h in logging.getLogger().handlers if h not in existing])  # ours only, not a host's
    try:
        args = command_line().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (2), already printed
        return done.code if isinstance(done.code, int) else 2
    try:
        config = load_config({**read_dotenv(Path(DOTENV_FILE)), **os.environ})
    except ConfigError as error:
        print(f"collector: configuration error: {error}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config.server.log_level)
    return run_command(args, config)


def serve(config: Config) -> int:
    log_start(config)
    try:
        loop = new_event_loop(config.server.event_loop)
    except ConfigError as error:
        print(f"collector: configuration error: {error}", file=sys.stderr)
        return 2
    return serve_on(config, loop)


# Young collections wait for this many new objects, not CPython's 700: a router batch makes and
# drops hundreds of events' payloads and views at a time, and at 700 nearly every batch set off one
# collection after another (docs/performance.md#the-garbage-collector-issue-11-2026-12-02).
YOUNG_GENERATION_THRESHOLD = 5_000


def settle_garbage_collector() -> None:
    """What was made so far lives as long as the process: freeze it out of the collector's scans
    (the rare full collection scans a third as much), and let young collections come less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])


async def settle_once_started(_app: web.Application) -> None:
    """The served process's, not the app's: tests build many apps in one process."""
    settle_garbage_collector()


def serve_on(config: Config, loop: asyncio.AbstractEventLoop) -> int:
    """Run the app until stopped. What stops start-up is one line on stderr and a non-zero
    exit status, never a traceback (that goes to the log at DEBUG) and never a hang."""
    before, after = logrepeats.raise_descriptor_limit()
    if after > before:
        logger.info("file descriptors: raised the soft limit from %d to %d (the hard limit)", before, after)
    loop.set_exception_handler(logrepeats.LoopErrors())
    try:
        app = create_app(config)
        app.on_startup.append(settle_once_started)  # after the cleanup contexts' start-up
        web.run_app(
            app,
            loop=loop,
            host=config.server.host,
            port=config.server.port,
            access_log=logging.getLogger("aiohttp.access") if config.server.access_log else None,
            access_log_format=ACCESS_LOG_FORMAT,
            shutdown_timeout=10.0,
            print=lambda _banner: log_addresses(config),  # called once the socket listens
            **http_defense.server_options(config.server.keepalive_timeout),
        )
    except DataDirBusyError as error:
        return start_failed(f"{error}; stop it first", 1)
    except ConfigError as error:
        return start_failed(f"configuration error: {error}", 2)
    except (DataDirError, DatabaseUnusableError) as error:
        return start_failed(str(error), 1)
    except OSError as error:
        message = listen_problem(config, error)
        if message is None:
            raise
        return start_failed(message, 1)
    finally:
        if not loop.is_closed():  # run_app closes it, unless building the app failed first
            loop.close()
    return 0


def start_failed(message: str, status: int) -> int:
    logger.debug("start-up failed", exc_info=True)
    print(f"collector: {message}", file=sys.stderr)
    return status


def listen_problem(config: Config, error: OSError) -> str | None:
    """One line for a socket that cannot be bound; None for any other OSError."""
    where = f"{config.server.host}:{config.server.port}"
    if isinstance(error, socket.gaierror):
        return f"cannot listen on HOST={config.server.host}: the name does not resolve ({error.strerror}); " \
               "set HOST to an address of this machine, e.g. 0.0.0.0 or 127.0.0.1"
    if error.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is in use by another process; stop it, or set PORT"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: HOST is not an address of this machine; set HOST (0.0.0.0: every address)"
    if error.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); set PORT"
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
