"""Schemathesis against GET /openapi.json of the collector running as a real process: requests
generated from the document (valid and invalid ones) to every operation, and no answer may
contradict the document: no 5xx, only documented statuses, content types and headers, and
bodies that match their schemas.

The checks are the conformance ones. Schemathesis's acceptance checks (every schema-valid
request must get a 2xx) are left out on purpose: the document's schemas say what the body's
shape is, not every rule (a domain must be a real hostname), and a refusal with a documented
400 is a correct answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from collector import __version__
from openapi import document

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 60  # per operation, positive and negative mixed
SECRET = "schemathesis-transformer-secret"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"not up in {timeout} s: {log.read_text()}"
        time.sleep(0.05)  # polling a subprocess with a deadline; there is no event to wait on


@pytest.fixture(scope="module")
def collector_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python collector.py` with the transformer enabled; stats answer this loopback client."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp / "data"), "HOST": "127.0.0.1", "PORT": str(port),
           "FLOWCORE_TRANSFORMER_SECRET": SECRET, "BODY_TIMEOUT_MS": "2000", "PYTHONUNBUFFERED": "1"}
    log = tmp / "collector.log"
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "collector.py")], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=tmp)  # not the checkout: no .env of a developer's
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
        yield url
        assert process.poll() is None, "the collector died under schemathesis: " + log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def api_schema(collector_url: str) -> Any:
    return schemathesis.openapi.from_url(collector_url + "/openapi.json")


# Schemathesis's Python API rather than its pytest plugin: the plugin reaches into pytest's
# internals and breaks with new pytest releases; a strategy per operation under hypothesis does not.
OPERATIONS = sorted((method.upper(), path) for path, item in document(__version__)["paths"].items() for method in item)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_answer_contradicts_the_document(api_schema: Any, method: str, path: str) -> None:
    operation = api_schema[path][method]
    cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=cases)
    def property(case: Any) -> None:
        case.call_and_validate(headers={"X-Secret": SECRET}, checks=CHECKS, timeout=10)

    property()
