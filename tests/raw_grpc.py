"""One gRPC call over a raw HTTP/2 connection (the ``h2`` library): what no grpc client here can
send, such as a ``grpc-timeout`` past what grpc's Python client can hold (99,999,999 hours, the
most the header can say; a Go or C++ client sends it for "no deadline" deadlines).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class RawReply:
    status: int  # grpc-status (0: OK)
    message: str  # grpc-message
    messages: list[bytes] = field(default_factory=list)  # each length-prefixed message's bytes


def call(
    address: str, path: str, request: bytes, headers: list[tuple[str, str]], timeout_s: float
) -> RawReply:
    """Sends ``request`` (one serialized message) to ``path`` (``/pkg.Service/Method``) with
    ``headers`` beside gRPC's own; returns the reply's status and messages."""
    host, port = address.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        base = [(":method", "POST"), (":scheme", "http"), (":path", path)]
        base += [(":authority", address), ("content-type", "application/grpc"), ("te", "trailers")]
        conn.send_headers(stream, base + headers)
        conn.send_data(stream, b"\0" + struct.pack(">I", len(request)) + request, end_stream=True)
        sock.sendall(conn.data_to_send())
        body, status = bytearray(), {}
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection before the reply ended")
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status.update((_text(k), _text(v)) for k, v in event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    return RawReply(int(status["grpc-status"]), status.get("grpc-message", ""),
                                    _messages(bytes(body)))  # fmt: skip
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"the stream was reset ({event.error_code})")
            sock.sendall(conn.data_to_send())


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _messages(body: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(body):
        (size,) = struct.unpack(">I", body[at + 1 : at + 5])
        out.append(body[at + 5 : at + 5 + size])
        at += 5 + size
    return out
