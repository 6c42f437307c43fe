"""``python -m services.prefill``: config → wiring → serve.

Prints ``LISTENING HOST:PORT`` on stdout (flushed) once the server accepts calls, for launchers
to parse; logs go to stderr. SIGTERM/SIGINT drain the server, then the worker stops after the
step in flight and its channels close. Should the worker's step loop die, its health turns
NOT_SERVING, it leaves the router, and the process exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from services.common.config import EngineConfig, RpcConfig, TracingConfig
from services.engine.engine import Engine
from services.prefill.clients import DEFAULT_MAX_CHUNK_BYTES, GrpcKVTransport
from services.prefill.core import PrefillWorker
from services.prefill.dataplane_transport import DataPlaneKVTransport, TargetKVTransport
from services.prefill.kvstore_client import KVStoreClient
from services.prefill.servicer import prefill_service
from services.rpc.load_reports import reporting_to, serve_while_alive, worker_info
from services.rpc.server import run_service, start_server
from services.rpc.tracing import setup_tracing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.prefill", description=__doc__)
    p.add_argument("--port", type=int, default=0, help="0: the OS picks one")
    p.add_argument("--model", default="tiny-llama", help="prepared model name or directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-chunk-bytes", type=int, default=DEFAULT_MAX_CHUNK_BYTES)
    p.add_argument(
        "--kv-transport",
        choices=("auto", "grpc"),
        default="auto",
        help="auto: KV to a decode worker's data plane when it has one; grpc: TransferKV only",
    )
    p.add_argument("--router", default=None, metavar="HOST:PORT", help="register and report load")
    p.add_argument(
        "--kvstore",
        default=None,
        metavar="HOST:PORT",
        help="a kvstore node: reuse cached prefixes from the global KV store, write new blocks",
    )
    p.add_argument("--kvstore-timeout", type=float, default=2.0, help="bound on each store call")
    p.add_argument(
        "--no-kvstore-overlap",
        dest="kvstore_overlap",
        action="store_false",
        help="fetch a cached prefix whole before computing (baseline for the layer-wise overlap)",
    )
    p.add_argument("--worker-id", default=None, help="default: prefill-PORT")
    p.add_argument("--report-interval", type=float, default=0.1, help="seconds between reports")
    p.add_argument("--tracing", choices=("none", "console", "otlp"), default="none")
    p.add_argument("--otlp-endpoint", default="")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    rpc = RpcConfig(port=args.port)
    tracing = setup_tracing(
        TracingConfig(
            exporter=args.tracing, otlp_endpoint=args.otlp_endpoint, service_name="prefill"
        )
    )
    engine = Engine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            num_threads=args.threads,
            num_kv_blocks=args.num_kv_blocks,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
    )
    transport = TargetKVTransport(
        GrpcKVTransport(rpc, tracing, args.max_chunk_bytes),
        DataPlaneKVTransport(args.max_chunk_bytes) if args.kv_transport == "auto" else None,
    )
    store = KVStoreClient(args.kvstore, rpc, args.kvstore_timeout) if args.kvstore else None
    worker = PrefillWorker(engine, transport, store=store, store_overlap=args.kvstore_overlap)
    worker.start()
    server = await start_server([prefill_service(worker)], rpc, tracing=tracing)
    print(f"LISTENING {server.address}", flush=True)
    info = worker_info(
        args.worker_id or f"prefill-{server.address.rsplit(':', 1)[1]}",
        server.address,
        "prefill",
        args.model,
        engine.fingerprint,
        engine.config.block_size,
        engine.block_manager.num_blocks,
        engine.max_model_len,
    )
    assert worker.died is not None  # set by start()
    died = None
    try:
        async with reporting_to(
            args.router, info, worker.load, rpc, args.report_interval
        ) as reporter:
            died = await serve_while_alive(server, worker.died, reporter)
    finally:
        await worker.stop()
        tracing.shutdown()  # flush spans, as the other services do
    if died is not None:
        raise SystemExit(f"prefill worker: the step loop died ({died!r})")


def main(argv: list[str] | None = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
