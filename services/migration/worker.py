"""Wiring a worker for layer migration: flags, config, and the agent's life on the worker.

A worker's ``__main__`` (prefill, decode, mixed) adds the flags with ``add_migration_args``,
then ``runtime = await start_migration(args, worker, host)`` before its gRPC server starts
(``runtime.service`` goes into ``start_server``'s list), ``await runtime.serve(server, worker,
reporter)`` until it stops, and ``await runtime.stop()`` on the way out. The worker only has to
offer ``engine_call`` (fn runs on the engine thread between steps) and ``engine`` (whose
snapshot the agent reads), and to serve: ``died`` and ``holds_work``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.arg_types import host_port, port_number
from services.common.errors import ConfigError
from services.engine.engine import Engine
from services.migration.agent import MigrationAgent
from services.migration.records import AgentConfig
from services.migration.servicer import migration_service
from services.rpc import dataplane
from services.rpc.load_reports import LoadReporter, serve_while_alive
from services.rpc.server import RunningServer, Service

NO_MIGRATION = "none"


class EngineWorker(Protocol):
    engine: Engine

    async def engine_call(self, fn: Any) -> Any: ...


class ServingWorker(Protocol):
    died: asyncio.Future[BaseException] | None

    def holds_work(self) -> bool: ...


def add_migration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("layer migration (MigrationWorkerService)")
    group.add_argument(
        "--migration-transport",
        choices=(*dataplane.KINDS, NO_MIGRATION),
        default="tcp",
        help="data plane this worker serves hosted layers on; none: it never helps",
    )
    group.add_argument(
        "--migration-lease",
        type=float,
        default=AgentConfig.default_lease_s,
        help="seconds a migration lives here without a coordinator call",
    )
    group.add_argument("--migration-max-lease", type=float, default=AgentConfig.max_lease_s)
    group.add_argument(
        "--migration-data-port",
        type=port_number,
        default=0,
        help="the migration data plane's port (0: the OS picks)",
    )
    group.add_argument(
        "--advertise-migration-data",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="the address donors are told to reach this worker's migration data plane at, "
        "when something in between forwards it (default: the address it binds)",
    )


def migration_config(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(default_lease_s=args.migration_lease, max_lease_s=args.migration_max_lease)


@dataclass
class MigrationRuntime:
    agent: MigrationAgent
    service: Service
    task: asyncio.Task[None]

    async def serve(
        self, server: RunningServer, worker: ServingWorker, reporter: LoadReporter | None
    ) -> BaseException | None:
        """``serve_while_alive`` for the worker this agent runs on: its drain also waits for the
        migrations held here, which the coordinator ends once told (agent.py)."""
        assert worker.died is not None  # set by the worker's start()
        return await serve_while_alive(
            server,
            worker.died,
            reporter,
            lambda: worker.holds_work() or self.agent.holds_migrations(),
            begin_drain=self.agent.begin_drain,
        )

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.agent.close()


async def start_migration(
    args: argparse.Namespace, worker: EngineWorker, host: str = "127.0.0.1", donor_refusal: str = ""
) -> MigrationRuntime:
    """``donor_refusal``: why this worker can never be a donor (empty: it can)."""
    kind = "" if args.migration_transport == NO_MIGRATION else args.migration_transport
    if not kind and (args.migration_data_port or args.advertise_migration_data):
        raise ConfigError(
            "--migration-data-port and --advertise-migration-data need a migration data plane "
            "(--migration-transport none)"
        )
    engine = worker.engine
    agent = MigrationAgent(
        worker.engine_call,
        lambda: engine.snapshot,
        migration_config(args),
        data_kind=kind,
        donor_refusal=donor_refusal,
    )
    await agent.serve_data(host, args.migration_data_port, args.advertise_migration_data)
    task = asyncio.get_running_loop().create_task(agent.run())
    return MigrationRuntime(agent, migration_service(agent), task)
