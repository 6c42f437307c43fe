"""``banaserve migrate ...`` and ``banaserve migrations``: the coordinator's API on the command line.

    banaserve migrate layers --donor decode-0 --helper prefill-0 --start 16 [--end 30]
        [--wait]
    banaserve migrate attention --donor decode-0 --helper prefill-0 [--max-sequences 4]
        [--max-blocks N] [--request-id R ...] [--wait]
    banaserve migrate revert m-3 [--wait]
    banaserve migrate abort m-3 [--reason TEXT]
    banaserve migrations [m-3] [--live]
    banaserve migrations --watch --router HOST:PORT [--interval 1] [--count N]

The coordinator is ``--coordinator HOST:PORT`` (or ``$BANASERVE_COORDINATOR``; ``banaserve up
--coordinator`` prints it). ``--wait`` follows the migration until its current work is over
(ACTIVE, DONE or ABORTED) and exits 1 if it was aborted. A refused call prints the status and
its message and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc

from services.common.arg_types import host_port, positive
from services.common.limits import MAX_MICRO_BATCHES
from services.common.types import MAX_UINT32
from services.coordinator import watch
from services.coordinator.config import CoordinatorConfig
from services.rpc import security
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc

TIMEOUT_S = 10.0
MAX_WAIT_S = 86_400.0  # --wait-timeout: a day, as the longest deadline the APIs take
# The coordinator aborts on the donor, then on the helper, each bounded by its
# ``abort_timeout_s`` (10 s by default): a donor whose steps wait on a stalled helper answers
# only once its keepalive gives up on it (~7 s), and a frozen helper not at all.
CALL_TIMEOUT_S = {"AbortMigration": 2 * CoordinatorConfig.abort_timeout_s + TIMEOUT_S}
SETTLED = {
    pb.MIGRATION_STATE_ACTIVE,
    pb.MIGRATION_STATE_DONE,
    pb.MIGRATION_STATE_ABORTED,
}


def _state(value: int) -> str:
    return pb.MigrationState.Name(value).removeprefix("MIGRATION_STATE_")


def _kind(value: int) -> str:
    return pb.MigrationKind.Name(value).removeprefix("MIGRATION_KIND_").lower()


def _seconds(d) -> float:
    return d.seconds + d.nanos / 1e9


def format_row(m: pb.Migration, width: int = 12) -> str:
    layers = f"[{m.start_layer}, {m.end_layer})"
    row = f"{m.migration_id:<6} {_kind(m.kind):<9} {_state(m.state):<10} {m.donor:>{width}} -> "
    row += f"{m.helper:<{width}} {layers:<9} kv {m.num_kv_bytes:>12,} B"
    return row + (f"  {m.reason}" if m.reason else "")


def format_migration(m: pb.Migration) -> str:
    lines = [
        f"migration   {m.migration_id} ({_kind(m.kind)})",
        f"state       {_state(m.state)}",
        f"donor       {m.donor}",
        f"helper      {m.helper} (data plane {m.helper_data_address or '-'})",
        f"layers      [{m.start_layer}, {m.end_layer}), {m.num_micro_batches} micro-batches"
        + (", weights dropped on the donor" if m.drop_weights else ""),
        f"weights     {m.num_weight_bytes:,} B in {_seconds(m.weights_duration):.3f} s"
        + (" (helper had identical weights)" if m.weights_skipped else ""),
        f"kv          {m.num_kv_bytes:,} B, {m.num_sequences} sequences, "
        f"{m.num_requeued} recomputed; copied {m.num_copy_kv_bytes:,} B in "
        f"{_seconds(m.kv_copy_duration):.3f} s before the switch",
        f"switch      {_seconds(m.switch_pause) * 1000:.1f} ms pause, "
        f"{m.num_switch_kv_bytes:,} B of last KV delta",
        "timings     "
        + ", ".join(f"{_state(t.state)} {_seconds(t.duration):.3f} s" for t in m.timings),
    ]
    if m.kind == pb.MIGRATION_KIND_ATTENTION:
        asked = ", ".join(m.request_ids) or f"the longest {m.max_sequences or 4}"
        asked += " (refilled)" if m.refill else ""
        lines.insert(5, f"blocks      {m.num_blocks} KV blocks of {asked} attended on the helper")
    if m.reason:
        lines.append(f"reason      {m.reason}")
    if m.trace_id:
        lines.append(f"trace       {m.trace_id}")
    return "\n".join(lines)


class _Client:
    def __init__(self, args: argparse.Namespace) -> None:
        target = args.coordinator  # required by its flag unless $BANASERVE_COORDINATOR names it
        if args.tls_dir:
            files = security.TlsFiles.in_dir(Path(args.tls_dir), security.Role.CLIENT)
            credentials = security.channel_credentials(files)
            self.channel = grpc.secure_channel(target, credentials, security.channel_options())
        else:
            self.channel = grpc.insecure_channel(target)
        token = security.read_tokens(Path(args.api_token_file))[0] if args.api_token_file else ""
        self.metadata = security.bearer_metadata(token)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    def call(self, method: str, request):
        timeout = CALL_TIMEOUT_S.get(method, TIMEOUT_S)
        return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)

    def wait(self, migration_id: str, timeout_s: float) -> pb.Migration:
        deadline = time.monotonic() + timeout_s
        request = pb.DescribeMigrationRequest(migration_id=migration_id)
        while True:
            m = self.call("DescribeMigration", request).migration
            if m.state in SETTLED or time.monotonic() > deadline:
                return m
            time.sleep(0.1)


def _add_common(p: argparse.ArgumentParser) -> None:
    # A string default goes through ``type`` as well: a bad $BANASERVE_COORDINATOR is a usage
    # error too, and an unset one makes the flag required.
    from_env = os.environ.get("BANASERVE_COORDINATOR") or None
    p.add_argument(
        "--coordinator",
        type=host_port,
        default=from_env,
        required=from_env is None,
        metavar="HOST:PORT",
        help="the coordinator (default: $BANASERVE_COORDINATOR)",
    )
    p.add_argument("--tls-dir", default="", help="the client certificate's dir (docs/security.md)")
    p.add_argument("--api-token-file", default="", help="send the file's first token")


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="until ACTIVE, DONE or ABORTED")
    p.add_argument(
        "--wait-timeout",
        type=positive(float, at_most=MAX_WAIT_S),
        default=300.0,
        metavar="S",
        help="with --wait: at most this long; still not settled then, exit 1 (default 300)",
    )


def add_migrate_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="migrate_command", required=True)
    layers = sub.add_parser("layers", help="move the donor's layers [start, end) to the helper")
    layers.add_argument("--donor", required=True, help="worker id whose layers move")
    layers.add_argument("--helper", required=True, help="worker id that runs them")
    layers.add_argument(
        "--start",
        type=positive(int, at_most=MAX_UINT32),
        required=True,
        help="first layer that moves (>= 1)",
    )
    layers.add_argument(
        "--end",
        type=positive(int, at_most=MAX_UINT32),
        default=None,
        help="default: the model's layer count",
    )
    layers.add_argument(
        "--micro-batches",
        type=int,
        default=2,
        choices=range(1, MAX_MICRO_BATCHES + 1),
        metavar="M",
        help="1-8 (default 2: a decode donor's two step streams; more only help a prefill donor)",
    )
    layers.add_argument(
        "--drop-weights", action="store_true", help="the donor frees the moved layers once ACTIVE"
    )
    for name, text in (("revert", "take an ACTIVE migration back"), ("abort", "stop a migration")):
        q = sub.add_parser(name, help=text)
        q.add_argument("migration_id")
        if name == "abort":
            q.add_argument("--reason", default="", help="recorded as the migration's reason")
        _add_common(q)
        if name == "revert":
            _add_wait(q)
    _add_common(layers)
    _add_wait(layers)
    attention = sub.add_parser(
        "attention", help="move whole KV blocks of the donor's sequences to the helper"
    )
    attention.add_argument("--donor", required=True, help="worker id whose sequences' blocks move")
    attention.add_argument("--helper", required=True, help="worker id that holds them")
    attention.add_argument(
        "--request-id",
        action="append",
        default=[],
        help="this request's sequence, by the id its client sent (repeat; default: the longest)",
    )
    attention.add_argument(
        "--max-sequences", type=positive(int, at_most=MAX_UINT32), default=0, help="default: 4"
    )
    attention.add_argument(
        "--max-blocks",
        type=positive(int, at_most=MAX_UINT32),
        default=0,
        help="per sequence; default: all",
    )
    attention.add_argument(
        "--refill",
        action="store_true",
        help="keep up to --max-sequences located while ACTIVE (the next longest as others end)",
    )
    _add_common(attention)
    _add_wait(attention)


def add_migrations_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("migration_id", nargs="?", help="describe this one (default: list them all)")
    p.add_argument("--live", action="store_true", help="only migrations not DONE or ABORTED")
    watch.add_watch_arguments(p)
    _add_common(p)


def run_migrate(args: argparse.Namespace) -> int:
    client = _Client(args)
    try:
        if args.migrate_command == "layers":
            spec = pb.LayerMigrationSpec(
                donor=args.donor,
                helper=args.helper,
                start_layer=args.start,
                end_layer=args.end,
                num_micro_batches=args.micro_batches,
                drop_weights=args.drop_weights,
            )
            request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec)
            m = client.call("StartMigration", request).migration
        elif args.migrate_command == "attention":
            spec = pb.AttentionMigrationSpec(
                donor=args.donor,
                helper=args.helper,
                request_ids=args.request_id,
                max_sequences=args.max_sequences,
                max_blocks_per_sequence=args.max_blocks,
                refill=args.refill,
            )
            request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_ATTENTION, attention=spec)
            m = client.call("StartMigration", request).migration
        elif args.migrate_command == "revert":
            request = pb.RevertMigrationRequest(migration_id=args.migration_id)
            m = client.call("RevertMigration", request).migration
        else:
            request = pb.AbortMigrationRequest(migration_id=args.migration_id, reason=args.reason)
            m = client.call("AbortMigration", request).migration
        if getattr(args, "wait", False):
            m = client.wait(m.migration_id, args.wait_timeout)
    except grpc.RpcError as exc:
        return _refused(exc, args)
    finally:
        client.channel.close()
    print(format_migration(m), flush=True)
    if not getattr(args, "wait", False):
        return 0
    if m.state not in SETTLED:  # session 40's probe: this exited 0, as if it had settled
        print(
            f"banaserve: error: {m.migration_id} is still {_state(m.state)} after "
            f"--wait-timeout {args.wait_timeout:g} s",
            file=sys.stderr,
        )
        return 1
    return 1 if m.state == pb.MIGRATION_STATE_ABORTED else 0


def run_migrations(args: argparse.Namespace) -> int:
    watch.check_watch_args(args)  # before any channel opens
    client = _Client(args)
    if args.watch:
        listing = pb.ListMigrationsRequest(live_only=args.live)
        try:
            return watch.watch(args, lambda: client.call("ListMigrations", listing), format_row)
        except grpc.RpcError as exc:
            return _refused(exc, args)
        finally:
            client.channel.close()
    try:
        if args.migration_id is not None:  # "" is refused, not "list them all"
            request = pb.DescribeMigrationRequest(migration_id=args.migration_id)
            print(format_migration(client.call("DescribeMigration", request).migration))
            return 0
        listed = client.call("ListMigrations", pb.ListMigrationsRequest(live_only=args.live))
    except grpc.RpcError as exc:
        return _refused(exc, args)
    finally:
        client.channel.close()
    width = watch.worker_width(listed.migrations)
    for m in listed.migrations:
        print(format_row(m, width))
    if not listed.migrations:
        print("no migrations")
    return 0


def _refused(exc: grpc.RpcError, args: argparse.Namespace) -> int:
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # another service answers on that port
        hint = " (is --coordinator a coordinator's address? `banaserve up` prints it)"
    else:
        token = "x" if getattr(args, "api_token_file", "") else ""
        hint = security.flags_hint(
            getattr(args, "tls_dir", ""), token, exc.code().name, exc.details() or ""
        )
    print(f"banaserve: error: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
    return 2
