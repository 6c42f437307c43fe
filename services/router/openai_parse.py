"""Request bodies parsed where a costly one cannot stall the router's event loop.

That loop also relays every token stream and hears every worker's load reports (a worker
whose report it misses for a second expires), so no body may hold it long. What a body costs to
parse is the number of JSON values it holds, not its size: a 4 MB prompt string parses in
~5 ms, a 4 MB chat of 200,000 one-key messages took 0.37 s (0.14 s since the 4,096-message cap:
pydantic still reads every one before it counts them), and pydantic (like ``json``) holds the
GIL throughout, so a thread would not help. Hence, per body:

1. an upper bound of its values in one pass over its bytes (``json_values_bound``: commas and
   opening brackets, those inside strings too); at most ``INLINE_MAX_VALUES``, it is parsed on
   the loop (~5 ms at most measured: 8,191 one-key messages, or 8,191 one-id prompts);
2. any other is parsed in a child process (``BodyParser``: one, started with ``spawn`` on
   first need, since the router runs gRPC threads that a ``fork`` would copy half-way), and the
   router pays only the copy of its bytes. A legitimate body lands there only when its text
   holds that many commas or brackets (a long CSV or code prompt) or its prompt that many
   token ids (a context past 16k): a few milliseconds more (and, once, the child's start).

Either way the request comes back parsed or as the ``InvalidFieldError`` naming its first bad
field. A child that dies (killed, out of memory) fails the bodies it held with UNAVAILABLE and
the next body starts a new one; a child whose router died ends within ``PARENT_POLL_S``. A
script that embeds ``OpenAIApi`` needs the ``if __name__ == "__main__":`` guard, as with any
``spawn`` (the router's entry points have it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from services.common.errors import DependencyUnavailableError
from services.router import openai_schema as schema
from services.router.openai_schema import Kind

log = logging.getLogger(__name__)

# Bodies with at most this many JSON values (bounded from above) are parsed on the event loop.
# 16,384 is ~5 ms of parsing at most on the 2-vCPU machine measured (8,191 one-key messages),
# and twice the largest token-id prompt of an 8k-context model.
INLINE_MAX_VALUES = 16_384

# How often the child looks for its router (``_exit_with``).
PARENT_POLL_S = 1.0

_REQUESTS = {Kind.COMPLETION: schema.CompletionRequest, Kind.CHAT: schema.ChatRequest}


def json_values_bound(body: bytes) -> int:
    """At least the number of JSON values ``body`` holds (each value but the first follows a
    comma or opens a container), counted at C speed without parsing it."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def parse_body(kind: Kind, body: bytes) -> Any:
    """``openai_schema.parse`` of ``kind``'s request (what the child process runs)."""
    return schema.parse(_REQUESTS[kind], body)


def _exit_with(parent: int) -> None:
    """The child's: it ends when the router does, however the router ended (a SIGKILLed one
    leaves no one to shut the pool down, and the child's own queue ends never close)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-router", daemon=True).start()


class BodyParser:
    """Parses request bodies (module docstring). ``close`` ends the child process, if any."""

    def __init__(self, inline_max_values: int = INLINE_MAX_VALUES) -> None:
        self.inline_max_values = inline_max_values
        self._pool: ProcessPoolExecutor | None = None

    async def parse(self, kind: Kind, body: bytes) -> Any:
        if json_values_bound(body) <= self.inline_max_values:
            return parse_body(kind, body)
        pool = self._pool
        if pool is None:
            context = multiprocessing.get_context("spawn")
            pool = self._pool = ProcessPoolExecutor(
                1, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
            )
        try:
            return await asyncio.wrap_future(pool.submit(parse_body, kind, body))
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("the request-body parser process died; starting a new one on next need")
            raise DependencyUnavailableError(
                "the router's request-body parser stopped while parsing this request; retry"
            ) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
