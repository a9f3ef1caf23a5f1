"""The command line as a newcomer meets it: --help and --version, the commands, a .env file, and
what start-up says (where the dashboard, the test page and the snippet are). A real process
wherever the answer depends on main() serving."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from helpers import BROWSER_UA
from test_process import ROOT, Running, running  # noqa: F401  (running is a fixture)

import collector
from config import SETTINGS, load_config

ENV_TOKEN = "token-from-the-environment-0123"
DOTENV_TOKEN = "token-from-the-dotenv-file-0123"


@pytest.fixture(autouse=True)
def away_from_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() reads .env in the working directory: never a developer's own, in the checkout."""
    monkeypatch.chdir(tmp_path)


def test_help_lists_the_commands_and_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert collector.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^    serve +collect page views and serve the dashboard \(the default\)$", out, re.M)
    assert re.search(r"^    rebuild +recompute the statistics", out, re.M)
    assert re.search(r"^    dead-letters\s+list the events whose handler kept failing", out, re.M)
    for setting in SETTINGS:
        shown = f"  {setting.name}={setting.default}\n" if setting.default else f"  {setting.name} (unset)\n"
        assert shown in out, setting.name
    assert ".env" in out


def test_dead_letters_takes_retry(capsys: pytest.CaptureFixture[str]) -> None:
    assert collector.main(["dead-letters", "--help"]) == 0
    assert "--retry" in capsys.readouterr().out
    assert collector.main(["dead-letters", "--again"]) == 2
    assert "unrecognized arguments: --again" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert collector.main(["--version"]) == 0
    assert capsys.readouterr().out.strip().endswith(f" {collector.__version__}")


def test_an_unknown_command_is_a_usage_error_naming_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert collector.main(["rebuild-everything"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    assert "invalid choice: 'rebuild-everything' (choose from 'serve', 'rebuild', 'dead-letters')" in err


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://localhost:3005"),
        ("::", "http://localhost:3005"),
        ("127.0.0.1", "http://127.0.0.1:3005"),
        ("::1", "http://[::1]:3005"),
        ("stats.example.com", "http://stats.example.com:3005"),
    ],
)
def test_the_address_start_up_shows_is_one_a_browser_can_open(host: str, url: str) -> None:
    assert collector.base_url(load_config({"HOST": host})) == url


def test_dotenv_values_are_taken_as_written_and_unknown_names_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / ".env"
    path.write_text(
        "# a comment\n"
        "STATS_TOKEN=abc$HOME-${PATH}-x\n"  # a secret with $ in it stays whole: no expansion
        "export TIMEZONE=Europe/Copenhagen\n"
        "LOG_LEVEL='DEBUG'\n"
        "STAT_TOKEN=a-typo\n"
    )
    assert collector.read_dotenv(path) == {
        "STATS_TOKEN": "abc$HOME-${PATH}-x", "TIMEZONE": "Europe/Copenhagen", "LOG_LEVEL": "DEBUG"}
    assert "ignoring STAT_TOKEN: not a setting" in caplog.text
    assert collector.read_dotenv(tmp_path / "absent") == {}


async def test_a_dotenv_file_configures_the_collector_and_the_environment_wins(
    running: Running, tmp_path: Path  # noqa: F811
) -> None:
    (tmp_path / ".env").write_text(f"STATS_TOKEN={DOTENV_TOKEN}\nTIMEZONE=Europe/Copenhagen\n")
    process = running(STATS_TOKEN=ENV_TOKEN)
    await process.start()
    async with aiohttp.ClientSession() as session:
        def read(token: str) -> aiohttp.client._RequestContextManager:
            return session.get(process.url + "/api/stats?domain=example.com",
                               headers={"Authorization": f"Bearer {token}"})

        async with read(DOTENV_TOKEN) as refused:
            assert refused.status == 401  # the environment's token, not the file's
        async with read(ENV_TOKEN) as answer:
            assert answer.status == 200
            assert (await answer.json())["timezone"] == "Europe/Copenhagen"  # from the file
    assert "settings read from" in process.log_path.read_text()


async def test_start_up_says_where_the_dashboard_the_test_page_and_the_snippet_are(running: Running) -> None:  # noqa: F811
    process = running("serve")  # the default command, named
    await process.start()
    log = process.log_path.read_text()
    base = f"http://127.0.0.1:{process.port}"
    # (what it adds depends on whether it runs in a container: there, a browser on the host needs the token)
    assert re.search(rf"dashboard: {re.escape(base)}/dashboard \(.*STATS_TOKEN.*\)\n", log)
    assert f"test page: {base}/test.html" in log
    assert f'snippet for your pages: <script defer src="{base}/script.js"></script>' in log
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as session:
        for path in ("/dashboard", "/test.html", "/script.js"):
            async with session.get(base + path) as answer:
                assert answer.status == 200, path


async def test_addresses_are_only_said_once_the_collector_listens(running: Running, tmp_path: Path) -> None:  # noqa: F811
    first = running()
    await first.start()
    env = {**first.env, "DATA_DIR": str(tmp_path / "second")}  # the same port, which is taken
    second = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(ROOT / "collector.py")], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert second.returncode != 0
    assert "test page:" not in second.stdout + second.stderr
