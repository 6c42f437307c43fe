"""``banaserve loadtest`` against services started with ``--tls-dir`` and ``--api-token-file``
(docs/security.md), real processes on 127.0.0.1: with the same flags every service's load test
runs with no error and leaves nothing held, presenting the certificates of the callers it plays
(docs/loadtest.md); without them it fails at once with the status and what to pass; a
certificate it needs that the directory lacks is refused before anything connects.

Before, ``loadtest`` had neither flag and could not reach such a cluster at all."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main
from services.kvstore.redis_server import RedisServer
from services.rpc.certs import create_certs
from services.rpc.security import REDIS_SECRET_FILE
from tests.loadtest.conftest import Proc, spawn, stop

pytestmark = pytest.mark.integration

TOKEN = "loadtest-token-0123456789abcdef"
# A plaintext call to a TLS server fails its handshake at once: far below --timeout.
FAILS_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    create_certs(directory)
    return directory


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# the first token is the load test's\n{TOKEN}\nanother-token-0123456789\n")
    return path


@pytest.fixture(scope="module")
def secured(banaserve_home, tiny_llama, certs, token_file, tmp_path_factory) -> Iterator[dict]:
    """One of each service, every one with ``--tls-dir`` and ``--api-token-file``; the kvstore's
    and the coordinator's Redis wants the directory's password."""
    env = {**os.environ, "BANASERVE_HOME": str(banaserve_home), "OMP_NUM_THREADS": "1"}
    flags = ["--tls-dir", str(certs), "--api-token-file", str(token_file)]
    procs: list[Proc] = []
    password = str(certs / REDIS_SECRET_FILE)
    with (
        open(tmp_path_factory.mktemp("logs") / "services.log", "w") as log,
        RedisServer(embedded=False, password_file=password) as redis,
    ):
        try:
            kv = ["--redis", redis.url, "--key-prefix", "loadtest-tls", "--data-transport", "tcp"]
            procs.append(spawn("kvstore", "services.kvstore", [*kv, *flags], env, log))
            procs.append(spawn("router", "services.router", flags, env, log))
            worker = ["--model", "tiny-llama", "--num-kv-blocks", "256", *flags]
            procs.append(spawn("prefill", "services.prefill", worker, env, log))
            # The gRPC data plane admits workers only: the KV must go with the prefill
            # certificate (TCP data planes are covered by the prefill sink and the kvstore).
            decode = [*worker, "--kv-transport", "grpc"]
            procs.append(spawn("decode", "services.decode", decode, env, log))
            coordinator = ["--redis", redis.url, "--key-prefix", "loadtest-tls-coordinator"]
            procs.append(
                spawn("coordinator", "services.coordinator", coordinator + flags, env, log)
            )
            yield {p.name: p.address for p in procs}
        finally:
            codes = {p.name: stop(p) for p in reversed(procs)}
    assert set(codes.values()) <= {0}, f"services exited with {codes}"


# (service, its flags): each load test, and each way it sends KV where it has several.
RUNS = {
    "router --stub-workers": ("router", ["--users", "2", "--max-tokens", "4", "--stub-workers"]),
    "prefill": ("prefill", ["--prompt-len", "32"]),  # the TCP sink: TLS's default
    "prefill grpc sink": ("prefill", ["--prompt-len", "32", "--sink-transport", "grpc"]),
    "prefill stream sink": ("prefill", ["--prompt-len", "32", "--sink-transport", "stream"]),
    "decode": ("decode", ["--prompt-len", "20", "--max-tokens", "3"]),
    "decode TransferKV": (
        "decode",
        ["--prompt-len", "20", "--max-tokens", "3", "--kv-transport", "grpc"],
    ),  # fmt: skip
    "kvstore": (
        "kvstore",
        [
            "--op",
            "mixed",
            "--write-fraction",
            "0.5",
            "--num-blocks",
            "2",
            "--layer-bytes",
            "4KiB",
            "--users",
            "2",
        ],
    ),  # fmt: skip
    "coordinator": ("coordinator", ["--users", "2"]),
}


def run_loadtest(out: Path, service: str, target: str, *argv: str) -> tuple[int, float]:
    args = ["loadtest", service, "--target", target, *argv, "--out", str(out),
            "--duration", "3s", "--max-requests", "4", "--timeout", "20s"]  # fmt: skip
    started = time.monotonic()
    return main(args), time.monotonic() - started


@pytest.mark.parametrize("run", list(RUNS))
def test_each_load_test_runs_against_a_locked_down_service(
    run, secured, certs, token_file, tmp_path
):
    service, argv = RUNS[run]
    flags = ["--tls-dir", str(certs), "--api-token-file", str(token_file)]
    code, _ = run_loadtest(tmp_path, service, secured[service], *argv, *flags)
    assert code == 0
    report = json.loads((tmp_path / f"{service}.json").read_text())
    (step,) = report["steps"]
    iteration = step["rpcs"][0]
    assert iteration["ok"] == iteration["count"] == 4
    for row in step["rpcs"]:
        assert (row["errors"], row["error_codes"]) == (0, {}), row
    assert step["server_after"]["leaks"] == ""
    if run == "prefill":
        assert report["scenario"]["decode_target"] == "in-process KV sink (tcp)"
        assert step["server_after"]["sink_transfers"] == 4 + 1  # and the warm-up's


@pytest.mark.parametrize("service", ["router", "prefill", "decode", "kvstore", "coordinator"])
def test_without_the_flags_it_fails_at_once_saying_what_to_pass(service, secured, tmp_path, capsys):
    argv = ["--stub-workers"] if service == "router" else []
    code, took = run_loadtest(tmp_path, service, secured[service], *argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "UNAVAILABLE" in err
    assert "pass --tls-dir DIR" in err
    assert took < FAILS_WITHIN_S
    assert not (tmp_path / f"{service}.json").exists()


@pytest.mark.parametrize("service", ["router", "coordinator"])
def test_the_client_api_without_its_token_is_named(service, secured, certs, tmp_path, capsys):
    """With the certificates but no token, or a token the service does not take: the client
    API (the router's Generate, every coordinator call) refuses, and the error says why."""
    argv = ["--stub-workers"] if service == "router" else []
    tls = ["--tls-dir", str(certs)]
    code, _ = run_loadtest(tmp_path, service, secured[service], *argv, *tls)
    err = capsys.readouterr().err
    assert code == 2
    assert "UNAUTHENTICATED" in err and "pass --api-token-file FILE" in err
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-cluster-token-0123\n")
    code, _ = run_loadtest(tmp_path, service, secured[service], *argv, *tls,
                           "--api-token-file", str(wrong))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "does not accept the first token of --api-token-file" in err


# (service, flags, a certificate it needs): the roles each load test plays beyond its first.
NEEDS = [
    ("router", ["--stub-workers"], "decode"),
    ("router", [], "client"),
    ("prefill", [], "decode"),
    ("decode", [], "prefill"),
    ("kvstore", [], "client"),
    ("coordinator", [], "client"),
]


@pytest.mark.parametrize(("service", "argv", "role"), NEEDS)
def test_a_certificate_it_needs_is_named_before_anything_connects(
    service, argv, role, certs, tmp_path, capsys
):
    partial = tmp_path / "certs"
    shutil.copytree(certs, partial)
    (partial / f"{role}.crt").unlink()
    # Nothing listens on port 1: a run that connected would fail differently.
    code, took = run_loadtest(tmp_path, service, "127.0.0.1:1", *argv, "--tls-dir", str(partial))
    err = capsys.readouterr().err
    assert code == 2
    assert f"TLS file {partial / f'{role}.crt'} does not exist" in err
    assert "UNAVAILABLE" not in err


def test_a_ucx_sink_is_refused_with_tls(certs, tmp_path, capsys):
    """A UCX data plane authenticates no peer and listens on every interface."""
    code, _ = run_loadtest(tmp_path, "prefill", "127.0.0.1:1", "--sink-transport", "ucx",
                           "--tls-dir", str(certs))  # fmt: skip
    assert code == 2
    assert "--sink-transport ucx with --tls-dir" in capsys.readouterr().err
