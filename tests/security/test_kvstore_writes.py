"""Store poisoning (issue 16, item 4): the probe reserved, wrote and committed blocks on the
kvstore from an arbitrary process, changing another user's greedy output. With mutual TLS only
a prefill (or mixed) worker may write; every other role is refused before the node does
anything, and the data plane refuses a peer without the cluster's data-plane secret."""

from __future__ import annotations

import asyncio

import pytest

from services.kvstore.core import KVStoreNode
from services.kvstore.metadata import MetadataStore, NodeInfo
from services.kvstore.pool import BlockPool, PoolConfig
from services.kvstore.servicer import data_handler, kvstore_service
from services.rpc import dataplane
from services.rpc.dataplane.tcp import TcpClient, TcpServer
from services.rpc.gen.banaserve.v1 import kvstore_pb2 as pb
from services.rpc.gen.banaserve.v1 import kvstore_pb2_grpc
from services.rpc.security import Role
from services.rpc.server import start_server
from tests.security.helpers import C, channel_as, code_of, secured

LAYERS, LAYER_BYTES = 2, 1024
HASHES = [bytes([i]) * 16 for i in range(1, 3)]
SECRET = b"s" * 32


def test_only_prefill_workers_write_to_the_store(certs, redis_server, kv_prefix):
    async def main():
        node = KVStoreNode(
            BlockPool(PoolConfig(64 * LAYER_BYTES)),
            MetadataStore.from_url(redis_server.url, prefix=kv_prefix),
        )
        data = dataplane.serve("tcp", data_handler(node))
        await data.start()
        server = await start_server([kvstore_service(node)], secured(Role.KVSTORE, certs))
        await node.start(NodeInfo("kvstore-0", server.address, data.address, "tcp"))
        reserve = pb.ReserveRequest(block_hashes=HASHES, num_layers=LAYERS, layer_bytes=LAYER_BYTES)
        lookup = pb.LookupRequest(block_hashes=HASHES)
        try:
            for role in (Role.CLIENT, Role.DECODE, Role.ROUTER, Role.COORDINATOR, Role.KVSTORE):
                async with channel_as(server.address, certs, role) as channel:
                    stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
                    assert await code_of(stub.Reserve(reserve, timeout=5)) == C.PERMISSION_DENIED
                    commit = pb.CommitRequest(reservation_id=1)
                    assert await code_of(stub.Commit(commit, timeout=5)) == C.PERMISSION_DENIED
            async with channel_as(server.address, certs, Role.DECODE) as channel:
                reply = await kvstore_pb2_grpc.KVStoreServiceStub(channel).Lookup(lookup, timeout=5)
            assert list(reply.node_ids) == []  # reads stay open to the workers
            async with channel_as(server.address, certs, Role.PREFILL) as channel:
                stub = kvstore_pb2_grpc.KVStoreServiceStub(channel)
                reservation = await stub.Reserve(reserve, timeout=5)
                assert list(reservation.to_write) == [0, 1]
                await stub.Abort(
                    pb.KVStoreServiceAbortRequest(reservation_id=reservation.reservation_id),
                    timeout=5,
                )
            stats = node.stats()
            assert (stats.num_reservations, stats.num_blocks, stats.num_bytes_used) == (0, 0, 0)
        finally:
            await server.stop(0)
            await node.stop()
            await data.stop()

    asyncio.run(main())


@pytest.mark.parametrize("client_secret", [b"", b"w" * 32])
def test_data_plane_refuses_a_peer_without_the_cluster_secret(client_secret):
    async def main():
        handled = []

        async def handler(header, payload):
            handled.append(header)
            return b"ok", b""

        server = TcpServer(handler, secret=SECRET)  # a secured process's default secret
        await server.start()
        try:
            with pytest.raises(dataplane.DataPlaneError) as info:
                client = await TcpClient.connect(server.address, 5, secret=client_secret)
                await client.request(b"write", b"poison", timeout_s=5)
            assert info.value.kind is dataplane.ErrorKind.UNAVAILABLE
            assert handled == []
            client = await TcpClient.connect(server.address, 5, secret=SECRET)
            assert await client.request(b"read", b"", timeout_s=5) == (b"ok", bytearray())
            await client.close()
            assert handled == [b"read"]
        finally:
            await server.stop(0.1)

    asyncio.run(main())
