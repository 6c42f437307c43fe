"""One coordinator per Redis prefix (``services/coordinator/ownership.py``), on a real Redis:
a second waits as a standby and takes over once the first stops (at once after a clean stop,
within the claim's TTL after a SIGKILL), and a coordinator whose prefix another took stops.

Before session 37 nothing kept two coordinators apart: both recovered the same live
migrations, renewed and reverted them, and started migrations of their own."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from services.child_process import Child
from services.coordinator.ownership import Ownership, local_identity
from services.kvstore.redis_server import RedisServer
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc
from tests.coordinator.test_process import leave_active_migration

TTL_S, INTERVAL_S = 0.6, 0.1


def owners(url: str, prefix: str, n: int) -> tuple[aioredis.Redis, list[Ownership]]:
    """``n`` coordinators of other hosts (each may run for all this one can tell)."""
    client = aioredis.Redis.from_url(url)
    tokens = [f"host-{i}/pid {1000 + i}/t{i}" for i in range(n)]
    return client, [Ownership(client, prefix, TTL_S, INTERVAL_S, token) for token in tokens]


def test_a_standby_takes_over_at_once_after_a_release_and_within_the_ttl_after_a_kill(
    redis_server, store_prefix
):
    async def main():
        client, (a, b, c) = owners(redis_server.url, store_prefix, 3)
        try:
            await a.acquire()
            standby = asyncio.ensure_future(b.acquire())
            keeper = asyncio.ensure_future(a.keep())
            await asyncio.sleep(3 * TTL_S)  # the owner keeps renewing: the standby waits
            assert not standby.done() and await b.holder() == a.token
            keeper.cancel()
            start = time.monotonic()
            await a.release()  # a clean stop
            await asyncio.wait_for(standby, 2 * INTERVAL_S + 0.5)
            released = time.monotonic() - start
            # b dies without releasing (SIGKILL): c takes over once b's claim lapses.
            start = time.monotonic()
            await asyncio.wait_for(c.acquire(), TTL_S + 2 * INTERVAL_S + 0.5)
            killed = time.monotonic() - start
            assert await c.holder() == c.token
            return released, killed
        finally:
            await client.aclose()

    released, killed = asyncio.run(main())
    assert released < 2 * INTERVAL_S + 0.2
    assert TTL_S - 2 * INTERVAL_S < killed < TTL_S + 2 * INTERVAL_S + 0.2


def test_keep_returns_the_coordinator_that_took_the_prefix_and_takes_back_a_vanished_key(
    redis_server, store_prefix
):
    async def main():
        client, (a, b) = owners(redis_server.url, store_prefix, 2)
        try:
            await a.acquire()
            keeper = asyncio.ensure_future(a.keep())
            # The key gone (Redis restarted empty): a takes it again, no one else holding it.
            await client.delete(a.key)
            await asyncio.sleep(3 * INTERVAL_S)
            assert not keeper.done() and await a.holder() == a.token
            # A stall longer than the TTL: b took the prefix meanwhile; a's next renewal says so.
            await client.delete(a.key)
            await b.acquire()
            holder = await asyncio.wait_for(keeper, 3 * INTERVAL_S)
            await a.release()  # not a's any more: b keeps it
            return holder, await b.holder()
        finally:
            await client.aclose()

    holder, now = asyncio.run(main())
    assert holder == now == "host-1/pid 1001/t1"


def test_every_claim_gets_a_larger_epoch_even_after_redis_lost_everything(
    redis_server, store_prefix
):
    """The fencing token (services/common/fencing.py): each claim's epoch is larger than every
    earlier one's, the owner's own again-claim of a vanished key included; with the last epoch
    gone too (Redis restarted empty) Redis's clock keeps it growing."""

    async def main():
        client, (a, b) = owners(redis_server.url, store_prefix, 2)
        try:
            assert a.epoch == 0  # no claim yet: a coordinator sends none
            await a.acquire()
            first = a.epoch
            await a.release()
            await b.acquire()
            second = b.epoch
            # A stored epoch ahead of the clock (a clock stepped back): the next is one more.
            await client.set(b.epoch_key, second + 10**12)
            await b.release()
            await a.acquire()
            third = a.epoch
            keeper = asyncio.ensure_future(a.keep())
            await client.delete(a.key, a.epoch_key)  # Redis restarted empty
            await asyncio.sleep(3 * INTERVAL_S)
            assert not keeper.done() and await a.holder() == a.token
            keeper.cancel()
            return first, second, third, a.epoch
        finally:
            await client.aclose()

    first, second, third, again = asyncio.run(main())
    assert 0 < first < second and third == second + 10**12 + 1
    # Redis's clock in microseconds: the second claim came after the first
    assert abs(first / 1e6 - time.time()) < 60
    # Taken again with nothing stored: the clock alone, behind the stepped epoch but
    # past every epoch the clock gave
    assert second < again < third


def test_a_claim_of_a_coordinator_gone_from_this_host_is_taken_at_once(redis_server, store_prefix):
    """A restart on the same host and pid namespace (`banaserve up` respawning a SIGKILLed
    coordinator) takes its predecessor's claim at once instead of waiting out the TTL; a claim
    of a process that still runs here, or of another pid namespace or host, is waited for."""
    here = local_identity()
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "30"])

    async def take(holder: str) -> float | None:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.set(f"{store_prefix}:owner", holder, px=60_000)
            me = Ownership(client, store_prefix, TTL_S, INTERVAL_S)
            start = time.monotonic()
            try:
                await asyncio.wait_for(me.acquire(), 1.0)
            except TimeoutError:
                return None
            assert await me.holder() == me.token
            await me.release()
            return time.monotonic() - start
        finally:
            await client.aclose()

    try:
        for holder in (f"{here}/pid {gone.pid}/old", f"{here}/pid {os.getpid()}/old"):
            assert asyncio.run(take(holder)) < 0.2, holder
        other_namespace = f"{socket.gethostname()}/pid:[1]/pid {gone.pid}/old"
        elsewhere = f"elsewhere/{here.split('/', 1)[1]}/pid {gone.pid}/old"
        for holder in (f"{here}/pid {alive.pid}/old", other_namespace, elsewhere):
            assert asyncio.run(take(holder)) is None, holder  # waits (its claim has 60 s)
    finally:
        alive.kill()
        alive.wait()


def coordinator(url: str, prefix: str, log) -> Child:
    argv = [
        sys.executable, "-m", "services.coordinator", "--port", "0",
        "--redis", url, "--key-prefix", prefix, "--lease", "30", "--log-level", "WARNING",
    ]  # fmt: skip
    return Child("coordinator", argv, dict(os.environ), log)


@pytest.mark.timeout(120)
def test_a_second_coordinator_process_waits_then_serves_and_one_overtaken_exits(
    redis_server, store_prefix, tmp_path
):
    leave_active_migration(redis_server.url, store_prefix)
    with (
        open(tmp_path / "coordinator-0.log", "w") as log0,
        open(tmp_path / "coordinator-1.log", "w") as log1,
    ):
        run_two(redis_server.url, store_prefix, tmp_path, log0, log1)


def run_two(url: str, store_prefix: str, tmp_path, log0, log1) -> None:
    first = coordinator(url, store_prefix, log0)
    second = None
    try:
        first.wait_ready(time.monotonic() + 60)
        second = coordinator(url, store_prefix, log1)
        assert not second.poll_ready(timeout_s=4.0)  # a standby: no server, no recovery
        assert "another coordinator" in (tmp_path / "coordinator-1.log").read_text()
        stopped = time.monotonic()
        assert first.stop() == 0  # a clean stop releases the prefix
        address = second.wait_ready(time.monotonic() + 30)
        assert time.monotonic() - stopped < 10
        with grpc.insecure_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            listed = stub.ListMigrations(pb.ListMigrationsRequest(), timeout=5).migrations
            assert [(m.migration_id, m.state) for m in listed] == [
                ("m-1", pb.MIGRATION_STATE_ACTIVE)
            ]
        # Another coordinator takes the prefix (a pod left running beside its replacement,
        # whose claim lapsed in a partition): this one stops within a renewal, exit 2.
        client = redis.Redis.from_url(url)
        try:
            client.set(f"{store_prefix}:owner", "elsewhere/pid 1/x", px=3000)
        finally:
            client.close()
        assert second.proc.wait(timeout=10) == 2
        text = (tmp_path / "coordinator-1.log").read_text()
        assert "another coordinator (elsewhere/pid 1/x) took" in text
    finally:
        for child in (first, second):
            if child is not None and child.proc.poll() is None:
                child.proc.kill()


@pytest.mark.timeout(120)
def test_a_coordinator_started_before_its_redis_waits_for_it_then_serves(tmp_path):
    """It ended in a DependencyUnavailableError traceback (exit 1) when Redis was not up yet;
    a standby whose Redis restarted did the same. Now it logs once, waits, and serves."""
    server = RedisServer(embedded=False)  # its port, not started yet
    with open(tmp_path / "coordinator.log", "w") as log:
        child = coordinator(server.url, "waits-for-redis", log)
        try:
            assert not child.poll_ready(timeout_s=3.0)
            assert child.proc.poll() is None  # still there, waiting
            assert (
                "cannot reach Redis to claim waits-for-redis"
                in (tmp_path / "coordinator.log").read_text()
            )
            server.start()
            address = child.wait_ready(time.monotonic() + 30)
            with grpc.insecure_channel(address) as channel:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                assert stub.ListMigrations(pb.ListMigrationsRequest(), timeout=5).migrations == []
            assert child.stop() == 0
        finally:
            if child.proc.poll() is None:
                child.proc.kill()
            server.stop()
