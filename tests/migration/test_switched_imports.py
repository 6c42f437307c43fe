"""A decode donor switched with layers [k, L) on a helper takes new imported requests.

Donor A decodes requests whose prompt KV a prefill engine P computed (``begin_prompt_import``,
``import_kv`` per layer, ``finish_prompt_import``, as a decode worker does). Its layers [k, L)
move to helper B through two ``MigrationAgent``s over the real TCP data plane. Requests arrive
at every moment: before the migration, with their import straddling the switch (some layers
written before it, the rest after), entirely while switched (their KV for [k, L) goes straight
to B), and straddling the revert or abort. Greedy float32 output of every request equals a run
without migrations; the revert copies back the KV of the requests admitted after the switch
too (nobody recomputes); both engines end with nothing held. The e2e test does the same across
router + prefill + decode processes: requests routed to the switched decode worker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import pytest
import torch

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.engine.engine import Engine
from services.engine.memory import module_bytes
from services.launcher import ClusterSpec
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from services.rpc.gen.banaserve.v1 import migration_pb2_grpc
from tests.clusters import running_cluster, wait_for
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine
from tests.migration.harness import MIGRATION, AgentPair
from tests.migration.test_cluster_migration import decode_stats, prefill_stats

NUM_LAYERS = 4  # tiny-llama
DONOR_BLOCKS = 64  # no preemption: every sequence's KV is where the test says
# request id -> (prompt, max_tokens)
REQUESTS = {
    "r0": (prompt_ids(37, 1), 24),
    "r1": (prompt_ids(16, 2), 30),
    "r2": (prompt_ids(53, 3), 20),  # import straddles the switch
    "r3": (prompt_ids(21, 4), 26),  # imported while switched
    "r4": (prompt_ids(44, 5), 18),  # import straddles the revert / abort
}


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    engine = make_engine(tiny_llama)
    return {
        rid: engine.generate([prompt], params(n))[0].token_ids
        for rid, (prompt, n) in REQUESTS.items()
    }


@pytest.fixture(scope="module")
def prefilled(tiny_llama) -> dict[str, tuple[int, list]]:
    """Per request: the first token and every layer's prompt KV, computed by engine P."""
    p, out = make_engine(tiny_llama), {}
    for rid, (prompt, n) in REQUESTS.items():
        p.add_request(rid, prompt, params(n))
        (first,) = p.step()
        layers = [p.export_kv(rid, layer) for layer in range(NUM_LAYERS)]
        out[rid] = (first.new_token_ids[0], [(data.clone(), layout) for data, layout in layers])
        p.abort(rid)
    assert_no_leaks(p)
    return out


def donor_engine(model, drop: bool) -> Engine:
    """``DONOR_BLOCKS`` blocks, as a count or (``drop``) as a memory budget."""
    if not drop:
        return make_engine(model, num_kv_blocks=DONOR_BLOCKS)
    probe = make_engine(model, num_kv_blocks=1)
    budget = module_bytes([probe.model]) + DONOR_BLOCKS * probe.kv_cache.block_bytes
    return make_engine(model, num_kv_blocks=None, memory_budget_bytes=budget)


class Decode:
    """A's requests: imports layer by layer, steps, the tokens each request got."""

    def __init__(self, pair: AgentPair, prefilled) -> None:
        self.pair, self.a, self.prefilled = pair, pair.a, prefilled
        self.tokens: dict[str, list[int]] = {}

    def begin(self, rid: str, layers: range) -> None:
        prompt, n = REQUESTS[rid]
        self.a.begin_prompt_import(rid, prompt, params(n))
        self.write(rid, layers)

    def write(self, rid: str, layers: range) -> None:
        for layer in layers:
            data, layout = self.prefilled[rid][1][layer]
            self.a.import_kv(rid, data, replace(layout))

    def finish(self, rid: str) -> None:
        out = self.a.finish_prompt_import(rid, self.prefilled[rid][0])
        self.tokens[rid] = list(out.new_token_ids)

    def steps(self, n: int | None = None) -> None:
        """``n`` steps, or until every request has finished."""
        i = 0
        while (n is None and self.a.has_unfinished_requests) or (n is not None and i < n):
            for out in self.pair.a_thread.step():
                self.tokens[out.request_id] += out.new_token_ids
            i += 1


SCENARIOS = [(1, 1, False, "revert"), (2, 2, True, "revert"), (3, 1, True, "abort")]
SCENARIOS += [(2, 2, False, "abort"), (1, 1, True, "helper gone")]


@pytest.mark.parametrize(("k", "micro", "drop", "end"), SCENARIOS)
def test_a_switched_decode_donor_admits_imported_requests(
    tiny_llama, reference, prefilled, loop, k, micro, drop, end
):
    a, b = donor_engine(tiny_llama, drop), make_engine(tiny_llama, num_kv_blocks=128)
    a_blocks = a.block_manager.num_blocks
    pair = AgentPair(loop, a, b)
    d = Decode(pair, prefilled)
    for rid in ("r0", "r1"):
        d.begin(rid, range(NUM_LAYERS))
        d.finish(rid)
    d.steps(3)
    pair.prepare(k)
    pair.copy()
    d.begin("r2", range(2))  # layers [0, 2) land here; those >= k must follow the switch
    pair.switch(micro, drop)  # no RESOURCE_EXHAUSTED: r2 is still importing
    hosted = b.migration.hosted_layers[MIGRATION]
    assert hosted.num_tokens("r2") == 0  # layers 2, 3 not written yet...
    for layer in range(k, 2):  # ...but those >= k written before the switch moved to B
        data, layout = hosted.export_kv("r2", layer)
        assert layout.num_tokens == len(REQUESTS["r2"][0])
        assert torch.equal(data, prefilled["r2"][1][layer][0])
    d.write("r2", range(2, NUM_LAYERS))
    d.finish("r2")
    d.begin("r3", range(NUM_LAYERS))  # layers [k, L) go straight to B
    assert hosted.num_tokens("r3") == len(REQUESTS["r3"][0])
    d.finish("r3")
    assert a.placement.missing("r3") == dict.fromkeys(range(k, NUM_LAYERS), 0)
    d.steps(4)
    assert hosted.num_sequences == 4  # r0, r1 copied, r2, r3 imported
    d.begin("r4", range(2))
    requeued = end_migration(pair, end)
    d.write("r4", range(2, NUM_LAYERS))
    d.finish("r4")
    d.steps()
    b.step()
    pair.close()
    assert d.tokens == reference
    if end == "revert":  # every sequence's KV came back, the newcomers' too
        assert requeued == ()
    elif end == "helper gone":  # r0..r3 recompute at once, r4 when it joins
        assert requeued == ("r0", "r1", "r2", "r3")
    assert a.block_manager.num_blocks == a_blocks
    assert a.migration.stage_layout.ranges == ((0, NUM_LAYERS, False),)
    assert not b.migration.hosted_layers
    assert_no_leaks(a)
    assert_no_leaks(b)


def end_migration(pair: AgentPair, end: str) -> tuple[str, ...]:
    """Revert, abort, or abort after the helper dropped everything; the requeued ids."""
    if end == "revert":
        result = pair.loop.call(pair.donor.revert(MIGRATION))
        pair.release()
        return result.requeued
    if end == "helper gone":
        pair.loop.call(pair.helper.abort(MIGRATION, "test: the helper is gone"))
    record = pair.loop.call(pair.donor.abort(MIGRATION, "test"))
    assert record is not None
    pair.abort()
    return tuple(sorted(r for r in REQUESTS if not pair.a._seq(r).num_computed_tokens))


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {"BANASERVE_HOME": str(banaserve_home)}
    spec = ClusterSpec(num_kv_blocks=512, num_kvstore=0, kv_transport="tcp", extra_env=env)
    with running_cluster(spec, tmp_path_factory.mktemp("logs") / "cluster.log") as cluster:
        yield cluster


@pytest.mark.e2e
@pytest.mark.integration
def test_a_switched_decode_worker_admits_requests_across_processes(cluster, tiny_llama):
    """Router + prefill + decode processes: the decode worker's layers [2, 4) run on the
    prefill worker; requests routed to it meanwhile import their KV for [2, 4) there."""
    prompts = [prompt_ids(30 + 7 * i, 400 + i) for i in range(6)]
    sampling = params(40)
    expected = [c.token_ids for c in make_engine(tiny_llama).generate(prompts, sampling)]
    decode, prefill = cluster.child("decode-0").address, cluster.child("prefill-0").address
    mid, layers = "m-imports", pb.LayerRange(start=2, end=NUM_LAYERS)
    with (
        BanaServeClient(cluster.router.address) as client,
        ThreadPoolExecutor(3) as pool,
        grpc.insecure_channel(decode) as d_ch,
        grpc.insecure_channel(prefill) as p_ch,
    ):
        donor = migration_pb2_grpc.MigrationWorkerServiceStub(d_ch)
        helper = migration_pb2_grpc.MigrationWorkerServiceStub(p_ch)
        prepared = donor.Prepare(
            pb.MigrationWorkerServicePrepareRequest(
                migration_id=mid, role=pb.MIGRATION_ROLE_DONOR, layers=layers
            )
        )
        hp = helper.Prepare(
            pb.MigrationWorkerServicePrepareRequest(
                migration_id=mid,
                role=pb.MIGRATION_ROLE_HELPER,
                layers=layers,
                fingerprint=prepared.fingerprint,
                layer_digests=prepared.layer_digests,
                num_hosted_blocks=128,
            )
        )
        donor.CopyKV(
            pb.MigrationWorkerServiceCopyKVRequest(migration_id=mid, helper=hp.migration.helper)
        )
        donor.Switch(pb.MigrationWorkerServiceSwitchRequest(migration_id=mid, num_micro_batches=2))

        def complete(prompt):
            out = client.complete(
                prompt, temperature=0.0, max_tokens=40, ignore_eos=True, timeout_s=120
            )
            return list(out.token_ids)

        admitted = [pool.submit(complete, p) for p in prompts[:3]]  # KV [2, 4) to the helper
        wait_for(
            lambda: (
                helper.List(pb.MigrationWorkerServiceListRequest())
                .migrations[0]
                .num_hosted_sequences
                >= 1
            ),
            "an admitted request's layers [2, 4) on the helper",
        )
        tokens = [f.result() for f in admitted]
        later = [pool.submit(complete, p) for p in prompts[3:]]  # across the revert
        reverted = donor.Revert(pb.MigrationWorkerServiceRevertRequest(migration_id=mid))
        for stub in (donor, helper):
            stub.Release(pb.MigrationWorkerServiceReleaseRequest(migration_id=mid))
        tokens += [f.result() for f in later]
    assert tokens == expected
    assert reverted.num_requeued == 0
    wait_for(lambda: decode_stats(decode).kv.num_blocks_used == 0, "decode blocks freed")
    assert prefill_stats(prefill).kv.num_blocks_used == 0


def test_an_import_reusing_cached_blocks_across_a_switch_is_recomputed(
    tiny_llama, reference, prefilled, loop
):
    """An import that reuses A's cached blocks (a decode worker's reservation on a prefix it
    holds, ``reuse_cached``) began before the switch: its KV starts after those blocks, and a
    helper takes layers whole, so its layers [k, L) are lost and the sequence recomputes when it
    joins. Output unchanged, nothing held afterwards."""
    a, b = donor_engine(tiny_llama, False), make_engine(tiny_llama, num_kv_blocks=128)
    pair = AgentPair(loop, a, b)
    d = Decode(pair, prefilled)
    d.begin("r0", range(NUM_LAYERS))
    d.finish("r0")
    prompt = REQUESTS["r0"][0][:32] + prompt_ids(9, 6)  # r0's two full blocks, then its own
    p = make_engine(tiny_llama)
    p.add_request("r5", prompt, params(15))
    (first,) = p.step()
    want = reference_engine_tokens(tiny_llama, prompt, 15)
    assert a.begin_prompt_import("r5", prompt, params(15), reuse_cached=True) == 2
    write = lambda layers: [a.import_kv("r5", *p.export_kv("r5", i, 32)) for i in layers]  # noqa: E731
    write(range(2))
    pair.prepare(1)
    pair.copy()
    pair.switch(1, False)  # layer 1 was written here from block 2: it cannot move to B
    write(range(2, NUM_LAYERS))  # these run on B now: lost too
    d.tokens["r5"] = list(a.finish_prompt_import("r5", first.new_token_ids[0]).new_token_ids)
    assert "r5" not in [s.request_id for s in a.scheduler.running]  # sent to recompute
    d.steps(4)
    end_migration(pair, "revert")
    d.steps()
    b.step()
    pair.close()
    p.abort("r5")
    assert d.tokens["r5"] == want and d.tokens["r0"] == reference["r0"]
    assert_no_leaks(a)
    assert_no_leaks(b)


def reference_engine_tokens(model, prompt: list[int], max_tokens: int) -> list[int]:
    return make_engine(model).generate([prompt], params(max_tokens))[0].token_ids
