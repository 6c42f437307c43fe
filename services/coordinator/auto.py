"""The coordinator in automatic mode (``--auto``): follows the load, decides, acts.

``AutoMigrator.run`` loops until cancelled:

1. every ``poll_s`` the feed reads the router's ``ListWorkers`` (loadfeed.py);
2. every ``PolicyConfig.interval_s`` the policy decides (policy.py) from the feed's views and
   the coordinator's migrations, on the coordinator's clock;
3. each decision gets a ``policy.decision`` span (a trace of its own, with the utilisations it
   saw and the alternatives it rejected), current while the coordinator starts or reverts
   it, so the migration's trace links to it; then ``policy.started`` learns the migration id;
4. a refused or failed action is logged, counted (``DecisionStats``) and recorded on its
   span; the policy's cool-down already keeps its workers out of the next decisions.

A failed poll or decision is logged and the loop goes on: the coordinator still serves its
API and its live migrations whatever the automatic mode does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.common.arg_types import positive, share
from services.common.config import RpcConfig
from services.common.errors import BanaServeError, ConfigError
from services.coordinator.core import Coordinator
from services.coordinator.loadfeed import RouterLoadFeed
from services.coordinator.migration import Migration
from services.coordinator.policy import (
    ActionKind,
    Decision,
    Outcome,
    Policy,
    PolicyConfig,
    Utilisation,
    WorkerView,
)
from services.coordinator.ports import Workers

log = logging.getLogger(__name__)


class LoadFeed(Protocol):
    async def poll(self) -> None: ...

    def views(self) -> list[WorkerView]: ...


@dataclass
class DecisionStats:
    """What the metrics endpoint reads (services/common/metrics.py, AutoMigrationCollector)."""

    num_decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, result)
    num_rejected: int = 0
    num_ticks: int = 0
    utilisations: Mapping[str, Utilisation] = field(default_factory=dict)
    last_decision_at: float = 0.0

    def count(self, kind: ActionKind, result: str) -> None:
        key = (kind.value, result)
        self.num_decisions[key] = self.num_decisions.get(key, 0) + 1

    @property
    def gap(self) -> float:
        values = [u.value for u in self.utilisations.values()]
        return max(values) - min(values) if len(values) > 1 else 0.0


def _brief(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def decision_attributes(d: Decision) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "decision.kind": d.kind.value,
        "decision.donor": d.donor,
        "decision.helper": d.helper,
        "decision.gap": d.gap,
        "decision.predicted_max": d.predicted_max,
        "decision.estimated_time_s": d.estimated_time_s,
        "decision.reason": d.reason,
        "decision.rejected": [f"{r.alternative}: {r.reason}" for r in d.rejected],
    }
    if d.kind is ActionKind.LAYERS:
        attributes["decision.layers.start"] = d.start_layer
        attributes["decision.layers.end"] = d.end_layer
    elif d.kind is ActionKind.ATTENTION:
        attributes["decision.num_blocks"] = d.num_blocks
    else:
        attributes["decision.migration_id"] = d.migration_id
    for worker, u in sorted(d.utilisations.items()):
        attributes[f"utilisation.{worker}.compute"] = u.compute
        attributes[f"utilisation.{worker}.memory"] = u.memory
    return attributes


class AutoMigrator:
    def __init__(
        self,
        coordinator: Coordinator,
        feed: LoadFeed,
        policy: Policy,
        tracer: trace.Tracer | None = None,
        poll_s: float = 0.25,
    ) -> None:
        self._coordinator = coordinator
        self._feed = feed
        self._policy = policy
        self._tracer = tracer or trace.get_tracer(__name__)
        self._poll_s = poll_s
        self.stats = DecisionStats()

    async def run(self) -> None:
        next_decision = -math.inf
        loop = asyncio.get_running_loop()
        failing = 0  # polls or decisions failed in a row: logged once, then when it recovers
        while True:
            try:
                await self._feed.poll()
                if loop.time() >= next_decision:
                    next_decision = loop.time() + self._policy.config.interval_s
                    await self.step()
                if failing:
                    log.info("automatic mode: going again after %d failed polls", failing)
                failing = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the router may be away for a while: try again next poll
                failing += 1
                if failing > 1:
                    log.debug("automatic mode: poll or decision failed", exc_info=True)
                elif isinstance(exc, grpc.aio.AioRpcError | BanaServeError):  # a peer away
                    log.warning("automatic mode: poll or decision failed (said again once it "
                                "works): %s", _brief(exc))  # fmt: skip
                else:  # a bug: its traceback
                    log.exception("automatic mode: poll or decision failed (again: not logged)")
            await asyncio.sleep(self._poll_s)

    async def step(self) -> Outcome:
        """One decision on what the feed holds now, acted on."""
        now = self._coordinator.now()
        outcome = self._policy.decide(now, self._feed.views(), self._coordinator.list())
        self.stats.num_ticks += 1
        self.stats.utilisations = outcome.utilisations
        self.stats.num_rejected += len(outcome.rejected)
        for d in outcome.decisions:
            self.stats.last_decision_at = now
            self.stats.num_rejected += len(d.rejected)
            await self._act(d)
        return outcome

    async def _act(self, d: Decision) -> None:
        if self._coordinator.draining:  # stopping: the restarted coordinator decides again
            self.stats.count(d.kind, "refused")
            log.info("automatic: %s not acted on: the coordinator is stopping", d.describe())
            return
        log.info("automatic: %s (%s)", d.describe(), d.reason)
        span = self._tracer.start_span(
            "policy.decision", context=otel_context.Context(), attributes=decision_attributes(d)
        )
        try:
            with trace.use_span(span, end_on_exit=False):
                m = await self._execute(d)
        except Exception as exc:
            self.stats.count(d.kind, "refused")
            log.warning("automatic: %s refused: %s", d.describe(), exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        else:
            self.stats.count(d.kind, "started")
            span.set_attribute("decision.migration_id", m.migration_id)
            if d.kind is not ActionKind.REVERT:
                self._policy.started(d, m.migration_id)
        finally:
            span.end()

    async def _execute(self, d: Decision) -> Migration:
        c, cfg = self._coordinator, self._policy.config
        if d.kind is ActionKind.REVERT:
            return await c.revert(d.migration_id)
        if d.kind is ActionKind.LAYERS:
            micro = cfg.micro_batches_for(self._feed.is_prefill(d.donor))
            return await c.start_layers(
                d.donor, d.helper, d.start_layer, d.end_layer, micro, cfg.drop_weights,
                automatic=True,
            )  # fmt: skip
        return await c.start_attention(
            d.donor, d.helper, max_sequences=self._sequences_for(d),
            refill=cfg.attention_refill, automatic=True,
        )  # fmt: skip

    def _sequences_for(self, d: Decision) -> int:
        """The decision's blocks as the donor's longest sequences (each holds the mean)."""
        latest = [s.report for v in self._feed.views() if v.worker_id == d.donor for s in v.samples]
        if not latest or not latest[-1].num_running_seqs:
            return 1
        per_sequence = max(1, latest[-1].num_blocks_used // latest[-1].num_running_seqs)
        return max(1, d.num_blocks // per_sequence)


# -- wiring (python -m services.coordinator --auto) -------------------------------------------


def add_auto_arguments(p: argparse.ArgumentParser) -> None:
    """``--auto`` and one flag per ``PolicyConfig`` field (``--gap-high 0.5``...)."""
    g = p.add_argument_group("automatic mode (docs/coordinator.md, the policy)")
    g.add_argument("--auto", action="store_true", help="migrate on load, on its own")
    g.add_argument(
        "--layer-share",
        type=share,
        default=None,
        help="measured share of a step one decoder layer takes (default: (1 - head share) / L)",
    )
    g.add_argument(
        "--no-prefill-donors",
        dest="prefill_donors",
        action="store_false",
        help="only decode and mixed workers donate layers (default: prefill workers too)",
    )
    g.add_argument(
        "--poll-interval", type=positive(float), default=0.25, metavar="S", help="ListWorkers"
    )
    for f in dataclasses.fields(PolicyConfig):
        flag = "--" + f.name.replace("_", "-")
        dest, doc = f"policy_{f.name}", f"PolicyConfig.{f.name}"
        if isinstance(f.default, bool):
            g.add_argument(flag, action="store_true", dest=dest, help=doc)
        else:
            kind = type(f.default)
            doc += f" (default {f.default})"
            g.add_argument(flag, type=kind, default=f.default, dest=dest, metavar="X", help=doc)


def check_auto_arguments(args: argparse.Namespace) -> None:
    """With ``--auto``: its flags make a valid policy and name the router; without it, none of
    them is given (session 40's probe: ``--gap-high -1`` was taken and never used). Checked
    before the coordinator builds its server (ConfigError: one error line, exit status 2)."""
    if args.auto:
        if not args.router:
            raise ConfigError("--auto needs --router (the load reports)")
        policy_config(args)
        return
    own = argparse.ArgumentParser(add_help=False)
    add_auto_arguments(own)
    given = [
        a.option_strings[0]
        for a in own._actions
        if a.dest != "auto" and getattr(args, a.dest, a.default) != a.default
    ]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --auto (the automatic mode's flags)")


def policy_config(args: argparse.Namespace) -> PolicyConfig:
    return PolicyConfig(
        **{f.name: getattr(args, f"policy_{f.name}") for f in dataclasses.fields(PolicyConfig)}
    )


@contextlib.asynccontextmanager
async def automatic(
    args: argparse.Namespace,
    coordinator: Coordinator,
    workers: Workers,
    rpc: RpcConfig,
    tracer: trace.Tracer,
) -> AsyncIterator[AutoMigrator | None]:
    """Runs the automatic mode while the block runs, with ``--auto`` (else yields None)."""
    if not args.auto:
        yield None
        return
    check_auto_arguments(args)
    feed = RouterLoadFeed(
        args.router, rpc, workers, coordinator.now, prefill_donors=args.prefill_donors
    )
    policy = Policy(policy_config(args), args.layer_share)
    auto = AutoMigrator(coordinator, feed, policy, tracer, args.poll_interval)
    task = asyncio.ensure_future(auto.run())
    try:
        yield auto
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await feed.close()
