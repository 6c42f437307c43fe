"""``python -m services.decode``: flags/env -> config -> engine, worker, server -> serve.

Prints ``LISTENING HOST:PORT`` on stdout once the server accepts calls (a launcher parses it),
serves until SIGTERM/SIGINT, then drains and frees every block. With ``--router`` it registers
there and reports its load every ``--report-interval`` seconds. Should the worker's engine loop
die, its health turns NOT_SERVING, it leaves the router, and the process exits with status 1. ``--kv-transport`` (default ucx)
also serves KV transfers on a data plane, which ReserveKV names; ``none``: TransferKV only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from services.common.arg_types import optional_host_port, port_number, positive
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
from services.decode.core import DecodeConfig, DecodeWorker
from services.decode.dataplane_receiver import DataPlaneReceiver
from services.decode.servicer import decode_service, kv_data_handler
from services.engine.engine import Engine
from services.migration.worker import add_migration_args, start_migration
from services.rpc import dataplane
from services.rpc.admission import add_admission_args, admission_interceptors, reservation_quota
from services.rpc.load_reports import reporting_to, worker_info
from services.rpc.security import (
    Role,
    add_security_args,
    secure_data_planes,
    security_config,
)
from services.rpc.server import PortHold, add_drain_args, run_service, start_server
from services.rpc.tracing import add_tracing_args, setup_tracing, tracing_config

log = logging.getLogger("services.decode")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m services.decode", description=__doc__)
    p.add_argument("--port", type=port_number, default=int(env("BANASERVE_DECODE_PORT", "0")))
    add_engine_args(p, model_default=env("BANASERVE_MODEL", "tiny-llama"))
    add_kv_transport_arg(p)
    p.add_argument(
        "--data-port", type=port_number, default=0, help="the KV data plane's port; 0: the OS picks"
    )
    p.add_argument("--role", choices=("decode", "mixed"), default="decode")
    p.add_argument(
        "--worker-id", default=None, help="default: ROLE-HOST-PORT of the address advertised"
    )
    p.add_argument(
        "--router", type=optional_host_port, default=env("BANASERVE_ROUTER", ""),
        metavar="HOST:PORT",
    )  # fmt: skip
    p.add_argument("--report-interval", type=positive(float), default=0.1)
    p.add_argument("--max-lease", type=float, default=60.0)
    p.add_argument(
        "--transfer-idle-timeout",
        type=float,
        default=DecodeConfig.transfer_idle_timeout_s,
        help="seconds a KV transfer may send nothing between its layers before it is ended and "
        "its blocks freed (a stalled sender); raise it for a model whose layer of a "
        "--max-num-batched-tokens prompt chunk takes longer than that on the prefill worker",
    )
    p.add_argument(
        "--no-reuse-cached-prefix",
        dest="reuse_cached_prefix",
        action="store_false",
        help="reserve fresh blocks for every prompt: take its whole KV even when this worker's "
        "prefix cache holds its first blocks (default: reuse them; the handoff sends the rest)",
    )
    add_tracing_args(p)
    add_logging_args(p)
    add_security_args(p)
    add_admission_args(p, reservations=True)
    add_host_args(p)
    add_drain_args(p)
    add_advertise_args(p, data_plane=True)
    add_metrics_args(p)
    add_migration_args(p)
    args = p.parse_args(argv)
    if args.kv_transport == NO_KV_TRANSPORT and (args.data_port or args.advertise_data):
        p.error("--data-port and --advertise-data need a data plane (--kv-transport none)")
    return args


def _worker_info(args: argparse.Namespace, engine: Engine, address: str):
    advertised = args.advertise or address
    return worker_info(
        args.worker_id or default_id(args.role, advertised),
        advertised,
        args.role,
        args.model,
        engine.fingerprint,
        engine.config.block_size,
        engine.block_manager.num_blocks,
        engine.max_model_len,
        hosts_only=engine.hosts_only,
        max_num_seqs=engine.config.max_num_seqs,
    )


async def serve(args: argparse.Namespace) -> None:
    tracing = setup_tracing(tracing_config(args, "decode"))
    rpc = RpcConfig(
        host=resolve_host(args.host),
        port=args.port,
        security=security_config(args, Role(args.role)),
        grace_s=args.drain_timeout,
    )
    hold = PortHold(rpc.host, rpc.port)  # until its server binds it
    secure_data_planes(rpc.security)
    engine = await asyncio.to_thread(Engine, engine_config(args))
    worker = DecodeWorker(
        engine,
        DecodeConfig(
            default_lease_s=min(args.max_lease, DecodeConfig.default_lease_s),
            max_lease_s=args.max_lease,
            transfer_header_timeout_s=args.max_lease,  # a sender sends its first frame at once
            transfer_idle_timeout_s=args.transfer_idle_timeout,
            prefill_locally=args.role == "mixed",
            reuse_cached_prefix=args.reuse_cached_prefix,
        ),
    )
    await worker.start()
    receiver = DataPlaneReceiver(worker)
    data = None
    if args.kv_transport != NO_KV_TRANSPORT:
        handler = kv_data_handler(receiver)
        data = await dataplane.listen(args.kv_transport, handler, rpc.host, args.data_port)
    seqs = engine.config.max_num_seqs
    service = decode_service(
        worker,
        (args.advertise_data or data.address) if data else "",
        args.kv_transport if data else "",
        reservation_quota(args, seqs),
        max_awaiting_header=seqs,
    )
    migration = await start_migration(args, worker, rpc.host)
    server = await start_server(
        [service, migration.service],
        rpc,
        tracing=tracing,
        interceptors=admission_interceptors(args, seqs),
        port_hold=hold,
    )
    await start_metrics(
        args,
        rpc.host,
        EngineCollector(args.role, args.model, engine, worker),
        security=rpc.security,
    )
    print(f"LISTENING {server.address}", flush=True)
    info = _worker_info(args, engine, server.address)  # its id from the port it binds
    died = None
    try:
        async with reporting_to(
            args.router, info, worker.load, rpc, args.report_interval
        ) as reporter:
            died = await migration.serve(server, worker, reporter)
    finally:
        await migration.stop()
        if data is not None:
            await data.stop()
            await receiver.stop()
        await worker.stop()
        tracing.shutdown()
    if died is not None:
        raise SystemExit(f"{args.role} worker: the engine loop died ({died!r})")


def main(argv: list[str] | None = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
