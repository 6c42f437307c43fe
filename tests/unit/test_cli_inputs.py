"""The command-line tools and the client library on bad input (the session 23 probe of the CLI):
a usage error or one ``banaserve: error:`` line, exit status 2, before anything connects,
loads or writes — never a traceback, a crash, a wrapped port or a flag silently ignored. The
``up`` and ``bench compare`` checks beside these: tests/unit/test_cli_errors.py; ``sim``'s:
tests/sim/test_cli_inputs.py."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import math
import signal
import threading

import grpc
import pytest

from bench import compare, serve_bench, transport_bench
from bench.loadtest import cli as loadtest_cli
from bench.loadtest.decode import DecodeLoad
from bench.loadtest.driver import warm_up
from services import up
from services.child_process import StartInterrupted
from services.cli import main
from services.client.client import AsyncBanaServeClient, BanaServeClient, BanaServeClientError
from services.common.config import EngineConfig
from services.common.engine_args import add_engine_args
from services.common.errors import ConfigError
from services.common.limits import MAX_THREADS
from services.coordinator import __main__ as coordinator_main
from services.engine import generate_cli as local_generate
from services.engine.models import prepare
from services.launcher import ClusterSpec, Mode, mode_spec
from tests.unit.test_cli_errors import nothing_starts, run_cli  # noqa: F401 - a fixture

ROUTER = "127.0.0.1:1"  # nothing listens there


def fail(what: str):  # noqa: ANN201
    def called(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError(f"{what} before the input was refused")

    return called


@pytest.fixture
def no_connection(monkeypatch):
    """Opening any gRPC channel fails the test: the refusal must come first."""
    for module, name in ((grpc, "insecure_channel"), (grpc, "secure_channel"),
                         (grpc.aio, "insecure_channel"), (grpc.aio, "secure_channel")):  # fmt: skip
        monkeypatch.setattr(module, name, fail("a channel was opened"))


@pytest.fixture
def no_local_generate(monkeypatch):
    monkeypatch.setattr(local_generate, "run_generate", fail("the model was loaded"))


# -- B1: one bounded type for every thread count -----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "hi", "--threads", "100000"],
        ["up", "--threads", "100000"],
        ["up", "--threads", str(MAX_THREADS + 1)],
        ["bench", "compare", "--plan-only", "--threads", "100000"],
        ["bench", "migration", "--threads", "100000"],
    ],
)
@pytest.mark.usefixtures("nothing_starts", "no_local_generate")
def test_a_thread_count_past_the_bound_is_refused(capsys, argv):
    # 100000 torch threads: SIGSEGV (exit 139, no message) at the first matmul.
    code, err = run_cli(argv, capsys)
    assert code == 2 and f"argument --threads: expected 1..{MAX_THREADS}" in err


def test_every_worker_and_config_bounds_its_threads():
    p = argparse.ArgumentParser()
    add_engine_args(p)  # python -m services.prefill / services.decode
    assert p.parse_args(["--threads", str(MAX_THREADS)]).threads == MAX_THREADS
    with pytest.raises(SystemExit):
        p.parse_args(["--threads", "100000"])
    with pytest.raises(ConfigError, match=f"num_threads must be in 1..{MAX_THREADS}"):
        EngineConfig(model="m", num_threads=100000)
    with pytest.raises(ConfigError, match=f"threads must be in 1..{MAX_THREADS}"):
        ClusterSpec(threads=100000)


# -- B3, B4, C3: one HOST:PORT rule for every client tool and the library ----------------------

CLIENT_TOOLS = [
    ["generate", "--prompt", "hi", "--router", "{a}"],
    ["health", "{a}"],
    ["health", ROUTER, "--registered-at", "{a}"],
    ["health", ROUTER, "--registered-at", ROUTER, "--advertised-as", "{a}"],
    ["migrations", "--coordinator", "{a}"],
    ["migrations", "--watch", "--coordinator", ROUTER, "--router", "{a}"],
    ["migrate", "abort", "m-1", "--coordinator", "{a}"],
    ["loadtest", "router", "--target", "{a}"],
    ["bench", "store-ttft", "--router", "{a}", "--kvstore", ROUTER],
    ["bench", "store-ttft", "--router", ROUTER, "--kvstore", "{a}"],
]


@pytest.mark.parametrize("argv", CLIENT_TOOLS)
@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:99999", "'127.0.0.1:99999' is not HOST:PORT (a port in 1..65535)"),
        ("127.0.0.1:0", "is not HOST:PORT"),
        (":50051", "is not HOST:PORT"),
        ("router", "is not HOST:PORT"),
        ("", "address is empty; expected HOST:PORT"),
    ],
)
def test_a_client_tool_refuses_an_address_before_connecting(
    capsys, no_connection, no_local_generate, argv, address, message
):
    # 127.0.0.1:99999 dialled 127.0.0.1:34463; "" ran generate in-process, and made grpc-core
    # print its C++ resolver errors for health.
    code, err = run_cli([a.format(a=address) for a in argv], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("spec", "refused"),
    [
        ({"num_decode": 2, "service_args": {"decode": ("--data-port", "5000")}}, "--data-port"),
        (
            {"num_decode": 1, "num_mixed": 1, "service_args": {"decode": ("--advertise=h:1",)}},
            "--advertise",
        ),  # fmt: skip
        ({"num_kvstore": 2, "service_args": {"kvstore": ("--node-id", "k")}}, "--node-id"),
        ({"num_prefill": 2, "service_args": {"prefill": ("--metrics-port", "9100")}}, "--metrics"),
        # Two nodes on one disk directory: each clears it at start (session 44).
        ({"num_kvstore": 2, "service_args": {"kvstore": ("--disk-dir", "/tmp/kv")}}, "--disk-dir"),
        ({"num_decode": 1, "service_args": {"decode": ("--data-port", "5000")}}, None),
    ],
)
def test_up_refuses_one_process_flags_for_a_service_it_runs_more_than_once(spec, refused):
    """Found by a probe: ``up --decode 2 --decode-args "--data-port 5000"`` started a second
    worker that could not bind it (and stopped the cluster); ``--advertise`` registered two
    workers at one address."""
    if refused is None:
        ClusterSpec(**spec)
        return
    with pytest.raises(ConfigError, match=f"{refused}.* names one process's port"):
        ClusterSpec(**spec)


@pytest.mark.parametrize(
    ("service", "flag"),
    [
        # Session 37's probe: each started with -1, 0 or nan. A report interval of 0 or less
        # sends reports in a loop with no pause (LoadReporter's wait times out at once), a store
        # timeout of -1 fails every store call (each prompt then computed in full), a pin TTL
        # of nan never compares as expired, an expiry interval of -1 sweeps with no pause.
        ("prefill", "--kvstore-timeout"),
        ("prefill", "--report-interval"),
        ("decode", "--report-interval"),
        ("kvstore", "--reservation-ttl"),
        ("kvstore", "--pin-ttl"),
        ("router", "--expire-interval-s"),
    ],
)
def test_a_service_refuses_a_duration_that_is_not_a_positive_number(capsys, service, flag):
    parse_args = importlib.import_module(f"services.{service}.__main__").parse_args
    assert getattr(parse_args([flag, "0.5"]), flag[2:].replace("-", "_")) == 0.5
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            parse_args([flag, bad])
        assert f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("service", ["kvstore", "coordinator"])
def test_a_service_refuses_a_redis_url_redis_py_cannot_use(capsys, monkeypatch, service):
    """Session 38's probe: ``--redis "not a url"`` or a port past 65535 was a ValueError
    traceback from redis-py at start (exit 1); the env default is checked the same way."""
    parse_args = importlib.import_module(f"services.{service}.__main__").parse_args
    for good in ("redis://127.0.0.1:6379/0", "rediss://user:pw@redis:6380/2", "unix:///r.sock"):
        assert parse_args(["--redis", good]).redis == good
    for bad in ("not a url", "127.0.0.1:6379", "redis://127.0.0.1:99999", "redis://h:0"):
        with pytest.raises(SystemExit):
            parse_args(["--redis", bad])
        assert "argument --redis: expected a Redis URL" in capsys.readouterr().err
    monkeypatch.setenv("BANASERVE_REDIS", "bogus")
    with pytest.raises(SystemExit):
        parse_args([])
    assert "expected a Redis URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("service", "flag"),
    [("prefill", "--router"), ("prefill", "--kvstore"), ("decode", "--router"),
     ("coordinator", "--router")],
)  # fmt: skip
def test_a_service_refuses_a_peer_address_that_is_not_host_port(capsys, service, flag):
    """Session 38's probe: ``prefill --kvstore x`` started and served, every prompt's store
    calls then failing; ``--router x`` retried registering forever."""
    parse_args = importlib.import_module(f"services.{service}.__main__").parse_args
    assert getattr(parse_args([flag, "router:50051"]), flag[2:]) == "router:50051"
    for bad in ("x", "host:0", "host:99999", ":1"):
        with pytest.raises(SystemExit):
            parse_args([flag, bad])
        assert f"argument {flag}: address" in capsys.readouterr().err


def test_the_pool_refuses_a_ttl_that_is_nan():
    from services.kvstore.pool import PoolConfig

    for field in ("reservation_ttl_s", "pin_ttl_s"):
        with pytest.raises(ConfigError, match=f"{field} must be positive, got nan"):
            PoolConfig(1 << 20, **{field: math.nan})


@pytest.mark.parametrize("service", ["prefill", "decode", "kvstore"])
def test_a_service_checks_the_addresses_it_advertises(capsys, service):
    parse_args = importlib.import_module(f"services.{service}.__main__").parse_args
    args = parse_args([])
    assert args.advertise is None  # the address it binds
    assert parse_args(["--advertise", "10.0.0.7:50065"]).advertise == "10.0.0.7:50065"
    flags = ["--advertise"] + (["--advertise-data"] if service != "prefill" else [])
    for flag in flags:
        for bad in ("", "10.0.0.7:0", "10.0.0.7", ":1"):
            with pytest.raises(SystemExit):
                parse_args([flag, bad])
            assert f"argument {flag}:" in capsys.readouterr().err
    ports = ["--port"] + (["--data-port"] if service != "prefill" else [])
    for flag in [*ports, "--metrics-port"]:  # found by a probe: a traceback from the bind
        for bad in ("-1", "65536", "x"):
            with pytest.raises(SystemExit):
                parse_args([flag, bad])
            assert f"argument {flag}:" in capsys.readouterr().err


def test_health_looks_a_worker_up_by_the_address_it_advertises(monkeypatch):
    from services.rpc import probe

    seen = []
    monkeypatch.setattr(probe, "check", lambda target, *a: "SERVING")
    monkeypatch.setattr(probe, "is_registered", lambda address, *a: seen.append(address) or True)
    base = ["127.0.0.1:50065", "--registered-at", "127.0.0.1:50051"]
    assert probe.main(base) == 0
    assert probe.main([*base, "--advertised-as", "10.0.0.7:7000"]) == 0
    assert seen == ["127.0.0.1:50065", "10.0.0.7:7000"]
    assert probe.main(["127.0.0.1:50065", "--advertised-as", "10.0.0.7:7000"]) == 2  # no router


@pytest.mark.parametrize("target", ["grpc://127.0.0.1:99999", "grpc://127.0.0.1:0", "grpc://:1"])
def test_bench_serve_takes_the_same_address_rule(capsys, target):
    code, err = run_cli(["bench", "serve", "--target", target], capsys)
    assert code == 2 and "a port in 1..65535" in err


BENCH_REPORTS = [
    ["bench", "serve", "--target", f"grpc://{ROUTER}"],
    ["bench", "transport"],
    ["bench", "compare", "--plan-only"],
    ["bench", "migration"],
    ["bench", "store-ttft", "--router", ROUTER, "--kvstore", ROUTER],
]


@pytest.mark.parametrize("argv", BENCH_REPORTS, ids=lambda argv: argv[1])
@pytest.mark.parametrize("label", ["../escaped", "a/b", "..", "", "x" * 101, "tab\there"])
def test_a_bench_label_must_be_a_plain_file_name_part(no_connection, capsys, tmp_path, argv, label):
    """A label names the report's files in ``--out``: ``../escaped`` wrote outside it and
    ``a/b`` failed with a traceback once the run was over (session 44)."""
    code, err = run_cli([*argv, "--out", str(tmp_path), "--label", label], capsys)
    assert code == 2 and "argument --label: expected a plain label" in err
    assert list(tmp_path.iterdir()) == []


def test_bench_serve_refuses_a_negative_temperature(no_connection, capsys):
    code, err = run_cli(
        ["bench", "serve", "--target", f"grpc://{ROUTER}", "--temperature", "-1"], capsys
    )
    assert code == 2 and "argument --temperature: expected a number >= 0" in err


@pytest.mark.parametrize("client", [BanaServeClient, AsyncBanaServeClient])
@pytest.mark.parametrize("target", ["", "127.0.0.1:99999", "host", "127.0.0.1:-1"])
def test_the_client_library_refuses_a_bad_target(no_connection, client, target):
    with pytest.raises(BanaServeClientError) as refused:
        client(target)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("client", [BanaServeClient, AsyncBanaServeClient])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_resumes": -1}, "max_resumes must be in 0..1000, got -1"),
        ({"reconnect_timeout_s": 0}, "reconnect_timeout_s must be in (0, 3600], got 0"),
        ({"reconnect_timeout_s": float("nan")}, "reconnect_timeout_s must be in (0, 3600]"),
        ({"keepalive_s": 0.5}, "keepalive_s must be in [1, 3600], got 0.5"),
        ({"keepalive_s": float("inf")}, "keepalive_s must be in [1, 3600], got inf"),
    ],
)
def test_the_client_library_refuses_bad_resume_settings(no_connection, client, args, message):
    with pytest.raises(BanaServeClientError) as refused:
        client("127.0.0.1:50051", **args)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(refused.value)


# -- A1, A2, C8: what protobuf cannot encode is refused as INVALID_ARGUMENT -------------------


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ("hi", {"seed": -1}, "seed: Value out of range: -1"),
        ("hi", {"seed": 2**64}, "seed: Value out of range"),
        ("hi", {"max_tokens": 99999999999}, "max_tokens: Value out of range"),
        ("hi", {"stop": ["\udcff"]}, "stop is not valid UTF-8"),
        ("\udcff\udcfe x", {}, "prompt is not valid UTF-8"),
        (b"hi", {}, "prompt must be text or token ids, got bytes"),
        ([1, -2], {}, "prompt: Value out of range: -2"),
        ([1, 2**32], {}, "prompt: Value out of range"),
        ([1.5], {}, "prompt:"),
    ],
)
def test_the_client_refuses_a_request_it_cannot_encode(prompt, sampling, message):
    with BanaServeClient(ROUTER) as client, pytest.raises(BanaServeClientError) as refused:
        client.complete(prompt, **sampling)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--router", ROUTER, "--seed", "-1"], "INVALID_ARGUMENT: seed: Value out of range: -1"),
        (["--router", ROUTER, "--max-tokens", "99999999999"], "max_tokens: Value out of range"),
        (["--router", ROUTER, "--prompt", "\udcff\udcfe x"], "--prompt: not valid UTF-8"),
        (["--prompt", "\udcff\udcfe x"], "--prompt: not valid UTF-8"),  # in-process
    ],
)
def test_generate_refuses_what_it_cannot_send_in_one_line(capsys, no_local_generate, argv, message):
    code, err = run_cli(["generate", "--prompt", "hi", *argv], capsys)
    assert code == 2 and message in err
    assert sum("error:" in line for line in err.splitlines()) == 1


# -- C1, D3: timeouts, and flags in-process generate cannot use -------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "hi", "--router", ROUTER, "--timeout", "-1"],
        ["generate", "--prompt", "hi", "--router", ROUTER, "--timeout", "nan"],
        ["generate", "--prompt", "hi", "--router", ROUTER, "--timeout", "0"],
        ["health", ROUTER, "--timeout", "-1"],
        ["health", ROUTER, "--timeout", "nan"],
        ["migrate", "revert", "m-1", "--coordinator", ROUTER, "--wait-timeout", "-1"],
    ],
)
def test_a_timeout_that_is_not_positive_is_refused_up_front(capsys, no_connection, argv):
    # They ended in DEADLINE_EXCEEDED, as if the server were slow.
    code, err = run_cli(argv, capsys)
    assert code == 2 and "timeout: expected a positive number" in err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--timeout", "5"], "--timeout"),
        (["--tls-dir", "certs"], "--tls-dir"),
        (["--api-token-file", "tokens"], "--api-token-file"),
        (["--timeout", "5", "--tls-dir", "certs"], "--timeout, --tls-dir"),
    ],
)
def test_in_process_generate_refuses_the_flags_only_a_router_reads(
    capsys, no_local_generate, flags, named
):
    code, err = run_cli(["generate", "--prompt", "hi", *flags], capsys)
    assert code == 2 and f"error: {named}: only with --router" in err


# -- C2, C5, A4: the coordinator commands ------------------------------------------------------


def test_migrations_without_a_coordinator_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.delenv("BANASERVE_COORDINATOR", raising=False)
    for argv in (["migrations"], ["migrate", "abort", "m-1"]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and "the following arguments are required: --coordinator" in err
    monkeypatch.setenv("BANASERVE_COORDINATOR", "127.0.0.1:99999")
    code, err = run_cli(["migrations"], capsys)
    assert code == 2 and "argument --coordinator: address '127.0.0.1:99999'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--watch needs --router HOST:PORT"),
        (["--router", ROUTER, "m-3"], "--watch lists every migration; leave out 'm-3'"),
        (["--router", ROUTER, "--interval", "-1"], "argument --interval: expected a positive"),
        (["--router", ROUTER, "--interval", "nan"], "argument --interval: expected a positive"),
        # session 40's probe: time.sleep's OverflowError, a traceback
        (["--router", ROUTER, "--interval", "1e308"], "argument --interval: expected at most 3600"),
        (["--router", ROUTER, "--count", "-1"], "argument --count: expected a number >= 0"),
    ],
)
def test_migrations_watch_refuses_bad_flags_before_calling(
    capsys, monkeypatch, no_connection, argv, message
):
    monkeypatch.delenv("BANASERVE_ROUTER", raising=False)
    code, err = run_cli(["migrations", "--watch", "--coordinator", ROUTER, *argv], capsys)
    assert code == 2 and message in err


# -- A3, B2, C7, D2: up -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "static-pd", "--decode", "2"], "mode static-pd decides num_decode"),
        (["--mode", "static-pd", "--decode", "1"], "decides num_decode"),  # the default, given
        (["--mode", "colocated", "--policy", "load"], "mode colocated decides policy"),
        (["--mode", "colocated", "--prefill", "1"], "mode colocated decides num_prefill"),
        (["--mode", "static-pd", "--mixed", "1"], "decides num_mixed"),
        (["--mode", "static-pd", "--kvstore", "0"], "decides num_kvstore"),
        (["--mode", "banaserve", "--coordinator"], "decides coordinator"),
        (["--workers", "3"], "--workers counts a --mode's workers"),
    ],
)
@pytest.mark.usefixtures("nothing_starts")
def test_up_refuses_a_flag_its_cluster_would_drop(capsys, argv, message):
    # Each was accepted and dropped without a word (--decode 2 ran one decode worker).
    code, err = run_cli(["up", *argv], capsys)
    assert code == 2 and message in err


def test_up_fills_in_only_the_flags_not_given():
    p = argparse.ArgumentParser()
    up.add_arguments(p)
    spec = up.cluster_spec(
        p.parse_args(["--mode", "static-pd", "--workers", "3", "--prefill", "1"])
    )
    assert spec == mode_spec(Mode.STATIC_PD, 3, 1)
    spec = up.cluster_spec(p.parse_args(["--decode", "2", "--policy", "round_robin"]))
    assert (spec.num_prefill, spec.num_decode, spec.num_mixed) == (1, 2, 0)
    assert (spec.policy, spec.num_kvstore, spec.coordinator) == ("round_robin", 1, False)
    spec = up.cluster_spec(p.parse_args(["--coordinator", "--coordinator-args", "--gap-high 0.3"]))
    assert spec.service_args == {"coordinator": ("--gap-high", "0.3")}
    # The kvstore nodes' own flags (their metrics, tracing, disk tier: session 44's probe could
    # not reach them through ``up``).
    spec = up.cluster_spec(p.parse_args(["--kvstore-args", "--tracing otlp", "--metrics"]))
    assert spec.service_args == {"kvstore": ("--tracing", "otlp")} and spec.metrics


def test_up_says_which_extra_flags_its_cluster_does_not_use():
    # Said, not refused: ``bench compare --up-args`` gives every mode the same flags.
    p = argparse.ArgumentParser()
    up.add_arguments(p)
    spec = up.cluster_spec(p.parse_args(["--mode", "colocated", "--coordinator-args", "--x 1",
                                         "--prefill-args", "--y 2", "--router-args", "--z 3"]))  # fmt: skip
    assert spec.unused_service_args == ["coordinator", "prefill"]
    spec = up.cluster_spec(p.parse_args(["--mode", "banaserve", "--coordinator-args", "--x 1"]))
    assert spec.unused_service_args == []


@pytest.mark.parametrize("flag", ["--router-args", "--prefill-args", "--decode-args",
                                  "--coordinator-args", "--kvstore-args"])  # fmt: skip
@pytest.mark.usefixtures("nothing_starts")
def test_up_refuses_extra_flags_no_shell_would_split(capsys, flag):
    code, err = run_cli(["up", "--coordinator", flag, "--x 'unbalanced"], capsys)
    assert code == 2 and f"argument {flag}: No closing quotation" in err


# -- B5, A7, A8, A9: certs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([""], "argument dir: expected a path, got ''"),
        (["{d}/a-file"], "a-file is a file, not a directory"),
        (["{d}/a-file/sub"], "cannot create the directory"),
        (["{d}/new", "--days", "99999999"], "days must be in 1..36500, got 99999999"),
        (["{d}/new", "--days", "1.5"], "expected an integer, got '1.5'"),  # not "a number"
        (["{d}/new", "--host", "bad host name!"], "host 'bad host name!' is not a DNS name"),
        (["{d}/new", "--host", "x" * 300], "is not a DNS name"),
        (["{d}/new", "--host", "a..b"], "is not a DNS name"),
    ],
)
def test_certs_refuses_a_bad_input_before_writing_anything(
    tmp_path, monkeypatch, capsys, argv, message
):
    # "" wrote every key into the current directory; the others were tracebacks.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    code, err = run_cli(["certs", *[a.format(d=tmp_path) for a in argv]], capsys)
    assert code == 2 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_certs_writes_a_unicode_host_as_its_a_label(tmp_path, capsys):
    from cryptography import x509

    code, _ = run_cli(["certs", str(tmp_path / "tls"), "--host", "ünicode.example"], capsys)
    assert code == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "router.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "xn--nicode-2ya.example" in names.get_values_for_type(x509.DNSName)


# -- A10: models prepare ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dir", "{d}/a-file"], "--dir {d}/a-file is a file, not a directory"),
        (["--dir", "{d}/a-file/sub"], "cannot create the directory"),
        (["--dir", ""], "argument --dir: expected a path, got ''"),
    ],
)
def test_models_prepare_refuses_a_dir_it_cannot_use(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(prepare, "prepare_model", fail("a model was built"))
    (tmp_path / "a-file").write_text("")
    argv = [a.format(d=tmp_path) for a in argv]
    code, err = run_cli(["models", "prepare", "tiny-llama", *argv], capsys)
    assert code == 2 and message.format(d=tmp_path) in err


# -- A5, A6, C4, C5, D1: loadtest ---------------------------------------------------------------


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(loadtest_cli, "drive", fail("load was sent"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["decode", "--block-size", "0"], "argument --block-size: expected a positive number"),
        (["router", "--warmup", "-1"], "argument --warmup: expected a number >= 0"),
        (["router", "--p99-target-ms", "nan"], "argument --p99-target-ms: expected a positive"),
        (["router", "--max-requests", "0"], "argument --max-requests: expected a positive"),
        (["router", "--max-in-flight", "0"], "argument --max-in-flight: expected a positive"),
        (
            ["router", "--p99-target-ms", "100", "--slo", "nosuchname"],
            "--slo 'nosuchname': this load test records request, Generate, Generate first token",
        ),
        (["kvstore", "--op", "read", "--p99-target-ms", "9", "--slo", "Commit"], "records fetch"),
        (["router", "--slo", "Generate"], "--slo names what --p99-target-ms applies to"),
        (["router", "--out", "{d}/a-file"], "--out {d}/a-file is a file, not a directory"),
        (["router", "--out", "{d}/a-file/sub"], "cannot create the directory"),
        (["router", "--out", ""], "argument --out: expected a path, got ''"),
    ],
)
def test_loadtest_refuses_bad_flags_before_any_load(tmp_path, capsys, no_load, argv, message):
    # --block-size 0: ZeroDivisionError; --out FILE: the load ran first, then a traceback;
    # --slo nosuchname: "no step passed", exit 0.
    (tmp_path / "a-file").write_text("")
    argv = [a.format(d=tmp_path) for a in argv]
    code, err = run_cli(["loadtest", argv[0], "--target", ROUTER, *argv[1:]], capsys)
    assert code == 2 and message.format(d=tmp_path) in err


def test_a_decode_load_with_no_block_size_is_refused():
    with pytest.raises(ConfigError, match="block size must be >= 1, got 0"):
        DecodeLoad(block_size=0)


class _Refused:
    name = "request"
    sample_names = ("request",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def run_one(self, index: int, rec: object) -> None:
        raise self.exc


def test_a_failed_warm_up_is_one_line_with_its_status_and_details():
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="failed to connect to all addresses",
        debug_error_string="UNKNOWN:Error received from peer {grpc_status:14, ...}",
    )
    with pytest.raises(ConfigError) as refused:
        asyncio.run(warm_up(_Refused(exc), 1))
    assert str(refused.value) == (
        "warm-up iteration failed: UNAVAILABLE: failed to connect to all addresses"
    )


# -- A6, A11, A12, C6: bench --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "guard", "message"),
    [
        (["serve", "--target", f"grpc://{ROUTER}", "--out", "{d}/a-file"], (serve_bench, "bench"),
         "--out {d}/a-file is a file"),
        (["compare", "--plan-only", "--out", "{d}/a-file/sub"], (compare, "jobs_from_args"),
         "cannot create the directory"),
        (["transport", "--out", "{d}/a-file"], (transport_bench, "bench"), "is a file"),
        (["transport", "--iterations", "0"], (transport_bench, "bench"),
         "argument --iterations: expected a positive number"),
        (["compare", "--quick", "--profile", "full", "--plan-only"], (compare, "jobs_from_args"),
         "argument --profile: not allowed with argument --quick"),
        (["compare", "--plan-only", "--up-args", "--x 'y"], (compare, "jobs_from_args"),
         "argument --up-args: No closing quotation"),
        (["compare", "--plan-only", "--up-args", "--decode 2"], (compare, "jobs_from_args"),
         "--up-args for mode colocated: mode colocated decides num_decode"),
        (["store-ttft", "--router", ROUTER, "--kvstore", ROUTER, "--pairs", "0"], None,
         "argument --pairs: expected a positive number"),
        (["store-ttft", "--router", ROUTER, "--kvstore", ROUTER, "--cached-share", "2"], None,
         "argument --cached-share: expected a share in (0, 1)"),
        (["store-ttft", "--router", ROUTER, "--kvstore", ROUTER, "--cached-share", "nan"], None,
         "expected a share in (0, 1)"),
    ],
)  # fmt: skip
def test_bench_refuses_bad_flags_and_outputs_before_the_run(
    tmp_path, monkeypatch, capsys, argv, guard, message
):
    # Each ran first (a load, a plan, 3 s of transfers), then ended in a traceback.
    (tmp_path / "a-file").write_text("")
    if guard:
        monkeypatch.setattr(*guard, fail("the benchmark ran"))
    code, err = run_cli(["bench", *[a.format(d=tmp_path) for a in argv]], capsys)
    assert code == 2 and message.format(d=tmp_path) in err


def test_store_ttft_against_nothing_is_one_error_line(tmp_path, capsys):
    argv = ["bench", "store-ttft", "--router", ROUTER, "--kvstore", ROUTER, "--pairs", "1"]
    code, err = run_cli([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and err.startswith("banaserve: error: --router: UNAVAILABLE: ")
    assert len(err.splitlines()) == 1


# -- A13: the coordinator checks its settings before its server exists --------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--auto", "--router", ROUTER, "--gap-high", "nan"], "need 0 < gap_low < gap_high"),
        (["--auto"], "--auto needs --router"),
    ],
)
def test_the_coordinator_refuses_its_settings_before_building_a_server(
    monkeypatch, caplog, argv, message
):
    # The server was built first and never shut down: "Exception ignored in Server.__del__".
    monkeypatch.setattr(coordinator_main, "start_server", fail("a server was built"))
    monkeypatch.setattr(coordinator_main.Ownership, "acquire", fail("Redis was called"))
    with caplog.at_level(logging.ERROR):
        code = coordinator_main.main([*argv, "--redis", "redis://127.0.0.1:1/0"])
    assert code == 2
    assert any(message in r.getMessage() for r in caplog.records)


# -- B6: a stop asked for while up starts -------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_up_stopped_while_starting_exits_with_the_signal_and_is_never_ready(
    monkeypatch, capsys, signum, code
):
    """The signal handler sets ``stopping``; LocalCluster.start sees it and gives up (the real
    processes: tests/e2e/test_up.py). ``up`` said "cluster ready" first, then exited 0."""
    handlers: dict[int, object] = {}
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    monkeypatch.setattr(up, "resolve_model", lambda model: model)

    class Cluster:
        def __init__(self, spec: ClusterSpec, stopping: threading.Event) -> None:
            self.stopping = stopping

        def start(self) -> None:
            handlers[signum](signum, None)  # the signal arrives while a child starts
            if self.stopping.is_set():
                raise StartInterrupted("stopped while router was starting")

    monkeypatch.setattr(up, "LocalCluster", Cluster)
    assert main(["up"]) == code
    out, err = capsys.readouterr()
    assert err == "banaserve: stopped while router was starting; stopped every service started\n"
    assert out == ""  # no addresses, no "cluster ready"


@pytest.mark.usefixtures("nothing_starts")
def test_a_flags_of_flags_value_that_is_one_flag_with_its_value_is_taken(capsys):
    """Probe, session 44: ``--kvstore-args "--disk-dir=/x"`` (a value that starts with '-' and
    holds no space) was refused by argparse as a flag of its own, "expected one argument"; it
    is read as ``--kvstore-args=--disk-dir=/x``, here refused for what it says."""
    code, err = run_cli(["up", "--kvstore", "2", "--kvstore-args", "--disk-dir=/tmp/x"], capsys)
    assert code == 2 and "--disk-dir names one process's port, address, id or directory" in err
    assert "expected one argument" not in err
