"""Prometheus's ``GET /metrics`` on every service: ``--metrics-port`` (0, the default: off).

``__main__`` builds its service, then calls ``start_metrics(args, host, *collectors)`` (the
collectors: services/common/metrics.py): an HTTP/1.1 endpoint on the service's own event loop,
one response per connection, over HTTPS with ``--metrics-tls`` (mutual TLS: the scraper
presents a certificate of the cluster CA). Flags that cannot work together are refused before
the service does any work (``check_metrics_args``, called by ``run_service``).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from services.common.arg_types import port_number
from services.common.errors import ConfigError
from services.common.https_port import https_context, https_or_refusal

if TYPE_CHECKING:  # services.rpc imports grpc: not for this module's torch- and grpc-free users
    from services.rpc.security import SecurityConfig, TlsFiles

MAX_REQUEST_BYTES = 8192


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=0,
        help="serve Prometheus metrics on this port, on the service's --host (0: off)",
    )
    p.add_argument(
        "--metrics-tls",
        action="store_true",
        help="with --tls-dir: /metrics over HTTPS with the service's certificate, only for "
        "scrapers that present one of the cluster CA (e.g. DIR/client.crt; docs/deploy.md)",
    )


def check_metrics_args(args: argparse.Namespace) -> None:
    """Flags that cannot work together, refused before the service does any work
    (``run_service``)."""
    if getattr(args, "metrics_tls", False) and not getattr(args, "tls_dir", ""):
        raise ConfigError("--metrics-tls needs --tls-dir (the certificate it serves with)")
    if getattr(args, "metrics_tls", False) and not getattr(args, "metrics_port", 0):
        raise ConfigError(
            "--metrics-tls needs --metrics-port (metrics are off without one; "
            "banaserve up: --metrics)"
        )


# A scraper that opens a connection and sends nothing, or stalls in the TLS handshake, is
# dropped after this long.
HANDSHAKE_TIMEOUT_S = 10.0


def metrics_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """The server side of mutual TLS for ``/metrics``: the service's certificate, and a client
    certificate signed by the cluster CA required of every scraper."""
    return https_context(str(tls.cert), str(tls.key), client_ca=str(tls.ca))


class MetricsEndpoint:
    """``GET /metrics`` over HTTP/1.1 on an asyncio server; one response per connection."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self.address = ""
        self.scheme = "http"

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: HTTPS (``metrics_ssl_context``); a client that fails its handshake is
        dropped before any request is read, and a plain-HTTP request gets a 400 that says to
        use https (``services/common/https_port.py``)."""
        if tls is None:
            self._server = await asyncio.start_server(self._handle, host, port)
        else:
            loop = asyncio.get_running_loop()

            def streams() -> asyncio.StreamReaderProtocol:  # what start_server builds
                return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), self._handle)

            self._server = await loop.create_server(
                https_or_refusal(streams, tls, HANDSHAKE_TIMEOUT_S), host, port
            )
        self.scheme = "https" if tls is not None else "http"
        bound = self._server.sockets[0].getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            status, body, ctype = self._respond(head[:MAX_REQUEST_BYTES])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    def _respond(self, head: bytes) -> tuple[str, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        if parts[1].split(b"?", 1)[0] != b"/metrics":
            return "404 Not Found", b"GET /metrics\n", "text/plain"
        body = generate_latest(self.registry)
        return "200 OK", (b"" if parts[0] == b"HEAD" else body), CONTENT_TYPE_LATEST


async def start_metrics(
    args: argparse.Namespace,
    host: str,
    *collectors: Collector,
    security: SecurityConfig | None = None,
) -> MetricsEndpoint | None:
    """Serves ``collectors`` (and process metrics) if ``--metrics-port`` is set, over HTTPS
    with ``--metrics-tls`` (``security``: the service's, whose certificate it presents); prints
    ``METRICS HOST:PORT`` (``METRICS HOST:PORT https``) on stdout, before the service's
    ``LISTENING`` line."""
    check_metrics_args(args)  # run_service checked it before any work; a caller in-process too
    tls_files = security.tls if security is not None else None
    if not args.metrics_port:
        return None
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    endpoint = MetricsEndpoint(registry)
    tls = metrics_ssl_context(tls_files) if args.metrics_tls and tls_files is not None else None
    try:
        await endpoint.start(host, args.metrics_port, tls)
    except OSError as exc:  # in use, or not this host's: one line (run_service), no traceback
        raise ConfigError(
            f"--metrics-port {args.metrics_port}: cannot listen on {host}:{args.metrics_port} "
            f"({exc.strerror or exc})"
        ) from None
    suffix = f" {endpoint.scheme}" if tls is not None else ""
    print(f"METRICS {endpoint.address}{suffix}", flush=True)
    return endpoint
