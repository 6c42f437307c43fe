"""What a kvstore node holds against what Redis names it for, with two real nodes on one real
Redis: a copy another live node announced first is dropped (at commit and when a node rejoins),
and a block only on the disk tier is announced again when the node rejoins (session 44)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.kvstore.core import DataWrite, KVStoreConfig, KVStoreNode
from services.kvstore.disk import DiskTier
from services.kvstore.metadata import MetadataStore, NodeInfo
from services.kvstore.pool import BlockPool, PoolConfig, Tier, charged_bytes

pytestmark = pytest.mark.integration

LAYERS, LAYER_BYTES = 2, 64
FAST = KVStoreConfig(sweep_interval_s=0.05, heartbeat_interval_s=0.05, node_list_ttl_s=0.05)


def h(i: int) -> bytes:
    return bytes([i]) * 16


@contextlib.asynccontextmanager
async def started(
    url: str, prefix: str, node_id: str, num_blocks: int = 8, disk: DiskTier | None = None
) -> AsyncIterator[KVStoreNode]:
    pool = BlockPool(PoolConfig(num_blocks * charged_bytes(LAYERS, LAYER_BYTES)), disk=disk)
    node = KVStoreNode(pool, MetadataStore.from_url(url, prefix=prefix), FAST)
    await node.start(NodeInfo(node_id, f"{node_id}:1", f"{node_id}:2", "tcp"))
    try:
        yield node
    finally:
        await node.stop()


async def store(node: KVStoreNode, *hashes: bytes) -> None:
    reservation = node.reserve(hashes, LAYERS, LAYER_BYTES)
    assert reservation.to_write == hashes
    payload = memoryview(bytes(LAYERS * len(hashes) * LAYER_BYTES))
    node.write(DataWrite(reservation.reservation_id, 0, hashes, LAYERS), payload)
    await node.commit(reservation.reservation_id)


async def owners(node: KVStoreNode, hashes: list[bytes]) -> list[str]:
    return [loc.node_id for loc in await node.metadata.longest_prefix(hashes)]


async def num_owned(node: KVStoreNode, n: int) -> bool:
    key = f"{node.metadata.prefix}:owned:{node.node.node_id}"
    return await node.metadata.client.scard(key) == n


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.02)


def test_a_commit_of_a_block_another_node_announced_first_drops_the_copy(redis_server, kv_prefix):
    async def main():
        async with (
            started(redis_server.url, kv_prefix, "kv-a") as a,
            started(redis_server.url, kv_prefix, "kv-b") as b,
        ):
            await store(a, h(1), h(2))
            await store(b, h(2), h(3))  # a racing writer's copy of h(2) on b
            assert await owners(a, [h(1), h(2), h(3)]) == ["kv-a", "kv-a", "kv-b"]
            assert (b.pool.locate(h(2)), b.pool.locate(h(3))) == (None, Tier.MEMORY)
            assert (a.num_duplicates_dropped, b.num_duplicates_dropped) == (0, 1)

    asyncio.run(main())


def test_a_rejoining_node_drops_the_blocks_another_node_stored_while_it_was_out(
    redis_server, kv_prefix
):
    """The probe of session 43: a node out of the index (its key lapsed, its entries swept)
    while another node stored the same blocks kept its copies, unreachable, when it came back."""

    async def main():
        async with (
            started(redis_server.url, kv_prefix, "kv-a") as a,
            started(redis_server.url, kv_prefix, "kv-b") as b,
        ):
            await store(b, h(1), h(2), h(3))
            redis = a.metadata.client
            b.session._task.cancel()  # b stops beating, as if frozen
            await redis.delete(f"{kv_prefix}:node:kv-b")
            await a.metadata.sweep_dead_nodes()
            await store(a, h(2))  # rewritten on a while b is out
            b.session._task = None
            await b.session.start()  # b beats again: it rejoins and re-announces
            await until(lambda: asyncio.sleep(0, b.pool.locate(h(2)) is None))
            assert await owners(a, [h(1), h(2), h(3)]) == ["kv-b", "kv-a", "kv-b"]
            assert b.num_duplicates_dropped == 1
            assert [b.pool.locate(h(i)) for i in (1, 3)] == [Tier.MEMORY, Tier.MEMORY]

    asyncio.run(main())


def test_a_block_on_the_disk_tier_is_announced_again_when_the_node_rejoins(
    redis_server, kv_prefix, tmp_path: Path
):
    async def main():
        disk = DiskTier(tmp_path / "disk", 1 << 20)
        async with started(redis_server.url, kv_prefix, "kv-a", num_blocks=1, disk=disk) as a:
            await store(a, h(1))
            await store(a, h(2))  # h(1) to disk: still served, still announced
            assert a.pool.locate(h(1)) is Tier.DISK
            assert await owners(a, [h(1), h(2)]) == ["kv-a", "kv-a"]
            redis = a.metadata.client
            await redis.delete(*[k async for k in redis.scan_iter(match=f"{kv_prefix}:*")])
            await until(lambda: num_owned(a, 2))  # the session resynced
            assert await owners(a, [h(1), h(2)]) == ["kv-a", "kv-a"]
            pin = a.pin([h(1)])  # found again, and served: promoted from disk
            assert pin.pin.hashes == (h(1),)
            a.unpin(pin.pin.pin_id)

    asyncio.run(main())
