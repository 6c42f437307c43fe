"""``sim serving``: a profile's serving multipliers, and their fit on a compare run.

The fit is checked on a run whose "real" rows the simulator itself produced with known
multipliers: fitting from 1.0 must find them again (a made-up real table could not say whether
the fit is right)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from services.cli import main
from services.common.errors import ConfigError
from services.launcher import Mode
from services.sim.cluster import SimCluster, SimSpec
from services.sim.profile import Profile, ServingModel, StepCosts
from services.sim.serving import (
    fit,
    fit_prefill_steps,
    lone_prefill_steps,
    prefill_model_s,
    ratios,
)
from services.sim.validate import compare_rows
from tests.sim.factories import make_profile, request
from tests.sim.test_validate import compare_json, profile

TRUE = ServingModel(prefill_scale=1.3, decode_scale=1.5)


def simulated_report() -> dict:
    """A static-PD compare run whose table is the simulator's, with ``TRUE`` multipliers."""
    return simulated_report_of(("static-pd", "colocated"))


NO_LOCAL_PREFILL = "--router-args='--local-prefill-max-tokens 0 --local-prefill-queue-tokens 0'"


def simulated_report_of(
    modes: tuple[str, ...], made: ServingModel = TRUE, up_args: str = ""
) -> dict:
    report = compare_json(modes=modes)
    report["config"]["extra_up_args"] = up_args
    rows = compare_rows(report, replace(profile(), serving=made), traces_dir=None)
    report["table"] = [r["sim"] | {"workload": r["workload"], "mode": r["mode"]} for r in rows]
    return report


def test_a_profile_carries_its_serving_multipliers():
    plain = make_profile()
    scaled = replace(plain, serving=ServingModel(prefill_scale=2.0, decode_scale=3.0))
    assert ServingModel() == plain.serving  # default: the engine alone
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="must be > 0"):
            ServingModel(prefill_scale=bad)
    # A profile saved before serving existed still loads, as the engine alone.
    data = plain.to_json()
    del data["serving"]
    assert Profile.from_json(data).serving == ServingModel()
    assert Profile.from_json(scaled.to_json()) == scaled


def test_step_time_scales_prefill_and_decode_parts():
    def one_request(p: Profile) -> tuple[float, float]:
        cluster = SimCluster(SimSpec(Mode.STATIC_PD, 2, 1), p)
        [r] = cluster.run([request(0, 0.0, 32, 5)])
        assert r.status == "OK"
        ttft = r.first_token_s - r.at_s
        return ttft, (r.done_s - r.first_token_s) / (r.num_output_tokens - 1)

    plain = one_request(make_profile())
    scaled = one_request(
        replace(make_profile(), serving=ServingModel(prefill_scale=2.0, decode_scale=3.0))
    )
    # make_profile: prefill 10 ms/token (a 32-token prompt: 0.32 s), decode 100 ms a step.
    assert scaled[0] - plain[0] == pytest.approx(0.32, abs=1e-9)
    assert scaled[1] - plain[1] == pytest.approx(2 * 0.1, abs=1e-9)  # each step 0.1 -> 0.3 s


def test_fit_finds_the_multipliers_a_run_was_made_with():
    report = simulated_report()
    fitted, rows, replays = fit(report, profile(), traces_dir=None)
    # One workload's rows: the two multipliers trade a little against each other (batches are
    # whole), so they land within a few percent, and the replay within 2 % of the "real" run.
    assert fitted.serving.decode_scale == pytest.approx(TRUE.decode_scale, rel=0.05)
    assert fitted.serving.prefill_scale == pytest.approx(TRUE.prefill_scale, rel=0.05)
    assert 1 < replays <= 8 and "static-pd rows" in fitted.serving.source
    ttft, tpot = ratios(rows)
    assert ttft == pytest.approx(1.0, abs=0.02) and tpot == pytest.approx(1.0, abs=0.02)
    # everything else of the profile is what it was
    assert replace(fitted, serving=ServingModel()) == replace(profile(), serving=ServingModel())


def test_colocated_workers_are_fitted_apart_from_pd_workers():
    """A run made with a colocated worker cheaper than the PD ones (as measured: no layer-wise
    KV hand-off, no imports): the fit finds both sets, each from its own mode's rows."""
    made = replace(TRUE, mixed=StepCosts(prefill_scale=1.0, decode_scale=1.1))
    report = simulated_report_of(("static-pd", "colocated"), made)
    fitted, rows, _ = fit(report, profile(), traces_dir=None, colocated_apart=True)
    s = fitted.serving
    assert s.prefill_scale == pytest.approx(1.3, rel=0.05)
    assert s.decode_scale == pytest.approx(1.5, rel=0.05)
    # Without token times the colocated prefill scale is fitted on the TTFT p50 ratio alone,
    # which moves in steps as routing flips: 0.95 -> 1.15x, 1.0 -> 1.0x, 1.05 -> 0.99x,
    # 1.1 -> 1.07x here (the queue-first router); the fit stops where the replay matches.
    assert s.mixed.prefill_scale == pytest.approx(1.0, rel=0.15)
    assert s.mixed.decode_scale == pytest.approx(1.1, rel=0.05)
    for mode in ("static-pd", "colocated"):
        ttft, tpot = ratios(rows, mode)
        assert ttft == pytest.approx(1.0, abs=0.02) and tpot == pytest.approx(1.0, abs=0.02)
    # One set for both misses the colocated rows by the difference; it is the default fit.
    one = compare_rows(report, replace(profile(), serving=replace(s, mixed=None)), None)
    assert ratios(one, "colocated")[1] < 0.8
    default, _, _ = fit(report, profile(), traces_dir=None)
    assert default.serving.mixed is None and "colocated" not in default.serving.source
    # A run without colocated rows leaves them as the PD workers', and so does one whose
    # colocated rows have nothing to fit on (every request failed): the PD fit still runs.
    alone, _, _ = fit(
        simulated_report_of(("static-pd",)), profile(), traces_dir=None, colocated_apart=True
    )
    assert alone.serving.mixed is None
    assert alone.serving.costs(mixed=True) == alone.serving.costs(mixed=False)
    failed = simulated_report_of(("static-pd", "colocated"))
    for row in failed["table"]:
        if row["mode"] == "colocated":
            row.update(ttft_p50_ms=None, tpot_p50_ms=None, num_ok=0)
    unfitted, _, _ = fit(failed, profile(), traces_dir=None, colocated_apart=True)
    assert unfitted.serving.mixed is None
    assert unfitted.serving.decode_scale == pytest.approx(TRUE.decode_scale, rel=0.05)
    assert "colocated" not in unfitted.serving.source


def tpot(serving: ServingModel, mode: Mode) -> float:
    """One 32-token prompt asking 5 tokens on a 2-worker cluster: its time per output token."""
    cluster = SimCluster(SimSpec(mode, 2, 1), replace(make_profile(), serving=serving))
    [r] = cluster.run([request(0, 0.0, 32, 5)])
    return (r.done_s - r.first_token_s) / (r.num_output_tokens - 1)


def test_a_colocated_worker_steps_with_its_own_costs():
    both = ServingModel(decode_scale=3.0)
    apart = replace(both, mixed=StepCosts(decode_scale=1.0))
    assert tpot(both, Mode.COLOCATED) == pytest.approx(3 * tpot(apart, Mode.COLOCATED))
    assert tpot(both, Mode.STATIC_PD) == pytest.approx(tpot(apart, Mode.STATIC_PD))
    # saved and loaded with it
    p = replace(make_profile(), serving=apart)
    assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ConfigError, match="decode_scale must be > 0"):
        StepCosts(decode_scale=0.0)


def test_fit_refuses_a_run_without_static_pd_rows():
    report = compare_json(modes=("colocated",))
    with pytest.raises(ConfigError, match="no static-pd rows"):
        fit(report, profile(), traces_dir=None)
    with pytest.raises(ConfigError, match="iterations"):
        fit(simulated_report(), profile(), traces_dir=None, iterations=0)


def test_cli_writes_the_fitted_profile(tmp_path, capsys):
    start = tmp_path / "start.json"
    profile().save(start)
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps(simulated_report()))
    out = tmp_path / "fitted.json"
    assert main(["sim", "serving", str(compare), "--profile", str(start), "--out", str(out)]) == 0
    fitted = Profile.load(out)
    assert fitted.serving.decode_scale == pytest.approx(1.5, rel=0.05)
    assert Profile.load(start).serving == ServingModel()  # --out: the start is left alone
    printed = capsys.readouterr().out
    assert f"decode x{fitted.serving.decode_scale:.3f}" in printed
    assert "colocated workers: as the PD workers' (not fitted apart)" in printed
    apart = tmp_path / "apart.json"
    argv = ["sim", "serving", str(compare), "--profile", str(start), "--out", str(apart)]
    assert main([*argv, "--colocated-apart"]) == 0
    assert Profile.load(apart).serving.mixed is not None


def lone_and_batched_requests(step_s: float, scale: float) -> list[dict]:
    """Requests on one prefill worker: seven alone in their steps, whose ``prefill_s`` is
    ``step_s`` a step plus ``scale`` × the model, and two overlapping ones with times no step
    model explains (scheduled beside each other: not step times, to be left out)."""
    p, out, at = profile(), [], 0.0
    for i, n in enumerate((20, 50, 100, 200, 400, 800, 3000)):
        model, steps = prefill_model_s(p, n, 0)
        prefill_s = step_s * steps + scale * model
        out.append({"index": i, "num_prompt_tokens": n, "sent_at_s": at, "ttft_s": prefill_s,
                    "server": {"prefill_s": prefill_s, "num_cached_tokens": 0,
                               "prefill_worker": "prefill-0", "routing_s": 0.001 * i}})  # fmt: skip
        at += prefill_s + 1.0
    for i in (7, 8):
        out.append({"index": i, "num_prompt_tokens": 30, "sent_at_s": at, "ttft_s": 5.0,
                    "server": {"prefill_s": 4.9, "num_cached_tokens": 0,
                               "prefill_worker": "prefill-0"}})  # fmt: skip
    return out


def as_colocated(requests: list[dict]) -> list[dict]:
    """The requests as a colocated worker records them: no ``prefill_s``; the TTFT is the
    router's ``routing_s`` plus the prefill, and each lives 0.5 s past its first token."""
    out = []
    for q in requests:
        routing = q["server"].get("routing_s", 0.0)
        server = q["server"] | {"prefill_s": 0.0, "routing_s": routing}
        ttft = q["ttft_s"] + routing
        out.append(q | {"ttft_s": ttft, "e2e_s": ttft + 0.5, "server": server})
    return out


def test_prefill_overhead_is_fitted_on_the_real_workers_lone_steps():
    p = profile()  # 3 ms a token; the engine's token budget (2048) cuts 3,000 tokens in two
    assert prefill_model_s(p, 3000, 0) == (pytest.approx(9.0), 2)
    assert prefill_model_s(p, 100, 64) == (pytest.approx(0.108), 1)
    report = simulated_report()
    report["runs"] = [
        {"mode": "static-pd", "workload": "mixed", "requests": lone_and_batched_requests(0.04, 1.2)},
        {"mode": "colocated", "workload": "mixed", "requests": as_colocated(lone_and_batched_requests(0.01, 1.1))},
    ]  # fmt: skip
    points = lone_prefill_steps(report, p)
    assert sorted(s for s, _, _ in points) == [1, 1, 1, 1, 1, 1, 2]  # the two batched left out
    fitted, rows, _ = fit(report, p, traces_dir=None, colocated_apart=True)
    s = fitted.serving
    assert s.prefill_step_s == pytest.approx(0.04, rel=1e-6)
    assert s.prefill_scale == pytest.approx(1.2, rel=1e-6)
    # The table was simulated with TRUE's prefill, not this one: decode_scale, fitted on its
    # TPOTs with the other prefill, lands near TRUE's rather than on it.
    assert s.decode_scale == pytest.approx(TRUE.decode_scale, rel=0.1)
    assert "static-pd rows (prefill from 7 lone steps)" in s.source
    # A colocated worker's prefill is fitted apart, on its own lone requests: the TTFT past the
    # router's routing_s, lone when no other request lives on the worker (the two batched do).
    mixed = s.costs(mixed=True)
    assert (mixed.prefill_step_s, mixed.prefill_scale) == (pytest.approx(0.01), pytest.approx(1.1))
    assert mixed.decode_scale == pytest.approx(TRUE.decode_scale, rel=0.1)
    assert "colocated rows (prefill from 7 lone steps)" in s.source
    # The router's median routing time over the static-PD requests (0-6 ms and two without)
    assert s.route_s == pytest.approx(0.003)
    # Too few lone steps, or all of one size: the TTFT ratio fits prefill_scale as before.
    assert fit_prefill_steps(points[:5]) is None
    assert fit_prefill_steps([(1, 0.1, 0.2)] * 8) is None


def test_a_prefill_step_pays_the_fitted_overhead_once():
    def ttft(serving: ServingModel) -> float:
        cluster = SimCluster(
            SimSpec(Mode.STATIC_PD, 2, 1), replace(make_profile(), serving=serving)
        )
        [r] = cluster.run([request(0, 0.0, 32, 5)])
        return r.first_token_s - r.at_s

    plain = ttft(ServingModel())
    assert ttft(ServingModel(prefill_step_s=0.05)) - plain == pytest.approx(0.05, abs=1e-9)
    assert ttft(ServingModel(route_s=0.02)) - plain == pytest.approx(0.02, abs=1e-9)
    for name in ("prefill_step_s", "route_s"):
        with pytest.raises(ConfigError, match=f"{name} must be >= 0"):
            ServingModel(**{name: -0.01})


def test_a_prefill_workers_step_pays_the_fitted_overhead_per_prompt_it_hands_off():
    """The prefill worker's layer hook exports and sends each layer's KV of every prompt that
    completes in the step, one prompt at a time: three prompts in one step pay it three times
    (on the real runs a step's time past the fitted model grew with its prompts, ~30-40 ms
    each). A colocated worker hands nothing off: once a step, whatever its prompts."""

    def first_tokens(mode: Mode, serving: ServingModel) -> list[float]:
        cluster = SimCluster(SimSpec(mode, 2, 1), replace(make_profile(), serving=serving))
        done = cluster.run([request(i, 0.0, 32, 2) for i in range(3)])
        return [r.first_token_s for r in done]

    plain, paid = ServingModel(), ServingModel(prefill_step_s=0.05)
    # The first prompt's step starts alone; the other two share the next one.
    pd, pd_paid = first_tokens(Mode.STATIC_PD, plain), first_tokens(Mode.STATIC_PD, paid)
    assert pd[1] == pd[2] > pd[0]
    shifts = [b - a for a, b in zip(pd, pd_paid, strict=True)]
    assert shifts == [pytest.approx(0.05), pytest.approx(0.05 + 2 * 0.05), pytest.approx(0.15)]
    # Colocated: a prompt alone in its worker's step pays it once (the third shares a step
    # with the first one's decode: a mixed step's prompts pay the rest of the prefill model).
    coloc, coloc_paid = first_tokens(Mode.COLOCATED, plain), first_tokens(Mode.COLOCATED, paid)
    assert [b - a for a, b in zip(coloc, coloc_paid, strict=True)] == [pytest.approx(0.05)] * 3


def test_a_request_cancelled_while_routed_never_reaches_its_worker():
    p = replace(make_profile(), serving=ServingModel(route_s=0.5))
    cluster = SimCluster(SimSpec(Mode.COLOCATED, 1, deadline_s=0.2), p)
    [r] = cluster.run([request(0, 0.0, 32, 5)])
    assert r.status == "DEADLINE_EXCEEDED"
    cluster.loop.run(1.0)  # past the routing delay: nothing arrives, nothing runs
    assert all(w.idle for w in cluster.workers.values())


def test_banaserve_pd_workers_are_fitted_apart_on_its_rows_without_a_migration():
    """A run made with banaserve's PD workers dearer than static PD's (as measured: the store
    node's lookups and the coordinator share the cores): ``banaserve_apart`` finds both sets,
    each from its own mode's rows; a banaserve row with a migration is not fitted on."""
    made = replace(TRUE, store=StepCosts(prefill_scale=1.6, decode_scale=1.8))
    # With the router's rule (banaserve's default since session 29) its decode worker prefills
    # some prompts too, which the TTFT ratio does not tell from the prefill worker's: the fit
    # then lands ~10 % off (0.90 of the TTFT here). Fitted on a run without it.
    report = simulated_report_of(("static-pd", "banaserve"), made, NO_LOCAL_PREFILL)
    assert [r["num_migrations"] for r in report["table"]] == [0, 0]
    fitted, rows, _ = fit(report, profile(), traces_dir=None, banaserve_apart=True)
    s = fitted.serving
    assert (s.prefill_scale, s.decode_scale) == (pytest.approx(1.3, rel=0.05),
                                                 pytest.approx(1.5, rel=0.05))  # fmt: skip
    assert s.store.decode_scale == pytest.approx(1.8, rel=0.05)
    assert s.store.prefill_scale == pytest.approx(1.6, rel=0.1)
    assert "banaserve rows" in s.source
    for mode in ("static-pd", "banaserve"):
        ttft, tpot = ratios(rows, mode)
        assert ttft == pytest.approx(1.0, abs=0.05) and tpot == pytest.approx(1.0, abs=0.02)
    # Off by default: one set for both, fitted on static PD, which misses banaserve's rows.
    default, rows, _ = fit(report, profile(), traces_dir=None)
    assert default.serving.store is None and "banaserve" not in default.serving.source
    assert ratios(rows, "banaserve")[0] > 1.15
    # A banaserve row that made a migration has nothing to fit on: as static PD's.
    moved = simulated_report_of(("static-pd", "banaserve"), made, NO_LOCAL_PREFILL)
    moved["table"][1]["num_migrations"] = 1
    alone, _, _ = fit(moved, profile(), traces_dir=None, banaserve_apart=True)
    assert alone.serving.store is None
    assert alone.serving.costs(mixed=False, store=True) == alone.serving.costs(mixed=False)
    with pytest.raises(ConfigError, match="no banaserve row"):
        ratios(compare_rows(moved, profile(), None), "banaserve")


def test_banaserve_pd_workers_step_with_their_own_costs():
    both = ServingModel(decode_scale=3.0)
    apart = replace(both, store=StepCosts(decode_scale=1.0))
    # make_profile: decode 100 ms a step; each step 0.3 -> 0.1 s
    assert tpot(both, Mode.BANASERVE) - tpot(apart, Mode.BANASERVE) == pytest.approx(0.2)
    for mode in (Mode.STATIC_PD, Mode.COLOCATED):  # no store: as before
        assert tpot(both, mode) == pytest.approx(tpot(apart, mode))
    p = replace(make_profile(), serving=apart)
    assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert "banaserve's PD workers: prefill x1.000 + 0.0 ms a step, decode x1.000" in (
        apart.describe()
    )
    assert "banaserve" not in both.describe()
