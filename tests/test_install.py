"""Installed as people install it, each in a fresh virtual environment and a copy of the checkout:
a wheel (what `pip wheel .` builds, static/ included), and the README's Quick start (an editable
install) followed to the first counted page view in the dashboard, in a real Chromium, at the
addresses the collector prints. Slow by nature: each installs the dependencies from the package
index (about a minute each on a busy machine)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from browser import PageErrors, browser, new_page  # noqa: F401  (browser is a fixture)
from helpers import BROWSER_UA, poll
from playwright.async_api import Browser
from test_docs import quick_start_commands
from test_process import free_port

import collector

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 420  # seconds: a fresh venv and the dependencies, on a shared two-core machine


def copy_checkout(destination: Path) -> Path:
    """The files git knows (tracked, or new and not ignored): what a fresh clone would hold, without
    the developer's .venv, data or .env."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def clean_environment(**extra: str) -> dict[str, str]:
    """This shell's environment without the test run's own virtual environment in it."""
    env = {name: value for name, value in os.environ.items() if name not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep)
                                  if not part.startswith(str(Path(sys.executable).parent)))
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


async def run(*command: str, cwd: Path, timeout: float = INSTALL_TIMEOUT) -> None:
    done = await asyncio.to_thread(subprocess.run, command, cwd=cwd, env=clean_environment(), capture_output=True,
                                   text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"


class Started:
    """A command started in its own process group, its output in a log file."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    async def line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first log line matching the pattern, waiting for it with a deadline."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            found[:] = [m for m in [re.search(pattern, self.log.read_text())] if m]
            return bool(found)

        await poll(seen, timeout=timeout, what=f"a line matching {pattern!r}")
        return found[0]

    def stop(self) -> int:
        os.killpg(self.process.pid, signal.SIGTERM)  # the shell and the collector it started
        return self.process.wait(timeout=30)


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Started]]:
    made: list[Started] = []

    def start(*args: object, **kwargs: object) -> Started:
        made.append(Started(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield start
    for one in made:
        if one.process.poll() is None:
            os.killpg(one.process.pid, signal.SIGKILL)
            one.process.wait()


@pytest.mark.timeout(INSTALL_TIMEOUT + 120)
async def test_a_wheel_installed_in_a_fresh_venv_serves_its_pages(
    tmp_path: Path, started: Callable[..., Started]
) -> None:
    source = copy_checkout(tmp_path / "checkout")
    await run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), ".", cwd=source)
    [wheel] = (tmp_path / "dist").glob("flow_analytics_collector-*.whl")
    await run(sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv"), cwd=tmp_path)
    venv_python = tmp_path / "venv" / "bin" / "python"
    # This pip installs into the new environment (--python): quicker than bootstrapping a pip in it.
    await run(sys.executable, "-m", "pip", "--python", str(venv_python), "install", str(wheel), cwd=tmp_path)
    shutil.rmtree(source)  # nothing of the checkout is left to lean on
    command = tmp_path / "venv" / "bin" / "flow-analytics-collector"

    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"flow-analytics-collector {collector.__version__}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = clean_environment(HOST="127.0.0.1", PORT=str(free_port()))
    process = started([str(command)], run_dir, env, tmp_path / "wheel.log")
    base = (await process.line(r"test page: (http://\S+)/test.html", timeout=60)).group(1)
    async with aiohttp.ClientSession(headers={"User-Agent": BROWSER_UA}) as session:
        async with session.get(base + "/dashboard") as answer:
            assert answer.status == 200
            assert await answer.text() == (ROOT / "static" / "dashboard.html").read_text()
        async with session.get(base + "/script.js") as answer:
            assert answer.status == 200
            assert await answer.text() == collector.strip_script((ROOT / "static" / "script.js").read_text())
        async with session.get(base + "/test.html") as answer:
            assert answer.status == 200
    assert process.stop() == 0
    assert (run_dir / "data" / "collector.sqlite3").exists()
    assert "Traceback" not in process.log.read_text()


@pytest.mark.timeout(INSTALL_TIMEOUT + 180)
async def test_the_quick_start_gets_a_newcomer_to_the_first_counted_page_view(
    tmp_path: Path, started: Callable[..., Started], browser: Browser  # noqa: F811
) -> None:
    """The README's first command, run as written in a fresh copy; then what it prints is all
    there is to go on: the test page, then the dashboard, which shows the page view."""
    checkout = copy_checkout(tmp_path / "checkout")
    # As written, in two steps: the install, then the run on a port found free just before it (a
    # port found free before a minute of installing may be taken by then on a shared machine).
    install, run_it = quick_start_commands()[0].rsplit(" && ", 1)
    await run("bash", "-c", install, cwd=checkout)
    env = clean_environment(HOST="127.0.0.1", PORT=str(free_port()))  # a free port, not 3005
    process = started(["bash", "-c", run_it], checkout, env, tmp_path / "quick-start.log")
    test_page = (await process.line(r"test page: (http://\S+)", timeout=60)).group(1)
    dashboard = (await process.line(r"dashboard: (http://\S+)", timeout=10)).group(1)

    errors = PageErrors()
    context, page = await new_page(browser, errors, viewport={"width": 1280, "height": 800})
    await page.goto(test_page)
    await page.get_by_role("log").get_by_text("204 counted").wait_for()
    await page.goto(dashboard)
    await page.locator("[data-metric=pageviews]").get_by_text("1", exact=True).wait_for(timeout=30_000)
    assert await page.locator("#welcome").is_hidden()
    await page.screenshot(path=tmp_path / "quick-start-dashboard.png", full_page=True)
    await context.close()
    assert errors.messages == []
    assert process.stop() == 0
    assert (checkout / ".venv" / "bin" / "flow-analytics-collector").exists()
