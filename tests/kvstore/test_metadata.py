"""The kvstore metadata against a real redis-server: lookups, node lifecycle, restarts, placement."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio

from services.common.errors import ConfigError
from services.common.hashing import block_hashes
from services.kvstore.metadata import (
    BlockEntry,
    Location,
    MetadataSession,
    MetadataStore,
    MetadataUnavailableError,
    NodeInfo,
    NodeNotRegisteredError,
    NodeStatus,
    place,
)
from services.kvstore.redis_server import RedisServer

pytestmark = pytest.mark.integration

HASHES = block_hashes(list(range(64)), 8, "test-model")  # 8 chained hashes


def node(node_id: str = "kv-a", incarnation: str = "inc-1") -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        grpc_address=f"{node_id}:50051",
        data_address=f"{node_id}:13337",
        data_transport="ucx",
        incarnation=incarnation,
    )


def entries(*indices: int) -> list[BlockEntry]:
    return [BlockEntry(HASHES[i], size_bytes=4096, num_layers=2) for i in indices]


def loc(i: int, info: NodeInfo) -> Location:
    return Location(HASHES[i], info.node_id, info.data_address, "ucx", 4096, 2)


@contextlib.asynccontextmanager
async def open_store(server: RedisServer, prefix: str, **kwargs) -> AsyncIterator[MetadataStore]:
    store = MetadataStore.from_url(server.url, prefix=prefix, **kwargs)
    try:
        yield store
    finally:
        await store.close()


def keys_under(server: RedisServer, prefix: str) -> list[str]:
    with redis.Redis.from_url(server.url, decode_responses=True) as client:
        return sorted(client.scan_iter(match=f"{prefix}:*"))


async def eventually(lookup, expected, timeout_s: float = 5.0):
    """Polls ``lookup()`` until it returns ``expected`` (Redis may still be down at first)."""
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        with contextlib.suppress(MetadataUnavailableError):
            got = await lookup()
            if got == expected:
                return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"still {got!r}, expected {expected!r}")


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop, restart or freeze it."""
    with RedisServer(embedded=False) as server:
        yield server


def test_longest_prefix_returns_hits_up_to_the_first_miss(redis_server, kv_prefix):
    a, b = node("kv-a"), node("kv-b")

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            await store.register_node(a)
            await store.register_node(b)
            await store.announce(a, entries(0, 1))
            await store.announce(b, entries(2, 4))  # 3 is cached nowhere
            full = await store.longest_prefix(HASHES)
            assert full == [loc(0, a), loc(1, a), loc(2, b)]
            assert await store.longest_prefix(HASHES[3:]) == []
            assert await store.longest_prefix([]) == []
            assert await store.live_nodes() == [a, b]
            await store.deregister_node(a)
            assert await store.longest_prefix(HASHES) == []
            assert await store.longest_prefix(HASHES[2:3]) == [loc(2, b)]
            await store.deregister_node(b)

    asyncio.run(main())
    assert keys_under(redis_server, kv_prefix) == []


def test_longest_prefix_is_one_round_trip(redis_server, kv_prefix):
    a = node()

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            await store.register_node(a)
            await store.announce(a, entries(*range(8)))
            await store.longest_prefix(HASHES)  # loads the script: later calls are EVALSHA only
            # The marker's client connects (HELLO...) before MONITOR starts watching.
            marker = redis.asyncio.Redis.from_url(redis_server.url)
            await marker.ping()
            watcher = redis.asyncio.Redis.from_url(redis_server.url)
            async with watcher.monitor() as monitor:
                found = await store.longest_prefix(HASHES)
                await marker.echo("done")
                commands = []
                while (command := await monitor.next_command())["command"] != "ECHO done":
                    commands.append(command)
            await marker.aclose()
            await watcher.aclose()
            await store.deregister_node(a)
        return found, [c["command"].split()[0] for c in commands if c["client_type"] != "lua"]

    found, client_commands = asyncio.run(main())
    assert len(found) == 8
    assert client_commands == ["EVALSHA"]


def test_entries_of_a_node_whose_key_expired_are_not_returned(redis_server, kv_prefix):
    a, b = node("kv-a"), node("kv-b")

    async def main():
        async with (
            open_store(redis_server, kv_prefix, node_ttl_s=0.2) as short,
            open_store(redis_server, kv_prefix) as store,
        ):
            await short.register_node(a)
            await short.announce(a, entries(0, 1))
            await store.register_node(b)
            await store.announce(b, entries(2))
            assert await store.longest_prefix(HASHES) == [loc(0, a), loc(1, a), loc(2, b)]
            await asyncio.sleep(0.3)
            assert await store.longest_prefix(HASHES) == []
            assert await store.longest_prefix(HASHES[2:]) == [loc(2, b)]
            assert await store.live_nodes() == [b]
            assert await short.heartbeat(a) is NodeStatus.MISSING
            with pytest.raises(NodeNotRegisteredError):
                await short.announce(a, entries(3))
            assert await store.sweep_dead_nodes() == 1
            assert keys_under(redis_server, kv_prefix) == [
                f"{kv_prefix}:block:{HASHES[2].hex()}",
                f"{kv_prefix}:node:kv-b",
                f"{kv_prefix}:nodes",
                f"{kv_prefix}:owned:kv-b",
            ]
            await store.deregister_node(b)

    asyncio.run(main())
    assert keys_under(redis_server, kv_prefix) == []


def test_a_restarted_node_withdraws_what_its_old_incarnation_announced(redis_server, kv_prefix):
    old, new = node(incarnation="inc-1"), node(incarnation="inc-2")

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            await store.register_node(old)
            await store.announce(old, entries(0, 1, 2))
            await store.register_node(new)
            assert await store.longest_prefix(HASHES) == []
            assert await store.heartbeat(old) is NodeStatus.SUPERSEDED
            assert await store.heartbeat(new) is NodeStatus.ALIVE
            with pytest.raises(NodeNotRegisteredError):
                await store.announce(old, entries(0))
            await store.announce(new, entries(0))
            assert await store.withdraw(old, HASHES) == 0
            assert await store.register_node(old, takeover=False) is False
            await store.deregister_node(old)  # leaves the newer incarnation alone
            assert await store.longest_prefix(HASHES) == [loc(0, new)]
            assert await store.live_nodes() == [new]
            await store.deregister_node(new)

    asyncio.run(main())
    assert keys_under(redis_server, kv_prefix) == []


def test_withdraw_removes_only_the_callers_entries(redis_server, kv_prefix):
    a, b = node("kv-a"), node("kv-b")

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            await store.register_node(a)
            await store.register_node(b)
            await store.announce(a, entries(0, 1))
            await store.announce(b, entries(2))
            assert await store.withdraw(a, HASHES[:3]) == 2  # not b's block 2
            assert await store.longest_prefix(HASHES[:3]) == []
            assert await store.longest_prefix(HASHES[2:3]) == [loc(2, b)]
            raw = store.client
            assert await raw.smembers(f"{kv_prefix}:owned:kv-a") == set()
            assert await raw.smembers(f"{kv_prefix}:owned:kv-b") == {HASHES[2].hex().encode()}
            await store.deregister_node(a)
            await store.deregister_node(b)

    asyncio.run(main())
    assert keys_under(redis_server, kv_prefix) == []


def test_the_first_live_announce_keeps_a_block_and_later_ones_are_refused(redis_server, kv_prefix):
    """A block has one entry: another live node's announce of it is refused (and returned, so
    that node drops its copy); a node whose key lapsed loses its entries to the next announce.
    Before session 44 the last announce won and the loser kept a copy no lookup could name."""
    a, b, c = node("kv-a"), node("kv-b"), node("kv-c")

    async def main():
        async with (
            open_store(redis_server, kv_prefix) as store,
            open_store(redis_server, kv_prefix, node_ttl_s=0.2) as short,
        ):
            await store.register_node(a)
            await store.register_node(b)
            await short.register_node(c)
            assert await store.announce(a, entries(0, 1)) == []
            assert await store.announce(b, entries(1, 2)) == [HASHES[1]]
            assert await store.announce(a, entries(0, 1)) == []  # its own: kept, not refused
            assert await store.longest_prefix(HASHES[:3]) == [loc(0, a), loc(1, a), loc(2, b)]
            raw = store.client
            assert await raw.smembers(f"{kv_prefix}:owned:kv-b") == {HASHES[2].hex().encode()}
            # c's key lapses (no heartbeat): its entry goes to the next node that announces it.
            assert await short.announce(c, entries(3)) == []
            await asyncio.sleep(0.4)
            assert await store.announce(b, entries(3)) == []
            assert await store.longest_prefix(HASHES[3:4]) == [loc(3, b)]
            assert await raw.smembers(f"{kv_prefix}:owned:kv-c") == set()
            # Refusals across more than one script call come back whole.
            many = block_hashes(list(range(2100)), 1, "other-model")
            await store.announce(a, [BlockEntry(h, 64, 1) for h in many])
            refused = await store.announce(b, [BlockEntry(h, 64, 1) for h in many[::-1]])
            assert refused == many[::-1]
            for n in (a, b):
                await store.deregister_node(n)
            await store.client.srem(f"{kv_prefix}:nodes", "kv-c")

    asyncio.run(main())
    assert keys_under(redis_server, kv_prefix) == []


def test_touch_sets_last_use_of_existing_entries_only(redis_server, kv_prefix):
    a = node()
    now = [100.0]

    async def main():
        async with open_store(redis_server, kv_prefix, clock=lambda: now[0]) as store:
            await store.register_node(a)
            await store.announce(a, entries(0))
            now[0] = 250.5
            assert await store.touch(HASHES[:2]) == 1
            block = f"{kv_prefix}:block:{HASHES[0].hex()}"
            assert await store.client.hgetall(block) == {
                b"node": b"kv-a",
                b"size": b"4096",
                b"layers": b"2",
                b"last_use": b"250.5",
            }
            assert not await store.client.exists(f"{kv_prefix}:block:{HASHES[1].hex()}")
            await store.deregister_node(a)

    asyncio.run(main())
    assert keys_under(redis_server, kv_prefix) == []


def test_batches_larger_than_one_script_call_are_pipelined(redis_server, kv_prefix):
    a = node()
    many = block_hashes(list(range(2500)), 1, "test-model")

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            await store.register_node(a)
            await store.announce(a, [BlockEntry(h, 64, 1) for h in many])
            found = await store.longest_prefix(many)
            touched = await store.touch(many)
            withdrawn = await store.withdraw(a, many)
            await store.deregister_node(a)
            with pytest.raises(NodeNotRegisteredError):
                await store.announce(a, [BlockEntry(h, 64, 1) for h in many])
            return len(found), touched, withdrawn

    assert asyncio.run(main()) == (2500, 2500, 2500)
    assert keys_under(redis_server, kv_prefix) == []


def test_session_announces_holdings_and_reannounces_when_its_keys_are_lost(redis_server, kv_prefix):
    a = node()

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            session = MetadataSession(store, a, lambda: entries(0, 1), interval_s=0.05)
            async with session:
                assert session.synced
                assert await store.longest_prefix(HASHES) == [loc(0, a), loc(1, a)]
                await store.client.delete(*keys_under(redis_server, kv_prefix))  # data lost
                await eventually(lambda: store.longest_prefix(HASHES), [loc(0, a), loc(1, a)])
                assert session.num_syncs == 2
            assert keys_under(redis_server, kv_prefix) == []

    asyncio.run(main())


def test_a_rejoining_session_hands_back_what_another_node_announced_meanwhile(
    redis_server, kv_prefix
):
    a, b = node("kv-a"), node("kv-b")
    refused: list = []

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            session = MetadataSession(
                store, a, lambda: entries(0, 1, 2), on_refused=refused.extend, interval_s=0.05
            )
            async with session:
                assert refused == []
                await store.client.delete(f"{kv_prefix}:node:kv-a")  # a's key lapses...
                await store.sweep_dead_nodes()  # ...and its entries are swept
                await store.register_node(b)
                await store.announce(b, entries(1))  # b stores block 1 meanwhile
                await eventually(lambda: asyncio.sleep(0, len(refused)), 1)
                assert refused == [HASHES[1]]
                assert session.num_syncs == 2
                assert await store.longest_prefix(HASHES[:3]) == [loc(0, a), loc(1, b), loc(2, a)]
                await store.deregister_node(b)
        assert keys_under(redis_server, kv_prefix) == []

    asyncio.run(main())


def test_session_survives_a_redis_restart_and_lookups_fail_fast_meanwhile(private_redis, kv_prefix):
    a = node()
    holdings = entries(0, 1, 2)

    async def main():
        async with open_store(private_redis, kv_prefix) as store:
            async with MetadataSession(store, a, lambda: holdings, interval_s=0.05) as session:
                assert await store.longest_prefix(HASHES) == [loc(0, a), loc(1, a), loc(2, a)]
                private_redis.stop()
                started = time.monotonic()
                with pytest.raises(MetadataUnavailableError):
                    await store.longest_prefix(HASHES)
                assert time.monotonic() - started < 1.0
                await asyncio.sleep(0.3)  # beats fail; the loop keeps going
                assert session.num_failures >= 2
                assert not session.synced
                holdings.pop()  # evicted while Redis was down
                private_redis.start()  # same port, empty: persistence is off
                await eventually(lambda: store.longest_prefix(HASHES), [loc(0, a), loc(1, a)])
                assert (session.num_syncs, session.num_failures) == (2, 0)
            assert keys_under(private_redis, kv_prefix) == []

    asyncio.run(main())


def test_session_resyncs_when_redis_restarts_between_beats(private_redis, kv_prefix):
    a = node()

    async def main():
        async with (
            open_store(private_redis, kv_prefix) as store,
            MetadataSession(store, a, lambda: entries(0), interval_s=0.05) as session,
        ):
            await asyncio.to_thread(private_redis.restart)
            await eventually(lambda: store.longest_prefix(HASHES), [loc(0, a)])
            assert session.num_syncs == 2

    asyncio.run(main())
    assert keys_under(private_redis, kv_prefix) == []


def test_lookup_on_a_frozen_redis_times_out(private_redis, kv_prefix):
    async def main():
        async with open_store(private_redis, kv_prefix, socket_timeout_s=0.2) as store:
            assert await store.longest_prefix(HASHES) == []
            os.kill(private_redis.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(MetadataUnavailableError):
                    await store.longest_prefix(HASHES)
                return time.monotonic() - started
            finally:
                os.kill(private_redis.pid, signal.SIGCONT)

    assert asyncio.run(main()) < 1.5  # two socket timeouts (one retry), no more


def test_a_superseded_session_stops_and_leaves_the_new_incarnation_alone(redis_server, kv_prefix):
    old, new = node(incarnation="inc-1"), node(incarnation="inc-2")

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            session = MetadataSession(store, old, lambda: entries(0), interval_s=0.05)
            await session.start()
            await store.register_node(new)
            await store.announce(new, entries(1))
            await asyncio.wait_for(session._task, timeout=2)
            assert session.superseded
            await session.stop()
            assert await store.live_nodes() == [new]
            assert await store.longest_prefix(HASHES[1:]) == [loc(1, new)]
            await store.deregister_node(new)

    asyncio.run(main())
    assert keys_under(redis_server, kv_prefix) == []


def test_place_golden_vectors():
    nodes = ["kv-0", "kv-1", "kv-2", "kv-3"]
    four = [place(bytes([i]) * 16, nodes) for i in range(8)]
    three = [place(bytes([i]) * 16, nodes[:3]) for i in range(8)]
    assert four == ["kv-2", "kv-0", "kv-2", "kv-3", "kv-2", "kv-1", "kv-0", "kv-3"]
    assert three == ["kv-2", "kv-0", "kv-2", "kv-1", "kv-2", "kv-1", "kv-0", "kv-1"]
    assert place(bytes(range(16)), reversed(nodes)) == place(bytes(range(16)), nodes) == "kv-2"


def test_place_spreads_evenly_and_moves_only_a_removed_nodes_blocks():
    nodes = ["kv-0", "kv-1", "kv-2", "kv-3"]
    hashes = block_hashes(list(range(4000)), 1, "spread")
    before = {h: place(h, nodes) for h in hashes}
    counts = [list(before.values()).count(n) for n in nodes]
    assert all(850 <= c <= 1150 for c in counts), counts
    after = {h: place(h, nodes[:3]) for h in hashes}
    assert all(after[h] == before[h] for h in hashes if before[h] != "kv-3")
    with pytest.raises(ValueError):
        place(hashes[0], [])
    with pytest.raises(ValueError):
        place(b"short", nodes)


def test_a_lookup_says_how_much_of_the_chain_was_held_or_asked_for_before(redis_server, kv_prefix):
    a = node()
    now = [1000.0]
    other = block_hashes(list(range(32)) + [99] * 32, 8, "test-model")  # shares 4 blocks

    async def main():
        async with open_store(redis_server, kv_prefix, clock=lambda: now[0],
                              seen_window_s=60.0) as store:  # fmt: skip
            await store.register_node(a)
            assert await store.lookup(HASHES) == ([], 0)  # first sight: marked, none seen
            assert await store.lookup(HASHES[:5]) == ([], 5)
            assert await store.lookup(other) == ([], 4)  # the shared first 4, then a miss
            # Held blocks count, asked for or not; the run of seen ones goes on past them.
            fresh = block_hashes(list(range(1000, 1064)), 8, "test-model")
            await store.announce(a, [BlockEntry(fresh[0], 4096, 2)])
            assert await store.lookup(fresh) == ([Location(fresh[0], "kv-a", "kv-a:13337",
                                                           "ucx", 4096, 2)], 1)  # fmt: skip
            assert (await store.lookup(fresh))[1] == 8
            # A generation later the marks are still read (the previous bitmap); two later,
            # forgotten. Each bitmap expires after two windows and is at most bits / 8 bytes.
            now[0] += 60.0
            assert (await store.lookup(HASHES))[1] == 8
            now[0] += 120.0
            assert (await store.lookup(other))[1] == 0
            assert await store.lookup([]) == ([], 0)
            await store.deregister_node(a)

    asyncio.run(main())
    client = redis.Redis.from_url(redis_server.url)
    bitmaps = client.keys(f"{kv_prefix}:seen:*")
    assert bitmaps and all(0 < client.pttl(k) <= 120_000 for k in bitmaps)
    assert all(client.strlen(k) <= (1 << 24) // 8 for k in bitmaps)
    client.close()


def test_a_long_lookup_goes_a_chunk_at_a_time_and_its_runs_carry_across_chunks(
    redis_server, kv_prefix
):
    """Probe, session 43: one Lookup of 262,144 hashes was one script that held Redis ~3 s, and
    every other node's and worker's call timed out meanwhile. A chain now goes ``_BATCH``
    hashes a call, one call after another (others' calls go between); the hits and the seen
    run carry from one chunk to the next as if it were one."""
    a = node()
    many = block_hashes(list(range(2500)), 1, "test-model")
    other = many[:1500] + block_hashes(list(range(5000, 6000)), 1, "test-model")

    def held(n: int) -> list[Location]:
        return [Location(h, "kv-a", "kv-a:13337", "ucx", 64, 1) for h in many[:n]]

    async def main():
        async with open_store(redis_server, kv_prefix) as store:
            await store.register_node(a)
            await store.announce(a, [BlockEntry(h, 64, 1) for h in many[:1500]])
            assert await store.lookup(many) == (held(1500), 1500)  # hits past the first chunk
            assert await store.lookup(many) == (held(1500), 2500)  # seen past the hits
            assert await store.lookup(other) == (held(1500), 1500)  # the run ends in chunk 2
            await store.withdraw(a, many[100:1500])
            assert await store.lookup(many) == (held(100), 2500)  # hits end in chunk 1
            assert await store.longest_prefix(many) == held(100)
            await store.announce(a, [BlockEntry(h, 64, 1) for h in many[100:]])
            assert await store.longest_prefix(many) == held(2500)
            marker = redis.asyncio.Redis.from_url(redis_server.url)
            await marker.ping()
            watcher = redis.asyncio.Redis.from_url(redis_server.url)
            async with watcher.monitor() as monitor:
                await store.lookup(many)
                await marker.echo("done")
                calls = []
                while (command := await monitor.next_command())["command"] != "ECHO done":
                    if command["client_type"] != "lua":
                        calls.append(command["command"].split())
            await marker.aclose()
            await watcher.aclose()
            await store.deregister_node(a)
        return calls

    calls = asyncio.run(main())
    # EVALSHA sha numkeys prefix generation ttl bits hitting seeing hash...
    assert [(c[0], len(c) - 9) for c in calls] == [("EVALSHA", 1024), ("EVALSHA", 1024),
                                                    ("EVALSHA", 452)]  # fmt: skip


def test_the_seen_window_and_bits_are_checked():
    client = redis.asyncio.Redis()
    for kwargs in ({"seen_window_s": 0.0}, {"seen_window_s": float("nan")}, {"seen_bits": 0}):
        with pytest.raises(ConfigError, match="seen"):
            MetadataStore(client, **kwargs)
