"""A first run as a real process: the data directory private whatever the umask, one line that
says what to do when it is not writable, and a log that says why a page view was not counted."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
from helpers import BROWSER_UA
from test_process import ROOT, Running, free_port, running, send_pageviews  # noqa: F401  (running is a fixture)

PAGEVIEW = b'{"pathname": "/", "referrer": "", "domain": "example.com"}'


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_data_directory_and_its_files_are_private_whatever_the_umask(
    running: Running, tmp_path: Path  # noqa: F811
) -> None:
    process = running()
    permissive = os.umask(0)  # the child inherits it: what it creates would be 0777 and 0666
    try:
        await process.start()
    finally:
        os.umask(permissive)
    assert await send_pageviews(process.url, 3) == [204] * 3
    data = tmp_path / "data"
    files = {path.name: mode(path) for path in data.iterdir()}
    assert mode(data) == 0o700
    # the WAL and SHM files exist while the collector runs; SQLite gives them the database's mode
    assert files == {name: 0o600 for name in (
        "collector.sqlite3", "collector.sqlite3-wal", "collector.sqlite3-shm", "secret_key", "collector.lock")}
    assert process.stop(signal.SIGTERM) == 0


async def test_a_data_directory_it_cannot_write_stops_it_with_one_line_saying_what_to_do(tmp_path: Path) -> None:
    """As a root-owned bind mount does to the container's user. Root writes anywhere, so as root
    the collector runs without the capabilities that let it (setpriv, from util-linux)."""
    data = tmp_path / "mounted"
    data.mkdir(mode=0o755)
    if os.getuid() == 0:
        os.chown(data, 65534, 65534)
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    else:
        data.chmod(0o555)
        prefix = []
    env = {**os.environ, "DATA_DIR": str(data), "HOST": "127.0.0.1", "PORT": str(free_port())}
    done = await asyncio.to_thread(
        subprocess.run, [*prefix, sys.executable, str(ROOT / "collector.py")], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"collector: DATA_DIR {data} is not writable by the collector's user ")
    assert lines[-1].endswith(
        f"(user id {os.getuid()}): {data / 'collector.lock'} refused it; make it writable for that user "
        f"(chown -R {os.getuid()} {data}), use a named Docker volume, or set DATA_DIR to a directory it can write")
    assert "Traceback" not in done.stderr and "SECRET_KEY" not in done.stderr


async def test_the_log_says_why_a_page_view_was_not_counted(running: Running, tmp_path: Path) -> None:  # noqa: F811
    process = running(LOG_LEVEL="DEBUG", ACCESS_LOG="true")
    await process.start()
    async with aiohttp.ClientSession(headers={"Content-Type": "text/plain"}) as session:
        url = process.url + "/api/pageview"
        for headers in ({"User-Agent": "curl/8.5.0"}, {"User-Agent": "curl/8.5.0"},
                        {"User-Agent": BROWSER_UA, "Sec-GPC": "1"}, {"User-Agent": BROWSER_UA}):
            async with session.post(url, data=PAGEVIEW, headers=headers) as answer:
                assert answer.status == 204
    assert process.stop(signal.SIGTERM) == 0
    log = process.log_path.read_text()
    assert log.count("INFO filters: not counted: a page view for example.com, reason bot: sent by a crawler, a bot "
                     "or an HTTP library such as curl") == 1  # the first of its reason, with what it means
    assert log.count("DEBUG filters: not counted: a page view for example.com (bot)") == 1  # the next one
    assert "INFO filters: not counted: a page view for example.com, reason gpc: the browser asks not to be " \
        "tracked with Global Privacy Control" in log
    access = [line for line in log.splitlines() if '"POST /api/pageview HTTP/1.1" 204' in line]
    assert [line.rsplit(" ", 1)[1] for line in access] == ["bot", "bot", "gpc", "-"]
    assert "curl/8.5.0" not in log and "127.0.0.1 " not in log.replace(f"127.0.0.1:{process.port}", "")
