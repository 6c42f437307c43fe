"""``banaserve bench serve``: an open-loop load generator for a serving endpoint.

Lifecycle of a run:

1. build the workload (``bench.serve_workload``) and the arrival times from ``--seed``: a fixed
   ``--num-requests``, or every arrival before ``--duration`` seconds;
2. open the target (``bench.serve_targets``: ``grpc://`` a BanaServe router, ``openai://`` an
   OpenAI-compatible server such as vLLM's) and send each request at its arrival time, at most
   ``--max-concurrency`` in flight when given (a request waiting for a slot is timed from when
   it is actually sent), each under its own ``--timeout``. The whole run has a hard deadline
   (``--max-run-s``, default: last arrival + the time the requests could take), after which
   what is in flight is cancelled (``RUN_DEADLINE``) and what is unsent stays ``NOT_SENT``;
3. summarise (``bench.serve_report``), write ``OUT/serve[-LABEL].json`` (config, machine,
   summary and every request's record) and ``.md``, and print the markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.machine import loadavg, machine_info
from bench.serve_report import OK, RequestRecord, load_summary, render_markdown, summarise
from bench.serve_targets import Endpoint, Sampling, Target, TargetError, make_target, parse_target
from bench.serve_workload import WORKLOADS, Request, WorkloadSpec, arrival_times, make_request
from services.common.arg_types import label_arg, non_negative, path_arg, positive
from services.common.errors import ConfigError
from services.common.paths import output_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NUM_REQUESTS = 100
DEADLINE_GRACE_S = 10.0

# ---- arguments --------------------------------------------------------------------------


def vocab_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        lo, hi = -1, -1
    if not sep or not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH with 0 <= LOW < HIGH, got {text!r}")
    return lo, hi


def target_url(text: str) -> Endpoint:
    try:
        return parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``banaserve bench serve`` flags."""
    p.add_argument("--target", type=target_url, required=True,
                   help="grpc://HOST:PORT (BanaServe router) or openai://HOST:PORT (vLLM etc.)")  # fmt: skip
    p.add_argument("--model", default=None, help="served model name (openai:// targets)")
    p.add_argument("--workload", choices=WORKLOADS, default="sharegpt-like")
    p.add_argument("--input-len", type=positive(int), default=None,
                   help="mean/nominal input tokens (shared-prefix: the unique suffix); "
                   "default by workload: 200, 1024, 64, 128")  # fmt: skip
    p.add_argument("--output-len", type=positive(int), default=None,
                   help="mean/nominal output tokens; default by workload: 120, 16, 512, 64")  # fmt: skip
    p.add_argument("--range-ratio", type=float, default=0.1,
                   help="fixed-length workloads: lengths uniform in L×[1-r, 1+r]")  # fmt: skip
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: prefix tokens")
    p.add_argument("--num-prefixes", type=positive(int), default=4,
                   help="shared-prefix: distinct prefixes")  # fmt: skip
    p.add_argument("--max-model-len", type=positive(int), default=2048,
                   help="input + output tokens are clipped to this")  # fmt: skip
    p.add_argument("--vocab-range", type=vocab_range, default=(1000, 30000),
                   help="prompt token ids are drawn from [LOW, HIGH) (default 1000:30000)")  # fmt: skip
    p.add_argument("--rate", type=positive(float, allow_inf=True), default=1.0,
                   help="mean arrivals per second, or inf to send all at once (default 1)")  # fmt: skip
    p.add_argument("--burstiness", type=positive(float), default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 Poisson, <1 burstier")  # fmt: skip
    p.add_argument("--num-requests", type=positive(int), default=None,
                   help=f"requests to send (default {DEFAULT_NUM_REQUESTS} unless --duration)")  # fmt: skip
    p.add_argument("--duration", type=positive(float), default=None,
                   help="send arrivals for this many seconds (with --num-requests: first limit)")  # fmt: skip
    p.add_argument("--max-concurrency", type=positive(int), default=None,
                   help="requests in flight at most (default: unlimited)")  # fmt: skip
    p.add_argument("--timeout", type=positive(float), default=120.0,
                   help="seconds allowed per request (default 120)")  # fmt: skip
    p.add_argument("--max-run-s", type=positive(float), default=None,
                   help="hard deadline of the whole run (default: computed, see docs)")  # fmt: skip
    p.add_argument("--slo-ttft-ms", type=positive(float), default=1000.0)
    p.add_argument("--slo-tpot-ms", type=positive(float), default=100.0)
    p.add_argument(
        "--temperature", type=non_negative(float), default=0.0, help="0: greedy (default)"
    )
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the sampled output length (default: on)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    p.add_argument("--out", type=path_arg, default=REPO_ROOT / "bench" / "results",
                   help="output directory for serve.json and serve.md")  # fmt: skip
    p.add_argument(
        "--label", type=label_arg, default=None, help="file suffix: serve-LABEL.json / .md"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def spec_from_args(args: argparse.Namespace) -> WorkloadSpec:
    try:
        return WorkloadSpec(
            name=args.workload, input_len=args.input_len, output_len=args.output_len,
            range_ratio=args.range_ratio, max_model_len=args.max_model_len,
            vocab_low=args.vocab_range[0], vocab_high=args.vocab_range[1],
            num_prefixes=args.num_prefixes, prefix_len=args.prefix_len, seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def plan_from_args(args: argparse.Namespace, spec: WorkloadSpec) -> list[tuple[Request, float]]:
    """``(request, send offset in seconds)`` for every request of the run."""
    count = args.num_requests
    if count is None and args.duration is None:
        count = DEFAULT_NUM_REQUESTS
    try:
        times = arrival_times(args.rate, args.burstiness, args.seed, count, args.duration)
    except ValueError as exc:
        raise ConfigError(f"{exc} (pass --num-requests)") from exc
    return [(make_request(spec, i), t) for i, t in enumerate(times)]


def run_deadline(args: argparse.Namespace, times: list[float]) -> float:
    """Seconds the whole run may take: last arrival, then every request's timeout in turn for
    each concurrency slot (one round when unlimited), plus a grace."""
    if args.max_run_s is not None:
        return args.max_run_s
    rounds = math.ceil(len(times) / args.max_concurrency) if args.max_concurrency else 1
    return max(times, default=0.0) + rounds * args.timeout + DEADLINE_GRACE_S


# ---- progress ---------------------------------------------------------------------------


class Progress:
    """A rich progress bar on stderr when rich is installed, else a plain counter."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self._bar = None
        if not enabled:
            self._step = None
            return
        self._step = max(1, total // 10)
        try:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
        except ImportError:
            return
        self._bar = RichProgress(console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task("requests", total=total)
        self._bar.start()

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"requests ({self.failed} failed)")
        elif self._step and (self.done % self._step == 0 or self.done == self.total):
            print(f"serve: {self.done}/{self.total} done, {self.failed} failed", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---- sending ----------------------------------------------------------------------------


async def send(
    target: Target, request: Request, record: RequestRecord, start: float, timeout_s: float,
    limit: asyncio.Semaphore | None, progress: Progress,
) -> None:  # fmt: skip
    """Stream one request into ``record``; never raises except to be cancelled."""
    async with limit or contextlib.nullcontext():
        sent = time.perf_counter()
        record.sent_at_s = sent - start
        try:
            async with (
                asyncio.timeout(timeout_s),
                contextlib.aclosing(target.stream(request, timeout_s)) as stream,
            ):
                async for n in stream:
                    record.chunks.append((time.perf_counter() - sent, n))
                    record.num_output_tokens += n
            record.status = OK
            record.server = target.server_side(request)
        except TimeoutError:
            record.fail("TIMEOUT", f"no end of stream within {timeout_s:g} s")
        except TargetError as exc:
            record.fail(exc.status, exc.message)
        except asyncio.CancelledError:
            record.fail("RUN_DEADLINE", "cancelled at the run's deadline")
            raise
        except Exception as exc:  # a protocol surprise fails this request, not the run
            record.fail(type(exc).__name__, str(exc))
        finally:
            record.e2e_s = time.perf_counter() - sent
            progress.advance(record.ok)


async def drive(
    target: Target, plan: list[tuple[Request, float]], args: argparse.Namespace,
    progress: Progress,
) -> list[RequestRecord]:  # fmt: skip
    """Send every request at its time; return once all ended or the run's deadline passed."""
    records = [
        RequestRecord(r.index, len(r.prompt), r.max_tokens, sent_at_s=at, prefix_id=r.prefix_id)
        for r, at in plan
    ]
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    tasks: list[asyncio.Task] = []
    start = time.perf_counter()
    try:
        async with asyncio.timeout(run_deadline(args, [at for _, at in plan])):
            for (request, at), record in zip(plan, records, strict=True):
                await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
                task = send(target, request, record, start, args.timeout, limit, progress)
                tasks.append(asyncio.create_task(task))
            await asyncio.gather(*tasks)
    except TimeoutError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return records


async def bench(args: argparse.Namespace, plan: list[tuple[Request, float]]) -> list:
    sampling = Sampling(temperature=args.temperature, ignore_eos=args.ignore_eos)
    try:
        target = make_target(args.target, args.model, sampling)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    progress = Progress(len(plan), enabled=not args.no_progress)
    samples: list[dict[str, int]] = []
    sampler = asyncio.create_task(sample_queues(target, samples))
    try:
        return await drive(target, plan, args, progress), samples
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        progress.close()
        await target.close()


async def sample_queues(target: Target, samples: list[dict[str, int]], every_s=0.1) -> None:
    """Queued prefill tokens per prefill worker, every ``every_s`` (for the load skew)."""
    while True:
        try:
            queues = await target.prefill_queues()
        except Exception:  # a sample missed is not a failed run
            queues = {}
        if queues is None:
            return
        if queues:
            samples.append(queues)
        await asyncio.sleep(every_s)


# ---- report -----------------------------------------------------------------------------


def config_of(args: argparse.Namespace, spec: WorkloadSpec, num_requests: int) -> dict:
    return {
        "target": f"{args.target.scheme}://{args.target.address}",
        "model": args.model,
        "workload": spec.name,
        "lengths": dict(zip(("input_len", "output_len"), spec.lengths, strict=True)),
        "spec": asdict(spec),
        "rate": args.rate,
        "burstiness": args.burstiness,
        "num_requests": args.num_requests
        or (DEFAULT_NUM_REQUESTS if args.duration is None else None),
        "num_sent": num_requests,
        "duration_s": args.duration,
        "max_concurrency": args.max_concurrency,
        "timeout_s": args.timeout,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
    }


def build_report(
    config: dict, machine: dict, records: list[RequestRecord], samples: list | None = None
) -> dict:
    summary = summarise(records, config["slo_ttft_ms"], config["slo_tpot_ms"])
    summary["load"] = load_summary(samples or [], records)
    return {
        "benchmark": "serve",
        "config": config,
        "machine": machine,
        "summary": summary,
        "requests": [r.to_json() for r in records],
    }


def json_safe(value: object) -> object:
    """``inf`` as the string "inf": JSON has no infinity."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, write serve.json and serve.md, print the table."""
    spec = spec_from_args(args)
    plan = plan_from_args(args, spec)
    out = output_dir(Path(args.out), "--out")  # before any request: no run lost to it
    machine = machine_info()
    started = time.monotonic()
    records, samples = asyncio.run(bench(args, plan))
    machine |= {"loadavg_after": loadavg(), "wall_seconds": round(time.monotonic() - started, 1)}
    report = build_report(config_of(args, spec, len(plan)), machine, records, samples)
    markdown = render_markdown(report)
    stem = f"serve-{args.label}" if args.label else "serve"
    (out / f"{stem}.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    return 0 if report["summary"]["num_ok"] else 1
