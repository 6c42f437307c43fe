"""The ``banaserve`` command line: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import os
import sys

from services.common.grpc_env import quiet_grpc_core

quiet_grpc_core()  # before anything imports grpc: a client command's stderr is the user's

from services.common.arg_types import host_port, path_arg, positive, thread_count, utf8_text  # noqa: E402
from services.common.errors import BanaServeError, ConfigError  # noqa: E402
from services.rpc.probe import add_health_parser  # noqa: E402
from services.sim.cli import add_sim  # noqa: E402


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion in-process and stream it to stdout")
    p.add_argument("--model", default="tiny-llama", help="prepared model name or model directory")
    p.add_argument("--prompt", type=utf8_text, required=True)
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--threads", type=thread_count, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--router",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="send the request to a running cluster's router instead of running in-process "
        "(--model, --dtype and --threads are then the cluster's)",
    )
    # The next three only mean something to a router; in-process they are refused, not ignored.
    p.add_argument(
        "--timeout", type=positive(float), default=None, help="with --router: deadline in seconds"
    )
    p.add_argument("--tls-dir", default=None, help="with --router: the client certificate's dir")
    p.add_argument(
        "--api-token-file", default=None, help="with --router: send the file's first token"
    )
    p.set_defaults(func=_run_generate)


REMOTE_ONLY = {"timeout": "--timeout", "tls_dir": "--tls-dir", "api_token_file": "--api-token-file"}


def _run_generate(args: argparse.Namespace) -> int:
    if args.router is not None:
        from services.client.generate_cli import run_remote_generate

        return run_remote_generate(args)
    if given := [flag for name, flag in REMOTE_ONLY.items() if getattr(args, name) is not None]:
        raise ConfigError(f"{', '.join(given)}: only with --router (in-process has no server)")
    from services.engine.generate_cli import run_generate

    return run_generate(args)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="manage local models")
    msub = p.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="build tiny-llama and convert smollm2-135m locally")
    prep.add_argument("names", nargs="*", help="models to prepare (default: all)")
    prep.add_argument(
        "--dir",
        type=path_arg,
        default=None,
        help="models directory (default: $BANASERVE_HOME/models)",
    )
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    prep.set_defaults(func=_run_models_prepare)


def _run_models_prepare(args: argparse.Namespace) -> int:
    from services.engine.models.prepare import run_prepare_cli

    return run_prepare_cli(args)


def _add_bench(sub: argparse._SubParsersAction, full: bool = True) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    if not full:  # the benchmarks import torch and vLLM glue: seconds, for no other command
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    bsub = p.add_subparsers(dest="bench_command", required=True)
    eng = bsub.add_parser(
        "engine", help="engine prefill/decode throughput vs vLLM and transformers"
    )
    from bench.engine_bench import add_arguments

    add_arguments(eng)
    eng.set_defaults(func=_run_bench_engine)
    srv = bsub.add_parser("serve", help="load generator: grpc:// router or openai:// (vLLM) server")
    from bench.serve_bench import add_arguments as add_serve_arguments

    add_serve_arguments(srv)
    srv.set_defaults(func=_run_bench_serve)
    tr = bsub.add_parser(
        "transport", help="data-plane throughput: UCX vs TCP vs gRPC, server in its own process"
    )
    from bench.transport_bench import add_arguments as add_transport_arguments

    add_transport_arguments(tr)
    tr.set_defaults(func=_run_bench_transport)
    st = bsub.add_parser(
        "store-ttft", help="TTFT of a long prompt, cold vs its prefix served by the KV store"
    )
    from bench.store_ttft import add_arguments as add_store_arguments

    add_store_arguments(st)
    st.set_defaults(func=_run_bench_store_ttft)
    mig = bsub.add_parser("migration", help="layer migration: 1P1D with vs without, time split")
    from bench import migration_bench

    migration_bench.add_arguments(mig)
    mig.set_defaults(func=migration_bench.run)
    cmp = bsub.add_parser(
        "compare", help="the same workloads on colocated, static-pd and banaserve clusters"
    )
    from bench.compare import add_arguments as add_compare_arguments

    add_compare_arguments(cmp)
    cmp.set_defaults(func=_run_bench_compare)


def _run_bench_compare(args: argparse.Namespace) -> int:
    from bench.compare import run

    return run(args)


def _run_bench_store_ttft(args: argparse.Namespace) -> int:
    from bench.store_ttft import run

    return run(args)


def _run_bench_transport(args: argparse.Namespace) -> int:
    from bench.transport_bench import run

    return run(args)


def _run_bench_engine(args: argparse.Namespace) -> int:
    from bench.engine_bench import run

    return run(args)


def _add_up(sub: argparse._SubParsersAction) -> None:
    from services.up import add_arguments

    p = sub.add_parser("up", help="start a local cluster: router, prefill and decode workers")
    add_arguments(p)
    p.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from services.up import run_up

    return run_up(args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from services.demo import add_arguments

    p = sub.add_parser(
        "demo", help="start a local cluster on the real model and ask it a few questions"
    )
    add_arguments(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    return run_demo(args)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from bench.serve_bench import run

    return run(args)


def _add_loadtest(sub: argparse._SubParsersAction) -> None:
    from bench.loadtest.cli import add_arguments

    p = sub.add_parser(
        "loadtest",
        help="drive one service alone (router, prefill, decode, kvstore, coordinator), per RPC",
    )
    add_arguments(p)
    p.set_defaults(func=_run_loadtest)


def _run_loadtest(args: argparse.Namespace) -> int:
    from bench.loadtest.cli import run

    return run(args)


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs", help="create a cluster CA and one certificate per service role (docs/security.md)"
    )
    p.add_argument(
        "dir",
        type=path_arg,
        help="directory to write ca.crt, <role>.crt/.key, dataplane.secret, redis.secret to",
    )
    p.add_argument(  # at most a century: checked with the rest in create_certs
        "--days", type=positive(int), default=365, help="validity of every certificate"
    )
    p.add_argument(
        "--host", action="append", default=[], help="extra DNS name in every certificate"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the files DIR holds")
    p.set_defaults(func=_run_certs)


def _run_certs(args: argparse.Namespace) -> int:
    from services.rpc.certs import create_certs

    for path in create_certs(args.dir, days=args.days, hosts=args.host, overwrite=args.overwrite):
        print(path)
    return 0


def _add_migrations(sub: argparse._SubParsersAction) -> None:
    from services.coordinator import cli

    p = sub.add_parser("migrate", help="start, revert or abort a migration (the coordinator)")
    cli.add_migrate_arguments(p)
    p.set_defaults(func=cli.run_migrate)
    p = sub.add_parser("migrations", help="list the coordinator's migrations, or describe one")
    cli.add_migrations_arguments(p)
    p.set_defaults(func=cli.run_migrations)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole CLI; the ``bench`` commands' own flags only when ``argv`` runs one (or when
    ``argv`` is None), since building them imports torch."""
    parser = argparse.ArgumentParser(prog="banaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_models(sub)
    _add_up(sub)
    _add_demo(sub)
    _add_bench(sub, full=argv is None or "bench" in argv)
    _add_loadtest(sub)
    _add_certs(sub)
    add_health_parser(sub)
    _add_migrations(sub)
    add_sim(sub, full=argv is None or "sim" in argv)
    return parser


# Flags whose value is other flags, in one string (``up --decode-args "--max-num-seqs 64"``).
# argparse takes a value that starts with '-' and holds no space (``--kvstore-args
# "--disk-dir=/x"``) for a flag of its own and refused it, "expected one argument" (probe,
# session 44); ``main`` joins such a pair as ``--kvstore-args=--disk-dir=/x``, which it reads.
FLAGS_OF_FLAGS = frozenset(
    {"--router-args", "--prefill-args", "--decode-args", "--kvstore-args", "--coordinator-args",
     "--up-args"}
)  # fmt: skip


def join_flags_of_flags(argv: list[str]) -> list[str]:
    joined: list[str] = []
    pending = ""
    for arg in argv:
        if pending:
            joined.append(f"{pending}={arg}")
            pending = ""
        elif arg in FLAGS_OF_FLAGS:
            pending = arg
        else:
            joined.append(arg)
    return joined + ([pending] if pending else [])  # a last one without its value: argparse's


def main(argv: list[str] | None = None) -> int:
    argv = join_flags_of_flags(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except BanaServeError as exc:
        print(f"banaserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader left (``| head``): stop quietly, as a filter does
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a command killed by it


if __name__ == "__main__":
    sys.exit(main())
