"""Two engines in one process, each with a ``MigrationAgent``, over a real data plane.

The test thread steps both engines; the agents, the helper's data-plane server and the donor's
client live on an event loop in a thread of their own (as on a worker, where the gRPC server's
loop owns them). ``call`` runs an agent coroutine there and waits for it, so every agent call
happens between two steps, like ``engine_call`` on a worker: the agents' engine calls run on a
worker thread under the engine's lock, which the test thread holds while it steps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from services.common.errors import ResourceExhaustedError
from services.engine.engine import Engine
from services.migration.agent import MigrationAgent
from services.migration.records import AgentConfig, Peer, Role
from tests.engine.helpers import assert_no_leaks
from tests.engine.test_migration_invariant import WORKLOAD, params

MIGRATION = "m-1"


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class EngineThread:
    """An engine stepped by the test thread, whose agent calls run between its steps (one lock:
    what the worker's engine loop guarantees)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()

    def step(self) -> list:
        with self.lock:
            return self.engine.step()

    async def engine_call(self, fn):
        def locked():
            with self.lock:
                return fn(self.engine)

        return await asyncio.to_thread(locked)


def make_agent(
    engine: EngineThread, kind: str = "tcp", clock=None, **config: Any
) -> MigrationAgent:
    return MigrationAgent(
        engine.engine_call,
        lambda: engine.engine.snapshot,
        AgentConfig(**config),
        data_kind=kind,
        **({"clock": clock} if clock else {}),
    )


class AgentPair:
    """Donor A and helper B with their agents; ``start`` .. ``release`` drive one migration."""

    def __init__(
        self, loop: LoopThread, a: Engine, b: Engine, kind: str = "tcp", clock=None
    ) -> None:
        self.loop, self.a, self.b = loop, a, b
        self.a_thread, self.b_thread = EngineThread(a), EngineThread(b)
        self.donor = make_agent(self.a_thread, kind, clock)
        self.helper = make_agent(self.b_thread, kind, clock)
        self.address = loop.call(self.helper.serve_data())
        loop.call(self.donor.serve_data())
        self.helper_peer = Peer("B", "", self.address, kind)
        self.k: int | None = None
        self.state = "idle"  # idle | copying | switched
        self.events: list[str] = []

    def prepare(self, k: int, num_blocks: int = 128) -> None:
        layers = range(k, self.a.spec.num_layers)
        _, fp, digests, _ = self.loop.call(
            self.donor.prepare(MIGRATION, Role.DONOR, layers, Peer("A"), Peer("B"), None)
        )
        _, _, _, needed = self.loop.call(
            self.helper.prepare(
                MIGRATION,
                Role.HELPER,
                layers,
                Peer("A"),
                self.helper_peer,
                None,
                fp,
                digests,
                num_blocks,
            )
        )
        assert needed == []
        self.k, self.state = k, "copying"
        self.events.append(f"prepare {k}")

    def copy(self) -> tuple[int, int, float]:
        out = self.loop.call(self.donor.copy_kv(MIGRATION, self.helper_peer))
        self.events.append("copy")
        return out

    def switch(self, micro: int, drop: bool) -> None:
        self.loop.call(self.donor.switch(MIGRATION, micro, None))
        if drop:
            self.loop.call(self.donor.activate(MIGRATION, True))
        self.state = "switched"
        self.events.append("switch")

    def revert(self) -> bool:
        """Take the layers back; False (nothing changed) if A's pool cannot shrink yet."""
        try:
            self.loop.call(self.donor.revert(MIGRATION))
        except ResourceExhaustedError:
            return False
        self.events.append("revert")
        self.release()
        return True

    def abort(self) -> None:
        self.loop.call(self.donor.abort(MIGRATION, "test"))
        self.loop.call(self.helper.abort(MIGRATION, "test"))
        self.events.append("abort")
        self._forget()

    def release(self) -> None:
        self.loop.call(self.donor.release(MIGRATION))
        self.loop.call(self.helper.release(MIGRATION))
        self._forget()

    def _forget(self) -> None:
        self.donor.records.clear()
        self.helper.records.clear()
        self.k, self.state = None, "idle"

    def close(self) -> None:
        self.loop.call(self.donor.close())
        self.loop.call(self.helper.close())


def run_with_fault(pair: AgentPair, fault_step: int, fault: Callable[[], None]) -> dict[str, list]:
    """``WORKLOAD`` on donor A, layers [1, L) moved to B at step 8 (switched, weights kept),
    ``fault()`` between steps at ``fault_step``, both engines stepped until A is done; the
    tokens each request got."""
    tokens: dict[str, list] = {}
    for step in range(200):
        for rid, prompt, max_tokens, arrival in WORKLOAD:
            if arrival == step:
                pair.a.add_request(rid, prompt, params(max_tokens))
        if step == 8:
            pair.prepare(1)
            pair.copy()
            pair.switch(2, drop=False)
        if step == fault_step:
            fault()
        for out in pair.a_thread.step() + pair.b_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if step > 40 and not pair.a.has_unfinished_requests:
            break
    return tokens


def assert_unchanged_and_local(pair: AgentPair, tokens: dict, reference: dict) -> None:
    """Greedy output as without the migration, every layer on A again, nothing hosted on B,
    nothing held by either (closes the pair)."""
    assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
    assert pair.a.migration.stage_layout.ranges == ((0, pair.a.spec.num_layers, False),)
    assert not pair.b.migration.hosted_layers
    pair.close()
    assert_no_leaks(pair.a)
    assert_no_leaks(pair.b)


def hold_first_engine_call(agent: MigrationAgent) -> tuple[asyncio.Event, asyncio.Event]:
    """The agent's next engine call waits, parked, until ``gate`` is set (later calls go
    straight through): holds a call (a revert) open past its state check. (gate, parked)."""
    gate, parked = asyncio.Event(), asyncio.Event()
    engine_call = agent.engine_call

    async def held(fn):
        agent.engine_call = engine_call  # only the first call waits
        parked.set()
        await gate.wait()
        return await engine_call(fn)

    agent.engine_call = held
    return gate, parked
