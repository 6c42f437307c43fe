"""``python -m services.prefill``: config → wiring → serve.

Prints ``LISTENING HOST:PORT`` on stdout (flushed) once the server accepts calls, for launchers
to parse; logs go to stderr. SIGTERM/SIGINT drain the server, then the worker stops after the
step in flight and its channels close. Should the worker's step loop die, its health turns
NOT_SERVING, it leaves the router, and the process exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from services.common.arg_types import (
    optional_host_port,
    optional_host_ports,
    port_number,
    positive,
)
from services.common.config import RpcConfig
from services.common.engine_args import (
    NO_KV_TRANSPORT,
    add_engine_args,
    add_kv_transport_arg,
    engine_config,
)
from services.common.logs import add_logging_args
from services.common.metrics import EngineCollector
from services.common.metrics_endpoint import add_metrics_args, start_metrics
from services.common.network import (
    add_advertise_args,
    add_host_args,
    default_id,
    resolve_host,
)
from services.engine.engine import Engine
from services.migration.worker import add_migration_args, start_migration
from services.prefill.clients import DEFAULT_MAX_CHUNK_BYTES, GrpcKVTransport
from services.prefill.core import PrefillWorker
from services.prefill.dataplane_transport import DataPlaneKVTransport, TargetKVTransport
from services.prefill.kv_targets import checked_by_router
from services.prefill.kvstore_client import KVStoreClient
from services.prefill.servicer import prefill_service
from services.prefill.write_backs import DEFAULT_MAX_BYTES, DEFAULT_MAX_DELAY_S, WritePolicy
from services.rpc.admission import add_admission_args, admission_interceptors
from services.rpc.load_reports import reporting_to, worker_info
from services.rpc.security import (
    Role,
    add_security_args,
    secure_data_planes,
    security_config,
)
from services.rpc.server import PortHold, add_drain_args, run_service, start_server
from services.rpc.tracing import add_tracing_args, setup_tracing, tracing_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.prefill", description=__doc__)
    p.add_argument("--port", type=port_number, default=0, help="0: the OS picks one")
    add_engine_args(p)
    add_kv_transport_arg(p)
    p.add_argument("--max-chunk-bytes", type=int, default=DEFAULT_MAX_CHUNK_BYTES)
    p.add_argument(
        "--router", type=optional_host_port, default=None, metavar="HOST:PORT",
        help="register and report load",
    )  # fmt: skip
    p.add_argument(
        "--kvstore",
        type=optional_host_ports,
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="kvstore nodes: reuse cached prefixes from the global KV store, write new blocks "
        "(lookups go to the first that answers; writes to every live node, by hash)",
    )
    p.add_argument(
        "--kvstore-timeout", type=positive(float), default=2.0, help="bound on each store call"
    )
    p.add_argument(
        "--no-kvstore-overlap",
        dest="kvstore_overlap",
        action="store_false",
        help="fetch a cached prefix whole before computing (baseline for the layer-wise overlap)",
    )
    p.add_argument(
        "--store-write-back-delay",
        type=float,
        default=DEFAULT_MAX_DELAY_S,
        metavar="S",
        help="a prompt's new blocks go to the store once no request is queued or computing, or "
        "after at most S seconds (0: at once; default %(default)s)",
    )
    p.add_argument(
        "--store-write-back-max-mib",
        type=int,
        default=DEFAULT_MAX_BYTES >> 20,
        metavar="MIB",
        help="KV the pending write-backs would write, at most (they hold none: it is read "
        "from the prefix cache when they run); past it the oldest is dropped (default %(default)s)",
    )
    p.add_argument(
        "--store-write-policy",
        choices=[w.value for w in WritePolicy],
        default=WritePolicy.REUSED.value,
        help="which new blocks go to the store: 'reused', those held or asked for before (a "
        "prefix seen twice); 'all', every one at its first sight (default %(default)s; "
        "docs/kvstore.md)",
    )
    p.add_argument(
        "--worker-id", default=None, help="default: prefill-HOST-PORT of the address advertised"
    )
    p.add_argument(
        "--report-interval", type=positive(float), default=0.1, help="seconds between reports"
    )
    add_tracing_args(p)
    add_logging_args(p)
    add_security_args(p)
    add_admission_args(p)
    add_host_args(p)
    add_drain_args(p)
    add_advertise_args(p, data_plane=False)
    add_metrics_args(p)
    add_migration_args(p)
    args = p.parse_args(argv)
    if args.store_write_back_delay < 0 or args.store_write_back_max_mib < 0:
        p.error("--store-write-back-delay and --store-write-back-max-mib must be >= 0")
    return args


async def serve(args: argparse.Namespace) -> None:
    rpc = RpcConfig(
        host=resolve_host(args.host),
        port=args.port,
        security=security_config(args, Role.PREFILL),
        grace_s=args.drain_timeout,
    )
    hold = PortHold(rpc.host, rpc.port)  # until its server binds it
    secure_data_planes(rpc.security)
    tracing = setup_tracing(tracing_config(args, "prefill"))
    engine = Engine(engine_config(args))
    data_plane = args.kv_transport != NO_KV_TRANSPORT
    transport = TargetKVTransport(
        GrpcKVTransport(rpc, tracing, args.max_chunk_bytes),
        DataPlaneKVTransport(args.max_chunk_bytes) if data_plane else None,
    )
    if args.router:  # KV only to workers the router registered (docs/security.md)
        transport = checked_by_router(transport, args.router, rpc)
    store = (
        KVStoreClient(args.kvstore, rpc, args.kvstore_timeout, tracing) if args.kvstore else None
    )
    worker = PrefillWorker(
        engine,
        transport,
        store=store,
        store_overlap=args.kvstore_overlap,
        write_back_delay_s=args.store_write_back_delay,
        write_back_max_bytes=args.store_write_back_max_mib << 20,
        write_policy=WritePolicy(args.store_write_policy),
    )
    worker.start()
    migration = await start_migration(args, worker, rpc.host)
    server = await start_server(
        [prefill_service(worker), migration.service],
        rpc,
        tracing=tracing,
        interceptors=admission_interceptors(args, engine.config.max_num_seqs),
        port_hold=hold,
    )
    await start_metrics(
        args,
        rpc.host,
        EngineCollector("prefill", args.model, engine, worker),
        security=rpc.security,
    )
    print(f"LISTENING {server.address}", flush=True)
    info = worker_info(
        args.worker_id or default_id("prefill", args.advertise or server.address),
        args.advertise or server.address,
        "prefill",
        args.model,
        engine.fingerprint,
        engine.config.block_size,
        engine.block_manager.num_blocks,
        engine.max_model_len,
        hosts_only=engine.hosts_only,
        max_num_seqs=engine.config.max_num_seqs,
    )
    died = None
    try:
        async with reporting_to(
            args.router, info, worker.load, rpc, args.report_interval
        ) as reporter:
            died = await migration.serve(server, worker, reporter)
    finally:
        await migration.stop()
        await worker.stop()
        tracing.shutdown()  # flush spans, as the other services do
    if died is not None:
        raise SystemExit(f"prefill worker: the step loop died ({died!r})")


def main(argv: list[str] | None = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
