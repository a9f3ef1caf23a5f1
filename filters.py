"""What is not counted, and who is slowed down: the drop decisions for page views (bots,
headless browsers, prefetches, consent signals, the domain allow-list), the CORS origin
allow-list, the per-address rate limiter, and the in-memory drop counts.

A module of its own so collector.py stays the HTTP app: nothing here knows aiohttp, and
nothing here is written anywhere but memory, except the drop counts (domain, day, reason and
a number) that DropCounter hands to the store."""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Generic, TypeVar

from crawlerdetect import CrawlerDetect

if TYPE_CHECKING:
    from store import Store

logger = logging.getLogger(__name__)

DROPPED_HEADER = "X-Collector-Dropped"


class DropReason(StrEnum):
    """Why a page view was not counted: the X-Collector-Dropped header, the drop counts,
    /api/stats, /api/dropped, the dashboard and the OpenAPI document all name them from here."""

    BOT = "bot"
    HEADLESS = "headless"
    EMPTY_USER_AGENT = "empty-user-agent"
    PREFETCH = "prefetch"
    DOMAIN_NOT_ALLOWED = "domain-not-allowed"
    GPC = "gpc"
    DNT = "dnt"
    SITE_LIMIT = "site-limit"


# What each reason means to the person who sent the page view, and what to do about it; the
# log says it, and the dashboard and the test page say the same.
EXPLANATIONS: dict[str, str] = {
    DropReason.BOT: "sent by a crawler, a bot or an HTTP library such as curl or python-requests; to send one "
    "by hand, give a browser's User-Agent: curl -A 'Mozilla/5.0 ...'",
    DropReason.HEADLESS: "sent by an automated browser: HeadlessChrome, Puppeteer, Playwright, Selenium and the like",
    DropReason.EMPTY_USER_AGENT: "sent without a User-Agent header",
    DropReason.PREFETCH: "a prefetch or prerender, which nobody may ever have seen",
    DropReason.DOMAIN_NOT_ALLOWED: "its domain is not in ALLOWED_DOMAINS",
    DropReason.GPC: "the browser asks not to be tracked with Global Privacy Control, Sec-GPC: 1, as Brave does by "
    "default; RESPECT_GPC=false would count it",
    DropReason.DNT: "the browser sends Do Not Track, DNT: 1, and RESPECT_DNT is true",
    DropReason.SITE_LIMIT: "its domain would be a new site beyond MAX_SITES; set ALLOWED_DOMAINS to your sites, or "
    "raise MAX_SITES",
}
# Drops for a domain outside ALLOWED_DOMAINS, or beyond MAX_SITES, are counted under this name,
# not the one sent: invented names are not worth keeping, and a flood of them cannot grow the table.
UNNAMED_REASONS = frozenset({DropReason.DOMAIN_NOT_ALLOWED, DropReason.SITE_LIMIT})
# Counted per domain; the unnamed ones are counted for all such domains together (OTHER_DOMAINS).
PER_DOMAIN_REASONS = tuple(reason for reason in DropReason if reason not in UNNAMED_REASONS)
OTHER_DOMAINS = "*"

MAX_DOMAIN_LENGTH = 253
HOST_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
# The site of a received event whose domain is empty or not a hostname (the original collector's
# contract allowed any string). Parentheses and a space: no hostname can ever be spelled so.
NO_SITE = "(no site)"


@lru_cache(maxsize=1024)
def normalize_host(text: str) -> str | None:
    """A lower-case hostname (IDNA-encoded) or a bracketed IPv6 address; None if it is neither."""
    host = text.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]"
        except ValueError:
            return None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not 0 < len(host) <= MAX_DOMAIN_LENGTH or not all(HOST_LABEL.fullmatch(label) for label in host.split(".")):
        return None
    return host


BOT_CACHE_SIZE = 10_000
# No browser sends a longer user agent; the regex list is not run over one (it costs time per byte).
MAX_USER_AGENT_LENGTH = 1024
# Automation that announces itself; crawlerdetect knows most of these as generic bots, but the
# reason matters to the operator, so they are told apart first.
HEADLESS_PATTERN = re.compile(
    r"HeadlessChrome|PhantomJS|SlimerJS|HtmlUnit|Puppeteer|Playwright|Selenium|webdriver",
    re.IGNORECASE,
)

SUBDOMAIN = re.compile(r"[a-z0-9_.-]+")
K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A dict that forgets its least recently used entry beyond `size` entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class BotDetector:
    """The user agent's verdict: empty, headless, a known crawler (crawlerdetect's list, a port
    of JayBizzle/Crawler-Detect) or a person; cached per user agent, in memory only.

    A cache miss costs about 0.3 ms (one large regex); a hit well under a microsecond, and real
    traffic has few distinct user agents."""

    def __init__(self, cache_size: int = BOT_CACHE_SIZE) -> None:
        self._detect = CrawlerDetect()
        self._detect.is_crawler("warm-up")  # compiles the list (about 50 ms, once a process) before the first request
        self._cache: LruCache[str, str] = LruCache(cache_size)
        self.misses = 0

    def reason(self, user_agent: str | None) -> str | None:
        agent = (user_agent or "").strip()
        if not agent:
            return DropReason.EMPTY_USER_AGENT
        if len(agent) > MAX_USER_AGENT_LENGTH:
            return DropReason.BOT
        verdict = self._cache.get(agent)
        if verdict is None:
            self.misses += 1
            verdict = self._classify(agent)
            self._cache.put(agent, verdict)
        return verdict or None

    def _classify(self, agent: str) -> str:
        """"" for a person: the cache stores a string for every verdict."""
        if HEADLESS_PATTERN.search(agent):
            return DropReason.HEADLESS
        return DropReason.BOT if self._detect.is_crawler(agent) else ""

    @property
    def cached(self) -> int:
        return len(self._cache)


def is_prefetch(headers: Mapping[str, str]) -> bool:
    """A speculative load nobody may look at: Sec-Purpose (prefetch, prerender), and the older
    Purpose, X-Purpose and X-Moz headers."""
    for name in ("Sec-Purpose", "Purpose", "X-Purpose", "X-Moz"):
        value = headers.get(name)
        if value is not None and any(word in value.lower() for word in ("prefetch", "prerender", "preview")):
            return True
    return False


@dataclass(frozen=True)
class DomainAllowList:
    """ALLOWED_DOMAINS: exact hostnames, and `*.example.com` for every subdomain of
    example.com at any depth, but not example.com itself (as a certificate's wildcard):
    list both to allow both."""

    exact: frozenset[str]
    parents: frozenset[str]

    def allows(self, domain: str) -> bool:
        if domain in self.exact:
            return True
        labels = domain.split(".")
        return any(".".join(labels[index:]) in self.parents for index in range(1, len(labels)))


@dataclass(frozen=True)
class OriginAllowList:
    """ALLOWED_ORIGINS: `*` (any), exact origins (`https://example.com`, `http://localhost:8080`),
    and `https://*.example.com` for any subdomain's origin on that scheme and port."""

    any: bool
    exact: frozenset[str]
    wildcards: tuple[tuple[str, str], ...]  # (scheme://, .example.com[:port])

    def allows(self, origin: str) -> bool:
        if self.any:
            return True
        origin = origin.lower()
        if origin in self.exact:
            return True
        for scheme, suffix in self.wildcards:
            if origin.startswith(scheme) and origin.endswith(suffix):
                label = origin[len(scheme) : len(origin) - len(suffix)]
                if label and SUBDOMAIN.fullmatch(label):
                    return True
        return False


ANY_ORIGIN = OriginAllowList(True, frozenset(), ())
Normalize = Callable[[str], "str | None"]  # a hostname as page views' domains are normalised, or None


def parse_domains(text: str, normalize: Normalize) -> DomainAllowList | None:
    """ALLOWED_DOMAINS: comma-separated hostnames and *.hostname; None (any domain) when empty."""
    exact: set[str] = set()
    parents: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        wildcard = item.startswith("*.")
        host = normalize(item[2:] if wildcard else item)
        if host is None:
            raise ValueError(f"{item!r} is not a hostname or *.hostname")
        (parents if wildcard else exact).add(host)
    return DomainAllowList(frozenset(exact), frozenset(parents)) if exact or parents else None


def parse_origins(text: str, normalize: Normalize) -> OriginAllowList:
    """ALLOWED_ORIGINS: * for any; else origins as a browser sends them (scheme://host[:port]),
    whose host may be *.name."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items or "*" in items:
        return ANY_ORIGIN
    exact: set[str] = set()
    wildcards: list[tuple[str, str]] = []
    for item in items:
        scheme, separator, host = item.lower().partition("://")
        hostname, _, port = host.partition(":")
        wildcard = hostname.startswith("*.")
        bare = normalize(hostname[2:] if wildcard else hostname)
        if (scheme not in ("http", "https") or not separator or bare is None or bare.startswith("[")
                or (port and not (port.isdigit() and 0 < int(port) < 65536))):
            raise ValueError(f"{item!r} is not an origin such as https://example.com or https://*.example.com")
        suffix = bare + (f":{port}" if port else "")
        if wildcard:
            wildcards.append((f"{scheme}://", "." + suffix))
        else:
            exact.add(f"{scheme}://{suffix}")
    return OriginAllowList(False, frozenset(exact), tuple(wildcards))


@dataclass(frozen=True)
class FilterSettings:
    allowed_domains: DomainAllowList | None
    respect_gpc: bool
    respect_dnt: bool


class SiteLimit:
    """MAX_SITES: the distinct domains counted. A page view that would be counted for a domain
    not seen before, once the limit is reached, is dropped instead, so invented domains cannot
    grow the database without bound. Knows the domains already counted (`load` at start-up);
    the first refusal is logged once."""

    def __init__(self, max_sites: int) -> None:
        self.max_sites = max_sites
        self._domains: set[str] = set()
        self.reached = False

    def load(self, domains: set[str]) -> None:
        self._domains = set(domains)
        if len(self._domains) >= self.max_sites:
            self._reach()

    def admits(self, domain: str) -> bool:
        if domain in self._domains:
            return True
        if len(self._domains) >= self.max_sites:
            if not self.reached:
                self._reach()
            return False
        self._domains.add(domain)
        return True

    def _reach(self) -> None:
        self.reached = True
        logger.warning("%s", self.advice)

    @property
    def advice(self) -> str:
        return (f"MAX_SITES ({self.max_sites}) is reached: page views for further new domains are dropped "
                f"({DROPPED_HEADER}: {DropReason.SITE_LIMIT}); set ALLOWED_DOMAINS to the sites you run, "
                "or raise MAX_SITES")

    def __len__(self) -> int:
        return len(self._domains)


class PageviewFilter:
    """Why a valid page view is not counted, or None to count it. The order decides which
    reason a request with several is counted under: the domain first (so every other count
    belongs to an allowed site), then what the request is (prefetch, user agent), then what
    the visitor asked for (GPC, DNT), and last the site limit (so only a page view that would
    be counted makes a new site)."""

    def __init__(self, settings: FilterSettings, bots: BotDetector, sites: SiteLimit | None = None) -> None:
        self.settings = settings
        self.bots = bots
        self.sites = sites if sites is not None else SiteLimit(1_000_000)

    def drop_reason(self, domain: str, headers: Mapping[str, str]) -> str | None:
        allowed = self.settings.allowed_domains
        if allowed is not None and not allowed.allows(domain):
            return DropReason.DOMAIN_NOT_ALLOWED
        if is_prefetch(headers):
            return DropReason.PREFETCH
        reason = self.bots.reason(headers.get("User-Agent"))
        if reason is not None:
            return reason
        if self.settings.respect_gpc and headers.get("Sec-GPC", "").strip() == "1":
            return DropReason.GPC
        if self.settings.respect_dnt and headers.get("DNT", "").strip() == "1":
            return DropReason.DNT
        if not self.sites.admits(domain):
            return DropReason.SITE_LIMIT
        return None


# -- drop counts ----------------------------------------------------------------------------------



class DropCounter:
    """Drop counts per (domain, local day, reason), added up in memory and written in one
    transaction every second (maintenance.Jobs), so a dropped request never waits for the disk.
    Between flushes the table holds at most the distinct keys of a second's requests."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self._explained: set[str] = set()

    def count(self, domain: str, day: str, reason: str) -> None:
        self._pending[(OTHER_DOMAINS if reason in UNNAMED_REASONS else domain, day, reason)] += 1
        self._log(domain, reason)

    def _log(self, domain: str, reason: str) -> None:
        """The first drop of each reason at INFO, with what it means (the first test by hand
        with curl is dropped as a bot, and should say so); the others at DEBUG. The domain and
        the reason only: never the address or the user agent."""
        if reason not in self._explained:
            self._explained.add(reason)
            logger.info("not counted: a page view for %s, reason %s: %s. Further ones are logged at DEBUG",
                        domain, reason, EXPLANATIONS[reason])
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("not counted: a page view for %s (%s)", domain, reason)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, defaultdict(int)
        try:
            await self._store.add_dropped(sorted((*key, count) for key, count in batch.items()))
        except Exception:
            for key, count in batch.items():  # kept for the next flush
                self._pending[key] += count
            raise


# -- rate limiting ----------------------------------------------------------------------------------


EPSILON = 1e-9  # seconds


def limiter_key(address: str) -> bytes | str:
    """An IPv4 address, or the /64 network of an IPv6 address (one subscriber's usual share);
    anything unreadable is its own key."""
    try:  # IPv4 first, through inet_pton: most addresses are new ones, and ipaddress takes ~10 times longer
        return socket.inet_pton(socket.AF_INET, address)
    except (OSError, ValueError):  # ValueError: a NUL in the text
        return _ipv6_limiter_key(address)


@lru_cache(maxsize=4096)
def _ipv6_limiter_key(address: str) -> bytes | str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    return parsed.packed if parsed.version == 4 else parsed.packed[:8]


class RateLimiter:
    """A token bucket per client key: `burst` requests at once, refilled at `rate` a second.

    Kept as GCRA's one number per key (the moment the bucket will be full again), in an
    OrderedDict by last use: full buckets at the front are pruned as requests come, and beyond
    `size` keys the least recently used is evicted (it starts again full), so memory stays
    bounded under a flood from many addresses. Keys live in memory only."""

    def __init__(self, rate: float, burst: int, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._clock = clock
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._tolerance = (burst - 1) * self._interval
        self._full_at: OrderedDict[bytes | str, float] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def retry_after(self, address: str) -> int | None:
        """None when this request may go on (and is counted); else whole seconds to wait, at least 1."""
        if not self.enabled:
            return None
        key = limiter_key(address)
        now = self._clock()
        table = self._full_at
        full_at = max(table.get(key, now), now)
        wait = full_at - now - self._tolerance
        if wait <= EPSILON:  # sums of 0.1 drift: the 50th of a burst of 50 must not be refused
            table[key] = full_at + self._interval
            table.move_to_end(key)
        self._prune(now)
        return max(1, math.ceil(wait)) if wait > EPSILON else None

    def _prune(self, now: float) -> None:
        table = self._full_at
        for _ in range(2):  # two at a time: the table shrinks faster than one request adds
            oldest = next(iter(table), None)
            if oldest is None or (table[oldest] > now and len(table) <= self.size):
                return
            del table[oldest]

    def __len__(self) -> int:
        return len(self._full_at)
