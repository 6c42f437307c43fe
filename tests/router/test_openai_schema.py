"""OpenAI request fields → the driver's types (pure: no server)."""

from __future__ import annotations

import json

import pytest

from services.common.errors import OutOfRangeError
from services.common.types import SamplingParams
from services.router.openai_schema import (
    ChatRequest,
    CompletionRequest,
    InvalidFieldError,
    Kind,
    parse,
    sampling_params,
)


def completion(**fields) -> CompletionRequest:
    return parse(CompletionRequest, json.dumps({"prompt": [1, 2]} | fields).encode())


def chat(**fields) -> ChatRequest:
    messages = [{"role": "user", "content": "hi"}]
    return parse(ChatRequest, json.dumps({"messages": messages} | fields).encode())


def test_defaults_are_openai_s():
    assert sampling_params(completion(), 2, 64, Kind.COMPLETION) == SamplingParams(max_tokens=16)
    # A chat without max_tokens may use the rest of the context.
    assert sampling_params(chat(), 10, 64, Kind.CHAT) == SamplingParams(max_tokens=54)
    with pytest.raises(OutOfRangeError, match="the prompt has 64 tokens; the context holds 64"):
        sampling_params(chat(), 64, 64, Kind.CHAT)


def test_every_sampling_field_maps_to_its_sampling_param():
    request = completion(
        max_tokens=5,
        temperature=0,
        top_p=0.5,
        top_k=3,
        seed=7,
        stop="\n",
        stop_token_ids=[2],
        ignore_eos=True,
    )
    assert sampling_params(request, 2, 64, Kind.COMPLETION) == SamplingParams(
        temperature=0.0,
        top_k=3,
        top_p=0.5,
        seed=7,
        max_tokens=5,
        stop_token_ids=(2,),
        stop=("\n",),
        ignore_eos=True,
    )


def test_max_completion_tokens_wins_and_top_k_minus_one_means_no_cut():
    request = chat(max_tokens=5, max_completion_tokens=9, top_k=-1, stop=["a", "b"])
    params = sampling_params(request, 2, 64, Kind.CHAT)
    assert (params.max_tokens, params.top_k, params.stop) == (9, 0, ("a", "b"))


@pytest.mark.parametrize(
    "fields",
    [{"n": 1}, {"logprobs": False}, {"frequency_penalty": 0.0}, {"repetition_penalty": 1.0},
     {"response_format": {"type": "text"}}, {"logit_bias": {}}, {"user": "u", "anything": 1}],
)  # fmt: skip
def test_no_op_values_of_unsupported_fields_are_accepted(fields):
    completion(**fields)


@pytest.mark.parametrize(
    "fields",
    [{"echo": False}, {"add_generation_prompt": True}, {"continue_final_message": False},
     {"chat_template_kwargs": {}}, {"add_special_tokens": False}, {"modalities": ["text"]},
     {"bad_words": []}, {"best_of": 1}],
)  # fmt: skip
def test_a_chat_takes_the_no_op_values_of_its_own_fields(fields):
    chat(**fields)


def test_null_flags_are_their_default():
    # OpenAI types them "boolean or null" (session 40's probe: "stream": null was a 400)
    request = completion(stream=None, ignore_eos=None, return_token_ids=None)
    assert (request.stream, request.ignore_eos, request.return_token_ids) == (False, False, False)
    request = chat(stream=True, stream_options={"include_usage": None})
    assert request.stream_options is not None and request.stream_options.include_usage is False
    with pytest.raises(InvalidFieldError, match="stream: Input should be a valid boolean"):
        completion(stream=1)  # strict still: only true, false and null


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"n": True}, "n"), ({"logprobs": 0}, "logprobs"), ({"best_of": 2}, "best_of"),
     ({"response_format": {"type": "json_object"}}, "response_format"), ({"min_tokens": 3}, "min_tokens")],
)  # fmt: skip
def test_values_that_would_change_the_output_are_refused_not_ignored(fields, param):
    # JSON's types stay apart: true is not 1, 0 is not false.
    with pytest.raises(InvalidFieldError) as info:
        completion(**fields)
    assert info.value.param == param
