"""The helper's end of the migration data plane: serves the layers it hosts for donors.

Lifecycle of a hosted range on the helper:

1. the agent's Prepare makes the engine host layers ``[k, L)`` (``engine.migration.host_layers``,
   on the engine thread) and ``add``s the ``HostedLayers`` here under the migration id;
2. the donor's messages (services/migration/wire.py) arrive on the data-plane server's event
   loop; ``handle`` decodes and checks them, then runs the work on a thread of this host
   (``HostedLayers`` has its own lock and never waits for the engine's step):
   ``kv_tokens`` (copy and deltas; ``kv_import`` and ``kv_import_batch`` too), ``stage_run``
   (every step of the donor once switched), ``kv_tokens_export`` and ``kv_export`` (revert),
   ``held_tokens``, ``release``, and ``weights_import`` for a range whose weights the helper
   lacked (the ``WeightsReceiver`` given to ``add``, weights.py);
3. the agent's Release/Abort ``remove``s it before the engine drops the range.

A message for a migration not hosted here is ``RequestNotFoundError`` (NOT_FOUND to the donor);
a stage the helper cannot serve for some sequences is answered ``failed`` with their ids, which
the donor's port raises as ``PortError`` (the engine's "a failed step never happened" rule).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from services.common.errors import InvalidRequestError, RequestNotFoundError
from services.engine.hosting import HostedLayers
from services.engine.ports import PortError
from services.migration import wire
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb

if TYPE_CHECKING:
    from services.migration.weights import WeightsReceiver

# (migration id, message kind, payload bytes in + out, request ids) after each handled message
Observer = Callable[[str, str, int, tuple[str, ...]], None]


class MigrationHost:
    def __init__(self, observe: Observer | None = None, num_threads: int = 2) -> None:
        self._hosted: dict[str, HostedLayers] = {}
        self._receivers: dict[str, WeightsReceiver] = {}  # weights a hosted range awaits
        self._observe = observe or (lambda *_: None)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="migration-host")
        self.attention: Any = None  # attention_host.AttentionHost: attention migrations' messages

    def add(
        self, migration_id: str, hosted: HostedLayers, receiver: WeightsReceiver | None = None
    ) -> None:
        self._hosted[migration_id] = hosted
        if receiver is not None:
            self._receivers[migration_id] = receiver

    def remove(self, migration_id: str) -> None:
        self._hosted.pop(migration_id, None)
        self._receivers.pop(migration_id, None)

    def hosted(self, migration_id: str) -> HostedLayers:
        hosted = self._hosted.get(migration_id)
        if hosted is None:
            raise RequestNotFoundError(f"no layers hosted here for migration {migration_id!r}")
        return hosted

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def handle(self, header: bytes, payload: memoryview) -> tuple[bytes, Any]:
        """The data-plane handler (``services.rpc.dataplane.serve(kind, host.handle)``)."""
        msg = wire.parse_request(header)
        if self.attention is not None and self.attention.serves(msg.migration_id):
            return await self.attention.handle(msg, payload)
        hosted = self.hosted(msg.migration_id)
        kind = msg.WhichOneof("kind")
        out_header, out_payload, ids = await self._dispatch(hosted, msg, kind, payload)
        size = memoryview(payload).nbytes + memoryview(out_payload).nbytes
        if kind == "kv_export" and msg.kv_export.handoff:
            kind = "kv_handoff"  # a read while the donor steps through us: not a revert
        self._observe(msg.migration_id, kind, size, ids)
        return out_header, out_payload

    async def _dispatch(
        self, hosted: HostedLayers, msg: pb.MigrationDataRequest, kind: str, payload: memoryview
    ) -> tuple[bytes, Any, tuple[str, ...]]:
        if kind == "stage_run":
            work = wire.decode_stage_run(msg.stage_run, payload)
            try:
                hidden = await self._run(hosted.run, work)
            except PortError as e:
                return wire.encode_failed(e.request_ids, e.reason), b"", work.request_ids
            return *wire.encode_stage_result(hidden), work.request_ids
        if kind == "kv_import":
            m = msg.kv_import
            data, layout = wire.kv_from(m.layout, m.layer, payload)
            await self._run(hosted.import_kv, m.request_id, data, layout)
            return wire.response(ok=True), b"", (m.request_id,)
        if kind == "kv_import_batch":
            items = wire.decode_kv_import_batch(msg.kv_import_batch, payload)
            ids = await self._run(wire.import_each, items, hosted.import_kv)
            return wire.response(ok=True), b"", ids
        if kind == "kv_tokens":
            spans, layers, fingerprint, data = wire.decode_kv_tokens(msg.kv_tokens, payload)
            if fingerprint != hosted.fingerprint:
                raise InvalidRequestError("KV was computed by a different model or dtype")
            if layers != hosted.layers:
                raise InvalidRequestError(f"KV of layers {layers}, {hosted.layers} hosted")
            await self._run(hosted.import_tokens, spans, data)
            return wire.response(ok=True), b"", tuple(s.request_id for s in spans)
        if kind == "kv_tokens_export":
            spans = wire.decode_kv_tokens_export(msg.kv_tokens_export)
            data = await self._run(hosted.export_tokens, spans)
            reply = wire.encode_kv_tokens_reply(spans, hosted.layers, hosted.fingerprint, data)
            return *reply, tuple(s.request_id for s in spans)
        if kind == "kv_export":
            m = msg.kv_export
            data, layout = await self._run(
                hosted.export_kv, m.request_id, m.layer, m.start_token, m.end_token
            )
            return *wire.encode_kv_exported(data, layout), (m.request_id,)
        if kind == "weights_import":
            receiver = self._receivers.get(msg.migration_id)
            if receiver is None:
                raise InvalidRequestError(f"no weights are awaited for {msg.migration_id!r}")
            await self._run(receiver.receive, msg.weights_import, payload)
            return wire.response(ok=True), b"", ()
        if kind == "held_tokens":
            ids = tuple(msg.held_tokens.request_ids)
            held = [hosted.num_tokens(r) for r in ids]
            return wire.response(held_tokens=pb.HeldTokens(num_tokens=held)), b"", ids
        ids = tuple(msg.release.request_ids)
        await self._run(hosted.release, ids)
        return wire.response(ok=True), b"", ids

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
