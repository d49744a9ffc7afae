"""Raw HTTP/1.1 on a socket, for tests where a client library would normalise the bytes away."""

from __future__ import annotations

import asyncio


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data` to 127.0.0.1:`port` and read what comes back until the server closes the connection (within
    5 s, or TimeoutError)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    return answer
