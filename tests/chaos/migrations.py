"""Migrations driven through the coordinator for the chaos cases: a layer migration (layers
``[START_LAYER, L)``) or an attention migration (up to ``ATTENTION_SEQUENCES`` of the longest
sequences, kept filled), decode → prefill under load, brought to a state, and ended (reverted
or seen aborted) afterwards. Every call tolerates a coordinator that is down or restarting (it
comes back on its port)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.gen.banaserve.v1 import coordinator_pb2_grpc

T = TypeVar("T")
START_LAYER = 2
ATTENTION_SEQUENCES = 4
TERMINAL = {pb.MIGRATION_STATE_DONE, pb.MIGRATION_STATE_ABORTED}
IN_TRANSIT = {pb.MIGRATION_STATE_PLANNED, pb.MIGRATION_STATE_COPYING, pb.MIGRATION_STATE_SWITCHING}


def state_name(state: int) -> str:
    return pb.MigrationState.Name(state).removeprefix("MIGRATION_STATE_")


class Migrations:
    def __init__(self, address: Callable[[], str]) -> None:
        self._address = address

    def _call(self, fn: Callable[[coordinator_pb2_grpc.CoordinatorServiceStub], T]) -> T:
        with grpc.insecure_channel(self._address()) as channel:
            return fn(coordinator_pb2_grpc.CoordinatorServiceStub(channel))

    def start(
        self, donor: str, helper: str, attention: bool = False, within_s: float = 10.0
    ) -> str:
        """Retries UNAVAILABLE (a worker restarted a moment ago: the coordinator's channel to
        it tries again within a second) for ``within_s``."""
        if attention:
            spec = pb.AttentionMigrationSpec(
                donor=donor, helper=helper, max_sequences=ATTENTION_SEQUENCES, refill=True
            )
            request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_ATTENTION, attention=spec)
        else:
            layers = pb.LayerMigrationSpec(donor=donor, helper=helper, start_layer=START_LAYER)
            request = pb.StartMigrationRequest(kind=pb.MIGRATION_KIND_LAYERS, layers=layers)
        deadline = time.monotonic() + within_s
        while True:
            try:
                reply = self._call(lambda s: s.StartMigration(request, timeout=10))
                return reply.migration.migration_id
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def describe(self, mid: str) -> pb.Migration | None:
        """None while the coordinator does not answer (down, restarting)."""
        request = pb.DescribeMigrationRequest(migration_id=mid)
        try:
            return self._call(lambda s: s.DescribeMigration(request, timeout=5)).migration
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise
            return None

    def revert(self, mid: str) -> None:
        request = pb.RevertMigrationRequest(migration_id=mid)
        self._call(lambda s: s.RevertMigration(request, timeout=30))

    def wait(self, mid: str, done: Callable[[pb.Migration], bool], within_s: float) -> pb.Migration:
        deadline = time.monotonic() + within_s
        while True:
            m = self.describe(mid)
            if m is not None and done(m):
                return m
            if time.monotonic() > deadline:
                seen = state_name(m.state) if m is not None else "no answer"
                raise AssertionError(f"{mid}: still {seen} after {within_s:g} s")
            time.sleep(0.05)

    def settled(self, mid: str, within_s: float = 60.0) -> pb.Migration:
        """ACTIVE, DONE or ABORTED (not in PLANNED, COPYING or SWITCHING)."""
        return self.wait(mid, lambda m: m.state not in IN_TRANSIT, within_s)

    def end(self, mid: str, within_s: float = 90.0) -> pb.Migration:
        """Waits for the migration to settle; reverts it if ACTIVE; its final record."""
        deadline = time.monotonic() + within_s
        m = self.settled(mid, within_s)
        while m.state == pb.MIGRATION_STATE_ACTIVE:
            try:
                self.revert(mid)
            except grpc.RpcError as exc:
                # UNAVAILABLE: the coordinator is stopping or down; CANCELLED: the revert raced
                # its server's stop (gRPC cancels a call that meets the GOAWAY), and may or may
                # not have been taken: the next try says (FAILED_PRECONDITION once it was).
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    raise
                time.sleep(0.1)
            m = self.settled(mid, max(1.0, deadline - time.monotonic()))
        return self.wait(mid, lambda m: m.state in TERMINAL, max(1.0, deadline - time.monotonic()))
