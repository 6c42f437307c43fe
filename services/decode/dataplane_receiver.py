"""The decode worker's end of a KV handoff over the data plane (services/rpc/dataplane).

The transfer ``TransferKV`` carries as one client stream (header, layer chunks, end) arrives
here as separate data-plane messages, each naming its reservation, and is fed to the same
``DecodeWorker.receive`` through a queue. One transfer, keyed by reservation id:

1. ``open(header)``  - creates the queue, starts ``receive`` over it in a task of its own, and
                       returns once ``receive`` has accepted the header (reservation claimed,
                       layout checked), so a rejected transfer fails its first message;
2. ``layer(chunk)``  - queues the chunk (its bytes are the message's payload, not copied) and
                       returns once ``receive`` has taken it in, i.e. asked for the next frame:
                       the chunk's layer is imported if the chunk completed it. A sender with W
                       messages in flight thus holds at most W chunks here (the backpressure),
                       however large the transfer;
3. ``end(end)``      - queues the end frame and returns ``receive``'s ``TransferResult`` once
                       the sequence runs; ``abort()`` instead ends the transfer at once.

``receive`` frees the reservation whenever it fails, and its error answers the message waiting
on it (the data plane maps it to a status code); a message for a transfer no longer open gets
NOT_FOUND. Nothing waits for ever: a sender that goes silent leaves ``receive`` waiting on the
queue only until its idle timeout or the reservation's end (lease, deadline, Release), as any
transfer (``DecodeWorker.receive``), and a message whose connection is lost (the data plane
cancels its handler) aborts its transfer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.common.errors import InvalidRequestError, RequestNotFoundError
from services.decode.core import DecodeWorker
from services.decode.transfer import (
    LayerChunk,
    TransferEnd,
    TransferFrame,
    TransferHeader,
    TransferResult,
)

log = logging.getLogger(__name__)

# A queue item: a frame and the future set once ``receive`` has taken it in (None for the end,
# whose answer is the transfer's result), or an error that ends the transfer where it stands.
_Item = tuple[TransferFrame, "asyncio.Future[None] | None"] | BaseException


@dataclass(eq=False)
class _Transfer:
    reservation_id: str
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[TransferResult] = field(init=False)  # runs ``DecodeWorker.receive``


class DataPlaneReceiver:
    """Open transfers by reservation id; touched only from the event loop."""

    def __init__(self, worker: DecodeWorker) -> None:
        self._worker = worker
        self._transfers: dict[str, _Transfer] = {}

    @property
    def num_open(self) -> int:
        return len(self._transfers)

    async def open(self, header: TransferHeader) -> None:
        reservation_id = header.reservation_id
        if reservation_id in self._transfers:
            raise InvalidRequestError(f"reservation {reservation_id!r} is already in use")
        transfer = _Transfer(reservation_id)
        self._transfers[reservation_id] = transfer
        transfer.task = asyncio.create_task(self._run(transfer), name=f"kv-in-{reservation_id}")
        transfer.task.add_done_callback(_log_failure)
        await self._taken(transfer, header)

    async def layer(self, reservation_id: str, chunk: LayerChunk) -> None:
        await self._taken(self._open_transfer(reservation_id), chunk)

    async def end(self, reservation_id: str, end: TransferEnd) -> TransferResult:
        transfer = self._open_transfer(reservation_id)
        transfer.queue.put_nowait((end, None))
        return await self._outcome(transfer)

    def abort(self, reservation_id: str) -> None:
        """The sender gave up: ``receive`` fails next time it waits, freeing the reservation.
        Nothing open (never opened, already ended) is fine: the sender may not know."""
        transfer = self._transfers.get(reservation_id)
        if transfer is not None:
            transfer.queue.put_nowait(RequestNotFoundError("the sender aborted the transfer"))

    async def stop(self) -> None:
        """Ends every open transfer (their reservations are freed); after the server stopped."""
        tasks = [t.task for t in self._transfers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -------------------------------------------------------------------------

    def _open_transfer(self, reservation_id: str) -> _Transfer:
        transfer = self._transfers.get(reservation_id)
        if transfer is None:
            raise RequestNotFoundError(f"no transfer open for reservation {reservation_id!r}")
        return transfer

    async def _taken(self, transfer: _Transfer, frame: TransferFrame) -> None:
        """Queues ``frame``; returns once ``receive`` has taken it in, raises if it failed."""
        taken = asyncio.get_running_loop().create_future()
        transfer.queue.put_nowait((frame, taken))
        try:
            await asyncio.wait({taken, transfer.task}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._lost(transfer)
            raise
        if not taken.done():
            taken.cancel()
            await self._outcome(transfer)  # raises the error that ended it
            raise InvalidRequestError("the transfer ended before this frame")

    async def _outcome(self, transfer: _Transfer) -> TransferResult:
        try:
            # Shielded: a handler that gives up must not cancel ``receive`` behind the sender's
            # back; ``_lost`` ends it deliberately instead.
            return await asyncio.shield(transfer.task)
        except asyncio.CancelledError:
            if not transfer.task.cancelled():
                self._lost(transfer)
                raise
            raise RequestNotFoundError("the transfer was stopped") from None

    def _lost(self, transfer: _Transfer) -> None:
        """A message's handler was cancelled: its connection is gone, or the server stops."""
        log.info("KV transfer into %s: sender lost, aborting", transfer.reservation_id)
        transfer.queue.put_nowait(RequestNotFoundError("the sender's connection was lost"))

    async def _run(self, transfer: _Transfer) -> TransferResult:
        frames = self._frames(transfer)
        try:
            return await self._worker.receive(frames)
        finally:
            await frames.aclose()
            if self._transfers.get(transfer.reservation_id) is transfer:
                del self._transfers[transfer.reservation_id]

    async def _frames(self, transfer: _Transfer) -> AsyncIterator[TransferFrame]:
        """The queue as ``receive``'s frames. ``receive`` asks for the next frame only once it
        is done with the last one, which is when that one counts as taken in."""
        while True:
            item = await transfer.queue.get()
            if isinstance(item, BaseException):
                raise item
            frame, taken = item
            yield frame
            if taken is not None and not taken.done():
                taken.set_result(None)


def _log_failure(task: asyncio.Task[TransferResult]) -> None:
    # Retrieved here too: a transfer that fails while no message waits on it (an abort, a
    # lease) has no one else to see its error.
    if not task.cancelled() and task.exception() is not None:
        log.info("KV transfer %s ended: %s", task.get_name(), task.exception())
