"""A port that fails mid-run: the step keeps nothing; then the engine runs the layers itself if it
still holds them, or fails exactly the requests the helper named; everyone else's output is
unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import pytest
import torch

from services.common.types import SamplingParams
from services.engine.ports import AttentionPort, PortError, StageFailedError, StagePort, StageWork
from services.engine.stages import StageLayout
from tests.engine.coordinator import OWNER, Migrations, owner_engine, prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine

PROMPTS = {"r0": prompt_ids(50, 31), "r1": prompt_ids(9, 32), "r2": prompt_ids(27, 33)}
PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def failed(error: Exception) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


class FailingStagePort(StagePort):
    """Passes work on until call ``fail_at``, which fails naming ``only`` (default: everyone)."""

    def __init__(self, inner: StagePort, fail_at: int, only: tuple[str, ...] = ()) -> None:
        self.inner, self.fail_at, self.only = inner, fail_at, only
        self.calls = 0

    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        self.calls += 1
        if self.calls == self.fail_at:
            return failed(PortError(self.only or work.request_ids, "injected failure"))
        return self.inner.submit(work)

    def release(self, request_ids: Sequence[str]) -> None:
        self.inner.release(request_ids)

    def close(self) -> None:
        self.inner.close()


class FailingAttentionPort(AttentionPort):
    def __init__(self, inner: AttentionPort, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def submit(self, layer, queries):
        self.calls += 1
        if self.calls == self.fail_at:  # a connection lost, not a PortError: every query fails
            return failed(ConnectionError("helper went away"))
        return self.inner.submit(layer, queries)

    def release(self, request_ids):
        self.inner.release(request_ids)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def reference(tiny_llama) -> dict[str, list[int]]:
    engine = make_engine(tiny_llama)
    return {r: engine.generate([p], PARAMS)[0].token_ids for r, p in PROMPTS.items()}


def start(engine, steps: int) -> dict[str, list[int]]:
    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, PARAMS)
    tokens: dict[str, list[int]] = {r: [] for r in PROMPTS}
    for _ in range(steps):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def run_to_end(engine, tokens: dict[str, list[int]]) -> None:
    while engine.has_unfinished_requests:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids


def test_failed_stage_with_layers_held_runs_them_here_and_output_is_unchanged(
    tiny_llama, reference
):
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=64)
    tokens = start(a, 3)
    m = Migrations(a, b)
    m.copy_layers(2)
    m.switch_layers()
    port = FailingStagePort(m.port, fail_at=4)
    m.port = port
    a.migration.set_stages(StageLayout.split(4, 2, port))
    for _ in range(3):  # three remote steps, then the fourth fails
        for out in a.step():
            tokens[out.request_id] += out.new_token_ids
    assert a.step() == []  # the failed step kept nothing ...
    assert a.migration.stage_layout.ranges == (
        (0, 2, False),
        (2, 4, False),
    )  # ... and runs [2, 4) here
    assert a.snapshot.num_failed_steps == 1
    assert sorted(s.request_id for s in a.scheduler.waiting) == ["r0", "r1", "r2"]  # recompute
    run_to_end(a, tokens)
    assert tokens == reference
    b.migration.release_hosted_layers(OWNER)
    port.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_failed_stage_without_the_layers_fails_exactly_the_named_request(tiny_llama, reference):
    a, b = owner_engine(tiny_llama, drop=True), make_engine(tiny_llama, num_kv_blocks=64)
    tokens = start(a, 3)
    m = Migrations(a, b, drop=True)
    m.copy_layers(1)
    m.switch_layers()  # and drops layers [1, 4) from A
    port = FailingStagePort(m.port, fail_at=2, only=("r1",))
    a.migration.set_stages(StageLayout.split(4, 1, port))
    for out in a.step():
        tokens[out.request_id] += out.new_token_ids
    with pytest.raises(StageFailedError, match="injected failure") as error:
        a.step()
    assert error.value.request_ids == ("r1",)
    assert (
        "r1" not in a.requests.active and a.migration.stage_layout.remote
    )  # the others stay remote
    run_to_end(a, tokens)
    assert tokens["r1"] == reference["r1"][: len(tokens["r1"])] and len(tokens["r1"]) < 20
    assert {r: tokens[r] for r in ("r0", "r2")} == {r: reference[r] for r in ("r0", "r2")}
    m.port = port
    assert m.revert_layers()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_failed_attention_port_sends_its_located_sequence_back_to_recompute(tiny_llama, reference):
    a, b = make_engine(tiny_llama, num_kv_blocks=64), make_engine(tiny_llama, num_kv_blocks=64)
    tokens = start(a, 3)
    m = Migrations(a, b)
    m.attention = FailingAttentionPort(m.attention, fail_at=6)  # layer 1 of the second step
    m.offload("r0", 3)
    assert a.snapshot.num_located_seqs == 1 and a.snapshot.num_remote_blocks == 3
    for out in a.step():
        tokens[out.request_id] += out.new_token_ids
    assert a.step() == [] and a.snapshot.num_failed_steps == 1
    assert [s.request_id for s in a.scheduler.waiting] == ["r0"] and not a.placement.located
    run_to_end(a, tokens)
    assert tokens == reference
    b.step()  # B frees the blocks A released
    assert b.migration.hosted_blocks.num_blocks == 0
    assert_no_leaks(a)
    assert_no_leaks(b)
