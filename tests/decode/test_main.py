"""``python -m services.decode`` as a real process, and its load reports to a router."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from services.common.config import RpcConfig
from services.common.load import LoadReport
from services.router.servicer import router_service
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.rpc.load_reports import LoadReporter, load_from_proto, worker_info
from services.rpc.server import PortHold, start_server


@contextmanager
def decode_process(model, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m services.decode`` on ``model`` (32 KV blocks, one thread) with ``flags``:
    the process and the address it printed; killed at the end if the test left it running."""
    cmd = [sys.executable, "-m", "services.decode", "--port", "0", "--model", str(model)]
    cmd += ["--threads", "1", "--num-kv-blocks", "32", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[0] == "LISTENING", line
        yield proc, line[1]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_process_prints_its_address_serves_and_drains_on_sigterm(tiny_llama):
    with decode_process(tiny_llama) as (proc, address):

        async def stats():
            channel = grpc.aio.insecure_channel(address)
            reply = await decode_pb2_grpc.DecodeServiceStub(channel).Stats(
                decode_pb2.DecodeServiceStatsRequest(), timeout=5
            )
            await channel.close()
            return reply

        reply = asyncio.run(stats())
        assert (reply.kv.num_blocks_total, reply.kv.num_blocks_used) == (32, 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    def __init__(self) -> None:
        self.frames: list[router_pb2.ReportLoadRequest] = []
        self.ended = asyncio.Event()

    async def ReportLoad(self, request_iterator, context):
        async for frame in request_iterator:
            self.frames.append(frame)
        self.ended.set()  # a half-close: clean deregistration
        return router_pb2.ReportLoadResponse()


def test_load_reporter_registers_then_reports_until_stopped():
    snapshot = LoadReport(7, 2, 1, 5, 27, 0.004, 0.25, 1.0)

    async def load():
        return snapshot

    async def main():
        router = FakeRouter()
        rpc = RpcConfig(grace_s=0.5)
        service = router_service(router)
        server = await start_server([service], rpc)
        channel = open_channel(server.address, rpc)
        info = worker_info("decode-0", "127.0.0.1:1", "decode", "tiny-llama", "fp", 16, 32, 512)
        reporter = LoadReporter(channel, info, load, interval_s=0.01)
        task = asyncio.create_task(reporter.run())
        while len(router.frames) < 4:
            await asyncio.sleep(0.01)
        reporter.begin_drain()  # SIGTERM: from now on every report says so
        drained_from = len(router.frames)
        while len(router.frames) < drained_from + 3:
            await asyncio.sleep(0.01)
        reporter.stop()
        await asyncio.wait_for(router.ended.wait(), 2)
        await asyncio.wait_for(task, 2)
        await channel.close()
        await server.stop(0)
        first, *loads = router.frames
        assert first.worker.worker_id == "decode-0"
        assert first.worker.role == common_pb2.WORKER_ROLE_DECODE
        assert all(f.WhichOneof("frame") == "load" for f in loads)
        report = loads[0].load
        assert (report.num_queued_prefill_tokens, report.num_running_seqs) == (7, 2)
        assert (report.num_kv_blocks_used, report.num_kv_blocks_free) == (5, 27)
        assert report.step_time.ToMilliseconds() == 4 and report.busy_fraction == 0.25
        assert not any(f.load.draining for f in loads[:3])
        after = [f.load for f in router.frames[drained_from + 1 :]]  # one may have been on its way
        assert after and all(r.draining for r in after)
        assert load_from_proto(after[0]) == dataclasses.replace(snapshot, draining=True)

    asyncio.run(main())


def test_reuse_of_cached_prefix_blocks_is_on_unless_turned_off():
    from services.decode.__main__ import parse_args

    assert parse_args([]).reuse_cached_prefix is True
    assert parse_args(["--no-reuse-cached-prefix"]).reuse_cached_prefix is False


def test_transfer_idle_timeout_flag_bounds_a_stalled_transfer(tiny_llama):
    """``--transfer-idle-timeout``: a transfer whose sender goes quiet after its header ends
    then (a model whose layer takes longer than the 10 s default would raise it)."""
    from tests.decode.helpers import GREEDY, PrefillSide, prompt_ids, reserve_request
    from tests.decode.test_transfer_limits import then_silent

    with decode_process(tiny_llama, "--transfer-idle-timeout", "0.4") as (proc, address):

        async def stalled():
            channel = grpc.aio.insecure_channel(address)
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            prefill, prompt = PrefillSide(tiny_llama), prompt_ids(40, 51)
            reply = await stub.ReserveKV(reserve_request("s", prompt), timeout=5)
            first = prefill.prefill("s", prompt, GREEDY)
            frames = list(prefill.frames("s", reply.reservation_id, first))
            hold = asyncio.Event()  # the header and one chunk, then nothing
            started = time.monotonic()
            try:
                await stub.TransferKV(then_silent(frames[:2], hold), timeout=5)
            except grpc.aio.AioRpcError as err:
                took = time.monotonic() - started
                hold.set()
                stats = await stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=5)
                await channel.close()
                return err, took, stats
            raise AssertionError("the stalled transfer succeeded")

        err, took, stats = asyncio.run(stalled())
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.details() == "the KV transfer for 's' sent nothing for 0.4s"
        assert took < 2.0  # not the 10 s default
        assert stats.kv.num_blocks_used == 0 and not stats.reservations
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_load_reporter_says_once_that_the_router_is_away_and_once_that_it_is_back(caplog):
    """A router stopped (``up`` stops it before the workers) or restarting: one warning, not
    one per retry, then one line when the reports go out again."""
    snapshot = LoadReport(0, 0, 0, 0, 32, 0.0, 0.0, 1.0)

    async def load():
        return snapshot

    async def main():
        router = FakeRouter()
        rpc = RpcConfig(grace_s=0.1)
        service = router_service(router)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        hold = PortHold("127.0.0.1", port)  # bound, not listening: a connect is refused
        channel = open_channel(f"127.0.0.1:{port}", rpc)
        info = worker_info("decode-0", "127.0.0.1:1", "decode", "tiny-llama", "fp", 16, 32, 512)
        reporter = LoadReporter(channel, info, load, interval_s=0.01, retry_s=0.05)
        task = asyncio.create_task(reporter.run())
        await asyncio.sleep(0.6)  # several failed tries
        server = await start_server([service], dataclasses.replace(rpc, port=port), port_hold=hold)
        while len(router.frames) < 3:
            await asyncio.sleep(0.01)
        reporter.stop()
        await asyncio.wait_for(task, 2)
        await channel.close()
        await server.stop(0)

    with caplog.at_level("DEBUG", logger="services.rpc.load_reports"):
        asyncio.run(main())
    records = [r for r in caplog.records if r.name == "services.rpc.load_reports"]
    warnings = [r.getMessage() for r in records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "retrying; said again once it works" in warnings[0]
    assert sum(r.levelname == "DEBUG" for r in records) >= 2
    (back,) = [r.getMessage() for r in records if r.levelname == "INFO"]
    assert back.startswith("load reports to the router again after ")
