"""Visitor hashing: the only place an IP address and a user agent meet, and they go no further.

Seed-compatible mode (PRIVACY_MODE=seed, the default), byte for byte as the original collector:
    salt        = sha256_hex(f"{YYYY-MM-DD}:{SECRET_KEY}")      (the UTC date)
    visitorHash = sha256_hex(f"{ip}:{user_agent}:{salt}")       (a missing user agent is "unknown")

Ephemeral mode (PRIVACY_MODE=ephemeral): a random 32-byte salt per UTC day, kept in the store
through its day and the next, then deleted:
    visitorHash = blake2b(len+domain, len+ip, len+user_agent; key=salt, 32 bytes) as hex
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Protocol

UNKNOWN_USER_AGENT = "unknown"


@lru_cache(maxsize=4)
def daily_salt(day: str, secret_key: str) -> str:
    return hashlib.sha256(f"{day}:{secret_key}".encode()).hexdigest()


def salt_day(moment: datetime) -> str:
    """The UTC date whose salt hashes a visit at this moment."""
    return (moment if moment.tzinfo is UTC else moment.astimezone(UTC)).date().isoformat()


def visitor_hash(ip: str, user_agent: str | None, day: str, secret_key: str) -> str:
    agent = user_agent or UNKNOWN_USER_AGENT
    # surrogateescape gives back the exact bytes of a header that was not valid UTF-8
    text = f"{ip}:{agent}:{daily_salt(day, secret_key)}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


# -- PRIVACY_MODE=ephemeral -------------------------------------------------------------------------

SALT_BYTES = 32
SEED, EPHEMERAL = "seed", "ephemeral"
PRIVACY_MODES = (SEED, EPHEMERAL)


def ephemeral_hash(salt: bytes, domain: str, ip: str, user_agent: str | None) -> str:
    """BLAKE2b keyed with the day's random salt over the site, the address and the user agent,
    each prefixed with its length, so no two different triples give the same input. 32 bytes:
    64 lowercase hex characters, as the event contract wants."""
    message = bytearray()
    for part in (domain, ip, user_agent or UNKNOWN_USER_AGENT):
        data = part.encode("utf-8", "surrogateescape")
        message += len(data).to_bytes(4, "big") + data
    return hashlib.blake2b(bytes(message), key=salt, digest_size=32).hexdigest()


def previous_day(day: str) -> str:
    return (date.fromisoformat(day) - timedelta(days=1)).isoformat()


class SaltStore(Protocol):
    async def salt_for_day(self, day: str, candidate: bytes, keep_from: str) -> bytes: ...


class DailySalts:
    """The ephemeral mode's salt of the UTC day, held in memory: the store is asked once a day
    (at the first page view of a new day), never per request. Every collector on the same file
    gets the same salt; salts older than yesterday's are deleted."""

    def __init__(self, store: SaltStore) -> None:
        self._store = store
        self._day = ""
        self._salt = b""
        self._lock = asyncio.Lock()

    async def salt(self, day: str) -> bytes:
        if day == self._day:
            return self._salt
        async with self._lock:  # requests arriving together at midnight ask the store once
            if day != self._day:
                salt = await self._store.salt_for_day(day, secrets.token_bytes(SALT_BYTES), previous_day(day))
                self._day, self._salt = day, salt
        return self._salt


class VisitorHasher:
    """The visitor hash of the configured mode."""

    def __init__(self, mode: str, secret_key: str, salts: DailySalts | None) -> None:
        self.mode = mode
        self._secret_key = secret_key
        self._salts = salts

    async def __call__(self, day: str, domain: str, ip: str, user_agent: str | None) -> str:
        if self._salts is None:
            return visitor_hash(ip, user_agent, day, self._secret_key)
        return ephemeral_hash(await self._salts.salt(day), domain, ip, user_agent)
