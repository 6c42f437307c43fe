"""KV targets a prefill worker may send to: the decode (or mixed) workers the router lists.

A Prefill request names where its KV goes. Unchecked, whoever can call Prefill makes the worker
connect to any address and stream a prompt's KV there (docs/security.md, "KV targets"). Two
locks close that: with mutual TLS only the router may call Prefill at all
(services/rpc/security.py), and this module checks every target against the router's own list,
so even a caller that got through cannot name a worker the router never registered.

Lifecycle: ``CheckedKVTransport.open`` calls ``RegisteredTargets.check`` before any connection.
A target missing from the cached list makes one fresh ``list_workers`` call (concurrent misses
share it: a decode worker that registered a moment ago is found); still missing, the transfer
fails with ``TransferError(ErrorCode.PERMISSION_DENIED)`` and nothing was sent. A target passes when a
decode or mixed worker of that id is registered at that address, and its data plane (if named)
is on the same host: the data plane runs in the worker's own process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import grpc

from services.common.config import RpcConfig
from services.common.errors import ErrorCode
from services.prefill.transport import KVSender, KVTarget, KVTransport, TransferError
from services.rpc import aio_calls
from services.rpc.dataplane.base import split_address
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.load_reports import router_channel

# worker id -> its DecodeService address
Targets = Mapping[str, str]
_RECEIVING_ROLES = (common_pb2.WORKER_ROLE_DECODE, common_pb2.WORKER_ROLE_MIXED)


def router_lister(
    channel: grpc.aio.Channel, timeout_s: float = 5.0
) -> Callable[[], Awaitable[Targets]]:
    """``list_workers`` over the router's ``ListWorkers``: its decode and mixed workers."""
    stub = router_pb2_grpc.RouterServiceStub(channel)

    async def list_workers() -> Targets:
        # wait_for_ready: a channel between reconnects (a name lookup or connection that
        # failed a moment ago) is waited for within the timeout, not failed at once
        reply = await aio_calls.unary(
            stub.ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=timeout_s, wait_for_ready=True
            )
        )
        return {
            w.info.worker_id: w.info.address
            for w in reply.workers
            if w.info.role in _RECEIVING_ROLES
        }

    return list_workers


def _host(address: str) -> str:
    try:
        return split_address(address)[0]
    except ValueError:
        return ""


class RegisteredTargets:
    def __init__(self, list_workers: Callable[[], Awaitable[Targets]]) -> None:
        self._list_workers = list_workers
        self._known: Targets = {}
        self._refresh: asyncio.Future[Targets] | None = None

    def allows(self, target: KVTarget) -> bool:
        address = self._known.get(target.worker_id)
        if address is None or address != target.address:
            return False
        return not target.data_address or _host(target.data_address) == _host(address)

    async def check(self, target: KVTarget) -> None:
        if self.allows(target):
            return
        try:
            self._known = await self._fetch()
        except grpc.aio.AioRpcError as exc:
            raise TransferError(
                ErrorCode.UNAVAILABLE, f"cannot check KV target with the router: {exc.details()}"
            ) from None
        if not self.allows(target):
            raise TransferError(
                ErrorCode.PERMISSION_DENIED,
                f"KV target {target.worker_id!r} at {target.address!r} "
                f"(data plane {target.data_address!r}) is not a worker the router registered",
            )

    async def _fetch(self) -> Targets:
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self._list_workers())
            self._refresh.add_done_callback(self._refreshed)
        return await asyncio.shield(self._refresh)

    def _refreshed(self, _: asyncio.Future[Targets]) -> None:
        self._refresh = None


class CheckedKVTransport(KVTransport):
    """``inner`` for targets ``targets`` allows; a transfer to any other never starts."""

    def __init__(
        self,
        inner: KVTransport,
        targets: RegisteredTargets,
        router_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._inner = inner
        self._targets = targets
        self.router_channel = router_channel  # the one ``targets`` lists over; closed with this

    async def open(
        self, target: KVTarget, request_id: str, num_layers: int, timeout_s: float | None
    ) -> KVSender:
        await self._targets.check(target)
        return await self._inner.open(target, request_id, num_layers, timeout_s)

    async def close(self) -> None:
        await self._inner.close()
        if self.router_channel is not None:
            await self.router_channel.close()


def checked_by_router(inner: KVTransport, router: str, rpc: RpcConfig) -> CheckedKVTransport:
    """``inner`` behind the router's list of workers (``router``: its "HOST:PORT").

    The channel connects now, not at the first request's check: the router's name is looked
    up while the worker starts (retried every second until it resolves), so a request does not
    wait on a name lookup (found in the compose smoke test: a lookup made at request time, as a
    new container joined the network, outlived the check's 5 s)."""
    channel = router_channel(router, rpc)
    channel.get_state(try_to_connect=True)
    return CheckedKVTransport(inner, RegisteredTargets(router_lister(channel)), channel)
