"""Helpers for client-streaming handlers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

DRAIN_TIMEOUT_S = 10.0


async def drain(requests: AsyncIterator[Any], timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Read and drop the rest of a client stream before a handler fails.

    A handler that rejects a client stream while the client is still writing races grpc-aio:
    the client's next write can fail locally and report INTERNAL, hiding the status the
    handler sent. Reading to the end of the stream (bounded by ``timeout_s``) makes the client
    see the real status. Errors while draining are ignored: the handler is failing anyway.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            async for _ in requests:
                pass
