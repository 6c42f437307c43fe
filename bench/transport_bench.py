"""``python -m bench.transport_bench``: one-way throughput of the data plane's transports.

What is measured: for each transport (``services.rpc.dataplane``: ucx, tcp, grpc) and payload
size, the wall time of one full request/response on an open connection, with the payload in the
request and an empty response, so it is a one-way transfer plus one small-message round trip.
Throughput is ``payload bytes / time`` in GB/s (10^9 bytes); the p90 throughput is the one at the
p90 time (nine transfers in ten were at least that fast).

Lifecycle of a run:

1. for each transport, start ``python -m bench.transport_bench --serve KIND`` in a separate
   process (a real two-process transfer); it prints one JSON line ``{"address": ...}`` once
   listening, answers every request with an empty response without touching the payload, and
   serves until SIGTERM or until its stdin closes (so it never outlives this process); its log
   goes to ``OUT/logs/transport-KIND.log``;
2. connect; for each size, send one payload of seeded random bytes ``--warmup`` times
   (discarded), then ``--iterations`` times, timed one by one;
3. close the client, stop the server; a transport that fails is recorded as ``{"error": ...}``
   and shown as "n/a (reason)", never fatal;
4. write ``OUT/transport[-LABEL].json`` (config, machine, every sample) and ``.md``, print the
   table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from bench.engine_bench import csv_of
from bench.machine import loadavg, machine_info
from bench.serve_report import distribution, fmt
from services.common.arg_types import label_arg, non_negative, path_arg, positive
from services.common.paths import output_dir
from services.rpc.dataplane import KINDS, DataPlaneError, connect, serve

REPO_ROOT = Path(__file__).resolve().parents[1]
UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
SERVER_START_S = 60.0
METHOD = (
    "each figure is one request/response on an open connection: the payload in the request, an "
    "empty response (one-way transfer + one small round trip); server in its own process; "
    "{warmup} warm-up requests discarded, then {iterations} timed; GB/s = 10^9 bytes/s; "
    "p90 GB/s is the throughput at the p90 time."
)


# ---- arguments --------------------------------------------------------------------------


def size_list(text: str) -> list[int]:
    """ "1MiB,64MiB" (units B, KiB, MiB, GiB; none means bytes) -> sizes in bytes."""
    sizes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        digits = item.rstrip("BbKkMmGgIi")
        unit = item[len(digits) :].upper()
        if not digits.isdigit() or unit not in UNITS or int(digits) <= 0:
            raise argparse.ArgumentTypeError(f"expected sizes like 1MiB,64MiB; got {text!r}")
        sizes.append(int(digits) * UNITS[unit])
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected sizes like 1MiB,64MiB; got {text!r}")
    return list(dict.fromkeys(sizes))


def label_of(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's flags (``banaserve bench transport`` once wired into the CLI)."""
    p.add_argument("--transports", type=csv_of(KINDS), default=list(KINDS),
                   help="comma-separated, from ucx,tcp,grpc (default: all)")  # fmt: skip
    p.add_argument("--sizes", type=size_list, default=[1 << 20, 64 << 20],
                   help="payload sizes (default: 1MiB,64MiB)")  # fmt: skip
    p.add_argument("--iterations", type=positive(int), default=20, help="timed requests per size")
    p.add_argument(
        "--warmup", type=non_negative(int), default=3, help="discarded requests per size"
    )
    p.add_argument(
        "--timeout", type=positive(float), default=60.0, help="seconds one request may take"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the payload bytes")
    p.add_argument("--out", type=path_arg, default=REPO_ROOT / "bench" / "results",
                   help="output directory for transport.json and transport.md")  # fmt: skip
    p.add_argument(
        "--label", type=label_arg, default=None, help="file suffix: transport-LABEL.json / .md"
    )


# ---- the server process -----------------------------------------------------------------


async def sink(header: bytes, payload: memoryview) -> tuple[bytes, bytes]:
    return b"", b""


async def serve_until_told(kind: str) -> None:
    """Serves ``kind`` until SIGTERM/SIGINT or until stdin reaches EOF (the parent is gone)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    server = serve(kind, sink)
    await server.start()
    print(json.dumps({"address": server.address, "pid": os.getpid()}), flush=True)
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(stdin.read())}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    await server.stop(grace_s=1.0)


# ---- the client -------------------------------------------------------------------------


async def start_server(kind: str, log_path: Path) -> tuple[asyncio.subprocess.Process, str]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.transport_bench", "--serve", kind,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            cwd=REPO_ROOT,
        )  # fmt: skip
    try:
        return proc, await asyncio.wait_for(read_address(proc.stdout), SERVER_START_S)
    except (TimeoutError, EOFError):
        await stop_server(proc)
        raise RuntimeError(f"{kind} server did not start; see {log_path}") from None


async def read_address(stdout: asyncio.StreamReader) -> str:
    """The server's ``{"address": ...}`` line; UCX may log to stdout before it (UCX_LOG_LEVEL)."""
    while line := await stdout.readline():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return json.loads(line)["address"]
    raise EOFError("server exited before reporting its address")


async def stop_server(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def time_requests(client, payload: np.ndarray, args: argparse.Namespace) -> list[float]:
    for _ in range(args.warmup):
        await client.request(b"bench", payload, timeout_s=args.timeout)
    samples = []
    for _ in range(args.iterations):
        started = time.perf_counter()
        await client.request(b"bench", payload, timeout_s=args.timeout)
        samples.append(time.perf_counter() - started)
    return samples


async def bench_transport(kind: str, args: argparse.Namespace) -> dict[int, dict]:
    """Samples per size for one transport, or ``{"error": ...}`` per size if it failed."""
    rng = np.random.default_rng(args.seed)
    log_path = Path(args.out) / "logs" / f"transport-{kind}.log"
    results: dict[int, dict] = {}
    try:
        proc, address = await start_server(kind, log_path)
    except (RuntimeError, OSError) as exc:
        return dict.fromkeys(args.sizes, {"error": str(exc)})
    try:
        client = await connect(kind, address, timeout_s=30)
        try:
            for size in args.sizes:
                payload = rng.integers(0, 256, size, dtype=np.uint8)
                results[size] = {"samples_s": await time_requests(client, payload, args)}
        finally:
            await client.close()
    except DataPlaneError as exc:
        results = {size: results.get(size, {"error": str(exc)}) for size in args.sizes}
    finally:
        await stop_server(proc)
    return results


def summarise(size: int, run: dict) -> dict:
    if "error" in run:
        return run
    ms = distribution(run["samples_s"])
    return {
        **run,
        "ms": ms,
        "gbps_median": size / (ms["p50"] / 1e3) / 1e9,
        "gbps_p90": size / (ms["p90"] / 1e3) / 1e9,
    }


async def bench(args: argparse.Namespace) -> list[dict]:
    rows = []
    for kind in args.transports:
        runs = await bench_transport(kind, args)
        for size in args.sizes:
            rows.append({"transport": kind, "size_bytes": size, **summarise(size, runs[size])})
    return rows


# ---- report -----------------------------------------------------------------------------


def versions(kinds: list[str]) -> dict:
    import grpc

    found = {"grpcio": grpc.__version__}
    if "ucx" in kinds:
        from services.rpc.dataplane.ucx import UCX_ENV_DEFAULTS, ucxx_module

        ucxx = ucxx_module()
        found |= {
            "ucxx": ucxx.__version__,
            "ucx": ucxx.__ucx_version__,
            "ucx_env": {k: os.environ.get(k) for k in sorted({*UCX_ENV_DEFAULTS, "UCX_TLS"})},
        }
    return found


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| payload | transport | median ms | p90 ms | median GB/s | p90 GB/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = f"| {label_of(row['size_bytes'])} | {row['transport']} |"
        if "error" in row:
            reason = row["error"].splitlines()[0][:80]
            lines.append(f"{head} n/a ({reason}) | | | |")
            continue
        ms = row["ms"]
        lines.append(
            f"{head} {fmt(ms['p50'], 2)} | {fmt(ms['p90'], 2)} | "
            f"{fmt(row['gbps_median'], 2)} | {fmt(row['gbps_p90'], 2)} |"
        )
    return lines


def render_markdown(report: dict) -> str:
    m = report["machine"]
    soft = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "ucx_env")
    env = " ".join(f"{k}={v}" for k, v in m["versions"].get("ucx_env", {}).items() if v)
    lines = [
        "# Data-plane transport benchmark",
        "",
        f"{m['date']} · {m['cpu_model']} ({m['cpus']} CPUs) · {soft} · "
        f"load avg {m['loadavg_before']} → {m['loadavg_after']}",
        *([f"UCX environment: {env}"] if env else []),
        "",
        *table(report["results"]),
        "",
        "Method: " + METHOD.format(**report["config"]),
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark, writes transport.json and transport.md, prints the table."""
    out = output_dir(Path(args.out), "--out")  # before any transfer: no run lost to it
    machine = machine_info(versions=versions(args.transports))
    started = time.monotonic()
    rows = asyncio.run(bench(args))
    machine |= {"loadavg_after": loadavg(), "wall_seconds": round(time.monotonic() - started, 1)}
    config = {k: getattr(args, k) for k in ("transports", "sizes", "iterations", "warmup", "seed")}
    report = {"config": config, "machine": machine, "results": rows}
    markdown = render_markdown(report)
    stem = f"transport-{args.label}" if args.label else "transport"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0 if all("error" not in row for row in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transport_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--serve", choices=KINDS, help="internal: run one transport's server")
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve_until_told(args.serve))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
