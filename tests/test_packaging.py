"""Every module the package installs is also in the Docker image: a module added to one list
and not the other breaks `pip install .` or the container, far from where it was added."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_dockerfile_copies_every_module_of_the_package() -> None:
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    copied = " ".join(re.findall(r"^COPY (.*)$", (ROOT / "Dockerfile").read_text(), re.M))
    assert [m for m in modules if f"{m}.py" not in copied.split()] == []
    assert {path.stem for path in ROOT.glob("*.py")} == set(modules)
