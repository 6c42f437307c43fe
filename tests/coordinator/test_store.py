"""Migrations in a real Redis: records round-trip, and a restarted coordinator finds every
migration and finishes or reverts it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from services.common.errors import PreconditionError
from services.coordinator.migration import Migration, MigrationKind, MigrationState, StateTime
from services.coordinator.ownership import Ownership
from services.coordinator.store import DELETE_CHUNK, RedisMigrationStore
from tests.coordinator.factories import coordinator
from tests.coordinator.fakes import FakeClock, FakeCluster

S = MigrationState
pytestmark = pytest.mark.timeout(60)


def test_an_attention_record_keeps_its_selection(redis_server, store_prefix):
    m = Migration(
        "m-8", MigrationKind.ATTENTION, "decode-0", "prefill-0", 0, 30, created_at=5.0,
        max_sequences=6, max_blocks_per_sequence=3, refill=True, num_blocks=40, automatic=True,
    )  # fmt: skip

    async def main():
        store = RedisMigrationStore.from_url(redis_server.url, store_prefix)
        await store.save(m)
        loaded = await store.load_all()
        await store.close()
        return loaded

    assert asyncio.run(main()) == [m]


def test_a_record_round_trips(redis_server, store_prefix):
    m = Migration(
        "m-7", MigrationKind.LAYERS, "decode-0", "prefill-0", 2, 30, created_at=5.0,
        state=S.ACTIVE, helper_data_address="127.0.0.1:5001", num_weight_bytes=123,
        num_kv_bytes=1 << 40, weights_skipped=True, num_sequences=9, switch_pause_s=0.0125,
        reason="", trace_id=(1 << 127) + 3, root_span_id=(1 << 63) + 5,
        timings=[StateTime(S.PLANNED, 5.0, 5.5), StateTime(S.COPYING, 5.5, 7.0),
                 StateTime(S.SWITCHING, 7.0, 7.25), StateTime(S.ACTIVE, 7.25)],
    )  # fmt: skip

    async def main():
        store = RedisMigrationStore.from_url(redis_server.url, store_prefix)
        assert [await store.next_id(), await store.next_id()] == ["m-1", "m-2"]
        await store.save(m)
        m.reason = "changed after saving"
        loaded = await store.load_all()
        await store.close()
        return loaded

    loaded = asyncio.run(main())
    m.reason = ""
    assert loaded == [m]


def test_a_coordinator_that_lost_its_prefix_writes_nothing(redis_server, store_prefix):
    """Guarded by the ownership claim (``RedisMigrationStore.guard``), a save or delete runs
    only while the claim is still this coordinator's: once another took the prefix over, the
    old one's writes are refused, nothing written, and the new owner's records stay."""
    old_m = Migration("m-1", MigrationKind.LAYERS, "decode-0", "prefill-0", 2, 30, created_at=1.0)
    new_m = replace(old_m, state=S.ACTIVE, reason="")

    async def main():
        client = aioredis.Redis.from_url(redis_server.url)
        a, b = (Ownership(client, store_prefix, 0.6, 0.1, f"host-{i}/pid 1/t") for i in (1, 2))
        old, new = (RedisMigrationStore(client, store_prefix) for _ in range(2))
        old.guard(a.key, a.token)
        new.guard(b.key, b.token)
        try:
            await a.acquire()
            await old.save(old_m)
            await client.delete(a.key)  # a's claim lapsed (Redis out of its reach) ...
            await old.save(old_m)  # no owner at all (Redis restarted empty) is no other owner
            await b.acquire()  # ... and b took the prefix over
            await new.save(new_m)
            refused = []
            for write in (old.save(replace(old_m, reason="stale")), old.delete(["m-1"])):
                with pytest.raises(PreconditionError) as info:
                    await write
                refused.append(str(info.value))
            loaded = await new.load_all()
            await new.delete(["m-1"])
            return refused, loaded, await new.load_all()
        finally:
            await client.aclose()

    refused, loaded, after = asyncio.run(main())
    assert (
        refused
        == [
            f"this coordinator no longer owns {store_prefix} (another one took it over): "
            "nothing written"
        ]
        * 2
    )
    assert (loaded, after) == ([new_m], [])


def test_deletes_go_in_chunks(redis_server, store_prefix):
    async def main():
        store = RedisMigrationStore.from_url(redis_server.url, store_prefix)
        ms = [
            Migration(f"m-{i}", MigrationKind.LAYERS, "d", "p", 2, 30, created_at=1.0)
            for i in range(1, DELETE_CHUNK + 3)
        ]
        for m in ms:
            await store.save(m)
        await store.delete([m.migration_id for m in ms[1:]])
        loaded = await store.load_all()
        await store.close()
        return ms, loaded

    ms, loaded = asyncio.run(main())
    assert loaded == ms[:1]


def test_a_restarted_coordinator_finishes_or_reverts_every_migration(redis_server, store_prefix):
    cluster = FakeCluster(*(f"{role}-{i}" for i in range(3) for role in ("decode", "prefill")))
    clock = FakeClock()
    copying = cluster.hold("decode-1", "copy to 127.0.0.1:9100")
    reverting = cluster.hold("decode-2", "revert")

    async def first_life():
        async with coordinator(redis_server.url, store_prefix, cluster, clock) as coord:
            await coord.start_layers("decode-0", "prefill-0", 2)
            await coord.wait("m-1")
            await coord.revert("m-1")
            await coord.wait("m-1")  # m-1: DONE
            await coord.start_layers("decode-0", "prefill-0", 3)
            await coord.wait("m-2")  # m-2: ACTIVE
            await coord.start_layers("decode-1", "prefill-1", 1)
            await copying.entered.wait()  # m-3: COPYING, the donor's copy in flight
            await coord.start_layers("decode-2", "prefill-2", 2)
            await coord.wait("m-4")
            await coord.revert("m-4")
            await reverting.entered.wait()  # m-4: REVERTING, the donor's revert in flight
            return {m.migration_id: m.state for m in coord.list()}

    async def second_life():
        cluster.holds.clear()
        cluster.calls.clear()
        async with coordinator(redis_server.url, store_prefix, cluster, clock) as coord:
            await asyncio.gather(*coord._background, *coord._tasks.values())
            await coord.renew_leases()
            new = await coord.start_layers("decode-1", "prefill-1", 2)
            await coord.wait(new.migration_id)
            return {m.migration_id: m for m in coord.list()}

    before = asyncio.run(first_life())
    assert before == {"m-1": S.DONE, "m-2": S.ACTIVE, "m-3": S.COPYING, "m-4": S.REVERTING}
    after = asyncio.run(second_life())
    assert {i: m.state for i, m in after.items()} == {
        "m-1": S.DONE,
        "m-2": S.ACTIVE,
        "m-3": S.ABORTED,
        "m-4": S.DONE,
        "m-5": S.ACTIVE,
    }
    assert after["m-3"].reason == "the coordinator restarted while the migration was COPYING"
    m3_calls = [c for c in cluster.calls if c.startswith(("decode-1 abort", "prefill-1 abort"))]
    assert m3_calls == ["decode-1 abort", "prefill-1 abort"]
    assert [c for c in cluster.calls if c.startswith(("decode-2", "prefill-2"))] == [
        "decode-2 revert",
        "decode-2 release",
        "prefill-2 release",
    ]
    assert cluster.ports["decode-0"].renewals == [("m-2", 10.0)]
    assert cluster.ports["prefill-0"].renewals == [("m-2", 10.0)]
    m4 = after["m-4"]
    assert [t.state for t in m4.timings] == [
        S.PLANNED, S.COPYING, S.SWITCHING, S.ACTIVE, S.REVERTING, S.DONE
    ]  # fmt: skip

    # What Redis holds is what the second coordinator ended with.
    async def reload():
        store = RedisMigrationStore.from_url(redis_server.url, store_prefix)
        try:
            return await store.load_all()
        finally:
            await store.close()

    assert asyncio.run(reload()) == list(after.values())
    held = cluster.held()
    assert held == {
        "decode-0": {"m-2"}, "prefill-0": {"m-2"}, "decode-1": {"m-5"}, "prefill-1": {"m-5"},
        "decode-2": set(), "prefill-2": set(),
    }  # fmt: skip
