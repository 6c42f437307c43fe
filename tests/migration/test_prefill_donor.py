"""A prefill worker as a layer migration's donor: prompts prefilled through the helper.

Prefill worker P (the real ``PrefillWorker`` and engine loop) moves its layers [k, L) to
helper B through two ``MigrationAgent``s over the real TCP data plane, while prompts flow: P's
steps run [0, k) and B runs [k, L) for every prompt; the layer hook hands [0, k) to the KV
sender as they complete, and after the prompt's last step P reads [k, L) back from B through
the stage port (``Engine.export_kv_async``) and hands them on too; B frees its copy once they
are read. An in-test transport imports each handoff into decode engine D. Prompts arrive
before the migration, while it copies and switches (chunked prefill: some straddle the
switch), while switched (with the layers dropped from P in one case) and across the revert or
abort. Every prompt's greedy float32 output decoded by D equals a run without migrations; P,
B and D end with nothing held, and B hosts nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from services.common.kv_layout import KVLayout
from services.common.migration_states import MigrationState
from services.common.types import SamplingParams
from services.engine.engine import Engine
from services.migration import wire
from services.migration.agent import MigrationAgent
from services.migration.ports import DataStagePort
from services.migration.records import AgentConfig, Peer, Role
from services.prefill.core import FirstToken, PrefillRequest, PrefillWorker
from services.prefill.transport import KVSender, KVTarget, KVTransport, TransferStats
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.migration.harness import MIGRATION, EngineThread

NUM_LAYERS = 4  # tiny-llama
# Batches of (prompt length, max_tokens): before, during the copy and switch, switched, after.
BATCHES = [[(37, 12), (16, 9)], [(120, 10), (75, 8), (9, 11)], [(53, 7), (44, 10)], [(30, 6)]]


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def prompts() -> dict[str, tuple[list[int], int]]:
    return {
        f"b{i}r{j}": (prompt_ids(n, 100 * i + j), m)
        for i, batch in enumerate(BATCHES)
        for j, (n, m) in enumerate(batch)
    }


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    engine = make_engine(tiny_llama)
    return {rid: engine.generate([p], params(m))[0].token_ids for rid, (p, m) in prompts().items()}


class ImportingSender(KVSender):
    """Collects a handoff's layers; at ``finish`` imports them all into decode engine D."""

    def __init__(
        self,
        decode: Engine,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        first_block: int = 0,
        prefix: dict[int, torch.Tensor] | None = None,
    ):
        self.decode, self.request_id = decode, request_id
        self.prompt, self.max_tokens = prompt, max_tokens
        self.first_block, self.prefix = first_block, prefix
        self.layers: dict[int, tuple] = {}
        self.duplicates = 0

    def send_layer(self, data, layout) -> None:
        self.duplicates += layout.layer in self.layers
        assert layout.first_block == self.first_block and data.shape[1] == layout.num_blocks
        if self.first_block:  # the blocks before: as a decode worker's cache would hold them
            whole = self.prefix[layout.layer]
            data = torch.cat([whole[:, : self.first_block], data], dim=1)
            layout = replace(layout, first_block=0)  # D checks no hashes here
        self.layers[layout.layer] = (data.clone(), layout)

    async def finish(self, first_token_id: int, compute_done_at: float) -> TransferStats:
        assert sorted(self.layers) == list(range(NUM_LAYERS)) and not self.duplicates
        n, d = len(self.prompt), self.decode
        d.begin_import(
            self.request_id, [*self.prompt, first_token_id], n, n, params(self.max_tokens)
        )
        for layer in range(NUM_LAYERS):
            d.import_kv(self.request_id, *self.layers[layer])
        d.finish_import(self.request_id)
        return TransferStats(NUM_LAYERS, 0, 0.0, 0.0)

    async def abort(self) -> None:
        pass

    @property
    def failed(self):
        return None


class ImportingTransport(KVTransport):
    def __init__(self, decode: Engine, prefix: Engine) -> None:
        self.decode, self.prefix = decode, prefix
        self.reservations: dict[str, tuple[list[int], int]] = {}  # reservation id -> request

    async def open(self, target: KVTarget, request_id, num_layers, timeout_s) -> KVSender:
        prompt, max_tokens = self.reservations[target.reservation_id]
        prefix = None
        if target.first_block:  # the prompt's KV from another engine, for the blocks before
            engine = self.prefix
            engine.add_request(request_id, prompt, params(2))  # stays after its first step
            engine.step()
            prefix = {i: engine.export_kv(request_id, i)[0] for i in range(NUM_LAYERS)}
            engine.abort(request_id)
        return ImportingSender(
            self.decode, request_id, prompt, max_tokens, target.first_block, prefix
        )

    async def close(self) -> None:
        pass


class PrefillDonor:
    """P (a real prefill worker), helper B, decode engine D, and the two agents on this loop."""

    def __init__(self, model, drop: bool, micro: int = 1, skip: bool = False) -> None:
        self.d = make_engine(model)
        self.transport = ImportingTransport(self.d, make_engine(model))
        self.skip = skip  # each prompt's target holds its first half of blocks already
        p_engine = make_engine(model, max_num_batched_tokens=32)  # chunked: prompts straddle
        self.micro = micro
        # Steps the donor ran as two micro-batches with the KV sender's layer hook on each.
        self.hooked_micro_steps = 0
        runner = p_engine.stepper.runner
        run_micro_batches = runner.run_micro_batches

        def counted(parts, layout, on_layer_done=None):
            self.hooked_micro_steps += on_layer_done is not None and len(parts) >= 2
            return run_micro_batches(parts, layout, on_layer_done)

        runner.run_micro_batches = counted
        self.p = PrefillWorker(p_engine, self.transport)
        self.b = EngineThread(make_engine(model, num_kv_blocks=128))
        self.drop = drop
        self.first: dict[str, list[int]] = {}  # the first token of each prompt, from P
        self.donor = MigrationAgent(self.p.engine_call, lambda: p_engine.snapshot, data_kind="tcp")
        self.helper = MigrationAgent(
            self.b.engine_call, lambda: self.b.engine.snapshot, AgentConfig(), data_kind="tcp"
        )

    async def start(self) -> None:
        self.p.start()
        await self.donor.serve_data()
        self.helper_peer = Peer("B", "", await self.helper.serve_data(), "tcp")

    async def prefill(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        self.transport.reservations[f"res-{rid}"] = (prompt, max_tokens)
        first_block = (len(prompt) - 1) // 16 // 2 if self.skip else 0  # blocks of 16
        target = KVTarget("D", "in-process", f"res-{rid}", first_block=first_block)
        request = PrefillRequest(rid, prompt, params(max_tokens), target)
        async for item in self.p.prefill(request, timeout_s=60):
            if isinstance(item, FirstToken):
                self.first[rid] = item.token_ids

    async def migrate(self, k: int, batch: list) -> None:
        """Prepare, two copy stages and the switch while ``batch`` prefills."""
        layers = range(k, NUM_LAYERS)
        _, fp, digests, _ = await self.donor.prepare(
            MIGRATION, Role.DONOR, layers, Peer("P"), Peer("B"), None
        )
        await self.helper.prepare(
            MIGRATION, Role.HELPER, layers, Peer("P"), self.helper_peer, None, fp, digests, 64
        )
        tasks = [asyncio.create_task(self.prefill(*r)) for r in batch]
        await self.donor.copy_kv(MIGRATION, self.helper_peer)
        await self.donor.copy_kv(MIGRATION, self.helper_peer)
        await self.donor.switch(MIGRATION, self.micro, None)
        if self.drop:
            await self.donor.activate(MIGRATION, True)
        await asyncio.gather(*tasks)

    async def end(self, how: str, batch: list) -> None:
        tasks = [asyncio.create_task(self.prefill(*r)) for r in batch]
        if how == "revert":
            await self.donor.revert(MIGRATION)
            for agent in (self.donor, self.helper):
                await agent.release(MIGRATION)
        else:
            for agent in (self.donor, self.helper):
                await agent.abort(MIGRATION, "test")
        await asyncio.gather(*tasks)

    async def close(self) -> dict[str, int]:
        stats = await self.p.engine_call(lambda e: e.stats())
        await self.donor.close()
        await self.helper.close()
        await self.p.stop()
        return stats


# (k, layers dropped from P, how it ends, micro-batches: 2 or more split P's steps, each part's
# layers handed to the KV sender as that part computes them; targets that hold each prompt's
# first blocks, so P sends from a later block, its helper's layers cut to that block too)
SCENARIOS = [
    (1, False, "revert", 1, False),
    (2, True, "revert", 2, False),
    (3, True, "abort", 1, False),
    (2, False, "abort", 2, False),
    (2, False, "revert", 4, False),  # the automatic mode's prefill donors: 8 (as many as seqs)
    (1, True, "abort", 8, False),
    (2, False, "revert", 2, True),
]


@pytest.mark.parametrize(("k", "drop", "end", "micro", "skip"), SCENARIOS)
def test_a_prefill_donor_hands_on_the_kv_its_helper_computed(
    tiny_llama, reference, k, drop, end, micro, skip
):
    everything = prompts()
    batches = [
        [(rid, *everything[rid]) for rid in everything if rid[1] == str(i)] for i in range(4)
    ]
    world = PrefillDonor(tiny_llama, drop, micro, skip)

    async def main() -> tuple[dict[str, int], int]:
        await world.start()
        await asyncio.gather(*(world.prefill(*r) for r in batches[0]))
        await world.migrate(k, batches[1])
        hosted = world.b.engine.migration.hosted_layers[MIGRATION]
        before = world.helper.get(MIGRATION).bytes_moved
        await asyncio.gather(*(world.prefill(*r) for r in batches[2]))
        await world.donor.get(MIGRATION).port.drain()  # the releases after the handoffs
        num_hosted = hosted.num_sequences  # every handoff read: B freed each prompt's copy
        assert world.helper.get(MIGRATION).state is MigrationState.ACTIVE
        assert world.helper.get(MIGRATION).bytes_moved == before  # handoffs are no copies
        await world.end(end, batches[3])
        return await world.close(), num_hosted

    p_stats, num_hosted = asyncio.run(main())
    tokens = {rid: list(first) for rid, first in world.first.items()}
    while world.d.has_unfinished_requests:
        for out in world.d.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens == reference
    assert num_hosted == 0
    assert (world.hooked_micro_steps > 0) == (micro >= 2)
    assert p_stats["num_free_blocks"] == p_stats["num_blocks"] and p_stats["num_running"] == 0
    assert_no_leaks(world.d)
    assert_no_leaks(world.b.engine)
    assert not world.b.engine.migration.hosted_layers
    ended = MigrationState.DONE if end == "revert" else MigrationState.ABORTED
    assert world.helper.get(MIGRATION).state is world.donor.get(MIGRATION).state is ended


class OrderClient:
    """A data-plane client that answers at once, recording the order of what it was sent; an
    export yields to the loop mid-way, so a release not waiting for it would get in between."""

    def __init__(self, data, layout) -> None:
        self.data, self.layout = data, layout
        self.sent: list[str] = []

    async def request(self, header, payload, timeout_s):
        kind = wire.parse_request(header).WhichOneof("kind")
        self.sent.append(kind)
        if kind == "kv_export":
            await asyncio.sleep(0)
            self.sent.append("kv_export answered")
            return wire.encode_kv_exported(self.data, self.layout)
        return wire.response(ok=True), b""


def test_the_port_releases_a_sequence_only_after_the_reads_asked_before():
    layout = KVLayout("fp", 2, 20, (b"h" * 16,), "float32", 16, 1, 4)
    data = torch.arange(2 * 2 * 16 * 4, dtype=torch.float32).reshape(layout.shape)

    async def main():
        client = OrderClient(data, layout)
        port = DataStagePort(client, MIGRATION, asyncio.get_running_loop(), 5.0)
        read = port.export_kv("r", 2, 0, 20)
        port.release(["r"])  # the drop right after the handoff's read was asked
        await port.drain()
        return client.sent, read.result(0)

    sent, (got, got_layout) = asyncio.run(main())
    assert sent == ["kv_export", "kv_export answered", "release"]
    assert torch.equal(got, data) and (got_layout.layer, got_layout.num_tokens) == (2, 20)
