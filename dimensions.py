"""What a page view's address and user agent say about the visitor, derived while both are in
memory and before both are dropped: the country, the browser, the operating system and the
device class. Names only, never a version: "Chrome", not "Chrome 131.0.6778".

A module of its own so collector.py stays the HTTP app: nothing here knows aiohttp, and nothing
here is written anywhere. The address is looked up and forgotten (no cache holds it); user agents
are keys of a bounded in-memory cache of verdicts, as the bot check keeps them.

The choices and their measurements are in docs/dimensions.md: countries come from `iptocc`
(the address blocks the regional internet registries assigned to each country, in the wheel),
or from an operator's MaxMind or DB-IP database (GEOIP_DATABASE); browsers and systems from
`ua-parser` with its builtin uap-core regexes (accelerated by `ua-parser-rs` or `google-re2`
when installed); the device class from a few rules over the user agent and the system."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import iptocc
import ua_parser
from ua_parser import Domain

from filters import MAX_USER_AGENT_LENGTH, LruCache

SOFTWARE_CACHE_SIZE = 10_000
MAX_NAME_LENGTH = 64  # the v1 contract's bound on browser and os
# Codes that name no country: unknown (XX, ZZ), Tor (T1, Cloudflare's), and the registries'
# region-wide blocks (EU, AP).
NO_COUNTRY = frozenset({"XX", "ZZ", "T1", "EU", "AP"})
COUNTRY_CODE = re.compile(r"[A-Z]{2}")

CountryLookup = Callable[[str], "str | None"]


@dataclass(frozen=True, slots=True)
class Software:
    """What a user agent says: browser and system names, and the device class."""

    browser: str | None
    os: str | None
    device: str | None


UNKNOWN_SOFTWARE = Software(None, None, None)


@dataclass(frozen=True, slots=True)
class Dimensions:
    """A page view's visitor, as far as the v1 event tells it; None where unknown."""

    country: str | None
    browser: str | None
    os: str | None
    device: str | None


class DimensionReader:
    """Derives a page view's dimensions; one per process."""

    def __init__(self, geoip_database: Path | None = None, cache_size: int = SOFTWARE_CACHE_SIZE) -> None:
        self._country = open_geoip_database(geoip_database) if geoip_database else registry_country
        self._software = SoftwareParser(cache_size)

    def derive(self, address: str, user_agent: str | None, cdn_country: str | None = None) -> Dimensions:
        """`cdn_country` is the CF-IPCountry header, passed only when a trusted proxy sent it:
        then it decides the country (XX and T1 mean unknown) and the address is not looked up."""
        country = country_code(cdn_country) if cdn_country is not None else country_code(self._country(address))
        software = self._software.parse(user_agent)
        return Dimensions(country, software.browser, software.os, software.device)

    @property
    def cached(self) -> int:
        return self._software.cached


def country_code(code: str | None) -> str | None:
    """An ISO 3166-1 alpha-2 code, or None for anything that names no country."""
    if code is None:
        return None
    code = code.strip().upper()
    return code if COUNTRY_CODE.fullmatch(code) and code not in NO_COUNTRY else None


def registry_country(address: str) -> str | None:
    """The country the address's block is registered to (iptocc: IPv4 and IPv6, offline); None for
    private, reserved and unassigned addresses, and for anything that is not an address."""
    return iptocc.country_code(address)


def open_geoip_database(path: Path) -> CountryLookup:
    """A lookup in an operator's .mmdb (MaxMind GeoLite2/GeoIP2 or DB-IP, country or city; also the
    flat `country_code` of IPinfo's). Raises ValueError, naming the file, when it cannot be read."""
    import maxminddb  # only when GEOIP_DATABASE is set

    try:
        reader = maxminddb.open_database(str(path))
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as error:
        raise ValueError(f"cannot read {path} as a MaxMind DB file: {error}") from None

    def lookup(address: str) -> str | None:
        try:
            record = reader.get(address)
        except ValueError:  # not an address, or IPv6 in an IPv4-only database
            return None
        return _mmdb_country(record)

    return lookup


def _mmdb_country(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for key in ("country", "registered_country"):
        place = record.get(key)
        if isinstance(place, dict) and isinstance(place.get("iso_code"), str):
            return str(place["iso_code"])
    code = record.get("country_code")
    return code if isinstance(code, str) else None


class SoftwareParser:
    """Browser and system from ua-parser (only those two of its three rule sets: the device rules
    name models, which are not kept), the device class from rules of our own; cached per user agent."""

    def __init__(self, cache_size: int = SOFTWARE_CACHE_SIZE) -> None:
        self._resolve = _resolver()
        self._cache: LruCache[str, Software] = LruCache(cache_size)
        self.misses = 0
        self.parse("warm-up")  # loads the rules before the first request, not during it

    def parse(self, user_agent: str | None) -> Software:
        agent = (user_agent or "").strip()
        if not agent or len(agent) > MAX_USER_AGENT_LENGTH:
            return UNKNOWN_SOFTWARE
        software = self._cache.get(agent)
        if software is None:
            self.misses += 1
            software = self._classify(agent)
            self._cache.put(agent, software)
        return software

    def _classify(self, agent: str) -> Software:
        if not agent.isascii():  # bytes that were not UTF-8 arrive as lone surrogates, which re2 refuses
            agent = agent.encode("utf-8", "replace").decode("utf-8")
        result = self._resolve(agent, Domain.USER_AGENT | Domain.OS)
        browser = browser_name(result.user_agent.family) if result.user_agent else None
        system = os_name(result.os.family) if result.os else None
        return Software(browser, system, device_class(agent, system))

    @property
    def cached(self) -> int:
        return len(self._cache)


@cache
def _resolver() -> ua_parser.Resolver:
    """The rules, compiled once per process (about 0.1 s with google-re2) and shared: a resolver
    holds no state of its own."""
    agents, systems, _models = ua_parser.load_lazy_builtins()
    return ua_parser.BestAvailableResolver((agents, systems, []))


# A version number, and everything after it: names are kept, versions never.
VERSION = re.compile(r"[\s/_-]*v?\d+(?:[._]\d+)+.*$")
BROWSER_NAMES = {
    "Mobile Safari": "Safari",
    "Mobile Safari UI/WKWebView": "Safari WebView",
    "Chrome Mobile iOS": "Chrome",
    "Firefox iOS": "Firefox",
    "Edge Mobile": "Edge",
}
OS_NAMES = {"Mac OS X": "macOS"}


def browser_name(family: str) -> str | None:
    """The browser's family name, the same on a phone as on a computer (the device class tells
    them apart): "Chrome Mobile" and "Chrome Mobile iOS" are "Chrome"."""
    if family == "Other":
        return None
    name = BROWSER_NAMES.get(family) or family.replace(" Mobile", "")
    return _bare(name)


def os_name(family: str) -> str | None:
    """The system's family name: "Windows" for every Windows but the phone's, "macOS" for "Mac OS X"."""
    if family == "Other":
        return None
    if family.startswith("Windows") and not family.startswith("Windows Phone"):
        return "Windows"
    return _bare(OS_NAMES.get(family, family))


def _bare(name: str) -> str | None:
    name = VERSION.sub("", name).strip()[:MAX_NAME_LENGTH]
    return name or None


TABLET = re.compile(r"iPad|Tablet(?! PC)|Kindle|Silk/|PlayBook")
# Televisions, set-top boxes and game consoles: neither desktop, mobile nor tablet.
NO_DEVICE_CLASS = re.compile(r"Smart-?TV|\bTV\b|GoogleTV|Android TV|AFT[A-Z]|CrKey|Web0S|BRAVIA|Roku|PlayStation|"
                             r"Xbox|Nintendo", re.IGNORECASE)
MOBILE_SYSTEMS = frozenset({"iOS", "Windows Phone", "KaiOS", "BlackBerry OS", "Symbian OS", "Firefox OS"})


def device_class(agent: str, system: str | None) -> str | None:
    """desktop, mobile or tablet, or None: the rules browsers themselves follow. Mobile browsers
    put "Mobi" in the user agent (MDN's advice for telling phones apart); Android browsers leave
    "Mobile" out on tablets (Chrome's documented rule); an iPad says iPad, unless it asks for
    desktop sites (the iPadOS default), when it says Macintosh and counts as a desktop."""
    if TABLET.search(agent):
        return "tablet"
    if NO_DEVICE_CLASS.search(agent):
        return None
    if "Mobi" in agent or system in MOBILE_SYSTEMS:
        return "mobile"
    if system == "Android":
        return "tablet"
    return None if system is None else "desktop"
