"""Configuration: defaults, refusals that name the variable, and the generated secret key."""

from __future__ import annotations

import logging
import resource
import signal
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import collector
from config import DEFAULTS, FEATURES, IGNORED_SETTINGS, SETTINGS, ConfigError, load_config, with_secret_key

ROOT = Path(__file__).resolve().parent.parent


def test_defaults(tmp_path: Path) -> None:
    config = load_config({"DATA_DIR": str(tmp_path)})
    assert (config.server.host, config.server.port, config.stats.timezone.key) == ("0.0.0.0", 3005, "UTC")
    assert config.events.handler_max_attempts == 5
    assert any(net.with_prefixlen == "127.0.0.0/8" for net in config.server.trusted_proxies)
    assert any(net.with_prefixlen == "192.168.0.0/16" for net in config.server.trusted_proxies)
    assert (config.privacy.mode, config.privacy.respect_gpc, config.privacy.respect_dnt) == ("seed", True, False)
    collection = config.collection
    assert (collection.allowed_domains, collection.allowed_origins.any, collection.max_sites) == (None, True, 1000)
    assert (collection.rate_limit_per_second, collection.rate_limit_burst, collection.rate_limit_table_size) == (
        10, 50, 100_000)


def test_the_default_data_dir_is_data_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config({}).server.data_dir == Path("data")


def test_reading_the_settings_touches_no_disk(tmp_path: Path) -> None:
    load_config({"DATA_DIR": str(tmp_path / "d")})
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("TIMEZONE", "Mars/Olympus_Mons"),
        ("TRUSTED_PROXIES", "10.0.0.0/8, 300.1.1.1"),
        ("SECRET_KEY", "too-short"),
        ("HANDLER_MAX_ATTEMPTS", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("PRIVACY_MODE", "paranoid"),
        ("RESPECT_GPC", "maybe"),
        ("RESPECT_DNT", "yes please"),
        ("RATE_LIMIT_PER_SECOND", "-1"),
        ("RATE_LIMIT_PER_SECOND", "fast"),
        ("RATE_LIMIT_PER_SECOND", "nan"),
        ("RATE_LIMIT_BURST", "0"),
        ("RATE_LIMIT_TABLE_SIZE", "5"),
        ("ALLOWED_DOMAINS", "*.*"),
        ("ALLOWED_ORIGINS", "example.com"),
        ("EVENT_VERSION", "v2"),
    ],
)
def test_a_bad_value_names_its_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config({"DATA_DIR": str(tmp_path), name: value})


def test_main_stops_with_the_message_on_a_bad_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env but the test's
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PORT", "-1")
    assert collector.main([]) == 2
    assert "PORT" in capsys.readouterr().err


def test_main_stops_with_the_message_on_an_unreadable_geoip_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GEOIP_DATABASE", str(tmp_path / "missing.mmdb"))
    assert collector.main([]) == 2
    assert "GEOIP_DATABASE: cannot read" in capsys.readouterr().err


def test_the_event_version_is_v1_unless_v0_is_asked_for(tmp_path: Path) -> None:
    assert load_config({"DATA_DIR": str(tmp_path)}).events.version == "v1"
    assert load_config({"DATA_DIR": str(tmp_path), "EVENT_VERSION": " V0 "}).events.version == "v0"


def test_an_empty_trusted_proxies_trusts_no_one(tmp_path: Path) -> None:
    assert load_config({"DATA_DIR": str(tmp_path), "TRUSTED_PROXIES": ""}).server.trusted_proxies == ()


def test_a_missing_secret_key_is_generated_once_kept_private_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    (tmp_path / "d").mkdir()
    config = load_config({"DATA_DIR": str(tmp_path / "d")})
    assert config.privacy.secret_key == ""
    first = with_secret_key(config)
    key_file = tmp_path / "d" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(first.privacy.secret_key) >= 32
    assert [path.name for path in (tmp_path / "d").iterdir()] == ["secret_key"]  # no temporary file left
    second = with_secret_key(config)
    assert second.privacy.secret_key == first.privacy.secret_key
    assert "generated" in caplog.text and "using the one stored" in caplog.text
    assert first.privacy.secret_key not in caplog.text
    assert first.privacy.secret_key not in repr(first)


def test_a_given_secret_key_is_used_and_not_stored(tmp_path: Path) -> None:
    config = with_secret_key(load_config({"DATA_DIR": str(tmp_path), "SECRET_KEY": "k" * 32}))
    assert config.privacy.secret_key == "k" * 32
    assert not (tmp_path / "secret_key").exists()


def test_a_failed_key_write_leaves_no_file(tmp_path: Path) -> None:
    """A write that fails part-way (here: a file size limit of 0 bytes, as a full disk would)
    leaves neither an empty key nor a temporary file, so the next start generates a key."""
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    config = load_config({"DATA_DIR": str(data_dir)})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        with pytest.raises(ConfigError, match="SECRET_KEY"):
            with_secret_key(config)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert list(data_dir.iterdir()) == []
    assert len(with_secret_key(config).privacy.secret_key) >= 32


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (ROOT / "env.example").read_text()
    for setting in SETTINGS:
        assert f"{setting.name}={setting.default}" in text.replace("# ", ""), setting.name


def test_the_config_is_immutable(tmp_path: Path) -> None:
    config = load_config({"DATA_DIR": str(tmp_path)})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.server = config.server  # type: ignore[misc]


class AskedFor(Mapping[str, str]):
    """An environment that remembers which names were looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        self.given, self.asked = values, set[str]()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return self.given[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.given)

    def __len__(self) -> int:
        return len(self.given)


def test_every_setting_belongs_to_one_feature_and_is_read_by_it(tmp_path: Path) -> None:
    """Each feature reads its settings through a reader that knows only its own rows (asking
    for another feature's is a KeyError), so every row being asked for means each is read by the
    feature that declares it: none is listed in --help and then ignored."""
    assert len(DEFAULTS) == len(SETTINGS) == sum(len(feature.SETTINGS) for feature in FEATURES)
    environ = AskedFor({"DATA_DIR": str(tmp_path), "FLOWCORE_TENANT": "acme", "FLOWCORE_API_KEY": "fc_x_y"})
    config = load_config(environ)
    assert environ.asked == set(DEFAULTS) | set(IGNORED_SETTINGS)
    assert config.mode == "flowcore" and load_config({"DATA_DIR": str(tmp_path)}).mode == "local"
