"""An open-loop load generator: page views at a fixed arrival rate, whether or not earlier ones
were answered (wrk waits for each answer, so a slow server lowers its rate and hides latency).

Each request's latency counts from the moment it was due, not from when a connection was free,
so queueing shows. The request mix is bench/pageviews.lua's. Prints one JSON line.

    python bench/open_loop.py HOST PORT --rate 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

PATHS = ["/", "/blog", "/blog/hello-world", "/about", "/pricing", "/docs/getting-started", "/docs/api", "/contact",
         "/blog/second-post", "/changelog"]
REFERRERS = ["", "", "", "https://www.google.com/", "https://news.ycombinator.com/item?id=1", "https://duckduckgo.com/",
             "https://example.com/blog", "https://t.co/abc"]
DOMAINS = ["example.com", "blog.example.org", "shop.example.net"]
AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"


def request(host: str, rng: random.Random) -> bytes:
    body = json.dumps({"pathname": rng.choice(PATHS), "referrer": rng.choice(REFERRERS),
                       "domain": rng.choice(DOMAINS)}).encode()
    address = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    head = (f"POST /api/pageview HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain;charset=UTF-8\r\n"
            f"User-Agent: {AGENT}\r\nOrigin: https://example.com\r\nX-Forwarded-For: {address}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Client:
    """At most `connections` connections (browsers are many, but a proxy in front keeps a pool):
    a request due while all are busy waits for one, and that wait counts in its latency."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(connections)
        self.latencies: list[float] = []
        self.errors = 0
        self.statuses: dict[int, int] = {}

    async def send(self, due: float, raw: bytes) -> None:
        async with self.slots:
            await self._send(due, raw)

    async def _send(self, due: float, raw: bytes) -> None:
        try:
            reader, writer = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            self.latencies.append(time.monotonic() - due)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.idle.append((reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1


async def run(host: str, port: int, rate: float, seconds: float, connections: int) -> dict[str, object]:
    client = Client(host, port, connections)
    rng = random.Random(1)
    requests = [request(host, rng) for _ in range(2000)]
    total = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic() + 0.05
    for index in range(total):
        due = start + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(client.send(due, requests[index % len(requests)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = time.monotonic() - start  # longer than seconds when this process could not keep up
    await asyncio.gather(*tasks)
    latencies = sorted(client.latencies) or [float("nan")]

    def percentile(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000, 2)

    return {"offered_rps": rate, "sent": total, "answered": len(client.latencies),
            "achieved_rps": round(total / sent_for), "errors": client.errors, "statuses": client.statuses,
            "p50_ms": percentile(50), "p99_ms": percentile(99),
            "max_ms": round(latencies[-1] * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--connections", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.host, args.port, args.rate, args.seconds, args.connections))), flush=True)


if __name__ == "__main__":
    main()
