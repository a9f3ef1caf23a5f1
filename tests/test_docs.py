"""The README and docs/ keep their promises: the Quick start in the order a person needs it, with
two commands of which CI runs the second; the curl example counts a page view; every link
resolves; docs/settings.md is config.FEATURES' settings; env.example is a valid .env and --env-file."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
from dotenv import dotenv_values
from helpers import poll
from test_process import Running, running  # noqa: F401  (a fixture)

import collector
from config import FEATURES, SETTINGS, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def sh_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def quick_start_commands() -> list[str]:
    return sh_blocks(section(README, "Quick start"))


def test_the_quick_start_has_exactly_two_commands_install_and_run_then_install_and_test() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert commands[0].endswith("&& .venv/bin/flow-analytics-collector")
    assert commands[1].endswith("&& .venv/bin/python -m pytest")


def test_the_quick_start_is_in_the_order_a_person_needs_it() -> None:
    """Install and run; the test page and the dashboard, at the addresses the collector prints;
    the snippet; then the tests, and what the browser tests need."""
    text = section(README, "Quick start")
    base = collector.base_url(load_config({}))
    steps = [quick_start_commands()[0], f"<{base}/test.html>", f"<{base}/dashboard>",
             '<script defer src="https://stats.example.com/script.js"></script>', quick_start_commands()[1]]
    places = [text.index(step) for step in steps]
    assert places == sorted(places)
    assert "Next time: `.venv/bin/flow-analytics-collector`" in text
    assert "`chromium`" in text and "skipped" in text


def test_ci_runs_the_readme_test_command() -> None:
    assert quick_start_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_a_front_page() -> None:
    """What the product is, the Quick start, the snippet, the first settings, links; the reference
    is in docs/, every page of it linked from here."""
    assert len(README.encode()) < 7000
    assert [f"docs/{path.name}" for path in DOCS if f"](docs/{path.name})" not in README] == []


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(match) for match in re.findall(r"^#+ (.*)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda path: path.name)
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists() or (anchor and destination.suffix == ".md" and anchor not in anchors(destination)):
            broken.append(target)
    assert broken == []


SETTINGS_TABLES = re.compile(r"<!-- The tables are config\.FEATURES.*?-->\n(.*)<!-- end of the tables -->", re.S)


def settings_tables() -> str:
    """A heading and a table per feature, in config.FEATURES' order, row for row."""
    lines = []
    for feature in FEATURES:
        lines += [f"### {feature.TITLE}", "", "| setting | default | meaning |", "| --- | --- | --- |"]
        for setting in feature.SETTINGS:
            default = f"`{setting.default}`" if setting.default else "unset"
            lines.append(f"| `{setting.name}` | {default} | {setting.help} |")
        lines.append("")
    return "\n".join(lines)


def test_docs_settings_is_the_settings_tables_row_for_row() -> None:
    [tables] = SETTINGS_TABLES.findall((ROOT / "docs" / "settings.md").read_text())
    assert tables == settings_tables(), "paste this between the markers in docs/settings.md:\n" + settings_tables()


def docker_env_file(text: str) -> dict[str, str]:
    """What `docker run --env-file` reads: a line is a comment (#), blank, NAME=VALUE taken
    literally (quotes and all), or NAME alone (then from the environment; none here)."""
    values = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, separator, value = line.partition("=")
        assert separator, f"a bare name passes the caller's environment on: {line!r}"
        values[name] = value
    return values


def test_env_example_is_a_valid_dotenv_and_docker_env_file_that_changes_nothing(tmp_path: Path) -> None:
    path = ROOT / "env.example"
    dotenv = {name: value for name, value in dotenv_values(path, interpolate=False).items() if value is not None}
    docker = docker_env_file(path.read_text())
    assert dotenv == docker == {}  # every setting commented out at its default: nothing to break a container
    load_config({**docker, "DATA_DIR": str(tmp_path)})
    for setting in SETTINGS:  # and each one there, ready to uncomment
        assert re.search(rf"^# {setting.name}={re.escape(setting.default)}$", path.read_text(), re.M), setting.name


def test_env_example_groups_the_settings_by_feature_as_the_docs_do() -> None:
    text = (ROOT / "env.example").read_text()
    headings = [f"# --- {feature.TITLE} -" for feature in FEATURES]
    assert all(heading in text for heading in headings)
    assert [text.index(heading) for heading in headings] == sorted(text.index(heading) for heading in headings)
    ends = [*headings[1:], "# --- Settings of the original"]
    for feature, heading, end in zip(FEATURES, headings, ends, strict=True):
        part = text.split(heading, 1)[1].split(end, 1)[0]
        assert re.findall(r"^# ([A-Z_]+)=", part, re.M) == [setting.name for setting in feature.SETTINGS]


def readme_curl_example() -> str:
    [command] = [block for block in sh_blocks(section(README, "Sending a page view by hand")) if "curl" in block]
    return command


async def test_the_readme_curl_example_counts_a_page_view(running: Running) -> None:  # noqa: F811
    process = running()
    await process.start()
    base = collector.base_url(load_config({}))
    command = readme_curl_example()
    assert base in command and " -i " in command and " -A " in command
    done = await asyncio.to_thread(
        subprocess.run, shlex.split(command.replace(base, process.url)), capture_output=True, text=True,
        timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HTTP/1.1 204")
    assert "x-collector-dropped" not in done.stdout.lower()

    async def counted() -> bool:
        async with aiohttp.ClientSession() as session:
            async with session.get(process.url + "/api/stats?domain=example.com&period=today") as answer:
                return bool((await answer.json())["totals"]["pageviews"]["value"] == 1)

    await poll(counted, what="the page view to be counted")
    assert process.stop(signal.SIGTERM) == 0
