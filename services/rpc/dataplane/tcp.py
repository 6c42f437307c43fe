"""The raw-TCP data plane: the baseline the UCX plane is measured against.

Wire: every message is a ``Frame`` (base.py) followed by ``header_len`` header bytes and
``payload_len`` payload bytes, on one TCP connection with ``TCP_NODELAY``. Both directions
carry request ids, so one connection multiplexes concurrent requests: a single reader task per
side dispatches frames, and writers take a per-connection lock for a whole message.

Why the event loop's socket calls (``sock_recv_into``, ``sock_sendall``) and not asyncio
streams: on Python 3.11 a stream copies every payload twice or more (``StreamReader`` buffers
then slices for ``readexactly``; ``transport.write`` copies whatever the kernel did not take at
once), while ``sock_recv_into`` lands the bytes straight in the preallocated ``bytearray`` that
the receiver gets, and ``sock_sendall`` sends from the caller's buffer.

A message is always written whole: the write runs in a task of the connection, and a caller that
times out stops waiting for it but never cuts a frame in half (which would desynchronise the
stream for every other request).

What a peer can make a side hold is bounded: a frame announcing more than ``max_payload_bytes``
ends the connection before anything is allocated, and once a frame's head has arrived its header
and payload must follow within ``read_timeout_s`` (an idle pooled connection has no deadline
between messages). With a data-plane secret set (peer_auth.py) a connection starts with the
mutual challenge, within ``peer_auth.HANDSHAKE_S``, and nothing else is read from a peer that
fails it. The server binds only ``host`` (loopback by default).

Keepalive: a connection can die without closing (a NAT or middlebox that dropped it, a path
that went away): no reset, no EOF, the bytes just stop, and every request on it would wait for
its whole timeout, and the next ones too, since the connection is pooled. So while a client has
requests out it watches the connection: after ``Keepalive.interval_s`` with nothing received
it sends a ``PING``, which the server's reader answers at once with a ``PONG`` (whatever its
handlers are doing), and if nothing at all arrives within ``Keepalive.timeout_s`` of that the
connection is broken: every request on it fails UNAVAILABLE ("stalled") and the client closes,
so its owner connects afresh. A frame arriving slowly (a large payload) counts as arriving. An
idle connection sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.rpc.dataplane import peer_auth
from services.rpc.dataplane.base import (
    DEFAULT_GRACE_S,
    DEFAULT_TIMEOUT_S,
    DataClient,
    DataPlaneError,
    DataServer,
    Frame,
    FrameType,
    Handler,
    Payload,
    PendingRequests,
    Tasks,
    answer,
    bounded,
    error_of,
    join_address,
    receive_buffer,
    shielded,
    split_address,
    unavailable,
)

log = logging.getLogger(__name__)

# Up to this size header and payload go out in one send (one copy of a small payload is cheaper
# than a second system call).
COALESCE_BYTES = 64 << 10
# What ends a connection's reading (ValueError: a frame that makes no sense); blocking_tcp.py too.
BROKEN = (OSError, EOFError, ValueError)
_CLOSE_WAIT_S = 1.0  # how long a stopping server waits for clients to close after its FIN
# The largest payload one message may announce (a layer of one request's KV is far below it).
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
# From a frame's head to its last payload byte.
DEFAULT_READ_TIMEOUT_S = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Keepalive:
    """A client's watch over its connection while requests are out (module docstring)."""

    # Silence, with requests out, after which a PING goes out. A healthy peer answers a chunk
    # in milliseconds; 2 s of nothing is already unusual.
    interval_s: float = 2.0
    # No frame at all within this after the PING: the connection is broken. The PONG skips the
    # handlers, so only a peer whose loop is blocked this long (or a dead path) misses it.
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not (self.interval_s > 0 and self.timeout_s > 0):
            raise ValueError(f"keepalive times must be positive, got {self}")


# The kernel's TCP keepalive on every data-plane socket, both sides: a peer host that vanished
# (powered off, partitioned) is found within idle + interval x count = 60 s even on a connection
# nobody uses, so a server does not keep such connections, and their tasks, for good (the
# client's own ``Keepalive`` finds a dead path sooner while it has requests out).
TCP_KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}


def _tune(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in TCP_KEEPALIVE.items():
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return sock


async def _recv_exactly(
    sock: socket.socket, view: memoryview, heard: Callable[[], None] | None = None
) -> None:
    """``heard``: called whenever bytes came (a client's keepalive)."""
    loop = asyncio.get_running_loop()
    while view.nbytes:
        n = await loop.sock_recv_into(sock, view)
        if n == 0:
            raise EOFError("connection closed by peer")
        if heard is not None:
            heard()
        view = view[n:]


@dataclass(frozen=True)
class ReadLimits:
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 1 or self.read_timeout_s <= 0:
            raise ValueError(f"read limits must be positive, got {self}")


async def _read_message(
    sock: socket.socket, limits: ReadLimits, heard: Callable[[], None] | None = None
) -> tuple[Frame, bytes, memoryview]:
    head = bytearray(Frame.SIZE)
    await _recv_exactly(sock, memoryview(head), heard)  # no deadline: a pooled one may idle
    frame = Frame.unpack(head)
    if frame.payload_len > limits.max_payload_bytes:
        raise ValueError(
            f"frame announces {frame.payload_len} payload bytes, over {limits.max_payload_bytes}"
        )
    async with asyncio.timeout(limits.read_timeout_s):  # TimeoutError: an OSError, BROKEN
        header = bytearray(frame.header_len)
        await _recv_exactly(sock, memoryview(header), heard)
        payload = receive_buffer(frame.payload_len)
        await _recv_exactly(sock, payload, heard)
    return frame, bytes(header), payload


async def _authenticate(sock: socket.socket, key: bytes, server: bool) -> None:
    loop = asyncio.get_running_loop()

    async def read(n: int) -> bytes:
        data = bytearray(n)
        await _recv_exactly(sock, memoryview(data))
        return bytes(data)

    async def write(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    prove = peer_auth.prove_server if server else peer_auth.prove_client
    async with asyncio.timeout(peer_auth.HANDSHAKE_S):
        await prove(key, read, write)


async def connect_socket(address: str, timeout_s: float, secret: bytes | None) -> socket.socket:
    """A connected socket to ``address`` that passed the peer challenge (``secret`` None: the
    process's; b"": none); UNAVAILABLE (or TIMEOUT) if not."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = _tune(socket.socket(family, socket.SOCK_STREAM))
    key = peer_auth.secret() if secret is None else secret
    try:
        loop = asyncio.get_running_loop()
        await bounded(loop.sock_connect(sock, (host, port)), timeout_s, f"connect {address}")
        if key:
            await _authenticate(sock, key, server=False)
    except (OSError, EOFError, peer_auth.PeerAuthError) as exc:
        sock.close()
        raise unavailable(f"cannot connect to {address}: {exc!r}") from exc
    except DataPlaneError:
        sock.close()
        raise
    return sock


class _Connection:
    """One socket, either side: whole-message writes and the tasks that use the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tasks = Tasks()
        self._write_lock = asyncio.Lock()

    async def _write(self, frame: Frame, header: bytes, payload: memoryview) -> None:
        loop = asyncio.get_running_loop()
        async with self._write_lock:
            if payload.nbytes <= COALESCE_BYTES:
                await loop.sock_sendall(self.sock, b"".join((frame.pack(), header, payload)))
            else:
                await loop.sock_sendall(self.sock, frame.pack() + header)
                await loop.sock_sendall(self.sock, payload)

    async def send(self, frame: Frame, header: bytes, payload: memoryview) -> None:
        """Writes one message; the caller may stop waiting, the write still completes."""
        await shielded(self.tasks.spawn(self._write(frame, header, payload)))

    async def close(self) -> None:
        # Tasks first: closing a socket the selector still watches breaks the loop.
        await self.tasks.cancel()
        self.sock.close()


class TcpServer(DataServer):
    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        limits: ReadLimits = ReadLimits(),
        secret: bytes | None = None,
    ) -> None:
        """``secret`` None: the process's (peer_auth.use_secret); b"": no authentication."""
        self._handler = handler
        self._host, self._port = host, port
        self._limits = limits
        self._secret = peer_auth.secret() if secret is None else secret
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._tasks = Tasks()  # the accept loop and one task per connection
        self._connections: set[_Connection] = set()

    @property
    def address(self) -> str:
        return join_address(self._host, self._port)

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.create_server((self._host, self._port), family=family, backlog=128)
        listener.setblocking(False)
        self._listener, self._port = listener, listener.getsockname()[1]
        self._accept_task = self._tasks.spawn(self._accept(listener))
        log.info("tcp data plane on %s", self.address)

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        if self._listener is None or self._accept_task is None:
            return
        self._stopping = True  # requests from now on are refused as UNAVAILABLE
        self._accept_task.cancel()
        await asyncio.wait({self._accept_task}, timeout=1.0)
        self._listener.close()
        self._listener = None
        handlers = Tasks()
        for conn in self._connections:
            handlers.spawn(conn.tasks.wait(grace_s))
        await handlers.wait(grace_s + 0.1)
        # FIN after the replies already written (a close with unread input could send RST and
        # drop them); clients close on EOF, which ends their connection tasks here.
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        await self._tasks.wait(_CLOSE_WAIT_S)
        await self._tasks.cancel()  # connection tasks close their sockets as they unwind

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            self._tasks.spawn(self._serve(_Connection(_tune(sock))))

    async def _serve(self, conn: _Connection) -> None:
        self._connections.add(conn)
        try:
            if self._secret:
                await _authenticate(conn.sock, self._secret, server=True)
            while True:
                frame, header, payload = await _read_message(conn.sock, self._limits)
                if frame.type is FrameType.PING:
                    pong = Frame(frame.request_id, FrameType.PONG, 0, 0)
                    conn.tasks.spawn(conn.send(pong, b"", memoryview(b"")))
                    continue
                if frame.type is not FrameType.REQUEST:
                    raise ValueError(f"expected a request, got {frame.type.name}")
                conn.tasks.spawn(self._answer(conn, frame.request_id, header, payload))
        except peer_auth.PeerAuthError as exc:
            log.warning("tcp data plane: refused a peer: %s", exc)
        except BROKEN as exc:
            log.debug("tcp data plane connection ended: %r", exc)
        finally:
            self._connections.discard(conn)
            await conn.close()

    async def _answer(
        self, conn: _Connection, rid: int, header: bytes, payload: memoryview
    ) -> None:
        reply = await answer(self._handler, rid, header, payload, self._stopping)
        try:
            await conn.send(*reply)
        except OSError as exc:
            log.debug("tcp data plane: reply to %d lost: %r", rid, exc)


class TcpClient(DataClient):
    def __init__(
        self,
        sock: socket.socket,
        address: str,
        limits: ReadLimits = ReadLimits(),
        keepalive: Keepalive = Keepalive(),
    ) -> None:
        self._conn = _Connection(sock)
        self._address = address
        self._limits = limits
        self._keepalive = keepalive
        self._pending = PendingRequests()
        self._heard_at = time.monotonic()  # bytes last received (or silence last not counted)
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._watcher = loop.create_task(self._watch())

    @classmethod
    async def connect(
        cls,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        secret: bytes | None = None,
        keepalive: Keepalive = Keepalive(),
    ) -> TcpClient:
        """``secret`` None: the process's (peer_auth.use_secret); b"": no authentication."""
        return cls(await connect_socket(address, timeout_s, secret), address, keepalive=keepalive)

    async def request(
        self, header: bytes, payload: Payload = b"", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> tuple[bytes, bytearray]:
        return await self._pending.call(
            self._conn.send, header, payload, timeout_s, (OSError,), self._address
        )

    async def close(self) -> None:
        self._watcher.cancel()
        await asyncio.wait({self._watcher}, timeout=1.0)
        await self._shut(unavailable(f"client to {self._address} closed"))

    async def _shut(self, error: DataPlaneError) -> None:
        """Every request out fails with ``error``, later ones too; the socket closes."""
        self._pending.fail_all(error)
        self._reader.cancel()
        await asyncio.wait({self._reader}, timeout=1.0)
        await self._conn.close()

    async def _watch(self) -> None:
        """The keepalive (module docstring): a PING after ``interval_s`` of silence with
        requests out; the connection broken when nothing comes within ``timeout_s`` of it."""
        k = self._keepalive
        pinged_at: float | None = None
        while True:
            await asyncio.sleep(min(k.interval_s, k.timeout_s) / 4)
            now = time.monotonic()
            if pinged_at is not None and self._heard_at > pinged_at:
                pinged_at = None  # answered (or something else came)
            if not self._pending.num_open:  # silence counts only while requests are out
                self._heard_at = now
                continue
            if pinged_at is None and now - self._heard_at >= k.interval_s:
                pinged_at = now
                # Not awaited: behind a write that a dead path stalls, it would stall the watch.
                ping = Frame(0, FrameType.PING, 0, 0)
                self._conn.tasks.spawn(self._conn.send(ping, b"", memoryview(b"")))
            elif pinged_at is not None and now - pinged_at >= k.timeout_s:
                await self._shut(
                    unavailable(stalled_reason(self._address, now - self._heard_at, k))
                )
                return

    async def _read(self) -> None:
        try:
            while True:
                frame, header, payload = await _read_message(
                    self._conn.sock, self._limits, self._heard
                )
                if frame.type is FrameType.PONG:
                    continue
                if frame.type is FrameType.ERROR:
                    self._pending.resolve(frame.request_id, error=error_of(frame, header))
                else:
                    self._pending.resolve(frame.request_id, (header, payload))
        except BROKEN as exc:
            self._pending.fail_all(unavailable(f"connection to {self._address} lost: {exc!r}"))
            self._watcher.cancel()
            await self._conn.close()  # a stopping server waits for this

    def _heard(self) -> None:
        self._heard_at = time.monotonic()


def stalled_reason(address: str, silent_s: float, keepalive: Keepalive) -> str:
    """Why a keepalive (a ``TcpClient``'s or a ``BlockingTcpChannel``'s, blocking_tcp.py) broke a
    connection."""
    return (
        f"connection to {address} stalled: nothing received for {silent_s:.1f}s with requests "
        f"out, and no answer to a keepalive ping within {keepalive.timeout_s:g}s"
    )
