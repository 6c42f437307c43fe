"""The shared data-plane connection to a decode worker is bounded by the transport's own connect
timeout, never by the deadline of the request that happened to start it (issue 8, item 3: the
first of two requests had 0.04 s left, and the second, with 20 s, failed with it)."""

from __future__ import annotations

import asyncio

import pytest

from services.prefill.dataplane_transport import DataPlaneKVTransport
from services.prefill.transport import KVTarget
from services.rpc import dataplane
from services.rpc.dataplane import DataPlaneError, ErrorKind
from services.rpc.dataplane.base import timed_out

HANDSHAKE_S = 0.2
TARGET = KVTarget("decode-0", "127.0.0.1:1", "res-1", "127.0.0.1:2", "tcp")


class FakeClient:
    async def close(self) -> None:
        pass


def test_a_short_deadline_does_not_fail_the_connection_others_wait_for(monkeypatch):
    connects: list[float] = []

    async def slow_connect(kind: str, address: str, timeout_s: float) -> FakeClient:
        connects.append(timeout_s)
        await asyncio.sleep(min(timeout_s, HANDSHAKE_S))
        if timeout_s < HANDSHAKE_S:
            raise timed_out(f"no handshake within {timeout_s}s")
        return FakeClient()

    monkeypatch.setattr(dataplane, "connect", slow_connect)

    async def main():
        transport = DataPlaneKVTransport(connect_timeout_s=5.0)
        hurried = asyncio.create_task(transport.connection(TARGET, 0.04))
        patient = asyncio.create_task(transport.connection(TARGET, 20.0))
        with pytest.raises(DataPlaneError) as err:
            await hurried
        client = await patient
        again = await transport.connection(TARGET, 0.01)  # connected: no wait at all
        await transport.close()
        return err.value, client, again

    error, client, again = asyncio.run(main())
    assert error.kind is ErrorKind.TIMEOUT
    assert error.message == "connect 127.0.0.1:2: not connected within 0.04s"
    assert isinstance(client, FakeClient) and again is client
    assert connects == [5.0]  # one shared connect, on the transport's own bound
