"""``banaserve migrations --watch``: per-worker utilisation and the migrations, every second.

Each refresh reads the router's ``ListWorkers`` (the one source of load reports) and the
coordinator's ``ListMigrations``, and redraws one screen (``render``, pure: what a test
checks). Utilisation is ``services.common.load``'s of each worker's last report, as measured;
in automatic mode the coordinator's listing also carries the U its policy saw at its last
decision (a window's mean, an ACTIVE layer migration's share counted on its helper), shown
beside it.
A service that does not answer (restarting: ``banaserve up`` brings it back in seconds) is
named on the screen in its part's place, and the next refresh tries again; any other refusal
ends the watch.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.arg_types import host_port, non_negative, positive
from services.common.errors import ConfigError
from services.common.load import LoadReport, utilisation_compute, utilisation_memory
from services.rpc import security
from services.rpc.convert import seconds
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.load_reports import load_from_proto

CLEAR = "\x1b[H\x1b[2J"
ENDED = (pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED)
# What a restarting or briefly overloaded service answers: shown, and asked again next refresh.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class WorkerLine:
    worker_id: str
    role: str
    stale: bool
    load: LoadReport | None  # None until its first report
    age_s: float  # since its last report
    waiting_for_room: int = 0  # requests the router holds for its room (memory 1 then)


def worker_lines(reply: router_pb2.ListWorkersResponse) -> list[WorkerLine]:
    return [
        WorkerLine(
            w.info.worker_id,
            common_pb2.WorkerRole.Name(w.info.role).removeprefix("WORKER_ROLE_").lower(),
            w.state != router_pb2.WORKER_STATE_ACTIVE,
            load_from_proto(w.last_load) if w.HasField("last_load") else None,
            seconds(w.since_last_load),
            w.num_waiting_for_room,
        )
        for w in sorted(reply.workers, key=lambda w: w.info.worker_id)
    ]


def render(
    workers: Sequence[WorkerLine],
    migrations: Sequence[pb.Migration],
    format_row: Callable[[pb.Migration, int], str],
    prefill_capacity_tokens: int = 4096,
    at: str = "",
    workers_error: str = "",
    migrations_error: str = "",
    policy: Mapping[str, float] | None = None,
) -> str:
    """One screen: a line per worker (U = max(compute, memory) of its last report, measured;
    ``policy``: the U automatic mode's policy saw at its last decision, a window's mean with an
    ACTIVE layer migration's share counted on its helper, or "-"), then the live migrations and
    the last few that ended. ``*_error``: that part could not be read (shown instead)."""
    policy = policy or {}
    lines = [f"workers{'  ' + at if at else ''}"]
    after = _migration_lines(migrations, format_row, migrations_error)
    if workers_error:
        return "\n".join([*lines, f"  {workers_error}", *after])
    # as wide as the longest id (a compose worker's, decode-10.89.0.5-50065: 22 characters)
    width = max([16, *(len(w.worker_id) for w in workers)])
    lines.append(
        f"  {'worker':<{width}} {'role':<8} {'U':>5} {'policy':>6} {'compute':>8} {'memory':>7} "
        f"{'blocks':>11} {'seqs':>5} {'wait':>5} {'hosted':>7} {'report':>7}"
    )
    for w in workers:
        if w.load is None:
            lines.append(f"  {w.worker_id:<{width}} {w.role:<8} {'-':>5}   no report yet")
            continue
        c = utilisation_compute(w.load, prefill_capacity_tokens)
        m = utilisation_memory(w.load, w.waiting_for_room)
        blocks = f"{w.load.num_blocks_used}/{w.load.num_blocks}"
        # layers run for others / KV blocks held for others (the hosted layers' and attention's)
        held = w.load.num_hosted_layer_blocks + w.load.num_hosted_blocks
        hosted = f"{w.load.num_hosted_layers}L/{held}B"
        age = f"{w.age_s:.1f}s" + (" STALE" if w.stale else "")
        seen = f"{policy[w.worker_id]:.2f}" if w.worker_id in policy else "-"
        lines.append(
            f"  {w.worker_id:<{width}} {w.role:<8} {max(c, m):>5.2f} {seen:>6} {c:>8.2f} {m:>7.2f} "
            f"{blocks:>11} {w.load.num_running_seqs:>5} {w.waiting_for_room:>5} {hosted:>7} "
            f"{age:>7}"
        )
    if not workers:
        lines.append("  no workers")
    return "\n".join([*lines, *after])


def worker_width(migrations: Sequence[pb.Migration], least: int = 12) -> int:
    """The donor and helper columns' width for these rows: their longest id (a compose
    worker's, ``decode-10.89.0.5-50065``, is 22 characters), at least ``least``."""
    return max([least, *(len(w) for m in migrations for w in (m.donor, m.helper))])


def _migration_lines(
    migrations: Sequence[pb.Migration],
    format_row: Callable[[pb.Migration, int], str],
    error: str,
) -> list[str]:
    if error:
        return ["migrations", f"  {error}"]
    live = [m for m in migrations if m.state not in ENDED]
    ended = [m for m in migrations if m.state in ENDED][-5:]
    shown = [*live, *ended]
    width = worker_width(shown)
    return [f"migrations: {len(live)} live", *[f"  {format_row(m, width)}" for m in shown]]


def _unreachable(service: str, exc: grpc.RpcError, tls_dir: str = "") -> str:
    """The screen's line for a service that did not answer; other refusals end the watch."""
    if exc.code() not in TRANSIENT:
        raise exc
    details = exc.details() or ""
    hint = security.flags_hint(tls_dir, "", exc.code().name, details)
    return f"{service} unreachable ({exc.code().name}: {details}){hint}; trying again"


def watch(
    args: argparse.Namespace,
    list_migrations: Callable[[], pb.ListMigrationsResponse],
    format_row: Callable[[pb.Migration, int], str],
) -> int:
    """Redraws every ``--interval`` seconds, ``--count`` times (0: until Ctrl-C); the router
    with the same TLS and token flags as the coordinator (``check_watch_args`` first). 0, or
    1 when the last screen lacked a part (a service did not answer)."""
    if args.tls_dir:
        files = security.TlsFiles.in_dir(Path(args.tls_dir), security.Role.CLIENT)
        credentials = security.channel_credentials(files)
        channel = grpc.secure_channel(args.router, credentials, security.channel_options())
    else:
        channel = grpc.insecure_channel(args.router)
    token = security.read_tokens(Path(args.api_token_file))[0] if args.api_token_file else ""
    metadata = security.bearer_metadata(token)
    stub = router_pb2_grpc.RouterServiceStub(channel)
    incomplete = False
    try:
        n = 0
        while not args.count or n < args.count:
            if n:
                time.sleep(args.interval)
            workers: list[WorkerLine] = []
            migrations: Sequence[pb.Migration] = ()
            policy: dict[str, float] = {}
            workers_error = migrations_error = ""
            try:
                request = router_pb2.ListWorkersRequest()
                workers = worker_lines(stub.ListWorkers(request, timeout=5.0, metadata=metadata))
            except grpc.RpcError as exc:
                workers_error = _unreachable("the router", exc, args.tls_dir)
            try:
                listed = list_migrations()
                migrations = listed.migrations
                policy = {u.worker_id: max(u.compute, u.memory) for u in listed.utilisations}
            except grpc.RpcError as exc:
                migrations_error = _unreachable("the coordinator", exc, args.tls_dir)
            screen = render(
                workers,
                migrations,
                format_row,
                at=time.strftime("%H:%M:%S"),
                workers_error=workers_error,
                migrations_error=migrations_error,
                policy=policy,
            )
            print(CLEAR + screen if args.count != 1 else screen, flush=True)
            incomplete = bool(workers_error or migrations_error)
            n += 1
    except KeyboardInterrupt:
        return 0
    finally:
        channel.close()
    return 1 if incomplete else 0


def check_watch_args(args: argparse.Namespace) -> None:
    """What ``--watch`` needs besides its flags' own types, refused before any call; and its
    flags without it (session 40's probe: taken and never used)."""
    if not args.watch:
        for flag, value, default in (
            ("--count", args.count, 0),
            ("--interval", args.interval, 1.0),
        ):
            if value != default:
                raise ConfigError(f"{flag}: only with --watch")
        return
    if not args.router:
        raise ConfigError("--watch needs --router HOST:PORT (or $BANASERVE_ROUTER)")
    if args.migration_id:
        raise ConfigError(f"--watch lists every migration; leave out {args.migration_id!r}")


def add_watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", action="store_true", help="per-worker utilisation and migrations")
    p.add_argument(
        "--router",
        type=host_port,
        default=os.environ.get("BANASERVE_ROUTER") or None,
        metavar="HOST:PORT",
        help="with --watch: the router (default: $BANASERVE_ROUTER)",
    )
    p.add_argument(
        "--interval",
        type=positive(float, at_most=3600.0),
        default=1.0,
        metavar="S",
        help="with --watch (at most an hour)",
    )
    p.add_argument(
        "--count",
        type=non_negative(int),
        default=0,
        help="with --watch: screens (0: until Ctrl-C)",
    )
