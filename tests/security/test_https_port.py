"""An HTTPS port (services/common/https_port.py): TLS as with ``create_server(ssl=...)``, a
plain-HTTP request answered with a 400 that says to use https, silent connections dropped."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from services.common import https_port
from services.common.https_port import REFUSAL, https_context, https_or_refusal
from services.rpc.security import Role, TlsFiles


class Hello(asyncio.Protocol):
    """Answers every request head with one response naming what the transport says of TLS."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            tls = self.transport.get_extra_info("sslcontext") is not None
            body = b"hello over %s\n" % (b"tls" if tls else b"plain")
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            self.transport.close()


def serve(context: ssl.SSLContext, timeout_s: float):
    """A server on 127.0.0.1 on an event loop in a thread of its own: its port, the loop and
    the thread."""
    ready: dict = {}
    loop = asyncio.new_event_loop()

    async def main():
        server = await loop.create_server(
            https_or_refusal(Hello, context, timeout_s), "127.0.0.1", 0
        )
        ready["port"] = server.sockets[0].getsockname()[1]

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(main(), loop).result(10)
    return ready["port"], loop, thread


@pytest.fixture
def port(certs: Path):
    tls = TlsFiles.in_dir(certs, Role.ROUTER)
    context = https_context(str(tls.cert), str(tls.key))
    port, loop, thread = serve(context, timeout_s=1.0)
    yield port
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def client_context(certs: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    context.check_hostname = False  # the certificate names the router's hosts, not 127.0.0.1
    return context


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_tls_client_is_served_over_tls(port, certs):
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_context(certs).wrap_socket(raw) as tls,
    ):
        tls.sendall(REQUEST)
        assert read_all(tls).endswith(b"hello over tls\n")


def test_a_client_hello_that_arrives_a_byte_at_a_time_still_starts_tls(port, certs):
    """Only the first byte decides; whatever came with it, and after, reaches TLS in order."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(certs).wrap_bio(incoming, outgoing)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                for i in range(len(pending)):  # one segment a byte
                    sock.sendall(pending[i : i + 1])
                    time.sleep(0.0005)
                data = sock.recv(65536)
                assert data, "the server closed during the handshake"
                incoming.write(data)
        sock.sendall(outgoing.read())
        tls.write(REQUEST)
        sock.sendall(outgoing.read())
        answer = b""
        while True:
            try:
                chunk = tls.read(65536)
                if not chunk:
                    break
                answer += chunk
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                incoming.write(data)
            except ssl.SSLZeroReturnError:
                break
    assert answer.endswith(b"hello over tls\n")


def test_a_plain_http_request_gets_a_400_that_says_to_use_https(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(REQUEST)
        assert read_all(sock) == REFUSAL
    assert REFUSAL.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert REFUSAL.endswith(b"\r\n\r\nthis port speaks HTTPS: use https://\n")


def test_a_plain_client_still_sending_its_body_gets_the_answer_not_a_reset(port):
    """The refusal is sent and the writing side shut, then what the client still sends is
    read and dropped: closed at once, the unread bytes would make the kernel reset the
    connection and the client would lose the answer."""
    body = b"x" * (512 << 10)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.2)  # the refusal is on its way before the body
        sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == REFUSAL


def test_a_refused_client_that_never_stops_sending_is_cut_off(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        assert sock.recv(len(REFUSAL)).startswith(b"HTTP/1.1 400")
        start = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while time.monotonic() - start < 10:
                sock.sendall(b"y" * 65536)
        # the lingering close's bound: bytes (1 MiB) or time (LINGER_S), not the client
        assert time.monotonic() - start < https_port.LINGER_S + 3


@pytest.mark.parametrize("first", [b"", b"\x16"], ids=["nothing", "a-handshake-started"])
def test_a_connection_that_stalls_before_its_request_is_dropped(port, first):
    """Nothing sent (the first-byte timeout), or a handshake begun and left (TLS's own
    handshake timeout): both 1 s on this server."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(first)
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # aborted: a reset
            assert sock.recv(1) == b""
        assert 0.5 < time.monotonic() - start < 5
