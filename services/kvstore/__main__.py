"""``python -m services.kvstore``: flags -> pool, metadata, data plane, gRPC server -> serve.

Prints ``LISTENING HOST:PORT`` (the KVStoreService) once both planes accept calls, serves until
SIGTERM/SIGINT, then drains: it withdraws its blocks from Redis at once (no lookup names them),
refuses new writes, serves the reads pinned before (at most ``--drain-timeout``) and stops. A
restarted node comes back with a new incarnation and withdraws whatever its previous life
announced.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from services.common.arg_types import port_number, positive, redis_url
from services.common.config import RpcConfig
from services.common.logs import add_logging_args
from services.common.metrics import KVStoreCollector
from services.common.metrics_endpoint import add_metrics_args, start_metrics
from services.common.network import (
    add_advertise_args,
    add_host_args,
    default_id,
    resolve_host,
)
from services.kvstore.core import KVStoreConfig, KVStoreNode
from services.kvstore.disk import DiskTier
from services.kvstore.metadata import DEFAULT_SEEN_WINDOW_S, MetadataStore, NodeInfo
from services.kvstore.pool import BlockPool, PoolConfig
from services.kvstore.servicer import data_handler, kvstore_service
from services.rpc import dataplane
from services.rpc.admission import KVSTORE_CAPACITY, add_admission_args, admission_interceptors
from services.rpc.security import (
    Role,
    add_security_args,
    secure_data_planes,
    security_config,
)
from services.rpc.server import add_drain_args, drain_while, run_service, start_server
from services.rpc.tracing import add_tracing_args, setup_tracing, tracing_config

log = logging.getLogger("services.kvstore")
# A stopping node waits at least this long after leaving the index: a Pin sent by a reader whose
# lookup came just before still lands (a lookup-to-pin gap is milliseconds).
LOOKUP_SETTLE_S = 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m services.kvstore", description=__doc__)
    p.add_argument(
        "--port", type=port_number, default=0, help="KVStoreService port; 0: the OS picks"
    )
    p.add_argument(
        "--data-port", type=port_number, default=0, help="data plane port; 0: the OS picks"
    )
    p.add_argument("--data-transport", choices=dataplane.KINDS, default="ucx")
    p.add_argument(
        "--redis", type=redis_url, default=env("BANASERVE_REDIS", "redis://127.0.0.1:6379/0")
    )
    p.add_argument("--key-prefix", default="banaserve:kv", help="Redis key namespace")
    p.add_argument(
        "--node-id", default=None, help="default: kvstore-HOST-PORT of the address advertised"
    )
    p.add_argument("--capacity-bytes", type=int, default=1 << 30, help="host-memory pool")
    p.add_argument("--disk-dir", default=None, help="spill evicted blocks here (optional)")
    p.add_argument("--disk-capacity-bytes", type=int, default=4 << 30)
    p.add_argument("--reservation-ttl", type=positive(float), default=30.0)
    p.add_argument("--pin-ttl", type=positive(float), default=30.0)
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument(
        "--seen-window",
        type=float,
        default=DEFAULT_SEEN_WINDOW_S,
        metavar="S",
        help="a prefix looked up again within S to 2S seconds counts as reused: what prefill "
        "workers write back by default (docs/kvstore.md; default %(default)s)",
    )
    add_tracing_args(p)
    add_logging_args(p)
    add_security_args(p)
    add_admission_args(p)
    add_host_args(p)
    add_drain_args(p)
    add_advertise_args(p, data_plane=True)
    add_metrics_args(p)
    args = p.parse_args(argv)
    if not args.seen_window > 0:  # also NaN
        p.error(f"--seen-window must be > 0 seconds, got {args.seen_window}")
    return args


def make_pool(args: argparse.Namespace) -> BlockPool:
    disk = None
    if args.disk_dir:
        disk = DiskTier(Path(args.disk_dir), args.disk_capacity_bytes)
    return BlockPool(PoolConfig(args.capacity_bytes, args.reservation_ttl, args.pin_ttl), disk)


async def serve(args: argparse.Namespace) -> None:
    tracing = setup_tracing(tracing_config(args, "kvstore"))
    pool = make_pool(args)
    security = security_config(args, Role.KVSTORE)
    metadata = MetadataStore.from_url(
        args.redis,
        prefix=args.key_prefix,
        seen_window_s=args.seen_window,
        password=security.redis_password if security is not None else "",
    )
    node = KVStoreNode(pool, metadata, KVStoreConfig(heartbeat_interval_s=args.heartbeat_interval))
    host = resolve_host(args.host)
    secure_data_planes(security)
    data = await dataplane.listen(args.data_transport, data_handler(node), host, args.data_port)
    server = await start_server(
        [kvstore_service(node)],
        RpcConfig(host=host, port=args.port, security=security, grace_s=args.drain_timeout),
        tracing=tracing,
        interceptors=admission_interceptors(args, KVSTORE_CAPACITY),
    )
    info = NodeInfo(
        args.node_id or default_id("kvstore", args.advertise or server.address),
        args.advertise or server.address,
        args.advertise_data or data.address,
        args.data_transport,
    )
    await node.start(info)
    await start_metrics(args, host, KVStoreCollector(node), security=security)
    print(f"LISTENING {server.address}", flush=True)
    log.info("node %s: data plane %s over %s", info.node_id, data.address, args.data_transport)
    # The drain (services/kvstore/core.py, 4): out of the index first, then the reads pinned
    # before go on. At least LOOKUP_SETTLE_S: a reader that looked up just before sends its Pin.
    drain = drain_while(node.holds_work, at_least_s=LOOKUP_SETTLE_S)

    async def drain_pinned(grace_s: float) -> float:
        await node.begin_drain()
        return await drain(grace_s)

    try:
        await server.serve_until_signal(drain=drain_pinned)
    finally:
        await node.stop()
        await data.stop()
        tracing.shutdown()


def main(argv: list[str] | None = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
