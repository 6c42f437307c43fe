"""``banaserve migrations --watch``: the screen it redraws, from the router's ListWorkers and
the coordinator's migrations (a real one: tests/coordinator/test_auto_cluster.py)."""

from __future__ import annotations

import argparse
import dataclasses

import grpc
import pytest

from services.common.errors import ConfigError
from services.coordinator.cli import add_migrations_arguments, format_row, run_migrations
from services.coordinator.watch import WorkerLine, check_watch_args, render, watch, worker_lines
from services.kvstore.redis_server import free_port
from services.rpc.convert import duration
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2
from services.rpc.gen.banaserve.v1 import coordinator_pb2 as pb
from services.rpc.load_reports import load_from_proto, load_to_proto
from tests.coordinator.policy_scenarios import report


def migration(migration_id: str, state: int, start: int, kv: int) -> pb.Migration:
    return pb.Migration(
        migration_id=migration_id, kind=pb.MIGRATION_KIND_LAYERS, state=state, donor="decode-0",
        helper="prefill-0", start_layer=start, end_layer=4, num_kv_bytes=kv,
    )  # fmt: skip


def test_one_screen_per_worker_utilisation_then_migrations():
    workers = [
        WorkerLine("decode-0", "decode", False, report(0.9, 100), 0.05, waiting_for_room=2),
        WorkerLine("mixed-0", "mixed", True, None, 3.0),
        WorkerLine("prefill-0", "prefill", True, report(0.1, 0, queued=2048), 2.5),
    ]
    migrations = [
        migration("m-1", pb.MIGRATION_STATE_DONE, 2, 1234),
        migration("m-2", pb.MIGRATION_STATE_ACTIVE, 3, 99),
    ]
    policy = {"decode-0": 0.62, "mixed-0": 0.3}  # what automatic mode's policy last saw
    assert render(workers, migrations, format_row, at="01:02:03", policy=policy).splitlines() == [
        "workers  01:02:03",
        "  worker           role         U policy  compute  memory      blocks  seqs  wait  hosted  report",
        "  decode-0         decode    1.00   0.62     0.90    1.00     100/512    25     2   0L/0B    0.1s",
        "  mixed-0          mixed        -   no report yet",
        "  prefill-0        prefill   0.50      -     0.50    0.00       0/512     0     0   0L/0B 2.5s STALE",
        "migrations: 1 live",
        "  m-2    layers    ACTIVE         decode-0 -> prefill-0    [3, 4)    kv           99 B",
        "  m-1    layers    DONE           decode-0 -> prefill-0    [2, 4)    kv        1,234 B",
    ]


def test_hosted_counts_the_kv_blocks_of_hosted_layers_and_of_attention():
    """Probe, session 42: a layer helper's hosted KV blocks (its hosted ranges' own pools) were
    in no load report, so ``--watch`` showed ``3L/0B``; the report carries them now."""
    load = dataclasses.replace(
        report(0.5, 10), num_hosted_layers=3, num_hosted_layer_blocks=40, num_hosted_blocks=2
    )
    assert load_from_proto(load_to_proto(load)) == load
    screen = render([WorkerLine("prefill-0", "prefill", False, load, 0.1)], [], format_row)
    assert screen.splitlines()[2].split()[-2:] == ["3L/42B", "0.1s"]


def test_only_the_last_five_ended_migrations_are_shown():
    ended = [migration(f"m-{i}", pb.MIGRATION_STATE_DONE, 2, 0) for i in range(1, 8)]
    screen = render([], ended, format_row).splitlines()
    assert screen[:3] == ["workers", screen[1], "  no workers"]
    assert [line.split()[0] for line in screen[4:]] == ["m-3", "m-4", "m-5", "m-6", "m-7"]


def test_worker_lines_from_list_workers():
    reply = router_pb2.ListWorkersResponse(
        workers=[
            router_pb2.Worker(
                info=router_pb2.WorkerInfo(
                    worker_id="prefill-0", role=common_pb2.WORKER_ROLE_PREFILL
                ),
                state=router_pb2.WORKER_STATE_STALE,
                since_last_load=duration(2.5),
            ),
            router_pb2.Worker(
                info=router_pb2.WorkerInfo(
                    worker_id="decode-0", role=common_pb2.WORKER_ROLE_DECODE
                ),
                state=router_pb2.WORKER_STATE_ACTIVE,
                last_load=load_to_proto(report(0.9, 100)),
                since_last_load=duration(0.05),
                num_waiting_for_room=4,
            ),
        ]
    )
    assert worker_lines(reply) == [
        WorkerLine("decode-0", "decode", False, report(0.9, 100), 0.05, 4),
        WorkerLine("prefill-0", "prefill", True, None, 2.5),
    ]


def test_watch_flags():
    p = argparse.ArgumentParser()
    add_migrations_arguments(p)
    args = p.parse_args(
        ["--watch", "--router", "127.0.0.1:1", "--count", "2", "--coordinator", "127.0.0.1:2"]
    )
    assert (args.watch, args.router, args.count, args.interval) == (True, "127.0.0.1:1", 2, 1.0)


def test_a_service_that_does_not_answer_is_shown_and_asked_again(capsys):
    """Probe, session 40: ``--watch`` exited 2 the moment the coordinator restarted, though
    ``banaserve up`` brings it back within seconds. Now each screen names the part it could
    not read and the next tries again; exit 1 when the last screen lacked a part."""
    watch_args = argparse.Namespace(
        coordinator=f"127.0.0.1:{free_port()}", router=f"127.0.0.1:{free_port()}", watch=True,
        count=2, interval=0.01, live=False, migration_id=None, tls_dir="", api_token_file="",
        timeout=2.0,
    )  # fmt: skip
    capsys.readouterr()
    assert run_migrations(watch_args) == 1
    out = capsys.readouterr().out
    assert out.count("the router unreachable (UNAVAILABLE: ") == 2, out
    assert out.count("the coordinator unreachable (UNAVAILABLE: ") == 2, out


class Refused(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNIMPLEMENTED

    def details(self):
        return "Method not found!"


def test_a_refusal_that_is_not_a_restart_still_ends_the_watch():
    """UNIMPLEMENTED (another service at that address), UNAUTHENTICATED and the like are not
    waited out: the watch ends, and ``banaserve migrations`` exits 2 naming it."""

    def refuse():
        raise Refused()

    watch_args = argparse.Namespace(
        router=f"127.0.0.1:{free_port()}", count=1, interval=1.0, tls_dir="", api_token_file=""
    )
    with pytest.raises(Refused):
        watch(watch_args, refuse, format_row)


def test_watch_flags_without_watch_are_refused():
    """Probe, session 40: ``--count`` and ``--interval`` were taken without ``--watch`` and
    never used."""
    p = argparse.ArgumentParser()
    add_migrations_arguments(p)
    for flags, message in ((["--count", "3"], "--count"), (["--interval", "2"], "--interval")):
        args = p.parse_args([*flags, "--coordinator", "127.0.0.1:2"])
        with pytest.raises(ConfigError, match=f"^{message}: only with --watch$"):
            check_watch_args(args)
    check_watch_args(p.parse_args(["--coordinator", "127.0.0.1:2"]))  # a plain listing


def test_list_migrations_carries_what_the_policy_saw_for_the_watch():
    """Probe, session 44: during an automatic layer migration ``--watch`` showed the donor at
    0.84-0.99 and the helper at 0.00 (their last reports, measured), while the coordinator's
    metrics said 0.50-0.56 and 0.35-0.41 (its window means, the moved layers' share counted
    on the helper), and the docs said the watch showed the latter. ListMigrations now carries
    the policy's, and the watch shows both."""
    import asyncio

    from services.coordinator.auto import DecisionStats
    from services.coordinator.core import Coordinator
    from services.coordinator.policy_types import Utilisation
    from services.coordinator.servicer import CoordinatorServicer

    coordinator = Coordinator(None, None)  # no store, no workers: the listing only
    servicer = CoordinatorServicer(coordinator)
    request = pb.ListMigrationsRequest()
    assert list(asyncio.run(servicer.ListMigrations(request, None)).utilisations) == []
    coordinator.auto_stats = DecisionStats(
        utilisations={"prefill-0": Utilisation(0.38, 0.1, 0, 512),
                      "decode-0": Utilisation(0.53, 0.2, 100, 512)}
    )  # fmt: skip
    listed = asyncio.run(servicer.ListMigrations(request, None))
    assert [(u.worker_id, u.compute, u.memory) for u in listed.utilisations] == [
        ("decode-0", 0.53, 0.2),
        ("prefill-0", 0.38, 0.1),
    ]


class SocketClosed(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "Socket closed"


def test_a_plaintext_call_to_a_tls_coordinator_names_the_flag(capsys):
    """Probe, session 44: ``migrations`` without ``--tls-dir`` against a TLS coordinator said
    only "UNAVAILABLE: Socket closed"; the load tests said what to pass. Now both do."""
    from services.coordinator.cli import _refused

    plain = argparse.Namespace(tls_dir="", api_token_file="")
    assert _refused(SocketClosed(), plain) == 2
    assert "pass --tls-dir DIR" in capsys.readouterr().err
    with_tls = argparse.Namespace(tls_dir="/etc/banaserve", api_token_file="")
    _refused(SocketClosed(), with_tls)
    assert "may run without --tls-dir" in capsys.readouterr().err


def test_columns_widen_to_the_longest_worker_id():
    """Probe, session 45: compose workers' ids (``decode-10.89.0.5-50065``) shifted every column
    after them; the worker, donor and helper columns now widen to the longest id shown."""
    long_id = "decode-10.89.0.5-50065"
    workers = [
        WorkerLine(long_id, "decode", False, report(0.9, 100), 0.05),
        WorkerLine("prefill-0", "prefill", False, report(0.1, 0), 0.05),
    ]
    moved = migration("m-1", pb.MIGRATION_STATE_ACTIVE, 2, 1)
    moved.donor = long_id
    lines = render(workers, [moved], format_row).splitlines()
    header, first, second = lines[1:4]
    assert header.index(" role ") == first.index(" decode ") == second.index(" prefill ")
    assert lines[-1] == (
        f"  m-1    layers    ACTIVE     {long_id} -> prefill-0              [2, 4)    kv            1 B"
    )
