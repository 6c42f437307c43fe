"""An HTTPS port that answers a plain-HTTP request with a readable refusal.

A server created with ``ssl=`` hands every connection to OpenSSL at once: a client that
speaks plain HTTP to it (``curl http://...``, a Prometheus job without ``scheme: https``)
fails the handshake and gets its connection closed with no reply — "Empty reply from server",
nothing saying why. As nginx does ("The plain HTTP request was sent to HTTPS port"), the port
here looks at a connection's first bytes before TLS starts:

- a TLS record (a handshake's first byte, 0x16) starts TLS on the same transport, with what was
  read fed to it first, and the connection goes on as if the server had been created with
  ``ssl=`` (the application protocol sees a TLS transport: ``sslcontext``, ``peercert``);
- anything else gets ``400 Bad Request`` in plain HTTP, "this port speaks HTTPS", and a
  lingering close (the answer sent and the writing side shut, what the client still sends
  read and dropped for at most ``LINGER_S``), so a client still writing gets the answer, not a
  reset;
- a connection that sends nothing for ``first_byte_timeout_s`` is aborted.

Lifecycle: ``https_or_refusal(app_factory, context, timeout)`` is the protocol factory given to
``loop.create_server`` with no ``ssl=``; each connection's ``HttpsOrRefusal`` lives until its
first bytes, then either the TLS protocol (asyncio's own, which the first bytes were handed to)
or the refusal owns the transport.

asyncio has no public way to start TLS over bytes already read (``loop.start_tls`` reads the
handshake itself), so the TLS protocol is ``asyncio.sslproto.SSLProtocol``, the class
``create_server(ssl=...)`` and ``start_tls`` use; ``tests/security/test_https_port.py`` checks
both paths on the Python this runs on.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable

# A TLS record's first byte when a client starts a handshake (RFC 8446 §5.1, ContentType
# handshake); SSL 2's hello is not accepted by any context this project builds.
TLS_HANDSHAKE = 0x16

# A refused connection's lingering close (here, and the HTTP API's refusals:
# services/router/openai_server.py): long enough for a client on any network these ports serve
# to finish a write and read the answer, short enough that one that never stops sending holds
# nothing for long.
LINGER_S = 2.0
LINGER_MAX_BYTES = 1 << 20

REFUSAL_BODY = b"this port speaks HTTPS: use https://\n"
REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(REFUSAL_BODY)
) + REFUSAL_BODY


def https_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server's TLS context (TLS 1.2 or later) with its certificate and key; with
    ``client_ca``, every client must present a certificate that CA signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class HttpsOrRefusal(asyncio.Protocol):
    """One connection until its first bytes (module docstring)."""

    def __init__(
        self,
        app_factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        first_byte_timeout_s: float,
    ) -> None:
        self._app_factory = app_factory
        self._context = context
        self._timeout_s = first_byte_timeout_s
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = -1  # bytes read and dropped since the refusal; -1: not refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout_s, transport.abort)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._refused >= 0:  # lingering: read and drop
            self._refused += len(data)
            if self._refused > LINGER_MAX_BYTES:
                transport.abort()
            return
        self._cancel_timer()
        if data[0] == TLS_HANDSHAKE:
            self._start_tls(transport, data)
            return
        self._refused = len(data)
        transport.write(REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def eof_received(self) -> bool:
        return False  # close: before any byte, or the refused client has finished

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_tls(self, transport: asyncio.Transport, first: bytes) -> None:
        tls = sslproto.SSLProtocol(
            asyncio.get_running_loop(),
            self._app_factory(),
            self._context,
            None,  # no waiter: the application protocol hears of the handshake
            server_side=True,
            ssl_handshake_timeout=self._timeout_s,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        view = memoryview(first)
        while view:
            buffer = tls.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            tls.buffer_updated(n)
            view = view[n:]


def https_or_refusal(
    app_factory: Callable[[], asyncio.BaseProtocol],
    context: ssl.SSLContext,
    first_byte_timeout_s: float,
) -> Callable[[], HttpsOrRefusal]:
    """The protocol factory for ``loop.create_server`` (no ``ssl=``): HTTPS with ``context``
    for ``app_factory``'s protocol, a plain-HTTP refusal for anything else. The handshake, and
    the wait for a connection's first byte, each get ``first_byte_timeout_s``."""
    return lambda: HttpsOrRefusal(app_factory, context, first_byte_timeout_s)
