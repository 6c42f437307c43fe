"""The coordinator's load test: its CoordinatorService, as operators' tools and a controller
drive it.

Every iteration is one ``--op``:
- ``list`` (iteration ``list``): ``ListMigrations`` (``--live-only``: the live ones), what
  ``banaserve migrations`` and a dashboard polling it send; its reply's bytes are counted;
- ``describe`` (``describe``): ``DescribeMigration`` of one migration the coordinator holds,
  round robin over those listed at setup (the run needs at least one: run ``cycle`` first);
- ``cycle`` (``cycle``): one whole layer migration and its undo through the coordinator, as
  ``banaserve migrate`` and the automatic mode run them — ``StartMigration`` of layers
  ``[--start-layer, --end-layer)`` from ``--donor`` to ``--helper`` (the router's worker ids),
  ``DescribeMigration`` polled every ``--poll-ms`` until ACTIVE (``to ACTIVE``, from the
  start), ``RevertMigration``, polled again until DONE (``to DONE``, from the revert). A
  migration that ends ABORTED fails the iteration as ``ABORTED`` with its reason. The
  coordinator takes one action per worker at a time, so ``cycle`` runs closed loop with one
  user (other loads are refused before the run); it needs the coordinator's cluster.

After each run ``ListMigrations(live_only)`` is the leak check: no migration left live (one
the run started and did not bring to DONE would hold the workers' layers and leases).

With ``--tls-dir`` and ``--api-token-file`` the load test presents what ``banaserve migrate``
does: the ``client`` certificate, and the first token on every call (``credentials.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from dataclasses import dataclass

import grpc

from bench.loadtest.credentials import NONE, Credentials
from bench.loadtest.driver import Recorder, ScenarioError
from services.common.arg_types import positive
from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.common.types import MAX_UINT32
from services.rpc.channels import open_channel
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc
from services.rpc.security import Role

OPS = ("list", "describe", "cycle")
RPC_NAMES = {
    "list": ("ListMigrations",),
    "describe": ("DescribeMigration",),
    "cycle": ("StartMigration", "to ACTIVE", "RevertMigration", "to DONE"),
}
MAX_POLL_S = 10.0  # a slower poll would outlast a cycle's --timeout, and its wait for a state
ACTIVE, DONE, ABORTED = (
    pb.MIGRATION_STATE_ACTIVE,
    pb.MIGRATION_STATE_DONE,
    pb.MIGRATION_STATE_ABORTED,
)


@dataclass(frozen=True)
class CoordinatorLoad:
    op: str = "list"
    live_only: bool = False
    donor: str = ""
    helper: str = ""
    start_layer: int = 1
    end_layer: int | None = None
    poll_s: float = 0.02
    rpc_timeout_s: float = 10.0
    state_timeout_s: float = 60.0  # a cycle's wait for ACTIVE, then for DONE

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"op must be one of {', '.join(OPS)}, got {self.op!r}")
        if self.op == "cycle" and not (self.donor and self.helper):
            raise ConfigError("--op cycle needs --donor and --helper (the router's worker ids)")
        if self.op == "cycle" and self.donor == self.helper:
            raise ConfigError("--donor and --helper must be two workers")
        if self.end_layer is not None and not self.start_layer < self.end_layer:
            raise ConfigError(f"need --start-layer < --end-layer, got [{self.start_layer}, "
                              f"{self.end_layer})")  # fmt: skip
        if not self.poll_s > 0:
            raise ConfigError(f"--poll-ms must be positive, got {self.poll_s * 1000:g}")
        if self.poll_s > MAX_POLL_S:
            raise ConfigError(f"--poll-ms must be at most {MAX_POLL_S * 1000:g}, got "
                              f"{self.poll_s * 1000:g}")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=OPS, default="list",
                   help="list (ListMigrations), describe (DescribeMigration), or cycle: a "
                   "layer migration started, ACTIVE, reverted and DONE (default list)")  # fmt: skip
    p.add_argument("--live-only", action="store_true", help="list: only live migrations")
    p.add_argument("--donor", default="", help="cycle: the worker whose layers move")
    p.add_argument("--helper", default="", help="cycle: the worker that runs them")
    p.add_argument("--start-layer", type=positive(int, at_most=MAX_UINT32), default=1,
                   help="cycle: first layer moved (default 1)")  # fmt: skip
    p.add_argument("--end-layer", type=positive(int, at_most=MAX_UINT32), default=None,
                   help="cycle: one past the last layer moved (default: the model's last)")  # fmt: skip
    p.add_argument("--poll-ms", type=float, default=20.0,
                   help="cycle: how often the migration's state is read (default 20)")  # fmt: skip


class CoordinatorScenario:
    sample_names: tuple[str, ...]
    grpc_service = pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name

    def __init__(
        self, target: str, load: CoordinatorLoad, rpc: RpcConfig | None = None,
        credentials: Credentials = NONE,
    ) -> None:  # fmt: skip
        self.target = target
        self.load = load
        self.credentials = credentials
        self.name = load.op
        self.sample_names = (load.op, *RPC_NAMES[load.op])
        self._rpc = credentials.rpc(Role.CLIENT, rpc)
        self._metadata = credentials.metadata
        self._channel: grpc.aio.Channel | None = None
        self._ids: list[str] = []
        self._next_id = itertools.count()

    def describe(self) -> dict:
        described = {"op": self.load.op}
        if self.load.op == "list":
            described["live_only"] = self.load.live_only
        if self.load.op == "describe":
            described["num_migrations"] = len(self._ids)
        if self.load.op == "cycle":
            described.update(
                donor=self.load.donor, helper=self.load.helper,
                layers=f"[{self.load.start_layer}, {self.load.end_layer or 'the last'})",
                poll_ms=self.load.poll_s * 1000,
            )  # fmt: skip
        return described

    async def setup(self) -> None:
        self._channel = open_channel(self.target, self._rpc)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        listed = await self._list(live_only=False)
        self._ids = [m.migration_id for m in listed.migrations]
        if self.load.op == "describe" and not self._ids:
            raise ConfigError(
                f"the coordinator at {self.target} holds no migration to describe "
                "(run --op cycle first, or --op list)"
            )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def server_state(self) -> dict:
        live = (await self._list(live_only=True)).migrations
        held = {f"{m.migration_id} {pb.MigrationState.Name(m.state)}": 1 for m in live}
        return {"num_live": len(live), "held": held}

    async def _list(self, live_only: bool) -> pb.ListMigrationsResponse:
        request = pb.ListMigrationsRequest(live_only=live_only)
        return await self._stub.ListMigrations(
            request, timeout=self.load.rpc_timeout_s, metadata=self._metadata
        )

    async def run_one(self, index: int, rec: Recorder) -> None:
        if self.load.op == "list":
            async with rec.rpc("ListMigrations") as counts:
                reply = await self._list(self.load.live_only)
                counts.num_bytes = reply.ByteSize()
        elif self.load.op == "describe":
            migration_id = self._ids[next(self._next_id) % len(self._ids)]
            async with rec.rpc("DescribeMigration"):
                await self._describe(migration_id)
        else:
            await self._cycle(rec)

    async def _describe(self, migration_id: str) -> pb.Migration:
        request = pb.DescribeMigrationRequest(migration_id=migration_id)
        reply = await self._stub.DescribeMigration(
            request, timeout=self.load.rpc_timeout_s, metadata=self._metadata
        )
        return reply.migration

    async def _cycle(self, rec: Recorder) -> None:
        load, timeout = self.load, self.load.rpc_timeout_s
        spec = pb.LayerMigrationSpec(
            donor=load.donor, helper=load.helper, start_layer=load.start_layer,
            end_layer=load.end_layer,
        )  # fmt: skip
        start = rec.clock()
        async with rec.rpc("StartMigration"):
            reply = await self._stub.StartMigration(
                pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec),
                timeout=timeout,
                metadata=self._metadata,
            )
        migration_id = reply.migration.migration_id
        try:
            await self._until(migration_id, ACTIVE)
            rec.mark("to ACTIVE", start)
            reverted = rec.clock()
            async with rec.rpc("RevertMigration"):
                request = pb.RevertMigrationRequest(migration_id=migration_id)
                await self._stub.RevertMigration(request, timeout=timeout, metadata=self._metadata)
            await self._until(migration_id, DONE)
            rec.mark("to DONE", reverted)
        except BaseException:  # a failed or cancelled cycle leaves nothing live behind it
            with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
                request = pb.AbortMigrationRequest(migration_id=migration_id, reason="loadtest")
                call = self._stub.AbortMigration(request, timeout=timeout, metadata=self._metadata)
                await asyncio.shield(call)
            raise

    async def _until(self, migration_id: str, state: int) -> None:
        deadline = asyncio.get_running_loop().time() + self.load.state_timeout_s
        while True:
            migration = await self._describe(migration_id)
            if migration.state == state:
                return
            if migration.state == ABORTED or (state == ACTIVE and migration.state == DONE):
                raise ScenarioError("ABORTED", f"{migration_id}: {migration.reason or 'ended'}")
            if asyncio.get_running_loop().time() > deadline:
                raise ScenarioError(
                    "INCOMPLETE",
                    f"{migration_id} still {pb.MigrationState.Name(migration.state)} after "
                    f"{self.load.state_timeout_s:g} s",
                )
            await asyncio.sleep(self.load.poll_s)
