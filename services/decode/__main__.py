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

from services.common.config import EngineConfig, RpcConfig, TracingConfig
from services.decode.core import DecodeConfig, DecodeWorker
from services.decode.dataplane_receiver import DataPlaneReceiver
from services.decode.servicer import decode_service, kv_data_handler
from services.engine.engine import Engine
from services.rpc import dataplane
from services.rpc.load_reports import reporting_to, serve_while_alive, worker_info
from services.rpc.server import run_service, start_server
from services.rpc.tracing import setup_tracing

log = logging.getLogger("services.decode")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m services.decode", description=__doc__)
    p.add_argument("--port", type=int, default=int(env("BANASERVE_DECODE_PORT", "0")))
    p.add_argument("--model", default=env("BANASERVE_MODEL", "tiny-llama"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--role", choices=("decode", "mixed"), default="decode")
    p.add_argument("--worker-id", default=None, help="default: ROLE-PORT")
    p.add_argument("--router", default=env("BANASERVE_ROUTER", ""), help="HOST:PORT")
    p.add_argument("--report-interval", type=float, default=0.1)
    p.add_argument("--max-lease", type=float, default=60.0)
    p.add_argument(
        "--kv-transport",
        choices=(*dataplane.KINDS, "none"),
        default="ucx",
        help="the data plane KV transfers may arrive on (none: the TransferKV stream only)",
    )
    p.add_argument("--tracing", choices=("none", "console", "otlp"), default="none")
    p.add_argument("--otlp-endpoint", default="")
    p.add_argument("--log-level", default=env("BANASERVE_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        num_threads=args.threads,
    )


def _worker_info(args: argparse.Namespace, engine: Engine, address: str):
    worker_id = args.worker_id or f"{args.role}-{address.rsplit(':', 1)[1]}"
    return worker_info(
        worker_id,
        address,
        args.role,
        args.model,
        engine.fingerprint,
        engine.config.block_size,
        engine.block_manager.num_blocks,
        engine.max_model_len,
    )


async def serve(args: argparse.Namespace) -> None:
    tracing = setup_tracing(
        TracingConfig(args.tracing, args.otlp_endpoint, service_name="banaserve-decode")
    )
    rpc = RpcConfig(port=args.port)
    engine = await asyncio.to_thread(Engine, engine_config(args))
    worker = DecodeWorker(
        engine,
        DecodeConfig(
            default_lease_s=min(args.max_lease, DecodeConfig.default_lease_s),
            max_lease_s=args.max_lease,
            prefill_locally=args.role == "mixed",
        ),
    )
    await worker.start()
    receiver = DataPlaneReceiver(worker)
    data = None
    if args.kv_transport != "none":
        data = dataplane.serve(args.kv_transport, kv_data_handler(receiver))
        await data.start()
    service = decode_service(
        worker, data.address if data else "", args.kv_transport if data else ""
    )
    server = await start_server([service], rpc, tracing=tracing)
    print(f"LISTENING {server.address}", flush=True)
    info = _worker_info(args, engine, server.address)
    assert worker.died is not None  # set by start()
    died = None
    try:
        async with reporting_to(
            args.router, info, worker.load, rpc, args.report_interval
        ) as reporter:
            died = await serve_while_alive(server, worker.died, reporter)
    finally:
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
