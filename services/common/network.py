"""Where a service listens: ``--host`` (loopback unless told otherwise).

A service binds one IP and tells its peers that same address (a worker registers
``IP:PORT`` with the router, a kvstore node announces its data plane), so the address must be
one the peers can reach: loopback for ``banaserve up``, the container's or pod's own IP in
docker-compose and Kubernetes. ``--host auto`` picks the IP this machine's hostname resolves
to, which is that IP in a container or a pod (no shell needed to look it up).

A service its peers reach through something in between (a NAT, a proxy, a Kubernetes Service
with its own port, the chaos suite's fault proxies) tells them that address instead:
``--advertise HOST:PORT`` for its gRPC service, ``--advertise-data HOST:PORT`` for its data
plane (a decode or mixed worker's KV, a kvstore node's blocks). Each defaults to the address
bound. What is forwarded there is the operator's to set up: the service still binds ``--host``.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket

from services.common.arg_types import host_port
from services.common.errors import ConfigError

AUTO = "auto"


def add_host_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="IP to listen on and to tell peers (auto: the IP this hostname resolves to, "
        "e.g. a container's or pod's own; default: loopback)",
    )


def add_advertise_args(p: argparse.ArgumentParser, data_plane: bool) -> None:
    """``--advertise`` (and ``--advertise-data`` for a service with a data plane)."""
    p.add_argument(
        "--advertise",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="the address peers are told to reach this service's gRPC at, when something in "
        "between forwards it (default: the address it binds)",
    )
    if data_plane:
        p.add_argument(
            "--advertise-data",
            type=host_port,
            default=None,
            metavar="HOST:PORT",
            help="the same for its data plane (default: the address the data plane binds)",
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


def default_id(role: str, address: str) -> str:
    """A service's id when none is given (``--worker-id``, ``--node-id``): ``ROLE-HOST-PORT``
    of the address its peers are told (``--advertise``, else the one bound), e.g.
    ``decode-10.88.0.5-50065``. Addresses are unique across a cluster (the router refuses a
    second worker at one), so these ids are too. ``ROLE-PORT`` was not: replicas that bind the
    same port in their own containers or pods (``docker compose --scale decode=2``, a
    Deployment's replicas) shared an id, so the router refused all but one worker (ALREADY_EXISTS,
    retried forever) and kvstore nodes took each other's place in Redis. Characters other
    than letters, digits, ``.`` and ``-`` (an IPv6 address's ``:``) become ``-`` (the kvstore's
    node ids allow no more)."""
    host, port = address.rsplit(":", 1)
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", host.strip("[]")).strip("-")
    return f"{role}-{host}-{port}"
