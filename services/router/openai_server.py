"""uvicorn serving an ASGI app on the caller's event loop, beside the grpc.aio server.

Lifecycle:
  1. ``HttpServer(app, host, port)`` binds the socket at once (port 0: the OS picks), so
     ``address`` is known before anything serves;
  2. ``start`` starts accepting; the process's signal handling stays the gRPC server's
     (``serve_until_signal``): uvicorn's ``serve`` would install its own, so its parts are run
     here instead;
  3. ``stop`` stops accepting, asks open connections to close, and gives requests in flight
     ``grace_s`` before cancelling them (a cancelled stream cancels its request).

Each connection (``GuardedHttp``, uvicorn's httptools protocol) also bounds what uvicorn does
not: a request's line and headers to ``MAX_HEADER_BYTES`` (else 431) and the time they take to
arrive, from the connection's start or its previous response's end, to ``header_timeout_s``
(else 408 and the connection closes): one connection sending an endless header grew the router
by 270 MB, and connections that never finished their headers were held forever (session 23's
probe). The body has its own bounds (``OpenAIApi``). Such a refusal closes the connection
lingering (as nginx's ``lingering_close``): the answer is sent and the writing side shut, then
what the client is still sending is read and dropped for at most ``LINGER_S`` and
``LINGER_MAX_BYTES``, or until it closes its side; closed at once, the unread bytes would make the
kernel reset the connection, and a client still sending gets the reset, not the answer (a 20 MB
header did, session 24).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.https_port import LINGER_S, https_context, https_or_refusal
from services.rpc.security import TlsFiles

# A request line and headers past this are refused (431): bearer tokens and the usual headers
# take a few hundred bytes; nginx's default buffers allow 32 KiB, Node's 16 KiB.
MAX_HEADER_BYTES = 64 << 10
# How long a request's line and headers may take to arrive: one round trip on any network
# this API serves; as the body's (openai_api.BODY_TIMEOUT_S).
HEADER_TIMEOUT_S = 30.0
# A refused connection's lingering close (module docstring) lasts ``LINGER_S`` (https_port's)
# and reads at most this much.
LINGER_MAX_BYTES = 64 << 20


class HttpServer:
    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        grace_s: float,
        on_stop: Callable[[], None] = lambda: None,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        tls: TlsFiles | None = None,
    ) -> None:
        """``on_stop``: called once the server has stopped (the app's own cleanup). ``tls``:
        HTTPS with its certificate and key (the router's; server authentication only)."""
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        self.host = host
        self.scheme = "https" if tls is not None else "http"
        http: Callable[..., asyncio.Protocol] = guarded_http(header_timeout_s)
        if tls is not None:  # TLS, or a plain-HTTP request's 400 (services/common/https_port.py)
            # the router's certificate; no client certificate: callers send a bearer token
            context = https_context(str(tls.cert), str(tls.key))
            http = https_first(http, context, header_timeout_s)
        config = uvicorn.Config(
            app,
            log_config=None,  # the process's logging (services.common.logs) stays as it is
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=grace_s,
            http=http,  # type: ignore[arg-type]  # uvicorn calls it as it would a class
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

    def force(self) -> None:
        """A stop in flight (or the next) waits no more for open connections."""
        self._server.force_exit = True

    async def stop(self, grace_s: float | None = None) -> None:
        """Closes the listener, then waits for the open connections (``grace_s``: this long at
        most, else the server's grace)."""
        if self._main_loop is None:
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        await self._main_loop
        self._main_loop = None
        await self._server.shutdown(sockets=[self._socket])
        self._on_stop()


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a time bound on every request's line and
    headers (module docstring). ``header_timeout_s`` is set per server (``guarded_http``)."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_read = True  # (none yet: the first one's headers are due)
        self._linger: asyncio.TimerHandle | None = None  # set: refused, lingering
        self._lingered_bytes = 0
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self._linger is not None:  # the client is done sending: nothing left to reset
            self.transport.close()
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:  # refused: dropped unparsed, bounded
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES:
                self.transport.close()
            return
        # Counted whole, checked after parsing: the chunk that completes the headers may carry
        # the body's start, and only headers still incomplete past the bound are refused
        # (httptools buffers a header until its end, so its callbacks cannot count them).
        if self._header_timer is not None:
            self._header_bytes += len(data)
        super().data_received(data)
        if (
            self._header_timer is not None
            and self._header_bytes > MAX_HEADER_BYTES
            and not self.transport.is_closing()
        ):
            self._stop_header_timer()
            self._send_and_close(431, f"request headers over {MAX_HEADER_BYTES} bytes")

    def on_message_begin(self) -> None:
        if self._linger is not None:  # refused in this chunk: what follows is dropped
            return
        super().on_message_begin()
        self._request_read = False

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        if self._linger is not None:
            return
        # Headers that arrived whole in one chunk, past the bound: only parsed, they are
        # counted here (session 40's probe: 70 KB in one read was served).
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEADER_BYTES:
            self._send_and_close(431, f"request headers over {MAX_HEADER_BYTES} bytes")
            return
        super().on_headers_complete()
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            self.cycle.send = _until_close(self.cycle)  # type: ignore[method-assign]

    def on_body(self, body: bytes) -> None:
        if self._linger is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._linger is not None:
            return
        super().on_message_complete()
        self._request_read = True
        self._next_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._next_request()

    def _next_request(self) -> None:
        """Once a request was read to its end and answered, the next one's headers are due
        (besides uvicorn's idle keep-alive). Not sooner: the rest of a body answered early
        (413) still arrives, and is no header."""
        answered = self.cycle is None or self.cycle.response_complete
        if self._request_read and answered and not self.transport.is_closing():
            self._await_headers()

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            timeout = f"{self.header_timeout_s:g} s"
            self._send_and_close(408, f"request headers not complete within {timeout}")

    def _send_and_close(self, status: int, message: str) -> None:
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = message.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, self.transport.close)
        self.transport.resume_reading()  # (flow control may have paused it)


def _until_close(cycle: Any) -> Callable[[dict[str, Any]], Any]:
    """An HTTP/1.0 request's ``send``: a response of no declared length (a stream) ends where
    the connection closes, as HTTP/1.0 delimits it; uvicorn would frame it in chunks, which
    such a client does not decode (RFC 9112 §6.1; session 40's probe). The connection closes
    after any HTTP/1.0 response (uvicorn keeps none alive)."""
    send = cycle.send
    if not all(hasattr(cycle, a) for a in ("chunked_encoding", "expected_content_length")):
        return send  # a uvicorn whose cycle is made otherwise: its own framing, as before
    unbounded = 1 << 62  # a length no body reaches: uvicorn counts each body message down

    async def until_close(message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            if not names & {b"content-length", b"transfer-encoding"}:
                cycle.chunked_encoding = False
                cycle.expected_content_length = unbounded
        last = kind == "http.response.body" and not message.get("more_body", False)
        if last and cycle.expected_content_length > unbounded >> 1:  # (ours, counted down)
            cycle.expected_content_length = len(message.get("body", b""))  # what is left: all
        await send(message)

    return until_close


def guarded_http(header_timeout_s: float) -> type[GuardedHttp]:
    """``GuardedHttp`` with this server's header timeout (uvicorn builds the protocol)."""
    attrs: dict[str, Any] = {"header_timeout_s": header_timeout_s}
    return type("GuardedHttp", (GuardedHttp,), attrs)


def https_first(
    http: Callable[..., asyncio.Protocol], context: ssl.SSLContext, first_byte_timeout_s: float
) -> Callable[..., asyncio.Protocol]:
    """uvicorn's protocol factory (called with uvicorn's keywords) behind an HTTPS port that
    refuses plain HTTP with a 400 (``https_or_refusal``)."""

    def make(**kwargs: Any) -> asyncio.Protocol:
        return https_or_refusal(lambda: http(**kwargs), context, first_byte_timeout_s)()

    return make


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
