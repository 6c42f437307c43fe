"""``banaserve up --metrics``: every service of a real cluster serves ``/metrics`` on a port of
its own, two workers of one role included (a ``--metrics-port`` in ``--decode-args`` is refused
there: each would bind the same), and ``up`` prints where (session 44: the probe found no way to
reach the kvstore's metrics through ``up``, nor a worker's when its role ran twice)."""

from __future__ import annotations

import pytest

from services.launcher import ClusterSpec, LocalCluster
from tests.clusters import scrape

pytestmark = pytest.mark.integration

# A name each service's endpoint serves (docs/deploy.md).
SERVED = {
    "kvstore": "banaserve_kvstore_blocks",
    "router": "banaserve_router_workers",
    "prefill": "banaserve_worker_kv_blocks",
    "decode": "banaserve_worker_kv_blocks",
    "coordinator": "banaserve_coordinator_migrations",
}


def test_every_service_serves_its_metrics_on_a_port_of_its_own(
    banaserve_home, tiny_llama, tmp_path
):
    spec = ClusterSpec(num_decode=2, coordinator=True, num_kv_blocks=64, metrics=True,
                       extra_env={"BANASERVE_HOME": str(banaserve_home)})  # fmt: skip
    with open(tmp_path / "cluster.log", "w") as log:
        cluster = LocalCluster(spec, log)
        cluster.start()
        try:
            services = [c for c in cluster.children if c.name != "redis"]
            addresses = [c.metrics_address for c in services]
            assert all(addresses) and len(set(addresses)) == len(addresses), addresses
            for child in services:
                role = child.name.split("-")[0]
                port = int(child.metrics_address.rsplit(":", 1)[1])
                names = scrape(port)
                assert SERVED[role] in names and "process_resident_memory_bytes" in names
        finally:
            cluster.stop()
    assert sorted(c.name for c in services) == [
        "coordinator",
        "decode-0",
        "decode-1",
        "kvstore-0",
        "prefill-0",
        "router",
    ]


@pytest.mark.parametrize("service", ["router", "kvstore"])
def test_a_metrics_port_in_use_is_one_error_line_and_exit_2(service, tmp_path):
    """Probe, session 44: a service whose metrics port was taken died with two tracebacks
    (and, restarted by ``up``, with SIGABRT: gRPC core aborted at exit with its server left
    running). One ``error:`` line and exit 2, as any flag the service refuses."""
    import socket
    import subprocess
    import sys

    from services.kvstore.redis_server import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = {"router": ["--model", "tiny-llama"],
                 "kvstore": ["--redis", f"redis://127.0.0.1:{free_port()}"]}[service]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", f"services.{service}", "--port", "0", "--metrics-port",
             str(port), *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr and "never awaited" not in done.stderr
