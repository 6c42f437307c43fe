"""The kvstore's load test: its KVStoreService and data plane, driven as prefill workers do.

Setup:
1. ``Lookup`` on the target node (any node answers) names the live nodes, each with its gRPC
   address and its data plane's address and transport, as ``services/prefill/kvstore_client.py``
   learns them; a channel and a data-plane client are opened per node;
2. ``--num-prefixes`` prefixes of ``--num-blocks`` blocks are stored (the write path below),
   each block ``--num-layers`` layers of ``--layer-bytes``, named by chained hashes
   (``services.common.hashing``) of seeded tokens under a fingerprint made of the run's nonce
   (fresh every run unless ``--nonce`` repeats one). Sizes the data plane cannot carry in one
   message (1 GiB) or this process cannot hold are refused before anything connects.

Then every iteration is one ``--op``:
- ``lookup``: ``Lookup`` of one stored prefix, which must hit every block;
- ``read``, iteration ``fetch`` (the prefill's prefix fetch): ``Lookup`` → ``Pin`` on each node
  holding a run of the prefix → every layer of each run read over the data plane (``DataRead``,
  one message per run and layer, runs in parallel, layers in turn) → ``Unpin``;
- ``write``, iteration ``store`` (the prefill's write-back): a new prefix placed by hash over
  the live nodes (``place``) → ``Reserve`` → one data-plane write of every layer
  (``DataWrite``) → ``Commit`` per node (``Abort`` if a step fails). Each write adds blocks: a
  long write run fills the pool, which then evicts least-recently-used blocks, the stored
  prefixes included;
- ``mixed``: ``write`` with probability ``--write-fraction``, else ``read``.
A read that finds fewer blocks than stored (evicted meanwhile) fails as ``MISS``.
After each run, every node's ``Stats`` is the leak check: no pin and no reservation left open.

With ``--tls-dir`` the load test is a prefill worker (the ``prefill`` certificate on every
call, the data-plane secret on its data planes), but ``Stats`` is an observer's, not a
worker's (``RULES``): the leak check reads it with the ``client`` certificate
(``credentials.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
from dataclasses import dataclass, field

import grpc
import numpy as np

from bench.loadtest.credentials import NONE, Credentials
from bench.loadtest.driver import Recorder, ScenarioError, new_nonce
from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.common.hashing import HASH_SIZE, BlockHash, block_hashes, place
from services.kvstore.pool import MAX_NUM_LAYERS
from services.rpc import dataplane
from services.rpc.channels import open_channel
from services.rpc.convert import DATA_TRANSPORT_FROM_PROTO
from services.rpc.dataplane.base import MAX_HEADER_BYTES
from services.rpc.dataplane.tcp import DEFAULT_MAX_PAYLOAD_BYTES
from services.rpc.gen.banaserve.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.rpc.security import Role, secure_data_planes

OPS = ("lookup", "read", "write", "mixed")
# The iteration's name in the report, apart from the RPC names (Lookup, DataRead, ...).
ITERATION_NAMES = {"lookup": "lookup", "read": "fetch", "write": "store", "mixed": "mixed"}
_READ_RPCS = ("Lookup", "Pin", "DataRead", "Unpin")
_WRITE_RPCS = ("Reserve", "DataWrite", "Commit")
RPC_NAMES = {"lookup": ("Lookup",), "read": _READ_RPCS, "write": _WRITE_RPCS,
             "mixed": (*_READ_RPCS, *_WRITE_RPCS)}  # fmt: skip
TOKENS_PER_BLOCK = 16
CONNECT_TIMEOUT_S = 10.0
# One prefix's every layer goes in one data-plane write: at most what one message may carry
# (the TCP plane's frame limit, 1 GiB), and its header (every block hash) within the header
# limit. The payload is also held in this process's memory, once.
MAX_PREFIX_BYTES = DEFAULT_MAX_PAYLOAD_BYTES


@dataclass(frozen=True)
class KVStoreLoad:
    op: str = "read"
    num_prefixes: int = 8
    num_blocks: int = 4
    num_layers: int = 4
    layer_bytes: int = 64 << 10
    write_fraction: float = 0.2
    rpc_timeout_s: float = 10.0
    seed: int = 0
    nonce: str = field(default_factory=new_nonce)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        for name in ("num_prefixes", "num_blocks", "num_layers", "layer_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.write_fraction <= 1.0:
            raise ConfigError(f"write fraction must be in [0, 1], got {self.write_fraction}")
        self._check_sizes()

    @property
    def prefix_bytes(self) -> int:
        return self.num_blocks * self.num_layers * self.layer_bytes

    def _check_sizes(self) -> None:
        if self.num_layers > MAX_NUM_LAYERS:
            raise ConfigError(f"--num-layers {self.num_layers}: a kvstore block has at most "
                              f"{MAX_NUM_LAYERS}")  # fmt: skip
        # A write's header lists every block hash (HASH_SIZE bytes and 2 of framing each).
        if self.num_blocks * (HASH_SIZE + 2) + 64 > MAX_HEADER_BYTES:
            limit = (MAX_HEADER_BYTES - 64) // (HASH_SIZE + 2)
            raise ConfigError(f"--num-blocks {self.num_blocks}: one data-plane write names at "
                              f"most {limit} blocks")  # fmt: skip
        if self.prefix_bytes > MAX_PREFIX_BYTES:
            raise ConfigError(
                f"a prefix of {self.num_blocks} blocks x {self.num_layers} layers x "
                f"{self.layer_bytes} B is {self.prefix_bytes} B: one data-plane message carries "
                f"at most {MAX_PREFIX_BYTES} B; use fewer or smaller blocks"
            )
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if self.prefix_bytes > available:
            raise ConfigError(f"a prefix of {self.prefix_bytes} B is more than this machine's "
                              f"free memory ({available} B)")  # fmt: skip


@dataclass
class Node:
    node_id: str
    stub: kvstore_pb2_grpc.KVStoreServiceStub
    data: dataplane.DataClient
    # Stats, the leak check's (an observer's certificate under TLS); None: ``stub``.
    stats_stub: kvstore_pb2_grpc.KVStoreServiceStub | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=OPS, default="read", help="what one iteration does")
    p.add_argument("--num-prefixes", type=int, default=8, help="prefixes stored for reads")
    p.add_argument("--num-blocks", type=int, default=4, help="blocks per prefix")
    p.add_argument("--num-layers", type=int, default=4, help="layers per block")
    p.add_argument("--layer-bytes", default="64KiB", help="bytes of one block's layer")
    p.add_argument("--write-fraction", type=float, default=0.2, help="mixed: share of writes")


class KVStoreScenario:
    grpc_service = kvstore_pb2.DESCRIPTOR.services_by_name["KVStoreService"].full_name

    def __init__(
        self, target: str, load: KVStoreLoad, rpc: RpcConfig | None = None,
        credentials: Credentials = NONE,
    ) -> None:  # fmt: skip
        self.target = target
        self.load = load
        self.credentials = credentials
        self.name = ITERATION_NAMES[load.op]
        self.sample_names = (self.name, *RPC_NAMES[load.op])
        self._rpc = credentials.rpc(Role.PREFILL, rpc)
        self._observer_rpc = credentials.rpc(Role.CLIENT, rpc) if credentials.tls_dir else None
        self._data_security = credentials.security(Role.PREFILL)
        self._fingerprint = f"loadtest-{load.nonce}"
        self._channels: list[grpc.aio.Channel] = []
        self._nodes: dict[str, Node] = {}
        self._prefixes: list[list[BlockHash]] = []
        self._num_writes = itertools.count()
        try:
            self._payload = np.random.default_rng(load.seed).integers(
                0, 256, load.prefix_bytes, dtype=np.uint8
            )
        except MemoryError:
            raise ConfigError(f"cannot allocate a prefix of {load.prefix_bytes} B") from None

    def describe(self) -> dict:
        return {
            "op": self.load.op,
            "prefixes": self.load.num_prefixes,
            "blocks": self.load.num_blocks,
            "layers": self.load.num_layers,
            "layer_bytes": self.load.layer_bytes,
            "nonce": self.load.nonce,
            **({"write_fraction": self.load.write_fraction} if self.load.op == "mixed" else {}),
        }

    # -- setup -----------------------------------------------------------------------------

    async def setup(self) -> None:
        secure_data_planes(self._data_security)  # before any data plane connects
        self._target_stub = kvstore_pb2_grpc.KVStoreServiceStub(self._channel(self.target))
        probe = kvstore_pb2.LookupRequest(block_hashes=[self._hashes("probe")[0]])
        reply = await self._target_stub.Lookup(probe, timeout=self.load.rpc_timeout_s)
        if not reply.nodes:
            raise ConfigError(f"the kvstore at {self.target} knows no live node")
        for n in reply.nodes:
            transport = DATA_TRANSPORT_FROM_PROTO.get(n.data_transport, "grpc")
            data = await dataplane.connect(transport, n.data_address, CONNECT_TIMEOUT_S)
            stub = kvstore_pb2_grpc.KVStoreServiceStub(self._channel(n.grpc_address))
            stats = None
            if self._observer_rpc is not None:
                channel = self._channel(n.grpc_address, self._observer_rpc)
                stats = kvstore_pb2_grpc.KVStoreServiceStub(channel)
            self._nodes[n.node_id] = Node(n.node_id, stub, data, stats)
        for i in range(self.load.num_prefixes):
            hashes = self._hashes(f"prefix-{i}")
            await self._write(hashes, Recorder())
            self._prefixes.append(hashes)

    def _channel(self, address: str, rpc: RpcConfig | None = None) -> grpc.aio.Channel:
        channel = open_channel(address, rpc or self._rpc)
        self._channels.append(channel)
        return channel

    def _hashes(self, key: str) -> list[BlockHash]:
        rng = random.Random(f"{self.load.seed}:{key}")
        tokens = [rng.randrange(1 << 31) for _ in range(self.load.num_blocks * TOKENS_PER_BLOCK)]
        return block_hashes(tokens, TOKENS_PER_BLOCK, self._fingerprint)

    async def close(self) -> None:
        for node in self._nodes.values():
            with contextlib.suppress(Exception):
                await node.data.close()
        for channel in self._channels:
            await channel.close()
        secure_data_planes(None)

    async def server_state(self) -> dict:
        nodes = {}
        for node in self._nodes.values():
            s = await (node.stats_stub or node.stub).Stats(
                kvstore_pb2.KVStoreServiceStatsRequest(), timeout=self.load.rpc_timeout_s
            )
            nodes[node.node_id] = {
                "num_pins": s.num_pins,
                "num_reservations": s.num_reservations,
                "num_blocks": s.num_blocks,
                "num_bytes_used": s.num_bytes_used,
                "num_evicted": s.num_evicted,
            }
        held = {}
        for nid, v in nodes.items():
            held[f"{nid} pins"] = v["num_pins"]
            held[f"{nid} reservations"] = v["num_reservations"]
        return {"nodes": nodes, "held": held}

    # -- one iteration ---------------------------------------------------------------------

    async def run_one(self, index: int, rec: Recorder) -> None:
        op = self.load.op
        if op == "mixed":
            rng = random.Random(f"{self.load.seed}:mix:{index}")
            op = "write" if rng.random() < self.load.write_fraction else "read"
        if op == "write":
            # Fresh blocks every time, in every step of a sweep: a write of blocks already
            # stored would move no bytes.
            await self._write(self._hashes(f"write-{next(self._num_writes)}"), rec)
            return
        hashes = self._prefixes[index % len(self._prefixes)]
        owners = await self._lookup(hashes, rec)
        if op == "read":
            await self._fetch(hashes, owners, rec)

    async def _lookup(self, hashes: list[BlockHash], rec: Recorder) -> list[str]:
        async with rec.rpc("Lookup"):
            reply = await self._target_stub.Lookup(
                kvstore_pb2.LookupRequest(block_hashes=hashes), timeout=self.load.rpc_timeout_s
            )
        if len(reply.node_ids) < len(hashes):
            raise ScenarioError("MISS", f"{len(reply.node_ids)} of {len(hashes)} blocks cached")
        return list(reply.node_ids)

    async def _fetch(self, hashes: list[BlockHash], owners: list[str], rec: Recorder) -> None:
        runs: list[tuple[Node, list[BlockHash]]] = []
        for i, owner in enumerate(owners):
            if runs and runs[-1][0].node_id == owner:
                runs[-1][1].append(hashes[i])
            else:
                runs.append((self._node(owner), [hashes[i]]))
        pins: list[tuple[Node, int]] = []
        try:
            for node, run in runs:
                pins.append((node, await self._pin(node, run, rec)))
            reads = [self._read_layers(node, pin, len(run), rec) for (node, pin), (_, run) in
                     zip(pins, runs, strict=True)]  # fmt: skip
            await asyncio.gather(*reads)
        finally:
            for node, pin_id in pins:
                async with rec.rpc("Unpin"):
                    request = kvstore_pb2.UnpinRequest(pin_id=pin_id)
                    await node.stub.Unpin(request, timeout=self.load.rpc_timeout_s)

    def _node(self, node_id: str) -> Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise ScenarioError("UNKNOWN_NODE", f"block held by {node_id!r}, not a known node")
        return node

    async def _pin(self, node: Node, run: list[BlockHash], rec: Recorder) -> int:
        async with rec.rpc("Pin"):
            reply = await node.stub.Pin(
                kvstore_pb2.PinRequest(block_hashes=run), timeout=self.load.rpc_timeout_s
            )
        if reply.num_pinned < len(run):
            if reply.pin_id:
                await node.stub.Unpin(kvstore_pb2.UnpinRequest(pin_id=reply.pin_id))
            raise ScenarioError("MISS", f"{reply.num_pinned} of {len(run)} blocks pinned")
        return reply.pin_id

    async def _read_layers(self, node: Node, pin_id: int, num_blocks: int, rec: Recorder) -> None:
        expected = num_blocks * self.load.layer_bytes
        for layer in range(self.load.num_layers):
            read = kvstore_pb2.KVDataRead(pin_id=pin_id, layer=layer, num_blocks=num_blocks)
            header = kvstore_pb2.KVDataRequest(read=read).SerializeToString()
            async with rec.rpc("DataRead") as counts:
                _, payload = await node.data.request(header, b"", self.load.rpc_timeout_s)
                if len(payload) != expected:
                    raise ScenarioError("SHORT_READ", f"{len(payload)} of {expected} bytes")
                counts.num_bytes = len(payload)

    async def _write(self, hashes: list[BlockHash], rec: Recorder) -> None:
        groups: dict[str, list[BlockHash]] = {}
        for block_hash in hashes:
            groups.setdefault(place(block_hash, list(self._nodes)), []).append(block_hash)
        await asyncio.gather(*(self._write_node(self._nodes[n], g, rec) for n, g in groups.items()))

    async def _write_node(self, node: Node, hashes: list[BlockHash], rec: Recorder) -> None:
        load, timeout = self.load, self.load.rpc_timeout_s
        async with rec.rpc("Reserve"):
            request = kvstore_pb2.ReserveRequest(
                block_hashes=hashes, num_layers=load.num_layers, layer_bytes=load.layer_bytes
            )
            reply = await node.stub.Reserve(request, timeout=timeout)
        try:
            todo = [hashes[i] for i in reply.to_write]
            if todo:
                size = len(todo) * load.num_layers * load.layer_bytes
                write = kvstore_pb2.KVDataWrite(
                    reservation_id=reply.reservation_id, layer=0, block_hashes=todo,
                    num_layers=load.num_layers,
                )  # fmt: skip
                header = kvstore_pb2.KVDataRequest(write=write).SerializeToString()
                async with rec.rpc("DataWrite") as counts:
                    await node.data.request(header, self._payload[:size], timeout)
                    counts.num_bytes = size
            async with rec.rpc("Commit"):
                commit = kvstore_pb2.CommitRequest(reservation_id=reply.reservation_id)
                await node.stub.Commit(commit, timeout=timeout)
        except BaseException:
            abort = kvstore_pb2.KVStoreServiceAbortRequest(reservation_id=reply.reservation_id)
            with contextlib.suppress(Exception):
                await node.stub.Abort(abort, timeout=timeout)
            raise
