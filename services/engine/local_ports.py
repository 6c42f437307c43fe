"""In-process ports: the reference implementations of ``StagePort`` and ``AttentionPort``.

They call a second engine's hosting API directly (``HostedLayers``, ``HostedBlocks``), so two
engines in one process can run the migration invariant without any wire. A data-plane port must
behave exactly like these.

``LocalStagePort`` runs the work on a thread of its own, so a step's other micro-batch computes
while it runs (the overlap two micro-batches exist for); ``threaded=False`` runs it inside
``submit``. Its ``import_kv`` / ``export_kv`` answer inside the call, so a ``release`` that
follows them always comes after. ``LocalAttentionPort`` answers inside ``submit``: the owner's local part comes right
after, and a thread hand-off costs more than the overlap wins at these sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from services.common.kv_layout import KVLayout
from services.engine.attention import PartialAttention
from services.engine.hosting import HostedBlocks, HostedLayers
from services.engine.ports import AttentionPort, AttentionQuery, StagePort, StageWork
from services.engine.ports import settled as _now


class LocalStagePort(StagePort):
    def __init__(self, hosted: HostedLayers, threaded: bool = True) -> None:
        self.hosted = hosted
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stage-port") if threaded else None

    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        if self._pool is None:
            return _now(lambda: self.hosted.run(work))
        return self._pool.submit(self.hosted.run, work)

    def import_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> Future[None]:
        return _now(lambda: self.hosted.import_kv(request_id, data, layout))

    def export_kv(
        self, request_id: str, layer: int, start_token: int, end_token: int
    ) -> Future[tuple[torch.Tensor, KVLayout]]:
        return _now(lambda: self.hosted.export_kv(request_id, layer, start_token, end_token))

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
