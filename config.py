"""Every setting of the collector, grouped by the feature it belongs to: each feature's settings
class declares its rows (name, default, help) and parses them with its own small `load`, and
`Config` composes them. `load_config(environ)` is pure and names the variable of any bad value.
Nothing here touches the disk but `with_secret_key`, which start-up calls once the data directory
is locked."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Protocol
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import filters
import privacy
from filters import DomainAllowList, OriginAllowList, normalize_host

logger = logging.getLogger("collector")

SECRET_KEY_FILE = "secret_key"
MIN_SECRET_KEY_LENGTH = 32
MIN_STATS_TOKEN_LENGTH = 16

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
EVENT_VERSIONS = ("v1", "v0")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str


class ConfigError(ValueError):
    """A setting with a bad value; the message names the variable."""


Read = Callable[[str], str]  # a setting's value, stripped; its default when unset


class Feature(Protocol):
    """A feature's settings: a title for the docs and --help, and its rows."""

    TITLE: ClassVar[str]
    SETTINGS: ClassVar[tuple[Setting, ...]]


@dataclass(frozen=True)
class ServerSettings:
    """Where the collector listens and keeps its data, whom it believes about a client's address,
    and how it treats connections."""

    TITLE: ClassVar[str] = "Server"
    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting("HOST", "0.0.0.0", "Address to listen on."),
        Setting("PORT", "3005", "Port to listen on."),
        Setting("DATA_DIR", "./data", "Directory of the SQLite database and the generated secret key."),
        Setting(
            "TRUSTED_PROXIES",
            "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7,169.254.0.0/16,fe80::/10",
            "Comma-separated addresses or CIDR ranges of reverse proxies whose X-Forwarded-For, "
            "X-Real-IP, CF-Connecting-IP and CF-IPCountry headers are believed. Empty: believe none.",
        ),
        Setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR."),
        Setting(
            "ACCESS_LOG",
            "false",
            "true: log a line per request (method, path, status, size, time; never an address or user agent).",
        ),
        Setting("EVENT_LOOP", "auto", "auto (uvloop when installed, see the speed extra), asyncio or uvloop."),
        Setting(
            "BODY_TIMEOUT_MS",
            "10000",
            "How long a client may take to send a request body; a slower one gets 408 and is disconnected.",
        ),
        Setting(
            "KEEPALIVE_TIMEOUT_MS",
            "75000",
            "How long an idle connection, or one still sending its headers, is kept open. Behind a reverse "
            "proxy, keep the proxy's upstream keep-alive shorter than this.",
        ),
    )

    host: str
    port: int
    data_dir: Path
    trusted_proxies: tuple[IPNetwork, ...]
    log_level: str
    access_log: bool
    event_loop: str
    body_timeout: float  # seconds
    keepalive_timeout: float  # seconds

    @classmethod
    def load(cls, read: Read) -> ServerSettings:
        return cls(
            host=read("HOST") or DEFAULTS["HOST"],
            port=_integer("PORT", read("PORT"), 1, 65535),
            data_dir=Path(read("DATA_DIR") or DEFAULTS["DATA_DIR"]),
            trusted_proxies=_networks("TRUSTED_PROXIES", read("TRUSTED_PROXIES")),
            log_level=_choice("LOG_LEVEL", read("LOG_LEVEL").upper(), ("DEBUG", "INFO", "WARNING", "ERROR")),
            access_log=_boolean("ACCESS_LOG", read("ACCESS_LOG")),
            event_loop=_choice("EVENT_LOOP", read("EVENT_LOOP").lower(), ("auto", "asyncio", "uvloop")),
            body_timeout=_integer("BODY_TIMEOUT_MS", read("BODY_TIMEOUT_MS"), 1, 600_000) / 1000,
            keepalive_timeout=_integer("KEEPALIVE_TIMEOUT_MS", read("KEEPALIVE_TIMEOUT_MS"), 1, 3_600_000) / 1000,
        )


@dataclass(frozen=True)
class PrivacySettings:
    """How visitors are hashed, and which of their signals are honoured."""

    TITLE: ClassVar[str] = "Privacy"
    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "SECRET_KEY",
            "",
            "Seeds the daily visitor-hash salt; at least 32 characters. When unset, one is generated "
            "and kept in DATA_DIR/secret_key (mode 0600). Changing it changes every visitor hash.",
        ),
        Setting(
            "PRIVACY_MODE",
            "seed",
            "seed: the original collector's hash, its daily salt derived from SECRET_KEY; ephemeral: a random "
            "salt per UTC day, deleted after 48 hours, so no hash can be linked back to an address afterwards.",
        ),
        Setting("RESPECT_GPC", "true", "true: a page view with Sec-GPC: 1 is not counted."),
        Setting("RESPECT_DNT", "false", "true: a page view with DNT: 1 is not counted."),
    )

    secret_key: str = field(repr=False)  # empty until start-up's with_secret_key() when not given
    mode: str
    respect_gpc: bool
    respect_dnt: bool

    @classmethod
    def load(cls, read: Read) -> PrivacySettings:
        return cls(
            secret_key=_given_secret_key(read("SECRET_KEY")),
            mode=_choice("PRIVACY_MODE", read("PRIVACY_MODE").lower(), privacy.PRIVACY_MODES),
            respect_gpc=_boolean("RESPECT_GPC", read("RESPECT_GPC")),
            respect_dnt=_boolean("RESPECT_DNT", read("RESPECT_DNT")),
        )


@dataclass(frozen=True)
class StatsSettings:
    """Who may read the statistics, whose days they follow, and how long raw rows are kept."""

    TITLE: ClassVar[str] = "Statistics"
    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "STATS_TOKEN",
            "",
            "Bearer token for /api/stats, /api/sites, /api/export and the dashboard; at least 16 characters. "
            "When unset, the statistics answer only clients on loopback.",
        ),
        Setting("TIMEZONE", "UTC", "IANA time zone whose days the statistics follow, e.g. Europe/Copenhagen."),
        Setting(
            "RAW_RETENTION_DAYS",
            "30",
            "Days of raw page view and custom event rows and local event log kept (whole local days, plus today); "
            "aggregates are kept for good.",
        ),
    )

    token: str = field(repr=False)
    timezone: ZoneInfo
    raw_retention_days: int

    @classmethod
    def load(cls, read: Read) -> StatsSettings:
        return cls(
            token=_stats_token("STATS_TOKEN", read("STATS_TOKEN")),
            timezone=_zone("TIMEZONE", read("TIMEZONE")),
            raw_retention_days=_integer("RAW_RETENTION_DAYS", read("RAW_RETENTION_DAYS"), 1, 36500),
        )


@dataclass(frozen=True)
class CollectionSettings:
    """Which sites' page views are collected, which pages may read the answer, and how fast one
    client may send."""

    TITLE: ClassVar[str] = "Sites, origins and the rate limit"
    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "ALLOWED_DOMAINS",
            "",
            "Comma-separated domains whose page views are counted (example.com, *.example.com for its "
            "subdomains but not itself); others are dropped. Empty: any domain.",
        ),
        Setting(
            "MAX_SITES",
            "1000",
            "Distinct domains counted; a page view for a new domain beyond it is dropped (X-Collector-Dropped: "
            "site-limit), so invented domains cannot grow the database. ALLOWED_DOMAINS is the better guard.",
        ),
        Setting(
            "ALLOWED_ORIGINS",
            "*",
            "Comma-separated origins that get CORS headers on /api/pageview (https://example.com, "
            "https://*.example.com), or * for any.",
        ),
        Setting(
            "RATE_LIMIT_PER_SECOND",
            "10",
            "Page views and events per second one client address (IPv4, or IPv6 /64) may send on average; "
            "0: no limit.",
        ),
        Setting(
            "RATE_LIMIT_BURST",
            "50",
            "Page views and events one client address may send at once before the rate applies.",
        ),
        Setting(
            "RATE_LIMIT_TABLE_SIZE",
            "100000",
            "Client addresses the rate limiter remembers (in memory only); beyond, the least recent is forgotten.",
        ),
    )

    allowed_domains: DomainAllowList | None  # None: any domain
    max_sites: int
    allowed_origins: OriginAllowList
    rate_limit_per_second: float  # 0: no limit
    rate_limit_burst: int
    rate_limit_table_size: int

    @classmethod
    def load(cls, read: Read) -> CollectionSettings:
        return cls(
            allowed_domains=_allowed_domains("ALLOWED_DOMAINS", read("ALLOWED_DOMAINS")),
            max_sites=_integer("MAX_SITES", read("MAX_SITES"), 1, 10_000_000),
            allowed_origins=_allowed_origins("ALLOWED_ORIGINS", read("ALLOWED_ORIGINS")),
            rate_limit_per_second=_number("RATE_LIMIT_PER_SECOND", read("RATE_LIMIT_PER_SECOND"), 0, 1_000_000),
            rate_limit_burst=_integer("RATE_LIMIT_BURST", read("RATE_LIMIT_BURST"), 1, 1_000_000),
            rate_limit_table_size=_integer("RATE_LIMIT_TABLE_SIZE", read("RATE_LIMIT_TABLE_SIZE"), 100, 10_000_000),
        )


@dataclass(frozen=True)
class EventSettings:
    """What a page view event carries, the bounds on custom events, and how often a failing
    handler is tried."""

    TITLE: ClassVar[str] = "Events"
    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting(
            "EVENT_VERSION",
            "v1",
            "v1: page views are visitor.tracked.v1 events (v0 plus country, browser, os, device and utm); "
            "v0: the original collector's visitor.tracked.v0 payload, byte for byte, without those dimensions.",
        ),
        Setting(
            "GEOIP_DATABASE",
            "",
            "Path to a MaxMind or DB-IP country or city database (.mmdb) to look countries up in, instead of "
            "the built-in registry data. Read at start-up; never downloaded.",
        ),
        Setting(
            "EVENT_NAMES_PER_DAY",
            "100",
            "Distinct custom event names counted per site and local day; events of further names that day count "
            "under (other).",
        ),
        Setting(
            "EVENT_PROPERTY_VALUES_PER_DAY",
            "1000",
            "Distinct (event, property, value) combinations counted per site and local day; further values count "
            "under (other).",
        ),
        Setting(
            "HANDLER_MAX_ATTEMPTS",
            "5",
            "Attempts a failing event handler gets before the event goes to the dead-letter table; for an event "
            "delivered to /api/transformer, quick ones within the request, which then answers 503.",
        ),
    )

    version: str
    geoip_database: Path | None  # None: the built-in registry data
    names_per_day: int
    property_values_per_day: int
    handler_max_attempts: int

    @classmethod
    def load(cls, read: Read) -> EventSettings:
        return cls(
            version=_choice("EVENT_VERSION", read("EVENT_VERSION").lower(), EVENT_VERSIONS),
            geoip_database=Path(read("GEOIP_DATABASE")) if read("GEOIP_DATABASE") else None,
            names_per_day=_integer("EVENT_NAMES_PER_DAY", read("EVENT_NAMES_PER_DAY"), 1, 100_000),
            property_values_per_day=_integer("EVENT_PROPERTY_VALUES_PER_DAY", read("EVENT_PROPERTY_VALUES_PER_DAY"),
                                             1, 1_000_000),
            handler_max_attempts=_integer("HANDLER_MAX_ATTEMPTS", read("HANDLER_MAX_ATTEMPTS"), 1, 1000),
        )


@dataclass(frozen=True)
class WebhookSettings:
    """Where and how events are sent to Flowcore's ingestion webhook (Flowcore mode)."""

    base_url: str
    tenant: str
    data_core: str
    api_key: str = field(repr=False)
    batch_size: int
    timeout: float  # seconds
    retry_base: float  # seconds
    retry_max: float  # seconds

    def events_url(self, flow_type: str, event_type: str) -> str:
        parts = (self.tenant, self.data_core, flow_type, event_type)
        return f"{self.base_url.rstrip('/')}/events/" + "/".join(quote(part, safe="") for part in parts)


@dataclass(frozen=True)
class FlowcoreSettings:
    """Sending events to Flowcore (its webhook; None: the local event log), and receiving them
    back at /api/transformer (in either mode, when the secret is set)."""

    TITLE: ClassVar[str] = "Flowcore"
    SETTINGS: ClassVar[tuple[Setting, ...]] = (
        Setting("FLOWCORE_TENANT", "", "Flowcore tenant; with FLOWCORE_API_KEY, events go to Flowcore."),
        Setting(
            "FLOWCORE_API_KEY", "", "Flowcore API key (fc_...), sent as the raw Authorization header. Never logged."
        ),
        Setting("FLOWCORE_WEBHOOK_BASEURL", "https://webhook.api.flowcore.io", "Flowcore ingestion webhook base URL."),
        Setting("FLOWCORE_DATA_CORE", "flow-analytics", "Flowcore data core name (or id)."),
        Setting(
            "FLOWCORE_TRANSFORMER_SECRET",
            "",
            "Enables POST /api/transformer (in either mode); Flowcore must send it in the X-Secret header.",
        ),
        Setting(
            "FLOWCORE_TRANSFORMER_SECRET_HEADER",
            "X-Secret",
            "The request header /api/transformer reads the secret from (the original collector's: X-Secret).",
        ),
        Setting("FLOWCORE_BATCH_SIZE", "100", "Events per request to the Flowcore webhook (1 to 1000)."),
        Setting("FLOWCORE_TIMEOUT_MS", "10000", "How long one request to Flowcore may take before it is retried."),
        Setting("FLOWCORE_RETRY_BASE_MS", "500", "First retry delay after a failed send; it doubles each time."),
        Setting("FLOWCORE_RETRY_MAX_MS", "60000", "Longest delay between retries while Flowcore is down."),
    )

    webhook: WebhookSettings | None  # None: local mode, the local event log
    transformer_secret: str = field(repr=False)  # empty: /api/transformer is disabled
    transformer_secret_header: str

    @classmethod
    def load(cls, read: Read) -> FlowcoreSettings:
        return cls(
            webhook=_webhook(read),
            transformer_secret=read("FLOWCORE_TRANSFORMER_SECRET"),
            transformer_secret_header=_header_name("FLOWCORE_TRANSFORMER_SECRET_HEADER",
                                                   read("FLOWCORE_TRANSFORMER_SECRET_HEADER")),
        )


# In the order --help, docs/settings.md and env.example show them.
FEATURES: tuple[type[Feature], ...] = (
    ServerSettings, PrivacySettings, StatsSettings, CollectionSettings, EventSettings, FlowcoreSettings,
)
SETTINGS: tuple[Setting, ...] = tuple(setting for feature in FEATURES for setting in feature.SETTINGS)
DEFAULTS = {setting.name: setting.default for setting in SETTINGS}

# Settings of the original collector that have no use here: recognised, reported at start-up as
# ignored (never with their value: a connection string holds a password), and otherwise harmless.
IGNORED_SETTINGS = {
    "POSTGRES_CONNECTION_STRING": "the state of processed events (table pathway_state) lives in the SQLite file in "
    "DATA_DIR, in the same transaction as the statistics it guards, so no Postgres is needed",
}


@dataclass(frozen=True)
class Config:
    server: ServerSettings
    privacy: PrivacySettings
    stats: StatsSettings
    collection: CollectionSettings
    events: EventSettings
    flowcore: FlowcoreSettings
    ignored_settings: tuple[str, ...]  # IGNORED_SETTINGS that are set

    @property
    def mode(self) -> str:
        return "local" if self.flowcore.webhook is None else "flowcore"


def load_config(environ: Mapping[str, str]) -> Config:
    """Read every setting once, each feature its own; a bad value raises ConfigError naming the variable."""
    return Config(
        server=ServerSettings.load(_reader(environ, ServerSettings)),
        privacy=PrivacySettings.load(_reader(environ, PrivacySettings)),
        stats=StatsSettings.load(_reader(environ, StatsSettings)),
        collection=CollectionSettings.load(_reader(environ, CollectionSettings)),
        events=EventSettings.load(_reader(environ, EventSettings)),
        flowcore=FlowcoreSettings.load(_reader(environ, FlowcoreSettings)),
        ignored_settings=tuple(name for name in IGNORED_SETTINGS if environ.get(name, "").strip()),
    )


def _reader(environ: Mapping[str, str], feature: type[Feature]) -> Read:
    """The feature's own settings, and only those (another's name is a KeyError: a bug)."""
    defaults = {setting.name: setting.default for setting in feature.SETTINGS}

    def read(name: str) -> str:
        return environ.get(name, defaults[name]).strip()

    return read



def _boolean(name: str, text: str) -> bool:
    return _choice(name, text.lower(), ("true", "false")) == "true"


def _number(name: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {text!r}") from None
    if not low <= value <= high:  # NaN fails this too
        raise ConfigError(f"{name} must be from {low:g} to {high:g}, not {text}")
    return value


def _allowed_domains(name: str, text: str) -> DomainAllowList | None:
    try:
        return filters.parse_domains(text, normalize_host)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None


def _allowed_origins(name: str, text: str) -> OriginAllowList:
    try:
        return filters.parse_origins(text, normalize_host)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None


def _webhook(read: Read) -> WebhookSettings | None:
    """Flowcore mode when both the tenant and the key are set; one without the other is a mistake.
    The webhook's other settings are only read (and checked) in Flowcore mode."""
    tenant, key = read("FLOWCORE_TENANT"), read("FLOWCORE_API_KEY")
    if not tenant and not key:
        return None
    if not (tenant and key):
        missing = "FLOWCORE_API_KEY" if tenant else "FLOWCORE_TENANT"
        raise ConfigError(f"{missing} is not set: Flowcore mode needs both FLOWCORE_TENANT and FLOWCORE_API_KEY "
                          "(unset both for the local event log)")
    base_url = read("FLOWCORE_WEBHOOK_BASEURL")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"FLOWCORE_WEBHOOK_BASEURL must be an http(s) URL, not {base_url!r}")
    data_core = read("FLOWCORE_DATA_CORE")
    if not data_core:
        raise ConfigError("FLOWCORE_DATA_CORE must not be empty")
    return WebhookSettings(
        base_url=base_url,
        tenant=tenant,
        data_core=data_core,
        api_key=key,
        batch_size=_integer("FLOWCORE_BATCH_SIZE", read("FLOWCORE_BATCH_SIZE"), 1, 1000),
        timeout=_integer("FLOWCORE_TIMEOUT_MS", read("FLOWCORE_TIMEOUT_MS"), 1, 600_000) / 1000,
        retry_base=_integer("FLOWCORE_RETRY_BASE_MS", read("FLOWCORE_RETRY_BASE_MS"), 1, 600_000) / 1000,
        retry_max=_integer("FLOWCORE_RETRY_MAX_MS", read("FLOWCORE_RETRY_MAX_MS"), 1, 3_600_000) / 1000,
    )


def _header_name(name: str, text: str) -> str:
    if not HEADER_NAME.fullmatch(text):
        raise ConfigError(f"{name} must be an HTTP header name such as X-Secret, not {text!r}")
    return text


def _integer(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be from {low} to {high}, not {value}")
    return value


def _choice(name: str, text: str, choices: Sequence[str]) -> str:
    if text not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {text!r}")
    return text


def _networks(name: str, text: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an IP address or CIDR range") from None
    return tuple(networks)


def _zone(name: str, text: str) -> ZoneInfo:
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name} must be an IANA time zone such as Europe/Copenhagen, not {text!r}") from None


def _stats_token(name: str, text: str) -> str:
    if text and (len(text) < MIN_STATS_TOKEN_LENGTH or not text.isprintable() or " " in text):
        raise ConfigError(f"{name} must be at least {MIN_STATS_TOKEN_LENGTH} printable characters without spaces")
    return text


def _given_secret_key(given: str) -> str:
    """SECRET_KEY from the environment; empty means "use or create the one kept in DATA_DIR"."""
    if given and len(given) < MIN_SECRET_KEY_LENGTH:
        raise ConfigError(f"SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters long")
    return given


def with_secret_key(config: Config) -> Config:
    """The config with its secret key: the given one, else the one kept in DATA_DIR, else a new
    one written there atomically (a temporary file, fsync, rename), so a failed write leaves no
    file behind. Called at start-up, once DATA_DIR is locked; never while parsing settings."""
    if config.privacy.secret_key:
        return config
    path = config.server.data_dir / SECRET_KEY_FILE
    try:
        if path.exists():
            key = path.read_text().strip()
            if len(key) < MIN_SECRET_KEY_LENGTH:
                raise ConfigError(f"SECRET_KEY: the key stored in {path} is shorter than {MIN_SECRET_KEY_LENGTH} "
                                  "characters; delete the file to generate a new one (every visitor hash changes)")
            logger.info("SECRET_KEY is not set: using the one stored in %s", path)
            return replace(config, privacy=replace(config.privacy, secret_key=key))
        key = secrets.token_urlsafe(48)
        _write_private_atomically(path, key + "\n")
    except OSError as error:
        raise ConfigError(f"SECRET_KEY is not set and DATA_DIR cannot keep a generated one: {error}") from None
    logger.info("SECRET_KEY is not set: generated one and stored it in %s (mode 0600)", path)
    return replace(config, privacy=replace(config.privacy, secret_key=key))


def _write_private_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            os.fchmod(file.fileno(), 0o600)  # the umask may have taken bits from the mode above
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.rename(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
