"""The cluster side of ``banaserve bench migration`` (steps 3-5 of bench/migration_bench.py):
the loads, and migrations started, followed and reverted through the coordinator's gRPC API.

Every event is stamped on ``time.perf_counter``'s clock, the one ``bench.migration_load``
stamps deltas on. A migration is followed by polling ``DescribeMigration`` every
``POLL_S``; ``ACTIVE`` is taken as seen at the first poll that shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

import grpc

from bench.migration_load import (
    Stream,
    decode_window,
    full_batch_window,
    max_gap,
    prefill_figures,
    prompts,
    send_all,
)
from services.client.client import AsyncBanaServeClient
from services.launcher import LocalCluster
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc

POLL_S = 0.01
SETTLED = (pb.MIGRATION_STATE_ACTIVE, pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED)
ENDED = (pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED)
VARIANTS = ("baseline", "migrated")


def seconds(m: pb.Migration, name: str) -> float | None:
    """A Duration field in seconds; None when this build's Migration has no such field."""
    if name not in m.DESCRIPTOR.fields_by_name:
        return None
    return getattr(m, name).ToNanoseconds() / 1e9


def count(m: pb.Migration, name: str) -> int | None:
    return getattr(m, name) if name in m.DESCRIPTOR.fields_by_name else None


def summary(active: pb.Migration, ended: pb.Migration) -> dict:
    """The figures of one migration: the split up to ACTIVE, and how it ended."""
    timings = {pb.MigrationState.Name(t.state)[16:]: t.duration.ToNanoseconds() / 1e9
               for t in active.timings}  # fmt: skip
    return {
        "id": ended.migration_id,
        "layers": [ended.start_layer, ended.end_layer],
        "num_micro_batches": ended.num_micro_batches,
        "reached_active": active.state == pb.MIGRATION_STATE_ACTIVE,
        "state": pb.MigrationState.Name(ended.state)[16:],
        "reason": ended.reason or active.reason,
        "weights_skipped": active.weights_skipped,
        "num_weight_bytes": active.num_weight_bytes,
        "num_kv_bytes_before_active": active.num_kv_bytes,
        "bytes_before_active": active.num_weight_bytes + active.num_kv_bytes,
        "num_copy_kv_bytes": count(active, "num_copy_kv_bytes"),
        "num_switch_kv_bytes": count(active, "num_switch_kv_bytes"),
        "weights_s": seconds(active, "weights_duration"),
        "kv_copy_s": seconds(active, "kv_copy_duration"),
        "num_sequences": active.num_sequences,
        "num_requeued": ended.num_requeued,
        "switch_pause_s": active.switch_pause.ToNanoseconds() / 1e9,
        "copying_s": timings.get("COPYING"),
        "switching_s": timings.get("SWITCHING"),
        "to_active_s": (timings.get("COPYING") or 0.0) + (timings.get("SWITCHING") or 0.0),
        "num_kv_bytes_total": ended.num_kv_bytes,
    }


def not_reverted(migration: dict | None) -> dict | None:
    """A migrated run whose migration did not end DONE (reverted after the load) has no
    figures: it ended before ACTIVE, or a worker or lease ended it while the load ran."""
    if migration is None or migration["state"] == "DONE":
        return None
    when = "" if migration["reached_active"] else " before ACTIVE"
    return {"failed": [f"the migration ended {migration['state']}{when}: {migration['reason']}"]}


class ClusterBench:
    def __init__(self, cluster: LocalCluster, args: argparse.Namespace, costs: dict) -> None:
        self.cluster, self.args, self.costs = cluster, args, costs
        self.ids: dict[str, str] = {}

    async def run(self) -> dict:
        async with (
            AsyncBanaServeClient(self.cluster.router.address) as self.client,
            grpc.aio.insecure_channel(self.cluster.child("coordinator").address) as channel,
        ):
            self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            by_address = {w.address: w.worker_id for w in await self.client.list_workers()}
            for role in ("prefill", "decode"):
                self.ids[role] = by_address[self.cluster.child(f"{role}-0").address]
            t_sync = await self.idle_migration()
            decode = await self.alternate(self.decode_run)
            prefill = await self.alternate(self.prefill_run) if self.args.prefill_load else None
        return {"t_sync": t_sync, "decode": decode, "prefill": prefill}

    # -- migrations -----------------------------------------------------------------------

    async def describe(self, mid: str) -> pb.Migration:
        request = pb.DescribeMigrationRequest(migration_id=mid)
        return (await self.stub.DescribeMigration(request, timeout=10)).migration

    async def until(self, mid: str, states: tuple[int, ...]) -> pb.Migration:
        deadline = time.perf_counter() + self.args.timeout
        while (m := await self.describe(mid)).state not in states:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{mid} stayed {pb.MigrationState.Name(m.state)}")
            await asyncio.sleep(POLL_S)
        return m

    async def start(self, donor_role: str, k: int) -> str:
        helper_role = "prefill" if donor_role == "decode" else "decode"
        spec = pb.LayerMigrationSpec(
            donor=self.ids[donor_role], helper=self.ids[helper_role], start_layer=k,
            num_micro_batches=self.args.micro_batches,
        )  # fmt: skip
        request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=spec)
        return (await self.stub.StartMigration(request, timeout=30)).migration.migration_id

    async def end(self, mid: str, active: pb.Migration) -> dict:
        """Reverts an ACTIVE migration (an ended one stays as it is); its summary."""
        if active.state == pb.MIGRATION_STATE_ACTIVE:
            request = pb.RevertMigrationRequest(migration_id=mid)
            try:
                await self.stub.RevertMigration(request, timeout=30)
            except grpc.aio.AioRpcError as e:  # it ended since (a worker died, a lease ran out)
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
        return summary(active, await self.until(mid, ENDED))

    async def idle_migration(self, times: int = 3) -> dict:
        """T_sync: the decode worker's [k, L) moved with nothing to copy, then back; the run
        with the median time to ACTIVE of ``times``, with every run's time."""
        await self.idle()
        runs = []
        for _ in range(times):
            mid = await self.start("decode", self.costs["decode"]["k"])
            runs.append(await self.end(mid, await self.until(mid, SETTLED)))
        runs.sort(key=lambda r: r["to_active_s"])
        return runs[len(runs) // 2] | {"to_active_samples_s": [r["to_active_s"] for r in runs]}

    # -- loads ----------------------------------------------------------------------------

    async def alternate(self, run: Callable) -> dict:
        """``--rounds`` of both variants, the first of each round alternating (ABBA...)."""
        runs = []
        for r in range(self.args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                await self.idle()
                runs.append(await run(variant, r) | {"variant": variant, "round": r})
        return {"runs": runs}

    async def idle(self) -> None:
        """Until no worker reports a running sequence or a used block (reports every 0.1 s)."""
        deadline = time.perf_counter() + self.args.timeout
        while any(w.num_running_seqs or w.num_kv_blocks_used
                  for w in await self.client.list_workers()):  # fmt: skip
            if time.perf_counter() > deadline:
                raise TimeoutError("the cluster did not go idle")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # one more report interval: nothing in flight

    async def decode_run(self, variant: str, r: int) -> dict:
        a = self.args
        batch = prompts(a.decode_concurrency, a.decode_input_len, a.seed + r, a.vocab_range)
        records, tasks = send_all(self.client, batch, a.decode_output_len, a.timeout)
        await self.all_streaming(records, tasks)
        migration, started_at, active_at = None, None, None
        if variant == "migrated":
            started_at = time.perf_counter()
            mid = await self.start("decode", self.costs["decode"]["k"])
            active = await self.until(mid, SETTLED)
            active_at = time.perf_counter()
        window_start = time.perf_counter()
        streams = [await t for t in tasks]
        if variant == "migrated":
            migration = await self.end(mid, active)
        figures = self.checked(streams) or self.decode_figures(streams, window_start)
        if (failed := not_reverted(migration)) is not None:
            figures = failed
        if migration is not None:
            gap = max_gap(streams, started_at, active_at)
            migration |= {"requests_max_gap_s": gap, "start_to_active_s": active_at - started_at}
        return figures | {"migration": migration}

    async def prefill_run(self, variant: str, r: int) -> dict:
        a = self.args
        migration, active = None, None
        if variant == "migrated":
            mid = await self.start("prefill", self.costs["prefill"]["k"])
            active = await self.until(mid, SETTLED)
            if active.state != pb.MIGRATION_STATE_ACTIVE:
                return {"migration": await self.end(mid, active), "unavailable": active.reason}
        seed = a.seed + 1000 + r
        batch = prompts(a.prefill_requests, a.prefill_input_len, seed, a.vocab_range)
        _, tasks = send_all(self.client, batch, a.prefill_output_len, a.timeout)
        streams = [await t for t in tasks]
        if variant == "migrated":
            migration = await self.end(mid, active)
        figures = self.checked(streams) or not_reverted(migration) or prefill_figures(streams)
        return figures | {"migration": migration}

    async def all_streaming(self, records: list[Stream], tasks: list[asyncio.Task]) -> None:
        """Until every request has its first token (or ended): the batch decodes whole."""
        deadline = time.perf_counter() + self.args.timeout
        while not all(r.chunks or t.done() for r, t in zip(records, tasks, strict=True)):
            if time.perf_counter() > deadline:
                raise TimeoutError("requests did not start")
            await asyncio.sleep(POLL_S)

    @staticmethod
    def decode_figures(streams: list[Stream], window_start: float) -> dict:
        start, end = full_batch_window(streams, window_start)
        if end <= start:
            return {"failed": ["a request ended before the window opened: raise the output len"]}
        return decode_window(streams, start, end)

    @staticmethod
    def checked(streams: list[Stream]) -> dict | None:
        failed = [s.error for s in streams if s.error]
        return {"failed": failed} if failed else None
