"""How long a call in flight between services waits on a connection that died without a reset
(services/rpc/channels.py, ``RpcConfig.channel_keepalive_s``): a link stranded under an open
stream — a partition, a NAT or a middlebox that dropped the connection — fails the call
UNAVAILABLE within the channel keepalive (2 s + 3 s), where the services' 10 s + 5 s held it
~15 s before (a router's first try on a black-holed worker link: docs/reliability.md); and the
next call on the same channel goes through on a new connection. Servers' own pings and the
client library's stay at 10 s + 5 s: a client may be far from its router."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.rpc.channels import (
    channel_options,
    client_library_options,
    open_channel,
    server_options,
)
from services.rpc.gen.banaserve.v1 import decode_pb2, decode_pb2_grpc
from tests.chaos.proxy import FaultProxy, Mode
from tests.rpc.helpers import serving


@contextlib.asynccontextmanager
async def through_proxy():
    """A served fake decode service, a fault proxy before it and a service channel through it."""
    async with serving() as (server, _, servicer):
        proxy = FaultProxy("link", lambda: server.address)
        proxy.start()
        channel = open_channel(proxy.address, RpcConfig())
        try:
            yield decode_pb2_grpc.DecodeServiceStub(channel), proxy, servicer
        finally:
            await channel.close()
            proxy.stop()


def test_a_call_into_a_stranded_connection_fails_within_the_channel_keepalive():
    async def main():
        async with through_proxy() as (stub, proxy, _):
            stats = decode_pb2.DecodeServiceStatsRequest()
            await stub.Stats(stats, timeout=10)  # the connection is up
            await asyncio.sleep(0.5)  # and idle
            proxy.set(Mode.STRAND)  # it delivers nothing from now on; new ones pass
            started = time.monotonic()
            call = stub.StreamTokens(decode_pb2.StreamTokensRequest(request_id="slow"), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            took = time.monotonic() - started
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            # the channel keepalive found it, 2 s + 3 s at most: not the 30 s deadline, nor the
            # 10 s + 5 s of before (14.5 s here)
            assert "ping timeout" in info.value.details(), info.value
            assert took < 5 + 1.5, took
            # a new connection serves the next call
            reply = await stub.Stats(stats, timeout=10)
            assert reply.kv.num_blocks_total == 8

    asyncio.run(main())


def test_servers_and_the_client_library_keep_the_slower_keepalive():
    config = RpcConfig()
    assert config.channel_keepalive_s < config.keepalive_s
    service = dict(channel_options(config))
    assert service["grpc.keepalive_time_ms"] == int(config.channel_keepalive_s * 1000)
    assert service["grpc.http2.ping_timeout_ms"] == int(config.channel_keepalive_timeout_s * 1000)
    for options in (client_library_options(config), server_options(config)):
        options = dict(options)
        assert options["grpc.keepalive_time_ms"] == int(config.keepalive_s * 1000)
        assert options["grpc.keepalive_timeout_ms"] == int(config.keepalive_timeout_s * 1000)
    # the servers accept the channels' pings (closer ones are strikes: GOAWAY too_many_pings)
    min_ping_ms = dict(server_options(config))["grpc.http2.min_ping_interval_without_data_ms"]
    assert min_ping_ms <= config.channel_keepalive_s * 1000


def test_a_channel_keepalive_must_be_positive():
    for name in ("channel_keepalive_s", "channel_keepalive_timeout_s"):
        with pytest.raises(ConfigError, match=f"{name} must be positive"):
            RpcConfig(**{name: 0})
