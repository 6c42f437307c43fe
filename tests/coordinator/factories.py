"""Builds a coordinator over fake workers and the real Redis store (tests/coordinator)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from services.coordinator.core import Coordinator, CoordinatorConfig
from services.coordinator.store import RedisMigrationStore
from tests.coordinator.fakes import FakeClock, FakeCluster

CONFIG = CoordinatorConfig(lease_s=10.0, renew_interval_s=2.0, step_timeout_s=5.0)


@asynccontextmanager
async def coordinator(url: str, prefix: str, cluster: FakeCluster, clock: FakeClock, **kw):
    """A coordinator that has recovered from the store; closed (not aborting) on exit."""
    store = RedisMigrationStore.from_url(url, prefix)
    coord = Coordinator(store, cluster, kw.pop("config", CONFIG), clock=clock, **kw)
    await coord.recover()
    try:
        yield coord
    finally:
        await coord.close()
        await store.close()
