"""One simulated run of one workload in one mode, summarised as ``bench compare`` summarises a
real one (``bench.serve_report.summarise`` and ``bench.compare_report.row``)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace

from bench.compare_report import row
from bench.serve_report import summarise
from bench.workloads_synthetic import PlannedRequest
from services.coordinator.auto import add_auto_arguments, policy_config
from services.coordinator.policy import PolicyConfig
from services.launcher import Mode
from services.sim.cluster import SimCluster, SimSpec
from services.sim.profile import Profile
from services.sim.requests import SimRequest, from_plan


@dataclass(frozen=True)
class RunOutcome:
    row: dict  # compare_report.row's keys
    summary: dict
    migrations: dict
    samples: list[dict]
    wall_s: float
    num_events: int
    sim_s: float
    num_store_hit_tokens: int = 0  # prompt tokens fetched from banaserve's KV store
    num_local_prefills: int = 0  # PD requests a decode worker prefilled (the router's rule)
    # Each failure status's first message (``summary["failures"]`` counts them): why requests
    # failed, e.g. one larger than any worker's KV pool, so a report can say so.
    failure_messages: dict[str, str] = field(default_factory=dict)


def coordinator_policy(coordinator_args: list[str]) -> tuple[PolicyConfig, float | None, bool]:
    """The policy a coordinator started with these flags runs (the coordinator's own parser)."""
    p = argparse.ArgumentParser()
    add_auto_arguments(p)
    args, _ = p.parse_known_args(coordinator_args)
    return policy_config(args), args.layer_share, args.prefill_donors


@dataclass(frozen=True)
class Job:
    """One workload of a run: its plan and SLO (``bench compare``'s ``Job``)."""

    workload: str
    planned: list[PlannedRequest]
    slo: tuple[float, float]


def simulate(
    spec: SimSpec,
    profile: Profile,
    planned: list[PlannedRequest],
    workload: str,
    slo: tuple[float, float],
) -> RunOutcome:
    """One workload on a fresh cluster."""
    return simulate_sequence(spec, profile, [Job(workload, planned, slo)])[0]


def simulate_sequence(
    spec: SimSpec, profile: Profile, jobs: list[Job], settle_s: float = 0.0
) -> list[RunOutcome]:
    """``jobs`` one after another on one cluster, as ``bench compare`` runs a mode's workloads:
    each sent from when the one before ended (all done or its deadline) and the cluster
    settled (no work, no live migration; at most ``settle_s``). Prefix caches, queues and
    migrations carry over, as they do on the real cluster."""
    cluster = SimCluster(spec, profile)
    outcomes = []
    for i, job in enumerate(jobs):
        started = time.perf_counter()
        events_before = cluster.loop.num_events
        hits_before = cluster.num_store_hit_tokens
        local_before = cluster.num_local_prefills
        start = cluster.loop.now
        requests = cluster.run(from_plan(job.planned, start, f"{i}-{job.workload}-"), start)
        end = cluster.loop.now
        cluster.settle(settle_s)  # migrations meanwhile count for this run, as the watcher's
        records = [r.record() for r in requests]
        summary = summarise(records, *job.slo)
        migrations = (
            cluster.migrations.count(since_s=start)
            if cluster.migrations is not None
            else {"num_started": 0, "num_activated": 0, "num_reverted": 0, "num_aborted": 0}
        )
        run = {"workload": job.workload, "mode": spec.mode.value, "summary": summary,
               "migrations": migrations}  # fmt: skip
        outcomes.append(RunOutcome(row(run), summary, migrations, list(cluster.samples),
                                   time.perf_counter() - started,
                                   cluster.loop.num_events - events_before,
                                   end - start,
                                   cluster.num_store_hit_tokens - hits_before,
                                   cluster.num_local_prefills - local_before,
                                   failure_messages(requests)))  # fmt: skip
    return outcomes


def failure_messages(requests: list[SimRequest]) -> dict[str, str]:
    """Each failure status's first message, in the order the statuses first occur."""
    out: dict[str, str] = {}
    for r in requests:
        if r.status != "OK":
            out.setdefault(r.status, r.message)
    return out


def spec_for(mode: Mode, num_workers: int, num_prefill: int | None, base: SimSpec) -> SimSpec:
    return replace(base, mode=mode, num_workers=num_workers, num_prefill=num_prefill)
