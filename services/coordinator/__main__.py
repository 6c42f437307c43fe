"""``python -m services.coordinator``: flags -> Redis store, router, coordinator, gRPC -> serve.

1. connects to Redis (fails at once if it does not answer), owns its ``--key-prefix`` (waits
   while another coordinator does: ``ownership.py``), and loads every migration, picking the
   live ones up again (core.Coordinator.recover);
2. serves CoordinatorService and prints ``LISTENING HOST:PORT``;
3. renews the workers' leases every ``--renew-interval`` seconds while it serves;
4. on SIGTERM/SIGINT drains (``drain_for``: the migrations of workers stopping too are
   reverted first, as when a whole cluster is torn down at once), then stops its tasks
   WITHOUT aborting the other live migrations: a coordinator started again on the same Redis
   (within the lease) carries on with them, and releases its prefix;
5. another coordinator took its prefix over (``Ownership.keep``): it acts on nothing more,
   stops, and exits 2 naming that coordinator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time

from opentelemetry import trace

from services.common.arg_types import optional_host_port, port_number, redis_url
from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.common.fencing import ANNOUNCE_INTERVAL_S
from services.common.logs import add_logging_args
from services.common.metrics import AutoMigrationCollector, CoordinatorCollector
from services.common.metrics_endpoint import add_metrics_args, start_metrics
from services.common.network import add_host_args, resolve_host
from services.coordinator.auto import add_auto_arguments, automatic, check_auto_arguments
from services.coordinator.clients import RouterWorkers
from services.coordinator.core import Coordinator, CoordinatorConfig
from services.coordinator.ownership import Ownership
from services.coordinator.servicer import coordinator_service
from services.coordinator.store import DEFAULT_PREFIX, RedisMigrationStore
from services.rpc.security import Role, add_security_args, security_config
from services.rpc.server import (
    Drain,
    RunningServer,
    add_drain_args,
    run_service,
    start_server,
)
from services.rpc.tracing import add_tracing_args, setup_tracing, tracing_config

log = logging.getLogger("services.coordinator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    defaults = CoordinatorConfig()
    p = argparse.ArgumentParser(prog="python -m services.coordinator", description=__doc__)
    p.add_argument(
        "--port", type=port_number, default=0, help="CoordinatorService port; 0: the OS picks"
    )
    p.add_argument(
        "--redis", type=redis_url, default=env("BANASERVE_REDIS", "redis://127.0.0.1:6379/0")
    )
    p.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="Redis key namespace")
    p.add_argument(
        "--router",
        type=optional_host_port,
        default="",
        metavar="HOST:PORT",
        help="finds the workers (ListWorkers)",
    )
    p.add_argument("--lease", type=float, default=defaults.lease_s, metavar="S")
    p.add_argument("--renew-interval", type=float, default=defaults.renew_interval_s, metavar="S")
    p.add_argument("--step-timeout", type=float, default=defaults.step_timeout_s, metavar="S")
    p.add_argument("--copy-rounds", type=int, default=defaults.copy_rounds, help="at most")
    p.add_argument(
        "--copy-converged-bytes",
        type=int,
        default=defaults.copy_converged_bytes,
        metavar="N",
        help="a copy round that moved at most N bytes is the last (default 16 MiB)",
    )
    p.add_argument(
        "--keep-ended",
        type=int,
        default=defaults.keep_ended,
        metavar="N",
        help="ended migrations kept, the newest (default %(default)s)",
    )
    add_tracing_args(p)
    add_logging_args(p)
    add_security_args(p)
    add_host_args(p)
    add_drain_args(p)
    add_metrics_args(p)
    add_auto_arguments(p)
    return p.parse_args(argv)


def coordinator_config(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        lease_s=args.lease,
        renew_interval_s=args.renew_interval,
        step_timeout_s=args.step_timeout,
        copy_rounds=args.copy_rounds,
        copy_converged_bytes=args.copy_converged_bytes,
        keep_ended=args.keep_ended,
    )


async def renew_forever(coordinator: Coordinator, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await coordinator.renew_leases()
        except Exception:  # a bug here must not end renewals for every other migration
            log.exception("lease renewal failed")


async def announce_forever(workers: RouterWorkers, interval_s: float) -> None:
    """Tells every worker this coordinator's epoch every ``interval_s`` (``serve`` told them
    once before it served), so that new, restarted and not-yet-told workers refuse an older
    coordinator too."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await workers.announce()
        except Exception:  # a bug here must not end the announcements
            log.exception("announcing the coordinator's epoch failed")


async def stop_when_lost(
    ownership: Ownership,
    coordinator: Coordinator,
    server: RunningServer,
    tasks: tuple[asyncio.Future[None], ...],
    lost: list[str],
) -> None:
    """Once another coordinator holds the prefix: no more commands (UNAVAILABLE), automatic
    decisions, lease renewals or announcements from this one (``tasks``), and its server stops
    (``serve`` exits 2)."""
    lost.append(await ownership.keep())
    log.error("another coordinator (%s) took %s over: stopping", lost[0], ownership.prefix)
    coordinator.draining = True
    for task in tasks:
        task.cancel()
    await server.stop(grace_s=1.0)


def drain_for(coordinator: Coordinator) -> Drain:
    """The coordinator's drain (core.Coordinator.drain); its calls left get the rest."""

    async def drain(grace_s: float) -> float:
        start = time.monotonic()
        await coordinator.drain(grace_s)
        return max(0.0, grace_s - (time.monotonic() - start))

    return drain


async def serve(args: argparse.Namespace) -> None:
    config = coordinator_config(args)
    check_auto_arguments(args)  # every setting before the server exists (none left to stop)
    tracing = setup_tracing(tracing_config(args, "coordinator"))
    security = security_config(args, Role.COORDINATOR)
    rpc = RpcConfig(
        host=resolve_host(args.host),
        port=args.port,
        security=security,
        grace_s=args.drain_timeout,
    )
    password = security.redis_password if security is not None else ""
    store = RedisMigrationStore.from_url(args.redis, args.key_prefix, password)
    ownership = Ownership(store.redis, args.key_prefix)
    store.guard(ownership.key, ownership.token)  # nothing written once another owns the prefix
    # every call to a worker carries the claim's epoch: a worker refuses an older owner's
    workers = RouterWorkers(args.router, rpc, tracing, epoch=lambda: ownership.epoch)
    tracer = trace.get_tracer("services.coordinator", tracer_provider=tracing.provider)
    coordinator = Coordinator(store, workers, config, tracer=tracer)
    lost: list[str] = []  # who took the prefix over
    try:
        await ownership.acquire()  # waits for Redis, and for another coordinator of the prefix
        await workers.announce()  # before it acts: every worker refuses the older owner now
        await coordinator.recover()
        server = await start_server([coordinator_service(coordinator)], rpc, tracing=tracing)
        renewals = asyncio.ensure_future(renew_forever(coordinator, config.renew_interval_s))
        announcing = asyncio.ensure_future(announce_forever(workers, ANNOUNCE_INTERVAL_S))
        kept = asyncio.ensure_future(
            stop_when_lost(ownership, coordinator, server, (renewals, announcing), lost)
        )
        try:
            async with automatic(args, coordinator, workers, rpc, tracer) as auto:
                collectors = [CoordinatorCollector(coordinator)]
                if auto is not None:
                    collectors.append(AutoMigrationCollector(auto.stats))
                    coordinator.auto_stats = auto.stats
                await start_metrics(args, rpc.host, *collectors, security=security)
                print(f"LISTENING {server.address}", flush=True)
                live = len(coordinator.list(live_only=True))
                mode = ", automatic mode" if auto is not None else ""
                log.info(
                    "router %s, redis %s, %d live migrations%s",
                    args.router or "-", args.redis, live, mode,
                )  # fmt: skip
                await server.serve_until_signal(drain=drain_for(coordinator))
        finally:
            for task in (kept, renewals, announcing):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if lost:
            raise ConfigError(
                f"another coordinator ({lost[0]}) took {args.key_prefix} over, so this one "
                "stopped: one coordinator per --key-prefix"
            )
        await ownership.release()
    finally:
        await coordinator.close()
        await workers.close()
        await store.close()
        tracing.shutdown()


def main(argv: list[str] | None = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
