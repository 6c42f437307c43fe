"""uvicorn serving an ASGI app on the caller's event loop, beside the grpc.aio server.

Lifecycle:
  1. ``HttpServer(app, host, port)`` binds the socket at once (port 0: the OS picks), so
     ``address`` is known before anything serves;
  2. ``start`` starts accepting; the process's signal handling stays the gRPC server's
     (``serve_until_signal``): uvicorn's ``serve`` would install its own, so its parts are run
     here instead;
  3. ``stop`` stops accepting, asks open connections to close, and gives requests in flight
     ``grace_s`` before cancelling them (a cancelled stream cancels its request).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp


class HttpServer:
    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        grace_s: float,
        on_stop: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_stop``: called once the server has stopped (the app's own cleanup)."""
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        self.host = host
        config = uvicorn.Config(
            app,
            log_config=None,  # the process's logging (services.common.logs) stays as it is
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=grace_s,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._main_loop: asyncio.Task[None] | None = None
        self._on_stop = on_stop

    def connection_sockets(self) -> list[socket.socket]:
        """The sockets of the connections open now (for tests)."""
        return [c.transport.get_extra_info("socket") for c in self._server.server_state.connections]

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])
        self._main_loop = asyncio.create_task(self._server.main_loop())

    async def stop(self) -> None:
        if self._main_loop is None:
            return
        self._server.should_exit = True
        await self._main_loop
        self._main_loop = None
        await self._server.shutdown(sockets=[self._socket])
        self._on_stop()


def _listen(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets whose ``proto``
    # says TCP, and accepted sockets inherit it. With proto 0 (``socket.create_server``) a
    # response's headers and body leave as two segments under Nagle's algorithm, and the body
    # waits for the client's delayed ACK: ~40 ms on back-to-back requests of one connection.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
