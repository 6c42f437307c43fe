"""KV memory from a budget: weights held + KV pools fit it, and the pool follows the layers."""

from __future__ import annotations

import os

import pytest
import torch

from services.common.errors import ConfigError, ResourceExhaustedError
from services.common.types import SamplingParams
from services.engine.local_ports import LocalStagePort
from services.engine.stages import StageLayout
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine

SLACK = 1000  # bytes the budget has beyond whole blocks: never spent


def param_bytes(module) -> int:
    """Weights as the test counts them: every parameter and buffer, tied ones once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layer_block_bytes(engine) -> int:
    # float32 K and V, block of 16 tokens, 2 KV heads of 64
    return 2 * 16 * 2 * 64 * 4


@pytest.fixture
def budgeted(tiny_llama):
    probe = make_engine(tiny_llama, num_kv_blocks=1)
    weights = param_bytes(probe.model)
    budget = weights + 40 * 4 * layer_block_bytes(probe) + SLACK
    engine = make_engine(
        tiny_llama, num_kv_blocks=None, memory_budget_bytes=budget, max_model_len=256
    )
    return engine, budget, weights


def switch_remote(engine, k, helper, num_blocks=64):
    hosted = helper.migration.host_layers("A", k, 4, num_blocks, engine.fingerprint)
    port = LocalStagePort(hosted, threaded=False)
    engine.migration.set_stages(StageLayout.split(4, k, port))
    return port


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropping_layers_grows_the_kept_pool_by_exactly_what_they_freed(tiny_llama, budgeted, k):
    engine, budget, weights = budgeted
    assert engine.block_manager.num_blocks == engine.kv_cache.num_blocks == 40
    dropped = sum(param_bytes(engine.model.layers[i]) for i in range(k, 4))
    helper = make_engine(tiny_llama, num_kv_blocks=64)
    port = switch_remote(engine, k, helper)
    engine.migration.drop_layers(k)
    grown = (budget - (weights - dropped)) // (k * layer_block_bytes(engine))
    assert engine.block_manager.num_blocks == engine.kv_cache.num_blocks == grown
    # the pool grew by what the dropped weights and the dropped layers' KV freed
    freed = dropped + 40 * (4 - k) * layer_block_bytes(engine)
    assert grown - 40 == (freed + SLACK) // (k * layer_block_bytes(engine))
    report = engine.snapshot.memory
    assert report.weight_bytes == weights - dropped
    assert 0 <= budget - report.used_bytes < k * layer_block_bytes(engine)
    assert engine.kv_cache.layers == range(k) and engine.snapshot.num_layers_held == k
    engine.migration.restore_layers()
    assert engine.block_manager.num_blocks == engine.kv_cache.num_blocks == 40
    assert engine.kv_cache.layers == range(4) and engine.snapshot.memory.weight_bytes == weights
    engine.migration.set_stages(StageLayout.local(4))
    helper.migration.release_hosted_layers("A")
    port.close()
    assert_no_leaks(engine)


def test_taking_layers_back_refuses_while_the_blocks_in_use_do_not_fit(tiny_llama, budgeted):
    engine, budget, weights = budgeted
    helper = make_engine(tiny_llama, num_kv_blocks=256)
    port = switch_remote(engine, 1, helper)
    engine.migration.drop_layers(1)
    grown = engine.block_manager.num_blocks
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for i in range(6):  # 6 x 8 blocks: more than the 40 all layers allow
        engine.add_request(f"r{i}", prompt_ids(120, i), params)
    engine.step()
    before = {s.request_id: engine.export_kv(s.request_id, 0)[0] for s in engine.scheduler.running}
    with pytest.raises(ResourceExhaustedError, match="48 KV blocks are in use; only 40 fit"):
        engine.migration.restore_layers()
    assert engine.block_manager.num_blocks == grown and engine.kv_cache.layers == range(1)
    engine.abort("r5")
    engine.migration.restore_layers()  # 40 blocks in use now: those above the cut move below it
    assert engine.block_manager.num_blocks == 40
    assert all(b < 40 for s in engine.scheduler.running for b in s.block_table)
    for seq in engine.scheduler.running:  # the KV of layer 0 moved with its blocks
        data, layout = engine.export_kv(seq.request_id, 0)
        assert layout.num_tokens == 120 and torch.equal(data, before[seq.request_id])
    engine.migration.set_stages(StageLayout.local(4))  # they lack layers [1, 4): recomputed
    while engine.has_unfinished_requests:
        engine.step()
    helper.migration.release_hosted_layers("A")
    port.close()
    assert_no_leaks(engine)


def test_hosting_a_layer_range_comes_out_of_the_own_pool_and_goes_back(tiny_llama, budgeted):
    engine, budget, weights = budgeted
    hosted = engine.migration.host_layers("X", 2, 4, 10, engine.fingerprint)
    # 10 blocks of 2 layers = 5 blocks of 4 layers (plus the slack)
    assert hosted.pool.nbytes == 10 * 2 * layer_block_bytes(engine)
    assert engine.block_manager.num_blocks == 35
    assert engine.snapshot.memory.hosted_bytes == hosted.pool.nbytes
    engine.migration.release_hosted_layers("X")
    assert engine.block_manager.num_blocks == 40
    with pytest.raises(ResourceExhaustedError, match="below the"):
        engine.migration.host_layers(
            "Y", 0, 4, 39, engine.fingerprint
        )  # the pool would hold < 1 context
    assert engine.block_manager.num_blocks == 40 and not engine.migration.hosted_layers


def test_without_a_budget_the_block_count_stays(tiny_llama):
    engine = make_engine(tiny_llama, num_kv_blocks=50)
    helper = make_engine(tiny_llama, num_kv_blocks=64)
    port = switch_remote(engine, 2, helper)
    engine.migration.drop_layers(2)
    assert engine.block_manager.num_blocks == 50 and engine.kv_cache.layers == range(2)
    engine.migration.restore_layers()
    assert engine.block_manager.num_blocks == 50 and engine.kv_cache.layers == range(4)
    port.close()


def test_a_budget_too_small_for_the_weights_is_a_config_error(tiny_llama):
    with pytest.raises(ConfigError, match="leaves no KV block"):
        make_engine(tiny_llama, num_kv_blocks=None, memory_budget_bytes=1 << 20)
    with pytest.raises(ConfigError, match="not both"):
        make_engine(tiny_llama, num_kv_blocks=8, memory_budget_bytes=1 << 30)


def test_a_pool_the_machine_cannot_hold_is_refused_before_it_is_allocated(tiny_llama, monkeypatch):
    """Session 38's probe: ``decode --num-kv-blocks 1000000000`` was torch's "you tried to
    allocate 8192000000000 bytes" RuntimeError traceback; a pool just over the machine's memory
    would have been allocated and the process OOM-killed once its pages were touched."""
    from services.engine import memory

    with pytest.raises(ConfigError, match=r"1,000,000,000 blocks .* needs 61,035\.16 GiB"):
        make_engine(tiny_llama, num_kv_blocks=10**9)
    monkeypatch.setattr(memory, "device_memory_bytes", lambda device: 64 << 20)  # 64 MiB
    with pytest.raises(ConfigError, match=r"needs 0\.06 GiB beside 0\.02 GiB of weights; cpu has"):
        make_engine(tiny_llama, num_kv_blocks=1024)  # 64 MiB of KV
    with pytest.raises(ConfigError, match="cpu has 0.06 GiB"):
        make_engine(tiny_llama, num_kv_blocks=None, memory_budget_bytes=1 << 30)
    assert make_engine(tiny_llama, num_kv_blocks=256).kv_cache  # 16 MiB fits


def test_the_cpu_limit_is_the_smaller_of_physical_memory_and_the_cgroups():
    from services.engine.memory import device_memory_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < device_memory_bytes("cpu") <= physical
