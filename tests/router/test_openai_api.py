"""The OpenAI-compatible HTTP API over the real router driver, against fake workers
(grpc_fakes.py): response and chunk shapes byte for byte, usage, every error's status and body,
readiness, and cancellation of a request whose client goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
from contextlib import asynccontextmanager

import httpx2

from services.common.errors import InvalidRequestError
from services.common.limits import (
    MAX_STOP_STRING_BYTES,
    MAX_STOP_STRINGS,
    MIN_RECEIVE_BYTES,
    PromptLimits,
)
from services.common.types import SamplingParams
from services.router.openai_api import OpenAIApi, ServedModel
from services.router.openai_server import HttpServer
from tests.router.factories import NUM_BLOCKS, load
from tests.router.grpc_fakes import cluster

CREATED = 1_700_000_000
PROMPT = list(range(1, 21))
USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 4,
    "total_tokens": 24,
    "prompt_tokens_details": {"cached_tokens": 16},
}


def encode(text: str, rendered_chat: bool = False) -> list[int]:
    return [ord(c) for c in text]


def render_chat(messages: list[dict[str, str]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def encode_chat(messages: list[dict[str, str]]) -> list[int]:
    return encode(render_chat(messages), True)


MODEL = ServedModel("tiny", "/models/tiny", 64, encode, render_chat)
LIMITS = PromptLimits.for_context(64)


@asynccontextmanager
async def served(**kwargs):
    """(fake cluster, HTTP client of the API on it)."""
    async with cluster(**kwargs) as c:
        api = OpenAIApi(c.driver, MODEL, LIMITS, clock=lambda: float(CREATED))
        http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
        await http.start()
        try:
            async with httpx2.AsyncClient(base_url=f"http://{http.address}", timeout=10) as client:
                yield c, client
        finally:
            await http.stop()


def run(test, **kwargs):
    async def main():
        async with served(**kwargs) as (c, client):
            await test(c, client)

    asyncio.run(main())


def events(raw: str) -> list[dict | str]:
    """SSE events: each exactly ``data: ...\\n\\n``; JSON payloads decoded, ``[DONE]`` kept."""
    assert raw.endswith("\n\n")
    parts = raw.removesuffix("\n\n").split("\n\n")
    assert all(p.startswith("data: ") and "\n" not in p for p in parts), raw
    return [p[6:] if p == "data: [DONE]" else json.loads(p[6:]) for p in parts]


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 4} | fields


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} | fields


def test_completion_with_token_ids_relays_text_finish_reason_and_usage():
    async def test(c, client):
        r = await client.post("/v1/completions", json=completion())
        assert r.status_code == 200
        body = r.json()
        assert body.pop("id").startswith("cmpl-")
        assert body == {
            "object": "text_completion",
            "created": CREATED,
            "model": "tiny",
            "choices": [
                {"index": 0, "text": "<7><8><9><10>", "logprobs": None, "finish_reason": "length"}
            ],
            "usage": USAGE,
        }
        assert [call[0] for call in c.log.calls] == ["reserve", "prefill", "stream"]
        assert c.driver.num_running == 0

    run(test)


def test_text_prompt_is_tokenized_by_the_model_and_prompt_lists_of_one_are_unwrapped():
    async def test(c, client):
        for prompt in ("hello", ["hello"], [encode("hello")]):
            r = await client.post("/v1/completions", json=completion(prompt=prompt))
            assert r.json()["usage"]["prompt_tokens"] == 5

    run(test)


def test_completion_stream_is_one_data_event_per_token_then_finish_usage_and_done():
    async def test(c, client):
        body = completion(stream=True, stream_options={"include_usage": True})
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r.text)
        assert chunks[-1] == "[DONE]"
        request_id = chunks[0]["id"]
        assert request_id.startswith("cmpl-")
        head = {"id": request_id, "object": "text_completion", "created": CREATED, "model": "tiny"}
        choice = {"index": 0, "logprobs": None}
        assert chunks[:-1] == [
            *(
                head | {"choices": [choice | {"text": t, "finish_reason": None}], "usage": None}
                for t in ("<7>", "<8>", "<9>", "<10>")
            ),
            head | {"choices": [choice | {"text": "", "finish_reason": "length"}], "usage": None},
            head | {"choices": [], "usage": USAGE},
        ]

    run(test)


def test_a_stream_has_no_usage_unless_asked():
    async def test(c, client):
        r = await client.post("/v1/completions", json=completion(stream=True))
        chunks = events(r.text)
        assert len(chunks) == 6 and chunks[-1] == "[DONE]"
        assert all("usage" not in chunk and chunk["choices"] for chunk in chunks[:-1])

    run(test)


def test_chat_stream_carries_the_role_with_the_first_token_not_ahead_of_it():
    async def test(c, client):
        r = await client.post("/v1/chat/completions", json=chat(max_tokens=4, stream=True))
        chunks = events(r.text)
        assert chunks[0]["id"].startswith("chatcmpl-")
        assert {chunk["object"] for chunk in chunks[:-1]} == {"chat.completion.chunk"}
        assert [
            (ch["choices"][0]["delta"], ch["choices"][0]["finish_reason"]) for ch in chunks[:-1]
        ] == [
            ({"role": "assistant", "content": "<7>"}, None),
            ({"content": "<8>"}, None),
            ({"content": "<9>"}, None),
            ({"content": "<10>"}, None),
            ({}, "length"),
        ]

    run(test)


def test_chat_message_content_parts_are_joined_and_rendered_by_the_chat_template():
    async def test(c, client):
        messages = [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
        r = await client.post("/v1/chat/completions", json=chat(messages=messages, max_tokens=4))
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "<7><8><9><10>"},
                "logprobs": None,
                "finish_reason": "length",
            }
        ]
        expected = encode_chat(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
        )
        assert body["usage"]["prompt_tokens"] == len(expected) == 36

    run(test)


def test_return_token_ids_adds_the_token_ids_and_the_prompt_ids_once():
    async def test(c, client):
        r = await client.post(
            "/v1/completions", json=completion(stream=True, return_token_ids=True)
        )
        choices = [chunk["choices"][0] for chunk in events(r.text)[:-1]]
        assert [ch["token_ids"] for ch in choices] == [[7], [8], [9], [10], []]
        assert choices[0]["prompt_token_ids"] == PROMPT
        assert all("prompt_token_ids" not in ch for ch in choices[1:])

    run(test)


def test_models_health_and_readiness():
    async def test(c, client):
        card = {
            "id": "tiny",
            "object": "model",
            "created": CREATED,
            "owned_by": "banaserve",
            "root": "/models/tiny",
            "parent": None,
            "max_model_len": 64,
        }
        assert (await client.get("/v1/models")).json() == {"object": "list", "data": [card]}
        assert (await client.get("/v1/models/tiny")).json() == card
        r = await client.get("/health")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        r = await client.get("/ready")
        workers = {"prefill": 1, "decode": 1, "mixed": 0}
        assert (r.status_code, r.json()) == (200, {"status": "ready", "workers": workers})

    run(test)


def test_not_ready_without_a_decode_worker_and_requests_are_503():
    async def test(c, client):
        r = await client.get("/ready")
        workers = {"prefill": 1, "decode": 0, "mixed": 0}
        assert (r.status_code, r.json()) == (503, {"status": "not_ready", "workers": workers})
        r = await client.post("/v1/completions", json=completion())
        assert r.status_code == 503
        body = r.json()["error"]
        assert re.fullmatch(
            r"no healthy decode or mixed worker to decode request 'cmpl-[0-9a-f]{32}' "
            r"\(policy 'load'\)",
            body.pop("message"),
        )
        assert body == {"type": "service_unavailable_error", "param": None, "code": "unavailable"}

    run(test, decode=0)


def test_a_draining_decode_worker_does_not_count_as_ready():
    async def test(c, client):
        c.router.report("d0", load(draining=True), 2.0)  # newer than its first
        r = await client.get("/ready")
        workers = {"prefill": 1, "decode": 0, "mixed": 0}
        assert (r.status_code, r.json()) == (503, {"status": "not_ready", "workers": workers})

    run(test)


def error(message: str, type_: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None) -> dict:
    return error(message, "invalid_request_error", "invalid_argument", param)


def sampling_error(**params) -> str:
    try:
        SamplingParams(**params)
    except InvalidRequestError as exc:
        return str(exc)
    raise AssertionError(f"{params} are valid")


BAD_REQUESTS = [
    (completion(n=2), invalid("n=2 is not supported (accepted: null or 1)", "n")),
    (completion(max_tokens="4"), invalid("max_tokens: Input should be a valid integer", "max_tokens")),
    # Sampling values are checked where the gRPC path checks them, with the same message.
    (completion(max_tokens=0), invalid(sampling_error(max_tokens=0), "max_tokens")),
    # ... naming the field the request used (session 40's probe: the message said max_tokens)
    (completion(max_completion_tokens=0, max_tokens=4), invalid("max_completion_tokens must be > 0, got 0", "max_completion_tokens")),
    (completion(top_p=1.5), invalid(sampling_error(top_p=1.5), "top_p")),
    (completion(temperature=-1), invalid(sampling_error(temperature=-1.0), "temperature")),
    (completion(prompt=[]), invalid("prompt is empty", "prompt")),
    (completion(prompt=""), invalid("prompt is empty", "prompt")),
    (completion(prompt=["a", "b"]), invalid("one prompt per request (batches are not supported)", "prompt")),
    (completion(prompt=[1, -1]), invalid("prompt: token id -1 is not in [0, 2^32)", "prompt")),
    (completion(seed=1 << 64), invalid(f"seed must be < {1 << 64}, got {1 << 64}", "seed")),
    (completion(logprobs=1), invalid("logprobs=1 is not supported (accepted: null or false)", "logprobs")),
    (completion(echo=True), invalid("echo=true is not supported (accepted: null or false)", "echo")),
    (completion(presence_penalty=0.5), invalid("presence_penalty=0.5 is not supported (accepted: null or 0)", "presence_penalty")),
    (completion(stop=["x"] * 17), invalid(f"stop: 17 stop strings; at most {MAX_STOP_STRINGS}", "stop")),
    # Session 23's probe: checks shared with gRPC named no field, and a shape OpenAI refuses.
    (completion(stop=["x" * 257]), invalid(f"stop string 0 is longer than {MAX_STOP_STRING_BYTES} bytes", "stop")),
    (
        completion(stop_token_ids=[1] * 257),
        invalid("stop_token_ids: List should have at most 256 items after validation, not 257", "stop_token_ids"),
    ),
    (completion(model="m" * 257), invalid("model is longer than 256 bytes", "model")),
    (completion(max_completion_tokens=1 << 31), invalid(f"max_completion_tokens must be < {1 << 31}, got {1 << 31}", "max_completion_tokens")),
    (
        completion(max_tokens=45),
        invalid("the context holds 64 tokens; 20 in the prompt and max_tokens=45 ask for 65", "max_tokens"),
    ),
    (
        chat(messages=[{"role": "bogus", "content": "hi"}]),
        invalid("messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'", "messages.0.role"),
    ),
    (chat(messages=[{"role": "user"}]), invalid("messages.0.content is required for role 'user'", "messages.0.content")),
    (
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        invalid("messages.0.content.0: a text part needs its text", "messages.0.content.0"),
    ),
    (
        chat(messages=[{"role": "user", "content": "x"}] * 4097),
        invalid("messages: List should have at most 4096 items after validation, not 4097", "messages"),
    ),
    (chat(messages=[]), invalid("messages is empty", "messages")),
    (
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        invalid("messages.0.content.0: only text parts are supported, got type 'image_url'", "messages.0.content.0"),
    ),
    (chat(messages=[{"content": "hi"}]), invalid("messages.0.role: Field required", "messages.0.role")),
    # Session 20's probe: knobs that change what is generated were accepted and ignored.
    (completion(min_p=0.9), invalid("min_p=0.9 is not supported (accepted: null or 0)", "min_p")),
    (completion(typical_p=0.5), invalid("typical_p=0.5 is not supported (accepted: null or 1)", "typical_p")),
    (completion(guided_json={"type": "object"}), invalid('guided_json={"type": "object"} is not supported (accepted: null)', "guided_json")),
    (chat(tool_choice="required"), invalid('tool_choice="required" is not supported (accepted: null or "none" or "auto")', "tool_choice")),
    (completion(skip_special_tokens=False), invalid("skip_special_tokens=false is not supported (accepted: null or true)", "skip_special_tokens")),
    (
        chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]),
        invalid("messages.0.tool_calls: tool calls are not supported", "messages.0.tool_calls"),
    ),
    # Session 40's probe: more knobs accepted and ignored, on chat too (echo was refused only
    # on completions), and an empty stop string dropped where [""] was refused.
    (chat(echo=True), invalid("echo=true is not supported (accepted: null or false)", "echo")),
    (chat(add_generation_prompt=False), invalid("add_generation_prompt=false is not supported (accepted: null or true)", "add_generation_prompt")),
    (chat(continue_final_message=True), invalid("continue_final_message=true is not supported (accepted: null or false)", "continue_final_message")),
    (chat(chat_template="{{ 1/0 }}"), invalid('chat_template="{{ 1/0 }}" is not supported (accepted: null)', "chat_template")),
    (chat(chat_template_kwargs={"x": 1}), invalid('chat_template_kwargs={"x": 1} is not supported (accepted: null or {})', "chat_template_kwargs")),
    (chat(add_special_tokens=True), invalid("add_special_tokens=true is not supported (accepted: null or false)", "add_special_tokens")),
    (completion(add_special_tokens=False), invalid("add_special_tokens=false is not supported (accepted: null or true)", "add_special_tokens")),
    (completion(allowed_token_ids=[1, 2]), invalid("allowed_token_ids=[1, 2] is not supported (accepted: null)", "allowed_token_ids")),
    (completion(bad_words=["a"]), invalid('bad_words=["a"] is not supported (accepted: null or [])', "bad_words")),
    (completion(structured_outputs={"json": {}}), invalid('structured_outputs={"json": {}} is not supported (accepted: null)', "structured_outputs")),
    (completion(logits_processors=["x"]), invalid('logits_processors=["x"] is not supported (accepted: null or [])', "logits_processors")),
    (completion(return_tokens_as_token_ids=True), invalid("return_tokens_as_token_ids=true is not supported (accepted: null or false)", "return_tokens_as_token_ids")),
    (chat(modalities=["audio"]), invalid('modalities=["audio"] is not supported (accepted: null or ["text"])', "modalities")),
    (chat(prediction={"type": "content", "content": "x"}), invalid('prediction={"type": "content", "content": "x"} is not supported (accepted: null)', "prediction")),
    (chat(reasoning_effort="low"), invalid('reasoning_effort="low" is not supported (accepted: null)', "reasoning_effort")),
    (completion(stop=""), invalid(sampling_error(stop=("",)), "stop")),
    (completion(stop=[""]), invalid(sampling_error(stop=("",)), "stop")),
    # ... and a wrongly typed union field was named by the member pydantic tried last.
    (completion(prompt=5), invalid("prompt: Input should be a valid string", "prompt")),
    (completion(stop=5), invalid("stop: Input should be a valid string", "stop")),
]  # fmt: skip


def test_bad_requests_are_400_in_openai_shape_before_any_worker_call():
    async def test(c, client):
        for body, expected in BAD_REQUESTS:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            for stream in (False, True):
                r = await client.post(path, json=body | {"stream": stream})
                assert (r.status_code, r.json()) == (400, expected), (body, stream)
        assert c.log.calls == []

    run(test)


def test_a_body_not_declared_json_is_415_and_openai_shapes_it_refuses_are_400():
    # Session 23's probe: text/plain, form and multipart bodies were parsed as JSON (a web
    # page could post them through a visitor's browser without a preflight), gzip was ignored.
    async def test(c, client):
        body = json.dumps(completion()).encode()
        for headers in (
            {"Content-Type": "text/plain"},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "multipart/form-data; boundary=x"},
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ):
            r = await client.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 415, headers
            assert r.json()["error"]["type"] == "invalid_request_error"
        for headers in ({}, {"Content-Type": "application/json; charset=utf-8"}):
            r = await client.post("/v1/completions", content=body, headers=headers)
            assert r.status_code == 200, headers
        r = await client.post("/v1/completions", json=completion(stream_options={}))
        message = "stream_options is only allowed with stream"
        assert (r.status_code, r.json()) == (400, invalid(message, "stream_options"))
        # A chat of more messages than any context holds is refused whole (in the parser's
        # child: openai_parse.py), naming the field.
        many = chat(messages=[{"role": "system"}] * 200_000)
        calls = len(c.log.calls)
        r = await client.post("/v1/chat/completions", json=many)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "messages")
        assert len(c.log.calls) == calls
        # ``developer`` is rendered as ``system``; an assistant turn may have no content.
        messages = [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant"},
            {"role": "user", "content": "?"},
        ]
        r = await client.post(
            "/v1/chat/completions", json=chat(messages=messages, return_token_ids=True)
        )
        assert r.status_code == 200, r.json()
        rendered = [{"role": "system", "content": "be brief"}, messages[1]]
        rendered += [{"role": "assistant", "content": ""}, messages[3]]
        assert r.json()["choices"][0]["prompt_token_ids"] == encode_chat(rendered)

    run(test)


def test_malformed_json_a_bad_timeout_header_and_unknown_fields():
    async def test(c, client):
        r = await client.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith("the body is not valid JSON: ")
        r = await client.post(
            "/v1/completions", json=completion(), headers={"X-Request-Timeout": "-1"}
        )
        message = (
            "the x-request-timeout header must be a positive number of seconds up to 86400, "
            "got '-1'"
        )
        assert (r.status_code, r.json()) == (400, invalid(message))
        # Huge deadlines overflowed on the way to the workers (500, or an instant 504).
        # ... and what float() takes but is no decimal number (session 40's probe: "1_0")
        for huge in ("1e10", "1e300", "86401", "1_0", "inf", "nan", "0x10", "1.5s"):
            r = await client.post(
                "/v1/completions", json=completion(), headers={"X-Request-Timeout": huge}
            )
            assert r.status_code == 400 and "up to 86400" in r.json()["error"]["message"]
        for fine in ("86400", "2.5", ".5", "8.64e4"):
            r = await client.post(
                "/v1/completions", json=completion(), headers={"X-Request-Timeout": fine}
            )
            assert r.status_code == 200, fine
        r = await client.post("/v1/completions", content=b"[1, 2]")
        assert (r.status_code, r.json()) == (400, invalid("the body: Input should be an object"))
        extras = {"user": "u", "frequency_penalty": 0, "logit_bias": {}, "no_such_field": [1]}
        r = await client.post("/v1/completions", json=completion(**extras))
        assert r.status_code == 200

    run(test)


def test_unknown_model_is_404_and_unknown_paths_and_methods_keep_the_shape():
    async def test(c, client):
        message = "model 'gpt-4' is not served; this router serves 'tiny'"
        expected = error(message, "not_found_error", "model_not_found")
        r = await client.post("/v1/chat/completions", json=chat(model="gpt-4"))
        assert (r.status_code, r.json()) == (404, expected)
        r = await client.get("/v1/models/gpt-4")
        assert (r.status_code, r.json()) == (404, expected)
        r = await client.get("/v1/nothing")
        assert (r.status_code, r.json()) == (
            404,
            error("Not Found", "not_found_error", "not_found"),
        )
        r = await client.get("/v1/completions")
        assert r.status_code == 405
        assert r.json() == error("Method Not Allowed", "invalid_request_error", "unimplemented")
        # A trailing slash is no route either, not a redirect built from the Host header.
        r = await client.post(
            "/v1/completions/", json=completion(), headers={"Host": "evil.example"}
        )
        assert (r.status_code, r.json()) == (
            404,
            error("Not Found", "not_found_error", "not_found"),
        )
        r = await client.get("/v1/models/")  # no model named "" (session 40's probe)
        assert (r.status_code, r.json()) == (
            404,
            error("Not Found", "not_found_error", "not_found"),
        )

    run(test)


def test_a_request_larger_than_any_workers_context_is_400_before_any_worker_call():
    # A model whose own context is far larger: the workers' pools (NUM_BLOCKS blocks of 16,
    # no max_model_len declared) are the context, as OpenAI and vLLM refuse a prompt and
    # max_tokens past it (the gRPC path answers RESOURCE_EXHAUSTED from the router).
    async def main():
        async with cluster() as c:
            model = dataclasses.replace(MODEL, context_len=1 << 20)
            api = OpenAIApi(c.driver, model, PromptLimits.for_context(1 << 20))
            http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
            await http.start()
            try:
                async with httpx2.AsyncClient(base_url=f"http://{http.address}") as client:
                    body = completion(max_tokens=NUM_BLOCKS * 16)
                    r = await client.post("/v1/completions", json=body)
            finally:
                await http.stop()
            held = NUM_BLOCKS * 16
            message = f"the context holds {held} tokens; 20 in the prompt and max_tokens={held} ask for {held + 20}"
            assert (r.status_code, r.json()) == (400, invalid(message, "max_tokens"))
            assert c.log.calls == []

    asyncio.run(main())


async def stream_ended(c) -> None:
    """The decode worker's stream was cancelled (so it frees the request's blocks) and the
    driver holds nothing. Whether the router's Release call also lands is the driver's race
    (a deadline can cancel the release the failed stream started), not the HTTP layer's."""
    await asyncio.wait_for(c.log.stream_cancelled.wait(), 10)
    assert c.driver.num_running == 0


def test_deadline_from_the_timeout_header_is_504_and_releases_the_blocks():
    async def test(c, client):
        headers = {"X-Request-Timeout": "0.3"}
        r = await client.post("/v1/completions", json=completion(), headers=headers)
        assert r.status_code == 504
        body = r.json()["error"]
        assert (body["type"], body["code"]) == ("timeout_error", "deadline_exceeded")
        await stream_ended(c)

    run(test, hang_decode=True)


def test_a_deadline_after_the_first_token_ends_the_stream_with_an_error_event():
    async def test(c, client):
        headers = {"X-Request-Timeout": "2"}
        r = await client.post("/v1/completions", json=completion(stream=True), headers=headers)
        assert r.status_code == 200
        chunks = events(r.text)
        assert [ch["choices"][0]["text"] for ch in chunks[:2]] == ["<7>", "<8>"]
        assert chunks[2]["error"]["code"] == "deadline_exceeded"
        assert chunks[2]["error"]["type"] == "timeout_error"
        assert chunks[3:] == ["[DONE]"]
        await stream_ended(c)

    run(test, hang_decode=True)


async def _take(lines, n: int):
    async for line in lines:
        yield line
        n -= 1
        if n == 0:
            return


def test_a_streaming_client_that_disconnects_cancels_its_request():
    async def test(c, client):
        body = completion(stream=True)
        async with client.stream("POST", "/v1/completions", json=body) as r:
            # Two tokens: the first from the prefill worker, the second from the decode
            # worker's stream, which is then open.
            data = [line async for line in _take(r.aiter_lines(), 3)]
            assert [line[:6] for line in data] == ["data: ", "", "data: "]
            assert c.driver.num_running == 1
        # Closed mid-stream: the router cancels the request and releases its reservation.
        await asyncio.wait_for(c.log.released.wait(), 10)
        await asyncio.wait_for(c.log.stream_cancelled.wait(), 10)
        assert c.log.calls[-1] == ("release", "d0", c.log.calls[0][2], "RELEASE_REASON_ABORTED")
        assert c.driver.num_running == 0

    run(test, hang_decode=True)


def test_a_waiting_non_streaming_client_that_disconnects_cancels_its_request():
    async def test(c, client):
        host, port = str(client.base_url.host), client.base_url.port
        reader, writer = await asyncio.open_connection(host, port)
        body = json.dumps(completion()).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        while not any(call[0] == "stream" for call in c.log.calls):
            await asyncio.sleep(0.01)  # bounded by wait_for below; no event exists for it
        writer.close()
        await asyncio.wait_for(c.log.released.wait(), 10)
        assert c.log.calls[-1][-1] == "RELEASE_REASON_ABORTED"
        assert c.driver.num_running == 0

    async def bounded(c, client):
        await asyncio.wait_for(test(c, client), 30)

    run(bounded, hang_decode=True)


def out_of_range(message: str, param: str | None = None) -> dict:
    return error(message, "invalid_request_error", "out_of_range", param)


def test_prompts_over_the_shared_limits_are_400_out_of_range_and_large_bodies_413():
    async def test(c, client):
        # The context is 64 tokens (LIMITS, and the fake workers' pools are larger).
        too_long = "prompt has 64 tokens; at most 63 are accepted (a context of 64 tokens)"
        for body in (completion(prompt=[5] * 64), completion(prompt="x" * 64)):
            r = await client.post("/v1/completions", json=body)
            assert (r.status_code, r.json()) == (400, out_of_range(too_long, "prompt"))
        r = await client.post("/v1/completions", json=completion(prompt="x" * 63, max_tokens=1))
        assert r.status_code == 200
        chat_body = chat(messages=[{"role": "user", "content": "x" * 47}])
        r = await client.post("/v1/chat/completions", json=chat_body)  # 64 tokens rendered
        assert (r.status_code, r.json()) == (400, out_of_range(too_long, "messages"))
        text = "x" * (LIMITS.max_text_bytes + 1)
        r = await client.post("/v1/completions", json=completion(prompt=text))
        message = f"prompt text is over {LIMITS.max_text_bytes} bytes, the most accepted (for a context of 64 tokens)"
        assert (r.status_code, r.json()) == (400, out_of_range(message, "prompt"))
        r = await client.post("/v1/completions", content=b" " * (MIN_RECEIVE_BYTES + 1))
        message = f"the request body is over {MIN_RECEIVE_BYTES} bytes"
        expected = error(message, "invalid_request_error", "resource_exhausted")
        assert (r.status_code, r.json()) == (413, expected)
        assert [call[0] for call in c.log.calls] == ["reserve", "prefill", "stream"]

    run(test)


def test_connections_are_accepted_with_tcp_nodelay():
    """Without it a response's headers and body wait for the client's delayed ACK (~40 ms)."""

    async def main():
        async with cluster() as c:
            api = OpenAIApi(c.driver, MODEL, LIMITS)
            http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
            await http.start()
            try:
                async with httpx2.AsyncClient(base_url=f"http://{http.address}") as client:
                    assert (await client.get("/health")).status_code == 200
                    [sock] = http.connection_sockets()
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            finally:
                await http.stop()

    asyncio.run(main())


def test_token_ids_outside_the_models_vocabulary_are_400_before_any_worker_call():
    async def main():
        async with cluster() as c:
            model = dataclasses.replace(MODEL, vocab_size=100)
            api = OpenAIApi(c.driver, model, LIMITS)
            http = HttpServer(api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
            await http.start()
            try:
                async with httpx2.AsyncClient(base_url=f"http://{http.address}") as client:
                    r = await client.post("/v1/completions", json=completion(prompt=[5, 100]))
                    ok = await client.post("/v1/completions", json=completion(prompt=[5, 99]))
            finally:
                await http.stop()
            message = "prompt: token id 100 is outside the model's vocabulary [0, 100)"
            assert (r.status_code, r.json()) == (400, invalid(message, "prompt"))
            assert ok.status_code == 200
            assert [call[0] for call in c.log.calls] == ["reserve", "prefill", "stream"]

    asyncio.run(main())


async def raw_exchange(address: str, *parts: bytes, pause_s: float = 0.0) -> bytes:
    """Sends ``parts`` on one connection (``pause_s`` apart) and reads until it closes."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def test_headers_are_bounded_in_size_and_in_time_and_a_slow_body_is_not_cut_by_it():
    # Session 23's probe: a connection sending an endless header grew the router by 270 MB;
    # one that never finished its headers was held forever.
    async def main():
        async with cluster() as c:
            api = OpenAIApi(c.driver, MODEL, LIMITS)
            http = HttpServer(
                api.app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close, header_timeout_s=0.5
            )
            await http.start()
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            try:
                big = await raw_exchange(http.address, head + b"X-A: " + b"a" * (70 << 10))
                # Whole, in one piece (session 40's probe: served, as only headers still
                # incomplete after a read were counted), with a request pipelined behind.
                whole = await raw_exchange(
                    http.address,
                    head + b"X-A: " + b"a" * (70 << 10) + b"\r\n\r\n"
                    + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                )  # fmt: skip
                # Far over it, in one piece: the client is still sending when the answer goes;
                # the connection lingers until it is done (closed at once, it was reset).
                huge = await raw_exchange(http.address, head + b"X-A: " + b"a" * (20 << 20))
                t0 = asyncio.get_running_loop().time()
                late = await raw_exchange(http.address, head + b"X-A: b")
                waited = asyncio.get_running_loop().time() - t0
                silent = await raw_exchange(http.address)
                # Headers in time, the body over 1 s (twice the header timeout): served.
                body = json.dumps(completion(max_tokens=1)).encode()
                headers = head + b"Content-Length: %d\r\n\r\n" % len(body)
                slow = await raw_exchange(http.address, headers, body[:5], body[5:], pause_s=0.6)
                async with httpx2.AsyncClient(base_url=f"http://{http.address}") as client:
                    healthy = (await client.get("/health")).status_code
            finally:
                await http.stop()
            return big, whole, huge, late, waited, silent, slow, healthy

    big, whole, huge, late, waited, silent, slow, healthy = asyncio.run(main())
    assert big.startswith(b"HTTP/1.1 431 "), big[:80]
    assert whole.startswith(b"HTTP/1.1 431 ") and whole.count(b"HTTP/1.1") == 1, whole
    assert huge.startswith(b"HTTP/1.1 431 "), huge[:80]
    assert late.startswith(b"HTTP/1.1 408 ") and 0.4 < waited < 5, (late[:80], waited)
    assert silent.startswith(b"HTTP/1.1 408 ")
    assert slow.startswith(b"HTTP/1.1 200 "), slow[:200]
    assert healthy == 200


def test_a_stream_to_an_http_1_0_client_ends_at_the_close_not_in_chunks():
    # Session 40's probe: uvicorn framed it in chunks, which an HTTP/1.0 client does not decode
    # (RFC 9112 6.1); a response of known length keeps its Content-Length.
    async def test(c, client):
        address = f"{client.base_url.host}:{client.base_url.port}"
        for stream in (True, False):
            body = json.dumps(completion(stream=stream)).encode()
            reply = await raw_exchange(
                address,
                b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
            )
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            if stream:
                assert b"transfer-encoding" not in head.lower(), head
                *chunks, done = events(body.decode())
                assert done == "[DONE]"
                assert "".join(e["choices"][0]["text"] for e in chunks) == "<7><8><9><10>"
            else:
                assert b"content-length: %d" % len(body) in head.lower(), head
                assert json.loads(body)["choices"][0]["text"] == "<7><8><9><10>"

    run(test)
