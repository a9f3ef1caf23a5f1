"""The tests' fake Flowcore as a process of its own, for the emitter's drain benchmark:
`python bench/fake_flowcore_server.py PORT`. On SIGTERM it prints how many events it stored."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_flowcore import FakeFlowcore  # noqa: E402


async def serve(port: int) -> None:
    fake = FakeFlowcore()
    fake.port = port
    await fake.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(f"stored {len(fake.events)} events in {len(fake.ingestions)} requests", flush=True)
    await fake.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
