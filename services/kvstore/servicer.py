"""KVStoreService and the data-plane handler: protos in, ``KVStoreNode`` calls, protos out."""

from __future__ import annotations

from services.common.errors import InvalidRequestError
from services.kvstore import core
from services.kvstore.metadata import NodeInfo
from services.rpc.convert import DATA_TRANSPORT_TO_PROTO, duration
from services.rpc.gen.banaserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.rpc.server import Service
from services.rpc.status import decode_request


def node_to_proto(node: NodeInfo) -> kvstore_pb2.KVStoreNode:
    return kvstore_pb2.KVStoreNode(
        node_id=node.node_id,
        grpc_address=node.grpc_address,
        data_address=node.data_address,
        data_transport=DATA_TRANSPORT_TO_PROTO.get(node.data_transport, 0),
    )


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServiceServicer):
    def __init__(self, node: core.KVStoreNode) -> None:
        self._node = node

    async def Lookup(self, request, context):
        found = await self._node.lookup(list(request.block_hashes))
        return kvstore_pb2.LookupResponse(
            node_ids=found.node_ids,
            nodes=[node_to_proto(n) for n in found.nodes],
            num_seen=found.num_seen,
        )

    async def Pin(self, request, context):
        result = self._node.pin(list(request.block_hashes))
        return kvstore_pb2.PinResponse(
            pin_id=result.pin.pin_id,
            num_pinned=len(result.pin.hashes),
            num_layers=result.num_layers,
            layer_bytes=result.layer_bytes,
            ttl=duration(self._node.pool.config.pin_ttl_s),
        )

    async def Unpin(self, request, context):
        self._node.unpin(request.pin_id)
        return kvstore_pb2.UnpinResponse()

    async def Reserve(self, request, context):
        hashes = list(request.block_hashes)
        reservation = self._node.reserve(hashes, request.num_layers, request.layer_bytes)
        mine = set(reservation.to_write)
        return kvstore_pb2.ReserveResponse(
            reservation_id=reservation.reservation_id,
            to_write=[i for i, h in enumerate(hashes) if h in mine],
            ttl=duration(self._node.pool.config.reservation_ttl_s),
        )

    async def Commit(self, request, context):
        num = await self._node.commit(request.reservation_id)
        return kvstore_pb2.CommitResponse(num_committed=num)

    async def Abort(self, request, context):
        self._node.abort(request.reservation_id)
        return kvstore_pb2.KVStoreServiceAbortResponse()

    async def Stats(self, request, context):
        s = self._node.stats()
        return kvstore_pb2.KVStoreServiceStatsResponse(
            node_id=self._node.node.node_id,
            capacity_bytes=s.capacity_bytes,
            num_bytes_used=s.num_bytes_used,
            num_blocks=s.num_blocks,
            num_pins=s.num_pins,
            num_reservations=s.num_reservations,
            num_disk_blocks=s.num_disk_blocks,
            num_evicted=s.num_evicted,
            metadata_synced=self._node.session.synced,
        )


def data_handler(node: core.KVStoreNode):
    """The data-plane handler: a ``KVDataRequest`` header, payload in or out."""

    async def handle(header: bytes, payload: memoryview) -> tuple[bytes, object]:
        request = decode_request(kvstore_pb2.KVDataRequest, header)
        op = request.WhichOneof("op")
        if op == "read":
            r = request.read
            data = node.read(core.DataRead(r.pin_id, r.layer, r.num_blocks))
            return kvstore_pb2.KVDataResponse(num_bytes=len(data)).SerializeToString(), data
        if op == "write":
            w = request.write
            write = core.DataWrite(
                w.reservation_id, w.layer, tuple(w.block_hashes), max(1, w.num_layers)
            )
            num = node.write(write, payload)
            return kvstore_pb2.KVDataResponse(num_bytes=num).SerializeToString(), b""
        raise InvalidRequestError("empty KVDataRequest")

    return handle


def kvstore_service(node: core.KVStoreNode) -> Service:
    return Service.bind(
        KVStoreServicer(node),
        kvstore_pb2_grpc.add_KVStoreServiceServicer_to_server,
        kvstore_pb2.DESCRIPTOR.services_by_name["KVStoreService"],
    )
