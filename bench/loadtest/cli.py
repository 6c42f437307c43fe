"""``banaserve loadtest SERVICE``: drive one service alone, bounded, and report per RPC.

    banaserve loadtest kvstore --target HOST:PORT --users 32 --duration 30s
    banaserve loadtest router --target HOST:PORT --rate 10,20,40 --duration 20s \\
        --p99-target-ms 1000

Lifecycle of a run:
1. the service's scenario is built from the flags and set up (``setup``: connections, data
   the iterations need, in-process peers) and ``--warmup`` iterations run unrecorded; the
   first failure there ends the run with its status, before any load is sent;
   (each bounded by ``--timeout``); the service's own counters are read once before it, the
   baseline of the leak check;
2. each step (one per value of ``--users`` or ``--rate``) is one bounded run of the driver
   (``bench.loadtest.driver``), its iteration indices continuing the last step's (no prompt is
   sent twice in a run), then the service's own counters are read until none is above its
   baseline (polled up to ``SETTLE_S``: freeing after a cancel is asynchronous); a failed read
   is reported as the step's leak check failure, never the end of the run;
3. the report (``bench.loadtest.report``) is printed as markdown and written to ``--out`` as
   ``SERVICE[-LABEL].json``, ``.csv`` and ``-samples.csv``.
SIGTERM ends a run as Ctrl-C does: what runs is cancelled, and its cleanup (a cycle's
migration aborted) done, then exit 143 (130 for Ctrl-C).
Exit status: 0 when every step had successful iterations and left nothing behind, else 1;
2 for bad flags (checked with ``--out`` before anything connects: ``bench.loadtest.checks``) or
a failed setup or warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import math
import re
import signal
import sys
import time
from pathlib import Path

import grpc

from bench.loadtest import coordinator, decode, kvstore, prefill, router
from bench.loadtest.checks import check_pids, label_arg, leaks_of, nonce_arg, output_paths
from bench.loadtest.credentials import Credentials
from bench.loadtest.credentials import hint as credentials_hint
from bench.loadtest.driver import (
    LoadSpec,
    Loop,
    RunResult,
    Scenario,
    message_of,
    new_nonce,
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
from services.rpc.dataplane import DataPlaneError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "loadtest"
SETTLE_S = 5.0
STATE_TIMEOUT_S = 10.0  # one read of the service's counters
MAX_WARMUP = 1000
UNITS_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# What a call to the service can fail with (outside an iteration, which records any failure).
SERVICE_ERRORS = (OSError, grpc.RpcError, DataPlaneError, TimeoutError)
EXIT_SIGTERM = 128 + signal.SIGTERM
# A negative number, with or without a unit ("-1s"): a flag's value, never a flag.
NEGATIVE_VALUE = re.compile(r"-\.?\d")


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


class Terminated(Exception):
    """SIGTERM ended the run (after its cleanup)."""


class LoadtestParser(argparse.ArgumentParser):
    """Takes ``--duration -1s`` as the flag and its (bad) value, as ``--duration=-1s``: argparse
    reads "-1s" as an unknown flag and says only "expected one argument"."""

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's
        args = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        for arg in args:
            flag = joined[-1] if joined else ""
            if NEGATIVE_VALUE.match(arg) and flag.startswith("--") and "=" not in flag:
                joined[-1] = f"{flag}={arg}"
            else:
                joined.append(arg)
        return super().parse_known_args(joined, namespace)


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
    if not (value > 0 and math.isfinite(value)):
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
    p.add_argument("--warmup", type=non_negative(int, at_most=MAX_WARMUP), default=1,
                   help="unrecorded iterations first (default 1; they reach the service: its "
                   "counters count them), each bounded by --timeout")  # fmt: skip
    p.add_argument("--p99-target-ms", type=positive(float), default=None,
                   help="SLO: each step passes if the --slo name's p99 is within this")  # fmt: skip
    p.add_argument("--slo", default=None,
                   help="with --p99-target-ms: the name it applies to, one the service's load "
                   "test records (default: the iteration)")  # fmt: skip
    p.add_argument("--server-pid", type=number_list(int), default=None, metavar="PID[,PID]",
                   help="local processes of the service: report their CPU use per step")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="arrival times, KV values, prompt contents (with the nonce)")  # fmt: skip
    p.add_argument("--nonce", type=nonce_arg, default=None,
                   help="prompts are keyed by seed, nonce and index; default a fresh nonce per "
                   "run (never a cache hit): a report's nonce sends its prompts again")  # fmt: skip
    p.add_argument("--out", type=path_arg, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--label", type=label_arg, default=None,
                   help="file suffix: SERVICE-LABEL.json (a plain file-name part)")  # fmt: skip
    p.add_argument("--tls-dir", default="", metavar="DIR",
                   help="mutual TLS with the certificates `banaserve certs DIR` wrote, each of the "
                   "roles this load test plays (docs/loadtest.md; default: plaintext)")  # fmt: skip
    p.add_argument("--api-token-file", default="", metavar="FILE",
                   help="bearer tokens, one per line: the first is sent where the service's "
                   "client API wants one (router, coordinator)")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(
        dest="service", required=True, metavar="SERVICE", parser_class=LoadtestParser
    )
    for service in Service:
        sp = sub.add_parser(service.value, help=HELP[service], description=HELP[service])
        sp.set_defaults(loadtest_service=service)
        add_common(sp)
        MODULES[service].add_arguments(sp)


def rpc_timeout(load_class: type, args: argparse.Namespace) -> float:
    """A scenario's bound on each of its calls (setup's included), within ``--timeout``."""
    return min(load_class.rpc_timeout_s, args.timeout)


def build_scenario(service: Service, args: argparse.Namespace) -> Scenario:
    """The service's scenario; every certificate the roles it plays need is checked here,
    before anything connects (a missing one is refused naming the file)."""
    nonce = args.nonce or new_nonce()
    creds = Credentials.from_args(args)
    try:
        if service is Service.KVSTORE:
            (layer_bytes,) = size_list(args.layer_bytes)
            load = kvstore.KVStoreLoad(
                args.op, args.num_prefixes, args.num_blocks, args.num_layers, layer_bytes,
                args.write_fraction, seed=args.seed, nonce=nonce,
                rpc_timeout_s=rpc_timeout(kvstore.KVStoreLoad, args),
            )  # fmt: skip
            return kvstore.KVStoreScenario(args.target, load, credentials=creds)
        if service is Service.DECODE:
            load = decode.DecodeLoad(
                args.model, args.dtype, args.block_size, args.prompt_len, args.max_tokens,
                args.kv_transport, seed=args.seed, nonce=nonce,
                rpc_timeout_s=rpc_timeout(decode.DecodeLoad, args),
            )  # fmt: skip
            return decode.DecodeScenario(args.target, load, credentials=creds)
        if service is Service.PREFILL:
            load = prefill.PrefillLoad(
                args.prompt_len, args.vocab_range,
                prefill.sink_transport(args.sink_transport, creds), seed=args.seed,
                nonce=nonce, rpc_timeout_s=rpc_timeout(prefill.PrefillLoad, args),
            )  # fmt: skip
            return prefill.PrefillScenario(args.target, load, credentials=creds)
        if service is Service.COORDINATOR:
            if args.op == "cycle" and (args.rate or (args.users and args.users != [1])):
                raise ConfigError(
                    "--op cycle runs one migration at a time (the coordinator takes one action "
                    "per worker): closed loop, --users 1"
                )
            load = coordinator.CoordinatorLoad(
                args.op, args.live_only, args.donor, args.helper, args.start_layer,
                args.end_layer, args.poll_ms / 1000,
                rpc_timeout_s=rpc_timeout(coordinator.CoordinatorLoad, args),
            )  # fmt: skip
            return coordinator.CoordinatorScenario(args.target, load, credentials=creds)
        load = router.RouterLoad(
            args.prompt_len, args.max_tokens, args.vocab_range, args.stub_workers, args.model,
            seed=args.seed, nonce=nonce, rpc_timeout_s=rpc_timeout(router.RouterLoad, args),
        )  # fmt: skip
        return router.RouterScenario(args.target, load, credentials=creds)
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


async def read_state(scenario: Scenario, timeout_s: float = STATE_TIMEOUT_S) -> dict:
    try:
        async with asyncio.timeout(timeout_s):
            return await scenario.server_state()
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout_s:g} s") from None


async def settled_state(scenario: Scenario, before: dict[str, int]) -> dict:
    """The service's counters once none is above its count ``before`` the run, or as they are
    after SETTLE_S; a read that fails is named (``leak_check_failed``), not raised: the run's
    results are reported whatever the service does after it."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            state = await read_state(scenario)
        except SERVICE_ERRORS as exc:
            failed = f"{status_of(exc)}: {message_of(exc)}{hint(scenario, exc)}"
            return {"leaks": "", "leak_check_failed": failed}
        state["leaks"] = leaks_of(state["held"], before)
        if not state["leaks"] or time.monotonic() > deadline:
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


def hint(scenario: Scenario, exc: BaseException) -> str:
    """What a failure likely means, where the load test can tell: " (...)" or ""."""
    status = status_of(exc)
    if status == "UNIMPLEMENTED":
        expected = getattr(scenario, "grpc_service", "")
        target = getattr(scenario, "target", "the target")
        return f" ({target} does not serve {expected}: is --target the right service?)"
    told = getattr(scenario, "hint", None)
    said = told(status, message_of(exc)) if told else ""
    credentials = getattr(scenario, "credentials", None)
    if said or credentials is None:
        return said
    return credentials_hint(credentials, status, message_of(exc))


async def prepare(scenario: Scenario, warmup: int, timeout_s: float | None) -> dict[str, int]:
    """Setup, the service's counters before any load (the leak check's baseline), warm-up."""
    bound = STATE_TIMEOUT_S if timeout_s is None else min(timeout_s, STATE_TIMEOUT_S)
    what = "setup"
    try:
        await scenario.setup()
        what = "reading the service's counters (the leak check's baseline)"
        before = (await read_state(scenario, bound))["held"]
    except SERVICE_ERRORS as exc:
        message = f"{what} failed: {status_of(exc)}: {message_of(exc)}{hint(scenario, exc)}"
        raise ConfigError(message) from exc
    try:
        await warm_up(scenario, warmup, timeout_s)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{hint(scenario, exc.__cause__ or exc)}") from exc.__cause__
    return before


async def drive(
    scenario: Scenario, specs: list[LoadSpec], warmup: int, pids: list[int] | None = None
) -> tuple[list[RunResult], list[dict], dict[str, int]]:
    """Every step, with SIGTERM cancelling the run as Ctrl-C does (``Terminated`` once its
    cleanup is done)."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    terminated = asyncio.Event()

    def terminate() -> None:
        terminated.set()
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await drive_steps(scenario, specs, warmup, pids)
    except asyncio.CancelledError:
        if terminated.is_set():
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def drive_steps(
    scenario: Scenario, specs: list[LoadSpec], warmup: int, pids: list[int] | None
) -> tuple[list[RunResult], list[dict], dict[str, int]]:
    try:
        before = await prepare(scenario, warmup, specs[0].timeout_s if specs else None)
        results, steps, next_index = [], [], 0
        for i, spec in enumerate(specs):
            spec = dataclasses.replace(spec, first_index=next_index)
            print(f"loadtest: step {i}: {spec.label} for {spec.duration_s:g} s", file=sys.stderr)
            cpu_before = server_cpu(pids)
            result = await run_load(scenario, spec)
            cpu_after = server_cpu(pids)
            used = None
            if cpu_before is not None:
                used = {p: cpu_after[p] - cpu_before[p] for p in cpu_after if p in cpu_before}
            results.append(result)
            steps.append(step_summary(result, await settled_state(scenario, before), used))
            next_index = result.next_index
        return results, steps, before
    finally:
        try:
            await scenario.close()
        except Exception as exc:  # the results stand: closing is not part of them
            print(f"loadtest: closing failed: {status_of(exc)}: {message_of(exc)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    service = args.loadtest_service
    scenario = build_scenario(service, args)
    specs = specs_of(args)
    slo = slo_of(args, scenario)
    check_pids(args.server_pid)
    stem = f"{service.value}-{args.label}" if args.label else service.value
    paths = output_paths(Path(args.out), stem)  # before any load: its results are never lost
    machine = machine_info()
    try:
        results, steps, before = asyncio.run(drive(scenario, specs, args.warmup, args.server_pid))
    except Terminated:
        print("loadtest: terminated (SIGTERM); nothing reported", file=sys.stderr)
        return EXIT_SIGTERM
    machine["loadavg_after"] = loadavg()
    report = {
        "service": service.value,
        "target": args.target,
        "scenario": scenario.describe(),
        "machine": machine,
        "server_before": before,
        "steps": steps,
        "sweep": sweep_summary(steps, slo),
    }
    print(render_markdown(report))
    try:
        write_files(report, results, paths[0].parent, stem)
    except OSError as exc:
        print(f"loadtest: could not write the report to {args.out}: {exc}", file=sys.stderr)
        return 1
    print("loadtest: wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    ok = all(s["num_iterations"] and s["rpcs"][0]["ok"] for s in steps)
    after = [s["server_after"] for s in steps]
    clean = not any(a.get("leaks") or a.get("leak_check_failed") for a in after)
    return 0 if ok and clean else 1
