"""The rpc layer on a real in-process server (port 0): health, reflection, status codes on the
wire, message-size limits, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.rpc import server as server_module
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.rpc.server import PortHold, drain_while, start_server
from tests.rpc.helpers import DECODE_SERVICE, SECRET, FakeDecode, fake_decode_service, serving

C = grpc.StatusCode


def reserve(request_id="r1", num_tokens=4, max_tokens=8):
    return decode_pb2.ReserveKVRequest(
        request_id=request_id,
        prompt_token_ids=list(range(num_tokens)),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
    )


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def test_health_reports_serving_per_service_and_overall():
    async def main():
        async with serving() as (server, channel, _):
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", DECODE_SERVICE):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            unknown = await rpc_error(stub.Check(health_pb2.HealthCheckRequest(service="nope")))
            assert unknown.code() == C.NOT_FOUND

            await server.set_serving(DECODE_SERVICE, False)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=DECODE_SERVICE))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

    asyncio.run(main())


def test_a_response_stream_sends_its_headers_before_its_first_message():
    """Its client's batch waiting for them ends at once, not with the call (a cancelled or
    timed-out one fails and leaks in grpc.aio: services/rpc/aio_calls.py); both handler forms,
    an async generator (StreamTokens) and a coroutine that writes (the health service's
    Watch), still stream their messages."""

    async def main():
        async with serving() as (server, channel, servicer):
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="late"))
            headers = await asyncio.wait_for(call.initial_metadata(), 5)
            waiting = not servicer.first_frame.is_set()
            servicer.first_frame.set()
            first = await call.read()
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=DECODE_SERVICE))
            seen = [(await watch.read()).status]
            await server.set_serving(DECODE_SERVICE, False)
            seen.append((await watch.read()).status)
            watch.cancel()
            return headers, waiting, list(first.delta.token_ids), seen

    headers, waiting, first, seen = asyncio.run(main())
    assert waiting  # the headers came while the handler still waited for its first message
    assert first == [1]
    status = health_pb2.HealthCheckResponse
    assert seen == [status.SERVING, status.NOT_SERVING]


def test_reflection_lists_the_services():
    async def main():
        async with serving() as (_, channel, _):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for reply in stub.ServerReflectionInfo(iter([request])):
                return {s.name for s in reply.list_services_response.service}

    assert asyncio.run(main()) == {
        DECODE_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_bound_port_is_reported_and_loopback_only():
    async def main():
        async with serving() as (server, channel, _):
            assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            stats = await stub.Stats(decode_pb2.DecodeServiceStatsRequest())
            assert (stats.kv.num_blocks_total, stats.kv.num_blocks_used) == (8, 0)

    asyncio.run(main())


def test_a_held_port_is_kept_from_other_binds_until_its_server_binds_it():
    """A worker restarted on its old port: what it binds before its server (data planes, on
    port 0) and its outgoing connections must not take that port (PortHold)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hold = PortHold("127.0.0.1", port)
    assert hold.held
    with socket.socket() as other, pytest.raises(OSError):  # EADDRINUSE
        other.bind(("127.0.0.1", port))  # (the kernel's choice for a bind to port 0 skips it)
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))  # held, not listening: refused, not hung

    async def main():
        config = RpcConfig(port=port, grace_s=0.1)
        server = await start_server([fake_decode_service(FakeDecode())], config, port_hold=hold)
        try:
            assert server.port == port and not hold.held
        finally:
            await server.stop(0)

    asyncio.run(main())
    assert not PortHold("127.0.0.1", 0).held  # an OS-chosen port: nothing to hold


def test_domain_errors_arrive_as_their_status_codes():
    async def main():
        async with serving() as (_, channel, _):
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            bad = await rpc_error(stub.ReserveKV(reserve(max_tokens=0)))
            too_long = await rpc_error(stub.ReserveKV(reserve(num_tokens=9)))
            bug = await rpc_error(stub.ReserveKV(reserve(request_id="boom")))
            ok = await stub.ReserveKV(reserve())
            return bad, too_long, bug, ok

    bad, too_long, bug, ok = asyncio.run(main())
    assert (bad.code(), bad.details()) == (C.INVALID_ARGUMENT, "max_tokens must be > 0, got 0")
    assert (too_long.code(), too_long.details()) == (C.OUT_OF_RANGE, "prompt has 9 tokens, limit 8")
    assert bug.code() == C.INTERNAL and SECRET not in bug.details()
    assert ok.reservation_id == "res-1"


def test_error_in_a_stream_ends_it_with_its_code_after_the_frames_sent():
    async def main():
        async with serving() as (_, channel, _):
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="r9"))
            frames = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for frame in call:
                    frames.append(frame)
            return frames, info.value

    frames, error = asyncio.run(main())
    assert [list(f.delta.token_ids) for f in frames] == [[1]]
    assert (error.code(), error.details()) == (C.NOT_FOUND, "request 'r9' is gone")


def test_a_handler_failing_after_its_client_cancelled_ends_quietly(caplog):
    # A routine cancellation: the work the handler still did fails (its own abort of the ended
    # call raises) and is no "internal error" with tracebacks in the server's log.
    async def main():
        async with serving() as (_, channel, servicer):
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            call = stub.StreamTokens(
                decode_pb2.StreamTokensRequest(request_id="outlives-its-client")
            )
            await call.read()
            call.cancel()
            await asyncio.wait_for(servicer.late_failure.wait(), 10)
            await asyncio.sleep(0.2)  # the handler's end, through the error interceptor
            return await stub.Stats(decode_pb2.DecodeServiceStatsRequest())

    with caplog.at_level(logging.DEBUG):
        stats = asyncio.run(main())
    assert stats.kv.num_blocks_total == 8  # still serving
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    assert any("call ended before its handler failed" in r.getMessage() for r in caplog.records)


def test_oversized_message_is_resource_exhausted_and_the_server_stays_healthy():
    config = RpcConfig(max_message_bytes=64 << 10, grace_s=0.5)

    async def main():
        async with serving(config) as (_, channel, _):
            stub = decode_pb2_grpc.DecodeServiceStub(channel)
            # 100k token ids of up to 3 varint bytes each: ~290 KiB, past the 64 KiB limit.
            error = await rpc_error(stub.ReserveKV(reserve(num_tokens=100_000)))
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=DECODE_SERVICE))
            return error, reply.status

    error, status = asyncio.run(main())
    assert error.code() == C.RESOURCE_EXHAUSTED
    assert status == health_pb2.HealthCheckResponse.SERVING


async def open_slow_stream(channel, servicer):
    """A StreamTokens call the fake keeps open, its first frame read; (stub, call)."""
    stub = decode_pb2_grpc.DecodeServiceStub(channel)
    call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="slow"))
    await call.read()
    await servicer.slow_started.wait()
    return stub, call


def test_stop_drains_in_flight_calls_within_the_grace_period():
    async def main():
        async with serving(RpcConfig(grace_s=0.3)) as (server, channel, servicer):
            stub, call = await open_slow_stream(channel, servicer)
            start = time.monotonic()
            await server.stop()
            elapsed = time.monotonic() - start
            cut = await rpc_error(call.read())
            after = await rpc_error(stub.Stats(decode_pb2.DecodeServiceStatsRequest(), timeout=1))
            return elapsed, cut.code(), after.code()

    elapsed, cut, after = asyncio.run(main())
    assert 0.25 <= elapsed < 1.5  # waited for the call, then cut it at the grace period
    assert cut in (C.CANCELLED, C.UNAVAILABLE)
    assert after == C.UNAVAILABLE


def test_sigterm_drains_and_returns_the_signal():
    async def main():
        servicer = FakeDecode()
        server = await start_server([fake_decode_service(servicer)], RpcConfig(grace_s=0.2))
        task = asyncio.create_task(server.serve_until_signal())
        await asyncio.sleep(0.05)
        # Sending SIGTERM without the handler in place would kill the test process.
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, timeout=2)

    previous = signal.getsignal(signal.SIGTERM)
    assert asyncio.run(main()) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.parametrize("forced", [False, True])
def test_a_second_signal_ends_a_drain_at_once_and_cancels_the_calls_left(forced):
    """A drain that would wait 60 s, a stream open: the second SIGTERM ends both within a
    second. ``on_force`` (the router's) is called and its drain ends on its own terms; without
    one the drain is cancelled."""
    ended: list[str] = []

    async def main():
        async with serving(RpcConfig(grace_s=60)) as (server, channel, servicer):
            _, call = await open_slow_stream(channel, servicer)
            cut = asyncio.Event()

            async def drain(grace_s: float) -> float:
                try:
                    await asyncio.wait_for(cut.wait(), grace_s)
                    ended.append("cut")
                except asyncio.CancelledError:
                    ended.append("cancelled")
                    raise
                return grace_s

            task = asyncio.create_task(
                server.serve_until_signal(drain=drain, on_force=cut.set if forced else None)
            )
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert not task.done()  # draining
            start = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            sig = await asyncio.wait_for(task, timeout=5)
            return sig, time.monotonic() - start, (await rpc_error(call.read())).code()

    sig, elapsed, code = asyncio.run(main())
    assert sig == signal.SIGTERM and elapsed < 1.0, elapsed
    assert code in (C.CANCELLED, C.UNAVAILABLE)
    assert ended == ["cut" if forced else "cancelled"]


def test_a_stop_that_outlasts_its_grace_logs_where_its_tasks_wait(monkeypatch, caplog):
    """A drain that overruns its grace (it ignores it): once the grace and STUCK_REPORT_S
    have passed, one warning names the coroutine the stop waits in, before any kill."""
    monkeypatch.setattr(server_module, "STUCK_REPORT_S", 0.2)

    async def stuck_in_the_drain(grace_s: float) -> float:
        await asyncio.sleep(1.0)
        return 0.0

    async def main():
        server = await start_server([fake_decode_service(FakeDecode())], RpcConfig(grace_s=0.1))
        task = asyncio.create_task(server.serve_until_signal(drain=stuck_in_the_drain))
        await asyncio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, timeout=5)

    with caplog.at_level(logging.WARNING, logger="services.rpc.server"):
        assert asyncio.run(main()) == signal.SIGTERM
    [report] = [r.getMessage() for r in caplog.records if "still stopping" in r.getMessage()]
    assert "still stopping 0.3s after the signal" in report
    assert "stuck_in_the_drain" in report


def service_script(tmp_path: Path, body: str) -> list[str]:
    """The argv of a stand-in service process: ``body`` (which defines ``serve(args)``, with
    ``srv`` the server module) run by ``run_service`` as every service's ``main`` is."""
    script = tmp_path / "service.py"
    script.write_text(
        "import argparse\nfrom services.rpc import server as srv\n"
        + textwrap.dedent(body)
        + "\ndef parse(argv):\n    return argparse.Namespace(log_level='INFO')\n"
        + "\nraise SystemExit(srv.run_service(parse, serve, []))\n"
    )
    return [sys.executable, str(script)]


SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}


def test_a_service_whose_loop_is_blocked_in_its_stop_dumps_every_thread(tmp_path):
    """A service process (``run_service``) whose drain blocks its event loop: no task can
    report, so a watchdog thread writes every thread's stack to stderr."""
    argv = service_script(tmp_path, """
        import time
        from services.common.config import RpcConfig
        from tests.rpc.helpers import FakeDecode, fake_decode_service

        srv.STUCK_REPORT_S = 0.2

        def blocked_in_a_call(grace_s):
            time.sleep(2.5)

        async def drain(grace_s):
            blocked_in_a_call(grace_s)
            return 0.0

        async def serve(args):
            server = await srv.start_server(
                [fake_decode_service(FakeDecode())], RpcConfig(grace_s=0.1)
            )
            print("LISTENING", flush=True)
            await server.serve_until_signal(drain=drain)
        """)  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SCRIPT_ENV
    )
    try:
        assert proc.stdout.readline().strip() == "LISTENING"
        time.sleep(0.5)  # its signal handlers go in just after the line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "most recent call first" in err and "blocked_in_a_call" in err, err


def test_a_service_that_crashes_in_compiled_code_says_where_before_it_dies(tmp_path):
    """A service process (``run_service``) killed by a fatal signal in C code (here a
    segfault through ctypes): every thread's Python stack is on stderr, and the process still
    dies of that signal."""
    argv = service_script(tmp_path, """
        import ctypes

        def crashes_in_compiled_code():
            ctypes.string_at(0)

        async def serve(args):
            crashes_in_compiled_code()
        """)  # fmt: skip
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=SCRIPT_ENV)
    assert run.returncode == -signal.SIGSEGV, run.stderr
    assert "Segmentation fault" in run.stderr and "crashes_in_compiled_code" in run.stderr, (
        run.stderr
    )


def test_drain_while_waits_for_the_work_at_least_its_minimum_and_at_most_its_grace():
    async def main():
        start = time.monotonic()
        left = await drain_while(lambda: False, poll_s=0.01, at_least_s=0.2)(5.0)
        idle_s = time.monotonic() - start
        busy = await drain_while(lambda: True, poll_s=0.01)(0.1)
        work = iter([True, True, False])
        done = await drain_while(lambda: next(work), poll_s=0.01)(5.0)
        return idle_s, left, busy, done

    idle_s, left, busy, done = asyncio.run(main())
    assert 0.2 <= idle_s < 1.0 and 4.0 < left <= 4.8
    assert busy == 0.0
    assert 4.5 < done <= 5.0


def test_a_port_in_use_fails_loudly():
    async def main():
        async with serving() as (server, _, _):
            with pytest.raises(ConfigError, match="cannot listen"):
                await start_server([], RpcConfig(port=server.port))

    asyncio.run(main())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "0.0.0.0"},
        {"port": -1},
        {"port": 70000},
        {"max_message_bytes": 10},
        {"grace_s": -1},
        {"keepalive_s": 0},
    ],
)
def test_rpc_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        RpcConfig(**kwargs)


def test_a_port_in_use_is_a_config_error_naming_it():
    """Probe, session 45: a service whose --port was taken died with gRPC's RuntimeError
    traceback; now one ``error:`` line naming the port (``run_service``), exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main():
            await start_server([fake_decode_service(FakeDecode())], RpcConfig(port=port))

        with pytest.raises(ConfigError, match=f"--port {port}: cannot listen on 127.0.0.1:{port}"):
            asyncio.run(main())
        run = subprocess.run(
            [sys.executable, "-m", "services.router", "--port", str(port), "--no-http"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).parents[2],
        )
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"error: --port {port}: cannot listen" in run.stderr
    assert "Traceback" not in run.stderr
