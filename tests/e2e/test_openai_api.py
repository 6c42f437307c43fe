"""End to end, real processes: the official ``openai`` client against the router's HTTP API, on
a cluster of router + 1 prefill + 1 decode worker (tiny-llama).

Greedy outputs equal the in-process engine's, text and tokens; usage counts are exact; every
error comes with its status and OpenAI's body; a client that goes away frees every KV block.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import httpx2
import openai
import pytest

from services.child_process import Child
from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.launcher import ClusterSpec, LocalCluster
from tests.e2e.test_cluster import decode_stats, prompt_ids, wait_idle
from tests.e2e.test_up import start_up
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
PROMPTS = ["Hello", "The quick brown fox", "def main():"]
MAX_TOKENS = 12
GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {"BANASERVE_HOME": str(banaserve_home)}
    with open(tmp_path_factory.mktemp("logs") / "cluster.log", "w") as log:
        spec = ClusterSpec(num_kv_blocks=512, num_kvstore=0, extra_env=env)
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            yield {
                "router": cluster.router,
                "prefill": cluster.child("prefill-0"),
                "decode": cluster.child("decode-0"),
                "http": cluster.router.http_address,
            }
        finally:
            codes = cluster.stop()
    assert set(codes.values()) == {0}, f"services exited with {codes}"


def client(cluster, **options) -> openai.OpenAI:
    base_url = f"http://{cluster['http']}/v1"
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, **options)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def plain_usage(u) -> dict:
    details = {"cached_tokens": u.prompt_tokens_details.cached_tokens}
    return u.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) | {
        "prompt_tokens_details": details
    }


def test_greedy_completions_and_chats_equal_the_in_process_engine(cluster, tiny_llama):
    """Each prompt as a completion and as a chat, not streamed then streamed; the engine serves
    the same requests in the same order, so its prefix-cache hits are the cluster's."""
    engine = make_engine(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    api = client(cluster)
    for chat in (False, True):
        for prompt in PROMPTS:
            num_prompt = len(engine.encode(prompt, chat))
            for stream in (False, True):
                [want] = engine.generate([prompt], params, chat=chat)
                text, token_ids, got = generate(api, prompt, chat, stream)
                assert (text, token_ids) == (want.text, want.token_ids), (prompt, chat, stream)
                assert got == usage(num_prompt, MAX_TOKENS, want.num_cached_tokens)
    wait_idle(cluster)


def generate(api: openai.OpenAI, prompt: str, chat: bool, stream: bool) -> tuple[str, list, dict]:
    """(text, token ids, usage) of one greedy request, streamed or not."""
    options = {"model": MODEL, "stream": stream, "extra_body": EXTRA, **GREEDY}
    if stream:
        options["stream_options"] = {"include_usage": True}
    if chat:
        # Content as a list of text parts: the same prompt as the plain string.
        content = [{"type": "text", "text": prompt}]
        response = api.chat.completions.create(
            messages=[{"role": "user", "content": content}], **options
        )
    else:
        response = api.completions.create(prompt=prompt, **options)
    if not stream:
        choice = response.choices[0]
        assert choice.finish_reason == "length"
        text = choice.message.content if chat else choice.text
        return text, choice.model_extra["token_ids"], plain_usage(response.usage)
    text, token_ids, last = [], [], None
    for chunk in response:
        for choice in chunk.choices:
            text.append((choice.delta.content or "") if chat else choice.text)
            token_ids += choice.model_extra["token_ids"]
            last = choice.finish_reason or last
        if chunk.usage is not None:
            assert chunk.choices == []  # the usage chunk comes alone, after the last token
            got = plain_usage(chunk.usage)
    assert last == "length"
    return "".join(text), token_ids, got


def test_cached_tokens_are_the_engine_s_prefix_cache_hits(cluster, tiny_llama):
    ids = prompt_ids(127, 11)
    engine = make_engine(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first, second = (engine.generate([ids], params)[0] for _ in range(2))
    api = client(cluster)
    for want in (first, second):
        r = api.completions.create(
            model=MODEL, prompt=ids, max_tokens=4, temperature=0, extra_body=EXTRA
        )
        assert plain_usage(r.usage) == usage(127, 4, want.num_cached_tokens)
        assert r.choices[0].model_extra["token_ids"] == want.token_ids
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 112)


def test_models_health_and_readiness(cluster):
    api = client(cluster)
    [model] = api.models.list().data
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "banaserve")
    assert model.root.endswith("/models/tiny-llama") and model.created > 0
    base = f"http://{cluster['http']}"
    assert httpx2.get(f"{base}/health").json() == {"status": "ok"}
    ready = httpx2.get(f"{base}/ready")
    workers = {"prefill": 1, "decode": 1, "mixed": 0}
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "workers": workers})


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_each_error_has_its_status_and_openai_body(cluster):
    api = client(cluster)
    e = error_of(lambda: api.completions.create(model=MODEL, prompt="hi", n=2))
    assert (type(e), e.status_code) == (openai.BadRequestError, 400)
    assert e.body == {
        "message": "n=2 is not supported (accepted: null or 1)",
        "type": "invalid_request_error",
        "param": "n",
        "code": "invalid_argument",
    }
    e = error_of(
        lambda: api.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}]
        )
    )
    assert (type(e), e.status_code) == (openai.NotFoundError, 404)
    assert e.body == {
        "message": "model 'gpt-4' is not served; this router serves 'tiny-llama'",
        "type": "not_found_error",
        "param": None,
        "code": "model_not_found",
    }
    headers = {"X-Request-Timeout": "0.5"}
    long = {"model": MODEL, "prompt": "hi", "max_tokens": 2000, "extra_body": {"ignore_eos": True}}
    e = error_of(lambda: api.completions.create(extra_headers=headers, **long))
    assert (type(e), e.status_code) == (openai.InternalServerError, 504)
    assert (e.body["type"], e.body["code"]) == ("timeout_error", "deadline_exceeded")
    assert re.fullmatch(r"request 'cmpl-\w+' ran past its deadline", e.body["message"])
    wait_idle(cluster)
    assert (
        api.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    )
    wait_idle(cluster)


def test_a_router_without_workers_is_not_ready_and_answers_503(
    banaserve_home, tiny_llama, tmp_path
):
    env = {**os.environ, "BANASERVE_HOME": str(banaserve_home)}
    argv = [sys.executable, "-m", "services.router", "--port", "0", "--model", MODEL]
    argv += ["--no-worker-wait-s", "0"]  # fail at once: this test is about the error's shape
    with open(tmp_path / "router.log", "w") as log:
        router = Child("router", argv, env, log)
        try:
            router.wait_ready(time.monotonic() + 60)
            api = client({"http": router.http_address})
            ready = httpx2.get(f"http://{router.http_address}/ready")
            workers = {"prefill": 0, "decode": 0, "mixed": 0}
            assert (ready.status_code, ready.json()) == (
                503,
                {"status": "not_ready", "workers": workers},
            )
            e = error_of(lambda: api.completions.create(model=MODEL, prompt="hi", stream=True))
            assert (type(e), e.status_code) == (openai.InternalServerError, 503)
            assert (e.body["type"], e.body["code"]) == ("service_unavailable_error", "unavailable")
            assert re.fullmatch(
                r"no healthy worker is registered to serve request 'cmpl-\w+'", e.body["message"]
            )
        finally:
            assert router.stop() == 0


def test_a_client_that_disconnects_frees_every_block(cluster):
    api = client(cluster)
    long = {"model": MODEL, "prompt": prompt_ids(60, 1), "max_tokens": 1900}
    stream = api.completions.create(stream=True, extra_body={"ignore_eos": True}, **long)
    for i, _ in enumerate(stream):
        if i == 3:
            assert decode_stats(cluster["decode"].address).num_running_seqs == 1
            break
    stream.close()  # mid-stream: the connection goes, the request must go with it
    wait_idle(cluster)
    # A client that gives up on a non-streaming request (its own timeout) frees it too.
    with pytest.raises(openai.APITimeoutError):
        client(cluster, timeout=1.0).completions.create(extra_body={"ignore_eos": True}, **long)
    wait_idle(cluster)


def test_bench_serve_runs_against_the_openai_api(cluster, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", "serve",
         "--target", f"openai://{cluster['http']}", "--model", MODEL,
         "--workload", "sharegpt-like", "--num-requests", "6", "--rate", "inf",
         "--max-model-len", "256", "--output-len", "8", "--out", str(tmp_path),
         "--no-progress", "--vocab-range", "5:4000", "--timeout", "60"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["summary"]["num_ok"] == 6
    # EOS ignored: every request streamed exactly the tokens it asked for.
    assert [r["num_output_tokens"] for r in report["requests"]] == [
        r["max_tokens"] for r in report["requests"]
    ]
    wait_idle(cluster)


def test_banaserve_up_prints_the_api_url_and_serves_it(banaserve_home, tiny_llama):
    proc, lines = start_up(banaserve_home, "--kvstore", "0")
    try:
        [url] = [line.split()[1] for line in lines if line.startswith("openai ")]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]
        reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
        assert reply.choices[0].message.role == "assistant"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()[-2000:]


@pytest.mark.slow
def test_http_api_latency_over_grpc(cluster):
    """p50 end-to-end latency of the same short greedy request over gRPC and over HTTP (30 each,
    interleaved, one client each with a kept-alive connection). Prints the figures."""
    ids, n = prompt_ids(16, 5), 30
    api = client(cluster)
    times: dict[str, list[float]] = {"grpc": [], "http": []}
    with BanaServeClient(cluster["router"].address) as grpc_client:

        def via_grpc():
            grpc_client.complete(ids, temperature=0.0, max_tokens=4, ignore_eos=True, timeout_s=30)

        def via_http():
            api.completions.create(
                model=MODEL,
                prompt=ids,
                max_tokens=4,
                temperature=0,
                extra_body={"ignore_eos": True},
            )

        for i in range(n + 3):  # 3 warm-up rounds, not counted
            for name, call in (("grpc", via_grpc), ("http", via_http))[:: 1 if i % 2 else -1]:
                start = time.perf_counter()
                call()
                if i >= 3:
                    times[name].append(time.perf_counter() - start)
    p50 = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"\np50 ms over {n} requests each: gRPC {p50['grpc']:.2f}, HTTP {p50['http']:.2f}, "
          f"added {p50['http'] - p50['grpc']:.2f}")  # fmt: skip
    assert p50["http"] - p50["grpc"] < 50
