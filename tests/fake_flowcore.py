"""A fake Flowcore platform: a real local HTTP server speaking the ingestion webhook protocol of
shared/flowcore-protocol.md, strict where the platform is strict, and able to fail on demand.
It also plays Flowcore's delivery side: it POSTs stored events to transformer endpoints, once on
demand (deliver) or, like a deployed transformer, every stored event in order to each of several
targets (fan_out_to), redelivering on the statuses the platform's transformers retry."""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import ClientError, ClientSession, web

MAX_EVENT_BYTES = 64 * 1024
ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z")
# What a deployed transformer redelivers an event on (Flowcore docs, "Developing a transformer");
# any other non-2xx answer is a failed delivery, which the fake records and moves past.
REDELIVER_STATUSES = frozenset({408, 425, 429, 502, 503, 504})
REDELIVER_DELAY = 0.02  # seconds, when the endpoint sends no Retry-After


@dataclass
class DeliveryTarget:
    """A transformer endpoint that receives every stored event, in order, one request each."""

    url: str
    secret: str
    delivered: list[str] = field(default_factory=list)  # event ids answered with a 2xx
    redeliveries: list[tuple[str, int]] = field(default_factory=list)  # (event id, status) retried
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # (event id, status, body) given up


@dataclass
class Ingestion:
    """One accepted webhook request, as it arrived."""

    path: str
    headers: dict[str, str]
    body: Any
    event_ids: list[str]


@dataclass
class FakeFlowcore:
    tenant: str = "acme"
    data_core: str = "flow-analytics"
    api_key: str = "fc_0123456789abcdef_s3cr3t"
    # as flowcore.yaml declares them; a data core set up from an older copy has only v0
    event_types: frozenset[str] = frozenset(
        {"visitor.v0/visitor.tracked.v0", "visitor.v0/visitor.tracked.v1", "visitor.v0/visitor.event.v0"}
    )
    data_core_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    events: list[dict[str, Any]] = field(default_factory=list)
    ingestions: list[Ingestion] = field(default_factory=list)
    refusals: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._failures: list[tuple[int, str | None]] = []
        self._failing: tuple[int, str | None] | None = None
        self._without_ids = 0
        self._released = asyncio.Event()
        self._released.set()
        self.targets: list[DeliveryTarget] = []
        self._target_tasks: list[asyncio.Task[None]] = []
        self._deliver_first: DeliveryTarget | None = None
        app = web.Application()
        app.router.add_post("/{kind:events?}/{tenant}/{data_core}/{flow_type}/{event_type}", self._ingest)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self._site: web.TCPSite | None = None
        self.port = 0

    # -- life and faults ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._runner.setup()
        await self.accept_connections()

    async def close(self) -> None:
        self._released.set()
        for task in self._target_tasks:
            task.cancel()
        await asyncio.gather(*self._target_tasks, return_exceptions=True)
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def refuse_connections(self) -> None:
        """Stop listening and drop open connections: the platform is unreachable."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server
        if server is not None:
            for connection in list(server.connections):
                connection.force_close()

    async def accept_connections(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            server = self._site._server  # the port the OS chose, kept for a later restart
            assert isinstance(server, asyncio.Server) and server.sockets
            self.port = int(server.sockets[0].getsockname()[1])

    def fail_next(self, status: int, times: int = 1, retry_after: str | None = None) -> None:
        self._failures.extend([(status, retry_after)] * times)

    def fail_always(self, status: int, retry_after: str | None = None) -> None:
        self._failing = (status, retry_after)

    def heal(self) -> None:
        self._failing = None
        self._failures.clear()

    def answer_without_event_ids(self, times: int = 1) -> None:
        """Store the next batches, but answer 200 without their eventIds (a garbled answer)."""
        self._without_ids += times

    def hang(self) -> None:
        """Requests get no answer until release(); then they are dropped, never stored."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def wait_for_events(self, count: int, timeout: float = 10) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.events) >= count), timeout)

    async def wait_for_delivered(self, target: DeliveryTarget, count: int, timeout: float = 30) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(target.delivered) >= count), timeout)

    async def wait_for_refusals(self, count: int, timeout: float = 10) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.refusals) >= count), timeout)

    # -- the ingestion webhook -----------------------------------------------------------------

    async def _ingest(self, request: web.Request) -> web.Response:
        if not self._released.is_set():
            await self._released.wait()
            raise web.HTTPServiceUnavailable(text="the hung request was dropped")
        try:
            return await self._accept(request)
        except _Refusal as refusal:
            async with self._changed:
                self.refusals.append((refusal.status, refusal.message))
                self._changed.notify_all()
            return refusal.response()

    async def _accept(self, request: web.Request) -> web.Response:
        match = request.match_info
        if self._failures or self._failing:
            status, retry_after = self._failures.pop(0) if self._failures else self._failing  # type: ignore[misc]
            raise _Refusal(status, "INJECTED", f"injected failure {status}", retry_after)
        if request.headers.get("Authorization") != self.api_key:
            raise _Refusal(401, "UNAUTHORIZED", "Invalid API key")
        key = f"{match['flow_type']}/{match['event_type']}"
        if (match["tenant"], match["data_core"]) != (self.tenant, self.data_core) or key not in self.event_types:
            name = "/".join(match[k] for k in ("tenant", "data_core", "flow_type", "event_type"))
            raise _Refusal(404, "NOT_FOUND", f"EventType not found with name = {name}")
        if request.content_type != "application/json":
            raise _Refusal(400, "BAD_REQUEST", "Content-Type must be application/json")
        metadata = _metadata(request.headers.get("x-flowcore-metadata-json"))
        valid_time = _time_header(request.headers, "x-flowcore-valid-time")
        _time_header(request.headers, "x-flowcore-event-time")
        payloads = _payloads(await request.read(), batch=match["kind"] == "events")
        now = datetime.now(UTC)
        valid = valid_time or now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        ids = [str(uuid.uuid1()) for _ in payloads]
        async with self._changed:
            for event_id, payload in zip(ids, payloads, strict=True):
                self.events.append({
                    "eventId": event_id,
                    "timeBucket": valid[:13].replace("-", "").replace("T", "") + "0000",
                    "tenant": self.tenant,
                    "dataCoreId": self.data_core_id,
                    "flowType": match["flow_type"],
                    "eventType": match["event_type"],
                    "metadata": metadata,
                    "payload": payload,
                    "validTime": valid,
                })
            self.ingestions.append(Ingestion(request.path, dict(request.headers), payloads, ids))
            self._changed.notify_all()
        if self._deliver_first is not None:  # the platform may deliver before the sender has its answer
            async with ClientSession() as session:
                for event in self.events[-len(ids):]:
                    await self._deliver_one(session, self._deliver_first, event)
        if self._without_ids:
            self._without_ids -= 1
            return web.json_response({"success": True, "received": True})
        if match["kind"] == "event":
            return web.json_response({"success": True, "received": True, "eventId": ids[0]})
        return web.json_response({"success": True, "received": True, "eventIds": ids})

    # -- delivery to transformer endpoints ----------------------------------------------------------

    def fan_out_to(self, url: str, secret: str) -> DeliveryTarget:
        """Deliver every stored event, past and future, in order, to this endpoint: what one
        transformer (one per collector) does."""
        target = DeliveryTarget(url, secret)
        self.targets.append(target)
        self._target_tasks.append(asyncio.create_task(self._feed(target), name=f"deliver to {url}"))
        return target

    def deliver_before_answering(self, url: str, secret: str) -> None:
        """From now on, deliver each ingested event to this endpoint before answering the sender."""
        self._deliver_first = DeliveryTarget(url, secret)

    async def _feed(self, target: DeliveryTarget) -> None:
        async with ClientSession() as session:
            for index in itertools.count():
                async with self._changed:
                    await self._changed.wait_for(lambda: len(self.events) > index)  # noqa: B023 (awaited here)
                await self._deliver_one(session, target, self.events[index])
                async with self._changed:
                    self._changed.notify_all()

    async def _deliver_one(self, session: ClientSession, target: DeliveryTarget, event: dict[str, Any]) -> None:
        """One event until the endpoint takes it, redelivering on the platform's retry statuses
        after Retry-After (or a moment); any other refusal is recorded, and the stream moves on."""
        while True:
            try:
                async with session.post(target.url, json=event, headers={"X-Secret": target.secret}) as response:
                    status, body = response.status, await response.text()
                    retry_after = response.headers.get("Retry-After")
            except (OSError, ClientError) as error:  # the endpoint is down or dropped us: try again
                status, body, retry_after = 503, f"unreachable: {type(error).__name__}", None
            if 200 <= status < 300:
                target.delivered.append(event["eventId"])
                return
            if status not in REDELIVER_STATUSES:
                target.failed.append((event["eventId"], status, body))
                return
            target.redeliveries.append((event["eventId"], status))
            await asyncio.sleep(float(retry_after) if retry_after and retry_after.isdigit() else REDELIVER_DELAY)

    async def deliver(
        self, url: str, secret: str, events: list[dict[str, Any]] | None = None, *, legacy: bool = False
    ) -> list[tuple[int, str]]:
        """POST each event envelope to the endpoint, one request each, as the platform does."""
        answers = []
        async with ClientSession() as session:
            for event in self.events if events is None else events:
                envelope = dict(event)
                if legacy:
                    envelope["aggregator"] = envelope.pop("flowType")
                async with session.post(url, json=envelope, headers={"X-Secret": secret}) as response:
                    answers.append((response.status, await response.text()))
        return answers


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        body = {"status": self.status, "code": self.code, "message": self.message}
        return web.json_response(body, status=self.status, headers=headers)


def _metadata(header: str | None) -> dict[str, Any]:
    try:
        metadata = json.loads(base64.b64decode(header or "", validate=True)) if header else None
    except (binascii.Error, ValueError):
        metadata = None
    if not isinstance(metadata, dict):
        raise _Refusal(400, "BAD_REQUEST", "Invalid metadata header: must be valid base64-encoded JSON")
    return metadata


def _time_header(headers: Any, name: str) -> str | None:
    value = headers.get(name)
    if value is not None and not ISO_TIME.fullmatch(value):
        raise _Refusal(400, "BAD_REQUEST", f"{name} must be an ISO 8601 UTC time")
    return value  # type: ignore[no-any-return]


def _payloads(body: bytes, batch: bool) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(body)
    except ValueError:
        raise _Refusal(400, "BAD_REQUEST", "the body is not JSON") from None
    items = parsed if batch else [parsed]
    if batch and (not isinstance(parsed, list) or not parsed):
        raise _Refusal(400, "BAD_REQUEST", "a batch must be a non-empty JSON array")
    for item in items:
        if not isinstance(item, dict):
            raise _Refusal(400, "BAD_REQUEST", "each event must be a JSON object")
        if len(json.dumps(item).encode()) > MAX_EVENT_BYTES:
            raise _Refusal(400, "BAD_REQUEST", "an event is larger than 64KB")
    return items
