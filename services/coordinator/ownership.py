"""One coordinator per Redis key prefix: the others wait, and one that lost the prefix stops.

Every migration's record, its id counter and the workers' leases belong to the coordinator of
a prefix (``store.py``). Two coordinators on one prefix (``docker compose up --scale
coordinator=2``, a second ``python -m services.coordinator`` started by hand, a pod left
running beside its replacement) would each recover the same live migrations, renew and revert
them, and start migrations of their own on the same workers. So a coordinator owns its prefix
before it does anything:

1. ``acquire``: ``SET PREFIX:owner TOKEN NX PX ttl`` (the token: ``HOST/PID-NAMESPACE/pid
   N/random``), in one script with the claim's epoch, its fencing token: larger than every
   earlier claim's on this Redis (``PREFIX:owner-epoch``, services/common/fencing.py), sent
   with every call to a worker, which refuses an older coordinator's. Held by a coordinator
   of this host and pid namespace that no longer runs (its
   pid gone, or this very pid), the claim is taken at once: ``banaserve up`` respawning a
   SIGKILLed coordinator does not wait. Two hosts, or two containers (each its own pid
   namespace, even where they share a hostname, as with host networking), never judge each
   other's pids.
   Held by another one: it says so once and waits, trying every ``interval_s``: a standby that
   takes over once the owner stops (at once after a clean stop, which releases the key; within
   ``ttl_s`` after a SIGKILL elsewhere);
2. ``keep``: every ``interval_s`` the owner renews the key's TTL if it still holds its token
   (one script). The key gone (Redis restarted empty, or it expired in a Redis outage) is taken
   again, with a new epoch. Held by another token: ``keep`` returns that holder, and the
   caller stops acting at once (the other coordinator owns the migrations now) and exits;
3. ``release`` (a clean stop): the key is deleted if it still holds this token.

A Redis that does not answer leaves the owner as it was (logged once): no other coordinator
can take the prefix while Redis is down either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# The owner renews every second; a SIGKILLed owner's claim lapses within 3 s (as a kvstore
# node's, services/kvstore/metadata.py), which is how long its standby waits to take over.
OWNER_TTL_S = 3.0
OWNER_INTERVAL_S = 1.0

# The claim's epoch (services/common/fencing.py): Redis's clock in microseconds, or the last
# epoch + 1 where that is larger; KEYS[2] keeps the last one.
_NEXT_EPOCH = """
local now = redis.call('TIME')
local epoch = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if epoch <= last then epoch = last + 1 end
redis.call('SET', KEYS[2], string.format('%d', epoch))
return epoch
"""
# KEYS: owner key, epoch key; ARGV: token, ttl_ms -> the new claim's epoch, 0 another holds it.
_CLAIM = (
    """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
"""
    + _NEXT_EPOCH
)
# KEYS, ARGV: as _CLAIM -> -1 renewed, 0 another holds it, else taken again: the new epoch.
_KEEP = (
    """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return -1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
"""
    + _NEXT_EPOCH
)
# KEYS: owner key; ARGV: token -> 1 deleted, 0 not this token's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Ownership:
    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        ttl_s: float = OWNER_TTL_S,
        interval_s: float = OWNER_INTERVAL_S,
        token: str | None = None,
    ) -> None:
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"need 0 < interval_s < ttl_s, got {interval_s}, {ttl_s}")
        self.key = f"{prefix}:owner"
        self.epoch_key = f"{prefix}:owner-epoch"
        self.prefix = prefix
        self.epoch = 0  # the fencing token of this coordinator's claim; 0 before it holds one
        # HOST/PID-NAMESPACE/pid N/random (``_runs_here`` reads it); tests name others'.
        self.token = token or f"{local_identity()}/pid {os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._redis = client
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._interval_s = interval_s
        self._claim = client.register_script(_CLAIM)
        self._keep = client.register_script(_KEEP)
        self._release = client.register_script(_RELEASE)

    @property
    def _keys(self) -> list[str]:
        return [self.key, self.epoch_key]

    async def holder(self) -> str | None:
        value = await self._redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    async def acquire(self) -> None:
        """Returns once this coordinator owns the prefix: waits while another does, and while
        Redis cannot be reached (a coordinator started before its Redis, or a standby whose
        Redis restarts, waits for it instead of ending in a traceback)."""
        waiting = unreachable = False
        while True:
            try:
                epoch = await self._claim(keys=self._keys, args=[self.token, self._ttl_ms])
                if epoch:
                    self.epoch = int(epoch)
                    break
                holder = await self.holder()
            except RedisError as exc:
                if not unreachable:
                    log.warning("cannot reach Redis to claim %s: %s (retrying)", self.prefix, exc)
                unreachable = True
                await asyncio.sleep(self._interval_s)
                continue
            if unreachable:
                log.info("Redis reached again: claiming %s", self.prefix)
                unreachable = False
            if holder is not None and not _runs_here(holder):
                # Deleted only if still that claim: another standby may have taken it since.
                with contextlib.suppress(RedisError):  # else the next round tries again
                    if await self._release(keys=[self.key], args=[holder]):
                        log.warning(
                            "took %s over from %s, which no longer runs", self.prefix, holder
                        )
                        continue
            if not waiting and holder is not None:
                log.warning(
                    "another coordinator (%s) owns %s: waiting to take over once it stops "
                    "(one coordinator per --key-prefix)",
                    holder, self.prefix,
                )  # fmt: skip
                waiting = True
            await asyncio.sleep(self._interval_s)
        if waiting:
            log.warning("took %s over", self.prefix)

    async def keep(self) -> str:
        """Renews the claim until another coordinator holds the prefix; returns that holder."""
        unreachable = False
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                held = int(await self._keep(keys=self._keys, args=[self.token, self._ttl_ms]))
                if not held:
                    return await self.holder() or "unknown"
                if held > 0:  # the key was gone (Redis restarted empty): claimed again
                    self.epoch = held
                    log.warning("claimed %s again (epoch %d)", self.prefix, held)
            except RedisError as exc:
                if not unreachable:
                    log.warning("cannot renew the claim on %s: %s (retrying)", self.prefix, exc)
                unreachable = True
                continue
            if unreachable:
                log.info("renewing the claim on %s again", self.prefix)
                unreachable = False

    async def release(self) -> None:
        """Deletes the claim if this coordinator still holds it (a clean stop)."""
        try:
            await self._release(keys=[self.key], args=[self.token])
        except RedisError as exc:  # it lapses within the TTL anyway
            log.warning("could not release %s: %s", self.key, exc)


def local_identity() -> str:
    """``HOST/PID-NAMESPACE``: where a pid means this host's process (``pid:[4026531836]``;
    empty off Linux, where no claim is judged by its pid)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}"


def _runs_here(token: str) -> bool:
    """False when ``token``'s coordinator is certainly gone: it ran in this host's and pid
    namespace under a pid that is gone, or under this process's own pid (this process has
    claimed nothing yet). True otherwise: elsewhere it may well run."""
    identity, _, rest = token.rpartition("/pid ")
    pid_text = rest.partition("/")[0]
    if identity != local_identity() or identity.endswith("/") or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True
