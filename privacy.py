"""Visitor hashing: the only place an IP address and a user agent meet, and they go no further.

Seed-compatible mode, byte for byte as the original collector:
    salt        = sha256_hex(f"{YYYY-MM-DD}:{SECRET_KEY}")      (the UTC date)
    visitorHash = sha256_hex(f"{ip}:{user_agent}:{salt}")       (a missing user agent is "unknown")
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from functools import lru_cache

UNKNOWN_USER_AGENT = "unknown"


@lru_cache(maxsize=4)
def daily_salt(day: str, secret_key: str) -> str:
    return hashlib.sha256(f"{day}:{secret_key}".encode()).hexdigest()


def salt_day(moment: datetime) -> str:
    """The UTC date whose salt hashes a visit at this moment."""
    return moment.astimezone(UTC).date().isoformat()


def visitor_hash(ip: str, user_agent: str | None, day: str, secret_key: str) -> str:
    agent = user_agent or UNKNOWN_USER_AGENT
    # surrogateescape gives back the exact bytes of a header that was not valid UTF-8
    text = f"{ip}:{agent}:{daily_salt(day, secret_key)}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
