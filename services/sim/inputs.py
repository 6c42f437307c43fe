"""The simulator commands' inputs, checked at the boundary: a file that is missing,
unreadable, not JSON or not the kind of document asked for, a value in it of the wrong type or
out of range, an output path that cannot be written (``services.common.paths``, shared with
the other commands), or a workload too large to plan is a ``ConfigError`` naming the file or
flag and what is wrong (``banaserve: error: ...``, exit 2), before any work and never a
traceback, a hang or a report of NaNs."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from bench.workloads import Workload, plan, workload
from bench.workloads_synthetic import (
    DEFAULT_MAX_MODEL_LEN,
    VOCAB,
    PlannedRequest,
    SyntheticWorkload,
)
from bench.workloads_trace import DEFAULT_TRACES_DIR, TraceWorkload
from services.common.errors import ConfigError
from services.launcher import Mode

# A planned request holds its prompt's token ids (~11 KB for ``mixed``'s, ~40 KB for
# ``long-context``'s): 50,000 of them, five times the 128-worker bar of docs/simulator.md
# ("Speed"), stay within a few GiB of memory and a few minutes of CPU.
MAX_PLANNED_REQUESTS = 50_000


def expected_requests(w: Workload, duration_s: float) -> float | None:
    """About how many requests ``w`` sends over ``duration_s`` (a synthetic workload's phases'
    rates); None for a trace, whose file bounds it."""
    if not isinstance(w, SyntheticWorkload):
        return None
    return sum(p.share * p.rate for p in w.phases) * duration_s


def check_plan_size(w: Workload, duration_s: float) -> None:
    """Refuses a workload that would plan more than ``MAX_PLANNED_REQUESTS`` requests."""
    expected = expected_requests(w, duration_s)
    if expected is not None and expected > MAX_PLANNED_REQUESTS:
        about = f"{expected:,.0f}" if expected < 1e12 else f"{expected:.2g}"
        raise ConfigError(
            f"{w.name}: about {about} requests in {duration_s:g} s at this rate; the "
            f"simulator plans at most {MAX_PLANNED_REQUESTS:,} a workload (a shorter duration "
            "or a lower load)"
        )


def plan_workload(
    w: Workload,
    duration_s: float,
    seed: int,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    traces_dir: Path = DEFAULT_TRACES_DIR,
    vocab: tuple[int, int] = VOCAB,
) -> list[PlannedRequest]:
    """``bench.workloads.plan`` after ``check_plan_size``; a trace that cannot be read, or
    whose content is refused (a line that is not a request, arrivals out of order, no request
    at all), is a ``ConfigError`` naming the file."""
    check_plan_size(w, duration_s)
    try:
        return plan(w, duration_s, seed, max_model_len, traces_dir, vocab)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{w.name}: cannot read its trace ({exc})") from None
    except ConfigError as exc:
        path = Path(traces_dir) / w.file if isinstance(w, TraceWorkload) else None
        if path is None or str(path) in str(exc):  # not a trace's, or names it already
            raise
        reason = str(exc).removeprefix(f"{w.name}: ")
        raise ConfigError(f"{w.name}: trace {path}: {reason}") from None


def read_json(path: Path | str, what: str) -> dict:
    """The JSON object in ``path``; ``what`` names the document in errors."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: a JSON object expected, got {type(data).__name__}")
    return data


def is_number(value: object, low: float = 0.0, above: bool = False) -> bool:
    """A finite real number >= ``low`` (> with ``above``); a bool is not one, nor an integer
    past a float's range (JSON allows ``1`` followed by 400 zeros)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        finite = math.isfinite(value)
    except OverflowError:
        return False
    return finite and (value > low if above else value >= low)


def is_count(value: object, low: int = 0) -> bool:
    """An integer >= ``low`` (a JSON ``2.5``, ``"16"`` or ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_compare(path: Path | str) -> dict:
    """A ``bench compare`` result, with what the simulator reads of it present and typed: its
    config's seed and arrival window, and a table of rows naming a workload and a known mode."""
    what = "bench compare result"
    report = read_json(path, what)
    config, table = report.get("config"), report.get("table")
    if (
        report.get("benchmark", "compare") != "compare"
        or not isinstance(config, dict)
        or (not isinstance(table, list))
    ):
        raise ConfigError(f"{path} is not a `bench compare` result (no config and table)")

    def bad(message: str) -> ConfigError:
        return ConfigError(f"{what} {path}: {message}")

    _check_config(config, bad)
    modes = {m.value for m in Mode}
    for i, row in enumerate(table):
        if not isinstance(row, dict) or not isinstance(row.get("workload"), str):
            raise bad(f"table row {i} names no workload")
        if row.get("mode") not in modes:
            raise bad(f"table row {i} has mode {row.get('mode')!r}, "
                      f"not one of {', '.join(sorted(modes))}")  # fmt: skip
        for key, value in row.items():
            counted = key.startswith("num_")
            if (
                key not in ("workload", "mode")
                and value is not None
                and not (is_count(value) if counted else is_number(value))
            ):
                kind = "an integer" if counted else "a finite number"
                raise bad(f"table row {i}: {key} is {value!r}, not {kind} >= 0")
    if not table:
        raise bad("its table is empty")
    for name in dict.fromkeys(row["workload"] for row in table):  # before any is planned
        check_plan_size(workload(name, config.get("rate_scale", 1.0)), config["duration_s"])
    _check_workloads(report.get("workloads", {}), bad)
    _check_runs(report.get("runs", []), bad)
    return report


def _check_config(config: dict, bad) -> None:  # noqa: ANN001 - bad: message -> ConfigError
    if not is_count(config.get("seed"), low=-(1 << 63)):
        raise bad("config.seed missing or not a number")
    # key: (required, > 0); else optional and >= 0
    for key, required, above in (("duration_s", True, True), ("rate_scale", False, True),
                                 ("drain_s", False, False), ("settle_s", False, False)):  # fmt: skip
        if (required or key in config) and not is_number(config.get(key), above=above):
            sign = ">" if above else ">="
            raise bad(f"config.{key} missing or not a number {sign} 0: {config.get(key)!r}")
    if "max_model_len" in config and not is_count(config["max_model_len"], low=1):
        raise bad(f"config.max_model_len is {config['max_model_len']!r}, not a positive integer")
    vocab = config.get("vocab_range", [0, 1])
    if not (isinstance(vocab, list) and len(vocab) == 2 and all(is_count(v) for v in vocab)
            and vocab[0] < vocab[1] <= 1 << 31):  # fmt: skip
        raise bad(f"config.vocab_range is {vocab!r}, not [low, high) token ids below 2^31")
    for key, kind in (("model", str), ("extra_up_args", str), ("fresh_cluster_per_workload", bool)):
        if config.get(key) is not None and not isinstance(config[key], kind):
            raise bad(f"config.{key} is {config[key]!r}, not a {kind.__name__}")
    try:
        shlex.split(config.get("extra_up_args") or "")
    except ValueError as exc:  # an unclosed quote
        raise bad(f"config.extra_up_args do not split: {exc}") from None
    _check_mode_clusters(config.get("mode_clusters"), bad)
    planes = config.get("up_data_planes")
    if planes and not (isinstance(planes, dict) and all(
        isinstance(planes.get(k), str) for k in ("kv_transport", "kvstore_transport")
    )):  # fmt: skip
        raise bad(
            f"config.up_data_planes is {planes!r}, not its kv_transport and kvstore_transport"
        )


def _check_mode_clusters(clusters: object, bad) -> None:  # noqa: ANN001
    """``config.mode_clusters``: each mode's ``service_args``, flags by service, as recorded (the
    simulator replays a mode with them, ``validate.up_spec``); absent in old runs."""
    if clusters is None:
        return
    if not isinstance(clusters, dict) or not all(isinstance(c, dict) for c in clusters.values()):
        raise bad(f"config.mode_clusters is {clusters!r}, not each mode's cluster by name")
    for mode, cluster in clusters.items():
        flags = cluster.get("service_args", {})
        if not (isinstance(flags, dict) and all(
            isinstance(v, list) and all(isinstance(a, str) for a in v) for v in flags.values()
        )):  # fmt: skip
            raise bad(
                f"config.mode_clusters.{mode}.service_args is {flags!r}, not flags by service"
            )


def _check_workloads(workloads: object, bad) -> None:  # noqa: ANN001
    if not isinstance(workloads, dict):
        raise bad("its workloads are not an object by name")
    for name, w in workloads.items():
        if not isinstance(w, dict):
            raise bad(f"workload {name!r} is not an object")
        for key in ("slo_ttft_ms", "slo_tpot_ms"):
            if key in w and not is_number(w[key], above=True):
                raise bad(f"workload {name!r}: {key} is {w[key]!r}, not a number > 0")
        planned = w.get("plan", [])
        if not isinstance(planned, list) or not all(
            isinstance(q, dict) and is_number(q.get("at_s"))
            and is_count(q.get("num_prompt_tokens")) and is_count(q.get("max_tokens"))
            for q in planned
        ):  # fmt: skip
            raise bad(f"workload {name!r}: its plan is not a list of requests "
                      "(at_s, num_prompt_tokens, max_tokens)")  # fmt: skip


def _check_runs(runs: object, bad) -> None:  # noqa: ANN001
    """The recorded requests ``sim serving`` fits on (``steps.py``, ``serving.py``)."""
    if not isinstance(runs, list) or not all(
        isinstance(r, dict) and isinstance(r.get("requests", []), list) for r in runs
    ):  # fmt: skip
        raise bad("its runs are not a list of runs with their requests")
    for r in runs:
        for q in r.get("requests", []):
            if not (isinstance(q, dict) and is_number(q.get("sent_at_s"))
                    and (q.get("ttft_s") is None or is_number(q["ttft_s"]))
                    and isinstance(q.get("server") or {}, dict)
                    and isinstance(q.get("chunks") or [], list)):  # fmt: skip
                raise bad(f"run {r.get('mode')}/{r.get('workload')}: a request is not a "
                          f"request record: {str(q)[:120]}")  # fmt: skip
