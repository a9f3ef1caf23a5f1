"""Pathways: event contracts, the registry, `write` into the outbox, the emitter that drains
the outbox to a sink, and the router that hands each event to its handler exactly once."""

from __future__ import annotations

import asyncio
import email.utils
import enum
import functools
import hmac
import json
import logging
import math
import os
import random
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import aiohttp
import orjson

from config import WebhookSettings
from filters import MAX_DOMAIN_LENGTH, NO_SITE, normalize_host
from store import (
    LOCAL_CURSOR,
    DeadLetter,
    LoggedEvent,
    LoggedRow,
    OutboxRow,
    StorageUnavailableError,
    Store,
    StoreClosedError,
    get_meta,
    iso_ms,
    put_meta,
)

logger = logging.getLogger(__name__)

MAX_EVENT_ID_LENGTH = 128
MAX_PATH_LENGTH = 2048  # a pathname or a referrer, in characters: /api/pageview, the contract and the OpenAPI document
# Flowcore takes at most 64 KB per event; staying well under it leaves room for the envelope.
MAX_PAYLOAD_BYTES = 48 * 1024
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # one instance: json.dumps builds one per call


def compact_json(payload: dict[str, Any], *, no_floats: bool = False) -> str:
    """COMPACT_JSON's text, byte for byte. orjson writes it about ten times faster, and the same
    bytes when its output is ASCII without DEL (json.dumps escapes everything else as \\uXXXX) and
    holds no float (it writes exponents its own way): `no_floats` says the payload has none."""
    if no_floats:
        raw = orjson.dumps(payload)
        if raw.isascii() and b"\x7f" not in raw:
            return raw.decode("ascii")
    return COMPACT_JSON.encode(payload)


def parse_json(text: str | bytes) -> Any:
    """json.loads, through orjson when it can (about five times faster): it takes strict JSON
    only, and gives the same values for it; whatever it refuses (NaN, big integers, lone
    surrogates, UTF-16, deep nesting) goes to the standard library's decoder, which reads it
    or says what is wrong as it always did."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class ContractError(ValueError):
    """A payload that breaks its pathway's contract."""


class EnvelopeError(ValueError):
    """An event envelope that is malformed."""


class UnknownPathwayError(LookupError):
    """No pathway is registered for the envelope's flow type and event type."""


# -- contracts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A string field: length bounds (in characters) and an optional full-match pattern."""

    min_length: int = 0
    max_length: int = 2048
    pattern: re.Pattern[str] | None = None
    pattern_help: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with the value, or None; cheap when nothing is (the hot path)."""
        if (type(value) is str and self.min_length <= len(value) <= self.max_length and value.isascii()
                and (self.pattern is None or self.pattern.fullmatch(value))):
            return None  # one expression: every field of every page view takes this way
        return self.slow_problem(value)

    def slow_problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        if not self.min_length <= len(value) <= self.max_length:
            return f"must be {self.min_length} to {self.max_length} characters long"
        if self.pattern is not None and not self.pattern.fullmatch(value):
            return f"must be {self.pattern_help}"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "is not valid Unicode (it holds a lone surrogate)"
        return None

    def check(self, name: str, value: Any) -> None:
        problem = self.problem(value)
        if problem is not None:
            raise ContractError(f"{name} {problem}")


@dataclass(frozen=True)
class NullableText(Text):
    """A string field that may also be null (an unknown dimension)."""

    def problem(self, value: Any) -> str | None:
        return None if value is None else Text.problem(self, value)

    def slow_problem(self, value: Any) -> str | None:
        return "must be a string or null" if not isinstance(value, str) else super().slow_problem(value)


@dataclass(frozen=True)
class Obj:
    """An object field: exactly these keys, each checked by its own spec."""

    fields: Mapping[str, Text | Obj | Props]
    # The plain text fields' bounds, checked in one loop without a call per field: every event
    # written passes here. The other fields, and any that fails, go the long way (its message).
    _plain: tuple[tuple[str, int, int, re.Pattern[str] | None, bool], ...] = field(
        init=False, repr=False, compare=False, default=())
    _others: tuple[tuple[str, Text | Obj | Props], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        plain = tuple((key, spec.min_length, spec.max_length, spec.pattern, type(spec) is NullableText)
                      for key, spec in self.fields.items()
                      if isinstance(spec, Text) and type(spec) in (Text, NullableText))
        object.__setattr__(self, "_plain", plain)
        object.__setattr__(self, "_others", tuple((key, spec) for key, spec in self.fields.items()
                                                   if key not in {entry[0] for entry in plain}))

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ContractError(f"{name} must be an object")
        if value.keys() != self.fields.keys():
            unknown = sorted(set(value) - set(self.fields))
            if unknown:
                raise ContractError(f"{name} has unknown keys: {', '.join(_short(k) for k in unknown)}")
            missing = next(key for key in self.fields if key not in value)
            raise ContractError(f"{name}.{missing} is required")
        for key, low, high, pattern, nullable in self._plain:
            item = value[key]
            if not ((type(item) is str and low <= len(item) <= high and item.isascii()
                     and (pattern is None or pattern.fullmatch(item))) or (nullable and item is None)):
                self._check_field(name, key, self.fields[key], item)
        for key, spec in self._others:
            self._check_field(name, key, spec, value[key])

    @staticmethod
    def _check_field(name: str, key: str, spec: Text | Obj | Props, item: Any) -> None:
        if isinstance(spec, Obj):
            try:  # the field's name is only put together for a message
                spec.check("", item)
            except ContractError as error:
                raise ContractError(f"{name}.{key}{error}") from None
        elif (problem := spec.problem(item)) is not None:
            raise ContractError(f"{name}.{key} {problem}")


# How a contract reads a delivered payload: (payload, the event's valid time, now) -> the payload
# its handler gets, or ContractError.
PayloadReader = Callable[[Any, datetime, datetime], dict[str, Any]]


# JavaScript reads every JSON number as a double: an integer beyond this would arrive changed.
MAX_SAFE_INTEGER = 2**53 - 1


@dataclass(frozen=True)
class Props:
    """A flat object of properties: at most `max_keys` keys (each checked by `key`), whose
    values are strings (checked by `value`), finite numbers or booleans; nothing nested, no null."""

    max_keys: int
    key: Text
    value: Text

    def problem(self, props: Any) -> str | None:
        if not isinstance(props, dict):
            return "must be an object"
        if len(props) > self.max_keys:
            return f"has {len(props)} keys; at most {self.max_keys} are allowed"
        for key, value in props.items():
            problem = self.key.problem(key)
            if problem is not None:
                return f"key {_short(str(key))} {problem}"
            problem = self._value_problem(value)
            if problem is not None:
                return f"value of {_short(str(key))} {problem}"
        return None

    def _value_problem(self, value: Any) -> str | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return None if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else f"must be within ±{MAX_SAFE_INTEGER}"
        if isinstance(value, float):
            return None if math.isfinite(value) else "must be a finite number"
        if isinstance(value, str):
            return self.value.problem(value)
        return "must be a string, a number or a boolean (nothing nested, no null)"


def _without_numbers(spec: Text | Obj | Props) -> bool:
    if isinstance(spec, Obj):
        return all(_without_numbers(field) for field in spec.fields.values())
    return isinstance(spec, Text)


@dataclass(frozen=True)
class Contract:
    flow_type: str
    event_type: str
    description: str
    schema: Obj
    # Delivered events are read by this, when given: leniently, as whatever wrote them allowed.
    # Without it they are read as strictly as `write` checks.
    reader: PayloadReader | None = None

    @property
    def key(self) -> str:
        return f"{self.flow_type}/{self.event_type}"

    @functools.cached_property
    def without_numbers(self) -> bool:
        """Whether a valid payload holds strings, nulls and objects only (no Props)."""
        return _without_numbers(self.schema)

    def validate(self, payload: Any) -> None:
        self.schema.check("payload", payload)

    def read(self, payload: Any, valid_time: datetime, now: datetime) -> dict[str, Any]:
        if self.reader is None:
            self.validate(payload)
            return payload  # type: ignore[no-any-return]
        return self.reader(payload, valid_time, now)


# No event of the original collector, nor of this one, is older; and no clock is a day fast.
# A row dated outside this window would never be forgotten by retention or the hash clean-up.
EARLIEST_DAY = date(2000, 1, 1)
SALT_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
ANY_TEXT = Text(0, 10**9)  # any string that can be stored (the only check: no lone surrogate)


def sane_day(day: date, now: datetime, name: str) -> None:
    tomorrow = now.astimezone(UTC).date() + timedelta(days=1)
    if not EARLIEST_DAY <= day <= tomorrow:
        raise ContractError(f"{name} {day.isoformat()} is outside {EARLIEST_DAY.isoformat()} to tomorrow")


def read_visitor_tracked(payload: Any, valid_time: datetime, now: datetime) -> dict[str, Any]:
    """A visitor.tracked.v0 payload as the original collector's contract accepted it (zod:
    visitorHash any 64 characters, domain, pathname and referrer any strings, unknown keys of
    sessionContext stripped; unknown top-level keys refused), made safe to count: a domain that is
    empty or not a hostname counts under NO_SITE, and a salt day that is not a date is the UTC day
    of the event's valid time. Earlier versions of the original wrote no domain: also NO_SITE."""
    if not isinstance(payload, dict):
        raise ContractError("payload must be an object")
    unknown = sorted(set(payload) - set(VISITOR_TRACKED.schema.fields))
    if unknown:
        raise ContractError(f"payload has unknown keys: {', '.join(_short(k) for k in unknown)}")
    texts = {}
    for name in ("visitorHash", "domain", "pathname", "referrer"):
        if name not in payload and name != "domain":
            raise ContractError(f"payload.{name} is required")
        value = payload.get(name, "")
        if (problem := ANY_TEXT.problem(value)) is not None:
            raise ContractError(f"payload.{name} {problem}")
        texts[name] = value
    if len(texts["visitorHash"]) != 64:
        raise ContractError("payload.visitorHash must be 64 characters long")
    context = payload.get("sessionContext")
    if not isinstance(context, dict):
        raise ContractError("payload.sessionContext must be an object")
    salt_day = context.get("dailySaltRotation")
    if (problem := ANY_TEXT.problem(salt_day)) is not None or not isinstance(salt_day, str):
        raise ContractError(f"payload.sessionContext.dailySaltRotation {problem}")
    return {
        "visitorHash": texts["visitorHash"],
        "domain": normalize_host(texts["domain"]) or NO_SITE,
        "pathname": texts["pathname"],
        "referrer": texts["referrer"],
        "sessionContext": {"dailySaltRotation": _salt_day(salt_day, valid_time, now)},
    }


def _salt_day(text: str, valid_time: datetime, now: datetime) -> str:
    try:
        day = date.fromisoformat(text) if SALT_DAY.fullmatch(text) else None
    except ValueError:
        day = None
    if day is None:  # not a date: the day the original's salt rotated on is the event's UTC day
        return valid_time.astimezone(UTC).date().isoformat()
    sane_day(day, now, "payload.sessionContext.dailySaltRotation")
    return text


VISITOR_TRACKED = Contract(
    flow_type="visitor.v0",
    event_type="visitor.tracked.v0",
    description="A page view by an anonymous visitor, identified only by a daily-rotating hash.",
    schema=Obj(
        {
            "visitorHash": Text(64, 64, re.compile(r"[0-9a-f]{64}"), "64 lowercase hex characters"),
            "domain": Text(1, MAX_DOMAIN_LENGTH),
            "pathname": Text(1, MAX_PATH_LENGTH),
            "referrer": Text(0, MAX_PATH_LENGTH),
            "sessionContext": Obj(
                {"dailySaltRotation": Text(10, 10, re.compile(r"\d{4}-\d{2}-\d{2}"), "a date as YYYY-MM-DD")}
            ),
        }
    ),
    reader=read_visitor_tracked,
)


@dataclass(frozen=True)
class PartialObj(Obj):
    """An object field whose keys are each optional; unknown keys are still refused."""

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ContractError(f"{name} must be an object")
        if not value.keys() <= self.fields.keys():
            unknown = sorted(set(value) - set(self.fields))
            raise ContractError(f"{name} has unknown keys: {', '.join(_short(k) for k in unknown)}")
        for key, item in value.items():
            spec = self.fields[key]
            if isinstance(spec, Obj):
                spec.check(f"{name}.{key}", item)
            elif (problem := spec.problem(item)) is not None:
                raise ContractError(f"{name}.{key} {problem}")


UTM_KEYS = ("source", "medium", "campaign", "term", "content")
MAX_UTM_LENGTH = 256
DEVICE_CLASSES = ("desktop", "mobile", "tablet")

# What is derived from the address and the user agent before both are dropped (names without
# versions; null when unknown): page views of v1 and custom events carry them.
DIMENSION_FIELDS: dict[str, Text] = {
    "country": NullableText(2, 2, re.compile(r"[A-Z]{2}"), "an ISO 3166-1 alpha-2 code such as DK"),
    "browser": NullableText(1, 64),
    "os": NullableText(1, 64),
    "device": NullableText(1, 16, re.compile("|".join(DEVICE_CLASSES)), " or ".join(DEVICE_CLASSES)),
}

# visitor.tracked.v0 plus what was derived from the address and the user agent before both were
# dropped, and the page's campaign parameters. Versions of browsers and systems are never kept.
VISITOR_TRACKED_V1 = Contract(
    flow_type=VISITOR_TRACKED.flow_type,
    event_type="visitor.tracked.v1",
    description="A page view by an anonymous visitor (the v0 fields), with the visitor's country, browser, "
    "operating system and device class, and the page's utm campaign parameters.",
    schema=Obj(
        {
            **VISITOR_TRACKED.schema.fields,
            **DIMENSION_FIELDS,
            "utm": PartialObj({key: Text(1, MAX_UTM_LENGTH) for key in UTM_KEYS}),
        }
    ),
    reader=lambda payload, valid_time, now: read_as_written(_written_v1(), payload, now),
)


def _written_v1() -> Contract:
    return VISITOR_TRACKED_V1


def _written_event() -> Contract:
    return VISITOR_EVENT


def read_as_written(contract: Contract, payload: Any, now: datetime) -> dict[str, Any]:
    """A delivered event of a type only this collector writes: as strictly as `write` checks
    it, and with a salt day in the sane window (a row dated outside it would never be forgotten)."""
    contract.validate(payload)
    day = date.fromisoformat(payload["sessionContext"]["dailySaltRotation"])
    sane_day(day, now, "payload.sessionContext.dailySaltRotation")
    return payload  # type: ignore[no-any-return]


# A custom event's limits, defined once: the HTTP endpoint, the OpenAPI document and the docs
# take them from here.
MAX_EVENT_NAME_LENGTH = 120
MAX_EVENT_PROPS = 30
MAX_PROP_KEY_LENGTH = 300
MAX_PROP_VALUE_LENGTH = 2000
EVENT_PROPS = Props(MAX_EVENT_PROPS, Text(1, MAX_PROP_KEY_LENGTH), Text(0, MAX_PROP_VALUE_LENGTH))
# The fields an event shares with a page view, with the page view's own rules.
_VISITOR_FIELDS = {
    name: VISITOR_TRACKED.schema.fields[name]
    for name in ("visitorHash", "domain", "pathname", "referrer", "sessionContext")
}
VISITOR_EVENT = Contract(
    flow_type="visitor.v0",
    event_type="visitor.event.v0",
    description="A custom event (a sign-up, a purchase, an outbound link or download clicked, a page not "
    "found) by an anonymous visitor: its name, flat properties, where it happened, and the visitor's "
    "country, browser, operating system and device class as for a page view (null when unknown).",
    schema=Obj(
        {
            **_VISITOR_FIELDS,
            "name": Text(1, MAX_EVENT_NAME_LENGTH),
            "props": EVENT_PROPS,
            **DIMENSION_FIELDS,
        }
    ),
    reader=lambda payload, valid_time, now: read_as_written(_written_event(), payload, now),
)




# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    flow_type: str
    event_type: str
    valid_time: datetime
    payload: dict[str, Any]
    time_bucket: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.flow_type}/{self.event_type}"

    def envelope(self) -> str:
        """The event as a Flowcore envelope, for the dead-letter table."""
        return json.dumps(
            {
                "eventId": self.event_id,
                "timeBucket": self.time_bucket,
                "flowType": self.flow_type,
                "eventType": self.event_type,
                "metadata": self.metadata,
                "payload": self.payload,
                "validTime": iso_ms(self.valid_time),
            }
        )

    @classmethod
    def from_row(cls, row: LoggedRow) -> Event:
        """The same from the event log's row (Store.logged_after)."""
        _, event_id, flow_type, event_type, bucket, valid_time, payload = row
        return cls(event_id, flow_type, event_type, parse_time(valid_time), parse_json(payload), bucket)

    @classmethod
    def from_log(cls, logged: LoggedEvent) -> Event:
        return cls(
            event_id=logged.event_id,
            flow_type=logged.flow_type,
            event_type=logged.event_type,
            valid_time=parse_time(logged.valid_time),
            payload=parse_json(logged.payload),
            time_bucket=logged.time_bucket,
        )


def _logged_event(event: Event) -> LoggedEvent:
    """A delivered event as the local event log keeps it (seq is assigned by the store)."""
    valid_time = iso_ms(event.valid_time)
    return LoggedEvent(
        seq=0,
        event_id=event.event_id,
        flow_type=event.flow_type,
        event_type=event.event_type,
        time_bucket=event.time_bucket or time_bucket(valid_time),
        valid_time=valid_time,
        payload=COMPACT_JSON.encode(event.payload),
    )


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("a time without a zone")
    return moment


def parse_envelope(raw: Any) -> Event:
    """A Flowcore event envelope; the legacy `aggregator` names the flow type, as the
    original router read it."""
    if not isinstance(raw, dict):
        raise EnvelopeError("the event envelope must be a JSON object")
    flow_type = raw.get("aggregator") or raw.get("flowType")
    for name, value in (("flowType (or aggregator)", flow_type), ("eventType", raw.get("eventType"))):
        if not isinstance(value, str) or not value:
            raise EnvelopeError(f"envelope.{name} must be a non-empty string")
    event_id = raw.get("eventId")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_LENGTH:
        raise EnvelopeError(f"envelope.eventId must be a string of 1 to {MAX_EVENT_ID_LENGTH} characters")
    if not isinstance(raw.get("payload"), dict):
        raise EnvelopeError("envelope.payload must be an object")
    valid_time = raw.get("validTime")
    try:
        moment = parse_time(valid_time) if isinstance(valid_time, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise EnvelopeError("envelope.validTime must be an ISO 8601 time with a zone")
    metadata = raw.get("metadata")
    return Event(
        event_id=event_id,
        flow_type=str(flow_type),
        event_type=raw["eventType"],
        valid_time=moment,
        payload=raw["payload"],
        time_bucket=str(raw.get("timeBucket") or ""),
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def secret_matches(expected: str, provided: str | None) -> bool:
    """Constant-time comparison, so the secret cannot be guessed byte by byte from timings."""
    # surrogateescape: a header that is not valid UTF-8 (aiohttp keeps its bytes that way) is
    # compared as its bytes and refused, never a 500
    return provided is not None and hmac.compare_digest(expected.encode(), provided.encode("utf-8", "surrogateescape"))


def time_bucket(collected_at: str) -> str:
    """The time bucket of a time as iso_ms writes it (UTC, "2025-06-04T10:15:30.123Z"), by slicing."""
    return collected_at[0:4] + collected_at[5:7] + collected_at[8:10] + collected_at[11:13] + "0000"


# A random node (multicast bit set, as RFC 4122 asks of a node that is not a MAC address) and
# clock sequence: an event id says when, never on which machine.
_UUID_TAIL = f"{0x8000 | int.from_bytes(os.urandom(2), 'big') & 0x3FFF:04x}-" + (
    f"{int.from_bytes(os.urandom(6), 'big') | 0x010000000000:012x}"
)
_UUID_EPOCH = 0x01B21DD213814000  # 100 ns intervals from 1582-10-15 to 1970-01-01
_last_uuid_time = 0


def time_uuid() -> str:
    """A version-1 (time-based) UUID, as Flowcore assigns event ids; strictly increasing in
    time within this process, so two ids never collide. (uuid.uuid1 is several times slower.)"""
    global _last_uuid_time
    ticks = time.time_ns() // 100 + _UUID_EPOCH
    if ticks <= _last_uuid_time:
        ticks = _last_uuid_time + 1
    _last_uuid_time = ticks
    digits = f"{ticks:015x}"  # 60 bits: time_hi (12), time_mid (16), time_low (32); one formatting
    return f"{digits[7:]}-{digits[3:7]}-1{digits[:3]}-{_UUID_TAIL}"


# -- registry, write, router -------------------------------------------------------------------------


# A handler runs on the store's writer thread, inside the router's transaction: plain sqlite3,
# no awaits, so a whole batch is one hop between the event loop and that thread.
Handler = Callable[[sqlite3.Connection, Sequence[Event]], None]


class Outcome(enum.Enum):
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    FAILED = "failed"  # rolled back; the sender should deliver it again
    DEAD_LETTERED = "dead-lettered"


# A delivered event's handler gets quick attempts within the request, as the original's pathways
# did (500, 1000, 1500 ms): linear, RECEIVE_RETRY_DELAY times the attempt, seconds in all.
RECEIVE_RETRY_DELAY = 0.25


class Pathways:
    """The registry of contracts and handlers, the writer, and the router."""

    def __init__(
        self, store: Store, *, max_attempts: int = 5, retry_delay: float = 0.5, log_received: bool = False
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        # Flowcore mode: delivered events go into the local event log, so `rebuild` has them all.
        self.log_received = log_received
        self._contracts: dict[str, Contract] = {}
        self._handlers: dict[str, Handler] = {}

    def register(self, contract: Contract) -> None:
        if contract.key in self._contracts:
            raise ValueError(f"pathway {contract.key} is registered already")
        self._contracts[contract.key] = contract

    def handle(self, contract: Contract, handler: Handler) -> None:
        if contract.key not in self._contracts:
            raise ValueError(f"pathway {contract.key} is not registered")
        if contract.key in self._handlers:
            raise ValueError(f"pathway {contract.key} has a handler already")
        self._handlers[contract.key] = handler

    def contract_for(self, event: Event) -> Contract:
        contract = self._contracts.get(event.key)
        if contract is None:
            raise UnknownPathwayError(f"no pathway {event.key}")
        return contract

    async def write(self, contract: Contract, payload: dict[str, Any], collected_at: datetime) -> None:
        """Validate a payload and commit it to the outbox; returns once it is durable."""
        if contract.key not in self._contracts:
            raise UnknownPathwayError(f"no pathway {contract.key}")
        contract.validate(payload)
        text = compact_json(payload, no_floats=contract.without_numbers)
        if len(text) > MAX_PAYLOAD_BYTES:  # json.dumps escapes to ASCII, so characters are bytes
            raise ContractError(f"payload is {len(text)} bytes as JSON; at most {MAX_PAYLOAD_BYTES} are allowed")
        collected = iso_ms(collected_at)
        if self.store.log_directly:  # local mode: the id and time bucket Flowcore would assign, given here
            await self.store.append_log(
                (time_uuid(), contract.flow_type, contract.event_type, time_bucket(collected), collected, text))
            return
        await self.store.append_outbox(contract.flow_type, contract.event_type, text, collected)

    async def process(self, event: Event) -> Outcome:
        """Route one event: record its id and run its handler in ONE transaction, so a
        redelivered event is acknowledged and changes nothing."""
        self.contract_for(event).validate(event.payload)
        try:
            processed = await self.store.write(lambda conn: self.process_batch(conn, [event], checked=True))
        except StorageUnavailableError:
            raise  # the disk failed, not the handler: no attempt is counted, nothing is dead-lettered
        except Exception as error:
            return await self._failed(event, error, self.max_attempts)
        return Outcome.PROCESSED if processed else Outcome.DUPLICATE

    def read(self, event: Event, now: datetime | None = None) -> Event:
        """A delivered event as its contract reads it (leniently: whatever the original wrote);
        ContractError for one that cannot be counted, UnknownPathwayError for no pathway."""
        contract = self.contract_for(event)
        now = now or datetime.now(UTC)
        sane_day(event.valid_time.astimezone(UTC).date(), now, "envelope.validTime")
        return replace(event, payload=contract.read(event.payload, event.valid_time, now))

    async def receive(self, event: Event) -> Outcome:
        """One event delivered by Flowcore (or the CLI's proxy). Its id and its handler's work are
        committed in ONE transaction, so a redelivery changes nothing. A failing handler gets
        max_attempts quick attempts in this request; then the event goes to the dead letters
        WITHOUT being marked processed: a later delivery runs it again, and a success clears it."""
        event = self.read(event)
        error: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                return await self._receive_once(event)
            except (StoreClosedError, StorageUnavailableError):
                raise  # not the handler's failure: no attempt is counted, nothing is dead-lettered
            except Exception as failure:
                error = failure
                logger.warning("event %s (%s) failed, attempt %d of %d: %s: %s", event.event_id, event.key,
                               attempt, self.max_attempts, type(failure).__name__, failure)
            if attempt < self.max_attempts:
                await asyncio.sleep(RECEIVE_RETRY_DELAY * attempt)
        message = f"{type(error).__name__}: {error}"
        await self.store.dead_letter(event.event_id, event.key, event.envelope(), message, self.max_attempts)
        logger.error("event %s (%s) is in the dead letters after %d attempts: %s", event.event_id, event.key,
                     self.max_attempts, message)
        return Outcome.DEAD_LETTERED

    async def _receive_once(self, event: Event, *, retrying: bool = False) -> Outcome:
        def work(conn: sqlite3.Connection) -> Outcome:
            if retrying:  # a dead letter of the local sink was marked processed when it failed
                self.store.unclaim(conn, event.event_id)
            if not self.store.claim_events(conn, {event.event_id: event.key}):
                return Outcome.DUPLICATE
            handler = self._handlers.get(event.key)
            if handler is not None:
                handler(conn, [event])
            if self.log_received:
                self.store.log_received(conn, _logged_event(event))
            self.store.clear_dead_letter(conn, event.event_id)
            return Outcome.PROCESSED

        return await self.store.write(work)

    async def retry_dead_letter(self, letter: DeadLetter) -> str | None:
        """Run a dead letter's event once more, after a fix: its handler's work, its id and the
        dead letter's removal in one transaction. None on success, else what failed (the dead
        letter stays, its error and attempts updated)."""
        try:
            event = self.read(parse_envelope(json.loads(letter.envelope)))
            await self._receive_once(event, retrying=True)
        except (StoreClosedError, StorageUnavailableError):
            raise
        except Exception as failure:
            message = f"{type(failure).__name__}: {failure}"
            await self.store.dead_letter(letter.event_id, letter.pathway, letter.envelope, message, 1)
            return message
        return None

    async def deliver(self, events: Sequence[Event]) -> None:
        """Process events in order: together in one transaction when they all succeed,
        one by one (with retries and dead letters) when any fails."""
        try:
            await self._process_together(events)
        except StorageUnavailableError:
            raise  # no event failed: the disk did; the batch is tried again as it is
        except Exception as error:
            logger.warning("a batch of %d events failed (%s); processing them one by one", len(events), error)
            for event in events:
                await self._process_with_retries(event)

    async def _process_together(self, events: Sequence[Event]) -> None:
        await self.store.write(lambda conn: self.process_batch(conn, events))

    def process_batch(self, conn: sqlite3.Connection, events: Sequence[Event], *, checked: bool = False) -> int:
        """Route events inside the caller's transaction (on the store's writer thread) and return
        how many were new (the others were processed before); any failure is raised, for the
        caller to roll back. `checked`: our own events, which `write` validated already (the
        contract check is for what comes from outside)."""
        for event in events:
            contract = self.contract_for(event)
            if not checked:
                contract.validate(event.payload)
        new = self.store.claim_events(conn, {e.event_id: e.key for e in events})
        by_key: dict[str, list[Event]] = {}
        for event in events:
            if event.event_id in new:
                new.discard(event.event_id)  # an id repeated within the batch runs once
                by_key.setdefault(event.key, []).append(event)
        for key, batch in by_key.items():
            handler = self._handlers.get(key)
            if handler is not None:
                handler(conn, batch)
        return sum(len(batch) for batch in by_key.values())

    async def _process_with_retries(self, event: Event) -> Outcome:
        delay = self.retry_delay
        while True:
            try:
                outcome = await self.process(event)
            except (ContractError, UnknownPathwayError) as error:
                return await self._failed(event, error, max_attempts=1)  # retrying cannot help
            if outcome is not Outcome.FAILED:
                return outcome
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def _failed(self, event: Event, error: Exception, max_attempts: int) -> Outcome:
        message = f"{type(error).__name__}: {error}"
        attempts = await self.store.record_failure(event.event_id, event.key, event.envelope(), message, max_attempts)
        if attempts >= max_attempts:
            logger.error(
                "event %s (%s) dead-lettered after %d attempts: %s", event.event_id, event.key, attempts, message
            )
            return Outcome.DEAD_LETTERED
        logger.warning("event %s (%s) failed, attempt %d of %d: %s", event.event_id, event.key, attempts,
                       max_attempts, message)
        return Outcome.FAILED


# -- emitter and sinks ----------------------------------------------------------------------------------


class Sink(Protocol):
    async def recover(self) -> None:
        """Finish what an earlier run or a failed send left half done."""

    async def send(self, rows: Sequence[OutboxRow]) -> None:
        """Send rows in order; what is not sent stays in the outbox for the next call."""

    async def catch_up(self, limit: int) -> bool:
        """With Store.log_directly: deliver up to `limit` logged events the router has not had
        yet; whether more may be waiting."""

    def interrupt(self) -> None:
        """Cut short any waiting (backoff, a halt) because the collector is stopping."""

    def describe(self) -> dict[str, Any]:
        """What /health shows of the sink: sections to add to its answer."""

    @property
    def halted(self) -> bool:
        """Whether sending has stopped until a restart (/health then says so)."""


LOG_DELIVERY_BATCH = 500  # logged events per routing transaction when moving an outbox backlog


class LocalSink:
    """The embedded event log: assigns ids and times as Flowcore would, writes the local event
    log, then hands the events to the router. A cursor in `meta` remembers what was delivered,
    so events logged but not yet processed (a crash, a failed delivery) are caught up.

    With Store.log_directly (the collector's local mode) page views are committed straight into
    the log, and `catch_up` routes what follows the cursor; the outbox then only holds what an
    earlier run in Flowcore mode left, which `send` moves into the log after everything there."""

    CURSOR = LOCAL_CURSOR

    def __init__(self, store: Store, pathways: Pathways) -> None:
        self.store = store
        self.pathways = pathways
        self._lagging = True  # until recover() has caught up with the log

    async def recover(self) -> None:
        cursor = int(await self.store.get_meta(self.CURSOR) or 0)
        while logged := await self.store.event_log_after(cursor, 500):
            await self._deliver(logged)
            cursor = logged[-1].seq
        self._lagging = False

    async def send(self, rows: Sequence[OutboxRow]) -> None:
        logged = [
            LoggedEvent(
                seq=row.seq,
                event_id=time_uuid(),
                flow_type=row.flow_type,
                event_type=row.event_type,
                time_bucket=time_bucket(row.collected_at),
                valid_time=row.collected_at,
                payload=row.payload,
            )
            for row in rows
        ]
        if self.store.log_directly:  # into the log (new seqs, after the cursor), then routed from there
            await self.store.move_to_event_log(logged)
            while await self.catch_up(LOG_DELIVERY_BATCH):
                pass
            return
        if not self._lagging:
            try:  # the usual case: log, route and move the cursor in ONE transaction
                await self.store.write(lambda conn: self._log_and_route(conn, logged))
                return
            except StorageUnavailableError:
                raise
            except Exception as error:
                logger.warning("a batch of %d events failed (%s); taking them one by one", len(logged), error)
        await self.store.move_to_event_log(logged)
        await self.recover()

    async def catch_up(self, limit: int) -> bool:
        if not self._lagging:
            try:  # the usual case: route and move the cursor in ONE transaction, read on the writer's thread
                return await self.store.write(lambda conn: self._route_logged(conn, limit))
            except StorageUnavailableError:
                raise
            except Exception as error:
                logger.warning("a batch of logged events failed (%s); taking them one by one", error)
        await self.recover()
        return False

    def _route_logged(self, conn: sqlite3.Connection, limit: int) -> bool:
        logged = self.store.logged_after(conn, int(get_meta(conn, self.CURSOR) or 0), limit)
        if logged:
            self.pathways.process_batch(conn, [Event.from_row(row) for row in logged], checked=True)
            put_meta(conn, self.CURSOR, str(logged[-1][0]))
        return len(logged) == limit

    def _log_and_route(self, conn: sqlite3.Connection, logged: Sequence[LoggedEvent]) -> None:
        self.store.log_events(conn, logged)
        self.pathways.process_batch(conn, [Event.from_log(item) for item in logged], checked=True)
        put_meta(conn, self.CURSOR, str(logged[-1].seq))

    async def _deliver(self, logged: Sequence[LoggedEvent]) -> None:
        self._lagging = True
        await self.pathways.deliver([Event.from_log(item) for item in logged])
        await self.store.set_meta(self.CURSOR, str(logged[-1].seq))
        self._lagging = False

    def interrupt(self) -> None:
        """Nothing to cut short: the local sink never waits on anything but the database."""

    def describe(self) -> dict[str, Any]:
        return {}  # the store's backlog and lag say it all

    @property
    def halted(self) -> bool:
        return False


RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
EMPTY_METADATA = "e30="  # base64 of "{}": the original always sent the header


@dataclass
class SinkStatus:
    """What /health shows of the Flowcore sink."""

    last_success_at: str | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    halted: bool = False
    events_sent: int = 0


class SendError(Exception):
    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class FlowcoreSink:
    """Sends the outbox to the Flowcore ingestion webhook in batches of events collected in
    the same second, over one persistent session. Retryable failures (408, 429, 5xx, timeouts,
    network errors) are retried with backoff for as long as the platform stays down; any other
    answer halts sending until a restart, keeping every event. Sent events are logged locally
    with the ids the platform gave them."""

    def __init__(
        self, store: Store, session: aiohttp.ClientSession, settings: WebhookSettings, *, send_v0: bool = False
    ) -> None:
        self.store = store
        self.session = session
        self.settings = settings
        # EVENT_VERSION=v0: page views written as v1 before the switch go as v0 too, so a data
        # core without the v1 event type takes the backlog it refused.
        self.send_v0 = send_v0
        self.status = SinkStatus()
        self._interrupted = asyncio.Event()

    async def recover(self) -> None:
        """Nothing is half done: a batch without an answer is still in the outbox."""

    async def catch_up(self, limit: int) -> bool:
        return False  # Flowcore mode: every event goes through the outbox

    def interrupt(self) -> None:
        self._interrupted.set()

    def describe(self) -> dict[str, Any]:
        contract = VISITOR_TRACKED if self.send_v0 else VISITOR_TRACKED_V1  # the page views' event type
        target = self.settings.events_url(contract.flow_type, contract.event_type)
        return {"flowcore": {"target": target, **asdict(self.status)}}

    @property
    def halted(self) -> bool:
        return self.status.halted

    async def send(self, rows: Sequence[OutboxRow]) -> None:
        if self.send_v0:
            rows = [as_v0(row) for row in rows]
        for batch in same_second_batches(rows):
            if not await self._send_until_accepted(batch):
                return

    async def _send_until_accepted(self, batch: Sequence[OutboxRow]) -> bool:
        while not self._interrupted.is_set():
            if self.status.halted:
                await self._interrupted.wait()
                break
            try:
                event_ids = await self._post(batch)
            except SendError as error:
                await self._failed(error)
                continue
            sent = [_logged(row, event_id) for row, event_id in zip(batch, event_ids, strict=True)]
            await self.store.log_sent(sent)
            self.status.last_success_at = iso_ms(datetime.now(UTC))
            self.status.consecutive_failures = 0
            self.status.events_sent += len(batch)
            return True
        return False

    async def _post(self, batch: Sequence[OutboxRow]) -> list[str]:
        headers = {
            "Authorization": self.settings.api_key,  # the raw key, no scheme: what the webhook expects
            "Content-Type": "application/json",
            "x-flowcore-metadata-json": EMPTY_METADATA,
            "x-flowcore-valid-time": batch[0].collected_at,
        }
        body = ("[" + ",".join(row.payload for row in batch) + "]").encode()
        url = self.settings.events_url(batch[0].flow_type, batch[0].event_type)
        try:
            async with self.session.post(
                url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            ) as response:
                text = await response.text(errors="replace")
                status, retry_after = response.status, response.headers.get("Retry-After")
        except TimeoutError:
            raise SendError(f"no answer within {self.settings.timeout:g} s", retryable=True) from None
        except aiohttp.ClientError as error:
            raise SendError(f"network error: {type(error).__name__}: {error}", retryable=True) from None
        if status in RETRYABLE_STATUSES:
            raise SendError(f"HTTP {status}: {platform_message(text)}", retryable=True,
                            retry_after=parse_retry_after(retry_after))
        if not 200 <= status < 300:
            message = platform_message(text)
            raise SendError(f"HTTP {status}: {message}{missing_event_type_hint(batch[0], status, message)}",
                            retryable=False)
        return _event_ids(text, len(batch))

    async def _failed(self, error: SendError) -> None:
        failures = self.status.consecutive_failures + 1
        self.status.consecutive_failures = failures
        self.status.last_error = str(error)
        if not error.retryable:
            self.status.halted = True
            logger.error("Flowcore refused the events (%s); sending stops and every event is kept in the "
                         "outbox. Fix the configuration and restart the collector.", error)
            return
        backoff = min(self.settings.retry_max, self.settings.retry_base * 2 ** min(failures - 1, 30))
        delay = backoff * random.uniform(0.5, 1.0)  # jitter: collectors that failed together retry apart
        if error.retry_after is not None:
            delay = min(self.settings.retry_max, max(delay, error.retry_after))
        logger.warning("sending to Flowcore failed (%s), attempt %d; retrying in %.1f s", error, failures, delay)
        await wait_any(self._interrupted, timeout=delay)


def missing_event_type_hint(row: OutboxRow, status: int, message: str) -> str:
    """What to do when the data core refuses visitor.tracked.v1: most likely it was set up from an
    older flowcore.yaml, and EVENT_VERSION=v0 is the other way out. The platform answers an unknown event type with
    404 "EventType not found with name = tenant/dataCore/flowType/eventType"."""
    if row.event_type != VISITOR_TRACKED_V1.event_type or not (status == 404 or "not found" in message.lower()):
        return ""
    return (f"; the data core may not have the event type {row.flow_type}/{row.event_type} yet: apply the new "
            "flowcore.yaml or set EVENT_VERSION=v0 (`flowcore data-core apply -f flowcore.yaml`), then restart")


def as_v0(row: OutboxRow) -> OutboxRow:
    """A visitor.tracked.v1 row as the visitor.tracked.v0 event it extends: the v0 keys are the
    v1 payload's first keys, so the same encoder gives the bytes a v0 write would have given."""
    if row.event_type != VISITOR_TRACKED_V1.event_type:
        return row
    payload = json.loads(row.payload)
    v0 = {key: payload[key] for key in VISITOR_TRACKED.schema.fields}
    return replace(row, event_type=VISITOR_TRACKED.event_type, payload=COMPACT_JSON.encode(v0))


def same_second_batches(rows: Sequence[OutboxRow]) -> Iterator[list[OutboxRow]]:
    """Consecutive rows of one event type collected within the same second: one batch carries
    one x-flowcore-valid-time, so no event is stamped a second away from its collection."""
    batch: list[OutboxRow] = []
    for row in rows:
        if batch and (row.flow_type, row.event_type, row.collected_at[:19]) != (
            batch[0].flow_type, batch[0].event_type, batch[0].collected_at[:19]
        ):
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


def _logged(row: OutboxRow, event_id: str) -> LoggedEvent:
    return LoggedEvent(
        seq=row.seq,
        event_id=event_id,
        flow_type=row.flow_type,
        event_type=row.event_type,
        time_bucket=time_bucket(row.collected_at),
        valid_time=row.collected_at,
        payload=row.payload,
    )


def _event_ids(text: str, expected: int) -> list[str]:
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    ids = answer.get("eventIds") if isinstance(answer, dict) else None
    if not isinstance(ids, list) or len(ids) != expected or not all(isinstance(i, str) and i for i in ids):
        # Not a reason to send again: the platform may have stored the batch, and a resent batch
        # is stored again under new ids (the official client raises here too, and does not resend).
        raise SendError(f"a {expected}-event batch was answered without {expected} eventIds, so the platform "
                        f"may have stored it; not resending it: {text[:200]!r}", retryable=False)
    return ids


def platform_message(text: str) -> str:
    """The platform's own words from an error body ({"message": ...} or {"error": ...})."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        for key in ("message", "error"):
            if isinstance(answer.get(key), str):
                return str(answer[key])[:500]
    return text.strip()[:500] or "(no body)"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds or as an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, float((moment - datetime.now(UTC)).total_seconds()))


class Emitter:
    """Drains the outbox in order, in batches, to the sink, until stopped. While page views wait
    for their commit, it takes `busy_batch_size` at a time: the local sink's transaction then
    holds the writer only briefly, and the page views' commits come between its steps."""

    def __init__(self, store: Store, sink: Sink, batch_size: int = 100, busy_batch_size: int | None = None) -> None:
        self.store = store
        self.sink = sink
        self.batch_size = batch_size
        self.busy_batch_size = busy_batch_size or batch_size
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # With Store.log_directly nothing adds to the outbox: once it is empty, it is not read again.
        self._outbox_empty = False
        self._idle = False
        self._idle_changed = asyncio.Condition()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="emitter")

    async def wait_drained(self) -> None:
        """Wait until every event committed so far has been through the sink."""
        async with self._idle_changed:
            await self._idle_changed.wait_for(lambda: self._idle and not self.store.outbox_changed.is_set())

    async def _set_idle(self, idle: bool) -> None:
        async with self._idle_changed:
            self._idle = idle
            self._idle_changed.notify_all()

    async def stop(self) -> None:
        """Let the request in flight finish, then stop; what is left waits in the outbox."""
        self._stopped.set()
        self.sink.interrupt()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        recovered = False
        while not self._stopped.is_set():
            if not recovered:
                recovered = await self._attempt(self.sink.recover())
                continue
            self.store.outbox_changed.clear()  # before reading, so no commit's wake-up is missed
            limit = self.busy_batch_size if self.store.ingest_waiting() else self.batch_size
            rows = [] if self._outbox_empty else await self.store.pending_outbox(limit)
            if not rows and self.store.log_directly:
                self._outbox_empty = True
                if await self._catch_up(limit):
                    continue
            if not rows:
                await self._set_idle(True)
                await wait_any(self.store.outbox_changed, self._stopped)
                await self._set_idle(False)
                continue
            recovered = await self._attempt(self.sink.send(rows))

    async def _catch_up(self, limit: int) -> bool:
        """One step of the sink's catch_up: whether more may be waiting (also after a failure,
        logged, and a pause)."""
        try:
            return await self.sink.catch_up(limit)
        except StorageUnavailableError as error:
            logger.debug("the %s is waiting for the disk: %s", type(self.sink).__name__, error)
        except Exception:
            logger.exception("the %s failed; its events are kept and will be tried again", type(self.sink).__name__)
        await wait_any(self._stopped, timeout=1.0)
        return True

    async def _attempt(self, step: Awaitable[None]) -> bool:
        """Run one step of the sink; on failure log it and pause, and report it."""
        try:
            await step
        except StorageUnavailableError as error:  # the store logs the outage once; its events wait
            logger.debug("the %s is waiting for the disk: %s", type(self.sink).__name__, error)
            await wait_any(self._stopped, timeout=1.0)
            return False
        except Exception:
            logger.exception("the %s failed; its events are kept and will be tried again", type(self.sink).__name__)
            await wait_any(self._stopped, timeout=1.0)
            return False
        return True


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of the events is set, or the timeout passes."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _short(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
