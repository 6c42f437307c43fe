"""Channel and server options, and the one way a service opens a channel to another.

Both ends of every call use the same message-size limit (KV layers travel as single messages,
far beyond gRPC's 4 MiB default) and compatible keepalive settings: the client pings an idle
connection so a peer that vanished without closing it is found, and the server accepts those
pings instead of answering them with GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

from dataclasses import replace

import grpc

from services.common.config import RpcConfig
from services.rpc import security
from services.rpc.tracing import DISABLED, Tracing

Options = list[tuple[str, int | str]]


def _common_options(
    config: RpcConfig, receive_bytes: int, keepalive_s: float, keepalive_timeout_s: float
) -> Options:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", receive_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        # gRPC core waits for any ping's ack this long (default 60 s), keepalive pings included:
        # without it a frozen peer (SIGSTOP, a hung host) held a call 62 s, not at most 15 s.
        ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


# A peer that went away is tried again every second at most, not on gRPC's default backoff
# (growing to 2 minutes): a worker restarted on its port is reached by the router and the
# coordinator within about a second of its return (tests/chaos/test_reconnect.py).
RECONNECT_BACKOFF_MS = 1000
# How long one connection attempt — TCP, TLS and the HTTP/2 settings — may take (gRPC's
# ``grpc.min_reconnect_backoff_ms`` is its minimum connect timeout; default 20 s). A path that
# accepts connections and delivers nothing (a black-holing middlebox) holds every new call this
# long before it fails UNAVAILABLE and the router tries elsewhere; a live peer completes a
# handshake in milliseconds, and one behind a link slowed to 0.4 s each way still connects
# (tests/rpc/test_channel_connect.py); with TLS a probe found 1.0 s each way connecting and
# 1.5 s not — not a link within a deployment. The client library keeps gRPC's 20 s.
CONNECT_TIMEOUT_MS = 5000


# A peer reached by name whose address changed — a container recreated (compose's `restart`,
# a new pod) comes back on a new IP — is looked up again once its connection fails, at most
# this often. gRPC's default is 30 s: a probe (session 45) saw workers dial a recreated
# router's old IP for 28 s, every request failing "no healthy worker", while every container
# was healthy (tests/rpc/test_channel_dns.py).
DNS_REFRESH_MS = 1000


def channel_options(config: RpcConfig) -> Options:
    """A service's channel to a peer: pings on the channel keepalive (RpcConfig)."""
    keepalive = (config.channel_keepalive_s, config.channel_keepalive_timeout_s)
    # 0: keep pinging however long the connection stays idle (the default stops after two).
    return [
        *_common_options(config, config.max_message_bytes, *keepalive),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_REFRESH_MS),
    ]


# The shortest ping interval of the client library (services/client: ``keepalive_s``).
MIN_CLIENT_KEEPALIVE_S = 1.0


def client_library_options(config: RpcConfig) -> Options:
    """The client library's channels (services/client): a service's, but pinging only while a
    call is open, with connections of their own — gRPC otherwise shares one between a
    process's channels to the same target, and a new client inherited another's dead one — and
    gRPC's own 20 s for a connection attempt: a client may be far from its router (over TLS
    and a link 1.5 s each way a probe's client got its first token after 9 s with it, and
    nothing with the services' 5 s, which is for peers inside one deployment)."""
    slower = replace(config, channel_keepalive_s=config.keepalive_s,
                     channel_keepalive_timeout_s=config.keepalive_timeout_s)  # fmt: skip
    options = dict(channel_options(slower))
    options["grpc.keepalive_permit_without_calls"] = 0
    options["grpc.use_local_subchannel_pool"] = 1
    del options["grpc.min_reconnect_backoff_ms"]
    return list(options.items())


def server_options(config: RpcConfig) -> Options:
    # Accept client pings at the rate the clients above and the client library send them, with
    # slack for jitter; pings closer together while the server sends nothing are strikes, and
    # two strikes end the connection (GOAWAY too_many_pings), failing every call on it.
    min_ping_s = min(config.keepalive_s, config.channel_keepalive_s, MIN_CLIENT_KEEPALIVE_S) / 2
    return [
        *_common_options(
            config, config.server_receive_bytes, config.keepalive_s, config.keepalive_timeout_s
        ),
        ("grpc.http2.min_ping_interval_without_data_ms", int(min_ping_s * 1000)),
        # gRPC lets a second server bind a port already in use (SO_REUSEPORT) and then splits
        # connections between the two; a port clash must fail loudly instead.
        ("grpc.so_reuseport", 0),
    ]


def open_channel(
    target: str, config: RpcConfig, tracing: Tracing = DISABLED, extra_options: Options = ()
) -> grpc.aio.Channel:
    """A channel to ``target`` ("HOST:PORT"): mutual TLS with this process's role certificate
    when ``config.security`` has TLS (services/rpc/security.py), plaintext otherwise. Every
    channel between services is opened here, so none escapes TLS when it is on.
    ``extra_options`` replace the defaults of the same name."""
    interceptors = tracing.client_interceptors()
    options: Options = list({**dict(channel_options(config)), **dict(extra_options)}.items())
    tls = config.security.tls if config.security is not None else None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    credentials = security.channel_credentials(tls)
    options += security.channel_options()
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
