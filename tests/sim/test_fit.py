from __future__ import annotations

import dataclasses
import json

import pytest

from services.common.errors import ConfigError
from services.sim.fit import fit_decode, fit_prefill, fit_transport, relative_errors
from services.sim.profile import DecodeModel


def test_prefill_fit_recovers_known_coefficients_exactly():
    a, b, c = 0.012, 0.0031, 4.5e-7
    points = [(n, a + b * n + c * n * n) for n in (16, 64, 128, 512, 1024)]
    m = fit_prefill(points)
    assert (m.a, m.b, m.c) == pytest.approx((a, b, c), rel=1e-9)


def test_decode_fit_recovers_known_coefficients_exactly():
    a, b, c = 0.05, 0.0021, 3.0e-6
    grid = [(1, 40), (4, 200), (16, 600), (32, 4000), (8, 3000)]
    m = fit_decode([(bs, ctx, a + b * bs + c * ctx) for bs, ctx in grid])
    assert (m.a, m.b, m.c) == pytest.approx((a, b, c), rel=1e-9)


def test_transport_fit_recovers_latency_and_bandwidth():
    latency, bandwidth = 0.0004, 2.5e9
    m = fit_transport([(s, latency + s / bandwidth) for s in (1 << 16, 1 << 20, 1 << 23)])
    assert m.latency_s == pytest.approx(latency, rel=1e-9)
    assert m.bandwidth_bytes_per_s == pytest.approx(bandwidth, rel=1e-9)


def test_a_negative_term_is_dropped_not_kept():
    # Times that fall with length would need c < 0: the fit keeps every coefficient >= 0.
    m = fit_prefill([(10, 1.0), (20, 1.5), (40, 1.9), (80, 2.0)])
    assert min(m.a, m.b, m.c) >= 0.0
    assert m.c == 0.0


def test_too_few_points_are_refused():
    with pytest.raises(ValueError):
        fit_prefill([(1, 1.0), (2, 2.0)])
    with pytest.raises(ValueError):
        fit_transport([(1, 1.0)])


def test_relative_errors():
    assert relative_errors([1.1, 2.0], [1.0, 4.0]) == pytest.approx([0.1, 0.5])


def test_migration_costs_come_from_the_coordinator_records(tmp_path):

    from services.sim.calibrate import DOC_REVERT_S, migration_model

    def summary(pause, weights_s, layers, skipped=False, active=True):
        return {"layers": layers, "switch_pause_s": pause, "weights_s": weights_s,
                "weights_skipped": skipped, "reached_active": active}  # fmt: skip

    report = {"results": {"decode": {"runs": [
        {"migration": summary(0.010, 0.8, [20, 30])},
        {"migration": summary(0.030, 0.0, [25, 30], skipped=True)},
        {"migration": summary(0.020, 0.6, [24, 30])},
        {"migration": summary(9.9, 9.9, [1, 30], active=False)},
    ]}}}  # fmt: skip
    path = tmp_path / "migration.json"
    path.write_text(json.dumps(report))
    model, source = migration_model(path)
    assert model.switch_pause_s == pytest.approx(0.020)
    assert model.weights_s_per_layer == pytest.approx(0.09)  # median of 0.08 and 0.1
    assert model.revert_s == DOC_REVERT_S and "3 migrations" in source


def test_migration_phases_come_from_a_compare_runs_coordinator_events(tmp_path):

    from services.sim.calibrate import DOC_SWITCH_PAUSE_S, migration_model

    def event(t, state, mid="m-1"):
        return {"t": t, "id": mid, "state": state}

    def run(workload, events):
        return {"workload": workload, "mode": "banaserve", "timeline": {"events": events}}

    report = {"benchmark": "compare", "runs": [
        run("a", [event(9.8, "COPYING"), event(15.0, "SWITCHING"), event(15.3, "ACTIVE"),
                  event(2.0, "COPYING", "m-2"), event(3.0, "SWITCHING", "m-2")]),
        # m-1 reverts in the next workload (its clock starts again at 0).
        run("b", [event(1.0, "REVERTING"), event(1.9, "DONE")]),
    ]}  # fmt: skip
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(report))
    model, source = migration_model(path, hop_s=0.02)
    assert model.copy_s == pytest.approx((5.2 + 1.0) / 2)
    assert model.revert_s == pytest.approx(0.9)
    assert (model.switch_pause_s, model.hop_s) == (DOC_SWITCH_PAUSE_S, 0.02)
    assert "2 copy and 1 revert" in source


def test_decode_fit_measures_each_batch_size_where_no_line_fits():
    # a step slower at batch 2 than at 3 (other kernels), the context's cost a line in tokens
    by_batch = {1: 0.043, 2: 0.051, 3: 0.038, 4: 0.037, 8: 0.049, 16: 0.069}
    c = 6.0e-7
    grid = [(b, 32 * b) for b in by_batch] + [(1, 1024), (2, 1024), (4, 2048)]
    m = fit_decode([(b, ctx, by_batch[b] + c * ctx) for b, ctx in grid])
    assert m.c == pytest.approx(c, rel=1e-6)
    assert [b for b, _ in m.batch_s] == sorted(by_batch)
    for b, t in by_batch.items():
        assert m.time(b, 500) == pytest.approx(t + c * 500, rel=1e-6)
    # between two sizes interpolated; past the last at the last two's slope
    assert m.batch_time(6) == pytest.approx((0.037 + 0.049) / 2, rel=1e-6)
    assert m.batch_time(32) == pytest.approx(0.069 + (0.069 - 0.049) / 8 * 16, rel=1e-6)
    # the line alone misses batch 2 by far more
    line = DecodeModel(m.a, m.b, m.c)
    assert abs(line.time(2, 64) - m.time(2, 64)) / m.time(2, 64) > 0.1


def test_decode_fit_keeps_the_line_without_points_to_fix_the_context_term():
    # one point per batch size: the batch terms would absorb the context's
    m = fit_decode([(1, 40, 0.05), (4, 200, 0.06), (16, 600, 0.08), (32, 4000, 0.11)])
    assert m.batch_s == ()
    assert m.time(2, 100) == pytest.approx(m.a + m.b * 2 + m.c * 100)


def test_decode_batch_terms_survive_the_profile_json_and_are_checked():
    m = DecodeModel(0.04, 0.001, 5e-7, ((1, 0.043), (2, 0.051), (3, 0.038)))
    again = DecodeModel(**json.loads(json.dumps(dataclasses.asdict(m))))
    assert again == m and again.time(2, 10) == pytest.approx(0.051 + 5e-6)
    with pytest.raises(ConfigError, match="ascending"):
        DecodeModel(0.04, 0.0, 0.0, ((2, 0.05), (1, 0.04)))
    with pytest.raises(ConfigError, match="must be >= 0"):
        DecodeModel(0.04, 0.0, 0.0, ((1, -0.01),))
