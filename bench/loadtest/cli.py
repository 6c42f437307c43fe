"""``banaserve loadtest SERVICE``: drive one service alone, bounded, and report per RPC.

    banaserve loadtest kvstore --target HOST:PORT --users 32 --duration 30s
    banaserve loadtest router --target HOST:PORT --rate 10,20,40 --duration 20s \\
        --p99-target-ms 1000

Lifecycle of a run:
1. the service's scenario is built from the flags and set up (``setup``: connections, data
   the iterations need, in-process peers) and ``--warmup`` iterations run unrecorded; the
   first failure there ends the run with its status, before any load is sent;
2. each step (one per value of ``--users`` or ``--rate``) is one bounded run of the driver
   (``bench.loadtest.driver``), then the service's own counters are read until they show
   nothing left behind (polled up to ``SETTLE_S``: freeing after a cancel is asynchronous);
3. the report (``bench.loadtest.report``) is written to ``--out`` as ``SERVICE[-LABEL].json``,
   ``.csv`` and ``-samples.csv``, and printed as markdown.
Exit status: 0 when every step had successful iterations and left nothing behind, else 1;
2 for bad flags (checked with ``--out`` before anything connects) or a failed warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import sys
import time
from pathlib import Path

import grpc

from bench.loadtest import coordinator, decode, kvstore, prefill, router
from bench.loadtest.driver import (
    LoadSpec,
    Loop,
    RunResult,
    Scenario,
    message_of,
    process_cpu_seconds,
    run_load,
    status_of,
    warm_up,
)
from bench.loadtest.report import Slo, render_markdown, step_summary, sweep_summary, write_files
from bench.machine import loadavg, machine_info
from bench.transport_bench import size_list
from services.common.arg_types import host_port, non_negative, number_list, path_arg, positive
from services.common.errors import ConfigError
from services.common.paths import output_dir
from services.rpc.dataplane import DataPlaneError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "loadtest"
SETTLE_S = 5.0
UNITS_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class Service(enum.Enum):
    ROUTER = "router"
    PREFILL = "prefill"
    DECODE = "decode"
    KVSTORE = "kvstore"
    COORDINATOR = "coordinator"


HELP = {
    Service.ROUTER: "Generate through the router (its real workers, or --stub-workers)",
    Service.PREFILL: "Prefill on a prefill worker, its KV sent to an in-process sink",
    Service.DECODE: "ReserveKV + KV transfer + StreamTokens on a decode worker",
    Service.KVSTORE: "Lookup / Pin / data-plane read / two-phase write / Unpin on a kvstore",
    Service.COORDINATOR: "ListMigrations / DescribeMigration, or whole layer migrations "
    "started and reverted, on a coordinator",
}
MODULES = {
    Service.ROUTER: router,
    Service.PREFILL: prefill,
    Service.DECODE: decode,
    Service.KVSTORE: kvstore,
    Service.COORDINATOR: coordinator,
}


def seconds(text: str) -> float:
    """ "30s", "500ms", "2m", "1h" or a plain number of seconds."""
    number = text.rstrip("mshMSH")
    unit = text[len(number) :].lower() or "s"
    try:
        value = float(number) * UNITS_S[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30s or 500ms, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return value


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        type=host_port,
        required=True,
        metavar="HOST:PORT",
        help="the service's gRPC address",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument("--users", type=number_list(int), default=None,
                      help="closed loop: concurrent users, or a list (a sweep); default 1")  # fmt: skip
    load.add_argument("--rate", type=number_list(float), default=None,
                      help="open loop: Poisson arrivals per second, or a list (a sweep)")  # fmt: skip
    p.add_argument("--duration", type=seconds, default=30.0, help="per step (default 30s)")
    p.add_argument("--max-requests", type=positive(int), default=None, help="per step, at most")
    p.add_argument("--timeout", type=seconds, default=30.0, help="per iteration (default 30s)")
    p.add_argument("--max-in-flight", type=positive(int), default=1024,
                   help="open loop: at most in flight")  # fmt: skip
    p.add_argument("--warmup", type=non_negative(int), default=1,
                   help="unrecorded iterations first")  # fmt: skip
    p.add_argument("--p99-target-ms", type=positive(float), default=None,
                   help="SLO: each step passes if the --slo name's p99 is within this")  # fmt: skip
    p.add_argument("--slo", default=None,
                   help="with --p99-target-ms: the name it applies to, one the service's load "
                   "test records (default: the iteration)")  # fmt: skip
    p.add_argument("--server-pid", type=number_list(int), default=None, metavar="PID[,PID]",
                   help="local processes of the service: report their CPU use per step")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=path_arg, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--label", default="", help="file suffix: SERVICE-LABEL.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for service in Service:
        sp = sub.add_parser(service.value, help=HELP[service], description=HELP[service])
        sp.set_defaults(loadtest_service=service)
        add_common(sp)
        MODULES[service].add_arguments(sp)


def build_scenario(service: Service, args: argparse.Namespace) -> Scenario:
    try:
        if service is Service.KVSTORE:
            (layer_bytes,) = size_list(args.layer_bytes)
            load = kvstore.KVStoreLoad(
                args.op, args.num_prefixes, args.num_blocks, args.num_layers, layer_bytes,
                args.write_fraction, seed=args.seed,
            )  # fmt: skip
            return kvstore.KVStoreScenario(args.target, load)
        if service is Service.DECODE:
            load = decode.DecodeLoad(
                args.model, args.dtype, args.block_size, args.prompt_len, args.max_tokens,
                args.kv_transport, seed=args.seed,
            )  # fmt: skip
            return decode.DecodeScenario(args.target, load)
        if service is Service.PREFILL:
            load = prefill.PrefillLoad(
                args.prompt_len, args.vocab_range, args.sink_transport, seed=args.seed
            )
            return prefill.PrefillScenario(args.target, load)
        if service is Service.COORDINATOR:
            if args.op == "cycle" and (args.rate or (args.users and args.users != [1])):
                raise ConfigError(
                    "--op cycle runs one migration at a time (the coordinator takes one action "
                    "per worker): closed loop, --users 1"
                )
            load = coordinator.CoordinatorLoad(
                args.op, args.live_only, args.donor, args.helper, args.start_layer,
                args.end_layer, args.poll_ms / 1000,
            )  # fmt: skip
            return coordinator.CoordinatorScenario(args.target, load)
        load = router.RouterLoad(
            args.prompt_len, args.max_tokens, args.vocab_range, args.stub_workers, args.model,
            seed=args.seed,
        )  # fmt: skip
        return router.RouterScenario(args.target, load)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def slo_of(args: argparse.Namespace, scenario: Scenario) -> Slo | None:
    """``--p99-target-ms`` for the ``--slo`` name, which must be one the scenario records."""
    if args.p99_target_ms is None:
        if args.slo:
            raise ConfigError("--slo names what --p99-target-ms applies to; pass both")
        return None
    name = args.slo or scenario.name
    if name not in scenario.sample_names:
        known = ", ".join(scenario.sample_names)
        raise ConfigError(f"--slo {name!r}: this load test records {known}")
    return Slo(name, args.p99_target_ms)


def specs_of(args: argparse.Namespace) -> list[LoadSpec]:
    common = {
        "duration_s": args.duration,
        "max_requests": args.max_requests,
        "timeout_s": args.timeout,
        "max_in_flight": args.max_in_flight,
        "seed": args.seed,
    }
    if args.rate:
        return [LoadSpec(Loop.OPEN, rate=r, **common) for r in args.rate]
    return [LoadSpec(Loop.CLOSED, users=u, **common) for u in args.users or [1]]


async def settled_state(scenario: Scenario) -> dict:
    """The service's counters once nothing is left behind, or as they are after SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        state = await scenario.server_state()
        if not state.get("leaks") or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.1)


def server_cpu(pids: list[int] | None) -> dict[int, float] | None:
    """CPU seconds of each watched process still alive (one that died is left out)."""
    if not pids:
        return None
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            seconds[pid] = process_cpu_seconds(pid)
    return seconds


async def drive(
    scenario: Scenario, specs: list[LoadSpec], warmup: int, pids: list[int] | None = None
) -> tuple[list[RunResult], list[dict]]:
    try:
        try:
            await scenario.setup()
        except (OSError, grpc.RpcError, DataPlaneError, TimeoutError) as exc:
            raise ConfigError(f"setup failed: {status_of(exc)}: {message_of(exc)}") from exc
        await warm_up(scenario, warmup)
        results, steps = [], []
        for i, spec in enumerate(specs):
            print(f"loadtest: step {i}: {spec.label} for {spec.duration_s:g} s", file=sys.stderr)
            before = server_cpu(pids)
            result = await run_load(scenario, spec)
            after = server_cpu(pids)
            used = None if before is None else {p: after[p] - before[p] for p in after}
            results.append(result)
            steps.append(step_summary(result, await settled_state(scenario), used))
        return results, steps
    finally:
        await scenario.close()


def run(args: argparse.Namespace) -> int:
    service = args.loadtest_service
    scenario = build_scenario(service, args)
    specs = specs_of(args)
    slo = slo_of(args, scenario)
    out = output_dir(Path(args.out), "--out")  # before any load: its results are never lost
    machine = machine_info()
    results, steps = asyncio.run(drive(scenario, specs, args.warmup, args.server_pid))
    machine["loadavg_after"] = loadavg()
    report = {
        "service": service.value,
        "target": args.target,
        "scenario": scenario.describe(),
        "machine": machine,
        "steps": steps,
        "sweep": sweep_summary(steps, slo),
    }
    stem = f"{service.value}-{args.label}" if args.label else service.value
    paths = write_files(report, results, out, stem)
    print(render_markdown(report))
    print("loadtest: wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    ok = all(s["num_iterations"] and s["rpcs"][0]["ok"] for s in steps)
    clean = not any(s["server_after"].get("leaks") for s in steps)
    return 0 if ok and clean else 1
