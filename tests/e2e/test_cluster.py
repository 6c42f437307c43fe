"""End to end, real processes: router + 1 prefill + 1 decode worker on tiny-llama.

Requests go client → router → prefill (KV streamed layer by layer) → decode → client. Greedy
outputs must equal the in-process engine's, token for token, and every KV block on both workers
must be free afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from services.client.client import BanaServeClient, BanaServeClientError
from services.common.types import SamplingParams
from services.launcher import ClusterSpec, LocalCluster
from services.rpc.gen.banaserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from tests.clusters import wait_for
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(banaserve_home, tiny_llama, tmp_path_factory):
    env = {"BANASERVE_HOME": str(banaserve_home)}
    with open(tmp_path_factory.mktemp("logs") / "cluster.log", "w") as log:
        cluster = LocalCluster(ClusterSpec(num_kv_blocks=512, extra_env=env), log)
        cluster.start()
        try:
            yield {
                "router": cluster.router,
                "prefill": cluster.child("prefill-0"),
                "decode": cluster.child("decode-0"),
            }
        finally:
            codes = cluster.stop()
    assert set(codes.values()) == {0}, f"services exited with {codes}"


def prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_workers_idle(cluster) -> None:
    with grpc.insecure_channel(cluster["decode"].address) as ch:
        stats = decode_pb2_grpc.DecodeServiceStub(ch).Stats(decode_pb2.DecodeServiceStatsRequest())
    assert stats.kv.num_blocks_used == 0 and not stats.reservations, stats
    with grpc.insecure_channel(cluster["prefill"].address) as ch:
        stats = prefill_pb2_grpc.PrefillServiceStub(ch).Stats(
            prefill_pb2.PrefillServiceStatsRequest()
        )
    assert stats.kv.num_blocks_used == 0, stats


def test_concurrent_greedy_requests_match_the_in_process_engine(cluster, tiny_llama):
    assert_same_as_engine(cluster["router"].address, tiny_llama, num_requests=32)
    assert_workers_idle(cluster)


def test_a_prefix_the_decode_worker_holds_is_not_sent_again(cluster, tiny_llama):
    """Prompts sharing a 6-block prefix: the first hands over every block; later ones, alone or
    at once, only the blocks after the prefix (the decode worker reuses its cached blocks,
    ReserveKVResponse.num_cached_blocks), with the in-process engine's tokens."""
    block = 16  # tiny-llama's default block size
    prefix = prompt_ids(6 * block + 3, 901)
    prompts = [prefix + prompt_ids(n, 902 + n) for n in (20, 5, 40, 13, 29)]
    results = greedy_as_the_engine(cluster["router"].address, tiny_llama, prompts, 6, alone=1)
    blocks = [-(-len(p) // block) for p in prompts]
    per_block = results[0].server_timings.kv_bytes // blocks[0]
    assert per_block > 0
    sent = [r.server_timings.kv_bytes for r in results[1:]]
    assert sent == [per_block * (n - 6) for n in blocks[1:]], (sent, per_block, blocks)
    assert_workers_idle(cluster)


def greedy_as_the_engine(router: str, model, prompts: list, max_tokens: int, alone: int = 0):
    """The first ``alone`` prompts one after another, then the rest at once, greedy: their
    results, each token-identical to the in-process engine's (asserted)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    expected = make_engine(model).generate(prompts, params)

    def run(client, prompt):
        return client.complete(
            prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, timeout_s=60
        )

    with BanaServeClient(router) as client, ThreadPoolExecutor(len(prompts)) as pool:
        results = [run(client, p) for p in prompts[:alone]]
        results += list(pool.map(lambda p: run(client, p), prompts[alone:]))
    assert [list(r.token_ids) for r in results] == [c.token_ids for c in expected]
    return results


def assert_same_as_engine(router: str, model, num_requests: int) -> None:
    """``num_requests`` concurrent greedy requests of mixed lengths (1-150 tokens) and mixed
    max_tokens: every output token-identical to the in-process engine's."""
    g = torch.Generator().manual_seed(num_requests)
    lengths = torch.randint(1, 151, (num_requests,), generator=g).tolist()
    prompts = [prompt_ids(n, seed) for seed, n in enumerate(lengths)]
    params = [
        SamplingParams(temperature=0, max_tokens=8 + 4 * (i % 5), ignore_eos=True)
        for i in range(num_requests)
    ]
    expected = make_engine(model).generate(prompts, params)
    with BanaServeClient(router) as client, ThreadPoolExecutor(num_requests) as pool:
        results = list(
            pool.map(
                lambda p, sp: client.complete(
                    p, temperature=0.0, max_tokens=sp.max_tokens, ignore_eos=True, timeout_s=120
                ),
                prompts,
                params,
            )
        )
    assert [list(r.token_ids) for r in results] == [c.token_ids for c in expected]
    assert [r.text for r in results] == [c.text for c in expected]


def test_bad_input_gets_invalid_argument_and_the_cluster_stays_up(cluster):
    with BanaServeClient(cluster["router"].address) as client:
        for kwargs in ({"max_tokens": 0}, {"top_p": 1.5}):
            with pytest.raises(Exception) as err:
                client.complete([5, 6, 7], timeout_s=10, **kwargs)
            assert getattr(err.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
        result = client.complete([5, 6, 7], temperature=0.0, max_tokens=3, timeout_s=30)
        assert len(result.token_ids) >= 1
    assert_workers_idle(cluster)


def wait_idle(cluster, timeout_s: float = 10.0) -> None:
    """Freeing after a cancel or deadline is asynchronous: poll, bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            assert_workers_idle(cluster)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_cancel_mid_stream_and_deadline_expiry_free_every_block(cluster):
    with BanaServeClient(cluster["router"].address) as client:
        stream = client.generate(
            prompt_ids(60, 1), temperature=0.0, max_tokens=2000, ignore_eos=True, timeout_s=60
        )
        for i, _ in enumerate(stream):
            if i == 3:
                stream.cancel()
                break
        with pytest.raises(BanaServeClientError) as err:
            client.complete(
                prompt_ids(80, 2), temperature=0.0, max_tokens=2000, ignore_eos=True, timeout_s=0.5
            )
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(cluster)


def decode_stats(address: str):
    with grpc.insecure_channel(address) as ch:
        return decode_pb2_grpc.DecodeServiceStub(ch).Stats(decode_pb2.DecodeServiceStatsRequest())


def kill_mid_stream(
    cluster, workers, prompt, params, kill_at: int = 3, sig=signal.SIGKILL, signalled=None
):
    """Streams one request, sends ``sig`` to the worker decoding it once ``kill_at`` tokens came
    back (SIGSTOP: frozen until the cluster stops); the result, or the client's error."""
    with BanaServeClient(cluster.router.address) as client:
        stream = client.generate(prompt, timeout_s=60, **params)
        try:
            for i, _ in enumerate(stream):
                if i == kill_at:  # mid-stream: kill the worker decoding it
                    busy = [w for w in workers if decode_stats(w.address).num_running_seqs]
                    assert len(busy) == 1
                    os.kill(busy[0].proc.pid, sig)
                    if signalled is not None:
                        signalled.append(busy[0])
        except BanaServeClientError as exc:
            return exc
        # The router took the dead worker out; new requests go to the survivor.
        result = client.complete(
            prompt_ids(10, 4), temperature=0.0, max_tokens=4, ignore_eos=True, timeout_s=30
        )
        assert len(result.token_ids) == 4
        return stream.result


# Seeded and colocated run with -m slow (the default run stays well under 15 min); the unit
# tests cover their parts (tests/engine/test_resume.py, tests/router/test_generate.py).
RESUMED = [
    pytest.param({}, dict(temperature=0.0), signal.SIGKILL, id="pd-greedy"),
    pytest.param({}, dict(temperature=0.9, top_p=0.9, seed=1234), signal.SIGKILL, id="pd-seeded",
                 marks=pytest.mark.slow),
    pytest.param({"num_prefill": 0, "num_decode": 0, "num_mixed": 2, "num_kvstore": 0,
                  "policy": "colocated"}, dict(temperature=0.0), signal.SIGKILL, id="colocated",
                 marks=pytest.mark.slow),
    # Frozen, its connection open: found by the router's keepalive ping (2 s + 3 s at most,
    # RpcConfig.channel_keepalive_*; gRPC's own 60 s ping timeout before channels.py set it).
    pytest.param({}, dict(temperature=0.0), signal.SIGSTOP, id="pd-frozen"),
]  # fmt: skip


@pytest.mark.parametrize(("shape", "sampling", "sig"), RESUMED)
def test_a_worker_killed_mid_stream_is_resumed_on_another_with_the_same_tokens(
    banaserve_home, tiny_llama, tmp_path, shape, sampling, sig
):
    """The decode (or mixed) worker serving a request is SIGKILLed (or frozen) after its 4th
    token: the router resumes it on the other worker from the tokens the client has, and the
    client gets one uninterrupted stream equal to the in-process engine's output (greedy and
    seeded)."""
    shape = {"num_decode": 2, **shape}
    spec = ClusterSpec(
        num_kv_blocks=512, extra_env={"BANASERVE_HOME": str(banaserve_home)}, **shape
    )
    params = dict(max_tokens=160, ignore_eos=True, **sampling)
    prompt = prompt_ids(40, 3)
    [expected] = make_engine(tiny_llama).generate([prompt], SamplingParams(**params))
    with open(tmp_path / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            workers = [c for c in cluster.children if c.name.startswith(("decode", "mixed"))]
            frozen: list = []  # a SIGSTOPped worker: SIGCONT at the end
            started = time.monotonic()
            signalled = frozen if sig == signal.SIGSTOP else None
            result = kill_mid_stream(cluster, workers, prompt, params, sig=sig, signalled=signalled)
            assert not isinstance(result, BaseException), result
            assert time.monotonic() - started < 30
            assert list(result.token_ids) == expected.token_ids
            assert result.text == expected.text
            assert result.finish_reason == "length"
            [survivor] = [w for w in workers if w.proc.poll() is None and w not in frozen]
            stats = decode_stats(survivor.address)
            assert stats.kv.num_blocks_used == 0 and not stats.reservations, stats
        finally:
            for worker in frozen:
                os.kill(worker.proc.pid, signal.SIGCONT)
            cluster.stop()
    assert "resuming elsewhere (1 of 2)" in (tmp_path / "cluster.log").read_text()


def test_with_no_resumes_a_killed_decode_worker_fails_the_request_fast(
    banaserve_home, tiny_llama, tmp_path
):
    spec = ClusterSpec(
        num_decode=2,
        num_kv_blocks=512,
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
        service_args={"router": ("--max-resumes", "0")},
    )
    with open(tmp_path / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            # The router admits what its two decode workers can run (2 x --max-num-seqs 64),
            # not 64, once it has seen both (it looks every 0.25 s).
            wait_for(
                lambda: ADMITS_128 in (tmp_path / "cluster.log").read_text(),
                "the router's admission to follow its two decode workers",
                timeout_s=10,
            )
            decodes = [cluster.child("decode-0"), cluster.child("decode-1")]
            started = time.monotonic()
            params = dict(temperature=0.0, max_tokens=3000, ignore_eos=True)
            error = kill_mid_stream(cluster, decodes, prompt_ids(40, 3), params)
            assert isinstance(error, BanaServeClientError), error
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert "was lost after" in str(error)
            assert time.monotonic() - started < 30  # failed with a reason, well in time
        finally:
            cluster.stop()


ADMITS_128 = "admission: 128 request-starting calls at once (was 64)"


def test_load_generator_against_the_cluster(cluster, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "bench",
            "serve",
            "--target",
            f"grpc://{cluster['router'].address}",
            "--workload",
            "sharegpt-like",
            "--num-requests",
            "6",
            "--rate",
            "inf",
            "--max-model-len",
            "256",
            "--output-len",
            "8",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--vocab-range",
            "5:4000",  # tiny-llama's vocabulary
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "serve.json").read_text())
    summary = report["summary"]
    assert summary["num_ok"] == 6
    assert len(report["requests"]) == 6
    assert "TTFT" in (tmp_path / "serve.md").read_text()
    wait_idle(cluster)


def test_colocated_mixed_workers_match_the_in_process_engine(banaserve_home, tiny_llama, tmp_path):
    spec = ClusterSpec(
        num_prefill=0,
        num_decode=0,
        num_mixed=2,
        num_kvstore=0,  # mixed workers do not use the store
        policy="colocated",
        num_kv_blocks=512,
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
    )
    with open(tmp_path / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            assert [c.name for c in cluster.children] == ["router", "mixed-0", "mixed-1"]
            assert_same_as_engine(cluster.router.address, tiny_llama, num_requests=16)
            for name in ("mixed-0", "mixed-1"):
                stats = decode_stats(cluster.child(name).address)
                assert stats.kv.num_blocks_used == 0 and not stats.reservations, stats
        finally:
            codes = cluster.stop()
    assert set(codes.values()) == {0}, f"services exited with {codes}"


@pytest.mark.parametrize("kv_transport", ["tcp", "none"])
def test_a_prompt_held_on_its_prefill_worker_past_the_lease_completes(
    banaserve_home, tiny_llama, tmp_path, kv_transport
):
    """The prefill worker holds the prompt for 2.5 s (frozen here; a long prompt, a queue
    behind others or a migration's switch on a real one) while the router's lease on the decode
    worker is 1 s: the router renews the lease meanwhile, so the request completes with the
    engine's tokens, over the data plane and over the TransferKV stream (whose open frame
    claims the reservation before the prompt computes). Without renewals the reservation
    expired and the request failed NOT_FOUND."""
    spec = ClusterSpec(
        num_kvstore=0,
        num_kv_blocks=512,
        kv_transport=kv_transport,
        extra_env={"BANASERVE_HOME": str(banaserve_home)},
        service_args={"router": ("--lease-s", "1")},
    )
    prompt = prompt_ids(40, 77)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = make_engine(tiny_llama).generate([prompt], [params])[0].token_ids
    with open(tmp_path / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        prefill = cluster.child("prefill-0")
        try:
            with BanaServeClient(cluster.router.address) as client, ThreadPoolExecutor(1) as pool:
                os.kill(prefill.proc.pid, signal.SIGSTOP)
                try:
                    result = pool.submit(
                        client.complete, prompt, temperature=0.0, max_tokens=12,
                        ignore_eos=True, timeout_s=60,
                    )  # fmt: skip
                    time.sleep(2.5)
                finally:
                    os.kill(prefill.proc.pid, signal.SIGCONT)
                assert list(result.result(timeout=60).token_ids) == expected
            assert_workers_idle({"decode": cluster.child("decode-0"), "prefill": prefill})
        finally:
            codes = cluster.stop()
    assert set(codes.values()) == {0}, f"services exited with {codes}"
