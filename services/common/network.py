"""Where a service listens: ``--host`` (loopback unless told otherwise).

A service binds one IP and tells its peers that same address (a worker registers
``IP:PORT`` with the router, a kvstore node announces its data plane), so the address must be
one the peers can reach: loopback for ``banaserve up``, the container's or pod's own IP in
docker-compose and Kubernetes. ``--host auto`` picks the IP this machine's hostname resolves
to, which is that IP in a container or a pod (no shell needed to look it up).
"""

from __future__ import annotations

import argparse
import ipaddress
import socket

from services.common.errors import ConfigError

AUTO = "auto"


def add_host_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="IP to listen on and to tell peers (auto: the IP this hostname resolves to, "
        "e.g. a container's or pod's own; default: loopback)",
    )


def resolve_host(host: str, resolve=socket.gethostbyname, hostname=socket.gethostname) -> str:
    """``host`` as the IP to bind; ``auto`` looks up this machine's hostname."""
    ip = resolve(hostname()) if host == AUTO else host
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ConfigError(f"host must be an IP address or {AUTO!r}, got {host!r}") from None
    if address.is_unspecified:
        raise ConfigError(f"host must be an address peers can reach, not {ip!r}")
    return ip
