"""``BlockingTcpChannel``: one thread's request-then-reply connection to a ``TcpServer``
(tcp.py), with no event loop between — the attention migration's per-layer exchange
(services/migration/attention_port.py). Same frames, limits and keepalive as tcp.py's
``TcpClient``."""

from __future__ import annotations

import contextlib
import socket
import time

from services.rpc.dataplane.base import (
    DEFAULT_TIMEOUT_S,
    DataPlaneError,
    ErrorKind,
    Frame,
    FrameType,
    Payload,
    as_bytes_view,
    error_of,
    unavailable,
)
from services.rpc.dataplane.tcp import (
    BROKEN,
    COALESCE_BYTES,
    Keepalive,
    ReadLimits,
    connect_socket,
    stalled_reason,
)

# tcp.py's defaults (both frozen)
DEFAULT_LIMITS = ReadLimits()
DEFAULT_KEEPALIVE = Keepalive()


class _Stalled(Exception):
    """A blocking channel's keepalive found its connection dead."""


class BlockingTcpChannel:
    """One connection to a ``TcpServer`` used by a single thread, request then reply, with no
    event loop between: the donor's stepping thread sends a layer's attention queries and reads
    the helper's answer itself (services/migration/attention_port.py), which saves the hops
    through the agent's loop that a ``TcpClient`` call costs each way.

    Opened on an event loop (``connect``: the connect and the peer challenge are the
    ``TcpClient``'s), then only ``send`` / ``receive`` from one thread. Several requests may be
    out at once (a step's micro-batches each send a layer's queries before the first reads its
    answer); each is received once, in any order: a reply to another request still out is kept
    for its own ``receive``, one to a request sent before the one read and still out is
    dropped (its caller gave up on it). Same frames and limits as tcp.py's. Any
    failure breaks the channel for good (a timed-out read may have stopped inside a frame):
    every later call raises UNAVAILABLE.

    The same keepalive as a ``TcpClient``'s (tcp.py's docstring), kept by the reading thread: a
    ``receive`` that has heard nothing for ``Keepalive.interval_s`` since the channel last
    received (or, with nothing out, sent) writes a ``PING``, and nothing at all within
    ``Keepalive.timeout_s`` of it breaks the channel ("stalled") — a dead path does not hold
    the stepping thread for the whole ``timeout_s`` of the reply.
    """

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        limits: ReadLimits = DEFAULT_LIMITS,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
    ):
        sock.setblocking(True)
        self._sock = sock
        self._address = address
        self._limits = limits
        self._keepalive = keepalive
        self._next_id = 1
        self._broken = ""
        self._out: set[int] = set()  # sent, not yet received
        self._kept: dict[int, tuple[Frame, bytes, bytearray]] = {}  # replies read ahead
        self._heard_at = time.monotonic()  # bytes last received (or the first request sent)
        self._pinged_at: float | None = None  # a PING out, not answered by any byte since

    @classmethod
    async def connect(
        cls,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        secret: bytes | None = None,
        keepalive: Keepalive = DEFAULT_KEEPALIVE,
    ) -> BlockingTcpChannel:
        """``secret`` None: the process's (peer_auth.use_secret); b"": no authentication."""
        return cls(await connect_socket(address, timeout_s, secret), address, keepalive=keepalive)

    def send(self, header: bytes, payload: Payload = b"") -> int:
        """Writes one request; its id, for ``receive``."""
        self._check()
        rid, self._next_id = self._next_id, self._next_id + 1
        view = as_bytes_view(payload)
        frame = Frame(rid, FrameType.REQUEST, len(header), view.nbytes)
        if not self._out:  # silence counts only while requests are out
            self._heard_at, self._pinged_at = time.monotonic(), None
        try:
            # A send that a dead path holds this long breaks the channel ("lost").
            self._sock.settimeout(self._keepalive.interval_s + self._keepalive.timeout_s)
            if view.nbytes <= COALESCE_BYTES:
                self._sock.sendall(b"".join((frame.pack(), header, view)))
            else:
                self._sock.sendall(frame.pack() + header)
                self._sock.sendall(view)
        except OSError as exc:
            raise self._break(f"connection to {self._address} lost: {exc!r}") from exc
        self._out.add(rid)
        return rid

    def receive(self, rid: int, timeout_s: float) -> tuple[bytes, bytearray]:
        """The reply to request ``rid`` (class docstring for the others read meanwhile);
        DataPlaneError: the server's error for it, or UNAVAILABLE (TIMEOUT past ``timeout_s``)."""
        self._check()
        if rid not in self._out:
            raise ValueError(f"request {rid} is not out on this channel")
        for older in [k for k in self._kept if k < rid]:  # read ahead, then given up on
            del self._kept[older]
            self._out.discard(older)
        deadline = time.monotonic() + timeout_s
        try:
            frame, header, payload = self._kept.pop(rid, None) or self._read_reply(rid, deadline)
        except TimeoutError as exc:
            self._break(f"no reply from {self._address} within {timeout_s}s")
            raise DataPlaneError(ErrorKind.TIMEOUT, f"no reply within {timeout_s}s") from exc
        except _Stalled as exc:
            raise self._break(str(exc)) from exc
        except BROKEN as exc:
            raise self._break(f"connection to {self._address} lost: {exc!r}") from exc
        finally:
            self._out.discard(rid)
        if frame.type is FrameType.ERROR:
            raise error_of(frame, header)
        if frame.type is not FrameType.RESPONSE:
            raise self._break(f"expected a response from {self._address}, got {frame.type.name}")
        return header, payload

    def _read_reply(self, rid: int, deadline: float) -> tuple[Frame, bytes, bytearray]:
        while True:
            reply = self._read(deadline)
            if reply[0].type is FrameType.PONG:
                continue
            got = reply[0].request_id
            if got == rid:
                return reply
            if got not in self._out:
                raise ValueError(f"reply {got} to no request out")
            if got > rid:
                self._kept[got] = reply
            else:  # sent before ``rid`` and never read: its caller gave up on it
                self._out.discard(got)

    def close(self) -> None:
        """From any thread: a thread blocked in ``receive`` wakes with UNAVAILABLE."""
        self._broken = self._broken or f"channel to {self._address} closed"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _read(self, deadline: float) -> tuple[Frame, bytes, bytearray]:
        head = self._read_exactly(Frame.SIZE, deadline)
        frame = Frame.unpack(head)
        if frame.payload_len > self._limits.max_payload_bytes:
            raise ValueError(f"frame announces {frame.payload_len} payload bytes")
        header = bytes(self._read_exactly(frame.header_len, deadline))
        return frame, header, self._read_exactly(frame.payload_len, deadline)

    def _read_exactly(self, n: int, deadline: float) -> bytearray:
        data = bytearray(n)
        view = memoryview(data)
        while view.nbytes:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError
            wake = self._next_watch()
            if wake <= now:
                self._watch(now)
                continue
            self._sock.settimeout(min(deadline, wake) - now)
            try:
                got = self._sock.recv_into(view)
            except TimeoutError:
                continue
            if got == 0:
                raise EOFError("connection closed by peer")
            self._heard_at, self._pinged_at = time.monotonic(), None
            view = view[got:]
        return data

    def _next_watch(self) -> float:
        """When the keepalive next has something to do: ping, or judge the ping."""
        if self._pinged_at is None:
            return self._heard_at + self._keepalive.interval_s
        return self._pinged_at + self._keepalive.timeout_s

    def _watch(self, now: float) -> None:
        """The PING after ``interval_s`` of silence, or the verdict on an unanswered one."""
        k = self._keepalive
        if self._pinged_at is None:
            self._pinged_at = now
            # A frame head: a live connection's send buffer takes it at once.
            self._sock.settimeout(k.timeout_s)
            try:
                self._sock.sendall(Frame(0, FrameType.PING, 0, 0).pack())
            except TimeoutError as exc:
                raise _Stalled(f"connection to {self._address} stalled: a ping not sent") from exc
            return
        raise _Stalled(stalled_reason(self._address, now - self._heard_at, k))

    def _check(self) -> None:
        if self._broken:
            raise unavailable(self._broken)

    def _break(self, reason: str) -> DataPlaneError:
        self._broken = reason
        with contextlib.suppress(OSError):
            self._sock.close()
        return unavailable(reason)
