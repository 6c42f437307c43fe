"""A request resumed from the tokens it generated elsewhere (a lost worker) goes on exactly where
it stopped: the same next tokens (greedy and seeded), the same text, stop strings still held
back across the cut, ``max_tokens`` counted from the first token."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidRequestError, OutOfRangeError
from services.common.types import FinishReason, SamplingParams
from services.engine.outputs import ResumeComplete
from tests.engine.helpers import assert_no_leaks, make_engine

PROMPT = "Return the value of"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama)


@pytest.fixture(autouse=True)
def no_leaks_after(engine):
    yield
    assert_no_leaks(engine)


def run(engine, request_id, params, outputs=()):
    """Every output of one request, added with ``outputs`` already generated."""
    engine.add_request(request_id, PROMPT, params, output_token_ids=outputs)
    got = []
    while request_id in engine.requests.active:
        got += [o for o in engine.step() if o.request_id == request_id]
    return got


def tokens(outs):
    return [t for o in outs for t in o.new_token_ids]


def text(outs):
    return "".join(o.text_delta for o in outs)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
@pytest.mark.parametrize("cut", [1, 9, 23])
def test_a_resumed_request_continues_token_for_token(engine, params, cut):
    whole = run(engine, "whole", params)
    assert len(tokens(whole)) == 24
    before = whole[:cut]
    after = run(engine, "resumed", params, tokens(before))
    assert tokens(before) + tokens(after) == tokens(whole)
    assert text(before) + text(after) == text(whole)
    assert after[-1].finish_reason is FinishReason.LENGTH
    assert after[-1].num_prompt_tokens == whole[-1].num_prompt_tokens


def test_a_stop_string_spanning_the_cut_is_still_found(engine):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = run(engine, "ref", greedy)
    full = text(reference)
    stop = full[12:18]
    assert stop and full.find(stop) == 12
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,))
    whole = run(engine, "whole", params)
    assert text(whole) == full[:12] and whole[-1].finish_reason is FinishReason.STOP
    # Cut where the text emitted so far ends inside the stop string's possible start: the
    # held-back tail must not be emitted twice or lost.
    for cut in range(1, len(whole)):
        after = run(engine, f"r{cut}", params, tokens(whole[:cut]))
        assert text(whole[:cut]) + text(after) == text(whole), cut
        assert tokens(whole[:cut]) + tokens(after) == tokens(whole), cut


def test_tokens_that_end_the_request_already_are_a_complete_resume(engine):
    """The worker was lost after its last token, before it said it had finished: the resume
    adds nothing and says how the request ended (the decode worker then streams just that)."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    whole = run(engine, "whole", greedy)
    ids = tokens(whole)
    with pytest.raises(ResumeComplete) as done:
        engine.add_request("r", PROMPT, greedy, output_token_ids=ids)
    assert done.value.reason is FinishReason.LENGTH
    stop_id = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(ids[4],))
    with pytest.raises(ResumeComplete) as done:
        engine.add_request("r", PROMPT, stop_id, output_token_ids=ids[: ids.index(ids[4]) + 1])
    assert done.value.reason is FinishReason.STOP
    full = text(whole)
    stop = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=(full[6:9],))
    stopped = run(engine, "stopped", stop)
    assert stopped[-1].finish_reason is FinishReason.STOP and full.find(full[6:9]) == 6
    with pytest.raises(ResumeComplete) as done:
        engine.add_request("r", PROMPT, stop, output_token_ids=tokens(stopped))
    assert done.value.reason is FinishReason.STOP
    assert "r" not in engine.requests.active


@pytest.mark.parametrize(
    ("params", "outputs", "error", "match"),
    [
        (SamplingParams(temperature=0, max_tokens=3), [5, 6, 7, 8], InvalidRequestError,
         "past max_tokens 3"),
        (SamplingParams(temperature=0, max_tokens=9, stop_token_ids=(6,)), [5, 6, 7],
         InvalidRequestError, "token 1 .6. would have finished the request .stop., 1 tokens"),
        (SamplingParams(temperature=0, max_tokens=9), [5, 10**6], InvalidRequestError,
         "outside the vocabulary"),
        (SamplingParams(temperature=0, max_tokens=10**6), [5] * 5000, OutOfRangeError,
         "context is"),
    ],
    ids=["max-tokens", "stop-token", "vocab", "context"],
)  # fmt: skip
def test_a_resume_that_cannot_go_on_is_refused_before_any_work(
    engine, params, outputs, error, match
):
    with pytest.raises(error, match=match):
        engine.add_request("bad", PROMPT, params, output_token_ids=outputs)
    assert "bad" not in engine.requests.active
