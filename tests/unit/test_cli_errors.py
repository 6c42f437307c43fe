"""Bad flags and settings on the command line: a usage error or one ``error:`` line, exit
status 2, before anything starts — never a traceback (the ``sim`` commands: tests/sim/
test_cli_inputs.py)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest

from services import up
from services.cli import main
from services.common.errors import ConfigError, ModelNotFoundError
from services.rpc.server import run_service


def run_cli(argv: list[str], capsys) -> tuple[int, str]:  # noqa: ANN001
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def nothing_starts(monkeypatch):
    def started(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(up, "LocalCluster", started)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "static-pd", "--workers", "0"], "argument --workers: expected a positive"),
        (["--threads", "0"], "argument --threads: expected 1..1024, got '0'"),
        (["--num-kv-blocks", "-3"], "argument --num-kv-blocks: expected a positive number"),
        (["--kvstore", "-1"], "argument --kvstore: expected a number >= 0"),
        (["--decode", "-1"], "argument --decode: expected a number >= 0"),
        (["--kvstore-capacity-bytes", "0"], "expected a positive number"),
        (["--store-write-back-delay", "-1"], "expected a number >= 0"),
        (["--model", "no-such-model"], "'no-such-model' is neither a model directory"),
        (["--mode", "static-pd", "--workers", "1"], "needs more workers than 1"),
    ],
)
def test_up_refuses_a_cluster_it_cannot_start_before_starting_any(
    nothing_starts, capsys, argv, message
):
    code, err = run_cli(["up", *argv], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "0"], "argument --duration: expected a positive number"),
        (["--rate-scale", "-1"], "argument --rate-scale: expected a positive number"),
        (["--drain-s", "nan"], "argument --drain-s: expected a number >= 0"),
        (["--warmup", "-2"], "argument --warmup: expected a number >= 0"),
        (["--workloads", "mooncake", "--traces-dir", "/nonexistent"], "trace /nonexistent/"),
    ],
)
def test_bench_compare_refuses_bad_flags_before_any_cluster(tmp_path, capsys, argv, message):
    code, err = run_cli(["bench", "compare", "--plan-only", "--out", str(tmp_path), *argv], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("error", [ConfigError("num_kv_blocks must be positive, got -3"),
                                   ModelNotFoundError("'x' is not a known model")])  # fmt: skip
def test_a_service_that_refuses_its_settings_exits_2_with_one_line(error, caplog):
    async def serve(args: argparse.Namespace) -> None:
        raise error

    with caplog.at_level(logging.ERROR):
        code = run_service(lambda argv: argparse.Namespace(log_level="INFO"), serve, [])
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"error: {error}"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["layers", "--donor", "d", "--helper", "p", "--start", "-1"], "argument --start"),
        (
            ["layers", "--donor", "d", "--helper", "p", "--start", "2", "--end", "0"],
            "argument --end",
        ),
        (["attention", "--donor", "d", "--helper", "p", "--max-blocks", "-4"], "--max-blocks"),
        # Session 40's probe: past a uint32, a traceback ("Value out of range")
        (
            ["layers", "--donor", "d", "--helper", "p", "--start", "99999999999999"],
            "argument --start: expected at most 4294967295",
        ),
        (
            ["layers", "--donor", "d", "--helper", "p", "--start", "2", "--end", str(1 << 32)],
            "argument --end: expected at most 4294967295",
        ),
        (
            ["attention", "--donor", "d", "--helper", "p", "--max-sequences", "5000000000"],
            "argument --max-sequences: expected at most 4294967295",
        ),
        (
            ["revert", "m-1", "--wait", "--wait-timeout", "1e308"],
            "argument --wait-timeout: expected at most 86400",
        ),
    ],
)
def test_migrate_refuses_bad_numbers_before_calling_the_coordinator(capsys, argv, message):
    # --start -1 went into the proto's uint32 field: a traceback.
    code, err = run_cli(["migrate", *argv, "--coordinator", "127.0.0.1:1"], capsys)
    assert code == 2 and message in err


def test_a_reader_that_leaves_early_stops_the_command_quietly(tmp_path):
    """``banaserve ... | head -1``: the reader closes the pipe; the command ends with 141 (as if
    killed by SIGPIPE), no traceback (a real process: the flush at exit is part of it)."""
    script = (
        "import sys\n"
        "from services import cli\n"
        "def flood(args):\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "real = cli.build_parser\n"
        "def build(argv):\n"
        "    p = real(argv)\n"
        "    parse = p.parse_args\n"
        "    p.parse_args = lambda a=None: setattr(ns := parse(a), 'func', flood) or ns\n"
        "    return p\n"
        "cli.build_parser = build\n"
        "sys.exit(cli.main(['health', '127.0.0.1:1']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()  # the reader leaves
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_a_coordinator_command_sent_to_another_service_says_what_to_check(capsys):
    # Session 40's probe: only "UNIMPLEMENTED: Method not found!" when --coordinator named the
    # router's port.
    import grpc

    from services.coordinator.cli import _refused

    class Unimplemented(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNIMPLEMENTED

        def details(self):
            return "Method not found!"

    assert _refused(Unimplemented(), argparse.Namespace(tls_dir="", api_token_file="")) == 2
    assert capsys.readouterr().err == (
        "banaserve: error: UNIMPLEMENTED: Method not found! (is --coordinator a coordinator's "
        "address? `banaserve up` prints it)\n"
    )
