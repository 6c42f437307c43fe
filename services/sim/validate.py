"""``banaserve sim validate COMPARE.json``: the simulator against a real ``bench compare``.

1. read the compare JSON: its config (seed, duration, drain, rate scale, context, vocabulary,
   each mode's cluster shape and coordinator flags) and its table (one row per workload × mode);
2. plan every workload again with ``bench/workloads.py`` and the same arguments, and check the
   plan is the one the JSON recorded (same count, same send times): the simulator replays the
   exact requests;
3. replay each mode as the compare ran it: one cluster (``up``'s own parser over ``--mode`` and
   the run's ``--up-args``), its workloads one after another, each under the real deadline
   (arrival window + drain) and followed by the settle, so that queues, prefix caches and
   live migrations carry over (``--fresh-cluster-per-workload``: a cluster each), with the
   model's profile (``sim calibrate``);
4. print, per row, real vs simulated: output throughput, makespan, TTFT p50/p99, TPOT p50/p99,
   SLO attainment, migrations, and the relative error of each (migrations: the difference);
   the issue's targets: <= 10 % on throughput, makespan, TTFT p50 and TPOT p50, <= 15 % on p99s;
5. with ``--repeat OTHER.json`` (a second real run of the same plan, modes and flags): the
   run-to-run difference of each cell, ``|other - real| / real``, beside the simulator's error,
   and a summary per mode and metric (cells within target and the median, for both). A cell
   whose run-to-run difference is itself over the target cannot show the simulator within it:
   on a shared 2-vCPU machine that is most latency cells (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from bench.workloads import workload
from bench.workloads_trace import DEFAULT_TRACES_DIR
from services.common.arg_types import path_arg
from services.common.errors import ConfigError
from services.common.paths import output_file
from services.launcher import BANASERVE_SERVICE_ARGS, ClusterSpec, Mode, mode_spec
from services.prefill.write_backs import WritePolicy
from services.sim.calibrate import find_profile
from services.sim.cluster import SimSpec
from services.sim.inputs import plan_workload, read_compare
from services.sim.profile import Profile
from services.sim.replay import Job, coordinator_policy, simulate_sequence
from services.up import spec_from_argv

METRICS = (
    ("output_throughput", "out tok/s", 0.10),
    ("makespan_s", "makespan s", 0.10),
    ("ttft_p50_ms", "TTFT p50 ms", 0.10),
    ("ttft_p99_ms", "TTFT p99 ms", 0.15),
    ("tpot_p50_ms", "TPOT p50 ms", 0.10),
    ("tpot_p99_ms", "TPOT p99 ms", 0.15),
    ("slo_attainment", "SLO att.", 0.10),
    ("num_migrations", "migrations", None),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("compare_json", type=path_arg, help="a `bench compare` JSON result")
    p.add_argument("--profile", type=path_arg, default=None,
                   help="sim profile (default: bench/results/sim-profile-MODEL.json, else the one "
                   "shipped in services/sim/profiles/)")  # fmt: skip
    p.add_argument("--traces-dir", type=path_arg, default=DEFAULT_TRACES_DIR)
    p.add_argument("--json-out", type=path_arg, default=None,
                   help="also write the comparison here")  # fmt: skip
    p.add_argument("--repeat", type=path_arg, default=None,
                   help="a second real `bench compare` of the same plan: its run-to-run "
                        "difference beside the simulator's error")  # fmt: skip


def error(real: float | None, sim: float | None) -> float | None:
    if real is None or sim is None:
        return None
    if real == 0:
        return 0.0 if sim == 0 else None
    return abs(sim - real) / abs(real)


def check_plan(name: str, planned: list, recorded: dict) -> None:
    plan_rows = recorded.get("plan")
    if plan_rows is None:
        return
    same = len(plan_rows) == len(planned) and all(
        abs(p.at_s - q["at_s"]) < 1e-6 and len(p.request.prompt) == q["num_prompt_tokens"]
        and p.request.max_tokens == q["max_tokens"]
        for p, q in zip(planned, plan_rows, strict=False)
    )  # fmt: skip
    if not same:
        raise ConfigError(f"{name}: the workload plans differently from the compare JSON's")


def up_spec(mode: Mode, config: dict) -> ClusterSpec:
    """The cluster ``bench compare`` started for ``mode``: ``up``'s own parser and
    ``cluster_spec`` over the mode's flags and the run's ``--up-args`` (``--num-kv-blocks``,
    ``--kv-transport``, ``--coordinator-args``...)."""
    # up's data planes when the run was made: a run recorded before up's default became TCP
    # (session 13) ran on UCX
    planes = config.get("up_data_planes") or {"kv_transport": "ucx", "kvstore_transport": "ucx"}
    argv = ["--mode", mode.value, "--kv-transport", planes["kv_transport"],
            "--kvstore-transport", planes["kvstore_transport"],
            *shlex.split(config.get("extra_up_args") or "")]  # fmt: skip
    try:
        spec = spec_from_argv(argv)
    except ConfigError as exc:
        raise ConfigError(f"the compare JSON's up arguments do not parse: {argv}: {exc}") from None
    return replace(spec, service_args=_recorded_service_args(mode, spec, config))


# What ``up --mode`` gave each mode's services before the compare JSON recorded it
# (``mode_clusters``, since 2026-12-02): banaserve's coordinator ran with --auto, nothing else.
UNRECORDED_MODE_SERVICE_ARGS: dict[Mode, dict[str, tuple[str, ...]]] = {
    Mode.BANASERVE: {"coordinator": ("--auto",)}
}


def _recorded_service_args(mode: Mode, spec: ClusterSpec, config: dict) -> dict:
    """``spec``'s service flags with the mode's own as the run recorded them, not as ``up --mode``
    gives them today (banaserve's router rule and decode chunk came in session 29): a run is
    replayed as it ran. ``mode_spec`` puts the mode's flags before the given ones."""
    today = mode_spec(mode).service_args
    recorded = (config.get("mode_clusters") or {}).get(mode.value)
    then = (
        {k: tuple(v) for k, v in recorded["service_args"].items()}
        if recorded is not None
        else UNRECORDED_MODE_SERVICE_ARGS.get(mode, {})
    )
    out = {}
    for service in dict.fromkeys([*then, *spec.service_args]):
        own = spec.service_args.get(service, ())[len(today.get(service, ())) :]
        if args := (*then.get(service, ()), *own):
            out[service] = args
    return out


def service_flags(argv: Iterable[str]) -> argparse.Namespace:
    """The router's and decode workers' flags the simulator models, from their extra args (the
    others ignored): local_prefill_max_tokens, local_prefill_queue_tokens, reuse,
    max_num_batched_tokens (None: not given), max_prefill_tokens_while_decoding."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--local-prefill-max-tokens", type=int, default=0)
    p.add_argument("--local-prefill-queue-tokens", type=int, default=0)
    p.add_argument("--no-reuse-cached-prefix", dest="reuse", action="store_false")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-prefill-tokens-while-decoding", type=int, default=0)
    return p.parse_known_args(list(argv))[0]


# ``up --mode banaserve``'s router rule and decode chunk (launcher.BANASERVE_SERVICE_ARGS): what
# ``sim run`` gives its banaserve clusters unless told otherwise.
BANASERVE_ROUTER = service_flags(BANASERVE_SERVICE_ARGS["router"])
BANASERVE_DECODE = service_flags(BANASERVE_SERVICE_ARGS["decode"])


def sim_spec(mode: Mode, config: dict, profile: Profile | None = None) -> SimSpec:
    up = up_spec(mode, config)
    router, decode = (
        service_flags(up.service_args.get("router", ())),
        service_flags(up.service_args.get("decode", ())),
    )
    chunk = decode.max_num_batched_tokens
    if chunk is not None and chunk < 1:
        raise ConfigError(f"the compare JSON's decode workers ran --max-num-batched-tokens {chunk}")
    cap = decode.max_prefill_tokens_while_decoding
    if cap < 0:
        raise ConfigError(
            f"the compare JSON's decode workers ran --max-prefill-tokens-while-decoding {cap}"
        )
    num_workers = up.num_prefill + up.num_decode + up.num_mixed
    coordinator = up.service_args.get("coordinator", ())
    policy, share, donors = coordinator_policy(list(coordinator))
    transport = up.kv_transport
    if profile is not None and transport not in profile.transports:
        transport = None  # not measured (e.g. "none", the gRPC stream): the profile's default
    return SimSpec(
        mode, num_workers, up.num_prefill or None, policy=policy, layer_share=share,
        prefill_donors=donors, transport=transport, num_kv_blocks=up.num_kv_blocks,
        max_model_len=config.get("max_model_len", 2048),
        deadline_s=config["duration_s"] + config.get("drain_s", 0.0),
        store_write_policy=WritePolicy(up.store_write_policy or WritePolicy.REUSED.value),
        local_prefill_max_tokens=router.local_prefill_max_tokens,
        local_prefill_queue_tokens=router.local_prefill_queue_tokens,
        reuse_cached_prefix=decode.reuse,
        decode_max_num_batched_tokens=chunk,
        decode_max_prefill_tokens_while_decoding=cap,
    )  # fmt: skip


def compare_rows(report: dict, profile: Profile, traces_dir: Path) -> list[dict]:
    """Each mode's workloads replayed as the compare run ran them: one after another on one
    cluster with the settle between (``--fresh-cluster-per-workload``: a cluster each)."""
    config = report["config"]
    vocab = tuple(config.get("vocab_range", (1000, 30000)))
    jobs: dict[str, Job] = {}
    for name in dict.fromkeys(r["workload"] for r in report["table"]):
        w = workload(name, config.get("rate_scale", 1.0))
        planned = plan_workload(w, config["duration_s"], config["seed"],
                                config.get("max_model_len", 2048), traces_dir, vocab)  # fmt: skip
        recorded = report.get("workloads", {}).get(name, {})
        check_plan(name, planned, recorded)
        slo = (recorded.get("slo_ttft_ms", w.slo_ttft_ms),
               recorded.get("slo_tpot_ms", w.slo_tpot_ms))  # fmt: skip
        jobs[name] = Job(name, planned, slo)
    sims: dict[tuple[str, str], dict] = {}
    for mode in dict.fromkeys(r["mode"] for r in report["table"]):
        names = [r["workload"] for r in report["table"] if r["mode"] == mode]
        spec = sim_spec(Mode(mode), config, profile)
        groups = [[n] for n in names] if config.get("fresh_cluster_per_workload") else [names]
        for group in groups:
            outcomes = simulate_sequence(spec, profile, [jobs[n] for n in group],
                                         config.get("settle_s", 0.0))  # fmt: skip
            for name, outcome in zip(group, outcomes, strict=True):
                sims[(name, mode)] = outcome.row
    out = []
    for real in report["table"]:
        name, mode = real["workload"], real["mode"]
        sim = sims[(name, mode)]
        errors = {key: error(real.get(key), sim.get(key)) for key, _, _ in METRICS}
        errors["num_migrations"] = (sim["num_migrations"] or 0) - (real.get("num_migrations") or 0)
        out.append({"workload": name, "mode": mode, "real": real, "sim": sim,
                    "errors": errors})  # fmt: skip
    return out


# What two runs must share for their difference to be run-to-run noise and nothing else; and
# each mode's cluster as started (``up_spec``: the same flags spelt two ways, or given by one
# run and recorded as ``up``'s default by the other, are one cluster).
SAME_RUN_KEYS = ("model", "seed", "duration_s", "drain_s", "rate_scale", "max_model_len",
                 "vocab_range", "threads", "pin", "fresh_cluster_per_workload")  # fmt: skip


def check_same_run(other: dict, config: dict, modes: list[str]) -> None:
    """Refuses a repeat run of another plan or cluster than the compared one's ``config``."""
    differ = [k for k in SAME_RUN_KEYS if other["config"].get(k) != config.get(k)]
    if any(up_spec(Mode(m), other["config"]) != up_spec(Mode(m), config)
           for m in dict.fromkeys(modes)):  # fmt: skip
        differ.append("extra_up_args")
    if differ:
        raise ConfigError(f"the repeat run differs from the compared one in {', '.join(differ)}")


def add_repeat(rows: list[dict], other: dict, config: dict) -> None:
    """Sets each row's ``repeat``: the relative difference of the ``other`` real run's cell
    (None where that run has no such row). Refuses a run of another plan or cluster."""
    check_same_run(other, config, [r["mode"] for r in rows])
    table = {(r["workload"], r["mode"]): r for r in other["table"]}
    for row in rows:
        o = table.get((row["workload"], row["mode"]))
        row["repeat"] = None if o is None else {
            key: error(row["real"].get(key), o.get(key)) for key, _, t in METRICS if t is not None
        }  # fmt: skip


def summary(rows: list[dict]) -> str:
    """Per mode and metric: cells within the target and the median error of the simulator,
    and, where rows carry ``repeat``, the same of the run-to-run difference."""
    repeat = any(r.get("repeat") for r in rows)
    head = "| mode | metric | sim within target | sim median error |"
    head += " run-to-run within target | run-to-run median |" if repeat else ""
    lines = [head, "|" + "---|" * (6 if repeat else 4)]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        for key, label, target in METRICS:
            if target is None:
                continue
            cells = [f"| {mode} | {label} | {_within(mine, 'errors', key, target)}"]
            if repeat:
                cells.append(_within(mine, "repeat", key, target))
            lines.append(" | ".join(cells) + " |")
    return "\n".join(lines)


def _within(rows: list[dict], field: str, key: str, target: float) -> str:
    values = [r[field][key] for r in rows if r.get(field) and r[field].get(key) is not None]
    if not values:
        return "n/a | n/a"
    inside = sum(v <= target for v in values)
    return f"{inside}/{len(values)} | {statistics.median(values):.0%}"


def _num(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def render(rows: list[dict]) -> str:
    head = "| workload | mode | " + " | ".join(
        f"{label} real / sim (err)" for _, label, _ in METRICS
    )
    lines = [head + " |", "|" + "---|" * (len(METRICS) + 2)]
    for r in rows:
        cells = []
        for key, _, target in METRICS:
            e = r["errors"][key]
            if target is None:
                err = f"{e:+d}" if e is not None else "n/a"
            else:
                err = "n/a" if e is None else f"{e:.0%}{'' if e <= target else ' !'}"
                if r.get("repeat") and r["repeat"].get(key) is not None:
                    d = r["repeat"][key]
                    err += f"; run-to-run {d:.0%}{'' if d <= target else ' !'}"
            cells.append(f"{_num(r['real'].get(key))} / {_num(r['sim'].get(key))} ({err})")
        lines.append(f"| {r['workload']} | {r['mode']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("`!`: over the issue's target (10 %; 15 % for p99s).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = read_compare(args.compare_json)
    if args.json_out is not None:
        output_file(args.json_out, "--json-out")
    other = read_compare(args.repeat) if args.repeat is not None else None
    if other is not None:  # before the replay, which takes a while
        check_same_run(other, report["config"], [r["mode"] for r in report["table"]])
    model = report["config"].get("model", "smollm2-135m")
    path = find_profile(model, args.profile)
    profile = Profile.load(path)
    rows = compare_rows(report, profile, args.traces_dir)
    if other is not None:
        add_repeat(rows, other, report["config"])
    print(f"Profile {path}: {profile.source}\nServing: {profile.serving.describe()}\n")
    print(render(rows))
    print()
    print(summary(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0
