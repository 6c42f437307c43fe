"""The data plane: KV bytes between processes over UCX, raw TCP or gRPC (contract in base.py).

    server = serve("ucx", handler)          # handler: async (header, payload) -> (header, payload)
    await server.start()                    # server.address -> "127.0.0.1:PORT"
    client = await connect("ucx", server.address, timeout_s=5)
    header, payload = await client.request(header, payload)

Transports are imported on first use, so choosing "tcp" never loads ucxx.
"""

from __future__ import annotations

import importlib

from services.common.errors import ConfigError
from services.rpc.dataplane.base import (
    DEFAULT_TIMEOUT_S,
    DataClient,
    DataPlaneError,
    DataServer,
    ErrorKind,
    Handler,
    join_address,
)

# kind -> (module, server class, client class)
_PLANES = {
    "ucx": ("services.rpc.dataplane.ucx", "UcxServer", "UcxClient"),
    "tcp": ("services.rpc.dataplane.tcp", "TcpServer", "TcpClient"),
    "grpc": ("services.rpc.dataplane.grpc_plane", "GrpcServer", "GrpcClient"),
}
KINDS = tuple(_PLANES)


def _plane(kind: str, role: int) -> type:
    if kind not in _PLANES:
        raise ConfigError(f"data plane must be one of {', '.join(KINDS)}; got {kind!r}")
    module, *classes = _PLANES[kind]
    return getattr(importlib.import_module(module), classes[role])


def serve(kind: str, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> DataServer:
    """A server of ``kind`` answering with ``handler``; ``await server.start()`` binds it."""
    return _plane(kind, 0)(handler, host, port)


async def listen(kind: str, handler: Handler, host: str, port: int) -> DataServer:
    """``serve`` and ``start``: a port that cannot be bound (in use, not this host's) is a
    ConfigError naming it, not the transport's own exception (OSError, UCXXBusyError, gRPC's
    RuntimeError)."""
    server = serve(kind, handler, host, port)
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - each transport fails its own way; all mean this
        where = join_address(host, port)
        raise ConfigError(f"the {kind} data plane cannot listen on {where}: {exc}") from exc
    return server


async def connect(kind: str, address: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DataClient:
    """A connected client of ``kind`` to ``address`` ("HOST:PORT"); DataPlaneError if not."""
    return await _plane(kind, 1).connect(address, timeout_s)


__all__ = [
    "KINDS",
    "DataClient",
    "DataPlaneError",
    "DataServer",
    "ErrorKind",
    "Handler",
    "connect",
    "listen",
    "serve",
]
