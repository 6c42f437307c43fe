"""Bugs the random cluster test (test_cluster_random.py) found, each pinned in-process.

- A helper's ``Prepare`` cancelled while its engine call hosts the layers (the coordinator aborts
  a COPYING migration: it cancels the call in flight, then calls ``Abort``): the engine call runs
  on regardless, so the layers were hosted while the agent had no record of the migration, and
  the ``Abort`` that followed found nothing to undo; the hosted pool stayed for ever (no record,
  no lease). Seen as a prefill worker reporting 3 hosted layers after every migration had ended.
- A lease renewal that reaches the donor between its ``Release`` and the helper's, at the end of
  a revert: the donor answers that the migration is over (DONE), which the coordinator took for
  a lost lease, so it cancelled the revert's last step and ABORTED a migration that had been
  reverted ("prefill-… no longer holds the migration (its lease ran out)").
"""

from __future__ import annotations

import asyncio
import threading

from services.coordinator.migration import MigrationState
from services.migration.agent import MigrationAgent
from services.migration.records import AgentConfig, Peer, Role
from tests.coordinator.conftest import redis_server, store_prefix  # noqa: F401 - fixtures
from tests.coordinator.factories import coordinator
from tests.coordinator.fakes import FakeClock, FakeCluster
from tests.engine.helpers import make_engine
from tests.migration.harness import MIGRATION, EngineThread


def test_an_abort_undoes_the_hosting_of_a_cancelled_prepare(tiny_llama, loop):
    b = make_engine(tiny_llama, num_kv_blocks=32)
    thread = EngineThread(b)
    hosting, go_on = threading.Event(), threading.Event()
    calls: list[object] = []

    async def engine_call(fn):
        calls.append(fn)
        if len(calls) != 2:
            return await thread.engine_call(fn)

        def held_up(engine):  # the hosting call, running when its caller is cancelled
            hosting.set()
            assert go_on.wait(30)
            return fn(engine)

        return await thread.engine_call(held_up)

    helper = MigrationAgent(engine_call, lambda: b.snapshot, AgentConfig(), data_kind="tcp")
    prepare = helper.prepare(
        MIGRATION, Role.HELPER, range(2, 4), Peer("A"), Peer("B"), None, b.fingerprint, {}, 16
    )
    future = asyncio.run_coroutine_threadsafe(prepare, loop.loop)
    assert hosting.wait(30)
    future.cancel()  # the coordinator cancels the call in flight...
    go_on.set()
    loop.call(thread.engine_call(lambda e: None))  # the hosting call has run
    assert list(b.migration.hosted_layers) == [MIGRATION]
    loop.call(helper.abort(MIGRATION, "aborted on request"))  # ...then aborts
    assert b.migration.hosted_layers == {}
    assert helper.records[MIGRATION].state.name == "ABORTED"


def test_a_renewal_between_the_two_releases_leaves_the_revert_done(
    redis_server,  # noqa: F811
    store_prefix,  # noqa: F811
):
    async def main() -> tuple[MigrationState, str, list[str]]:
        cluster = FakeCluster()
        async with coordinator(redis_server.url, store_prefix, cluster, FakeClock()) as coord:
            await coord.start_layers("decode-0", "prefill-0", 2)
            m = await coord.wait("m-1")
            held = cluster.hold("prefill-0", "release")  # the donor has released, not the helper
            await coord.revert("m-1")
            await held.entered.wait()
            await coord.renew_leases()
            await asyncio.gather(*coord._background)
            held.release.set()
            await coord.wait("m-1")
            return m.state, m.reason, cluster.calls[-3:]

    state, reason, calls = asyncio.run(main())
    assert (state, reason) == (MigrationState.DONE, "")
    assert calls == ["decode-0 revert", "decode-0 release", "prefill-0 release"]  # no renew
