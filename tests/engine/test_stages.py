"""Staged steps: the layout's shape rules, what a remote stage is sent, two micro-batches, and a
fully local step that is exactly the unstaged one."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import pytest
import torch

from services.common.errors import InvalidRequestError, ResourceExhaustedError
from services.common.types import SamplingParams
from services.engine.local_ports import LocalStagePort
from services.engine.ports import StagePort, StageSeq, StageWork
from services.engine.scheduler import ScheduledBatch
from services.engine.stages import MAX_MICRO_BATCHES, Stage, StageLayout
from tests.engine.coordinator import prompt_ids
from tests.engine.helpers import assert_no_leaks, make_engine

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


class RecordingPort(StagePort):
    """Passes work on and keeps (layers, sequences) of each call, in order."""

    def __init__(self, inner: StagePort) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, tuple[StageSeq, ...]]] = []
        self.released: list[str] = []

    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        self.calls.append((work.start_layer, work.end_layer, work.seqs))
        return self.inner.submit(work)

    def release(self, request_ids: Sequence[str]) -> None:
        self.released += request_ids
        self.inner.release(request_ids)

    def close(self) -> None:
        self.inner.close()


def test_layouts_must_cut_every_layer_into_contiguous_ranges():
    port = RecordingPort(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="contiguous"):
        StageLayout((Stage(0, 2), Stage(3, 4, port)))
    with pytest.raises(InvalidRequestError, match="non-empty"):
        StageLayout((Stage(1, 4),))
    with pytest.raises(InvalidRequestError, match="num_micro_batches"):
        StageLayout.split(4, 2, port, num_micro_batches=MAX_MICRO_BATCHES + 1)
    layout = StageLayout.split(4, 3, port)
    assert layout.ranges == ((0, 3, False), (3, 4, True)) and layout.remote_layers == (3,)
    assert layout.without(port).ranges == ((0, 3, False), (3, 4, False))


def test_a_local_step_runs_the_model_in_one_call(tiny_llama, monkeypatch):
    engine = make_engine(tiny_llama)
    calls = []
    forward_layers = engine.model.forward_layers
    monkeypatch.setattr(
        engine.model,
        "forward_layers",
        lambda *a, **kw: calls.append(a[4:6]) or forward_layers(*a, **kw),
    )
    engine.generate([prompt_ids(20, 1), prompt_ids(5, 2)], PARAMS)
    assert calls == [()] * 6  # one forward over every layer per step, as before stages
    assert engine.snapshot.num_steps == 6 and engine.snapshot.stages == ((0, 4, False),)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_a_remote_stage_gets_each_sequences_rows_and_two_micro_batches_split_them(
    tiny_llama, micro
):
    # (two step streams instead, the default: tests/engine/test_pipeline.py)
    a, b = make_engine(tiny_llama, pipelined_steps=False), make_engine(tiny_llama)
    hosted = b.migration.host_layers("A", 2, 4, 32, a.fingerprint)
    port = RecordingPort(LocalStagePort(hosted))
    a.migration.set_stages(StageLayout.split(4, 2, port, num_micro_batches=micro))
    lengths = {"w": 30, "x": 4, "y": 9, "z": 17}
    for rid, n in lengths.items():
        a.add_request(rid, prompt_ids(n, n), PARAMS)
    a.step()  # prefill: 60 tokens
    a.step()  # four decodes
    prefill = tuple(StageSeq(r, 0, n) for r, n in lengths.items())
    decode = tuple(StageSeq(r, n, 1) for r, n in lengths.items())
    if micro == 1:
        assert port.calls == [(2, 4, prefill), (2, 4, decode)]
    elif micro == 4:  # one sequence each (four sequences), in order
        assert port.calls == [(2, 4, (s,)) for s in prefill] + [(2, 4, (s,)) for s in decode]
    else:  # halves of about equal tokens: 30 | 30, then 2 | 2 decodes
        assert port.calls == [
            (2, 4, prefill[:1]),
            (2, 4, prefill[1:]),
            (2, 4, decode[:2]),
            (2, 4, decode[2:]),
        ]
    assert hosted.num_sequences == 4
    while a.has_unfinished_requests:
        a.step()
    assert sorted(port.released) == ["w", "x", "y", "z"] and hosted.num_sequences == 0
    a.migration.set_stages(StageLayout.local(4))  # they are gone: nobody misses a layer
    b.migration.release_hosted_layers("A")
    port.close()
    assert_no_leaks(a)
    assert_no_leaks(b)


def test_located_blocks_and_remote_stages_exclude_each_other(tiny_llama):
    a, b = make_engine(tiny_llama), make_engine(tiny_llama)
    hosted = b.migration.host_layers("A", 2, 4, 32, a.fingerprint)
    port = LocalStagePort(hosted, threaded=False)
    a.add_request("s", prompt_ids(40, 3), PARAMS)
    a.step()
    a.migration.set_stages(StageLayout.split(4, 2, port))
    with pytest.raises(InvalidRequestError, match="a stage is remote"):
        a.migration.offload_blocks("s", 1, object())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="still run here"):
        a.migration.drop_layers(1)  # layer 1 runs here
    # Imported KV may join (its layers [2, 4) go to the helper: tests/migration/
    # test_switched_imports.py); a fetched prefix may not (the prefill worker computes it)
    a.begin_prompt_import("i", prompt_ids(20, 4), PARAMS)
    a.abort("i")
    with pytest.raises(ResourceExhaustedError, match="a fetched prefix cannot join"):
        a.add_request_with_prefix("p", prompt_ids(40, 5), PARAMS, 32)
    a.abort("s")
    a.migration.set_stages(StageLayout.local(4))
    b.migration.release_hosted_layers("A")
    assert_no_leaks(a)


def test_switching_back_recomputes_exactly_the_sequences_whose_kv_was_not_restored(tiny_llama):
    reference = make_engine(tiny_llama).generate([prompt_ids(40, 6), prompt_ids(23, 7)], PARAMS)
    a, b = make_engine(tiny_llama), make_engine(tiny_llama)
    a.add_request("r0", prompt_ids(40, 6), PARAMS)
    a.add_request("r1", prompt_ids(23, 7), PARAMS)
    tokens = {r: o.new_token_ids for o in a.step() for r in [o.request_id]}
    hosted = b.migration.host_layers("A", 2, 4, 32, a.fingerprint)
    for rid in ("r0", "r1"):
        for layer in (2, 3):
            hosted.import_kv(rid, *a.export_kv(rid, layer))
    port = LocalStagePort(hosted, threaded=False)
    a.migration.set_stages(StageLayout.split(4, 2, port))
    for _ in range(2):
        for out in a.step():
            tokens[out.request_id] += out.new_token_ids
    # A holds layers 2 and 3 of both up to the switch (40 and 23 tokens), not the two after
    assert a.placement.missing("r0") == {2: 40, 3: 40} and a.placement.missing("r1") == {
        2: 23,
        3: 23,
    }
    for layer in (2, 3):  # the delta since the switch comes back for r0 only
        data, layout = hosted.export_kv("r0", layer, 40, 42)
        assert (layout.first_block, layout.num_blocks) == (2, 1)
        a.migration.restore_kv("r0", data, layout)
    assert a.placement.missing("r0") == {}
    assert a.migration.set_stages(StageLayout.local(4)) == ["r1"]
    while a.has_unfinished_requests:
        for out in a.step():
            tokens[out.request_id] += out.new_token_ids
    assert [tokens["r0"], tokens["r1"]] == [c.token_ids for c in reference]
    b.migration.release_hosted_layers("A")
    assert_no_leaks(a)
    assert_no_leaks(b)


@pytest.mark.parametrize(
    ("tokens", "parts", "cut"),
    [
        ([30, 4, 9, 17], 2, [[30], [4, 9, 17]]),
        ([5, 5, 5, 100], 2, [[5, 5, 5], [100]]),  # the last alone is over half: still two
        ([100, 100, 100, 100, 100, 100], 4, [[100, 100], [100], [100, 100], [100]]),
        ([512, 512, 512, 512, 512, 512, 512, 512], 4, [[512, 512]] * 4),
        ([7, 8], 4, [[7], [8]]),  # fewer sequences than parts
        ([40], 4, [[40]]),
        ([1000, 10, 10, 10, 10], 3, [[1000], [10], [10, 10, 10]]),  # greedy: shares reached
    ],
)
def test_a_batch_is_cut_into_runs_of_whole_sequences_of_about_equal_tokens(tokens, parts, cut):
    seqs = [object() for _ in tokens]
    runs = ScheduledBatch(seqs, tokens).split(parts)  # type: ignore[arg-type]
    assert [r.num_new_tokens for r in runs] == cut
    assert [s for r in runs for s in r.seqs] == seqs


@pytest.mark.parametrize("micro", [0, MAX_MICRO_BATCHES + 1])
def test_a_layout_refuses_micro_batches_out_of_range(micro):
    with pytest.raises(InvalidRequestError, match="num_micro_batches must be in"):
        StageLayout(StageLayout.local(4).stages, micro)
