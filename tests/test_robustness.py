"""The collector as a real process when things go wrong: a broken database file, writes that
fail (a file-size limit of 0 bytes, set on the running process, makes every write fail as a
full disk does), a port already bound, a HOST that does not resolve, a DATA_DIR it cannot use,
and running out of file descriptors. Each ends in one line and a non-zero exit status, or in
an outage the collector survives, never in a traceback on the terminal or a hang.

The output goes to a pipe, not a file: while the test limits file sizes, a log file could not
be written either."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import BROWSER_UA, poll, query
from test_process import free_port

from store import DB_FILENAME

ROOT = Path(__file__).resolve().parent.parent
SECRET = "robustness-test-secret-key-0123456789"
Preexec = Callable[[], None]


class Collector:
    """`python collector.py` in a subprocess; everything it prints is kept in `output`."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.port = int(env.get("PORT") or free_port())
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATA_DIR": str(data_dir), "HOST": "127.0.0.1", "PORT": str(self.port),
                    "SECRET_KEY": SECRET, "PYTHONUNBUFFERED": "1", "RATE_LIMIT_PER_SECOND": "0", **env}
        self.env = {name: value for name, value in self.env.items() if value != "<unset>"}
        self.process: asyncio.subprocess.Process | None = None
        self.output = bytearray()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, preexec: Preexec | None = None) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "collector.py"), env=self.env, cwd=ROOT, preexec_fn=preexec,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while chunk := await self.process.stdout.read(65536):
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def exit_status(self, timeout: float = 30) -> int:
        """Wait for the process to end by itself (a hang fails the test), and its output to close."""
        assert self.process is not None and self._reader is not None
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"the collector did not exit within {timeout:g} s:\n{self.text}") from None
        await asyncio.wait_for(self._reader, timeout)
        return code

    async def healthy(self, timeout: float = 30) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async def answers() -> bool:
                assert self.process is not None and self.process.returncode is None, self.text
                try:
                    async with session.get(self.url + "/health") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await poll(answers, timeout, "/health answering 200")
            async with session.get(self.url + "/health") as response:
                body: dict[str, Any] = await response.json()
                return body

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.exit_status()


@pytest.fixture
async def collectors() -> AsyncIterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for collector in made:
        if collector.process is not None and collector.process.returncode is None:
            collector.process.kill()
            await collector.process.wait()


@pytest.fixture
def launch(collectors: list[Collector], tmp_path: Path) -> Callable[..., Collector]:
    def make(data_dir: Path | None = None, **env: str) -> Collector:
        collector = Collector(data_dir or tmp_path / "data", **env)
        collectors.append(collector)
        return collector

    return make


def assert_one_line_error(collector: Collector, *fragments: str) -> str:
    """The output ends with one `collector: ...` line that says all the fragments, and holds no traceback."""
    text = collector.text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("collector: ")]
    assert len(errors) == 1, text
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# -- a broken database ----------------------------------------------------------------------------------


def make_database(path: Path, rows: int = 20_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE filler (text TEXT)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 200,)] * rows)
    conn.close()


def random_bytes(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(100_000))


def truncated(path: Path) -> None:
    make_database(path)
    os.truncate(path, path.stat().st_size // 2)


def overwritten_pages(path: Path) -> None:
    make_database(path)
    with path.open("r+b") as file:
        file.seek(4096 * 5)
        file.write(os.urandom(4096 * 20))


BROKEN = [
    pytest.param(random_bytes, "is not an SQLite database", id="random-bytes"),
    pytest.param(truncated, "is corrupt", id="truncated"),
    pytest.param(overwritten_pages, "is corrupt", id="overwritten-pages"),
]


@pytest.mark.parametrize(("damage", "said"), BROKEN)
async def test_a_broken_database_stops_the_process_with_one_line(
    launch: Callable[..., Collector], tmp_path: Path, damage: Callable[[Path], None], said: str
) -> None:
    data = tmp_path / "data"
    damage(data / DB_FILENAME)
    collector = launch(data)
    await collector.start()
    assert await collector.exit_status() == 1
    line = assert_one_line_error(collector, str(data / DB_FILENAME), said)
    assert "\n" not in line
    assert "listening on" not in collector.text


async def test_rebuild_on_a_broken_database_is_one_line(tmp_path: Path) -> None:
    random_bytes(tmp_path / "data" / DB_FILENAME)
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "SECRET_KEY": SECRET}
    process = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "collector.py"), "rebuild", env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert err.decode().splitlines() == [f"collector rebuild: {tmp_path / 'data' / DB_FILENAME} is not an SQLite "
                                         "database (or is encrypted); point DATA_DIR elsewhere, or move the file away"]


@pytest.mark.parametrize("arguments", [["dead-letters"], ["dead-letters", "--retry"]])
async def test_dead_letters_on_a_broken_database_is_one_line(tmp_path: Path, arguments: list[str]) -> None:
    random_bytes(tmp_path / "data" / DB_FILENAME)
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "SECRET_KEY": SECRET}
    process = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "collector.py"), *arguments, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert err.decode().splitlines() == [f"collector dead-letters: {tmp_path / 'data' / DB_FILENAME} is not an "
                                         "SQLite database (or is encrypted); point DATA_DIR elsewhere, or move the "
                                         "file away"]


async def test_a_database_from_a_newer_version_names_the_unknown_migration(
    launch: Callable[..., Collector], tmp_path: Path
) -> None:
    collector = launch()
    await collector.start()
    await collector.healthy()
    assert await collector.stop() == 0
    conn = sqlite3.connect(tmp_path / "data" / DB_FILENAME)
    with conn:
        conn.execute("INSERT INTO schema_migrations (name, applied_at) VALUES ('0099_from_the_future', 'x')")
    conn.close()

    again = launch()
    await again.start()
    assert await again.exit_status() == 1
    line = assert_one_line_error(again, "newer version", "0099_from_the_future", DB_FILENAME)
    assert "0003" not in line  # the read model's migrations are known: the store has them all at open


async def test_the_traceback_of_a_broken_database_goes_to_the_debug_log(
    launch: Callable[..., Collector], tmp_path: Path
) -> None:
    random_bytes(tmp_path / "data" / DB_FILENAME)
    collector = launch(LOG_LEVEL="DEBUG")
    await collector.start()
    assert await collector.exit_status() == 1
    assert "DEBUG collector: start-up failed" in collector.text  # the traceback follows it, in the log
    assert [line for line in collector.text.splitlines() if line.startswith("collector: ")]


# -- writes that fail -------------------------------------------------------------------------------------


def limit_file_size(pid: int, size: int) -> None:
    """RLIMIT_FSIZE on a running process: every write past `size` bytes of any file fails with
    EFBIG (Python ignores SIGXFSZ), as writes fail on a full disk."""
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size if size >= 0 else hard, hard))


async def send(url: str, count: int, *, agent: str = BROWSER_UA, tag: str = "p",
               event: bool = False) -> list[tuple[int, str | None, Any]]:
    """`count` page views (or custom events) at once: (status, Retry-After, JSON body or None) for each."""
    async with aiohttp.ClientSession(headers={"User-Agent": agent}) as session:
        async def one(index: int) -> tuple[int, str | None, Any]:
            fields = {"pathname": f"/{tag}/{index}", "referrer": "", "domain": "example.com"}
            body = json.dumps({**fields, "name": "Signup"} if event else fields)
            path = "/api/event" if event else "/api/pageview"
            async with session.post(url + path, data=body, headers={"Content-Type": "text/plain"}) as answer:
                content = await answer.read()
                return answer.status, answer.headers.get("Retry-After"), json.loads(content) if content else None

        return list(await asyncio.gather(*(one(index) for index in range(count))))


async def health(url: str) -> tuple[int, dict[str, Any], str | None]:
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as response:
        return response.status, await response.json(), response.headers.get("Retry-After")


async def test_a_full_disk_is_an_outage_and_nothing_accepted_is_lost(
    launch: Callable[..., Collector], tmp_path: Path
) -> None:
    collector = launch()
    await collector.start()
    await collector.healthy()
    assert [status for status, _, _ in await send(collector.url, 50, tag="before")] == [204] * 50
    await poll(lambda: query(tmp_path / "data", "SELECT count(*) FROM pageviews") == [(50,)], what="50 counted")

    limit_file_size(collector.pid, 0)  # from now on, every write fails
    refused = []
    for round_ in range(5):  # several group commits, each failing
        refused += await send(collector.url, 20, tag=f"during{round_}")
    assert {status for status, _, _ in refused} == {503}
    assert {retry for _, retry, _ in refused} == {"30"}
    assert all(body["status"] == 503 and "try again" in body["error"] for _, _, body in refused)
    events = await send(collector.url, 10, tag="during", event=True)  # custom events: the same outage
    assert {(status, retry) for status, retry, _ in events} == {(503, "30")}
    assert all("try again" in body["error"] for _, _, body in events)
    assert [status for status, _, _ in await send(collector.url, 3, agent="curl/8.5.0", tag="bot")] == [204] * 3
    status, body, retry = await health(collector.url)
    assert status == 503 and retry == "30"
    assert body["status"] == "unavailable" and body["database"] == "not writable"
    assert "disk I/O error" in body["write_error"] and body["failed_writes"] >= 5
    # Background writers fail too, each second: the drop counter (the bot's drop is waiting) and
    # /health's write probe, at most one each a second. Six more failures: two seconds or more.
    failed = body["failed_writes"]
    await poll(lambda: failed_writes_reach(collector.url, failed + 6), 20, "more failed writes")

    limit_file_size(collector.pid, -1)  # the disk is back
    await poll(lambda: health_status(collector.url), what="/health answering 200 again")
    assert [status for status, _, _ in await send(collector.url, 30, tag="after")] == [204] * 30
    assert [status for status, _, _ in await send(collector.url, 4, tag="after", event=True)] == [204] * 4
    data = tmp_path / "data"
    await poll(lambda: query(data, "SELECT count(*) FROM pageviews") == [(80,)], what="80 counted")
    paths = {row[0].split("/")[1] for row in query(data, "SELECT pathname FROM pageviews")}
    assert paths == {"before", "after"}  # every 204 counted once, no 503 counted
    await poll(lambda: query(data, "SELECT count(*), count(DISTINCT event_id) FROM event_log") == [(84, 84)],
               what="80 page views and 4 events logged")
    events_logged = query(data, "SELECT payload ->> '$.pathname' FROM event_log WHERE event_type = 'visitor.event.v0'")
    assert {row[0].split("/")[1] for row in events_logged} == {"after"}  # no 503 was kept
    # the drops counted while the disk was full were kept in memory and written once it was back
    await poll(lambda: query(data, "SELECT sum(count) FROM dropped_pageviews WHERE reason = 'bot'") == [(3,)],
               what="the bot drops written")
    assert await collector.stop() == 0

    log = collector.text
    assert log.count("fail: disk I/O error") == 1, log  # the outage is logged once when it starts...
    assert log.count("work again, after") == 1, log  # ...and once when it ends, with the count
    assert log.count("writing the drop counts failed") == 1, log  # repeated each second, written once
    assert "Traceback" not in log, log  # not one per request, nor one a second
    assert len(log) < 5_000, log


async def failed_writes_reach(url: str, count: int) -> bool:
    return int((await health(url))[1].get("failed_writes", 0)) >= count


async def health_status(url: str) -> bool:
    try:
        return (await health(url))[0] == 200
    except aiohttp.ClientError:
        return False


def no_file_writes() -> None:
    """In the child, before exec: no file may grow past 0 bytes (a disk that is full from the start)."""
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))


async def test_a_first_start_on_a_full_disk_leaves_no_secret_key_behind(
    launch: Callable[..., Collector], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = launch(SECRET_KEY="<unset>")
    await first.start(no_file_writes)
    assert await first.exit_status() == 2
    assert_one_line_error(first, "SECRET_KEY", "File too large")
    assert not (data / "secret_key").exists()
    assert [path.name for path in data.iterdir() if not path.name.startswith("collector.lock")] == []

    second = launch(SECRET_KEY="<unset>")  # the disk has room again: the key is generated now
    await second.start()
    await second.healthy()
    assert len((data / "secret_key").read_text().strip()) >= 32
    assert await second.stop() == 0


# -- start-up errors ----------------------------------------------------------------------------------------


async def test_a_port_in_use_is_one_line_and_listening_is_never_logged(launch: Callable[..., Collector]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        collector = launch(PORT=str(taken.getsockname()[1]))
        await collector.start()
        assert await collector.exit_status() == 1
    assert_one_line_error(collector, f"127.0.0.1:{collector.port}", "in use", "PORT")
    assert "listening on" not in collector.text
    assert "stopped; the database is closed" in collector.text  # what had started was stopped in order


async def test_listening_is_logged_once_the_socket_is_bound(launch: Callable[..., Collector]) -> None:
    collector = launch()
    await collector.start()
    await collector.healthy()
    assert f"listening on 127.0.0.1:{collector.port}" in collector.text
    assert await collector.stop() == 0


async def test_a_host_that_does_not_resolve_is_one_line(launch: Callable[..., Collector]) -> None:
    collector = launch(HOST="collector-test-host.invalid")
    await collector.start()
    assert await collector.exit_status() == 1
    assert_one_line_error(collector, "HOST=collector-test-host.invalid", "does not resolve")


async def test_a_data_dir_that_is_a_file_is_one_line(launch: Callable[..., Collector], tmp_path: Path) -> None:
    file = tmp_path / "not-a-directory"
    file.write_text("x")
    collector = launch(file)
    await collector.start()
    assert await collector.exit_status() == 1
    assert_one_line_error(collector, f"DATA_DIR {file}", "not a directory")


def without_root_file_powers() -> None:
    """In the child, before exec: a root process loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    (dropped from its bounding set, so the collector it execs never has them), and file modes
    bind it as they bind the non-root user the Docker image runs as. Not root: nothing to drop."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-create-inside"])
async def test_a_data_dir_the_user_cannot_write_is_one_line_naming_the_user(
    launch: Callable[..., Collector], tmp_path: Path, exists: bool
) -> None:
    parent = tmp_path / "read-only"
    parent.mkdir()
    data = parent / "data" if exists else parent / "new"
    if exists:
        data.mkdir()
    for path in {parent, data}:
        if path.exists():
            path.chmod(0o555)
    try:
        collector = launch(data)
        await collector.start(without_root_file_powers)
        assert await collector.exit_status() == 1
    finally:
        for path in {parent, data}:
            if path.exists():
                path.chmod(0o755)
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name
    assert_one_line_error(collector, f"DATA_DIR {data}", f"not writable by the collector's user {user}", "chown")


# -- file descriptors ---------------------------------------------------------------------------------------


def descriptor_limits(soft: int, hard: int) -> Preexec:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(launch: Callable[..., Collector]) -> None:
    collector = launch()
    await collector.start(descriptor_limits(128, 512))
    await collector.healthy()
    assert open_files_limit(collector.pid) == (512, 512)
    assert "raised the soft limit from 128 to 512" in collector.text
    assert await collector.stop() == 0


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
async def test_running_out_of_descriptors_logs_a_line_a_second_and_recovers(
    launch: Callable[..., Collector], loop: str
) -> None:
    collector = launch(EVENT_LOOP=loop)
    await collector.start(descriptor_limits(64, 64))
    await collector.healthy()
    held: list[socket.socket] = []
    try:
        for _ in range(150):  # more than the process may hold: accept() fails for the rest
            held.append(socket.create_connection(("127.0.0.1", collector.port), timeout=5))
        if loop == "asyncio":  # uvloop closes what it cannot accept and says nothing
            await poll(lambda: "more times in the last" in collector.text, 15, "a line counting the repeats")
    finally:
        for connection in held:
            connection.close()
    await collector.healthy()  # it serves again once the slow clients are gone
    assert await collector.stop() == 0
    log = collector.text
    assert "Traceback" not in log, log[:3000]
    lines = [line for line in log.splitlines() if "accepting a connection failed" in line]
    assert len(lines) <= 20, lines  # one a second at most, however many accept() calls failed
    assert all("Too many open files" in line and "may hold 64 file descriptors" in line for line in lines)
    assert len(log) < 20_000
