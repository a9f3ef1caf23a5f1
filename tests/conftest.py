"""Fixtures: the real app over real HTTP on a real SQLite file in a temporary directory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import BROWSER_UA, SECRET

from collector import Config, create_app, load_config, utc_now

pytest_plugins = ["browser"]  # the `browser` fixture, for the page tests


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_config(data_dir: Path) -> Callable[..., Config]:
    def make(**env: str) -> Config:
        return load_config({"DATA_DIR": str(data_dir), "SECRET_KEY": SECRET, **env})

    return make


Start = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def start_collector(aiohttp_client: Any, make_config: Callable[..., Config]) -> Start:
    async def start(clock: Callable[[], datetime] = utc_now, **env: str) -> TestClient:
        # Every request says it comes from a browser unless a test says otherwise.
        return await aiohttp_client(create_app(make_config(**env), clock=clock), headers={"User-Agent": BROWSER_UA})

    return start
