"""Profiles: the JSON round trip, the shipped ones, and which one `sim run`/`validate` load."""

from __future__ import annotations

import pytest

from services.common.errors import ConfigError
from services.sim import calibrate
from services.sim.calibrate import SHIPPED_PROFILE_DIR, find_profile, fit_report, profile_path
from services.sim.profile import Profile
from tests.sim.factories import make_profile


def test_a_profile_survives_its_json(tmp_path):
    p = make_profile(points={"prefill": [[16.0, 0.1]]})
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p


def test_a_profile_without_transports_or_with_a_bad_share_is_refused():
    with pytest.raises(ConfigError):
        make_profile(transports={})
    with pytest.raises(ConfigError):
        make_profile(layer_share=1.5)
    with pytest.raises(ConfigError, match="no transport 'ucx'"):
        make_profile().transport("ucx")


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-llama"])
def test_the_shipped_profiles_load_and_their_fits_match_their_points(model):
    p = Profile.load(profile_path(SHIPPED_PROFILE_DIR, model))
    assert p.model == model and p.source.startswith("calibrated on")
    for n, t in p.points["prefill"]:
        assert p.prefill.time(int(n), n * n) == pytest.approx(t, rel=0.10)
    for b, c, t in p.points["decode"]:
        assert p.decode.time(int(b), int(c)) == pytest.approx(t, rel=0.10)
    assert "max error" in fit_report(p)[0]


def test_find_profile_prefers_the_given_then_this_machines_then_the_shipped(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "DEFAULT_PROFILE_DIR", tmp_path)
    shipped = profile_path(SHIPPED_PROFILE_DIR, "smollm2-135m")
    assert find_profile("smollm2-135m") == shipped
    make_profile(model="smollm2-135m").save(profile_path(tmp_path, "smollm2-135m"))
    assert find_profile("smollm2-135m") == profile_path(tmp_path, "smollm2-135m")
    assert find_profile("smollm2-135m", tmp_path / "x.json") == tmp_path / "x.json"
    with pytest.raises(ConfigError, match="sim calibrate"):
        find_profile("no-such-model")
