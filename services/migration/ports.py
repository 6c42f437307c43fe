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
2. ``release(request_ids)`` — the engine thread. Fire and forget on the loop; never blocks, never
   raises (a helper that cannot be reached frees them when their lease ends, or with the range).
3. ``close()`` — the agent, once no stage uses the port. The client is the agent's, not the
   port's: it also carries the KV copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from services.engine.ports import PortError, StagePort, StageWork
from services.migration import wire
from services.rpc.dataplane import DataClient, DataPlaneError

log = logging.getLogger(__name__)


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
            reason = f"helper unreachable: {e}"
            self.on_failure(reason)
            raise PortError(work.request_ids, reason) from e
        return wire.decode_stage_result(out_header, memoryview(out_payload), work)

    def release(self, request_ids: Sequence[str]) -> None:
        if not request_ids or self.closed:
            return
        header = wire.encode_release(self.migration_id, list(request_ids))
        # A closed loop (RuntimeError): the helper frees them with the range or their lease.
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._release(header), self.loop)

    async def _release(self, header: bytes) -> None:
        try:
            await self.client.request(header, b"", self.timeout_s)
        except DataPlaneError as e:
            log.debug("migration %s: release lost: %r", self.migration_id, e)

    def close(self) -> None:
        self.closed = True
