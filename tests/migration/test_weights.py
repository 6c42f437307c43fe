"""Weight transfer: a helper lacking the weights of [k, L) gets them over the real TCP data plane.

Two helpers lack them: an engine started with decoder layers [0, 2) only (``num_loaded_layers``,
``--load-layers``), and an engine of another checkpoint (tiny-llama with layers 1-3 perturbed)
that keeps serving its own requests while it hosts the donor's layers. The donor ships the
layers each needs, the helper checks every layer's BLAKE2b digest against the donor's, hosts
with them (the donor even drops its own), greedy float32 output is token-identical to no
migration, and Release, Abort and lease expiry give every shipped byte back. A corrupted chunk
is refused with the reason and the migration aborts cleanly.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import weakref

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.engine_args import add_engine_args, engine_config
from services.common.errors import ConfigError, InvalidRequestError, ResourceExhaustedError
from services.common.migration_states import MigrationState
from services.coordinator.cli import format_migration
from services.coordinator.clients import RouterWorkers
from services.coordinator.core import Coordinator, CoordinatorConfig
from services.coordinator.migration import Migration
from services.coordinator.servicer import migration_to_proto
from services.engine.memory import module_bytes
from services.migration import weights, wire
from services.migration.records import AgentConfig, Peer, Role, layer_digest, layer_tensors
from services.migration.servicer import migration_service
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from services.rpc.gen.banaserve.v1 import migration_pb2_grpc, router_pb2, router_pb2_grpc
from services.rpc.server import Service, start_server
from tests.coordinator.test_grpc_workers import RPC, FakeRouter
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.engine.test_migration_invariant import B_WORKLOAD, WORKLOAD, params, plain_run
from tests.migration.harness import MIGRATION, AgentPair

S = MigrationState
NUM_LAYERS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    return plain_run(tiny_llama)


@pytest.fixture(scope="module")
def variant(tiny_llama, tmp_path_factory):
    """tiny-llama with layers 1-3 scaled: same architecture, other weights and fingerprint."""
    path = tmp_path_factory.mktemp("variant") / "tiny-llama-variant"
    shutil.copytree(tiny_llama, path)
    for file in path.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name in tensors:
            if name.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3.")):
                tensors[name] = tensors[name] * 1.0625
        save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def layer_bytes(engine) -> int:
    return sum(t.numel() * t.element_size() for t in layer_tensors(engine.model.layers[0]).values())


def prepare(pair: AgentPair, k: int, num_blocks: int = 64) -> tuple[list[int], dict[int, str]]:
    """Both sides prepared; the layers the helper awaits and the donor's digests."""
    layers = range(k, NUM_LAYERS)
    _, fp, digests, _ = pair.loop.call(
        pair.donor.prepare(MIGRATION, Role.DONOR, layers, Peer("A"), Peer("B"), None)
    )
    record, _, _, needed = pair.loop.call(
        pair.helper.prepare(
            MIGRATION, Role.HELPER, layers, Peer("A"), pair.helper_peer, None, fp, digests,
            num_blocks,
        )
    )  # fmt: skip
    assert (record.state, record.reason) == (S.PLANNED, "")
    pair.k, pair.state = k, "copying"
    return needed, digests


def ship(pair: AgentPair, needed: list[int]) -> tuple[int, float]:
    """The donor's CopyWeights: (bytes, seconds)."""
    return pair.loop.call(pair.donor.copy_weights(MIGRATION, pair.helper_peer, needed))


def drive(pair, a, b, b_requests, on_step) -> dict[str, list[int]]:
    """WORKLOAD on A (and ``b_requests`` on B) to the end; ``on_step(step)`` between steps."""
    tokens: dict[str, list[int]] = {}
    for step in range(400):
        for rid, prompt, max_tokens, arrival in WORKLOAD:
            if arrival == step:
                a.add_request(rid, prompt, params(max_tokens))
        for rid, prompt, max_tokens, arrival in b_requests:
            if arrival == step:
                b.add_request(rid, prompt, params(max_tokens))
        on_step(step)
        for out in pair.a_thread.step() + pair.b_thread.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if step > 40 and not (a.has_unfinished_requests or b.has_unfinished_requests):
            return tokens
    raise AssertionError("the workload did not finish")


def test_chunks_cover_a_tensor_exactly_in_order():
    tensor = torch.arange(10, dtype=torch.float32)
    messages = wire.encode_weights_import("m-1", 2, "mlp.w", tensor, 6, 16)
    headers = [wire.parse_request(h).weights_import for h, _ in messages]
    assert [(h.layer, h.name, h.offset, h.num_tensors) for h in headers] == [
        (2, "mlp.w", 0, 6),
        (2, "mlp.w", 16, 6),
        (2, "mlp.w", 32, 6),
    ]
    assert [memoryview(p).nbytes for _, p in messages] == [16, 16, 8]
    assert list(headers[0].tensor.shape) == [10]
    assert b"".join(bytes(p) for _, p in messages) == tensor.numpy().tobytes()


def b_generate(b, requests) -> dict[str, list[int]]:
    return {rid: b.generate([p], params(n))[0].token_ids for rid, p, n, _ in requests}


@pytest.mark.parametrize("helper", ["layers [0, 2) only", "another checkpoint"])
def test_a_helper_lacking_layers_gets_them_shipped_and_output_is_unchanged(
    tiny_llama, variant, loop, reference, helper
):
    """B lacks [2, 4) (loaded [0, 2) only: layer 1 is its own, shared) or holds other weights
    for [1, 4) (another checkpoint, serving its own requests meanwhile): the donor ships what
    B needs, in chunks, and even drops its own copies; every output is its reference."""
    a = make_engine(tiny_llama, num_kv_blocks=64)
    if helper == "another checkpoint":
        b, expect = make_engine(variant, num_kv_blocks=64), [1, 2, 3]
        b_requests, b_reference = B_WORKLOAD, b_generate(make_engine(variant), B_WORKLOAD)
    else:
        b = make_engine(tiny_llama, num_kv_blocks=16, num_loaded_layers=2)
        expect, b_requests, b_reference = [2, 3], [], {}
        with pytest.raises(InvalidRequestError, match=r"holds decoder layers \[0, 2\) of 4 only"):
            b.add_request("x", [1, 2, 3], params(4))
        assert [b.model.holds_layer(i) for i in range(NUM_LAYERS)] == [True, True, False, False]
    b_params = sum(p.numel() for p in b.model.parameters())
    pair = AgentPair(loop, a, b)
    pair.donor.config = AgentConfig(weight_chunk_bytes=100_000)  # several chunks a tensor
    shipped: list[weakref.ref] = []
    records = []

    def on_step(step: int) -> None:
        if step == 6:
            needed, digests = prepare(pair, 1)
            records.extend([pair.donor.get(MIGRATION), pair.helper.get(MIGRATION)])
            assert needed == expect
            hosted = b.migration.hosted_layers[MIGRATION]
            assert hosted.stack.missing() == expect
            if 1 not in expect:  # held identically: shared, not shipped
                assert hosted.stack.layers[1] is b.model.layers[1]
            num_bytes, seconds = ship(pair, needed)
            assert num_bytes == len(expect) * layer_bytes(a) and seconds > 0
            assert hosted.stack.missing() == []
            assert {i: layer_digest(hosted.stack.layers[i]) for i in (1, 2, 3)} == digests
            shipped.extend(weakref.ref(hosted.stack.layers[i]) for i in expect)
            assert b.migration.memory.report().hosted_bytes == (
                hosted.pool.nbytes + len(expect) * layer_bytes(a)
            )
            pair.copy()
        if step == 9:
            pair.switch(2, drop=True)  # the donor frees [1, 4): the shipped layers compute
            assert not any(a.model.holds_layer(i) for i in (1, 2, 3))
        if step == 40:
            assert pair.revert()

    tokens = drive(pair, a, b, b_requests, on_step)
    assert tokens == {**{rid: reference[rid] for rid, *_ in WORKLOAD}, **b_reference}
    assert records[0].state is records[1].state is S.DONE and b.migration.hosted_layers == {}
    gc.collect()
    assert [ref() for ref in shipped] == [None] * len(expect)
    assert sum(p.numel() for p in b.model.parameters()) == b_params
    assert b.migration.memory.report().hosted_bytes == 0
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


@pytest.mark.parametrize("end", ["release", "abort", "lease"])
def test_the_end_of_a_migration_frees_the_shipped_weights(tiny_llama, loop, end):
    clock = Clock()
    a = make_engine(tiny_llama, num_kv_blocks=32)
    budget = module_bytes([a.model]) + (8 << 20)  # B (layers [0, 2) only) under a budget
    b = make_engine(tiny_llama, num_kv_blocks=None, memory_budget_bytes=budget, num_loaded_layers=2)
    blocks_before = b.block_manager.num_blocks
    pair = AgentPair(loop, a, b, clock=clock)
    needed, _ = prepare(pair, 2, num_blocks=16)
    assert needed == [2, 3]
    hosted = b.migration.hosted_layers[MIGRATION]
    reserved = hosted.pool.nbytes + 2 * layer_bytes(a)
    per_block = b.kv_cache.layer_block_bytes * 2
    assert b.migration.memory.report().hosted_bytes == reserved
    assert b.block_manager.num_blocks == (budget - module_bytes([b.model]) - reserved) // per_block
    assert ship(pair, needed) == (2 * layer_bytes(a), 0.0)  # the injected clock stood still
    refs = [weakref.ref(hosted.stack.layers[i]) for i in (2, 3)]
    del hosted
    if end == "release":
        loop.call(pair.helper.release(MIGRATION))
    elif end == "abort":
        loop.call(pair.helper.abort(MIGRATION, "test"))
    else:
        clock.now += 30.0
        loop.call(pair.helper.check())
    record = pair.helper.get(MIGRATION)
    expected = {
        "release": (S.DONE, ""),
        "abort": (S.ABORTED, "test"),
        "lease": (S.ABORTED, "lease expired: no coordinator call"),
    }
    assert (record.state, record.reason) == expected[end]
    loop.call(pair.donor.abort(MIGRATION, "test"))
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert b.migration.hosted_layers == {} and b.migration.memory.report().hosted_bytes == 0
    assert b.block_manager.num_blocks == blocks_before
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_corrupted_chunk_is_refused_and_the_migration_aborts_cleanly(
    tiny_llama, variant, loop, reference, monkeypatch
):
    """B runs another checkpoint (so it needs every layer of [1, 4)) and serves its own
    requests; one byte of layer 3 flips on the way: B refuses it, nothing is hosted after the
    abort and both engines' outputs are their own references."""
    b = make_engine(variant, num_kv_blocks=64)
    b_reference = b_generate(b, B_WORKLOAD)
    a = make_engine(tiny_llama, num_kv_blocks=64)
    pair = AgentPair(loop, a, b)
    export = weights.export_layer

    def corrupted(engine, index):
        tensors = {n: t.clone() for n, t in export(engine, index).items()}
        if index == 3:
            tensors["mlp.down_proj.weight"].view(-1).view(torch.uint8)[123] ^= 1
        return tensors

    monkeypatch.setattr(weights, "export_layer", corrupted)
    outcome: dict[str, object] = {}

    def on_step(step: int) -> None:
        if step != 7:
            return
        needed, digests = prepare(pair, 1)
        assert needed == [1, 2, 3]  # another checkpoint: every layer
        with pytest.raises(InvalidRequestError) as refused:
            ship(pair, needed)
        outcome["reason"] = str(refused.value)
        outcome["digest"] = digests[3]
        hosted = b.migration.hosted_layers[MIGRATION]
        outcome["missing"] = hosted.stack.missing()
        pair.abort()

    tokens = drive(pair, a, b, B_WORKLOAD, on_step)
    assert outcome["missing"] == [3]  # layers 1 and 2 were in; 3 was forgotten
    assert str(outcome["reason"]).startswith("the helper refused: layer 3: the weights received")
    assert str(outcome["reason"]).endswith(f"the donor's is {outcome['digest']}: refused")
    assert tokens == {
        **{rid: reference[rid] for rid, *_ in WORKLOAD},
        **{rid: b_reference[rid] for rid, *_ in B_WORKLOAD},
    }
    assert b.migration.hosted_layers == {} and b.migration.memory.report().hosted_bytes == 0
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_a_chunk_out_of_order_or_of_another_shape_is_refused(tiny_llama, loop):
    a = make_engine(tiny_llama, num_kv_blocks=16)
    b = make_engine(tiny_llama, num_kv_blocks=16, num_loaded_layers=3)
    pair = AgentPair(loop, a, b)
    needed, _ = prepare(pair, 2, num_blocks=8)
    assert needed == [3]
    receiver = pair.helper.host._receivers[MIGRATION]
    weight = layer_tensors(a.model.layers[3])["mlp.down_proj.weight"]

    def send(tensor, name="mlp.down_proj.weight", layer=3, offset=0):
        msg = pb.WeightsImport(
            layer=layer, name=name, tensor=wire.tensor_spec(tensor), offset=offset, num_tensors=6
        )
        receiver.receive(msg, memoryview(wire.tensor_bytes(tensor)).cast("B")[:64])

    with pytest.raises(InvalidRequestError, match="the weights of layer 2 are not awaited"):
        send(weight, layer=2)
    with pytest.raises(InvalidRequestError, match=r"float32 \[688, 256\] sent"):
        send(weight.t().contiguous())
    with pytest.raises(InvalidRequestError, match="chunk of 64 bytes at 64, 0 bytes of it"):
        send(weight, offset=64)
    with pytest.raises(InvalidRequestError, match="mlp.nope: .* no such tensor"):
        send(weight, name="mlp.nope")
    loop.call(pair.helper.abort(MIGRATION, "test"))
    loop.call(pair.donor.abort(MIGRATION, "test"))
    pair.close()


# ---- the coordinator drives it: the record carries the time split --------------------------


class MemoryStore:
    """``core.MigrationStore`` in memory (the Redis one is tested in tests/coordinator)."""

    def __init__(self) -> None:
        self.saved: dict[str, Migration] = {}
        self._last = 0

    async def next_id(self, after: int = 0) -> str:
        self._last = max(self._last, after) + 1
        return f"m-{self._last}"

    async def save(self, m: Migration) -> None:
        self.saved[m.migration_id] = m

    async def load_all(self) -> list[Migration]:
        return list(self.saved.values())

    async def delete(self, migration_ids: list[str]) -> None:
        for migration_id in migration_ids:
            self.saved.pop(migration_id, None)


async def grpc_workers(pair: AgentPair) -> tuple[Coordinator, RouterWorkers, list]:
    """A router that knows A and B, each agent behind its real MigrationWorkerService server,
    and a coordinator reaching them through the router (clients.py), as in a cluster."""
    router = FakeRouter()
    bound = Service.bind(
        router,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )
    servers = [await start_server([bound], RPC)]
    for worker_id, agent in (("A", pair.donor), ("B", pair.helper)):
        servers.append(await start_server([migration_service(agent)], RPC))
        router.workers[worker_id] = servers[-1].address
    workers = RouterWorkers(servers[0].address, RPC)
    config = CoordinatorConfig(lease_s=30.0, renew_interval_s=5.0)
    return Coordinator(MemoryStore(), workers, config), workers, servers


def test_the_coordinator_ships_weights_and_records_the_time_split(tiny_llama, loop, reference):
    """A (all layers) lends [1, 4) to B (layers [0, 2) only) through the coordinator's state
    machine over gRPC: B's Prepare names [2, 3], the COPYING step's CopyWeights ships them
    before the KV, and the record (and ``banaserve migrations ID``) carries weights, KV copy and
    switch apart."""
    a = make_engine(tiny_llama, num_kv_blocks=64)
    b = make_engine(tiny_llama, num_kv_blocks=64, num_loaded_layers=2)  # hosted pool: as many
    pair = AgentPair(loop, a, b)
    coord, workers, servers = loop.call(grpc_workers(pair))
    seen: dict[str, object] = {}

    def on_step(step: int) -> None:
        if step == 6:  # nothing steps while the driver runs: the copies are exact
            running = {s.request_id: s.num_computed_tokens for s in a.scheduler.running}
            token_bytes = a.kv_cache.layer_block_bytes // a.kv_cache.block_size
            seen["kv"] = sum(running.values()) * token_bytes * 3  # tokens, not their blocks
            m = loop.call(coord.start_layers("A", "B", 1, drop_weights=True))
            seen["m"] = loop.call(coord.wait(m.migration_id))
            seen["active"] = format_migration(migration_to_proto(m, coord.now()))
        if step == 30:
            m = seen["m"]
            loop.call(coord.revert(m.migration_id))
            loop.call(coord.wait(m.migration_id))

    try:
        tokens = drive(pair, a, b, [], on_step)
    finally:
        loop.call(coord.close())
        loop.call(workers.close())
        for server in servers:
            loop.call(server.stop(0))
    assert tokens == {rid: reference[rid] for rid, *_ in WORKLOAD}
    m = seen["m"]
    assert (m.state, m.reason, m.weights_skipped) == (S.DONE, "", False)
    assert m.num_weight_bytes == 2 * layer_bytes(a) and m.weights_s > 0
    assert (m.num_copy_kv_bytes, m.num_switch_kv_bytes) == (seen["kv"], 0)  # nothing stepped
    assert m.kv_copy_s > 0 and m.switch_pause_s > 0
    assert m.num_kv_bytes > m.num_copy_kv_bytes  # and the reverse copy
    lines = str(seen["active"]).splitlines()
    assert lines[5] == f"weights     {m.num_weight_bytes:,} B in {m.weights_s:.3f} s"
    assert lines[6].endswith(
        f"copied {m.num_copy_kv_bytes:,} B in {m.kv_copy_s:.3f} s before the switch"
    )
    assert lines[7] == f"switch      {m.switch_pause_s * 1000:.1f} ms pause, 0 B of last KV delta"
    assert b.migration.hosted_layers == {} and b.migration.memory.report().hosted_bytes == 0
    pair.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_load_layers_flag_reaches_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config(parser.parse_args(["--load-layers", "2"])).num_loaded_layers == 2
    assert engine_config(parser.parse_args([])).num_loaded_layers is None
    with pytest.raises(ConfigError, match="num_loaded_layers must be positive, got 0"):
        engine_config(parser.parse_args(["--load-layers", "0"]))


def test_a_hosted_pool_larger_than_memory_is_refused_before_any_allocation(tiny_llama, monkeypatch):
    """A probe's Prepare(HELPER) asking 2^32-1 hosted blocks got INTERNAL from torch's
    allocator (35 TB); a pool this machine cannot hold is RESOURCE_EXHAUSTED, before anything is
    allocated, and so is an allocation that fails."""
    engine = make_engine(tiny_llama, num_kv_blocks=32)
    with pytest.raises(ResourceExhaustedError, match="4294967295 hosted blocks of 2 layers take"):
        weights.host_range(engine, "m-huge", range(2, 4), 2**32 - 1, "", [], {})
    assert not engine.migration.hosted_layers

    def fails(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
        )

    monkeypatch.setattr(engine.migration, "host_layers", fails)
    with pytest.raises(ResourceExhaustedError, match="no memory for 64 hosted blocks of 2 layers"):
        weights.host_range(engine, "m-fail", range(2, 4), 64, "", [], {})
    assert_no_leaks(engine)


def test_a_worker_refuses_an_over_long_abort_reason(tiny_llama, loop):
    """A worker's records are listed together (List, which a restarted coordinator reads): two
    2.5 MB reasons made every List RESOURCE_EXHAUSTED until 64 more migrations pushed them out."""
    pair = AgentPair(loop, make_engine(tiny_llama, num_kv_blocks=32), make_engine(tiny_llama))
    server = loop.call(start_server([migration_service(pair.donor)], RPC))

    async def calls():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = migration_pb2_grpc.MigrationWorkerServiceStub(channel)
            for migration_id, reason, details in [
                ("m-1", "r" * 2_500_000, "reason is longer than 1024 bytes"),
                ("", "", "migration_id is empty"),
            ]:
                request = pb.MigrationWorkerServiceAbortRequest(
                    migration_id=migration_id, reason=reason
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Abort(request)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == details

    try:
        loop.call(calls())
    finally:
        loop.call(server.stop(0))
        pair.close()
