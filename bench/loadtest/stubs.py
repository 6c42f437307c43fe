"""Peers that answer at once, for a load test whose service needs a peer that must not be the
bottleneck. Both run inside the load test's process, on its event loop.

- ``KVSink`` — where the prefill load test sends each request's KV: a decode worker's receiving
  side reduced to acknowledging. It serves both forms of a transfer (decode.proto): data-plane
  messages (``KVTransferFrame`` headers, a chunk's bytes as the payload) on a data plane of the
  chosen kind, and the ``DecodeService.TransferKV`` stream on a gRPC server; ``target`` names
  both, and the prefill worker picks one by its own ``--kv-transport``. Every message is
  answered as soon as it arrived; the sink counts transfers and bytes and checks only that a
  transfer opens with its header (on the stream, an ``open`` frame may come before it, as a
  prefill worker sends one; the decode worker's checks are the decode load test's).
- ``StubWorkers`` — one prefill and one decode worker without a model, registered with a router
  (``ReportLoad``, as real workers do) for the router load test: ``Prefill`` answers a first
  token and ``done`` at once, ``ReserveKV`` reserves nothing, ``StreamTokens`` streams the
  request's ``max_tokens - 1`` remaining tokens at once. Register them with a router that has
  no other workers, or the router shares its requests between them and the real ones.

Under TLS each serves with the certificate of the service it stands in for (``credentials.py``):
the sink and the stub decode worker with ``decode``'s, the stub prefill worker with
``prefill``'s, and each stub worker registers with its own. The sink's TCP data plane
authenticates with the process's data-plane secret (``secure_data_planes``), which the prefill
load test sets before the sink starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from bench.loadtest.credentials import NONE, Credentials
from services.common.config import RpcConfig
from services.common.errors import ConfigError, InvalidRequestError, RequestNotFoundError
from services.common.load import LoadReport
from services.rpc import dataplane
from services.rpc.convert import DATA_TRANSPORT_TO_PROTO, duration
from services.rpc.gen.banaserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from services.rpc.load_reports import LoadReporter, reporting_to, worker_info
from services.rpc.security import Role
from services.rpc.server import RunningServer, Service, start_server

STUB_BLOCKS = 1 << 20
STUB_MAX_MODEL_LEN = 1 << 16
DEFAULT_MAX_TOKENS = 16  # SamplingParams' default, for a request that sets none
REGISTER_TIMEOUT_S = 10.0
# A registration the router refuses so (another model's workers, a worker id in use, a role its
# certificate does not allow) is not retried into REGISTER_TIMEOUT_S (probe, session 44: 10.7 s).
REFUSED_FOR_GOOD = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
     grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
     grpc.StatusCode.FAILED_PRECONDITION}
)  # fmt: skip


class KVSink(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, transport: str = "tcp", rpc: RpcConfig | None = None) -> None:
        """``transport``: a data-plane kind (``services.rpc.dataplane.KINDS``), or "stream" for
        the ``TransferKV`` stream alone."""
        self.transport = transport
        self._rpc = rpc or RpcConfig(grace_s=1.0)
        self._open: dict[str, int] = {}  # reservation id -> bytes so far
        self.num_transfers = 0
        self.num_bytes = 0
        self._server: RunningServer | None = None
        self._data: dataplane.DataServer | None = None

    async def start(self) -> None:
        if self.transport != "stream":
            self._data = dataplane.serve(self.transport, self._handle)
            await self._data.start()
        service = Service.bind(
            self,
            decode_pb2_grpc.add_DecodeServiceServicer_to_server,
            decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
        )
        self._server = await start_server([service], self._rpc)

    async def stop(self) -> None:
        if self._data is not None:
            await self._data.stop()
        if self._server is not None:
            await self._server.stop(0.5)

    @property
    def num_open(self) -> int:
        return len(self._open)

    def target(self, reservation_id: str) -> prefill_pb2.KVTarget:
        if self._server is None:
            raise RuntimeError("the sink is not started")
        data = self._data
        return prefill_pb2.KVTarget(
            worker_id="loadtest-kv-sink",
            address=self._server.address,
            reservation_id=reservation_id,
            data_address=data.address if data else "",
            data_transport=DATA_TRANSPORT_TO_PROTO[self.transport] if data else 0,
        )

    def _frame(self, reservation_id: str, kind: str, num_bytes: int = 0) -> bytes:
        """One frame of a transfer; the serialised TransferKVResponse for its end."""
        if kind == "header":
            self._open[reservation_id] = 0
            return b""
        if reservation_id not in self._open:
            if kind == "abort":
                return b""
            raise RequestNotFoundError(f"no transfer open for {reservation_id!r}")
        if kind == "layer":
            self._open[reservation_id] += num_bytes
            return b""
        received = self._open.pop(reservation_id)
        if kind == "abort":
            return b""
        self.num_transfers += 1
        self.num_bytes += received
        return decode_pb2.TransferKVResponse(num_bytes=received).SerializeToString()

    async def _handle(self, header: bytes, payload: memoryview) -> tuple[bytes, bytes]:
        frame = decode_pb2.KVTransferFrame.FromString(header)
        kind = frame.WhichOneof("frame")
        if kind is None:
            raise InvalidRequestError("empty KVTransferFrame")
        return self._frame(frame.reservation_id, kind, len(payload)), b""

    async def TransferKV(self, request_iterator, context):
        reservation_id = None
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("frame")
                if kind == "open":  # decode.proto: may come first, the header follows
                    reservation_id = message.open.reservation_id
                    continue
                if kind == "header":
                    reservation_id = message.header.reservation_id
                if reservation_id is None:
                    raise InvalidRequestError("a transfer must start with its open or header")
                size = len(message.layer.data) if kind == "layer" else 0
                answer = self._frame(reservation_id, kind, size)
                if kind == "end":
                    return decode_pb2.TransferKVResponse.FromString(answer)
        finally:
            self._open.pop(reservation_id, None)
        raise InvalidRequestError("the transfer ended without its end frame")


# ---- stub workers for the router ---------------------------------------------------------


class StubPrefill(prefill_pb2_grpc.PrefillServiceServicer):
    async def Prefill(self, request, context) -> AsyncIterator[prefill_pb2.PrefillResponse]:
        yield prefill_pb2.PrefillResponse(first_token=common_pb2.TokenDelta(token_ids=[1]))
        done = prefill_pb2.PrefillDone(num_prompt_tokens=len(request.prompt_token_ids))
        yield prefill_pb2.PrefillResponse(done=done)


class StubDecode(decode_pb2_grpc.DecodeServiceServicer):
    """Holds a reservation (its token count) until ``StreamTokens`` or ``Release`` takes it, or
    its lease passes, as a decode worker would."""

    def __init__(self) -> None:
        # request id -> (tokens it asks for in all, lease expiry on the monotonic clock)
        self.reserved: dict[str, tuple[int, float]] = {}

    def expire(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, (_, expiry) in self.reserved.items() if expiry <= now]:
            del self.reserved[request_id]

    async def ReserveKV(self, request, context):
        self.expire()
        has = request.sampling.HasField("max_tokens")
        max_tokens = request.sampling.max_tokens if has else DEFAULT_MAX_TOKENS
        lease = request.lease if request.HasField("lease") else duration(30.0)
        expiry = time.monotonic() + lease.ToTimedelta().total_seconds()
        self.reserved[request.request_id] = (max_tokens, expiry)
        return decode_pb2.ReserveKVResponse(reservation_id=uuid.uuid4().hex, lease=lease)

    async def StreamTokens(self, request, context):
        max_tokens, _ = self.reserved.pop(request.request_id, (None, 0.0))
        if max_tokens is None:
            raise RequestNotFoundError(f"no request {request.request_id!r} here")
        for _ in range(max_tokens - 1):
            yield decode_pb2.StreamTokensResponse(delta=common_pb2.TokenDelta(token_ids=[1]))
        finished = decode_pb2.DecodeFinished(
            finish_reason=common_pb2.FINISH_REASON_LENGTH, num_completion_tokens=max_tokens
        )
        yield decode_pb2.StreamTokensResponse(finished=finished)

    async def Release(self, request, context):
        found = self.reserved.pop(request.request_id, None) is not None
        return decode_pb2.ReleaseResponse(found=found)


class StubWorkers:
    """Serves ``StubPrefill`` and ``StubDecode`` and registers both with ``router`` under the
    model name ``model`` (a router started with ``--model`` takes only that name)."""

    def __init__(
        self, router: str, model: str, rpc: RpcConfig | None = None,
        credentials: Credentials = NONE,
    ) -> None:  # fmt: skip
        self.router = router
        self.model = model
        base = rpc or RpcConfig(grace_s=1.0)
        # Each stub serves, and registers with the router, as the worker it plays.
        self._rpcs = {
            "prefill": credentials.rpc(Role.PREFILL, base),
            "decode": credentials.rpc(Role.DECODE, base),
        }
        self.decode = StubDecode()
        self._stack = contextlib.AsyncExitStack()
        self._reporters: list[LoadReporter] = []

    async def start(self) -> None:
        prefill = Service.bind(
            StubPrefill(),
            prefill_pb2_grpc.add_PrefillServiceServicer_to_server,
            prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"],
        )
        decode = Service.bind(
            self.decode,
            decode_pb2_grpc.add_DecodeServiceServicer_to_server,
            decode_pb2.DESCRIPTOR.services_by_name["DecodeService"],
        )
        for role, service in (("prefill", prefill), ("decode", decode)):
            rpc = self._rpcs[role]
            server = await start_server([service], rpc)
            self._stack.push_async_callback(server.stop, 0.5)
            info = worker_info(
                f"loadtest-stub-{role}", server.address, role, self.model, "loadtest-stub",
                16, STUB_BLOCKS, STUB_MAX_MODEL_LEN,
            )  # fmt: skip
            reporter = await self._stack.enter_async_context(
                reporting_to(self.router, info, self._load, rpc)
            )
            self._reporters.append(reporter)

    async def _load(self) -> LoadReport:
        self.decode.expire()
        running = len(self.decode.reserved)
        return LoadReport(0, running, 0, 0, STUB_BLOCKS, 0.0, 0.0, 1.0)

    async def wait_registered(self) -> None:
        """Until the router lists both stubs as active (bounded)."""
        from services.rpc.channels import open_channel
        from services.rpc.gen.banaserve.v1 import router_pb2, router_pb2_grpc

        wanted = {"loadtest-stub-prefill", "loadtest-stub-decode"}
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        channel = open_channel(self.router, self._rpcs["prefill"])
        try:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            while True:
                reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=2)
                ids = {
                    w.info.worker_id
                    for w in reply.workers
                    if w.state == router_pb2.WORKER_STATE_ACTIVE
                }
                if wanted <= ids:
                    return
                for reporter in self._reporters:  # refused for good: said now, not in 10 s
                    error = reporter.last_error
                    if error is not None and error.code() in REFUSED_FOR_GOOD:
                        raise ConfigError(
                            f"the router refused the stub workers: {error.code().name}: "
                            f"{error.details()} (--stub-workers needs a router with no "
                            f"workers of another model)"
                        )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stub workers not active on {self.router} in time")
                await asyncio.sleep(0.05)
        finally:
            await channel.close()

    async def stop(self) -> None:
        await self._stack.aclose()
