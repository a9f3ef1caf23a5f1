"""The README's promises: two quick-start commands, the second of which CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_the_quick_start_has_exactly_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert "collector.py" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    assert quick_start_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_the_dockerfile_keeps_to_the_plan() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in ("USER collector", 'VOLUME ["/data"]', "EXPOSE 3005", "HEALTHCHECK", 'CMD ["python", "collector.py"]'):
        assert line in dockerfile
