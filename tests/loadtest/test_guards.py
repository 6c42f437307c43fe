"""The load test's guards, each a defect a black-box probe found: sweep steps and runs that sent
prompts the service had cached, a warm-up unbounded by ``--timeout``, SIGTERM skipping cleanup,
reports lost after the load, sizes and pids that failed late, the stream sink refusing a prefill
worker's transfer, leaks counted from an earlier run's pins, bare usage errors. Fast: in-process
fakes, and tiny gRPC servers on 127.0.0.1 where a real one is needed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from bench.loadtest import checks, cli
from bench.loadtest.decode import DecodeLoad, DecodeScenario
from bench.loadtest.driver import LoadSpec, Loop, Recorder, warm_up
from bench.loadtest.kvstore import KVStoreLoad, KVStoreScenario, Node
from bench.loadtest.prefill import PrefillLoad, PrefillScenario
from bench.loadtest.router import RouterLoad, RouterScenario
from bench.loadtest.stubs import KVSink
from services.cli import main
from services.common.errors import ConfigError
from services.rpc.gen.banaserve.v1 import kvstore_pb2

REPO = Path(__file__).resolve().parents[2]


class FakeScenario:
    """Iterations that record their index and return at once (``hang``: never return);
    ``held`` counts as given; ``fail_state_after``: server_state raises from that call on."""

    name = "request"
    sample_names = ("request", "Call")
    target = "127.0.0.1:1"
    grpc_service = "banaserve.v1.FakeService"

    def __init__(self, held: dict[str, int] | None = None, fail_state_after: int | None = None):
        self.indices: list[int] = []
        self.held = held or {}
        self.fail_state_after = fail_state_after
        self.num_state_reads = 0
        self.hang = False

    async def setup(self) -> None: ...

    async def close(self) -> None: ...

    def describe(self) -> dict:
        return {"fake": True}

    async def server_state(self) -> dict:
        self.num_state_reads += 1
        if self.fail_state_after is not None and self.num_state_reads > self.fail_state_after:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                details="Deadline Exceeded",
            )  # fmt: skip
        return {"held": dict(self.held)}

    async def run_one(self, index: int, rec: Recorder) -> None:
        self.indices.append(index)
        async with rec.rpc("Call"):
            if self.hang:
                await asyncio.Event().wait()


def closed(users: int, max_requests: int) -> LoadSpec:
    return LoadSpec(Loop.CLOSED, users=users, duration_s=30, max_requests=max_requests)


# ---- 1. every step, and every run, sends prompts no server has seen --------------------------


def test_a_sweeps_steps_continue_the_iteration_indices():
    """Steps reused indices 0.. and so the same prompts: later steps measured cache hits."""
    scenario = FakeScenario()
    specs = [closed(1, 3), closed(2, 4), LoadSpec(Loop.OPEN, rate=200, duration_s=0.05, seed=1)]
    results, _, _ = asyncio.run(cli.drive_steps(scenario, specs, warmup=1, pids=None))
    load = [i for i in scenario.indices if i >= 0]
    assert load == sorted(set(load)) == list(range(len(load)))
    assert scenario.indices[0] == -1  # the warm-up's, apart from every step's
    assert [r.spec.first_index for r in results[:2]] == [0, 3]
    assert results[1].next_index == 7


def test_prompts_are_keyed_by_seed_nonce_and_index():
    """The decode test's prompts ignored the run: the same seed twice sent cached prompts."""
    decode = [DecodeScenario("h:1", DecodeLoad(seed=4, nonce=n)) for n in ("a", "b", "a")]
    for scenario in decode:
        scenario._vocab_size = 32000
    routers = [RouterScenario("h:1", RouterLoad(seed=4, nonce=n)) for n in ("a", "b", "a")]
    prefills = [PrefillScenario("h:1", PrefillLoad(seed=4, nonce=n)) for n in ("a", "b", "a")]
    for a, b, a_again in (decode, routers, prefills):
        assert a._prompt(0) != b._prompt(0)  # another run
        assert a._prompt(0) != a._prompt(1)  # another iteration, or step
        assert a._prompt(0) == a_again._prompt(0)  # --nonce repeats a run's prompts
        assert a.describe()["nonce"] == "a"
    assert DecodeLoad().nonce != DecodeLoad().nonce  # fresh by default


# ---- 2. the warm-up is bounded; absurd values are refused ------------------------------------


def test_a_warm_up_iteration_is_bounded_by_the_timeout():
    scenario = FakeScenario()
    scenario.hang = True
    start = time.monotonic()
    with pytest.raises(ConfigError, match="warm-up iteration failed: DEADLINE_EXCEEDED"):
        asyncio.run(warm_up(scenario, 1, 0.2))
    assert time.monotonic() - start < 2


class Hanging(grpc.GenericRpcHandler):
    """Every method of every service: never answers (until the server stops)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def service(self, details):  # noqa: ANN001, ANN201 - grpc's handler hook
        def unary(request, context):  # noqa: ANN001, ANN202
            self.stop.wait()
            return b""

        def stream(request, context):  # noqa: ANN001, ANN202
            self.stop.wait()
            yield b""

        if details.method.endswith(("Generate", "Prefill", "StreamTokens")):
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
def grpc_server(request):
    """A gRPC server on 127.0.0.1: ``hanging`` (every call waits forever) or with no service."""
    stop = threading.Event()
    # Pings every 10 s are not "too many": the client's keepalive must not end a hung call.
    options = [("grpc.http2.min_recv_ping_interval_without_data_ms", 100),
               ("grpc.http2.max_ping_strikes", 0), ("grpc.keepalive_permit_without_calls", 1)]  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    if request.param == "hanging":
        server.add_generic_rpc_handlers((Hanging(stop),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    stop.set()
    server.stop(0)


@pytest.mark.integration
@pytest.mark.parametrize("grpc_server", ["hanging"], indirect=True)
def test_a_service_that_never_answers_ends_the_run_within_its_timeout(
    grpc_server, tmp_path, capsys
):
    """It ran 60 s (the router call's own timeout) before the warm-up failed."""
    start = time.monotonic()
    code = main(["loadtest", "router", "--target", grpc_server, "--duration", "1s", "--timeout",
                 "1s", "--out", str(tmp_path)])  # fmt: skip
    assert time.monotonic() - start < 8
    assert code == 2
    assert "failed: DEADLINE_EXCEEDED" in capsys.readouterr().err


@pytest.fixture
def no_load(monkeypatch):
    async def refuse(*args, **kwargs):
        raise AssertionError("load was sent")

    monkeypatch.setattr(cli, "drive", refuse)


def existing_pid_free() -> int:
    pid = 999999
    while Path(f"/proc/{pid}").exists():
        pid += 1
    return pid


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["coordinator", "--poll-ms", "1e9"], "--poll-ms must be at most 10000, got 1e+09"),
        (["router", "--warmup", "100000"], "argument --warmup: expected at most 1000"),
        (["router", "--duration", "-1s"], "argument --duration: expected a positive duration"),
        (["router", "--timeout", "-0.5"], "argument --timeout: expected a positive duration"),
        (["router", "--duration", "infs"], "argument --duration: expected a positive duration"),
        (["kvstore", "--layer-bytes", "2GiB"], "one data-plane message carries at most"),
        (["kvstore", "--num-blocks", "100000"], "one data-plane write names at most"),
        (["kvstore", "--num-layers", "2000"], "a kvstore block has at most 1024"),
        (["router", "--server-pid", "{pid}"], "--server-pid {pid}: no such local process"),
        (["router", "--label", "a/b"], "argument --label: expected a plain label"),
        (["router", "--label", "x/../../../escaped"], "argument --label: expected a plain label"),
        (["router", "--label", ".."], "argument --label: expected a plain label"),
        (["router", "--label", "a\nb"], "argument --label: expected a plain label"),
        (["router", "--nonce", "n/1"], "argument --nonce: expected a plain nonce"),
        (["router", "--out", "{d}"], "router.json is a directory"),
    ],
)
def test_bad_flags_are_one_line_before_any_load(tmp_path, capsys, no_load, argv, message):
    """Each was a traceback (numpy's allocation), a run of unbounded length, argparse's
    "expected one argument", a file written outside --out, or a report lost after the load."""
    (tmp_path / "router.json").mkdir()
    fill = {"d": tmp_path, "pid": existing_pid_free()}
    argv = [a.format(**fill) for a in argv]
    target = ["--target", "127.0.0.1:1"]
    cycle = ["--op", "cycle", "--donor", "d", "--helper", "p"] if argv[0] == "coordinator" else []
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    assert exit_code(["loadtest", argv[0], *target, *cycle, *argv[1:], *out]) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) in (["router.json"], ["out", "router.json"])


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/sys/kernel").is_dir(), reason="needs root and /sys"
)
def test_an_out_dir_that_root_may_access_but_not_write_is_refused():
    """``os.access`` says yes to root in /sys: the run went ahead and lost its report."""
    with pytest.raises(ConfigError, match="cannot write a file there"):
        checks.output_paths(Path("/sys/kernel"), "router")


def test_an_out_dir_is_probed_by_writing_and_leaves_nothing(tmp_path):
    paths = checks.output_paths(tmp_path, "router-x")
    assert [p.name for p in paths] == ["router-x.json", "router-x.csv", "router-x-samples.csv"]
    assert list(tmp_path.iterdir()) == []


# ---- 3. SIGTERM ends a run as Ctrl-C does ------------------------------------------------------

SIGTERM_CHILD = """
import asyncio, sys
from bench.loadtest import cli
from services.cli import main

class Cycle:  # a coordinator cycle's shape: cleanup (an abort RPC) when cancelled
    name, sample_names, target, grpc_service = "request", ("request",), "h:1", "x"
    async def setup(self): ...
    async def server_state(self): return {"held": {}}
    def describe(self): return {}
    async def close(self): print("closed", file=sys.stderr, flush=True)
    async def run_one(self, index, rec):
        try:
            print("started", file=sys.stderr, flush=True)
            await asyncio.sleep(3600)
        except BaseException:
            await asyncio.shield(asyncio.sleep(0.05))
            print("aborted", file=sys.stderr, flush=True)
            raise

cli.build_scenario = lambda service, args: Cycle()
sys.exit(main(["loadtest", "router", "--target", "127.0.0.1:1", "--warmup", "0",
               "--out", sys.argv[1]]))
"""


@pytest.mark.integration
def test_sigterm_cancels_the_run_after_its_cleanup_and_exits_143(tmp_path):
    """SIGTERM killed the process at once: a cycle's migration was left ACTIVE."""
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        for line in child.stderr:
            if line.strip() == "started":
                break
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=20)
        err = child.stderr.read()
    finally:
        child.kill()
    assert code == 143
    assert err.index("aborted") < err.index("closed") < err.index("terminated (SIGTERM)")


# ---- 4a, 8. the leak check: a failed read is reported, and counts are against the baseline ----


def test_a_failed_leak_check_is_reported_with_the_results(tmp_path, capsys, monkeypatch):
    """ListWorkers raising DEADLINE_EXCEEDED after the load lost the table and the files."""
    scenario = FakeScenario(fail_state_after=1)  # the baseline is read; every later read fails
    monkeypatch.setattr(cli, "build_scenario", lambda service, args: scenario)
    argv = ["loadtest", "router", "--target", "127.0.0.1:1", "--max-requests", "2",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "LEAK CHECK FAILED: DEADLINE_EXCEEDED: Deadline Exceeded" in out
    report = json.loads((tmp_path / "router.json").read_text())
    (step,) = report["steps"]
    assert step["server_after"]["leak_check_failed"] == "DEADLINE_EXCEEDED: Deadline Exceeded"
    assert step["rpcs"][0]["ok"] == 2
    assert (tmp_path / "router-samples.csv").exists()


class Stats:
    def __init__(self, num_pins: int) -> None:
        self.num_pins = num_pins

    async def Stats(self, request, timeout):  # noqa: ANN001, ANN201, N802 - the stub's
        return kvstore_pb2.KVStoreServiceStatsResponse(num_pins=self.num_pins)


def test_a_pin_held_before_the_run_is_not_its_leak():
    """A pin an earlier run left (inside the store's TTL) failed the next clean run."""
    scenario = KVStoreScenario("h:1", KVStoreLoad(op="lookup"))
    node = Node("kvstore-0", Stats(num_pins=1), None)
    scenario._nodes = {"kvstore-0": node}
    before = asyncio.run(scenario.server_state())["held"]
    assert before == {"kvstore-0 pins": 1, "kvstore-0 reservations": 0}
    after = asyncio.run(cli.settled_state(scenario, before))
    assert after["leaks"] == ""
    node.stub.num_pins = 2
    after = asyncio.run(cli.settled_state(scenario, before))
    assert after["leaks"] == "kvstore-0 pins 2 (1 before the run)"
    assert checks.leaks_of({"a": 0, "b": 3}, {}) == "b 3"


# ---- 7. the stream sink takes a prefill worker's transfer --------------------------------------


@pytest.mark.integration
def test_the_stream_sink_takes_the_prefill_workers_own_transfer():
    """``--sink-transport stream`` refused every transfer: the worker opens with ``open``."""
    from services.common.config import RpcConfig
    from services.common.kv_layout import KVLayout
    from services.prefill.clients import GrpcKVTransport
    from services.prefill.dataplane_transport import TargetKVTransport
    from services.prefill.transport import KVTarget

    async def transfer() -> tuple[int, KVSink]:
        sink = KVSink("stream")
        await sink.start()
        transport = TargetKVTransport(GrpcKVTransport(RpcConfig()), None)
        try:
            proto = sink.target("r1")
            target = KVTarget("loadtest-kv-sink", proto.address, "r1")
            sender = await transport.open(target, "req-1", 2, 10.0)
            data = torch.zeros(2, 1, 16, 2, 4)

            def send_layers() -> None:  # from another thread, as the engine's does
                for layer in range(2):
                    layout = KVLayout("fp", layer, 16, (bytes(16),), "float32", 16, 2, 4, 0)
                    sender.send_layer(data, layout)

            await asyncio.to_thread(send_layers)
            stats = await sender.finish(7, time.monotonic())
            return stats.num_bytes, sink
        finally:
            await transport.close()
            await sink.stop()

    num_bytes, sink = asyncio.run(transfer())
    assert num_bytes == sink.num_bytes == 2 * 2 * 16 * 2 * 4 * 4
    assert (sink.num_transfers, sink.num_open) == (1, 0)


def test_a_prefill_warm_up_failure_names_the_likely_set_up():
    scenario = PrefillScenario("h:1", PrefillLoad(sink_transport="tcp"))
    told = scenario.hint("PERMISSION_DENIED", "... is not a worker the router registered")
    assert "run it without --router" in told
    assert "--sink-transport stream" in scenario.hint("UNAVAILABLE", "KV to loadtest-kv-sink")


# ---- 9. the wrong service is named ----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("grpc_server", ["empty"], indirect=True)
def test_the_wrong_service_is_named_in_the_error(grpc_server, tmp_path, capsys):
    """It said only "UNIMPLEMENTED: Method not found!"."""
    code = main(["loadtest", "kvstore", "--target", grpc_server, "--timeout", "5s",
                 "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "UNIMPLEMENTED: Method not found!" in err
    assert f"{grpc_server} does not serve banaserve.v1.KVStoreService" in err
