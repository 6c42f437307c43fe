"""A stream broken because its router was lost goes on: ``banaserve up`` restarts the router on
its port, the workers register again, and the client library sends the request again with the
tokens it has (GenerateRequest.resume_output_token_ids); the caller's iteration ends with the
tokens and text of an undisturbed run. Real processes, tiny-llama, no store."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from types import SimpleNamespace

import pytest

from services.client.client import AsyncBanaServeClient, BanaServeClient, BanaServeClientError
from services.common.types import SamplingParams
from tests.e2e.test_cluster import wait_idle
from tests.e2e.test_up import children, gone, start_up
from tests.e2e.test_up_restarts import Console, is_router, pid_of, tokens
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e

PARAMS = dict(max_tokens=160, ignore_eos=True, temperature=0.0)


def stream_killing_the_router(up, router: str, prompt: list[int], **client_args):
    """Streams one request and SIGKILLs the router after its 4th token: the result, or the
    client's error, and how long the stream took."""
    started = time.monotonic()
    with BanaServeClient(router, **client_args) as client:
        stream = client.generate(prompt, timeout_s=60, **PARAMS)
        try:
            for i, _ in enumerate(stream):
                if i == 3:
                    os.kill(pid_of(up, is_router), signal.SIGKILL)
        except BanaServeClientError as exc:
            return exc, time.monotonic() - started
        return stream.result, time.monotonic() - started


def stream_killing_the_router_async(up, router: str, prompt: list[int], **client_args):
    async def main():
        started = time.monotonic()
        async with AsyncBanaServeClient(router, **client_args) as client:
            stream = client.generate(prompt, timeout_s=60, **PARAMS)
            i = 0
            try:
                async for _ in stream:
                    if i == 3:
                        os.kill(pid_of(up, is_router), signal.SIGKILL)
                    i += 1
            except BanaServeClientError as exc:
                return exc, time.monotonic() - started
            return stream.result, time.monotonic() - started

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("stream", "max_resumes"),
    [
        pytest.param(stream_killing_the_router, 2, id="sync"),
        pytest.param(stream_killing_the_router_async, 2, id="async"),
        # The old behaviour, kept for a client that asks for it (slow: the default run stays
        # well under 15 min).
        pytest.param(stream_killing_the_router, 0, id="no-resumes", marks=pytest.mark.slow),
    ],
)
def test_a_stream_broken_by_a_killed_router_goes_on_once_it_is_back(
    banaserve_home, tiny_llama, stream, max_resumes
):
    prompt = tokens(7, 40)
    [expected] = make_engine(tiny_llama).generate([prompt], SamplingParams(**PARAMS))
    up, lines = start_up(banaserve_home, "--kvstore", "0", "--restart-backoff", "0.2")
    address = {line.split()[0]: line.split()[1] for line in lines if ":" in line.split()[-1]}
    console = Console(up)
    pids = children(up.pid)
    try:
        result, took = stream(up, address["router"], prompt, max_resumes=max_resumes)
        console.wait_for(
            "router exited (code -9); restarting in 0.2 s (restart 1 of 5)",
            f"router ready again {address['router']}",
        )
        if max_resumes == 0:  # as before: the stream fails at once
            assert isinstance(result, BanaServeClientError), result
            assert result.code.name == "UNAVAILABLE"
            assert took < 10
        else:
            assert not isinstance(result, BaseException), result
            assert list(result.token_ids) == expected.token_ids
            assert result.text == expected.text
            assert result.finish_reason == "length"
        workers = {r: SimpleNamespace(address=address[f"{r}-0"]) for r in ("prefill", "decode")}
        wait_idle(workers)  # nothing the broken stream's request held is left
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, "".join(console.stderr)[-3000:]
    assert all(gone(pid) for pid in pids)


def test_a_request_sent_while_a_router_it_reached_restarts_waits_for_it(banaserve_home, tiny_llama):
    """A client that has had answers from its router sends a new request while the router is
    down: it connects once the router is back and is served (a router never reached fails at
    once: below)."""
    prompt = tokens(8, 30)
    params = dict(max_tokens=8, ignore_eos=True, temperature=0.0)
    [expected] = make_engine(tiny_llama).generate([prompt], SamplingParams(**params))
    up, lines = start_up(banaserve_home, "--kvstore", "0", "--restart-backoff", "2")
    address = {line.split()[0]: line.split()[1] for line in lines if ":" in line.split()[-1]}
    console = Console(up)
    try:
        with BanaServeClient(address["router"]) as client:
            assert len(client.complete(prompt, timeout_s=30, **params).token_ids) == 8
            os.kill(pid_of(up, is_router), signal.SIGKILL)
            console.wait_for("router exited (code -9); restarting in 2.0 s (restart 1 of 5)")
            assert not any("router ready again" in line for line in console.drain())
            result = client.complete(prompt, timeout_s=30, **params)  # sent while it is down
        assert list(result.token_ids) == expected.token_ids
        assert f"router ready again {address['router']}" in console.drain()
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, "".join(console.stderr)[-3000:]


def test_a_stream_whose_connection_died_without_closing_goes_on_over_a_new_one(
    banaserve_home, tiny_llama
):
    """The client's connection to the router stalls for good after the 4th token, nothing reset
    (a partition, a NAT that dropped it): the client's keepalive finds it (1 s + 1 s here) and
    sends the request again over a new connection while the router, which has not found the
    dead one yet (its own pings: 10 s + 5 s), still streams into it. The resend takes the request
    over instead of ALREADY_EXISTS, and the stream ends with the undisturbed run's tokens, long
    before the router would have let go of the old call by itself."""
    from tests.chaos.proxy import FaultProxy, Mode

    prompt = tokens(9, 40)
    # Long enough that the router still runs it when the resend comes, on any machine.
    params = dict(PARAMS, max_tokens=1900)
    [expected] = make_engine(tiny_llama).generate([prompt], SamplingParams(**params))
    up, lines = start_up(banaserve_home, "--kvstore", "0")
    address = {line.split()[0]: line.split()[1] for line in lines if ":" in line.split()[-1]}
    console = Console(up)
    proxy = FaultProxy("client", lambda: address["router"])
    try:
        proxy.start()
        with BanaServeClient(proxy.address, keepalive_s=1.0) as client:
            stream = client.generate(prompt, timeout_s=60, **params)
            for i, _ in enumerate(stream):
                if i == 3:
                    proxy.set(Mode.STRAND)
                    stranded = time.monotonic()
                elif i == 4:  # the first token after it
                    gap = time.monotonic() - stranded
        result = stream.result
        assert list(result.token_ids) == expected.token_ids
        assert result.text == expected.text
        assert proxy.num_connections == 2  # the stranded one, then one for the resend
        assert gap < 8, gap  # found and resent in ~2 s; the router alone would take 5–15 s
        workers = {r: SimpleNamespace(address=address[f"{r}-0"]) for r in ("prefill", "decode")}
        wait_idle(workers)
    finally:
        proxy.stop()
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, "".join(console.stderr)[-3000:]
    assert any("sent again by its client" in line for line in console.stderr)


def test_a_router_never_reached_fails_at_once_without_waiting_for_it():
    from tests.router.grpc_fakes import dead_address

    started = time.monotonic()
    with BanaServeClient(dead_address()) as client, pytest.raises(BanaServeClientError) as info:
        client.complete([1, 2, 3], max_tokens=2, timeout_s=20)
    assert info.value.code.name == "UNAVAILABLE"
    assert time.monotonic() - started < 5
