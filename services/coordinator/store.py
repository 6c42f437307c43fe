"""Every migration's record in Redis, so a restarted coordinator finds each one (core.recover).

Keys, under a prefix (default ``banaserve:coord``):

- ``PREFIX:next_id``: a counter; migration ids are ``m-1``, ``m-2``... for the life of the Redis
  (a coordinator that holds higher ids than a Redis that came back empty moves it past them,
  ``next_id(after=...)``);
- ``PREFIX:migration:ID``: one migration's record, a JSON object (``to_record``), rewritten
  whole on every change (a change is a state entered or a step's figures);
- ``PREFIX:migrations``: a sorted set of every id, scored by its number, so a listing comes back
  oldest first.

A record and its index entry are written in one MULTI/EXEC, so a reader never finds an id
without its record. The JSON carries a ``version``; a record of an unknown version is refused
loudly rather than guessed at.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.errors import DependencyUnavailableError, PreconditionError
from services.coordinator.migration import Migration, MigrationKind, MigrationState, StateTime

RECORD_VERSION = 1
DEFAULT_PREFIX = "banaserve:coord"


def to_record(m: Migration) -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "migration_id": m.migration_id,
        "kind": m.kind.value,
        "donor": m.donor,
        "helper": m.helper,
        "start_layer": m.start_layer,
        "end_layer": m.end_layer,
        "created_at": m.created_at,
        "state": m.state.value,
        "num_micro_batches": m.num_micro_batches,
        "drop_weights": m.drop_weights,
        "automatic": m.automatic,
        "helper_data_address": m.helper_data_address,
        "num_weight_bytes": m.num_weight_bytes,
        "num_kv_bytes": m.num_kv_bytes,
        "weights_s": m.weights_s,
        "num_copy_kv_bytes": m.num_copy_kv_bytes,
        "kv_copy_s": m.kv_copy_s,
        "num_switch_kv_bytes": m.num_switch_kv_bytes,
        "weights_skipped": m.weights_skipped,
        "num_sequences": m.num_sequences,
        "switch_pause_s": m.switch_pause_s,
        "num_requeued": m.num_requeued,
        "num_requeued_at_end": m.num_requeued_at_end,
        "request_ids": list(m.request_ids),
        "max_sequences": m.max_sequences,
        "max_blocks_per_sequence": m.max_blocks_per_sequence,
        "refill": m.refill,
        "num_blocks": m.num_blocks,
        "num_refill_kv_bytes": m.num_refill_kv_bytes,
        "reason": m.reason,
        "timings": [[t.state.value, t.entered_at, t.left_at] for t in m.timings],
        "trace_id": f"{m.trace_id:032x}",
        "root_span_id": f"{m.root_span_id:016x}",
    }


def from_record(record: dict[str, Any]) -> Migration:
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"migration record of version {record.get('version')!r}")
    return Migration(
        migration_id=record["migration_id"],
        kind=MigrationKind(record["kind"]),
        donor=record["donor"],
        helper=record["helper"],
        start_layer=record["start_layer"],
        end_layer=record["end_layer"],
        created_at=record["created_at"],
        state=MigrationState(record["state"]),
        num_micro_batches=record["num_micro_batches"],
        drop_weights=record["drop_weights"],
        automatic=record.get("automatic", False),  # (older records: by hand)
        helper_data_address=record["helper_data_address"],
        num_weight_bytes=record["num_weight_bytes"],
        num_kv_bytes=record["num_kv_bytes"],
        # the time split came later: older records of this version lack it
        weights_s=record.get("weights_s", 0.0),
        num_copy_kv_bytes=record.get("num_copy_kv_bytes", 0),
        kv_copy_s=record.get("kv_copy_s", 0.0),
        num_switch_kv_bytes=record.get("num_switch_kv_bytes", 0),
        weights_skipped=record["weights_skipped"],
        num_sequences=record["num_sequences"],
        switch_pause_s=record["switch_pause_s"],
        num_requeued=record["num_requeued"],
        num_requeued_at_end=record.get("num_requeued_at_end", 0),
        # attention migrations came later: older records of this version lack them
        request_ids=tuple(record.get("request_ids", ())),
        max_sequences=record.get("max_sequences", 0),
        max_blocks_per_sequence=record.get("max_blocks_per_sequence", 0),
        refill=record.get("refill", False),
        num_blocks=record.get("num_blocks", 0),
        num_refill_kv_bytes=record.get("num_refill_kv_bytes", 0),
        reason=record["reason"],
        timings=[StateTime(MigrationState(s), a, b) for s, a, b in record["timings"]],
        trace_id=int(record["trace_id"], 16),
        root_span_id=int(record["root_span_id"], 16),
    )


# KEYS: owner key, then the keys to write; ARGV: the owner's token ('' = unguarded), then the
# command's arguments -> 1 written, 0 the prefix has another owner (nothing written). No owner
# at all (Redis restarted empty, the claim not yet taken again) is no other owner: written.
_GUARD = """
local holder = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and holder and holder ~= ARGV[1] then
  return 0
end
"""
_SAVE = (
    _GUARD
    + """
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""
)
DELETE_CHUNK = 1000
_DELETE = (
    _GUARD
    + """
redis.call('ZREM', KEYS[2], unpack(ARGV, 2))
redis.call('DEL', unpack(KEYS, 3))
return 1
"""
)


class RedisMigrationStore:
    """``core.MigrationStore`` on Redis. Redis errors become ``DependencyUnavailableError``.

    Guarded (``guard``, with the prefix's ownership claim), a write happens only while no
    other coordinator holds the claim, in one script: a coordinator that lost its prefix
    cannot overwrite what the new owner keeps (``PreconditionError``, nothing written)."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._owner_key, self._token = f"{prefix}:owner", ""
        self._save = client.register_script(_SAVE)
        self._delete = client.register_script(_DELETE)

    def guard(self, owner_key: str, token: str) -> None:
        """Writes from now on only while ``owner_key`` holds ``token`` (``Ownership``)."""
        self._owner_key, self._token = owner_key, token

    def _written(self, done: int) -> None:
        if not done:
            raise PreconditionError(
                f"this coordinator no longer owns {self._prefix} (another one took it over): "
                "nothing written"
            )

    @classmethod
    def from_url(
        cls, url: str, prefix: str = DEFAULT_PREFIX, password: str = ""
    ) -> RedisMigrationStore:
        """``password``: Redis's (security.redis_password), "": the URL's, if any."""
        return cls(
            aioredis.Redis.from_url(url, **({"password": password} if password else {})), prefix
        )

    @property
    def redis(self) -> aioredis.Redis:
        """The client, shared with the prefix's ownership (``ownership.py``)."""
        return self._redis

    def _key(self, migration_id: str) -> str:
        return f"{self._prefix}:migration:{migration_id}"

    async def next_id(self, after: int = 0) -> str:
        """A new id, numbered above ``after`` (the counter moves past it if it was behind)."""
        key = f"{self._prefix}:next_id"
        try:
            number = await self._redis.incr(key)
            if number <= after:  # one coordinator per prefix: no other INCR runs in between
                number = await self._redis.incrby(key, after + 1 - number)
        except RedisError as exc:
            raise DependencyUnavailableError(f"redis: {exc}") from exc
        return f"m-{number}"

    async def save(self, m: Migration) -> None:
        keys = [self._owner_key, self._key(m.migration_id), f"{self._prefix}:migrations"]
        args = [self._token, json.dumps(to_record(m)), m.number, m.migration_id]
        try:
            done = await self._save(keys=keys, args=args)
        except RedisError as exc:
            raise DependencyUnavailableError(f"redis: {exc}") from exc
        self._written(done)

    async def load_all(self) -> list[Migration]:
        try:
            ids = await self._redis.zrange(f"{self._prefix}:migrations", 0, -1)
            if not ids:
                return []
            records = await self._redis.mget([self._key(i.decode()) for i in ids])
        except RedisError as exc:
            raise DependencyUnavailableError(f"redis: {exc}") from exc
        return [from_record(json.loads(r)) for r in records if r is not None]

    async def delete(self, migration_ids: list[str]) -> None:
        if not migration_ids:
            return
        for at in range(0, len(migration_ids), DELETE_CHUNK):  # Lua's unpack has a limit
            ids = migration_ids[at : at + DELETE_CHUNK]
            keys = [self._owner_key, f"{self._prefix}:migrations", *map(self._key, ids)]
            try:
                done = await self._delete(keys=keys, args=[self._token, *ids])
            except RedisError as exc:
                raise DependencyUnavailableError(f"redis: {exc}") from exc
            self._written(done)

    async def close(self) -> None:
        await self._redis.aclose()
