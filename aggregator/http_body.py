"""Reading an HTTP answer without trusting its size: a broken proxy or API cannot exhaust memory."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

_CHUNK = 1024 * 1024


async def read_capped(
    response: aiohttp.ClientResponse, limit: int, too_big: Callable[[], Exception]
) -> bytes:
    """The body, or the exception `too_big()` as soon as it is known to exceed `limit` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise too_big()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_big()
        chunks.append(chunk)
    return b"".join(chunks)
