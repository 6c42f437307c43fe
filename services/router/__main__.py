"""``python -m services.router``: config → wiring → serve.

Prints ``LISTENING HOST:PORT`` on stdout (flushed) once the server accepts calls, for launchers
to parse; logs go to stderr. SIGTERM/SIGINT drain the server, then the channels close.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from services.common.config import RpcConfig, TracingConfig
from services.router.clients import GrpcWorkerClients
from services.router.core import POLICIES, Router, RouterConfig
from services.router.driver import DriverConfig, RequestDriver, expire_periodically
from services.router.servicer import Encoder, RouterServicer
from services.rpc.gen.banaserve.v1 import router_pb2, router_pb2_grpc
from services.rpc.server import Service, run_service, start_server
from services.rpc.tracing import setup_tracing

log = logging.getLogger("services.router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.router", description=__doc__)
    p.add_argument("--port", type=int, default=0, help="0: the OS picks one")
    p.add_argument("--policy", choices=POLICIES, default="load")
    p.add_argument(
        "--model",
        default="",
        help="prepared model name or directory: its tokenizer encodes text prompts and only "
        "workers of that model may register (default: token ids only, first worker's model)",
    )
    p.add_argument("--report-timeout-s", type=float, default=1.0)
    p.add_argument("--expire-interval-s", type=float, default=0.25)
    p.add_argument("--lease-s", type=float, default=30.0)
    p.add_argument("--default-timeout-s", type=float, default=600.0)
    p.add_argument("--tracing", choices=("none", "console", "otlp"), default="none")
    p.add_argument("--otlp-endpoint", default="")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def load_encoder(model: str) -> Encoder | None:
    if not model:
        return None
    from services.engine.models.prepare import resolve_model
    from services.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model(model))

    def encode(text: str, chat: bool) -> list[int]:
        return tokenizer.encode_chat(text) if chat else tokenizer.encode(text)

    return encode


async def serve(args: argparse.Namespace) -> None:
    rpc = RpcConfig(port=args.port)
    tracing = setup_tracing(
        TracingConfig(
            exporter=args.tracing, otlp_endpoint=args.otlp_endpoint, service_name="router"
        )
    )
    router = Router(RouterConfig(policy=args.policy, report_timeout_s=args.report_timeout_s))
    clients = GrpcWorkerClients(rpc, tracing)
    driver = RequestDriver(
        router,
        clients,
        DriverConfig(lease_s=args.lease_s, default_timeout_s=args.default_timeout_s),
    )
    servicer = RouterServicer(driver, model=args.model, encode=load_encoder(args.model))
    service = Service.bind(
        servicer,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )
    server = await start_server([service], rpc, tracing=tracing)
    sweeper = asyncio.create_task(
        expire_periodically(
            router, args.expire_interval_s, lambda ids: log.warning("workers expired: %s", ids)
        )
    )
    print(f"LISTENING {server.address}", flush=True)
    try:
        await server.serve_until_signal()
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await clients.close()


def main(argv: list[str] | None = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
