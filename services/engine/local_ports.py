"""In-process ports: the reference implementations of ``StagePort`` and ``AttentionPort``.

They call a second engine's hosting API directly (``HostedLayers``, ``HostedBlocks``), so two
engines in one process can run the migration invariant without any wire. A data-plane port must
behave exactly like these.

``LocalStagePort`` runs the work on a thread of its own, so a step's other micro-batch computes
while it runs (the overlap two micro-batches exist for); ``threaded=False`` runs it inside
``submit``. ``LocalAttentionPort`` answers inside ``submit``: the owner's local part comes right
after, and a thread hand-off costs more than the overlap wins at these sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from services.engine.attention import PartialAttention
from services.engine.hosting import HostedBlocks, HostedLayers
from services.engine.ports import AttentionPort, AttentionQuery, StagePort, StageWork

T = TypeVar("T")


def _now(fn: Callable[[], T]) -> Future[T]:
    """A future already settled with ``fn()``'s result or exception."""
    future: Future[T] = Future()
    try:
        future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - the future carries it to the caller
        future.set_exception(e)
    return future


class LocalStagePort(StagePort):
    def __init__(self, hosted: HostedLayers, threaded: bool = True) -> None:
        self.hosted = hosted
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stage-port") if threaded else None

    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        if self._pool is None:
            return _now(lambda: self.hosted.run(work))
        return self._pool.submit(self.hosted.run, work)

    def release(self, request_ids: Sequence[str]) -> None:
        self.hosted.release(request_ids)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class LocalAttentionPort(AttentionPort):
    def __init__(self, blocks: HostedBlocks, owner: str) -> None:
        self.blocks = blocks
        self.owner = owner

    def submit(
        self, layer: int, queries: Sequence[AttentionQuery]
    ) -> Future[list[PartialAttention]]:
        return _now(lambda: self.blocks.attend(self.owner, layer, queries))

    def release(self, request_ids: Sequence[str]) -> None:
        self.blocks.release(self.owner, request_ids)

    def close(self) -> None:
        pass
