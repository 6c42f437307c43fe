"""``banaserve health HOST:PORT`` (or ``python -m services.rpc.probe``): one gRPC health check.

Exits 0 when the server (or ``--service NAME``) answers SERVING within ``--timeout``, else 1
with the status or error on stderr: what grpc_health_probe does, without another binary in the
image. ``HOST`` may be a name (``router:50051``) or ``auto``: the IP a service started with
``--host auto`` listens on (services/common/network.py), so a container checks itself.

``--registered-at ROUTER``: a worker is ready only once the router also lists it as active (its
model loaded, since a worker serves only after loading, and its registration admitted), so a
readiness probe or a compose ``service_healthy`` condition means the worker takes requests; a
worker started with ``--advertise ADDRESS`` is looked up by ``--advertised-as ADDRESS``.
``--tls-dir``: mutual TLS with the ``client`` certificate of ``banaserve certs DIR``. A flag
that cannot be used (a TLS directory without its files, an unreadable or empty
``--api-token-file``) exits 2 with one line, before any call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client.client import BanaServeClient, BanaServeClientError
from services.common.arg_types import host_port, positive
from services.common.errors import ConfigError
from services.common.network import AUTO, resolve_host
from services.rpc.deadlines import bounded


def add_health_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="check a service's gRPC health (exit 0: SERVING)")
    add_arguments(p)
    p.set_defaults(func=run_health)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", type=host_port, metavar="HOST:PORT")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--timeout", type=positive(float), default=3.0, help="seconds")
    p.add_argument(
        "--registered-at",
        type=host_port,
        default=None,
        metavar="ROUTER",
        help="also require the router at ROUTER (HOST:PORT) to list this worker as active",
    )
    p.add_argument(
        "--advertised-as",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="with --registered-at: the address the worker registers (its --advertise; "
        "default: the one checked)",
    )
    p.add_argument("--tls-dir", default="", help="mutual TLS (client certificate) for both checks")
    p.add_argument("--api-token-file", default="", help="bearer token for the router's API")


def main(argv: list[str] | None = None) -> int:
    """``python -m services.rpc.probe``: the same check without the CLI's other commands, whose
    parsers import much more (container health checks run it every few seconds)."""
    p = argparse.ArgumentParser(prog="python -m services.rpc.probe", description=__doc__)
    add_arguments(p)
    return run_health(p.parse_args(argv))


def resolve_target(target: str) -> str:
    host, sep, port = target.rpartition(":")
    return f"{resolve_host(AUTO)}:{port}" if host == AUTO and sep else target


def _channel(target: str, tls_dir: str) -> grpc.Channel:
    if not tls_dir:
        return grpc.insecure_channel(target)
    from services.rpc import security

    files = security.TlsFiles.in_dir(Path(tls_dir), security.Role.CLIENT)
    credentials = security.channel_credentials(files)
    return grpc.secure_channel(target, credentials, options=security.channel_options())


def check(target: str, service: str = "", timeout_s: float = 3.0, tls_dir: str = "") -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...); raises grpc.RpcError."""
    with _channel(target, tls_dir) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=bounded(timeout_s)
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _token(args: argparse.Namespace) -> str:
    """The first token of ``--api-token-file`` (read before any call: a flag's mistake is found
    whatever the server answers)."""
    from services.rpc import security

    return security.read_tokens(Path(args.api_token_file))[0] if args.api_token_file else ""


def is_registered(address: str, router: str, args: argparse.Namespace, token: str = "") -> bool:
    with BanaServeClient(router, tls_dir=args.tls_dir, token=token) as client:
        workers = client.list_workers(timeout_s=args.timeout)
    return any(w.address == address and w.active for w in workers)


def run_health(args: argparse.Namespace) -> int:
    if args.advertised_as and not args.registered_at:
        print("health: --advertised-as needs --registered-at (the router to ask)", file=sys.stderr)
        return 2
    target = resolve_target(args.target)
    try:
        token = _token(args) if args.registered_at else ""
        status = check(target, args.service, args.timeout, args.tls_dir)
        registered = status != "SERVING" or not args.registered_at
        registered_as = resolve_target(args.advertised_as) if args.advertised_as else target
        if not registered and not is_registered(registered_as, args.registered_at, args, token):
            status = f"not active at the router {args.registered_at}"
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name} {exc.details()}", file=sys.stderr)
        return 1
    except BanaServeClientError as exc:
        print(f"{args.registered_at}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # --tls-dir or --api-token-file: a flag's mistake, not a sick server
        print(f"health: {exc}", file=sys.stderr)
        return 2
    if status != "SERVING":
        print(f"{target}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
