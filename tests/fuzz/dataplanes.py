"""Fuzzing the data planes' request handlers: ``(header, payload)`` messages over TCP, each
held to the same contract as a gRPC call (``harness.Fuzzer.check``).

The messages go through the project's own TCP client (services/rpc/dataplane), so what is
fuzzed is each handler (a decode worker's KV receiver, a kvstore node's reads and writes), not
the frame layer below it: a header is at most ``MAX_HEADER_BYTES`` (the client refuses to send
more, a server drops a connection announcing more).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from hypothesis import strategies as st

from services.rpc import dataplane
from services.rpc.dataplane import DataPlaneError, ErrorKind
from services.rpc.dataplane.base import MAX_HEADER_BYTES
from tests.fuzz.harness import HANG_SLACK_S, Fuzzer, Outcome
from tests.fuzz.strategies import Hints, payloads


class DataPlaneCaller:
    """Sync access to TCP data-plane clients, on an event loop of its own (a thread)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._clients: dict[str, Any] = {}

    def _run(self, coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _request(self, address: str, header: bytes, payload: bytes, timeout_s: float):
        client = self._clients.get(address)
        if client is None:
            client = await dataplane.connect("tcp", address, timeout_s=timeout_s)
            self._clients[address] = client
        try:
            return await client.request(header, payload, timeout_s)
        except DataPlaneError as exc:
            if exc.kind is ErrorKind.UNAVAILABLE:  # a lost connection is never reused
                self._clients.pop(address, None)
                await client.close()
            raise

    def call(self, address: str, header: bytes, payload: bytes, timeout_s: float) -> Outcome:
        started = time.monotonic()
        try:
            out_header, out_payload = self._run(
                self._request(address, header, payload, timeout_s), timeout_s + HANG_SLACK_S
            )
        except DataPlaneError as exc:
            code = {ErrorKind.TIMEOUT: "DEADLINE_EXCEEDED", ErrorKind.UNAVAILABLE: "UNAVAILABLE"}
            return Outcome(exc.code or code[exc.kind], time.monotonic() - started, exc.message)
        elapsed = time.monotonic() - started
        return Outcome("OK", elapsed, responses=[bytes(out_header)], payload=bytes(out_payload))

    def close(self) -> None:
        async def close_all() -> None:
            for client in self._clients.values():
                await client.close()

        self._run(close_all(), 10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)


@dataclass(frozen=True)
class DataPlaneTarget:
    """A data plane under fuzz: one handler, the statuses it may answer."""

    service: str
    address: Callable[[], str]
    header_class: type[Message]
    allowed: frozenset[str]
    timeout_s: float = 10.0


def data_call(
    fuzzer: Fuzzer,
    caller: DataPlaneCaller,
    target: DataPlaneTarget,
    messages: Sequence[tuple[bytes, bytes]],
) -> list[Outcome]:
    """Sends ``(header, payload)`` messages in order, each checked like a gRPC call."""
    outcomes = []
    for i, (header, payload) in enumerate(messages):
        outcome = caller.call(target.address(), header, payload, target.timeout_s)
        what = (
            f"{target.service} message {i} of {len(messages)}: header {header[:200]!r}, "
            f"payload of {len(payload)} bytes"
        )
        kind = _data_kind(target.header_class, header)
        fuzzer.check(target.service, kind, target.allowed, False, target.timeout_s, outcome, what)
        outcomes.append(outcome)
    return outcomes


def _data_kind(header_class: type[Message], header: bytes) -> str:
    """Which frame (the oneof's branch) a data-plane header is, for the detail table."""
    try:
        message = header_class.FromString(header)
    except Exception:
        return "undecodable"
    oneof = header_class.DESCRIPTOR.oneofs[0].name
    return message.WhichOneof(oneof) or "no frame"


def data_plane_headers(
    descriptor: Any, hints: Hints, seeds: Sequence[Message] = ()
) -> st.SearchStrategy[bytes]:
    """Headers of data-plane messages: any payload the walker makes, up to the plane's header
    limit (a client refuses to send more, and a server drops a connection announcing more)."""
    return payloads(descriptor, hints, seeds).filter(lambda b: len(b) <= MAX_HEADER_BYTES)
