"""``--metrics-tls``: ``/metrics`` over HTTPS with the service's certificate, scraped only with a
client certificate of the cluster CA; refused at start without ``--tls-dir``."""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import ConfigError
from services.common.https_port import REFUSAL_BODY
from services.common.metrics import RequestMetrics
from services.common.metrics_endpoint import check_metrics_args, start_metrics
from services.rpc.security import Role, SecurityConfig, TlsFiles
from tests.prefill.helpers import free_port

ROOT = Path(__file__).parents[2]


def scraper(ca_dir: Path, cert_dir: Path | None) -> ssl.SSLContext:
    """A scraper that trusts ``ca_dir``'s CA and presents ``cert_dir``'s client certificate
    (None: none)."""
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    context.check_hostname = False  # the certificates name the service's hosts, not 127.0.0.1
    if cert_dir is not None:
        context.load_cert_chain(str(cert_dir / "client.crt"), str(cert_dir / "client.key"))
    return context


def scrape(url: str, context: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        return response.read()


def test_metrics_over_https_take_only_scrapers_with_a_certificate_of_the_cluster_ca(
    certs, foreign_certs, capsys
):
    registry = CollectorRegistry()
    RequestMetrics(registry)
    security = SecurityConfig(Role.ROUTER, TlsFiles.in_dir(certs, Role.ROUTER))
    args = argparse.Namespace(metrics_port=free_port(), metrics_tls=True, tls_dir=str(certs))

    async def main():
        endpoint = await start_metrics(args, "127.0.0.1", registry, security=security)
        url = f"https://{endpoint.address}/metrics"
        try:
            ok = await asyncio.to_thread(scrape, url, scraper(certs, certs))
            refused = []
            for context in (
                scraper(certs, None),  # no client certificate
                scraper(certs, foreign_certs),  # one of another CA
            ):
                with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                    refused.append(await asyncio.to_thread(scrape, url, context))
            # plain HTTP: a 400 that says why (before session 48: closed with no reply)
            with pytest.raises(urllib.error.HTTPError) as plain:
                refused.append(
                    await asyncio.to_thread(scrape, f"http://{endpoint.address}/metrics")
                )
            assert (plain.value.code, plain.value.read()) == (400, REFUSAL_BODY)
            # a client that trusts only another CA does not trust this server either
            with pytest.raises((ssl.SSLError, urllib.error.URLError)):
                refused.append(await asyncio.to_thread(scrape, url, scraper(foreign_certs, None)))
            return endpoint.address, ok, refused
        finally:
            await endpoint.stop()

    address, ok, refused = asyncio.run(main())
    assert b"banaserve_router_requests_total" in ok
    assert refused == []
    assert capsys.readouterr().out == f"METRICS {address} https\n"


def test_plain_metrics_print_no_scheme(capsys):
    args = argparse.Namespace(metrics_port=free_port(), metrics_tls=False, tls_dir="")
    registry = CollectorRegistry()
    RequestMetrics(registry)

    async def main():
        endpoint = await start_metrics(args, "127.0.0.1", registry)
        try:
            return endpoint.address, await asyncio.to_thread(
                scrape, f"http://{endpoint.address}/metrics"
            )
        finally:
            await endpoint.stop()

    address, body = asyncio.run(main())
    assert b"banaserve_router_requests_total" in body
    assert b"process_" in body  # start_metrics adds the process collector
    assert capsys.readouterr().out == f"METRICS {address}\n"


def test_metrics_tls_without_a_tls_dir_or_a_metrics_port_is_refused():
    with pytest.raises(ConfigError, match="--metrics-tls needs --tls-dir"):
        check_metrics_args(argparse.Namespace(metrics_tls=True, tls_dir="", metrics_port=9))
    with pytest.raises(ConfigError, match="--metrics-tls needs --metrics-port"):
        check_metrics_args(argparse.Namespace(metrics_tls=True, tls_dir="d", metrics_port=0))
    check_metrics_args(argparse.Namespace(metrics_tls=False, tls_dir="", metrics_port=0))
    check_metrics_args(argparse.Namespace(metrics_tls=True, tls_dir="d", metrics_port=9))


@pytest.mark.parametrize("service", ["router", "kvstore", "coordinator", "prefill", "decode"])
def test_a_service_given_metrics_tls_without_a_tls_dir_stops_at_once_with_one_line(service):
    """Before any work (a worker loads no model): exit status 2 and one ``error:`` line."""
    run = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--metrics-port", "9", "--metrics-tls"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "BANASERVE_HOME": "/nonexistent"},
    )
    assert run.returncode == 2, run.stderr
    assert "error: --metrics-tls needs --tls-dir" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_service_given_metrics_tls_without_a_metrics_port_stops_at_once_with_one_line(certs):
    """Metrics are off without a port: the flag would be silently ignored."""
    run = subprocess.run(
        [sys.executable, "-m", "services.router", "--tls-dir", str(certs), "--metrics-tls"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode == 2, run.stderr
    assert "error: --metrics-tls needs --metrics-port" in run.stderr
    assert "Traceback" not in run.stderr
