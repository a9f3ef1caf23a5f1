"""Benchmark: the candidates for the v1 dimensions, and what the choice costs a page view.

    python bench/dimensions_bench.py                   # all three parts, about 3 minutes
    python bench/dimensions_bench.py --part country    # iptocc against geoip2fast
    python bench/dimensions_bench.py --part agents     # ua-parser (three engines) against device-detector
    python bench/dimensions_bench.py --part pageview   # CPU per page view, EVENT_VERSION=v0 against v1

1. Country: each candidate in a fresh process: the time to load it, the memory it adds (RSS
   after loading and after the lookups, against RSS before the import; the addresses are made
   before the baseline, so they are not counted), lookups per second of CPU time over 100,000
   random public IPv4 and IPv6 addresses, and its answers for addresses whose registration is
   documented.
2. Browser, system and device: each candidate in a fresh process (ua-parser with the engines
   ua_parser would pick, the others blocked: pure Python, google-re2, ua-parser-rs; then Matomo's
   device-detector): load time, memory, CPU per parse of user agents it has not seen (real ones
   with varied version numbers), per lookup through the verdict cache, and how many of the real
   user agents below it gets right (browser and system names, device class).
3. The page view: `python collector.py` on a temporary DATA_DIR, run four times alternately with
   EVENT_VERSION=v0 and v1, each sent the same page views (real user agents, random public
   addresses through the trusted loopback proxy, utm on half) over keep-alive connections; its
   CPU time (all threads, /proc/PID/stat) from the first request until the read model has
   caught up, per page view. Side by side in one run, because the machine is shared and noisy.

Needs the candidates installed: pip install geoip2fast device-detector google-re2 'ua-parser[regex]'.
Prints every figure; docs/dimensions.md records them. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KNOWN_ADDRESSES = {  # documented registrations: Google Public DNS, RIPE NCC, Yandex.DNS, iptocc's example
    "8.8.8.8": "US", "2001:4860:4860::8888": "US", "193.0.6.139": "NL", "2001:67c:2e8:22::c100:68b": "NL",
    "77.88.8.8": "RU", "2a02:6b8::feed:0ff": "RU", "1.0.16.1": "JP", "114.114.114.114": "CN",
    "2400:3200::1": "CN", "168.95.1.1": "TW", "130.225.0.1": "DK", "2001:878::1": "DK",
    "192.0.2.1": None, "2001:db8::1": None, "10.1.2.3": None, "::1": None,
}

AGENTS = {  # real user agents of current browsers: (browser, os, device class)
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Windows", "desktop"),
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "macOS", "desktop"),
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Linux", "desktop"),
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0": ("Firefox", "Windows",
                                                                                          "desktop"),
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0": ("Firefox", "Ubuntu",
                                                                                        "desktop"),
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
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile "
    "Safari/537.36": ("Chrome", "Android", "mobile"),
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Android", "tablet"),
    "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
    "Safari/537.36": ("Chrome", "Android", "tablet"),
    "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 "
    "Chrome/122.0.0.0 Mobile Safari/537.36": ("Samsung Internet", "Android", "mobile"),
    "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0": ("Firefox", "Android", "mobile"),
    "Mozilla/5.0 (Android 14; Tablet; rv:133.0) Gecko/133.0 Firefox/133.0": ("Firefox", "Android", "tablet"),
}

# device-detector's names for the same things, mapped to the names above for the accuracy count
DEVICE_DETECTOR_NAMES = {
    "Microsoft Edge": "Edge", "Chrome Mobile": "Chrome", "Chrome Mobile iOS": "Chrome", "Mobile Safari": "Safari",
    "Firefox Mobile": "Firefox", "Samsung Browser": "Samsung Internet", "Mac": "macOS", "GNU/Linux": "Linux",
    "iPadOS": "iOS",
}
DEVICE_DETECTOR_CLASSES = {"desktop": "desktop", "smartphone": "mobile", "phablet": "mobile",
                           "feature phone": "mobile", "tablet": "tablet"}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def random_addresses(count: int, seed: int = 7) -> tuple[list[str], list[str]]:
    rnd = random.Random(seed)
    v4: list[str] = []
    v6: list[str] = []
    while len(v4) < count:
        first = rnd.randint(1, 223)
        if first in (10, 127):
            continue
        v4.append(f"{first}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}")
    for _ in range(count):  # global unicast 2000::/3, mostly in allocated space
        v6.append(f"2{rnd.randint(0, 0xA0F):03x}:{rnd.randint(0, 0xFFFF):x}:{rnd.randint(0, 0xFFFF):x}::"
                  f"{rnd.randint(1, 0xFFFF):x}")
    return v4, v6


def unseen_agents(rounds: int) -> list[str]:
    """The real user agents with other version numbers: new strings, the same shapes."""
    agents = []
    for round_ in range(rounds):
        for agent in AGENTS:
            agents.append(agent.replace("131.0.", f"131.{round_}.").replace("133.0", f"133.{round_}")
                          .replace("18_1", f"18_{round_ % 9}").replace("18.1", f"18.{round_ % 9}")
                          .replace("26.0", f"26.{round_}"))
    return agents


def cpu_per_call(function: Callable[[str], Any], inputs: list[str]) -> float:
    """Microseconds of CPU per call."""
    started = time.process_time()
    for item in inputs:
        function(item)
    return (time.process_time() - started) / len(inputs) * 1e6


def installed_kib(*distributions: str) -> int:
    from importlib.metadata import distribution

    total = 0
    for name in distributions:
        for file in distribution(name).files or []:
            path = file.locate()
            if Path(path).is_file():
                total += Path(path).stat().st_size
    return total // 1024


# -- 1. country -------------------------------------------------------------------------------------------------


def country_worker(name: str) -> dict[str, Any]:
    v4, v6 = random_addresses(100_000)
    baseline = rss_mb()
    started = time.perf_counter()
    lookup: Callable[[str], str | None]
    if name == "iptocc":
        from iptocc import country_code

        lookup = country_code
        distributions = ("iptocc",)
    else:
        from geoip2fast import GeoIP2Fast

        # the IPv6 data file holds IPv4 and IPv6; the default one holds IPv4 only
        finder = GeoIP2Fast(geoip2fast_data_file="geoip2fast-ipv6.dat.gz")

        def lookup(address: str) -> str | None:
            code = finder.lookup(address).country_code
            return code if len(code) == 2 and code != "--" else None

        distributions = ("geoip2fast",)
    lookup("8.8.8.8")
    load_s = time.perf_counter() - started
    loaded_mb = rss_mb() - baseline
    per_v4 = cpu_per_call(lookup, v4)
    per_v6 = cpu_per_call(lookup, v6)
    answers = {address: lookup(address) for address in KNOWN_ADDRESSES}
    right = sum(answers[a] == expected for a, expected in KNOWN_ADDRESSES.items())
    return {
        "candidate": name, "load_s": round(load_s, 3), "rss_loaded_mb": round(loaded_mb, 1),
        "rss_after_mb": round(rss_mb() - baseline, 1), "installed_kib": installed_kib(*distributions),
        "ipv4_lookups_per_s": round(1e6 / per_v4), "ipv6_lookups_per_s": round(1e6 / per_v6),
        "known_right": f"{right}/{len(KNOWN_ADDRESSES)}",
        "wrong": {a: answers[a] for a, expected in KNOWN_ADDRESSES.items() if answers[a] != expected},
    }


# -- 2. user agents ---------------------------------------------------------------------------------------------

ENGINE_BLOCKS = {  # what to hide from ua_parser so that it picks the engine named
    "ua-parser (pure Python)": ("re2", "ua_parser_rs", "yaml"),
    "ua-parser + google-re2": ("ua_parser_rs", "yaml"),
    "ua-parser + ua-parser-rs": ("re2", "yaml"),
}


def agents_worker(name: str) -> dict[str, Any]:
    unseen = unseen_agents(60)
    for module in ENGINE_BLOCKS.get(name, ()):
        sys.modules[module] = None  # type: ignore[assignment]  # an import of it now fails: not installed
    import filters  # noqa: F401  # the bot check's module (and its crawler list) is loaded anyway: not counted

    baseline = rss_mb()
    started = time.perf_counter()
    classify: Callable[[str], tuple[str | None, str | None, str | None]]
    if name in ENGINE_BLOCKS:
        from dimensions import SoftwareParser

        parser = SoftwareParser(cache_size=len(unseen) + len(AGENTS))
        engine = type(parser._resolve).__module__

        def classify(agent: str) -> tuple[str | None, str | None, str | None]:
            software = parser._classify(agent)
            return software.browser, software.os, software.device

        cached: Callable[[str], Any] = parser.parse
    else:
        from device_detector import DeviceDetector

        from filters import LruCache

        engine = "device_detector"
        cache: LruCache[str, tuple[str | None, str | None, str | None]] = LruCache(len(unseen) + len(AGENTS))

        def classify(agent: str) -> tuple[str | None, str | None, str | None]:
            found = DeviceDetector(agent, skip_bot_detection=True).parse()
            browser, system = found.client_name() or None, found.os_name() or None
            device = DEVICE_DETECTOR_CLASSES.get(str(found.device_type()))
            rename = DEVICE_DETECTOR_NAMES.get
            return (rename(browser, browser) if browser else None, rename(system, system) if system else None,
                    device)

        def cached(agent: str) -> Any:
            verdict = cache.get(agent)
            if verdict is None:
                verdict = classify(agent)
                cache.put(agent, verdict)
            return verdict

    classify("Mozilla/5.0 warm-up")
    load_s = time.perf_counter() - started
    loaded_mb = rss_mb() - baseline
    cold = cpu_per_call(classify, unseen)
    for agent in AGENTS:
        cached(agent)
    hit = cpu_per_call(cached, list(AGENTS) * 2000)
    answers = {agent: classify(agent) for agent in AGENTS}
    return {
        "candidate": name, "engine": engine, "load_s": round(load_s, 3), "rss_loaded_mb": round(loaded_mb, 1),
        "rss_after_mb": round(rss_mb() - baseline, 1),
        "cold_us_per_parse": round(cold, 1), "cached_us_per_lookup": round(hit, 2),
        "right": f"{sum(answers[a] == e for a, e in AGENTS.items())}/{len(AGENTS)}",
        "wrong": {a[:60]: answers[a] for a, e in AGENTS.items() if answers[a] != e},
    }


def run_worker(kind: str, name: str) -> dict[str, Any]:
    output = subprocess.run([sys.executable, __file__, "--worker", kind, name], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- 3. the page view ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, all threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def send_pageviews(url: str, count: int, connections: int = 32) -> None:
    from aiohttp import ClientSession, TCPConnector

    v4, v6 = random_addresses(count, seed=11)
    agents = list(AGENTS)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def worker(session: ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body: dict[str, Any] = {"pathname": f"/p/{i % 50}", "referrer": "https://news.example/",
                                    "domain": "example.com"}
            if i % 2:
                body["utm"] = {"source": "newsletter", "campaign": f"c{i % 7}"}
            headers = {"User-Agent": agents[i % len(agents)], "X-Forwarded-For": (v4 if i % 3 else v6)[i],
                       "Content-Type": "text/plain"}
            async with session.post(url + "/api/pageview", data=json.dumps(body), headers=headers) as response:
                assert response.status == 204, await response.text()

    async with ClientSession(connector=TCPConnector(limit=connections)) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))


async def wait_caught_up(url: str, timeout: float = 120) -> None:
    from aiohttp import ClientSession

    deadline = time.monotonic() + timeout
    async with ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as response:
                    body = await response.json()
                    if body.get("backlog") == 0 and body.get("status") == "ok":
                        return
            except OSError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("bench: the collector did not catch up in time")


def pageview_run(version: str, count: int) -> float:
    """CPU microseconds per page view of one collector process with EVENT_VERSION=version."""
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        env = {**os.environ, "DATA_DIR": data, "HOST": "127.0.0.1", "PORT": str(port), "EVENT_VERSION": version,
               "RATE_LIMIT_PER_SECOND": "0", "SECRET_KEY": "benchmark-secret-key-0123456789abcdef",
               "LOG_LEVEL": "WARNING"}
        process = subprocess.Popen([sys.executable, str(ROOT / "collector.py")], env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(wait_caught_up(url, 30))
            asyncio.run(send_pageviews(url, 500))  # warm-up: caches, the first commits
            asyncio.run(wait_caught_up(url))
            before = cpu_seconds(process.pid)
            asyncio.run(send_pageviews(url, count))
            asyncio.run(wait_caught_up(url))
            return (cpu_seconds(process.pid) - before) / count * 1e6
        finally:
            process.terminate()
            process.wait(30)


def pageview_part(count: int, rounds: int) -> dict[str, Any]:
    from dimensions import DimensionReader

    reader = DimensionReader()
    v4, _ = random_addresses(50_000, seed=3)
    agents = list(AGENTS)
    for agent in agents:
        reader.derive("8.8.8.8", agent)
    started = time.process_time()
    for index, address in enumerate(v4):
        reader.derive(address, agents[index % len(agents)])
    derive_us = (time.process_time() - started) / len(v4) * 1e6
    figures: dict[str, list[float]] = {"v0": [], "v1": []}
    for _ in range(rounds):
        for version in ("v0", "v1"):
            figures[version].append(round(pageview_run(version, count), 1))
    return {"derive_us_cached_agent": round(derive_us, 2), "cpu_us_per_pageview": figures,
            "pageviews_per_run": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("country", "agents", "pageview", "all"), default="all")
    parser.add_argument("--pageviews", type=int, default=20_000, help="page views per collector run")
    parser.add_argument("--rounds", type=int, default=2, help="v0/v1 pairs of collector runs")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, name = args.worker
        print(json.dumps(country_worker(name) if kind == "country" else agents_worker(name)))
        return
    if args.part in ("country", "all"):
        for name in ("iptocc", "geoip2fast"):
            print(json.dumps(run_worker("country", name)))
    if args.part in ("agents", "all"):
        for name in (*ENGINE_BLOCKS, "device-detector"):
            print(json.dumps(run_worker("agents", name)))
    if args.part in ("pageview", "all"):
        print(json.dumps(pageview_part(args.pageviews, args.rounds)))


if __name__ == "__main__":
    main()
