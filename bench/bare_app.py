"""The ceiling: a bare aiohttp app whose handler only reads the JSON body and answers 204."""

from __future__ import annotations

import json
import os
import sys

from aiohttp import web


async def pageview(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.Response(status=204)


def main() -> None:
    if os.environ.get("BENCH_UVLOOP") == "1":
        import uvloop

        uvloop.install()
    app = web.Application()
    app.router.add_post("/api/pageview", pageview)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
