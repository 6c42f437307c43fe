"""Every worker's load as the coordinator follows it, from the router.

The router is the one source of truth for load reports: each worker pushes one every ~100 ms on
its ReportLoad call and ``ListWorkers`` answers the last one per worker with its age (there is
no stream to subscribe to). ``RouterLoadFeed.poll``, every ``poll_s`` (0.25 s), so the policy
sees a change within ~1 s:

1. calls ``ListWorkers``; each ACTIVE worker's report is a ``Sample`` dated ``now - age`` on
   the coordinator's clock (the clock of the migrations' records), with the requests the
   router holds waiting for its room, added unless it is the one already held;
2. forgets a worker that left the list or turned STALE (its history would be a lie), or whose
   last report says it drains (it is stopping: no migration starts with it);
3. learns a new worker's layer count once (``describe`` through ``ports.Workers``);
4. ``views()`` gives the policy one ``WorkerView`` per worker it knows the layers of.

``LoadHistory`` is the pure part (the simulator feeds it its own samples).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable

import grpc

from services.common.config import RpcConfig
from services.common.errors import BanaServeError
from services.common.load import LoadReport
from services.coordinator.policy import Sample, WorkerView
from services.coordinator.ports import Workers
from services.rpc import aio_calls
from services.rpc.channels import open_channel
from services.rpc.convert import seconds
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.load_reports import load_from_proto

log = logging.getLogger(__name__)

DONOR_ROLES = (common_pb2.WORKER_ROLE_DECODE, common_pb2.WORKER_ROLE_MIXED)


class LoadHistory:
    """Each worker's reports of the last ``keep_s``, oldest first."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._samples: dict[str, deque[Sample]] = {}

    def add(self, worker_id: str, at: float, report: LoadReport, waiting_for_room: int = 0) -> bool:
        """False (and nothing kept) for a report no newer than the last one held.
        ``waiting_for_room``: ``Sample.waiting_for_room`` as read with it."""
        samples = self._samples.setdefault(worker_id, deque())
        if samples and at <= samples[-1].at + 1e-3:
            return False
        samples.append(Sample(at, report, waiting_for_room))
        while samples and samples[0].at < at - self._keep_s:
            samples.popleft()
        return True

    def keep_only(self, worker_ids: Iterable[str]) -> None:
        keep = set(worker_ids)
        for worker_id in [w for w in self._samples if w not in keep]:
            del self._samples[worker_id]

    def workers(self) -> list[str]:
        return sorted(self._samples)

    def samples(self, worker_id: str) -> tuple[Sample, ...]:
        return tuple(self._samples.get(worker_id, ()))

    def latest(self, worker_id: str) -> LoadReport | None:
        samples = self._samples.get(worker_id)
        return samples[-1].report if samples else None


class RouterLoadFeed:
    def __init__(
        self,
        router: str,
        rpc: RpcConfig,
        workers: Workers,
        clock: Callable[[], float],
        keep_s: float = 10.0,
        prefill_donors: bool = True,
    ) -> None:
        """``prefill_donors``: prefill workers may give their layers away too (a prefill worker
        under a prefill-heavy load borrows an idle decode worker's core; docs/migration.md)."""
        self.history = LoadHistory(keep_s)
        self._channel = open_channel(router, rpc)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._workers = workers
        self._clock = clock
        self._prefill_donors = prefill_donors
        self._layers: dict[str, int] = {}
        self._roles: dict[str, int] = {}

    async def poll(self) -> None:
        reply = await aio_calls.unary(
            self._stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5.0)
        )
        now = self._clock()
        active = [
            w
            for w in reply.workers
            if w.state == router_pb2.WORKER_STATE_ACTIVE
            and w.HasField("last_load")
            and not w.last_load.draining
        ]
        self.history.keep_only(w.info.worker_id for w in active)
        for w in active:
            worker_id = w.info.worker_id
            self._roles[worker_id] = w.info.role
            at = now - seconds(w.since_last_load)
            self.history.add(worker_id, at, load_from_proto(w.last_load), w.num_waiting_for_room)
        missing = [w for w in self.history.workers() if w not in self._layers]
        await asyncio.gather(*(self._learn_layers(w) for w in missing))

    async def _learn_layers(self, worker_id: str) -> None:
        try:
            port = await self._workers.port(worker_id)
            self._layers[worker_id] = (await port.describe()).num_layers
        except (BanaServeError, grpc.aio.AioRpcError, TimeoutError) as exc:
            log.warning("layer count of %s unknown yet: %s", worker_id, exc)

    def is_prefill(self, worker_id: str) -> bool:
        return self._roles.get(worker_id) == common_pb2.WORKER_ROLE_PREFILL

    def can_donate(self, worker_id: str) -> bool:
        return self._prefill_donors or self._roles.get(worker_id) in DONOR_ROLES

    def views(self) -> list[WorkerView]:
        return [
            WorkerView(
                w,
                self._layers[w],
                self.history.samples(w),
                can_donate=self.can_donate(w),
                is_prefill=self.is_prefill(w),
            )
            for w in self.history.workers()
            if w in self._layers
        ]

    async def close(self) -> None:
        await self._channel.close()
