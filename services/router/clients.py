"""The router's calls to prefill and decode workers, through their generated stubs.

Implements ``core.WorkerClients``: protos in and out are translated to the core's domain types
here, and every failed call becomes ``core.WorkerCallError`` carrying the worker's status code.
Each call gets the caller's remaining time as its gRPC deadline, so the worker sees the request's
deadline. A stream abandoned early (cancel, abort, deadline) is cancelled on the wire at once,
which makes the worker stop and free what the request held there.

One channel per worker address, opened on first use and kept until ``close``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common.config import RpcConfig
from services.common.types import FinishReason
from services.router.driver import (
    DecodeResult,
    Delta,
    GenerateInput,
    KVTarget,
    PrefillResult,
    ReleaseReason,
    Reservation,
    WorkerCallError,
)
from services.router.registry import WorkerInfo
from services.rpc import aio_calls
from services.rpc.channels import open_channel
from services.rpc.convert import (
    DATA_TRANSPORT_FROM_PROTO,
    DATA_TRANSPORT_TO_PROTO,
    FINISH_FROM_PROTO,
    duration,
    sampling_to_proto,
    seconds,
)
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.rpc.status import error_code
from services.rpc.tracing import DISABLED, Tracing

RELEASE_TO_PROTO = {
    ReleaseReason.ABORTED: decode_pb2.RELEASE_REASON_ABORTED,
    ReleaseReason.DEADLINE_EXCEEDED: decode_pb2.RELEASE_REASON_DEADLINE_EXCEEDED,
    ReleaseReason.PEER_LOST: decode_pb2.RELEASE_REASON_PEER_LOST,
    ReleaseReason.FINISHED_ON_PREFILL: decode_pb2.RELEASE_REASON_FINISHED_ON_PREFILL,
}


def _delta(frame: common_pb2.TokenDelta) -> Delta:
    return Delta(tuple(frame.token_ids), frame.text)


def _call_error(worker: WorkerInfo, call: str, exc: grpc.aio.AioRpcError) -> WorkerCallError:
    return WorkerCallError(worker.worker_id, call, error_code(exc.code()), exc.details() or "")


class GrpcDecodeClient:
    def __init__(self, worker: WorkerInfo, stub: decode_pb2_grpc.DecodeServiceStub) -> None:
        self._worker = worker
        self._stub = stub

    async def reserve(
        self,
        request: GenerateInput,
        lease_s: float,
        timeout_s: float,
        prefill_locally: bool = False,
        local_prefill_max_tokens: int = 0,
    ) -> Reservation:
        message = decode_pb2.ReserveKVRequest(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_proto(request.sampling),
            lease=duration(lease_s),
            timeout=duration(timeout_s),
            prefill_locally=prefill_locally,
            local_prefill_max_tokens=local_prefill_max_tokens,
            resume_output_token_ids=request.resume_output_token_ids,
        )
        try:
            reply = await aio_calls.unary(self._stub.ReserveKV(message, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _call_error(self._worker, "ReserveKV", exc) from None
        transport = DATA_TRANSPORT_FROM_PROTO.get(reply.data_transport, "")
        return Reservation(
            reply.reservation_id,
            reply.data_address if transport else "",
            transport,
            reply.num_cached_blocks,
            reply.prefilling_locally,
            seconds(reply.lease),
        )

    async def stream_tokens(
        self, request_id: str, timeout_s: float
    ) -> AsyncIterator[Delta | DecodeResult]:
        call = self._stub.StreamTokens(
            decode_pb2.StreamTokensRequest(request_id=request_id), timeout=timeout_s
        )
        async for frame in _frames(call, self._worker, "StreamTokens"):
            if frame.HasField("delta"):
                yield _delta(frame.delta)
            else:
                yield DecodeResult(
                    FINISH_FROM_PROTO.get(frame.finished.finish_reason, FinishReason.ABORT),
                    frame.finished.num_completion_tokens,
                    frame.finished.num_cached_tokens,
                )

    async def release(self, request_id: str, reason: ReleaseReason, timeout_s: float) -> None:
        message = decode_pb2.ReleaseRequest(request_id=request_id, reason=RELEASE_TO_PROTO[reason])
        try:
            await aio_calls.unary(self._stub.Release(message, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _call_error(self._worker, "Release", exc) from None

    async def renew(
        self, request_id: str, reservation_id: str, lease_s: float, timeout_s: float
    ) -> float:
        message = decode_pb2.RenewLeaseRequest(
            request_id=request_id, reservation_id=reservation_id, lease=duration(lease_s)
        )
        try:
            reply = await aio_calls.unary(self._stub.RenewLease(message, timeout=timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _call_error(self._worker, "RenewLease", exc) from None
        return seconds(reply.lease)


class GrpcPrefillClient:
    def __init__(self, worker: WorkerInfo, stub: prefill_pb2_grpc.PrefillServiceStub) -> None:
        self._worker = worker
        self._stub = stub

    async def prefill(
        self, request: GenerateInput, target: KVTarget, timeout_s: float
    ) -> AsyncIterator[Delta | PrefillResult]:
        message = prefill_pb2.PrefillRequest(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_proto(request.sampling),
            target=prefill_pb2.KVTarget(
                worker_id=target.worker_id,
                address=target.address,
                reservation_id=target.reservation_id,
                data_address=target.data_address,
                data_transport=DATA_TRANSPORT_TO_PROTO.get(target.data_transport, 0),
                first_block=target.first_block,
            ),
        )
        call = self._stub.Prefill(message, timeout=timeout_s)
        async for frame in _frames(call, self._worker, "Prefill"):
            if frame.HasField("first_token"):
                yield _delta(frame.first_token)
            else:
                yield _prefill_result(frame.done)


def _prefill_result(done: prefill_pb2.PrefillDone) -> PrefillResult:
    return PrefillResult(
        finish_reason=FINISH_FROM_PROTO.get(done.finish_reason),
        num_prompt_tokens=done.num_prompt_tokens,
        num_cached_tokens=done.num_cached_tokens,
        prefill_s=seconds(done.prefill),
        kv_transfer_s=seconds(done.kv_transfer),
        kv_transfer_exposed_s=seconds(done.kv_transfer_exposed),
        kv_bytes=done.kv_bytes,
    )


async def _frames(call: Any, worker: WorkerInfo, name: str) -> AsyncIterator[Any]:
    """The frames of a server-streaming call; the call is cancelled if abandoned early."""
    try:
        async for frame in aio_calls.frames(call):  # (not ``call``: services/rpc/aio_calls.py)
            yield frame
    except grpc.aio.AioRpcError as exc:
        raise _call_error(worker, name, exc) from None
    finally:
        call.cancel()  # no-op once the call has ended


# Each channel its own connections: gRPC shares subchannels (a connection and its reconnect
# backoff) between a process's channels to one address, so a channel opened in place of a failed
# one (``refresh``) would inherit its backoff.
OWN_SUBCHANNELS = [("grpc.use_local_subchannel_pool", 1)]


class GrpcWorkerClients:
    """``core.WorkerClients`` over gRPC, one cached channel per worker address."""

    def __init__(self, config: RpcConfig | None = None, tracing: Tracing = DISABLED) -> None:
        self._config = config or RpcConfig()
        self._tracing = tracing
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def refresh(self, address: str) -> None:
        """A worker (re-)registered at ``address``. A cached channel whose connection failed
        (the worker died and is back on its port, the channel still in its reconnect backoff)
        is replaced, so the next call connects at once instead of failing UNAVAILABLE until
        the backoff's next try; one that is connected, connecting or idle is kept (calls on it
        go on). From the event loop."""
        channel = self._channels.get(address)
        failed = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        if channel is None or channel.get_state(try_to_connect=False) is not failed:
            return
        del self._channels[address]
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, self._config, self._tracing, OWN_SUBCHANNELS)
            self._channels[address] = channel
        return channel

    def decode(self, worker: WorkerInfo) -> GrpcDecodeClient:
        stub = decode_pb2_grpc.DecodeServiceStub(self._channel(worker.address))
        return GrpcDecodeClient(worker, stub)

    def prefill(self, worker: WorkerInfo) -> GrpcPrefillClient:
        stub = prefill_pb2_grpc.PrefillServiceStub(self._channel(worker.address))
        return GrpcPrefillClient(worker, stub)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
