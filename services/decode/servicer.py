"""DecodeService and the KV data-plane handler: protos in, ``DecodeWorker`` (or
``DataPlaneReceiver``) calls, protos out; nothing else.

Domain errors propagate as they are: ``services.rpc.status.ErrorInterceptor`` (installed on
every server) maps them to status codes. Ids, the layout's fingerprint and block hashes, and stop
conditions are checked against services/common/limits.py before anything else.

A TransferKV holds one of the server's STREAM admission slots (services/common/admission.py:
4 x ``max_num_seqs``, shared with StreamTokens) from its first byte, before any frame names a
reservation. At most ``max_awaiting_header`` calls wait for their first frame at once
(``__main__``: the engine's ``max_num_seqs``); a newer call evicts the oldest of them
(RESOURCE_EXHAUSTED). A prefill worker opens the call before its prompt computes and sends an
open frame naming its reservation at once, so it leaves that pool within a round trip: callers
with no reservation to fill hold at most a quarter of the slots and cannot keep a real sender
out, the rest hold at most one transfer and one stream per reservation, and StreamTokens always
finds a slot however many transfers are opened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common.admission import Hold, HoldQuota
from services.common.errors import BanaServeError, InvalidRequestError, ResourceExhaustedError
from services.common.limits import check_block_hashes, check_id, check_name, check_stop
from services.decode import core, transfer
from services.decode.dataplane_receiver import DataPlaneReceiver
from services.engine.kv_cache import KVLayout
from services.rpc.admission import client_identity
from services.rpc.convert import (
    DATA_TRANSPORT_TO_PROTO,
    DTYPE_FROM_PROTO,
    FINISH_TO_PROTO,
    duration,
    sampling_from_proto,
    seconds,
)
from services.rpc.dataplane import Handler
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.rpc.server import Service
from services.rpc.status import decode_request
from services.rpc.streams import drain

log = logging.getLogger(__name__)

# A failed TransferKV reads what its sender still writes (``drain``) until the sender has been
# quiet this long: a sender mid-write sends on at once, a silent one must not hold the call.
_DRAIN_QUIET_S = 1.0

_STATES = {
    core.RequestStatus.RESERVED: decode_pb2.RESERVATION_STATE_RESERVED,
    core.RequestStatus.RECEIVING: decode_pb2.RESERVATION_STATE_RECEIVING,
}


def header_from_proto(msg: decode_pb2.KVTransferHeader) -> transfer.TransferHeader:
    lay = msg.layout
    check_id(msg.request_id, "request_id")
    check_id(msg.reservation_id, "reservation_id")
    check_name(lay.fingerprint, "layout.fingerprint")
    check_block_hashes(lay.block_hashes, "layout.block_hashes")
    if lay.dtype not in DTYPE_FROM_PROTO:
        raise InvalidRequestError(f"KV layout has no valid dtype ({lay.dtype})")
    layout = KVLayout(
        lay.fingerprint,
        0,
        lay.num_tokens,
        tuple(lay.block_hashes),
        DTYPE_FROM_PROTO[lay.dtype],
        lay.block_size,
        lay.num_kv_heads,
        lay.head_dim,
        lay.first_block,
    )
    if layout.block_size == 0:
        raise InvalidRequestError("KV layout has block_size 0")
    if lay.first_block * layout.block_size >= max(1, lay.num_tokens):
        raise InvalidRequestError(
            f"KV layout starts at block {lay.first_block}, past its {lay.num_tokens} tokens"
        )
    return transfer.TransferHeader(msg.request_id, msg.reservation_id, layout, lay.num_layers)


async def frames_from_proto(
    requests: AsyncIterator[decode_pb2.TransferKVRequest],
) -> AsyncIterator[transfer.TransferFrame]:
    """The frames of ``requests``."""
    async for msg in requests:
        kind = msg.WhichOneof("frame")
        if kind == "header":
            yield header_from_proto(msg.header)
        elif kind == "layer":
            c = msg.layer
            yield transfer.LayerChunk(c.layer, c.first_block, c.num_blocks, c.data)
        elif kind == "end":
            yield transfer.TransferEnd(msg.end.first_token_id)
        elif kind == "open":
            check_id(msg.open.request_id, "request_id")
            check_id(msg.open.reservation_id, "reservation_id")
            yield transfer.TransferOpen(msg.open.request_id, msg.open.reservation_id)
        else:
            raise InvalidRequestError("empty TransferKV frame")


def event_to_proto(event: core.StreamEvent) -> decode_pb2.StreamTokensResponse:
    if isinstance(event, core.TokenDelta):
        delta = common_pb2.TokenDelta(token_ids=event.token_ids, text=event.text)
        return decode_pb2.StreamTokensResponse(delta=delta)
    finished = decode_pb2.DecodeFinished(
        finish_reason=FINISH_TO_PROTO[event.reason],
        num_completion_tokens=event.num_completion_tokens,
        num_cached_tokens=event.num_cached_tokens,
    )
    return decode_pb2.StreamTokensResponse(finished=finished)


def stats_to_proto(stats: core.WorkerStats) -> decode_pb2.DecodeServiceStatsResponse:
    kv = common_pb2.KVPoolStats(
        num_blocks_total=stats.num_blocks_total,
        num_blocks_used=stats.num_blocks_used,
        num_blocks_free=stats.num_blocks_free,
        num_blocks_cached=stats.num_blocks_cached,
    )
    reservations = [
        decode_pb2.Reservation(
            request_id=r.request_id,
            reservation_id=r.reservation_id,
            state=_STATES[r.status],
            num_blocks=r.num_blocks,
            lease_left=duration(r.lease_s),
        )
        for r in stats.reservations
    ]
    return decode_pb2.DecodeServiceStatsResponse(
        kv=kv,
        num_running_seqs=stats.num_running_seqs,
        num_waiting_seqs=stats.num_waiting_seqs,
        reservations=reservations,
        num_preemptions=stats.num_preemptions,
    )


def _release_reason(number: int) -> str:
    # The reason is for logs only, and proto3 enums are open: a number this build does not
    # know is logged as it is, never raised on (``ReleaseReason.Name`` would raise).
    value = decode_pb2.ReleaseReason.DESCRIPTOR.values_by_number.get(number)
    return value.name if value is not None else f"reason {number}"


def _past_deadline(context: grpc.aio.ServicerContext) -> bool:
    # grpc-aio answers 0 for a deadline already past, and cancels the handler only at its next
    # await: work done meanwhile would be for a reply no one can receive.
    left = context.time_remaining()
    return left is not None and left <= 0


async def _until_quiet(requests: AsyncIterator[Any], quiet_s: float) -> AsyncIterator[Any]:
    """``requests`` until the sender sends nothing for ``quiet_s`` (then TimeoutError)."""
    iterator = aiter(requests)
    while True:
        async with asyncio.timeout(quiet_s):
            message = await anext(iterator, None)
        if message is None:
            return
        yield message


class AwaitingFirstFrame:
    """The TransferKV calls that have sent no frame yet, oldest first: at most ``limit`` (None:
    no limit). A newer call evicts the oldest, which fails RESOURCE_EXHAUSTED: calls that never
    name a reservation cannot keep a real sender out, since it sends its open frame as the call
    starts (module docstring)."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"max_awaiting_header must be at least 1, got {limit}")
        self.limit = limit
        self._calls: dict[asyncio.Event, None] = {}  # insertion order: oldest first

    def enter(self) -> asyncio.Event:
        """A new call's place; the event is set if the call is evicted."""
        if self.limit is not None and len(self._calls) >= self.limit:
            oldest = next(iter(self._calls))
            del self._calls[oldest]
            oldest.set()
        evicted = asyncio.Event()
        self._calls[evicted] = None
        return evicted

    def leave(self, place: asyncio.Event) -> None:
        self._calls.pop(place, None)

    async def first(self, requests: AsyncIterator[Any], place: asyncio.Event) -> AsyncIterator[Any]:
        """``requests``, leaving the pool at the first message; evicted before it:
        ``ResourceExhaustedError``."""
        iterator = aiter(requests)
        try:
            message = await transfer.next_unless(iterator, place, None)
        finally:
            self.leave(place)
        if message.cancelled():
            raise ResourceExhaustedError(
                f"more than {self.limit} KV transfers waited for their first frame here; this "
                "one, the oldest, was dropped (a sender sends its open frame as the call starts)"
            )
        if (first := message.result()) is None:
            return
        yield first
        async for later in iterator:
            yield later


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(
        self,
        worker: core.DecodeWorker,
        data_address: str = "",
        data_transport: str = "",
        quota: HoldQuota | None = None,
        max_awaiting_header: int | None = None,
    ) -> None:
        self._worker = worker
        # Per-client cap on reservations held (services/rpc/admission.py): one caller cannot
        # take every sequence slot. Each hold is dropped once its request holds nothing here.
        self._quota = quota
        self._watchers: set[asyncio.Task[None]] = set()
        # TransferKV calls that have not sent a frame yet, and their cap (None: no cap;
        # ``__main__`` sets the engine's ``max_num_seqs``, see the module docstring).
        self._awaiting = AwaitingFirstFrame(max_awaiting_header)
        self._data_address = data_address  # the KV data plane, if this worker serves one
        self._data_transport = DATA_TRANSPORT_TO_PROTO.get(data_transport, 0)

    async def ReserveKV(self, request, context):
        check_id(request.request_id, "request_id")
        check_stop(request.sampling.stop, request.sampling.stop_token_ids)
        if _past_deadline(context):
            raise TimeoutError("the call's deadline passed before anything was reserved")
        hold = self._quota.take(client_identity(context)) if self._quota else None
        try:
            reservation = await self._worker.reserve(
                request.request_id,
                list(request.prompt_token_ids),
                sampling_from_proto(request.sampling),
                seconds(request.lease) if request.HasField("lease") else None,
                seconds(request.timeout) if request.HasField("timeout") else None,
                request.prefill_locally,
                request.local_prefill_max_tokens,
                tuple(request.resume_output_token_ids),
            )
            if _past_deadline(context):  # the reply cannot arrive: hold nothing
                await self._worker.release(request.request_id)
                raise TimeoutError("the call's deadline passed while reserving; released")
        except BaseException:
            if hold is not None:
                hold.drop()
            raise
        if hold is not None:
            self._drop_when_ended(hold, request.request_id)
        return decode_pb2.ReserveKVResponse(
            reservation_id=reservation.reservation_id,
            num_blocks=reservation.num_blocks,
            lease=duration(reservation.lease_s),
            data_address=self._data_address,
            data_transport=self._data_transport,
            num_cached_blocks=reservation.num_cached_blocks,
            prefilling_locally=reservation.prefilling_locally,
        )

    def _drop_when_ended(self, hold: Hold, request_id: str) -> None:
        watcher = asyncio.ensure_future(self._worker.ended(request_id).wait())
        self._watchers.add(watcher)
        watcher.add_done_callback(lambda task: (self._watchers.discard(task), hold.drop()))

    async def TransferKV(self, request_iterator, context):
        place = self._awaiting.enter()
        try:
            requests = self._awaiting.first(request_iterator, place)
            result = await self._worker.receive(frames_from_proto(requests))
        except BanaServeError:
            if not place.is_set():  # an evicted call sent nothing: it ends at once
                # So the sender sees this status, not INTERNAL; a sender gone quiet is not
                # writing.
                await drain(_until_quiet(request_iterator, _DRAIN_QUIET_S))
            raise
        finally:
            self._awaiting.leave(place)
        return decode_pb2.TransferKVResponse(
            num_layers=result.num_layers, num_bytes=result.num_bytes
        )

    async def StreamTokens(self, request, context):
        check_id(request.request_id, "request_id")
        events = self._worker.stream(request.request_id)
        try:
            async for event in events:
                yield event_to_proto(event)
        finally:
            await events.aclose()

    async def Release(self, request, context):
        check_id(request.request_id, "request_id")
        found, num_blocks = await self._worker.release(request.request_id)
        log.info(
            "release %s (%s): found=%s blocks=%d",
            request.request_id,
            _release_reason(request.reason),
            found,
            num_blocks,
        )
        return decode_pb2.ReleaseResponse(found=found, num_blocks_freed=num_blocks)

    async def RenewLease(self, request, context):
        check_id(request.request_id, "request_id")
        check_id(request.reservation_id, "reservation_id")
        lease = seconds(request.lease) if request.HasField("lease") else None
        left = self._worker.renew(request.request_id, request.reservation_id, lease)
        return decode_pb2.RenewLeaseResponse(lease=duration(left))

    async def Stats(self, request, context):
        return stats_to_proto(await self._worker.stats())


def kv_data_handler(receiver: DataPlaneReceiver) -> Handler:
    """The data-plane form of TransferKV: a ``KVTransferFrame`` header per message, a layer's
    bytes as its payload (decode.proto)."""

    async def handle(header: bytes, payload: memoryview) -> tuple[bytes, bytes]:
        msg = decode_request(decode_pb2.KVTransferFrame, header)
        kind, reservation_id = msg.WhichOneof("frame"), msg.reservation_id
        check_id(reservation_id, "reservation_id")
        if kind == "header":
            if msg.header.reservation_id != reservation_id:
                raise InvalidRequestError("the frame and its header name different reservations")
            await receiver.open(header_from_proto(msg.header))
        elif kind == "layer":
            c = msg.layer
            chunk = transfer.LayerChunk(c.layer, c.first_block, c.num_blocks, payload)
            await receiver.layer(reservation_id, chunk)
        elif kind == "end":
            end = transfer.TransferEnd(msg.end.first_token_id)
            result = await receiver.end(reservation_id, end)
            response = decode_pb2.TransferKVResponse(
                num_layers=result.num_layers, num_bytes=result.num_bytes
            )
            return response.SerializeToString(), b""
        elif kind == "abort":
            receiver.abort(reservation_id)
        else:
            raise InvalidRequestError("empty KVTransferFrame")
        return b"", b""

    return handle


def decode_service(
    worker: core.DecodeWorker,
    data_address: str = "",
    data_transport: str = "",
    quota: HoldQuota | None = None,
    max_awaiting_header: int | None = None,
) -> Service:
    return Service.bind(
        DecodeServicer(worker, data_address, data_transport, quota, max_awaiting_header),
        decode_pb2_grpc.add_DecodeServiceServicer_to_server,
        decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
    )
