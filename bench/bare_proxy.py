"""The floor for this stack: an aiohttp passthrough proxy with no auth, no billing, no parsing.

``python bench/bare_proxy.py PORT UPSTREAM_BASE_URL`` forwards every POST to UPSTREAM_BASE_URL + path
and streams the answer back chunk by chunk, as the gateway's same-format path does.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
from aiohttp import web

__all__ = ["make_app"]

_HOP = {"host", "content-length", "transfer-encoding", "connection"}


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    state: dict[str, aiohttp.ClientSession] = {}

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        state["http"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await state["http"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with state["http"].post(upstream + request.path, data=body, headers=headers) as up:
            resp = web.StreamResponse(
                status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")}
            )
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.cleanup_ctx.append(session)
    app.router.add_post("/{tail:.*}", forward)
    return app


async def _serve(port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream.rstrip("/")), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/bare_proxy.py PORT UPSTREAM_BASE_URL")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve(int(sys.argv[1]), sys.argv[2]))
