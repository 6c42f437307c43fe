"""PrefillService over ``PrefillWorker``: proto <-> domain, nothing else.

Domain errors become status codes in services/rpc/status.py; a failed KV transfer carries the
status its peer (or the channel) gave, and is answered with that code. Ids, addresses (their size
and their HOST:PORT form) and stop conditions are checked against services/common/limits.py
before anything else (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.limits import check_address, check_id, check_stop
from services.prefill.core import FirstToken, PrefillRequest, PrefillResult, PrefillWorker
from services.prefill.transport import KVTarget, TransferError
from services.rpc.convert import (
    DATA_TRANSPORT_FROM_PROTO,
    duration,
    finish_to_proto,
    sampling_from_proto,
)
from services.rpc.deadlines import time_left
from services.rpc.gen.banaserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from services.rpc.server import Service
from services.rpc.status import clip_message, grpc_code

# Fields whose domain default is not the proto3 zero value: read only when present.


def check_sizes(msg: prefill_pb2.PrefillRequest) -> None:
    t = msg.target
    check_id(msg.request_id, "request_id")
    check_id(t.worker_id, "target.worker_id")
    check_id(t.reservation_id, "target.reservation_id")
    check_address(t.address, "target.address")
    check_address(t.data_address, "target.data_address")
    check_stop(msg.sampling.stop, msg.sampling.stop_token_ids)


def request_from_proto(msg: prefill_pb2.PrefillRequest) -> PrefillRequest:
    check_sizes(msg)
    t = msg.target
    transport = DATA_TRANSPORT_FROM_PROTO.get(t.data_transport, "")
    target = KVTarget(
        t.worker_id,
        t.address,
        t.reservation_id,
        t.data_address if transport else "",
        transport,
        t.first_block,
    )
    return PrefillRequest(
        msg.request_id, list(msg.prompt_token_ids), sampling_from_proto(msg.sampling), target
    )


def response_to_proto(event: FirstToken | PrefillResult) -> prefill_pb2.PrefillResponse:
    if isinstance(event, FirstToken):
        delta = common_pb2.TokenDelta(token_ids=event.token_ids, text=event.text)
        return prefill_pb2.PrefillResponse(first_token=delta)
    transfer = event.transfer
    done = prefill_pb2.PrefillDone(
        finish_reason=finish_to_proto(event.finish_reason),
        num_prompt_tokens=event.num_prompt_tokens,
        num_cached_tokens=event.num_cached_tokens,
        queued=duration(event.queued_s),
        prefill=duration(event.prefill_s),
        kv_transfer=duration(transfer.transfer_s if transfer else 0.0),
        kv_transfer_exposed=duration(transfer.exposed_s if transfer else 0.0),
        kv_bytes=transfer.num_bytes if transfer else 0,
    )
    return prefill_pb2.PrefillResponse(done=done)


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self._worker = worker

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillResponse]:
        try:
            events = self._worker.prefill(request_from_proto(request), time_left(context))
            async for event in events:
                yield response_to_proto(event)
        except TransferError as exc:
            await context.abort(grpc_code(exc.code), clip_message(exc.message))

    async def Stats(
        self, request: prefill_pb2.PrefillServiceStatsRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillServiceStatsResponse:
        s = self._worker.stats()
        kv = common_pb2.KVPoolStats(
            num_blocks_total=s.num_blocks_total,
            num_blocks_used=s.num_blocks_used,
            num_blocks_free=s.num_blocks_free,
            num_blocks_cached=s.num_blocks_cached,
        )
        return prefill_pb2.PrefillServiceStatsResponse(
            kv=kv,
            num_queued_prefill_tokens=s.num_queued_prefill_tokens,
            num_running_seqs=s.num_running_seqs,
            num_open_transfers=s.num_open_transfers,
        )


def prefill_service(worker: PrefillWorker) -> Service:
    return Service.bind(
        PrefillServicer(worker),
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server,
        prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"],
    )
