"""``banaserve up --mode colocated`` as a user runs it: exactly the processes the mode names
(services.launcher.process_names), every one a mixed worker, a greedy completion equal to the
in-process engine's, and a clean stop."""

from __future__ import annotations

import signal

import pytest

from services.client.client import BanaServeClient
from services.common.types import SamplingParams
from services.launcher import Mode, mode_spec, process_names
from tests.e2e.test_up import children, cmdline, gone, start_up
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.e2e


def test_up_mode_colocated_runs_mixed_workers_only(banaserve_home, tiny_llama):
    proc, lines = start_up(banaserve_home, "--mode", "colocated", "--workers", "2")
    kids = children(proc.pid)
    try:
        names = [line.split()[0] for line in lines if not line.startswith(("openai ", "cluster"))]
        assert (
            names == process_names(mode_spec(Mode.COLOCATED, 2)) == ["router", "mixed-0", "mixed-1"]
        )
        workers = [cmdline(pid) for pid in kids if "services.decode" in cmdline(pid)]
        assert len(workers) == 2 and all("mixed" in argv for argv in workers)
        router = lines[names.index("router")].split()[1]
        with BanaServeClient(router) as client:
            assert sorted(w.role for w in client.list_workers()) == ["mixed", "mixed"]
            got = client.complete("Return the value of", temperature=0.0, max_tokens=12,
                                  ignore_eos=True, timeout_s=60)  # fmt: skip
        [expected] = make_engine(tiny_llama).generate(
            ["Return the value of"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        )
        assert got.text == expected.text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()[-2000:]
    assert all(gone(pid) for pid in kids)
