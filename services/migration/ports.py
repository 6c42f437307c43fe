"""``StagePort`` over the data plane: the donor's steps run layers ``[k, L)`` on a helper process.

It keeps the contract of ``services/engine/ports.py`` exactly as ``LocalStagePort`` does, the
in-process reference the tests hold it against:

1. ``submit(work)`` — the donor's stepping thread. It encodes the work (services/migration/
   wire.py) on that thread and hands the exchange to the event loop that owns the data-plane
   client (``asyncio.run_coroutine_threadsafe``), returning a ``concurrent.futures.Future`` at
   once, so the step computes its other micro-batch meanwhile. The future gives the helper's
   hidden states, checked against the work's shape and dtype; it raises ``PortError`` naming
   the sequences the helper refused, or naming every sequence of the work when the helper could
   not be reached or did not answer in time. ``on_failure`` (the agent's) hears of the latter.
2. ``import_kv`` / ``export_kv`` — any thread (the engine's kv_routes.py: a sequence imported
   while switched, a prefill donor's handoff of layers ``[k, L)``): one ``kv_import`` /
   ``kv_export`` exchange on the loop (exports flagged ``handoff``, so the helper's view does
   not read them as a revert); a failure is ``PortError`` for that sequence.
3. ``release(request_ids)`` — the engine thread. Fire and forget on the loop; never blocks, never
   raises (a helper that cannot be reached frees them when their lease ends, or with the range).
   On the loop it first waits for the KV exchanges of those sequences started before it.
4. ``drain()`` then ``close()`` — the agent, once no stage uses the port: the KV exchanges in
   flight end first. The client is the agent's, not the port's: it also carries the KV copy.

Once the helper is unreachable (``on_failure`` heard) every later call fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from services.common.kv_layout import KVLayout
from services.engine.ports import PortError, StagePort, StageWork
from services.migration import wire
from services.rpc.dataplane import DataClient, DataPlaneError, ErrorKind

log = logging.getLogger(__name__)
T = TypeVar("T")


class DataStagePort(StagePort):
    def __init__(
        self,
        client: DataClient,
        migration_id: str,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.migration_id = migration_id
        self.loop = loop
        self.timeout_s = timeout_s
        self.on_failure = on_failure or (lambda reason: None)
        self.closed = False
        self.unreachable = ""  # why the helper cannot be reached, once a call found out
        # Exchanges in flight, noted on the calling thread as they are asked (any thread).
        self._lock = threading.Lock()
        self._kv_calls: dict[str, set[Future[Any]]] = {}  # by request id
        self._releases: set[Future[Any]] = set()

    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        try:
            header, payload = wire.encode_stage_run(self.migration_id, work)
            if self.closed:
                raise PortError(work.request_ids, "the port is closed")
            return asyncio.run_coroutine_threadsafe(self._run(work, header, payload), self.loop)
        except Exception as e:  # noqa: BLE001 - the future carries it to the step
            future: Future[torch.Tensor] = Future()
            future.set_exception(e)
            return future

    async def _run(self, work: StageWork, header: bytes, payload: object) -> torch.Tensor:
        try:
            out_header, out_payload = await self.client.request(header, payload, self.timeout_s)
        except DataPlaneError as e:
            raise PortError(work.request_ids, self._unreachable(e)) from e
        return wire.decode_stage_result(out_header, memoryview(out_payload), work)

    def _unreachable(self, error: DataPlaneError) -> str:
        reason = helper_lost(error)
        self.unreachable = reason
        self.on_failure(reason)
        return reason

    # -- KV of single sequences -------------------------------------------------------------

    def import_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> Future[None]:
        def start() -> Coroutine[Any, Any, None]:
            header, payload = wire.encode_kv_import(self.migration_id, request_id, data, layout)
            return self._exchange(request_id, header, payload, _acknowledged)

        return self._kv_call(request_id, start)

    def export_kv(
        self, request_id: str, layer: int, start_token: int, end_token: int
    ) -> Future[tuple[torch.Tensor, KVLayout]]:
        def start() -> Coroutine[Any, Any, tuple[torch.Tensor, KVLayout]]:
            header = wire.encode_kv_export(
                self.migration_id, request_id, layer, start_token, end_token, handoff=True
            )

            def decode(h: bytes, p: Any) -> tuple[torch.Tensor, KVLayout]:
                return wire.decode_kv_exported(h, memoryview(p), layer)

            return self._exchange(request_id, header, b"", decode)

        return self._kv_call(request_id, start)

    def _kv_call(self, request_id: str, start: Callable[[], Coroutine[Any, Any, T]]) -> Future[T]:
        """Encode on the calling thread, exchange on the loop (noted for ``release``)."""
        try:
            if self.closed or self.unreachable:
                raise PortError([request_id], self.unreachable or "the port is closed")
            future = asyncio.run_coroutine_threadsafe(start(), self.loop)
        except Exception as e:  # noqa: BLE001 - the future carries it to the caller
            failed: Future[T] = Future()
            failed.set_exception(e)
            return failed
        self._note(future, request_id)
        return future

    def _note(self, future: Future[Any], request_id: str | None = None) -> None:
        """Track ``future`` until it settles: a KV call of ``request_id``, or (None) a release."""
        with self._lock:
            if request_id is None:
                calls = self._releases
            else:
                calls = self._kv_calls.setdefault(request_id, set())
            calls.add(future)

        def done(f: Future[Any]) -> None:
            with self._lock:
                calls.discard(f)
                if request_id is not None and not calls and self._kv_calls.get(request_id) is calls:
                    del self._kv_calls[request_id]

        future.add_done_callback(done)

    async def _exchange(
        self, request_id: str, header: bytes, payload: object, decode: Callable[[bytes, Any], T]
    ) -> T:
        try:
            out_header, out_payload = await self.client.request(header, payload, self.timeout_s)
        except DataPlaneError as e:
            if e.kind is ErrorKind.REMOTE:  # the helper refused (no room, not held): this one
                raise PortError([request_id], str(e)) from e
            raise PortError([request_id], self._unreachable(e)) from e
        try:
            return decode(out_header, out_payload)
        except Exception as e:  # noqa: BLE001 - the helper refused: this sequence only
            raise PortError([request_id], f"{type(e).__name__}: {e}") from e

    async def drain(self) -> None:
        """On the loop: wait for every KV exchange and release asked so far."""
        with self._lock:
            pending = {f for calls in self._kv_calls.values() for f in calls} | self._releases
        if pending:
            await asyncio.wait({asyncio.wrap_future(f) for f in pending})

    def release(self, request_ids: Sequence[str]) -> None:
        if not request_ids or self.closed:
            return
        header = wire.encode_release(self.migration_id, list(request_ids))
        with self._lock:  # the reads asked before this release; it waits for them
            before = {f for r in request_ids for f in self._kv_calls.get(r, ())}
        # A closed loop (RuntimeError): the helper frees them with the range or their lease.
        with contextlib.suppress(RuntimeError):
            future = asyncio.run_coroutine_threadsafe(self._release(header, before), self.loop)
            self._note(future)

    async def _release(self, header: bytes, before: set[Future[Any]]) -> None:
        if before:  # a handoff read asked before the release must still find the KV
            await asyncio.wait({asyncio.wrap_future(f) for f in before})
        try:
            await self.client.request(header, b"", self.timeout_s)
        except DataPlaneError as e:
            log.debug("migration %s: release lost: %r", self.migration_id, e)

    def close(self) -> None:
        self.closed = True


def helper_lost(error: DataPlaneError) -> str:
    """Why the helper is lost to a migration, from the data-plane call that failed: it could not
    be reached (or did not answer in time), or it answered that it holds nothing for it."""
    if error.kind is ErrorKind.REMOTE:
        return f"helper refused the work: {error.code}: {error.message}"
    if error.kind is ErrorKind.TIMEOUT:
        return f"helper unreachable (no answer in time): {error.message}"
    return f"helper unreachable: {error.message}"


def _acknowledged(header: bytes, payload: object) -> None:
    wire.parse_response(header, "ok")
