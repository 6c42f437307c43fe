"""The donor's data-plane connection to its helper, one per migration.

Opened by the first CopyKV (it names the helper's data plane), closed by Revert, Release or
Abort. It carries the KV copies both ways and the held-token queries; the donor's
``DataStagePort`` shares its client for the step traffic. Every method runs on the agent's event
loop; the engine thread reaches them through the agent's ``_blocking`` during a pause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import torch

from services.common.errors import InvalidRequestError
from services.engine.kv_cache import KVLayout
from services.engine.ports import StageSeq
from services.migration import wire
from services.migration.donor import KVChunk, TokenDelta
from services.migration.records import Peer
from services.rpc import dataplane
from services.rpc.dataplane import DataClient

OnMoved = Callable[[int, Iterable[str]], None]  # bytes, the sequences they belong to
BATCH_BYTES = 4 << 20  # KV per kv_import_batch / kv_tokens message (the data plane's scale)


class HelperLink:
    def __init__(
        self, client: DataClient, migration_id: str, timeout_s: float, on_moved: OnMoved
    ) -> None:
        self.client = client
        self.migration_id = migration_id
        self.timeout_s = timeout_s
        self.on_moved = on_moved

    @classmethod
    async def connect(
        cls, helper: Peer, migration_id: str, timeout_s: float, on_moved: OnMoved
    ) -> HelperLink:
        if not helper.data_address or helper.data_transport not in dataplane.KINDS:
            raise InvalidRequestError("the helper's data_address and data_transport are needed")
        client = await dataplane.connect(helper.data_transport, helper.data_address, timeout_s)
        return cls(client, migration_id, timeout_s, on_moved)

    async def close(self) -> None:
        await self.client.close()

    async def _request(self, header: bytes, payload: Any = b"") -> Any:
        return await self.client.request(header, payload, self.timeout_s)

    async def held(self, request_ids: list[str]) -> dict[str, int]:
        """Tokens of each sequence the helper holds in every hosted layer."""
        if not request_ids:
            return {}
        header, _ = await self._request(wire.encode_held_tokens(self.migration_id, request_ids))
        return wire.decode_held_tokens(header, request_ids)

    async def send(self, chunks: list[KVChunk], report: bool = True) -> int:
        """Every chunk, packed into ``kv_import_batch`` messages of up to ``BATCH_BYTES`` each
        (a one-step delta of many sequences is thousands of small chunks) sent at once (the
        connection multiplexes them); bytes sent. ``report`` False: not passed to
        ``on_moved`` (an attention copy records its bytes and sequences itself)."""
        batches: list[list[KVChunk]] = [[]]
        size = 0
        for chunk in chunks:
            n = chunk[1].numel() * chunk[1].element_size()
            if batches[-1] and size + n > BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(chunk)
            size += n
        messages = [wire.encode_kv_import_batch(self.migration_id, b) for b in batches if b]
        await asyncio.gather(*(self._request(h, p) for h, p in messages))
        num_bytes = sum(data.numel() * data.element_size() for _, data, _ in chunks)
        if report:
            self.on_moved(num_bytes, {c[0] for c in chunks})
        return num_bytes

    async def send_tokens(self, deltas: list[TokenDelta]) -> int:
        """Each delta as one ``kv_tokens`` message, sent at once but in order for a sequence
        cut into several (its next piece leaves once the helper has the one before); bytes
        sent."""
        wave: list[Any] = []
        in_wave: set[str] = set()
        for d in deltas:
            ids = {s.request_id for s in d.spans}
            if ids & in_wave:
                await asyncio.gather(*wave)
                wave, in_wave = [], set()
            header, payload = wire.encode_kv_tokens(
                self.migration_id, d.spans, d.layers, d.fingerprint, d.data
            )
            wave.append(self._request(header, payload))
            in_wave |= ids
        await asyncio.gather(*wave)
        num_bytes = sum(d.num_bytes for d in deltas)
        self.on_moved(num_bytes, {s.request_id for d in deltas for s in d.spans})
        return num_bytes

    async def fetch_tokens(self, groups: list[list[StageSeq]]) -> list[TokenDelta]:
        """Tokens of hosted sequences back, a ``kv_tokens_export`` per group, all at once."""

        async def one(spans: list[StageSeq]) -> TokenDelta:
            header = wire.encode_kv_tokens_export(self.migration_id, spans)
            out_header, payload = await self._request(header)
            layers, fingerprint, data = wire.decode_kv_tokens_reply(
                out_header, memoryview(payload), spans
            )
            return TokenDelta(tuple(spans), layers, fingerprint, data)

        return list(await asyncio.gather(*(one(g) for g in groups)))

    async def fetch_kv(
        self, request_id: str, layer: int, start: int, end: int
    ) -> tuple[torch.Tensor, KVLayout]:
        """One layer of a hosted sequence's KV, the blocks holding tokens ``[start, end)``."""
        header = wire.encode_kv_export(self.migration_id, request_id, layer, start, end)
        out_header, payload = await self._request(header)
        return wire.decode_kv_exported(out_header, memoryview(payload), layer)
