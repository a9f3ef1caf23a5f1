"""Fixtures: the real app over real HTTP on a real SQLite file in a temporary directory."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from helpers import BROWSER_UA, SECRET, Client

from collector import create_app, utc_now
from config import Config, load_config
from http_defense import server_options

pytest_plugins = ["browser"]  # the `browser` fixture, for the page tests


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_config(data_dir: Path) -> Callable[..., Config]:
    def make(**env: str) -> Config:
        return load_config({"DATA_DIR": str(data_dir), "SECRET_KEY": SECRET, **env})

    return make


Start = Callable[..., Awaitable[Client]]


@pytest.fixture
def start_collector(aiohttp_client: Any, make_config: Callable[..., Config]) -> Start:
    async def start(clock: Callable[[], datetime] = utc_now, **env: str) -> Client:
        config = make_config(**env)
        # The server limits main() gives the real process, so the tests meet the same ones. They
        # go to start_server(): TestServer's constructor (server_kwargs) does not pass them on.
        server = TestServer(create_app(config, clock=clock))
        await server.start_server(**server_options(config.server.keepalive_timeout))
        # Every request says it comes from a browser unless a test says otherwise.
        client: Client = await aiohttp_client(server, headers={"User-Agent": BROWSER_UA})
        return client

    return start
