"""``banaserve sim calibrate``: measure this machine, fit the time model, write a profile.

1. load the model in-process (the workers' own ``Engine``, ``--threads`` threads, float32);
2. **prefill**: one fresh prompt per step at each of ``--prefill-lengths`` (prefix cache off),
   ``--repeats`` times after one warm-up, the fastest kept -> ``fit_prefill``;
3. **decode**: for each ``(batch, prompt length)`` point, ``batch`` copies of one prompt (the
   prefix cache computes it once) are prefilled, then ``--decode-steps`` decode steps are timed
   one by one, the median kept with the step's total context -> ``fit_decode``;
4. **layer share**: ``services.coordinator.layer_share.measure`` (the policy's own tool);
5. **transports**: ``bench.transport_bench``'s two-process transfer per data-plane kind
   (tcp; ucx where it starts) at a few sizes -> ``fit_transport``;
6. **migration**: the split recorded by the coordinator (weights, KV copy, switch pause) from a
   ``bench migration`` JSON, or the copy and revert phases of a ``bench compare`` JSON's
   migrations (its coordinator state events), when given, else docs/migration.md's figures;
7. write the profile JSON (``profile.py``) with every raw point, print the fits and their error.

Steps are timed in this thread's CPU time (``time.thread_time``), not wall time: with one torch
thread a step's work runs in the calling thread, so the reading is what the step costs a core
of its own (a pinned worker's), whatever else the shared machine runs meanwhile. Wall time
under contention was measured too and is useless (2-6x the CPU time, +-50 % between points).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import statistics
import time
from pathlib import Path

from services.common.arg_types import (
    name_list,
    non_negative,
    number_list,
    path_arg,
    positive,
    thread_count,
)
from services.common.config import EngineConfig
from services.common.errors import ConfigError
from services.common.paths import output_dir, output_file
from services.sim.fit import fit_decode, fit_prefill, fit_transport, relative_errors
from services.sim.inputs import read_json
from services.sim.profile import DecodeModel, MigrationModel, Profile, TransportModel

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROFILE_DIR = REPO_ROOT / "bench" / "results"
# docs/migration.md ("Figures"): the switch paused the donor 9 ms, the revert 14-30 ms, on
# this machine with smollm2; used when no ``bench migration`` result is given.
DOC_SWITCH_PAUSE_S = 0.009
DOC_REVERT_S = 0.022
# The engines calibrated here keep EngineConfig's batching limits: a prompt past one step's
# token budget is prefilled in chunks (one step's time would not be its prefill's) and a batch
# past max_num_seqs waits in part (the step timed would not be of that batch).
_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
MAX_STEP_TOKENS: int = _ENGINE_DEFAULTS["max_num_batched_tokens"]
MAX_BATCH: int = _ENGINE_DEFAULTS["max_num_seqs"]


# Profiles calibrated on the project's 2-core machine, kept with the code so that `sim run`
# and `sim validate` work before anyone calibrates (docs/simulator.md has their figures).
SHIPPED_PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


def profile_path(out: Path, model: str) -> Path:
    return Path(out) / f"sim-profile-{model}.json"


def find_profile(model: str, given: Path | None = None) -> Path:
    """``given``, else this machine's calibration (bench/results), else the shipped one."""
    if given is not None:
        return Path(given)
    for directory in (DEFAULT_PROFILE_DIR, SHIPPED_PROFILE_DIR):
        if profile_path(directory, model).exists():
            return profile_path(directory, model)
    raise ConfigError(f"no profile for {model}: run `banaserve sim calibrate --models {model}`")


def _decode_points(text: str) -> list[tuple[int, int]]:
    """``BATCHxPROMPT`` points, comma-separated, each number positive, at least 3 distinct
    (the decode fit has three terms, ``fit.fit_decode``)."""
    try:
        points = [tuple(int(v) for v in p.split("x")) for p in text.split(",") if p.strip()]
    except ValueError:
        points = []
    if not points or not all(len(p) == 2 and min(p) > 0 for p in points):
        raise argparse.ArgumentTypeError(f"expected BATCHxPROMPT points like 1x32,8x256; {text!r}")
    if any(b > MAX_BATCH or n > MAX_STEP_TOKENS for b, n in points):
        raise argparse.ArgumentTypeError(
            f"expected batches of at most {MAX_BATCH} and prompts of at most {MAX_STEP_TOKENS} "
            f"tokens (the engine's max_num_seqs and step budget); {text!r}"
        )
    if len(set(points)) < 3:
        raise argparse.ArgumentTypeError(
            f"the decode fit needs 3 distinct points or more; {text!r}"
        )
    return points  # type: ignore[return-value]


def _prefill_lengths(text: str) -> list[int]:
    """Prompt lengths, at least 3 distinct (the prefill fit has three terms)."""
    lengths = number_list(int)(text)
    if max(lengths) > MAX_STEP_TOKENS:
        raise argparse.ArgumentTypeError(
            f"expected lengths of at most {MAX_STEP_TOKENS} tokens (one step's budget: a longer "
            f"prompt is prefilled in chunks); {text!r}"
        )
    if len(set(lengths)) < 3:
        raise argparse.ArgumentTypeError(
            f"the prefill fit needs 3 distinct lengths or more; {text!r}"
        )
    return lengths


# Every batch size of 1-6 at a short prompt, where kernels change with the batch (on the AMD
# VM batch 2 stepped ~1.3x batch 3: ``DecodeModel.batch_s``), larger ones sparser; and
# longer prompts at four sizes, which fix the time per context token.
DECODE_POINTS = [(1, 32), (2, 32), (3, 32), (4, 32), (6, 32), (8, 32), (12, 32), (16, 32),
                 (24, 32), (32, 32), (1, 384), (1, 1024), (2, 512), (4, 512), (8, 256),
                 (24, 160)]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=_model_names, default=["smollm2-135m", "tiny-llama"],
                   help="comma list (default smollm2-135m,tiny-llama)")  # fmt: skip
    p.add_argument("--threads", type=thread_count, default=1)
    p.add_argument(
        "--prefill-lengths", type=_prefill_lengths, default=[16, 64, 192, 384, 640, 896, 1152]
    )
    p.add_argument("--decode-points", type=_decode_points, default=DECODE_POINTS,
                   help="BATCHxPROMPT points (default "
                   + ",".join(f"{b}x{n}" for b, n in DECODE_POINTS) + ")")  # fmt: skip
    p.add_argument("--decode-steps", type=positive(int), default=7)
    p.add_argument("--repeats", type=positive(int), default=3)
    p.add_argument("--transports", type=name_list(("tcp", "ucx")), default=["tcp", "ucx"])
    p.add_argument("--migration-json", type=path_arg, default=None,
                   help="a `bench migration` result (the records' switch pause, weights) or a "
                        "`bench compare` one (its migrations' copy and revert phases)")  # fmt: skip
    p.add_argument("--hop-s", type=non_negative(float), default=None,
                   help="one activation hop of a layer migration, measured elsewhere "
                        "(default: the transport's latency)")  # fmt: skip
    p.add_argument("--out", type=path_arg, default=DEFAULT_PROFILE_DIR)


def _model_names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of models; {text!r}")
    return list(dict.fromkeys(names))


def _engine(model: str, threads: int, prefix_caching: bool):  # noqa: ANN202
    from services.common.config import EngineConfig
    from services.engine.engine import Engine

    return Engine(EngineConfig(model=model, num_threads=threads,
                               enable_prefix_caching=prefix_caching))  # fmt: skip


def _prompt(n: int, salt: int, vocab: int) -> list[int]:
    return [(101 + 31 * salt + 13 * j) % (vocab - 2) + 1 for j in range(n)]


def measure_prefill(engine, lengths: list[int], repeats: int) -> list[list[float]]:  # noqa: ANN001
    from services.common.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    points = []
    for n in lengths:
        times = []
        for r in range(repeats + 1):  # the first of each length warms up
            engine.add_request(f"p{n}-{r}", _prompt(n, r, engine.spec.vocab_size), params)
            start = time.thread_time()
            engine.step()
            times.append(time.thread_time() - start)
        points.append([float(n), min(times[1:])])
    return points


def measure_decode(engine, points: list[tuple[int, int]], steps: int) -> list[list[float]]:  # noqa: ANN001
    from services.common.types import SamplingParams

    out = []
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    for k, (batch, length) in enumerate(points):
        prompt = _prompt(length, 1000 + k, engine.spec.vocab_size)
        ids = [f"d{k}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, prompt, params)
        s = engine.scheduler
        while s.waiting or any(q.num_computed_tokens < q.num_tokens - 1 for q in s.running):
            engine.step()
        engine.step()  # warm-up: the first decode step at this batch size
        samples = []
        for _ in range(steps):
            context = sum(q.num_computed_tokens + 1 for q in s.running)
            start = time.thread_time()
            engine.step()
            samples.append((time.thread_time() - start, context))
        for rid in ids:
            if rid in engine.requests.active:
                engine.abort(rid)
        t, context = sorted(samples)[len(samples) // 2]
        out.append([float(batch), float(context), t])
    return out


def measure_transports(kinds: list[str]) -> tuple[dict[str, TransportModel], dict]:
    from bench.transport_bench import bench_transport

    sizes = [64 << 10, 1 << 20, 8 << 20]
    args = argparse.Namespace(sizes=sizes, iterations=5, warmup=1, timeout=30.0, seed=0,
                              out=str(DEFAULT_PROFILE_DIR))  # fmt: skip
    models, raw = {}, {}
    for kind in kinds:
        try:
            runs = asyncio.run(bench_transport(kind, args))
        except Exception as exc:  # an unavailable transport (ucx missing) is not fatal
            raw[kind] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        points = [[float(size), statistics.median(run["samples_s"])]
                  for size, run in runs.items() if "samples_s" in run]  # fmt: skip
        if len(points) < 2:
            raw[kind] = {"error": str(next(iter(runs.values())).get("error", "no samples"))}
            continue
        models[kind] = fit_transport([(a, b) for a, b in points])
        raw[kind] = points
    return models, raw


def migration_records(data: object) -> list[dict]:
    """Every migration summary in a ``bench migration`` JSON (``bench/migration_driver.py``
    ``summary``: the coordinator record's split), wherever the report nests it."""
    if isinstance(data, dict):
        if "switch_pause_s" in data and "layers" in data:
            return [data]
        return [m for v in data.values() for m in migration_records(v)]
    if isinstance(data, list):
        return [m for v in data for m in migration_records(v)]
    return []


def phase_durations(report: dict) -> dict[str, list[float]]:
    """From a ``bench compare`` JSON: each migration's COPYING -> SWITCHING and REVERTING ->
    DONE seconds, from the watcher's coordinator state events (sampled every 0.25 s)."""
    first: dict[str, dict[str, float]] = {}
    for run in report.get("runs", []):
        for e in run.get("timeline", {}).get("events", []):
            # Each run's clock starts at its first send: keep a migration's events of one run.
            seen = first.setdefault(f"{run['workload']}/{e['id']}", {})
            seen.setdefault(e["state"], e["t"])
    out: dict[str, list[float]] = {"copy": [], "revert": []}
    for seen in first.values():
        for key, a, b in (("copy", "COPYING", "SWITCHING"), ("revert", "REVERTING", "DONE")):
            if a in seen and b in seen:
                out[key].append(seen[b] - seen[a])
    return out


def migration_model(path: Path | None, hop_s: float | None = None) -> tuple[MigrationModel, str]:
    """From a ``bench migration`` JSON (the coordinator records' split), or the phase times
    of a ``bench compare`` JSON's migrations, else docs/migration.md's figures."""
    if path is None:
        model = MigrationModel(0.0, DOC_SWITCH_PAUSE_S, DOC_REVERT_S, hop_s=hop_s)
        return model, "docs/migration.md figures"
    data = read_json(path, "migration JSON")
    try:
        return _measured_migration(path, data, hop_s)
    except ConfigError as exc:  # a time in it NaN, infinite or negative (MigrationModel)
        if str(exc).startswith("migration JSON"):
            raise
        raise ConfigError(f"migration JSON {path}: {exc}") from None


def _measured_migration(path: Path, data: dict, hop_s: float | None) -> tuple[MigrationModel, str]:
    if data.get("benchmark") == "compare":
        try:
            phases = phase_durations(data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"migration JSON {path}: a malformed run or state event ({exc!r})"
            ) from None
        if not phases["copy"]:
            model = MigrationModel(0.0, DOC_SWITCH_PAUSE_S, DOC_REVERT_S, hop_s=hop_s)
            return model, f"docs/migration.md figures ({path}: no migration reached SWITCHING)"
        revert = statistics.median(phases["revert"]) if phases["revert"] else DOC_REVERT_S
        model = MigrationModel(0.0, DOC_SWITCH_PAUSE_S, revert,
                               copy_s=statistics.median(phases["copy"]), hop_s=hop_s)  # fmt: skip
        return model, (f"{path}: {len(phases['copy'])} copy and {len(phases['revert'])} revert "
                       "phase(s) from the coordinator's state events")  # fmt: skip
    records = [m for m in migration_records(data) if m.get("reached_active", True)]
    if not records:
        raise ConfigError(f"migration JSON {path}: no migration that reached ACTIVE")
    try:
        weights = [m["weights_s"] / max(1, m["layers"][1] - m["layers"][0]) for m in records
                   if not m.get("weights_skipped") and m.get("weights_s")]  # fmt: skip
        pause = statistics.median(float(m["switch_pause_s"]) for m in records)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"migration JSON {path}: a malformed migration record ({exc!r})"
        ) from None
    # The record has no revert split: the revert pause is taken as docs/migration.md's.
    model = MigrationModel(statistics.median(weights) if weights else 0.0, pause, DOC_REVERT_S,
                           hop_s=hop_s)  # fmt: skip
    return model, f"{path} ({len(records)} migrations)"


def calibrate_model(
    model: str,
    args: argparse.Namespace,
    transports: tuple[dict[str, TransportModel], dict],
    migration: tuple[MigrationModel, str],
) -> Profile:
    from services.coordinator.layer_share import measure as measure_share
    from services.engine.kv_cache import KVCache
    from services.engine.models.loader import DTYPES

    lengths, decode_points = args.prefill_lengths, args.decode_points
    engine = _engine(model, args.threads, prefix_caching=False)
    prefill_points = measure_prefill(engine, lengths, args.repeats)
    del engine
    engine = _engine(model, args.threads, prefix_caching=True)
    decode_pts = measure_decode(engine, decode_points, args.decode_steps)  # type: ignore[arg-type]
    share = measure_share(engine, batch=8, prompt_tokens=64, steps=8).share
    spec, cfg = engine.spec, engine.config
    block_bytes = KVCache.bytes_per_block(1, cfg.block_size, spec.num_kv_heads, spec.head_dim,
                                          DTYPES[cfg.dtype])  # fmt: skip
    migration, source = migration
    models, raw = transports
    return Profile(
        model, spec.num_layers, cfg.block_size, int(block_bytes), engine.block_manager.num_blocks,
        cfg.max_num_seqs, cfg.max_num_batched_tokens, fit_prefill(prefill_points),
        fit_decode(decode_pts), models, migration, share,
        source=f"calibrated on {socket.gethostname()} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        f", {args.threads} thread(s); migration: {source}",
        points={"prefill": prefill_points, "decode": decode_pts,
                **{f"transport_{k}": v for k, v in raw.items() if isinstance(v, list)}},
    )  # fmt: skip


def _decode_terms(d: DecodeModel) -> str:
    if not d.batch_s:
        return f"{d.a * 1e3:.2f} ms + {d.b * 1e3:.3f} ms/seq"
    return "(" + ", ".join(f"{b:g}: {t * 1e3:.1f}" for b, t in d.batch_s) + " ms by batch)"


def fit_report(profile: Profile) -> list[str]:
    p, d = profile.prefill, profile.decode
    pre = profile.points["prefill"]
    dec = profile.points["decode"]
    pre_err = relative_errors([p.time(int(n), n * n) for n, _ in pre], [t for _, t in pre])
    dec_err = relative_errors([d.time(int(b), int(c)) for b, c, _ in dec], [t for *_, t in dec])
    lines = [
        f"{profile.model}: prefill {p.a * 1e3:.2f} ms + {p.b * 1e6:.1f} us/token + "
        f"{p.c * 1e9:.2f} ns/token^2 (max error {max(pre_err):.1%})",
        f"  decode {_decode_terms(d)} + {d.c * 1e6:.2f} us/context token"
        f" (max error {max(dec_err):.1%}); layer share {profile.layer_share:.4f}",
    ]
    for name, t in profile.transports.items():
        lines.append(
            f"  {name}: {t.latency_s * 1e3:.3f} ms + {t.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    import torch

    from services.engine.models.prepare import resolve_model

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    migration = migration_model(args.migration_json, args.hop_s)  # its errors before any work
    for model in args.models:
        resolve_model(model)  # an unknown or unprepared model: said now, not after the others
    output_dir(args.out, "--out")
    for model in args.models:  # a profile's path that is a directory: said now, not after
        output_file(profile_path(args.out, model), "--out")  # its measurements
    transports = measure_transports(args.transports)
    if not transports[0]:
        raise SystemExit(f"no transport could be measured: {transports[1]}")
    for model in args.models:
        profile = calibrate_model(model, args, transports, migration)
        path = profile_path(args.out, model)
        profile.save(path)
        print("\n".join(fit_report(profile)))
        print(f"wrote {path}")
    print(f"calibrated in {time.monotonic() - started:.0f} s")
    return 0
