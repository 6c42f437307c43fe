"""Where each cached KV block lives: the kvstore's metadata, kept in Redis (DESIGN.md §2, §4).

Redis holds metadata only; block payloads stay in the nodes' host memory and move over the data
plane. Every key lives under one prefix (default ``banaserve:kv``) so clusters and tests isolate:

    {prefix}:nodes              set   node ids ever registered (for the sweep of dead nodes)
    {prefix}:node:{node_id}     hash  incarnation, grpc_address, data_address, data_transport;
                                      PEXPIRE node TTL, refreshed by every heartbeat
    {prefix}:owned:{node_id}    set   hex block hashes whose entry names this node
    {prefix}:block:{hex hash}   hash  node, size, layers, last_use (wall-clock seconds)
    {prefix}:seen:{generation}  bitmap hashes prefill workers looked up (an aging Bloom filter,
                                      ``lookup``); PEXPIRE two seen windows

Invariant (every script keeps it atomically): a block entry names node n exactly when its hash is
in n's owned set. A block has one location: the first live node to announce it. An announce
of a block another live node owns is refused, and the announcer drops its copy (a copy no lookup
can name would cost it capacity until its LRU took it: 23 of 1,055 blocks on a rejoined node in
the probe of session 43); an entry of a node whose key lapsed is taken over.

Lifecycle of a node:
1. ``register_node`` withdraws every entry the node id owned before (a restarted process no
   longer holds that data), then writes the node key with its TTL;
2. ``announce`` / ``withdraw`` / ``touch`` as blocks are stored, evicted and read;
   announcing is refused unless the node key carries the caller's incarnation;
3. ``heartbeat`` refreshes the TTL; ``MetadataSession`` runs it and re-registers and re-announces
   everything the node holds when the node key is gone or Redis's run_id changed (restart),
   and the node drops what another live node announced meanwhile (``on_refused``);
4. ``deregister_node`` on clean shutdown withdraws everything; a node that dies instead stops
   being returned as soon as its key expires, and ``sweep_dead_nodes`` later deletes its entries.

Metadata is a hint: a fetch can still find a block evicted after the lookup, and the data plane
answers that with not-found. Scripts build key names from ARGV, so they need a standalone Redis
(not Redis Cluster). ``longest_prefix`` and ``lookup`` take a chain ``_BATCH`` hashes at a
time, one EVALSHA after another: one round trip for a chain of up to 1,024 blocks, and no
call holds Redis for long however long the chain (a 262,144-hash lookup in one script held
it ~3 s: every other node's and worker's call waited; probe, session 43).

Which blocks are reused: ``lookup`` (a prefill worker's, before it computes a prompt) also says
how long a prefix of the chain was held or looked up before, and marks the chain looked up. A
worker writes back only those blocks by default (its ``--store-write-policy``,
docs/kvstore.md): a prompt seen once, as most are, costs the store no write and evicts nothing.
The marks are a Bloom filter per generation of ``seen_window_s`` (3 bits a hash in a bitmap of
``seen_bits``; the current and previous generation are read): bounded memory whatever the
traffic, a false positive only a write that was not needed, a chain looked up once more than a
window ago forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.common.errors import BanaServeError, ConfigError, DependencyUnavailableError
from services.common.hashing import HASH_SIZE, BlockHash, place  # noqa: F401 (re-exported)
from services.common.limits import check_block_hashes
from services.kvstore import metadata_scripts as lua

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "banaserve:kv"
_NODE_ID = re.compile(r"[A-Za-z0-9._-]+")
_BATCH = 1024  # entries per script call: bounds how long one call blocks Redis
# The seen marks (``lookup``): a prefix asked for again within 10-20 minutes counts as reused (a
# conversation's next turn, a shared system prompt); 2 MiB a generation keeps false positives
# under 1 % up to a million distinct blocks a window (computed, not measured: 0.44 % a bitmap,
# two bitmaps read).
DEFAULT_SEEN_WINDOW_S = 600.0
DEFAULT_SEEN_BITS = 1 << 24


class MetadataUnavailableError(DependencyUnavailableError):
    """Redis cannot be reached (down, restarting, timed out); callers recompute instead."""


class NodeNotRegisteredError(BanaServeError, LookupError):
    """The node key is gone or belongs to another incarnation; the session will re-register."""


def new_incarnation() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    grpc_address: str
    data_address: str
    data_transport: str  # "ucx", "grpc", "tcp"...
    incarnation: str = field(default_factory=new_incarnation)  # new per process start

    def __post_init__(self) -> None:
        if not _NODE_ID.fullmatch(self.node_id):
            raise ConfigError(f"node_id must match {_NODE_ID.pattern}, got {self.node_id!r}")
        for name in ("grpc_address", "data_address", "data_transport", "incarnation"):
            if not getattr(self, name):
                raise ConfigError(f"{name} must be non-empty")


@dataclass(frozen=True)
class BlockEntry:
    """One block a node holds, as announced."""

    block_hash: BlockHash
    size_bytes: int
    num_layers: int

    def __post_init__(self) -> None:
        _check_hash(self.block_hash)
        if self.size_bytes < 0 or self.num_layers <= 0:
            raise ValueError(f"bad size/layers: {self.size_bytes}/{self.num_layers}")


@dataclass(frozen=True)
class Location:
    """Where one block of a cached prefix can be fetched from."""

    block_hash: BlockHash
    node_id: str
    data_address: str
    data_transport: str
    size_bytes: int
    num_layers: int


class NodeStatus(enum.Enum):
    ALIVE = "alive"  # the key carried our incarnation; its TTL is refreshed
    MISSING = "missing"  # expired, deregistered or lost by Redis: register again
    SUPERSEDED = "superseded"  # another incarnation took the node id


def _check_hash(block_hash: bytes) -> None:
    check_block_hashes([block_hash], "block_hash")  # InvalidRequestError, a ValueError


@contextlib.contextmanager
def _unavailable_on_error() -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        raise MetadataUnavailableError(f"kvstore metadata (Redis) unavailable: {e}") from e


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _hex_chunks(hashes: Sequence[BlockHash]) -> list[Sequence]:
    return _chunks([h.hex() for h in hashes], _BATCH)


class MetadataStore:
    """Async access to the metadata in one Redis; every method is one or a few round trips."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = DEFAULT_PREFIX,
        node_ttl_s: float = 3.0,
        clock: Callable[[], float] = time.time,  # wall clock: last_use is compared across hosts
        seen_window_s: float = DEFAULT_SEEN_WINDOW_S,
        seen_bits: int = DEFAULT_SEEN_BITS,
    ) -> None:
        if not prefix:
            raise ConfigError("metadata prefix must be non-empty")
        if node_ttl_s <= 0:
            raise ConfigError(f"node_ttl_s must be positive, got {node_ttl_s}")
        if not seen_window_s > 0 or not 1 <= seen_bits <= 1 << 32:
            raise ConfigError(
                f"seen window must be > 0 s and seen bits in 1..2^32: {seen_window_s}, {seen_bits}"
            )
        self.seen_window_s, self.seen_bits = seen_window_s, seen_bits
        self.client = client
        self.prefix = prefix
        self.node_ttl_s = node_ttl_s
        self.clock = clock
        script = client.register_script
        self._register = script(lua.LUA_REGISTER)
        self._heartbeat = script(lua.LUA_HEARTBEAT)
        self._deregister = script(lua.LUA_DEREGISTER)
        self._announce = script(lua.LUA_ANNOUNCE)
        self._withdraw = script(lua.LUA_WITHDRAW)
        self._touch = script(lua.LUA_TOUCH)
        self._longest_prefix = script(lua.LUA_LONGEST_PREFIX)
        self._lookup = script(lua.LUA_LOOKUP)
        self._sweep = script(lua.LUA_SWEEP)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        password: str = "",
        **kwargs,
    ) -> MetadataStore:
        """A store with bounded timeouts and one immediate retry, which reconnects after a
        Redis restart; a Redis that is down fails within about two timeouts. ``password``:
        Redis's (security.redis_password), "": the URL's, if any."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 1),
            **({"password": password} if password else {}),
        )
        return cls(client, **kwargs)

    async def close(self) -> None:
        await self.client.aclose()

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.node_ttl_s * 1000))

    async def _call(self, script, *args) -> object:
        return (await self._call_batched(script, args, [()]))[0]

    async def _call_batched(self, script, head: Sequence, chunks: Iterable[Sequence]) -> list:
        """One script call per chunk, all pipelined: one round trip, plus one SCRIPT EXISTS
        when there is more than one chunk."""
        calls = [[self.prefix, *head, *chunk] for chunk in chunks]
        with _unavailable_on_error():
            try:
                if len(calls) == 1:
                    return [await script(args=calls[0])]
                async with self.client.pipeline(transaction=False) as pipe:
                    for args in calls:
                        await script(args=args, client=pipe)
                    return await pipe.execute()
            except redis.exceptions.ResponseError as e:
                if "NOTREGISTERED" in str(e):  # a pipeline prefixes the command's position
                    raise NodeNotRegisteredError(str(e)) from None
                raise

    async def register_node(self, node: NodeInfo, takeover: bool = True) -> bool:
        """Withdraws every entry ``node.node_id`` owned, then (re)writes its node key.

        A starting process takes the id over from any older incarnation (``takeover``); a
        re-registration passes False and gets False back if a newer incarnation holds the id.
        """
        registered = await self._call(
            self._register,
            node.node_id,
            node.incarnation,
            node.grpc_address,
            node.data_address,
            node.data_transport,
            self._ttl_ms,
            "1" if takeover else "0",
        )
        return registered == 1

    async def heartbeat(self, node: NodeInfo) -> NodeStatus:
        status = await self._call(self._heartbeat, node.node_id, node.incarnation, self._ttl_ms)
        return {1: NodeStatus.ALIVE, 0: NodeStatus.MISSING}.get(status, NodeStatus.SUPERSEDED)

    async def deregister_node(self, node: NodeInfo) -> None:
        await self._call(self._deregister, node.node_id, node.incarnation)

    async def announce(self, node: NodeInfo, entries: Sequence[BlockEntry]) -> list[BlockHash]:
        """Records ``entries`` as held by ``node``; returns the hashes refused because another
        live node owns them (the caller drops its copies). Raises NodeNotRegisteredError if its
        key is gone (the session re-announces everything once it has re-registered)."""
        if not entries:
            return []
        flat = [v for e in entries for v in (e.block_hash.hex(), e.size_bytes, e.num_layers)]
        head = (node.node_id, node.incarnation, repr(self.clock()))
        refused = await self._call_batched(self._announce, head, _chunks(flat, 3 * _BATCH))
        return [bytes.fromhex(_text(h)) for chunk in refused for h in chunk]

    async def withdraw(self, node: NodeInfo, hashes: Sequence[BlockHash]) -> int:
        """Removes the entries of ``hashes`` that ``node`` owns; returns how many it removed."""
        if not hashes:
            return 0
        head = (node.node_id, node.incarnation)
        return sum(await self._call_batched(self._withdraw, head, _hex_chunks(hashes)))

    async def touch(self, hashes: Sequence[BlockHash]) -> int:
        """Sets last use of the existing entries to now; returns how many exist."""
        if not hashes:
            return 0
        head = (repr(self.clock()),)
        return sum(await self._call_batched(self._touch, head, _hex_chunks(hashes)))

    async def longest_prefix(self, hashes: Sequence[BlockHash]) -> list[Location]:
        """Locations of the longest prefix of ``hashes`` held by live nodes (a round trip per
        ``_BATCH`` hashes, up to the first chunk not held whole)."""
        found: list[Location] = []
        for chunk in _chunks(hashes, _BATCH):
            rows = await self._call(self._longest_prefix, *(h.hex() for h in chunk))
            found += _locations(chunk, rows)
            if len(rows) < len(chunk):
                break
        return found

    async def lookup(self, hashes: Sequence[BlockHash]) -> tuple[list[Location], int]:
        """``longest_prefix``, and how many of ``hashes`` from the first were held or asked
        for by an earlier ``lookup`` within the seen window (at least the hits); marks all of
        them asked for. A round trip per ``_BATCH`` hashes."""
        if not hashes:
            return [], 0
        generation = int(self.clock() // self.seen_window_s)
        ttl_ms = max(1, round(2 * self.seen_window_s * 1000))
        head = (generation, ttl_ms, self.seen_bits)
        found: list[Location] = []
        total_seen, hitting, seeing = 0, True, True
        for chunk in _chunks(hashes, _BATCH):  # one after another: others' calls go between
            flags = ("1" if hitting else "0", "1" if seeing else "0")
            rows, num_seen = await self._call(
                self._lookup, *head, *flags, *(h.hex() for h in chunk)
            )
            if hitting:
                found += _locations(chunk, rows)
                hitting = len(rows) == len(chunk)
            if seeing:
                total_seen += int(num_seen)
                seeing = int(num_seen) == len(chunk)
        return found, total_seen

    async def live_nodes(self) -> list[NodeInfo]:
        """Registered nodes whose key has not expired, by node id (input to ``place``)."""
        with _unavailable_on_error():
            node_ids = sorted(_text(n) for n in await self.client.smembers(self._key("nodes")))
            async with self.client.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.hgetall(self._key("node", node_id))
                rows = await pipe.execute()
        return [
            NodeInfo(node_id=node_id, **{_text(k): _text(v) for k, v in row.items()})
            for node_id, row in zip(node_ids, rows, strict=True)
            if row
        ]

    async def sweep_dead_nodes(self) -> int:
        """Deletes the entries of nodes whose key expired; returns how many nodes it swept."""
        return await self._call(self._sweep)

    async def server_run_id(self) -> str | None:
        """Redis's run_id, new at every server start; None where INFO is not supported."""
        with _unavailable_on_error():
            try:
                info = await self.client.info("server")
            except redis.exceptions.ResponseError:
                return None  # the embedded fakeredis server has no INFO
        return info.get("run_id")

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))


def _locations(hashes: Sequence[BlockHash], rows: Sequence) -> list[Location]:
    return [
        Location(h, _text(node), _text(address), _text(transport), int(size), int(layers))
        for h, (node, address, transport, size, layers) in zip(hashes, rows, strict=False)
    ]


class MetadataSession:
    """Keeps one node registered and its holdings announced, across node expiry and Redis
    restarts.

    Every ``interval_s`` it reads Redis's run_id and heartbeats. A first beat, a changed run_id
    or a missing node key triggers a resync: register (which withdraws stale entries) and
    announce ``holdings()`` in full; what another live node announced while this one was out
    of the index goes to ``on_refused``, for the node to drop. While Redis is down beats fail, are logged once per outage
    and retried with exponential backoff up to ``max_backoff_s``; the loop never dies of it. A
    superseded node (same id, newer incarnation) stops the loop: the newer process owns the id.
    """

    def __init__(
        self,
        store: MetadataStore,
        node: NodeInfo,
        holdings: Callable[[], Sequence[BlockEntry]],
        *,
        on_refused: Callable[[list[BlockHash]], None] | None = None,
        interval_s: float = 1.0,
        max_backoff_s: float = 5.0,
        sweep_every: int = 10,  # beats between sweeps of dead nodes; 0: never
    ) -> None:
        if not 0 < interval_s < store.node_ttl_s or max_backoff_s < interval_s:
            raise ConfigError(
                f"need 0 < interval_s < node TTL and interval_s <= max_backoff_s, got "
                f"{interval_s}, {store.node_ttl_s}, {max_backoff_s}"
            )
        self.store = store
        self.node = node
        self.holdings = holdings
        self.on_refused = on_refused  # blocks another live node owns: the node drops its copies
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.sweep_every = sweep_every
        self.num_syncs = 0
        self.num_failures = 0
        self.superseded = False
        self._synced = False
        self._run_id: str | None = None
        self._num_beats = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def synced(self) -> bool:
        return self._synced

    async def start(self) -> None:
        """Tries a first sync now (Redis being down is not an error) and starts the loop."""
        delay = await self._beat_logged()
        self._task = asyncio.create_task(self._run(delay), name=f"metadata-{self.node.node_id}")

    async def stop(self, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if deregister and not self.superseded:
            try:
                await self.store.deregister_node(self.node)
            except MetadataUnavailableError as e:
                log.warning("could not deregister %s: %s", self.node.node_id, e)

    async def __aenter__(self) -> MetadataSession:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(self, delay: float | None) -> None:
        while delay is not None:
            await asyncio.sleep(delay)
            delay = await self._beat_logged()

    async def _beat_logged(self) -> float | None:
        """One beat; returns the delay before the next, or None to stop."""
        try:
            keep_going = await self._beat()
        except (MetadataUnavailableError, NodeNotRegisteredError) as e:
            self._synced = False
            self.num_failures += 1
            if self.num_failures == 1:
                log.warning("kvstore metadata: %s; retrying with backoff", e)
            return min(self.interval_s * 2 ** (self.num_failures - 1), self.max_backoff_s)
        if self.num_failures:
            log.info("kvstore metadata reachable again after %d failures", self.num_failures)
            self.num_failures = 0
        return self.interval_s if keep_going else None

    async def _beat(self) -> bool:
        run_id = await self.store.server_run_id()
        if not self._synced or run_id != self._run_id:
            return await self._sync(run_id)
        status = await self.store.heartbeat(self.node)
        if status is NodeStatus.SUPERSEDED:
            return self._give_up()
        if status is NodeStatus.MISSING:
            log.warning("node key of %s missing; re-announcing", self.node.node_id)
            return await self._sync(run_id)
        self._num_beats += 1
        if self.sweep_every and self._num_beats % self.sweep_every == 0:
            await self.store.sweep_dead_nodes()
        return True

    async def _sync(self, run_id: str | None) -> bool:
        self._synced = False
        if not await self.store.register_node(self.node, takeover=self.num_syncs == 0):
            return self._give_up()
        refused = await self.store.announce(self.node, list(self.holdings()))
        if refused and self.on_refused is not None:
            self.on_refused(refused)
        self._run_id = run_id
        self._synced = True
        self.num_syncs += 1
        return True

    def _give_up(self) -> bool:
        log.error("node %s was taken by a newer incarnation; stopping", self.node.node_id)
        self.superseded = True
        return False
