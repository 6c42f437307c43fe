"""A fault-injecting TCP proxy placed on one link between two services (chaos suite).

A ``FaultProxy`` listens on 127.0.0.1:PORT (known before the services start, so it can be
named in their flags) and forwards every connection to its upstream, resolved when the
connection comes (the upstream is a service that may start later or come back on its port).
Its ``Mode`` changes at any time, from any thread, and applies to every connection at once:

- ``PASS``: bytes flow both ways as they come;
- ``DELAY``: every chunk is delivered ``delay_s`` after it arrived, in order (latency, not a
  throughput cap);
- ``BLACKHOLE``: nothing is delivered and nothing is refused: open connections stall, new ones
  are accepted and wait; bytes stay queued in the sockets, and flow again once the mode is
  ``PASS`` (a partition that heals: TCP would have retransmitted them);
- ``CUT``: every open connection is reset, and new ones are reset as soon as they are accepted
  (a peer that vanished, a cable pulled); ``PASS`` lets new ones through again;
- ``STRAND``: every open connection stalls for good, as in ``BLACKHOLE`` but never healed, while
  new ones pass (a connection a NAT or a middlebox dropped without a reset, a path that died).

The proxy runs its own event loop on a daemon thread; ``stop`` closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
from collections.abc import Callable

HOST = "127.0.0.1"
CHUNK_BYTES = 64 << 10


class Mode(enum.Enum):
    PASS = "pass"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    CUT = "cut"
    STRAND = "strand"


class _Link:
    """One proxied connection: two pumps, one per direction."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task] = []
        self.flowing = asyncio.Event()  # cleared for good when the link is stranded
        self.flowing.set()

    async def wait_flowing(self) -> None:
        await self.proxy._flowing.wait()
        await self.flowing.wait()

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None and writer.transport is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(self, name: str, upstream: Callable[[], str]) -> None:
        """``upstream()``: the ``HOST:PORT`` to forward to, asked for each new connection."""
        self.name = name
        self._upstream = upstream
        self.mode = Mode.PASS
        self.delay_s = 0.0
        self.num_connections = 0  # accepted so far
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.address = ""

    def start(self) -> str:
        self._thread.start()
        self.address = self._call(self._listen())
        return self.address

    def set(self, mode: Mode, delay_s: float = 0.0) -> None:
        """Applies at once to every open connection and to every new one."""
        self._call(self._set(mode, delay_s))

    def stop(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> str:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"{HOST}:{port}"

    async def _set(self, mode: Mode, delay_s: float) -> None:
        self.mode, self.delay_s = mode, delay_s
        if mode is Mode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is Mode.CUT:
            for link in list(self._links):
                link.reset()
            self._links.clear()
        if mode is Mode.STRAND:
            for link in self._links:
                link.flowing.clear()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.num_connections += 1
        link = _Link(self, writer)
        if self.mode is Mode.CUT:
            link.reset()
            return
        self._links.add(link)
        try:
            await self._flowing.wait()  # a blackhole holds new connections too
            host, port = self._upstream().rsplit(":", 1)
            up_reader, link.upstream = await asyncio.open_connection(host, int(port))
        except (OSError, ValueError):
            link.reset()
            self._links.discard(link)
            return
        link.tasks = [
            asyncio.ensure_future(self._pump(reader, link.upstream, link)),
            asyncio.ensure_future(self._pump(up_reader, writer, link)),
        ]
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        link.reset()  # one side closed: close the other (a half-open link helps nobody)
        self._links.discard(link)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Reads chunks as they come; a writer task delivers each when it is due."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(queue, writer, link))
        try:
            while True:
                await link.wait_flowing()
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                due = time.monotonic() + (self.delay_s if self.mode is Mode.DELAY else 0.0)
                queue.put_nowait((due, data))
            await queue.join()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await deliver

    async def _deliver(
        self, queue: asyncio.Queue, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await link.wait_flowing()
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                link.reset()  # the peer is gone: so is the link
                return
            queue.task_done()
