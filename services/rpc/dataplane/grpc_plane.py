"""The gRPC data plane: ``banaserve.v1.DataPlaneService/Call`` (protos/.../dataplane.proto).

The fallback for peers that cannot use UCX or raw TCP, and the one that needs nothing beyond the
project's gRPC stack: the server is a standard BanaServe server (``services.rpc.server``: health,
reflection, the error interceptor that turns a handler's exception into a status code), the
client a standard channel (``services.rpc.channels``), both with ``RpcConfig``'s message-size
limit (256 MiB by default), which bounds header + payload.

Copies: protobuf ``bytes`` fields are immutable, so the payload is copied into the request on
send, and once more into a ``bytearray`` on receipt, so that receivers of every plane get a
writable buffer.
"""

from __future__ import annotations

import grpc

from services.common.config import RpcConfig
from services.rpc import aio_calls
from services.rpc.channels import open_channel
from services.rpc.dataplane.base import (
    DEFAULT_GRACE_S,
    DEFAULT_TIMEOUT_S,
    DataClient,
    DataPlaneError,
    DataServer,
    ErrorKind,
    Handler,
    Payload,
    bounded,
    timed_out,
    unavailable,
)
from services.rpc.gen.banaserve.v1 import dataplane_pb2, dataplane_pb2_grpc
from services.rpc.security import data_plane_security
from services.rpc.server import RunningServer, Service, start_server
from services.rpc.status import error_code

_READY = grpc.ChannelConnectivity.READY
_FAILED = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


def _as_bytes(payload: Payload) -> bytes:
    return payload if isinstance(payload, bytes) else bytes(payload)


class _Servicer(dataplane_pb2_grpc.DataPlaneServiceServicer):
    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def Call(self, request, context):
        header, payload = await self._handler(
            request.header, memoryview(bytearray(request.payload))
        )
        return dataplane_pb2.DataPlaneServiceCallResponse(
            header=bytes(header), payload=_as_bytes(payload)
        )


class GrpcServer(DataServer):
    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        config: RpcConfig | None = None,
    ) -> None:
        self._handler = handler
        security = data_plane_security()  # the process's, as for every other server
        self._config = config or RpcConfig(host=host, port=port, security=security)
        self._server: RunningServer | None = None

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("the server has not started")
        return self._server.address

    async def start(self) -> None:
        service = Service.bind(
            _Servicer(self._handler),
            dataplane_pb2_grpc.add_DataPlaneServiceServicer_to_server,
            dataplane_pb2.DESCRIPTOR.services_by_name["DataPlaneService"],
        )
        self._server = await start_server([service], self._config)

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)


class GrpcClient(DataClient):
    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self._channel = channel
        self._stub = dataplane_pb2_grpc.DataPlaneServiceStub(channel)
        self._address = address
        self._closed = False

    @classmethod
    async def connect(
        cls, address: str, timeout_s: float = DEFAULT_TIMEOUT_S, config: RpcConfig | None = None
    ) -> GrpcClient:
        channel = open_channel(address, config or RpcConfig(security=data_plane_security()))
        try:
            await bounded(_ready(channel, address), timeout_s, f"connect {address}")
        except DataPlaneError:
            await channel.close()
            raise
        return cls(channel, address)

    async def request(
        self, header: bytes, payload: Payload = b"", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> tuple[bytes, bytearray]:
        if self._closed:
            raise unavailable(f"client to {self._address} closed")
        message = dataplane_pb2.DataPlaneServiceCallRequest(
            header=bytes(header), payload=_as_bytes(payload)
        )
        try:
            reply = await aio_calls.unary(self._stub.Call(message, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return reply.header, bytearray(reply.payload)

    def _error(self, exc: grpc.aio.AioRpcError) -> DataPlaneError:
        code, details = exc.code(), exc.details() or ""
        # CANCELLED: by our close(), or by the server shutting down (a caller that gives up gets
        # asyncio.CancelledError, and a deadline DEADLINE_EXCEEDED, never this).
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return unavailable(f"{self._address}: {details}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return timed_out(f"request to {self._address}: {details}")
        return DataPlaneError(ErrorKind.REMOTE, details, error_code(code))

    async def close(self) -> None:
        self._closed = True
        await self._channel.close(grace=None)


async def _ready(channel: grpc.aio.Channel, address: str) -> None:
    """Connects now; a refused connection fails at once instead of retrying until the deadline."""
    state = channel.get_state(try_to_connect=True)
    while state is not _READY:
        if state in _FAILED:
            raise unavailable(f"cannot connect to {address} ({state.name})")
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
