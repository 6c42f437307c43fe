"""``banaserve up``'s command: its flags, the ``ClusterSpec`` they (or ``--mode``) make, and the
run — start the ``LocalCluster`` (launcher.py: what starts, in which order, how it stops), print
every service's address, then supervise it (services/supervisor.py: a child that dies is
restarted on its port) until SIGINT/SIGTERM, and stop it: the router drains first (requests
in flight get its ``--drain-timeout`` to finish on the workers), then the rest (launcher.py);
a second signal kills what still runs. A signal before the cluster is ready stops what had
started at once (no "cluster ready"), exit status 128 + the signal (130 for Ctrl-C, 143 for
SIGTERM); after, a clean stop exits 0.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from typing import Any

from services.child_process import StartInterrupted
from services.common.arg_types import non_negative, positive, shell_words, thread_count
from services.common.engine_args import KV_TRANSPORTS
from services.common.errors import ConfigError, ModelNotFoundError
from services.engine.models.prepare import resolve_model
from services.launcher import LOCAL_DATA_PLANE, ClusterSpec, LocalCluster, Mode, mode_spec
from services.rpc.dataplane import KINDS as DATA_TRANSPORTS
from services.rpc.security import add_security_args
from services.supervisor import ChildState, Supervisor, add_restart_arguments, restart_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llama", help="prepared model name or directory")
    p.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=None,
        help="colocated: --workers mixed workers, prefix-affinity routing, no store; static-pd: "
        "--prefill of --workers prefill, the rest decode, no store, no migration; banaserve: "
        "the same split + KV store + load routing + the coordinator in automatic mode "
        "(default: no mode, the flags below as given)",
    )
    # The flags a --mode decides default to None, so that one given is told from a default
    # (cluster_spec refuses it) and the rest take ClusterSpec's defaults.
    p.add_argument(
        "--workers",
        type=positive(int),
        default=None,
        help="with --mode: workers in all (default 2)",
    )
    p.add_argument(
        "--prefill",
        type=non_negative(int),
        default=None,
        help="prefill workers (default 1; with a PD --mode: half of --workers)",
    )
    p.add_argument(
        "--decode",
        type=non_negative(int),
        default=None,
        help="decode workers (default 1; not with --mode)",
    )
    p.add_argument(
        "--mixed",
        type=non_negative(int),
        default=None,
        help="mixed workers, prefill and decode colocated (default 0; not with --mode)",
    )
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads per worker")
    p.add_argument("--pin", action="store_true", help="pin each worker to its own CPU")
    p.add_argument(
        "--policy",
        default=None,
        choices=("load", "round_robin", "prefix_affinity", "colocated"),
        help="routing policy (default load; not with --mode)",
    )
    p.add_argument("--num-kv-blocks", type=positive(int), default=None, help="KV blocks per worker")
    p.add_argument(
        "--kvstore",
        type=non_negative(int),
        default=None,
        help="KV store nodes (default 1; 0: no store and no Redis; not with --mode)",
    )
    p.add_argument(
        "--kvstore-transport",
        default=LOCAL_DATA_PLANE,
        choices=DATA_TRANSPORTS,
        help="the KV store's data plane (default tcp: faster than UCX on one host, docs/services.md)",
    )
    p.add_argument(
        "--kv-transport",
        default=LOCAL_DATA_PLANE,
        choices=KV_TRANSPORTS,
        help="the data plane KV moves on from prefill to decode workers (none: gRPC stream; "
        "default tcp: faster than UCX on one host, docs/services.md)",
    )
    p.add_argument(
        "--kvstore-capacity-bytes",
        type=positive(int),
        default=1 << 30,
        help="host memory per KV store node",
    )
    p.add_argument(
        "--no-kvstore-overlap",
        dest="kvstore_overlap",
        action="store_false",
        help="prefill workers fetch a cached prefix whole before computing (baseline)",
    )
    p.add_argument(
        "--store-write-back-delay",
        type=non_negative(float),
        default=None,
        metavar="S",
        help="prefill workers write new blocks to the store once idle, or after at most S "
        "seconds (0: at once; default: the prefill worker's, 5)",
    )
    p.add_argument(
        "--store-write-policy",
        choices=("reused", "all"),
        default=None,
        help="which new blocks prefill workers write to the store: 'reused' (asked for "
        "before) or 'all' (default: the prefill worker's, reused; docs/kvstore.md)",
    )
    p.add_argument(
        "--coordinator",
        action="store_true",
        default=None,
        help="also start the coordinator (migrations; not with --mode: banaserve has one)",
    )
    p.add_argument(
        "--coordinator-args",
        type=shell_words,
        default="",
        metavar="ARGS",
        help='extra flags for the coordinator, one string (e.g. "--gap-high 0.3 --cooldown-s 5" '
        "with --mode banaserve, whose coordinator runs --auto; docs/coordinator.md)",
    )
    for role, whom, example in (
        ("router", "the router", "--local-prefill-max-tokens 64"),
        ("prefill", "every prefill worker", "--max-num-batched-tokens 512"),
        ("decode", "every decode worker (mixed ones too)", "--max-num-seqs 64"),
        ("kvstore", "every kvstore node", "--tracing otlp --seen-window 30"),
    ):
        p.add_argument(
            f"--{role}-args",
            type=shell_words,
            default="",
            metavar="ARGS",
            help=f'extra flags for {whom}, one string (e.g. "{example}")',
        )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="every service serves Prometheus metrics on a free port of 127.0.0.1 (printed "
        "once the cluster is ready; a --metrics-port in a service's --*-args wins)",
    )
    add_security_args(p)
    add_restart_arguments(p)


# What ``--mode`` decides: each ClusterSpec field (launcher.MODE_FIELDS) and the flag that sets
# it without a mode.
MODE_FLAGS = {"num_decode": "decode", "num_mixed": "mixed", "policy": "policy",
              "num_kvstore": "kvstore", "coordinator": "coordinator"}  # fmt: skip


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """``--mode`` decides the workers, routing, store and coordinator (a flag given for one of
    those is refused, by ``mode_spec``); else the flags do, ClusterSpec's defaults the rest."""
    common: dict[str, Any] = dict(
        model=args.model,
        threads=args.threads,
        pin=args.pin,
        num_kv_blocks=args.num_kv_blocks,
        kvstore_transport=args.kvstore_transport,
        kv_transport=args.kv_transport,
        kvstore_capacity_bytes=args.kvstore_capacity_bytes,
        kvstore_overlap=args.kvstore_overlap,
        store_write_back_delay_s=args.store_write_back_delay,
        store_write_policy=args.store_write_policy,
        tls_dir=args.tls_dir,
        api_token_file=args.api_token_file,
        metrics=args.metrics,
    )
    extra = {"coordinator": args.coordinator_args, "router": args.router_args,
             "prefill": args.prefill_args, "decode": args.decode_args,
             "kvstore": args.kvstore_args}  # fmt: skip
    if service_args := {k: tuple(shlex.split(v)) for k, v in extra.items() if v}:
        common["service_args"] = service_args
    given = {f: v for f, flag in MODE_FLAGS.items() if (v := getattr(args, flag)) is not None}
    if args.mode:
        workers = 2 if args.workers is None else args.workers
        return mode_spec(Mode(args.mode), workers, args.prefill, **given, **common)
    if args.workers is not None:
        raise ConfigError("--workers counts a --mode's workers; without one, pass --prefill, "
                          "--decode and --mixed")  # fmt: skip
    return ClusterSpec(num_prefill=1 if args.prefill is None else args.prefill, **given, **common)


def spec_from_argv(argv: list[str]) -> ClusterSpec:
    """The cluster ``banaserve up ARGV`` would start, read as ``up`` reads it (its flags, then
    ``cluster_spec``), for callers that replay or check an ``up`` command line (``bench
    compare``, the simulator); flags it cannot read are a ``ConfigError``."""
    p = argparse.ArgumentParser(prog="banaserve up", add_help=False, exit_on_error=False)
    add_arguments(p)
    try:
        args, unknown = p.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    if unknown:
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}")
    return cluster_spec(args)


def run_up(args: argparse.Namespace) -> int:
    try:
        spec = cluster_spec(args)
        resolve_model(spec.model)  # a model no worker could load: said before any starts
    except (ConfigError, ModelNotFoundError) as exc:
        print(f"banaserve: error: {exc}", file=sys.stderr)
        return 2
    if unused := spec.unused_service_args:
        names = ", ".join(f"--{name}-args" for name in unused)
        print(f"banaserve: note: {names} not used: this cluster runs no {', '.join(unused)}",
              file=sys.stderr)  # fmt: skip
    restarts = restart_config(args)
    stopping, force, received = threading.Event(), threading.Event(), []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        if stopping.is_set():
            force.set()
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    cluster = LocalCluster(spec, stopping=stopping)
    try:
        cluster.start()
        if stopping.is_set():  # asked for as the last child became ready: still no "ready"
            cluster.stop()
            raise StartInterrupted("stopped as the cluster became ready")
    except StartInterrupted as exc:  # what had started is stopped: start's own cleanup
        print(f"banaserve: {exc}; stopped every service started", file=sys.stderr)
        return 128 + received[0]  # as the shell reports a command the signal ended: 130, 143
    except RuntimeError as exc:
        print(f"banaserve: error: {exc}", file=sys.stderr)
        return 1
    for child in cluster.children:
        print(f"{child.name} {child.address}", flush=True)
    for child in cluster.children:
        if child.metrics_address:
            address = f"{child.metrics_scheme}://{child.metrics_address}/metrics"
            print(f"metrics {child.name} {address}", flush=True)
    if cluster.router.http_address:
        router = cluster.router
        print(f"openai {router.http_scheme}://{router.http_address}/v1", flush=True)
    print(
        f"cluster ready: generate with `banaserve generate --router {cluster.router.address}`",
        flush=True,
    )
    supervisor = Supervisor(cluster.children, restarts, sys.stdout, stopping=stopping)
    if reason := supervisor.run():
        print(f"banaserve: error: {reason}; stopping the cluster", file=sys.stderr)
    else:
        print(
            f"banaserve: stopping: requests in flight get up to {cluster.router.drain_timeout_s:g}s "
            "to finish (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
    unclean = _stop(cluster, supervisor, force)
    if force.is_set():  # killed on a second signal: the status a shell gives a command it ended
        return 128 + received[-1]
    return 1 if unclean or reason else 0


def _stop(cluster: LocalCluster, supervisor: Supervisor, force: threading.Event) -> bool:
    """Stops every child (``force`` set: kills those left); True if one that was serving did
    not stop cleanly (one waiting to be restarted, or still starting, has no clean stop to
    make)."""
    serving = {n for n, state in supervisor.states().items() if state is ChildState.RUNNING}
    codes = cluster.stop(force)
    if force.is_set():
        print("banaserve: stopped at once: what was still running was killed", file=sys.stderr)
    bad = {n: c for n, c in codes.items() if c != 0 and n in serving}
    for name, code in bad.items():
        print(f"banaserve: {name} stopped with code {code}", file=sys.stderr)
    return bool(bad)
