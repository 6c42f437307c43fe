"""Chaos under load (issue 16, item 1; docs/reliability.md, "Chaos"): real processes of
``banaserve up``, supervised as ``up`` supervises them, ``NUM_REQUESTS`` greedy requests in
flight, one fault at a time (a process killed or frozen, a link cut, slowed or black-holed).
After each: no request hung, every completed one has the clean run's tokens, the cluster serves
again with the dead service restarted and re-admitted, and nothing is held anywhere.

The default run takes ``matrix.SHORT`` on a cluster without the coordinator; ``-m chaos``
(``make chaos``) the full ``matrix.FULL`` on one with it. Each writes its table as JSON
(``report.py``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.chaos.cluster import ChaosCluster
from tests.chaos.faults import LONG, SHORT, CaseResult, Fault, clean_run, run_case
from tests.chaos.load import NUM_REQUESTS
from tests.chaos.matrix import FULL
from tests.chaos.matrix import SHORT as SHORT_MATRIX
from tests.chaos.report import markdown, report_path, write

CASES_ENV = "BANASERVE_CHAOS_CASES"
# The links a clean run uses (the store's are used once a prefix is asked for again).
CARRY_CLEAN_RUN = ("client", "reports", "to-prefill", "to-decode", "handoff")


def run_matrix(home: Path, faults: list[Fault], name: str) -> list[CaseResult]:
    """Runs ``faults`` in turn on one cluster; ``BANASERVE_CHAOS_CASES=A,B`` keeps only the
    faults whose name contains one of A, B. The services' log is kept next to the report."""
    if only := os.environ.get(CASES_ENV):
        faults = [f for f in faults if any(part in f.name for part in only.split(","))]
    path = report_path(name)
    cluster = ChaosCluster(home, path.with_suffix(".services.log"), coordinator=name == "full")
    meta = {
        "matrix": name,
        "requests": NUM_REQUESTS,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_at_start": os.getloadavg()[0],
    }
    results: list[CaseResult] = []
    cluster.start()
    try:
        clean = {load: clean_run(cluster, load) for load in {SHORT, LONG} if _needs(load, faults)}
        # Each worker advertised its proxies, and every call into it went through them.
        carried = {name: proxy.num_connections for name, proxy in cluster.proxies.items()}
        assert all(carried[name] for name in CARRY_CLEAN_RUN), carried
        for fault in faults:
            try:
                results.append(run_case(cluster, fault, clean))
            except Exception as exc:  # noqa: BLE001 - recorded; the next case still runs
                results.append(CaseResult(fault.name, recover_s=None, note=f"error: {exc!r}"))
            meta["load_average_at_end"] = os.getloadavg()[0]
            meta["proxied_connections"] = {n: p.num_connections for n, p in cluster.proxies.items()}
            write(path, meta, [r.to_json() for r in results])
        # A migration case's donor reached its helper through the migration data plane's proxy.
        for link, kind in (("migration-data", False), ("migration-data-decode", True)):
            if any(f.phase.value and f.prefill_donor is kind for f in faults):
                assert cluster.proxies[link].num_connections, meta["proxied_connections"]
    finally:
        codes = cluster.stop()
    print(f"\n{path}\n" + markdown({"cases": [r.to_json() for r in results]}))
    # A child killed by the last fault may be stopped while it restarts (-15 or -9).
    assert all(code in (0, -9, -15) for code in codes.values()), codes
    return results


def _needs(load, faults: list[Fault]) -> bool:
    return load is SHORT or any(f.phase.value for f in faults)


def assert_all_ok(results: list[CaseResult]) -> None:
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(str(r) for r in bad)


@pytest.mark.e2e
@pytest.mark.integration
def test_short_chaos(banaserve_home, tiny_llama):
    assert_all_ok(run_matrix(banaserve_home, SHORT_MATRIX, "short"))


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_full_chaos_matrix(banaserve_home, tiny_llama):
    assert_all_ok(run_matrix(banaserve_home, FULL, "full"))
