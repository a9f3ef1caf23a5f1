"""The v1 dimensions: country, browser, system and device class from the address and the user
agent (both dropped afterwards), the page's campaign, and the visitor.tracked.v1 event over HTTP."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import Start
from helpers import SECRET, FakeClock, drained, query, utc
from mmdb_writer import MMDBWriter
from netaddr import IPSet

import dimensions
from collector import create_app
from config import ConfigError, load_config
from dimensions import DimensionReader, Dimensions, SoftwareParser
from pathways import VISITOR_TRACKED_V1, ContractError

# Real user agents of current browsers, and what each must come to.
AGENTS = {
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Windows", "desktop"),
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "macOS", "desktop"),
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Linux", "desktop"),
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 "
    "Firefox/133.0": ("Firefox", "Windows", "desktop"),
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 "
    "Firefox/133.0": ("Firefox", "Ubuntu", "desktop"),
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
    "Safari/605.1.15": ("Safari", "macOS", "desktop"),
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36 Edg/131.0.0.0": ("Edge", "Windows", "desktop"),
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
    "Mobile/15E148 Safari/604.1": ("Safari", "iOS", "mobile"),
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1": ("Chrome", "iOS", "mobile"),
    "Mozilla/5.0 (iPad; CPU OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
    "Mobile/15E148 Safari/604.1": ("Safari", "iOS", "tablet"),
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile "
    "Safari/537.36": ("Chrome", "Android", "mobile"),
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Android", "tablet"),
    "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Android", "tablet"),
    "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 "
    "Chrome/122.0.0.0 Mobile Safari/537.36": ("Samsung Internet", "Android", "mobile"),
    "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0": ("Firefox", "Android", "mobile"),
    "Mozilla/5.0 (Android 14; Tablet; rv:133.0) Gecko/133.0 Firefox/133.0": ("Firefox", "Android", "tablet"),
    "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Chrome OS", "desktop"),
    "Mozilla/5.0 (Linux; Android 9; BRAVIA 4K GB ATV3) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/91.0.4472.88 "
    "Safari/537.36": ("Chrome", "Android", None),
    "curl/8.5.0": ("curl", None, None),
    "something nobody sends": (None, None, None),
}

# Addresses whose registration is documented: Google Public DNS (US), RIPE NCC's own site (NL),
# Yandex.DNS (RU), and 1.0.16.1, iptocc's own example (JP); then addresses that belong to nobody.
KNOWN_ADDRESSES = {
    "8.8.8.8": "US",
    "2001:4860:4860::8888": "US",
    "193.0.6.139": "NL",
    "2001:67c:2e8:22::c100:68b": "NL",
    "77.88.8.8": "RU",
    "2a02:6b8::feed:0ff": "RU",
    "1.0.16.1": "JP",
    "192.0.2.1": None,  # documentation
    "2001:db8::1": None,  # documentation
    "10.1.2.3": None,
    "127.0.0.1": None,
    "::1": None,
    "unknown": None,  # what client_ip answers without a peer
}


@pytest.fixture(scope="module")
def reader() -> DimensionReader:
    return DimensionReader()


@pytest.mark.parametrize(("agent", "expected"), AGENTS.items(), ids=[a[:40] for a in AGENTS])
def test_browser_system_and_device_class_of_real_user_agents(
    reader: DimensionReader, agent: str, expected: tuple[str | None, str | None, str | None]
) -> None:
    found = reader.derive("192.0.2.1", agent)
    assert (found.browser, found.os, found.device) == expected


def test_names_never_carry_a_version(reader: DimensionReader) -> None:
    for agent in AGENTS:
        found = reader.derive("192.0.2.1", agent)
        for name in (found.browser, found.os):
            assert name is None or not re.search(r"\d", name), name
    assert dimensions.browser_name("Firefox 3.5 Beta") == "Firefox"
    assert dimensions.os_name("Windows 7") == "Windows"
    assert dimensions.os_name("Windows Phone") == "Windows Phone"


@pytest.mark.parametrize(("address", "country"), KNOWN_ADDRESSES.items())
def test_the_country_of_known_addresses(reader: DimensionReader, address: str, country: str | None) -> None:
    assert reader.derive(address, None).country == country


@pytest.mark.parametrize(
    ("header", "country"),
    [("DK", "DK"), ("se", "SE"), (" NO ", "NO"), ("XX", None), ("T1", None), ("EU", None), ("", None),
     ("DNK", None), ("1A", None)],
)
def test_a_trusted_cdn_country_decides_and_unknown_means_none(
    reader: DimensionReader, header: str, country: str | None
) -> None:
    # 8.8.8.8 would be US: the header, when given, is the answer, and XX (unknown) or T1 (Tor) is no country
    assert reader.derive("8.8.8.8", None, header).country == country


def test_nothing_is_known_of_a_missing_empty_or_overlong_user_agent(reader: DimensionReader) -> None:
    for agent in (None, "", "   ", "Mozilla/5.0 " + "x" * 2000):
        assert reader.derive("192.0.2.1", agent) == Dimensions(None, None, None, None)


def test_a_user_agent_that_was_not_utf8_is_parsed_not_refused(reader: DimensionReader) -> None:
    # aiohttp hands undecodable header bytes over as lone surrogates; the regex engines refuse those
    found = reader.derive("192.0.2.1", "Mozilla/5.0 (X11; Linux x86_64) \udcff Chrome/131.0.0.0 Safari/537.36")
    assert (found.browser, found.os, found.device) == ("Chrome", "Linux", "desktop")
    assert reader.derive("192.0.2.1", "\udc80\udc81").browser is None


def test_verdicts_are_cached_per_user_agent_with_a_bound() -> None:
    parser = SoftwareParser(cache_size=3)
    warm = parser.misses  # the warm-up parse at start
    agents = list(AGENTS)[:5]
    first = [parser.parse(agent) for agent in agents]
    assert parser.misses == warm + 5 and parser.cached == 3
    assert parser.parse(agents[-1]) is first[-1]  # a hit: no parse, the same verdict
    assert parser.misses == warm + 5
    assert parser.parse(agents[0]) == first[0]  # forgotten, parsed again
    assert parser.misses == warm + 6 and parser.cached == 3


def write_mmdb(path: Path, networks: dict[str, dict[str, object]]) -> Path:
    """A small MaxMind DB file, shaped like GeoLite2-Country's records."""
    writer = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", ipv4_compatible=True)
    for network, record in networks.items():
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return path


def test_a_geoip_database_replaces_the_registry_data(tmp_path: Path) -> None:
    path = write_mmdb(tmp_path / "country.mmdb", {
        "193.0.6.0/24": {"country": {"iso_code": "DE", "names": {"en": "Germany"}}},
        "2001:67c:2e8::/48": {"registered_country": {"iso_code": "FR"}},  # no `country`: the registered one
        "8.8.8.0/24": {"country_code": "CA"},  # IPinfo's flat shape
        "9.9.9.0/24": {"continent": {"code": "EU"}},  # a record without a country
    })
    reader = DimensionReader(geoip_database=path)
    assert reader.derive("193.0.6.139", None).country == "DE"  # the registry says NL
    assert reader.derive("2001:67c:2e8:22::c100:68b", None).country == "FR"
    assert reader.derive("8.8.8.8", None).country == "CA"
    assert reader.derive("9.9.9.9", None).country is None
    assert reader.derive("77.88.8.8", None).country is None  # not in the file: unknown, no fallback
    assert reader.derive("not an address", None).country is None
    assert reader.derive("77.88.8.8", None, "DK").country == "DK"  # a trusted CDN's header still decides


@pytest.mark.parametrize("content", [None, b"", b"not a maxmind database" * 100])
def test_an_unreadable_geoip_database_stops_start_up_naming_the_setting(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.mmdb"  # missing, empty, or not a MaxMind DB file
    if content is not None:
        path.write_bytes(content)
    config = load_config({"DATA_DIR": str(tmp_path / "data"), "GEOIP_DATABASE": str(path)})
    with pytest.raises(ConfigError, match=r"GEOIP_DATABASE: cannot read .*broken\.mmdb as a MaxMind DB file"):
        create_app(config)


# -- the event over HTTP ------------------------------------------------------------------------------------

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1"
)


def independent_hash(ip: str, agent: str, day: str) -> str:
    salt = hashlib.sha256(f"{day}:{SECRET}".encode()).hexdigest()
    return hashlib.sha256(f"{ip}:{agent}:{salt}".encode()).hexdigest()


async def post(client, body: object, **headers: str):  # type: ignore[no-untyped-def]
    return await client.post("/api/pageview", data=json.dumps(body), headers={"Content-Type": "text/plain", **headers})


def logged_payloads(data_dir: Path) -> list[str]:
    return [payload for (payload,) in query(data_dir, "SELECT payload FROM event_log ORDER BY seq")]


async def test_a_page_view_becomes_a_v1_event_with_its_dimensions(start_collector: Start, data_dir: Path) -> None:
    clock = FakeClock(utc(2025, 6, 4, 10, 15, 30, 123000))
    client = await start_collector(clock=clock)
    utm = {"source": "newsletter", "medium": "email", "campaign": "spring sale", "term": "shoes", "content": "top"}
    response = await post(
        client, {"pathname": "/home", "referrer": "", "domain": "example.com", "utm": utm},
        **{"User-Agent": IPHONE, "X-Forwarded-For": "193.0.6.139"},
    )
    assert response.status == 204
    await drained(client)
    [(event_type, payload)] = query(data_dir, "SELECT event_type, payload FROM event_log")
    assert event_type == "visitor.tracked.v1"
    event = json.loads(payload)
    assert event == {
        "visitorHash": independent_hash("193.0.6.139", IPHONE, "2025-06-04"),
        "domain": "example.com",
        "pathname": "/home",
        "referrer": "",
        "sessionContext": {"dailySaltRotation": "2025-06-04"},
        "country": "NL",
        "browser": "Chrome",
        "os": "iOS",
        "device": "mobile",
        "utm": utm,
    }
    assert list(event) == [*VISITOR_TRACKED_V1.schema.fields]  # the v0 keys first, in the original's order
    assert "193.0.6.139" not in payload and "6778" not in payload and "iPhone" not in payload
    assert query(data_dir, "SELECT pageviews, visitors FROM daily_stats") == [(1, 1)]  # the read model counts v1


async def test_without_utm_parameters_the_event_has_an_empty_utm(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector()
    assert (await post(client, {"pathname": "/", "referrer": "", "domain": "example.com", "utm": {"source": "x"}},
                       **{"User-Agent": IPHONE})).status == 204
    assert (await post(client, {"pathname": "/b", "referrer": "", "domain": "example.com"},
                       **{"User-Agent": IPHONE})).status == 204
    await drained(client)
    assert [json.loads(p)["utm"] for p in logged_payloads(data_dir)] == [{"source": "x"}, {}]


@pytest.mark.parametrize(
    ("trusted", "header", "country"),
    [("default", "DK", "DK"), ("default", "XX", None), ("default", "T1", None), ("none", "DK", None)],
)
async def test_cf_ipcountry_is_believed_only_from_a_trusted_proxy(
    start_collector: Start, data_dir: Path, trusted: str, header: str, country: str | None
) -> None:
    # the test client connects from 127.0.0.1: a trusted proxy by default; with TRUSTED_PROXIES empty
    # the header is the client's own word, and the country comes from its address (loopback: none)
    env = {} if trusted == "default" else {"TRUSTED_PROXIES": ""}
    client = await start_collector(**env)
    response = await post(client, {"pathname": "/", "referrer": "", "domain": "example.com"},
                          **{"User-Agent": IPHONE, "X-Forwarded-For": "8.8.8.8", "CF-IPCountry": header})
    assert response.status == 204
    await drained(client)
    [payload] = logged_payloads(data_dir)
    assert json.loads(payload)["country"] == country


async def test_a_geoip_database_decides_the_events_country(
    start_collector: Start, data_dir: Path, tmp_path: Path
) -> None:
    path = write_mmdb(tmp_path / "country.mmdb", {"193.0.6.0/24": {"country": {"iso_code": "DE"}}})
    client = await start_collector(GEOIP_DATABASE=str(path))
    response = await post(client, {"pathname": "/", "referrer": "", "domain": "example.com"},
                          **{"User-Agent": IPHONE, "X-Forwarded-For": "193.0.6.139"})
    assert response.status == 204
    await drained(client)
    [payload] = logged_payloads(data_dir)
    assert json.loads(payload)["country"] == "DE"


# -- the transformer receives both versions ----------------------------------------------------------------


def envelope(event_type: str, payload: Mapping[str, object], event_id: str) -> dict[str, object]:
    return {"eventId": event_id, "timeBucket": "20250604100000", "flowType": "visitor.v0", "eventType": event_type,
            "metadata": {}, "payload": payload, "validTime": "2025-06-04T10:15:30.123Z"}


V0 = {"visitorHash": "a" * 64, "domain": "example.com", "pathname": "/", "referrer": "",
      "sessionContext": {"dailySaltRotation": "2025-06-04"}}
V1 = {**V0, "visitorHash": "b" * 64, "country": "DK", "browser": "Firefox", "os": "Linux", "device": "desktop",
      "utm": {"campaign": "x"}}


async def test_the_transformer_takes_v0_and_v1_events(start_collector: Start, data_dir: Path) -> None:
    client = await start_collector(FLOWCORE_TRANSFORMER_SECRET="s3cret-for-the-transformer")
    headers = {"X-Secret": "s3cret-for-the-transformer"}
    for event in (envelope("visitor.tracked.v0", V0, "e-0"), envelope("visitor.tracked.v1", V1, "e-1"),
                  envelope("visitor.tracked.v1", {**V1, "country": None, "browser": None, "os": None,
                                                  "device": None, "utm": {}}, "e-2")):
        response = await client.post("/api/transformer", json=event, headers=headers)
        assert (response.status, await response.text()) == (200, "OK")
    bad = envelope("visitor.tracked.v1", {**V1, "device": "phone"}, "e-3")
    response = await client.post("/api/transformer", json=bad, headers=headers)
    assert response.status == 422
    assert (await response.json())["error"] == "payload.device must be desktop or mobile or tablet"
    assert query(data_dir, "SELECT pageviews, visitors FROM daily_stats") == [(3, 2)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"country": "dk"}, "payload.country must be an ISO 3166-1 alpha-2 code"),
        ({"browser": 5}, "payload.browser must be a string or null"),
        ({"utm": None}, "payload.utm must be an object"),
        ({"utm": {"gclid": "x"}}, "payload.utm has unknown keys: 'gclid'"),
        ({"utm": {"source": "s" * 257}}, "payload.utm.source must be 1 to 256 characters long"),
    ],
)
def test_the_v1_contract_is_strict(change: dict[str, object], message: str) -> None:
    with pytest.raises(ContractError, match=re.escape(message)):
        VISITOR_TRACKED_V1.validate({**V1, **change})
    missing = dict(V1)
    del missing["device"]
    with pytest.raises(ContractError, match=r"payload\.device is required"):
        VISITOR_TRACKED_V1.validate(missing)
