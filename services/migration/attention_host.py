"""The helper's end of an attention migration: holds a donor's blocks and attends over them.

Lifecycle on the helper (one ``HostedBlocks`` per engine, owner = the migration id):

1. the agent's Prepare (helper, attention kind) ``add``s the migration here;
2. the donor's data-plane messages (attention_wire.py) arrive on the event loop; ``handle``
   checks them, then: ``blocks_hold`` reserves blocks of this engine's own pool on its engine
   thread (``engine_call``, between two of its steps: they count against its memory and appear
   in its load report as hosted blocks); ``kv_import`` fills one layer of them;
   ``attention_run`` computes every query's partial ``(O, m, l)`` over its sequence's blocks;
   ``kv_export`` hands one layer back (revert); ``release`` frees sequences. Imports and
   exports run on this host's threads, attention inline on the event loop (one batched kernel
   call, ~0.4 ms for four 1,024-token sequences: the hop to a pool thread and back cost more
   than the arithmetic, measured in docs/migration.md), all under ``HostedBlocks``' lock,
   beside the engine's own steps and never waiting for one;
3. the agent's Release/Abort (or the lease) ``end``s it: every block still held for the donor is
   released; the engine returns them to its pool at its next step (or at once, ``collect``).

A message for a sequence whose blocks are not all here is answered ``failed`` with its id (the
donor's port raises ``PortError``; the donor recomputes it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from services.common.errors import InvalidRequestError, RequestNotFoundError
from services.engine.engine import Engine
from services.engine.hosting import HostedBlocks
from services.engine.ports import PortError
from services.migration import attention_wire, wire
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb

EngineCall = Callable[[Callable[[Engine], Any]], Awaitable[Any]]
# (migration id, message kind, payload bytes in + out, request ids) after each handled message
Observer = Callable[[str, str, int, tuple[str, ...]], None]


class AttentionHost:
    def __init__(
        self, engine_call: EngineCall, observe: Observer | None = None, num_threads: int = 2
    ) -> None:
        self.engine_call = engine_call
        self._observe = observe or (lambda *_: None)
        # migration id -> the engine's HostedBlocks, and request id -> blocks held for it
        self._owners: dict[str, tuple[HostedBlocks, dict[str, int]]] = {}
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="attention-host")

    def serves(self, migration_id: str) -> bool:
        return migration_id in self._owners

    def add(self, migration_id: str, blocks: HostedBlocks) -> None:
        self._owners[migration_id] = (blocks, {})

    def num_blocks(self, migration_id: str) -> int:
        """Blocks held for the migration's sequences now (released ones no longer count)."""
        entry = self._owners.get(migration_id)
        return 0 if entry is None else sum(entry[1].values())

    async def end(self, migration_id: str) -> None:
        """Release everything held for the migration, then return it to the pool."""
        entry = self._owners.pop(migration_id, None)
        if entry is None:
            return
        blocks, request_ids = entry
        blocks.release(migration_id, list(request_ids))
        await self.engine_call(lambda e: e.migration.hosted_blocks.collect())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def handle(self, msg: pb.MigrationDataRequest, payload: memoryview) -> tuple[bytes, Any]:
        mid, kind = msg.migration_id, msg.WhichOneof("kind")
        entry = self._owners.get(mid)
        if entry is None:
            raise RequestNotFoundError(f"no blocks held here for migration {mid!r}")
        out_header, out_payload, ids = await self._dispatch(mid, entry, msg, kind, payload)
        size = memoryview(payload).nbytes + memoryview(out_payload).nbytes
        self._observe(mid, kind, size, ids)
        return out_header, out_payload

    async def _dispatch(
        self,
        mid: str,
        entry: tuple[HostedBlocks, dict[str, int]],
        msg: pb.MigrationDataRequest,
        kind: str,
        payload: memoryview,
    ) -> tuple[bytes, Any, tuple[str, ...]]:
        blocks, held = entry
        if kind == "attention_run":
            queries = attention_wire.decode_attention_run(msg.attention_run, payload)
            ids = tuple(q.request_id for q in queries)
            try:
                parts = blocks.attend(mid, msg.attention_run.layer, queries)  # inline: above
            except PortError as e:
                return wire.encode_failed(e.request_ids, e.reason), b"", ids
            return *attention_wire.encode_attention_result(parts), ids
        if kind == "blocks_hold":
            m = msg.blocks_hold
            hashes = [bytes(h) for h in m.block_hashes]
            await self.engine_call(
                lambda e: e.migration.hosted_blocks.hold(mid, m.request_id, hashes)
            )
            held[m.request_id] = len(hashes)
            return wire.response(ok=True), b"", (m.request_id,)
        if kind == "kv_import":
            m = msg.kv_import
            data, layout = wire.kv_from(m.layout, m.layer, payload)
            await self._run(blocks.import_kv, mid, m.request_id, data, layout)
            return wire.response(ok=True), b"", (m.request_id,)
        if kind == "kv_import_batch":
            items = wire.decode_kv_import_batch(msg.kv_import_batch, payload)
            ids = await self._run(wire.import_each, items, partial(blocks.import_kv, mid))
            return wire.response(ok=True), b"", ids
        if kind == "kv_export":
            m = msg.kv_export
            data, layout = await self._run(blocks.export_kv, mid, m.request_id, m.layer)
            return *wire.encode_kv_exported(data, layout), (m.request_id,)
        if kind == "release":
            ids = tuple(msg.release.request_ids)
            blocks.release(mid, ids)
            for rid in ids:
                held.pop(rid, None)
            return wire.response(ok=True), b"", ids
        raise InvalidRequestError(f"migration {mid} is an attention migration: no {kind} here")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
