"""Run an aiohttp.web application on 127.0.0.1 (a free port) for the protocol simulators.

Shared by the Matomo and Google simulators: `async with Sim(...) as sim: sim.url`.
"""

from __future__ import annotations

import asyncio
import hashlib
from types import TracebackType
from typing import Self

from aiohttp import web

_CLIENT_MAX_SIZE = 64 * 1024 * 1024  # big bulk bodies in benchmarks; PHP has no such 1 MiB cap


class SimServer:
    """Base class: owns the runner, the bound port, in-flight accounting and the `hang` release.

    Subclasses implement `build_app()`; handlers call `await self._hang_forever()` to accept a
    request and never answer it (released with a dropped connection when the server closes).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.in_flight = 0
        self.max_in_flight = 0
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closing = asyncio.Event()

    def build_app(self) -> web.Application:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. `http://127.0.0.1:43121`."""
        if self._url is None:
            raise RuntimeError(f"{type(self).__name__} is not running; use `async with` or start()")
        return self._url

    async def start(self) -> str:
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._closing = asyncio.Event()
        app = self.build_app()
        app.middlewares.append(self._track_in_flight)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.port = port
        self._url = f"http://{host}:{port}"
        return self._url

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()  # release hung handlers before the runner waits for them
        await runner.cleanup()
        self._url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- helpers for handlers ------------------------------------------------------------

    def _new_app(self) -> web.Application:
        return web.Application(client_max_size=_CLIENT_MAX_SIZE)

    async def _delay(self) -> None:
        if self.latency > 0:
            await asyncio.sleep(self.latency)

    async def _hang_forever(self, request: web.Request) -> web.StreamResponse:
        """Accept the request and never answer; on shutdown drop the connection."""
        await self._closing.wait()
        if request.transport is not None:
            request.transport.close()
        raise web.HTTPServiceUnavailable()

    @web.middleware
    async def _track_in_flight(self, request: web.Request, handler) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1


def uniforms(seed: int, *key: object, n: int = 4) -> list[float]:
    """`n` (<= 8) deterministic floats in [0, 1) for `key`: stable across runs and processes.

    blake2b over the seed and key, so each (seed, key) gets its own independent draw in O(1)
    without keeping a random generator per site.
    """
    text = "\x1f".join([str(seed), *map(str, key)]).encode()
    digest = hashlib.blake2b(text, digest_size=8 * n).digest()
    return [int.from_bytes(digest[i : i + 8], "big") / 2**64 for i in range(0, 8 * n, 8)]
