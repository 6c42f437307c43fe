"""The router's check of a resend's tokens against the request's stop conditions
(services/engine/outputs.py ``check_resumable``, wired in services/router/__main__.py
``load_tokenizer``), on a real model's tokenizer and end-of-sequence id: a token before the
last that would have ended the request is refused, as the worker resuming it would refuse it;
a last one that ends it is not (the request is complete: ResumeComplete on the worker)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import InvalidRequestError
from services.common.types import SamplingParams
from services.router.__main__ import load_tokenizer
from services.router.prompts import PromptEncoder

PROMPT = [5, 6, 7, 8]
EOS = 1  # tiny-llama's config.json and tokenizer both name 1
# tiny-llama's tokenizer: 311 " of", 313 " to", 312 " p"


@pytest.fixture(scope="module")
def check(tiny_llama):
    _, resumable = load_tokenizer(tiny_llama)
    return resumable


@pytest.mark.parametrize(
    ("outputs", "params", "refused"),
    [
        ([311, 313, 312], SamplingParams(max_tokens=8), None),
        ([311, EOS, 312], SamplingParams(max_tokens=8), "token 1 (1) would have finished"),
        ([311, EOS, 312], SamplingParams(max_tokens=8, ignore_eos=True), None),
        ([311, 313, EOS], SamplingParams(max_tokens=8), None),  # the last may end it
        ([313, 311, 312], SamplingParams(max_tokens=8, stop_token_ids=(313,)), "token 0 (313)"),
        ([311, 313, 312], SamplingParams(max_tokens=8, stop=[" of to"]), "token 1 (313)"),
        ([311, 313, 312], SamplingParams(max_tokens=8, stop=[" p"]), None),  # completed by the last
        ([311, 313, 312], SamplingParams(max_tokens=2), "token 1 (313)"),  # max_tokens
    ],
)
def test_a_resends_tokens_are_checked_as_the_worker_would_resume_them(
    check, outputs, params, refused
):
    if refused is None:
        check(PROMPT, outputs, params, 64)
        return
    with pytest.raises(InvalidRequestError, match=refused.replace("(", r"\(").replace(")", r"\)")):
        check(PROMPT, outputs, params, 64)


def test_the_context_counts_as_the_worker_counts_it(check):
    params = SamplingParams(max_tokens=8)
    check(PROMPT, [311, 313], params, 6)  # prompt + 2 = the context: the last ends it
    with pytest.raises(InvalidRequestError, match="token 1"):
        check(PROMPT, [311, 313, 312], params, 6)


def test_the_prompt_encoder_runs_the_check_off_the_event_loop(tiny_llama):
    encode, resumable = load_tokenizer(tiny_llama)
    encoder = PromptEncoder(encode, resumable=resumable)

    async def main():
        await encoder.check_resume_stops(PROMPT, [311, 313], SamplingParams(max_tokens=8), None)
        with pytest.raises(InvalidRequestError, match="would have finished"):
            await encoder.check_resume_stops(PROMPT, [EOS, 313], SamplingParams(max_tokens=8), None)
        # Without a tokenizer (a token-ids-only router) the workers check, as before.
        await PromptEncoder(None).check_resume_stops(
            PROMPT, [EOS, 313], SamplingParams(max_tokens=8), None
        )

    asyncio.run(main())
