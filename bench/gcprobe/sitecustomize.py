"""The garbage collector's time in a collector process, for `bench/compare.py --gc`.

Python imports `sitecustomize` at start-up from its path; compare.py puts this folder on
PYTHONPATH and names a file in GC_PROBE. Every collection's CPU time (of the thread it ran on)
and generation are added up; on SIGUSR1 the totals so far are written to that file, so the bench
takes them before and after its measured window."""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from types import FrameType
from typing import Any

PROBE_FILE = os.environ.get("GC_PROBE")

if PROBE_FILE:
    totals: dict[str, Any] = {"seconds": 0.0, "collections": [0, 0, 0]}
    started = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            totals["seconds"] += time.thread_time() - started[0]
            totals["collections"][info["generation"]] += 1

    def report(_signum: int, _frame: FrameType | None) -> None:
        assert PROBE_FILE
        written = f"{PROBE_FILE}.part"
        with open(written, "w") as out:
            json.dump(totals, out)
        os.replace(written, PROBE_FILE)  # whole or not there: the bench polls for it

    gc.callbacks.append(on_collection)
    signal.signal(signal.SIGUSR1, report)
