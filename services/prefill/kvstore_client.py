"""The prefill worker's side of the global KV cache store (kvstore.proto has the lifecycle).

Who calls what, and when (all on the prefill worker's event loop):

1. ``lookup(hashes, first_block)`` before a request is added to the engine: the longest run
   of the prompt's full blocks from ``first_block`` on (the blocks before it are the worker's
   own) cached on live nodes, pinned there (``Pin`` per node); the usable prefix ends at the
   first block a node could not pin (evicted since Redis said otherwise). It also says how much
   of the prompt was asked for before: the reused blocks, which ``write_back`` writes;
2. ``read_layer(prefix, layer, positions)`` per layer while the suffix computes: layer ``layer``
   of the pinned blocks at ``positions``, as one tensor shaped like ``Engine.export_kv``'s
   output (``[2, n, block_size, kv_heads, head_dim]``);
3. ``release(prefix)`` once every layer arrived or the fetch failed: unpins (best effort; pins
   expire anyway);
4. ``write_back(hashes, layers)`` after the first token went out: the prompt's new full blocks,
   placed by hash over the live nodes, written two-phase (Reserve → data-plane writes → Commit).

Every call is bounded by ``timeout_s``; any failure raises ``StoreError`` and the caller
recomputes — the store can make a request faster, never wrong or stuck. Lookups go to one
node (any node answers them, from Redis): the first of the addresses the client was given,
until one fails unreachable or past its deadline, and then the next of those and of the live
nodes the lookups have named (with one address, a frozen or stopped node failed every lookup
while the other nodes served: probe, session 43).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

from services.common import kv_wire
from services.common.config import RpcConfig
from services.common.errors import InvalidRequestError
from services.common.hashing import BlockHash, place
from services.rpc import aio_calls, dataplane
from services.rpc.channels import open_channel
from services.rpc.convert import DATA_TRANSPORT_FROM_PROTO
from services.rpc.gen.banaserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.rpc.tracing import DISABLED, Tracing

log = logging.getLogger(__name__)

# A lookup failing so: the node is gone, stopping or frozen; another answers the same.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# With tracing: the trace context of the request that last looked each block up, for this
# many blocks at most (``KVStoreClient._traced``).
MAX_TRACED_BLOCKS = 1 << 14


class StoreError(Exception):
    """The store could not help with this request; recompute."""


@dataclass(frozen=True)
class Node:
    node_id: str
    grpc_address: str
    data_address: str
    transport: str


@dataclass(frozen=True)
class PinnedRun:
    """Blocks ``start .. start + len(hashes)`` of the prefix, pinned on one node."""

    node: Node
    pin_id: int
    start: int
    num_blocks: int


@dataclass(frozen=True)
class CachedPrefix:
    """Blocks ``first_block .. num_blocks`` of a prompt, pinned in the store; the blocks before
    ``first_block`` were in the worker's own prefix cache at the lookup (not asked for)."""

    num_blocks: int  # usable: every block before it is the worker's own or pinned on some node
    runs: tuple[PinnedRun, ...]  # ``start``: a block index of the whole prompt
    layer_bytes: int
    first_block: int = 0
    # The lookup's trace context (tracing on): the unpin is a span of the same request even
    # when it runs from a task of no request (a fetch the engine thread started).
    trace_context: otel_context.Context | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class StoreLookup:
    """``KVStoreClient.lookup``'s answer."""

    prefix: CachedPrefix | None  # None: nothing cached past ``first_block``
    # Blocks from the first held or asked for before (the ``first_block`` before the ones
    # asked about count, the caller's own): the reused ones, worth writing back.
    num_seen: int


# ``encode(groups)``: each group's blocks as one kvstore write payload, or None if they are gone.
Encode = Callable[[list[list[int]]], Awaitable[list[np.ndarray] | None]]


@dataclass
class _Reserved:
    """One node's reservation of a write-back: ``todo`` indexes the blocks it lacks."""

    node: Node
    reservation_id: int
    num_layers: int
    todo: list[int]
    payload: np.ndarray | None = None  # ``encode``'s for ``todo`` (none when it is empty)
    committed: bool = False


@contextlib.contextmanager
def _attached(context: otel_context.Context | None) -> Iterator[None]:
    """``context`` current inside (None: the current one, untouched)."""
    if context is None:
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def _raise_first(results: Sequence[object]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


class KVStoreClient:
    def __init__(
        self,
        address: str | Sequence[str],
        rpc: RpcConfig | None = None,
        timeout_s: float = 2.0,
        tracing: Tracing = DISABLED,
    ) -> None:
        """``address``: kvstore nodes' gRPC addresses (a list, or one string, commas between).
        ``tracing``: the worker's, so each store call is a span of the request it serves: the
        lookup and pins run in its Prefill call, with that span current; an unpin and a
        write-back run later, from tasks of no request (or of another: the write-back queue's
        task is started by the first request that queues one), so they run under the trace
        context of the request that looked their blocks up (``_traced``)."""
        seeds = address.split(",") if isinstance(address, str) else list(address)
        self._seeds = [a for a in seeds if a]
        if not self._seeds:
            raise ValueError("a KVStoreClient needs a kvstore node's address")
        self._address = self._seeds[0]  # where lookups go now
        self._rpc = rpc or RpcConfig()
        self._timeout_s = timeout_s
        self._tracing = tracing
        self._traced: OrderedDict[BlockHash, SpanContext] = OrderedDict()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._data: dict[str, dataplane.DataClient] = {}
        self._nodes: list[Node] = []
        # A node's data plane broke (it restarted, likely on a new port): learn the nodes anew
        # before the next write-back instead of writing to the old address for ever.
        self._nodes_stale = False

    def _stub(self, address: str) -> kvstore_pb2_grpc.KVStoreServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self._rpc, self._tracing)
        return kvstore_pb2_grpc.KVStoreServiceStub(channel)

    async def _data_client(self, node: Node) -> dataplane.DataClient:
        client = self._data.get(node.data_address)
        if client is None:
            try:
                client = await dataplane.connect(node.transport, node.data_address, self._timeout_s)
            except dataplane.DataPlaneError as exc:
                self._nodes_stale = True
                raise StoreError(f"connect to {node.node_id} failed: {exc}") from None
            self._data[node.data_address] = client
        return client

    async def _data_failed(
        self, node: Node, exc: dataplane.DataPlaneError, what: str
    ) -> StoreError:
        """A data-plane call to ``node`` failed. A connection that broke (UNAVAILABLE) or hangs
        (TIMEOUT) never recovers: the client is dropped, so the next call connects afresh, and
        the node list is refreshed before the next write-back. A REMOTE error (the node answered)
        keeps both."""
        if exc.kind is not dataplane.ErrorKind.REMOTE:
            self._nodes_stale = True
            client = self._data.pop(node.data_address, None)
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        return StoreError(f"{what} {node.node_id} failed: {exc}")

    async def close(self) -> None:
        for client in self._data.values():
            with contextlib.suppress(Exception):
                await client.close()
        for channel in self._channels.values():
            await channel.close()
        self._data.clear()
        self._channels.clear()

    # -- reads -----------------------------------------------------------------------------

    async def lookup(self, hashes: Sequence[BlockHash], first_block: int = 0) -> StoreLookup:
        """The usable cached run of ``hashes[first_block:]``, pinned (None when nothing is
        cached), and how many of ``hashes`` were held or asked for before (this call marks
        them asked for). Hashes chain (each names its whole prefix), so asking from
        ``first_block`` finds exactly the blocks a lookup of all of them would find past it."""
        if not 0 <= first_block < len(hashes):
            raise ValueError(f"first_block {first_block} outside 0..{len(hashes) - 1}")
        hashes = hashes[first_block:]
        self._remember_trace(hashes)
        try:
            reply = await aio_calls.unary(
                self._stub(self._address).Lookup(
                    kvstore_pb2.LookupRequest(block_hashes=list(hashes)), timeout=self._timeout_s
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                self._next_lookup_node()
            raise StoreError(f"lookup failed: {exc.code().name}: {exc.details()}") from None
        self._nodes = [_node(n) for n in reply.nodes]
        num_seen = first_block + min(reply.num_seen, len(hashes))
        if not reply.node_ids:
            return StoreLookup(None, num_seen)
        return StoreLookup(await self._pin(hashes, list(reply.node_ids), first_block), num_seen)

    def _next_lookup_node(self) -> None:
        """The node lookups went to did not answer: the next of the given addresses and the
        live nodes the last lookup named, in turn (one whose restart moved it drops out of
        the named ones at the next lookup that answers)."""
        candidates = list(dict.fromkeys([*self._seeds, *(n.grpc_address for n in self._nodes)]))
        if len(candidates) < 2:
            return
        failed = self._address
        at = candidates.index(failed) if failed in candidates else -1
        self._address = candidates[(at + 1) % len(candidates)]
        log.info("kvstore lookups at %s failed: the next go to %s", failed, self._address)

    async def _pin(
        self, hashes: Sequence[BlockHash], owners: list[str], first_block: int
    ) -> CachedPrefix | None:
        by_id = {n.node_id: n for n in self._nodes}
        runs: list[PinnedRun] = []
        layer_bytes = 0
        start = 0
        while start < len(owners):
            end = start
            while end < len(owners) and owners[end] == owners[start]:
                end += 1
            node = by_id.get(owners[start])
            if node is None:
                break
            reply = await self._call(
                node, "Pin", kvstore_pb2.PinRequest(block_hashes=hashes[start:end])
            )
            if reply.num_pinned:
                runs.append(PinnedRun(node, reply.pin_id, first_block + start, reply.num_pinned))
                layer_bytes = reply.layer_bytes
            elif reply.pin_id:
                await self._unpin(node, reply.pin_id)
            if reply.num_pinned < end - start:
                start += reply.num_pinned
                break
            start = end
        if not runs:
            return None
        context = otel_context.get_current() if self._tracing.enabled else None
        return CachedPrefix(first_block + start, tuple(runs), layer_bytes, first_block, context)

    async def read_layer(
        self, prefix: CachedPrefix, layer: int, positions: Sequence[int], like: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``layer`` of the prefix blocks at ``positions`` (block indices of the prompt,
        at or past ``prefix.first_block``) shaped and typed like ``like`` (one block of one
        layer: ``[2, block_size, kv_heads, head_dim]``). A position before ``first_block`` (the
        worker's own cache dropped that block since the lookup) is not in the store's pins:
        ``StoreError``, and the caller recomputes."""
        wanted = [p - prefix.first_block for p in positions]
        if wanted and (min(wanted) < 0 or max(wanted) >= prefix.num_blocks - prefix.first_block):
            raise StoreError(
                f"blocks {list(positions)} are not all in the pinned range "
                f"[{prefix.first_block}, {prefix.num_blocks})"
            )
        reads = [self._read_run(run, layer) for run in prefix.runs]
        payloads = await asyncio.gather(*reads)
        dtype, block_shape = kv_wire.DTYPE_NAMES[like.dtype], tuple(like.shape[1:])
        runs = [
            _decode_run(run, payload, dtype, block_shape)
            for run, payload in zip(prefix.runs, payloads, strict=True)
        ]
        # Views of the payloads: the engine's write is then the only copy (the usual case:
        # every pinned block is wanted, from one node).
        blocks = runs[0] if len(runs) == 1 else torch.cat(runs, dim=1)
        if wanted != list(range(blocks.shape[1])):
            blocks = blocks[:, wanted]
        return blocks

    async def _read_run(self, run: PinnedRun, layer: int) -> bytearray | memoryview:
        read = kvstore_pb2.KVDataRead(pin_id=run.pin_id, layer=layer, num_blocks=run.num_blocks)
        header = kvstore_pb2.KVDataRequest(read=read).SerializeToString()
        client = await self._data_client(run.node)
        try:
            _, payload = await client.request(header, b"", self._timeout_s)
        except dataplane.DataPlaneError as exc:
            raise await self._data_failed(run.node, exc, "read from") from None
        return payload

    async def release(self, prefix: CachedPrefix) -> None:
        with _attached(prefix.trace_context):
            for run in prefix.runs:
                await self._unpin(run.node, run.pin_id)

    async def _unpin(self, node: Node, pin_id: int) -> None:
        with contextlib.suppress(StoreError):
            await self._call(node, "Unpin", kvstore_pb2.UnpinRequest(pin_id=pin_id))

    # -- writes ----------------------------------------------------------------------------

    async def write_back(self, hashes: Sequence[BlockHash], layers: Sequence[torch.Tensor]) -> int:
        """Stores blocks ``hashes`` whose KV is ``layers[l][:, i]`` (``[2, n, bs, h, d]`` per
        layer); returns how many blocks this writer stored (others were there or in flight)."""
        if not hashes:
            return 0
        block = layers[0][:, 0]
        layer_bytes = kv_wire.block_nbytes(kv_wire.DTYPE_NAMES[block.dtype], block.shape[1:])

        async def encode(groups: list[list[int]]) -> list[np.ndarray]:
            return [kv_wire.encode_layers(layers, group) for group in groups]

        return await self.write_blocks(hashes, len(layers), layer_bytes, encode)

    async def write_blocks(
        self, hashes: Sequence[BlockHash], num_layers: int, layer_bytes: int, encode: Encode
    ) -> int:
        """Stores blocks ``hashes``, placed by hash over the live nodes, two-phase: every node
        reserves the blocks it lacks, then ``encode(groups)`` gives each node's payload (the
        blocks at those indices of ``hashes``, kv_wire's layout; None: they are gone, nothing
        is written), then the writes and commits. Returns how many blocks this writer stored
        (others were there or in flight). Any failure aborts what was reserved. With tracing,
        the calls are spans of the request that last looked these blocks up (``__init__``)."""
        if not hashes:
            return 0
        with _attached(self._lookup_trace(hashes)):
            return await self._write_blocks(hashes, num_layers, layer_bytes, encode)

    async def _write_blocks(
        self, hashes: Sequence[BlockHash], num_layers: int, layer_bytes: int, encode: Encode
    ) -> int:
        if self._nodes_stale or not self._nodes:
            await self._refresh_nodes()
        if not self._nodes:
            return 0
        node_ids = [n.node_id for n in self._nodes]
        by_id = {n.node_id: n for n in self._nodes}
        groups: dict[str, list[int]] = {}
        for i, block_hash in enumerate(hashes):
            groups.setdefault(place(block_hash, node_ids), []).append(i)
        reserved = await asyncio.gather(
            *(self._reserve(by_id[nid], hashes, idx, num_layers, layer_bytes)
              for nid, idx in groups.items()),
            return_exceptions=True,
        )  # fmt: skip
        writes = [r for r in reserved if isinstance(r, _Reserved)]
        try:
            _raise_first(reserved)
            todo = [w for w in writes if w.todo]
            payloads = await encode([w.todo for w in todo]) if todo else []
            if payloads is None:  # the blocks are gone: store nothing
                await asyncio.gather(*(self._abort(w) for w in writes))
                return 0
            for w, payload in zip(todo, payloads, strict=True):
                w.payload = payload
            done = await asyncio.gather(
                *(self._write_node(w, hashes) for w in writes), return_exceptions=True
            )
            _raise_first(done)
        except BaseException:
            await asyncio.gather(*(self._abort(w) for w in writes if not w.committed))
            raise
        return sum(len(w.todo) for w in writes)

    # -- tracing ---------------------------------------------------------------------------

    def _remember_trace(self, hashes: Sequence[BlockHash]) -> None:
        """With tracing, in a traced request: its trace context, for the blocks it looks up."""
        if not self._tracing.enabled:  # every lookup passes here: nothing to do when off
            return
        span = trace.get_current_span().get_span_context()
        if not span.is_valid:
            return
        for block_hash in hashes:
            self._traced[block_hash] = span
            self._traced.move_to_end(block_hash)
        while len(self._traced) > MAX_TRACED_BLOCKS:
            self._traced.popitem(last=False)

    def _lookup_trace(self, hashes: Sequence[BlockHash]) -> otel_context.Context | None:
        """The trace context a write-back of ``hashes`` runs under: that of the request that
        last looked one of them up; none known, no trace's (never that of whatever request
        started the task it runs on). None: tracing is off."""
        if not self._tracing.enabled:
            return None
        found = (self._traced.get(h) for h in hashes)
        span = next((c for c in found if c is not None), None)
        if span is None:
            return otel_context.Context()
        return trace.set_span_in_context(NonRecordingSpan(span), otel_context.Context())

    async def _refresh_nodes(self) -> None:
        """The live nodes, from a ``Lookup`` of nothing (a worker that only hits its own prefix
        cache looks nothing up otherwise)."""
        try:
            reply = await aio_calls.unary(
                self._stub(self._address).Lookup(
                    kvstore_pb2.LookupRequest(), timeout=self._timeout_s
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                self._next_lookup_node()
            raise StoreError(f"lookup failed: {exc.code().name}: {exc.details()}") from None
        self._nodes = [_node(n) for n in reply.nodes]
        self._nodes_stale = False

    async def _reserve(
        self,
        node: Node,
        hashes: Sequence[BlockHash],
        indices: list[int],
        num_layers: int,
        layer_bytes: int,
    ) -> _Reserved:
        request = kvstore_pb2.ReserveRequest(
            block_hashes=[hashes[i] for i in indices],
            num_layers=num_layers,
            layer_bytes=layer_bytes,
        )
        reply = await self._call(node, "Reserve", request)
        return _Reserved(
            node, reply.reservation_id, num_layers, [indices[j] for j in reply.to_write]
        )

    async def _abort(self, reserved: _Reserved) -> None:
        with contextlib.suppress(StoreError):
            request = kvstore_pb2.KVStoreServiceAbortRequest(reservation_id=reserved.reservation_id)
            await self._call(reserved.node, "Abort", request)

    async def _write_node(self, reserved: _Reserved, hashes: Sequence[BlockHash]) -> None:
        """Every layer of the reserved blocks in one message (kvstore.proto ``KVDataWrite``),
        then the commit (of nothing, when the node had them all)."""
        node, payload = reserved.node, reserved.payload
        if payload is not None:
            client = await self._data_client(node)
            write = kvstore_pb2.KVDataWrite(
                reservation_id=reserved.reservation_id,
                layer=0,
                block_hashes=[hashes[i] for i in reserved.todo],
                num_layers=reserved.num_layers,
            )
            header = kvstore_pb2.KVDataRequest(write=write).SerializeToString()
            try:
                await client.request(header, payload, self._timeout_s)
            except dataplane.DataPlaneError as exc:
                raise await self._data_failed(node, exc, "write to") from None
        request = kvstore_pb2.CommitRequest(reservation_id=reserved.reservation_id)
        await self._call(node, "Commit", request)
        reserved.committed = True

    async def _call(self, node: Node, method: str, message):
        try:
            stub = self._stub(node.grpc_address)
            return await aio_calls.unary(getattr(stub, method)(message, timeout=self._timeout_s))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._nodes_stale = True
            raise StoreError(
                f"{method} on {node.node_id} failed: {exc.code().name}: {exc.details()}"
            ) from None


def _decode_run(
    run: PinnedRun, payload: bytearray | memoryview, dtype: str, block_shape: tuple[int, ...]
) -> torch.Tensor:
    try:
        return kv_wire.decode(payload, dtype, block_shape, run.num_blocks)
    except InvalidRequestError as exc:
        raise StoreError(f"read from {run.node.node_id}: {exc}") from None


def _node(msg: kvstore_pb2.KVStoreNode) -> Node:
    return Node(
        msg.node_id,
        msg.grpc_address,
        msg.data_address,
        DATA_TRANSPORT_FROM_PROTO.get(msg.data_transport, "grpc"),
    )
