"""Fuzzing every RPC of every service (docs/reliability.md).

One cluster of real processes serves the whole package (``fuzz_cluster``); each module fuzzes
one service, then checks it healthy and leak-free. The default run is short and derandomized
(each test's examples are the same on every run); ``BANASERVE_FUZZ_INPUTS=N`` runs about N
inputs over all services instead (``make fuzz``: 10,000), and ``BANASERVE_FUZZ_REPORT=PATH``
writes the per-service counts there as markdown tables (they are printed at the end of the run
too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.fuzz.cluster import FuzzCluster
from tests.fuzz.harness import Fuzzer, Tally

INPUTS_ENV = "BANASERVE_FUZZ_INPUTS"
REPORT_ENV = "BANASERVE_FUZZ_REPORT"
LOG_ENV = "BANASERVE_FUZZ_LOG"  # where the services' logs go (default: a temporary dir)
# Examples per fuzz test in the default run. ``BANASERVE_FUZZ_INPUTS=N`` scales them all so
# that they add up to N (each example is one input or more: a handoff is several calls).
DEFAULT_EXAMPLES = {
    "router": 100,
    "prefill": 60,
    "decode": 100,
    "decode data plane": 100,
    "kvstore": 100,
    "kvstore data plane": 100,
}
LONG_RUN = bool(os.environ.get(INPUTS_ENV))
# Every fuzz module's marks: real processes, and no per-test limit in a long run (pytest's
# 600 s would cut it short).
MARKS = [pytest.mark.integration, pytest.mark.timeout(0 if LONG_RUN else 600)]
TALLY = Tally()


def examples(target: str) -> int:
    default = DEFAULT_EXAMPLES[target]
    if not LONG_RUN:
        return default
    total = int(os.environ[INPUTS_ENV])
    return max(1, round(default * total / sum(DEFAULT_EXAMPLES.values())))


def fuzz_settings(target: str) -> settings:
    """Derandomized, so a run is reproducible; no shrinking, because the servers keep state
    between inputs (a shrunk input replayed against them is not the input that failed, and
    after a crash every input fails); no example database."""
    return settings(
        max_examples=examples(target),
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )


@pytest.fixture(scope="package")
def fuzz_cluster(banaserve_home, tiny_llama, tmp_path_factory) -> Iterator[FuzzCluster]:
    log = os.environ.get(LOG_ENV) or tmp_path_factory.mktemp("fuzz") / "cluster.log"
    cluster = FuzzCluster(banaserve_home, Path(log))
    try:
        cluster.start(Path(tiny_llama))
        yield cluster
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, f"services exited with {codes}"


@pytest.fixture(scope="package")
def fuzzer(fuzz_cluster: FuzzCluster) -> Fuzzer:
    return Fuzzer(TALLY, fuzz_cluster.alive)


def pytest_terminal_summary(terminalreporter) -> None:
    if not TALLY.inputs:
        return
    table = TALLY.table()
    terminalreporter.write_sep("=", "fuzzed inputs per service")
    terminalreporter.write_line(table)
    terminalreporter.write_line("")
    terminalreporter.write_line(TALLY.method_table())
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(f"{table}\n\n{TALLY.method_table()}\n")
