"""GET /script.js over real HTTP: the bytes, their size, and the caching and compression headers."""

from __future__ import annotations

import gzip
import re

import pytest
from conftest import Start

from collector import STATIC_DIR, strip_script

SIZE_LIMIT = 1000  # bytes on the wire, gzipped: Plausible's base script is 765


async def fetch_script(start_collector: Start, **headers: str) -> tuple[int, dict[str, str], bytes]:
    client = await start_collector()
    async with client.get("/script.js", headers=headers, auto_decompress=False) as response:
        return response.status, dict(response.headers), await response.read()


async def test_the_script_is_served_as_javascript_with_a_cache_lifetime(start_collector: Start) -> None:
    status, headers, body = await fetch_script(start_collector, **{"Accept-Encoding": "identity"})
    assert status == 200
    assert headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert headers["Cache-Control"] == "public, max-age=86400"
    assert headers["Vary"] == "Accept-Encoding"
    assert "Content-Encoding" not in headers
    assert body == strip_script((STATIC_DIR / "script.js").read_text()).encode()
    assert b"collector_ignore" in body and b"keepalive" in body


async def test_the_gzipped_script_is_under_the_size_limit(start_collector: Start) -> None:
    status, headers, body = await fetch_script(start_collector, **{"Accept-Encoding": "gzip, deflate, br"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert int(headers["Content-Length"]) == len(body)
    plain = gzip.decompress(body)
    assert plain == strip_script((STATIC_DIR / "script.js").read_text()).encode()
    assert len(body) <= SIZE_LIMIT, f"the tracker is {len(body)} bytes gzipped; the limit is {SIZE_LIMIT}"


@pytest.mark.parametrize("accept_encoding", ["gzip", "GZIP;q=0.5", "br, gzip;q=1.0", "*", "deflate, *;q=0.1"])
async def test_gzip_is_sent_whenever_it_is_accepted(start_collector: Start, accept_encoding: str) -> None:
    _, headers, body = await fetch_script(start_collector, **{"Accept-Encoding": accept_encoding})
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).startswith(b"(function () {")


@pytest.mark.parametrize(
    "accept_encoding",
    [
        pytest.param("identity", id="identity"),
        pytest.param("gzip;q=0, identity", id="gzip-refused"),
        pytest.param("br", id="only-brotli"),
        pytest.param("*;q=0", id="anything-refused"),
        pytest.param("gzip;q=0, *", id="gzip-refused-anything-else-welcome"),
        pytest.param("", id="none-named"),
    ],
)
async def test_the_script_is_plain_unless_gzip_is_accepted(start_collector: Start, accept_encoding: str) -> None:
    _, headers, body = await fetch_script(start_collector, **{"Accept-Encoding": accept_encoding})
    assert "Content-Encoding" not in headers
    assert body.startswith(b"(function () {")


async def test_the_etag_answers_a_revalidation_with_304(start_collector: Start) -> None:
    client = await start_collector()
    for encoding in ("gzip", "identity"):
        async with client.get("/script.js", headers={"Accept-Encoding": encoding}) as first:
            etag = first.headers["ETag"]
            assert etag.startswith('"') and etag.endswith('"')
        for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            headers = {"Accept-Encoding": encoding, "If-None-Match": condition}
            async with client.get("/script.js", headers=headers) as again:
                assert again.status == 304, condition
                assert again.headers["ETag"] == etag
                assert again.headers["Cache-Control"] == "public, max-age=86400"
                assert await again.read() == b""
        async with client.get("/script.js", headers={"If-None-Match": '"stale"'}) as changed:
            assert changed.status == 200


async def test_the_two_encodings_carry_different_etags(start_collector: Start) -> None:
    client = await start_collector()
    tags = set()
    for encoding in ("gzip", "identity"):
        async with client.get("/script.js", headers={"Accept-Encoding": encoding}) as response:
            tags.add(response.headers["ETag"])
    assert len(tags) == 2


async def test_head_and_the_endpoint_list_know_the_script(start_collector: Start) -> None:
    client = await start_collector()
    async with client.head("/script.js") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/javascript")
    async with client.get("/") as response:
        assert "GET /script.js" in (await response.json())["endpoints"]


def test_stripping_keeps_the_code_and_drops_the_comments() -> None:
    source = (STATIC_DIR / "script.js").read_text()
    stripped = strip_script(source)
    # The stripping is line-based, which is only safe without multi-line literals or block comments.
    assert "`" not in source and "/*" not in source and "\\\n" not in source
    assert not any(line.startswith("//") or line != line.strip() for line in stripped.splitlines())
    code = [line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("//")]
    assert stripped.replace("\n", "") == "".join(code)  # only indentation, comments and line breaks go
    assert "/*" not in stripped and "`" not in stripped


def test_stripping_keeps_the_line_break_after_a_trailing_comment() -> None:
    assert strip_script("a(); // b;\n}\nc = {\n  d: 1,\n  e: 2\n};\nf()\n") == "a(); // b;\n}\nc = {d: 1,e: 2};f()\n"


# -- /script.clicks.js: the tracker and its click tracking, in one file ------------------------------------------

CLICKS_SIZE_LIMIT = 1700  # gzipped; not a promise to sites like the base's, a guard against growth


async def test_the_clicks_script_is_the_tracker_then_its_click_tracking(start_collector: Start) -> None:
    client = await start_collector()
    expected = "".join(strip_script((STATIC_DIR / name).read_text()) for name in ("script.js", "script.clicks.js"))
    async with client.get("/script.clicks.js", headers={"Accept-Encoding": "identity"}) as plain:
        assert plain.status == 200
        assert plain.headers["Content-Type"] == "application/javascript; charset=utf-8"
        assert plain.headers["Cache-Control"] == "public, max-age=86400"
        assert await plain.read() == expected.encode()
        etag = plain.headers["ETag"]
    async with client.get("/script.clicks.js", headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as packed:
        assert packed.headers["Content-Encoding"] == "gzip"
        body = await packed.read()
        assert gzip.decompress(body) == expected.encode()
        assert len(body) <= CLICKS_SIZE_LIMIT, f"/script.clicks.js is {len(body)} bytes gzipped"
        assert packed.headers["ETag"] != etag
    async with client.get("/script.js") as base:
        assert base.headers["ETag"] != etag  # another file, another version
    async with client.get("/script.clicks.js", headers={"Accept-Encoding": "identity", "If-None-Match": etag}) as again:
        assert again.status == 304


def test_the_clicks_script_strips_safely() -> None:
    source = (STATIC_DIR / "script.clicks.js").read_text()
    assert "`" not in source and "/*" not in source and "\\\n" not in source


def test_the_docs_name_the_default_file_types_of_the_script() -> None:
    source = (STATIC_DIR / "script.clicks.js").read_text()
    [listed] = re.findall(r'var FILE_TYPES = "([^"]*)" \+\s*"([^"]*)"', source)
    in_script = "".join(listed).split(",")
    docs = (STATIC_DIR.parent / "docs" / "events.md").read_text()
    [in_docs] = re.findall(r"\*\*The default file types\*\*: `([^`]*)`", docs.replace("\n  ", " "))
    assert in_docs.split(", ") == in_script
