"""``banaserve up``'s restarts: the policy's exact delays and give-up, and the supervisor's
transitions and console lines, on a fake clock with fake children (no process, no sleep)."""

from __future__ import annotations

import argparse
import io

import pytest

from services.common.errors import ConfigError
from services.supervisor import (
    ChildState,
    GiveUp,
    PortInUseError,
    Restart,
    RestartConfig,
    RestartPolicy,
    Supervisor,
    add_restart_arguments,
    restart_config,
)

RUNNING, WAITING, STARTING = ChildState.RUNNING, ChildState.WAITING, ChildState.STARTING


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeChild:
    """A child whose exit, readiness and port are set by the test."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.code: int | None = None
        self.ready = False
        self.port_busy = False
        self.num_respawns = 0
        self.num_kills = 0

    def exit_code(self) -> int | None:
        return self.code

    def respawn(self) -> None:
        if self.port_busy:
            raise PortInUseError(f"port {self.address} is still in use")
        self.num_respawns += 1
        self.code, self.ready = None, False

    def poll_ready(self) -> bool:
        return self.ready

    def kill(self) -> None:
        self.num_kills += 1
        self.code = -9


def make_supervisor(
    *names: str, **config: float
) -> tuple[Supervisor, list[FakeChild], FakeClock, io.StringIO]:
    clock, out = FakeClock(), io.StringIO()
    children = [FakeChild(name, f"127.0.0.1:{5001 + i}") for i, name in enumerate(names)]
    supervisor = Supervisor(children, RestartConfig(**config), out, clock=clock)
    return supervisor, children, clock, out


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


# The policy


def test_delays_double_from_the_first_restart_until_the_fifth_then_it_gives_up():
    policy = RestartPolicy(RestartConfig())
    decisions = [policy.on_exit(now=float(t), uptime_s=0.0) for t in range(6)]
    assert decisions == [
        Restart(1.0, 1),
        Restart(2.0, 2),
        Restart(4.0, 3),
        Restart(8.0, 4),
        Restart(16.0, 5),
        GiveUp(5),
    ]


def test_the_delay_is_capped_at_backoff_max():
    policy = RestartPolicy(RestartConfig(max_restarts=8, backoff_s=0.5, backoff_max_s=5.0))
    delays = [policy.on_exit(float(t), 0.0) for t in range(9)]
    assert [d.delay_s for d in delays[:8]] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert delays[8] == GiveUp(8)


def test_only_restarts_within_the_window_count_towards_giving_up():
    policy = RestartPolicy(RestartConfig(max_restarts=2, window_s=10.0))
    assert policy.on_exit(0.0, 0.0) == Restart(1.0, 1)
    assert policy.on_exit(1.0, 0.0) == Restart(2.0, 2)
    # The restart at 0 s is 10 s old: out of the window. The backoff still grows (no stable run).
    assert policy.on_exit(10.0, 0.0) == Restart(4.0, 2)
    assert policy.on_exit(10.5, 0.0) == GiveUp(2)  # restarts at 1 s and 10 s


def test_a_stable_run_starts_the_backoff_over_but_not_the_window():
    policy = RestartPolicy(RestartConfig(stable_s=60.0))
    assert policy.on_exit(0.0, 0.0) == Restart(1.0, 1)
    assert policy.on_exit(5.0, 3.0) == Restart(2.0, 2)
    assert policy.on_exit(100.0, 59.999) == Restart(4.0, 3)
    assert policy.on_exit(200.0, 60.0) == Restart(1.0, 4)
    assert policy.on_exit(300.0, 0.0) == Restart(2.0, 4)  # the one at 0 s left the window


def test_no_restarts_gives_up_at_the_first_exit():
    assert RestartPolicy(RestartConfig(max_restarts=0)).on_exit(0.0, 100.0) == GiveUp(0)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_restarts", -1, "max restarts"),
        ("window_s", 0.0, "window_s must be > 0"),
        ("backoff_s", -1.0, "backoff_s"),
        ("backoff_s", float("nan"), "backoff_s"),
        ("stable_s", float("inf"), "stable_s"),
        ("backoff_multiplier", 0.5, "multiplier"),
        ("backoff_max_s", 0.5, "below the backoff"),
    ],
)
def test_bad_restart_settings_are_refused(field, value, match):
    with pytest.raises(ConfigError, match=match):
        RestartConfig(**{field: value})


def test_up_flags_map_onto_the_restart_config():
    p = argparse.ArgumentParser()
    add_restart_arguments(p)
    assert restart_config(p.parse_args([])) == RestartConfig()
    args = p.parse_args(
        [
            "--max-restarts",
            "2",
            "--restart-window",
            "30",
            "--restart-backoff",
            "0.25",
            "--restart-backoff-max",
            "4",
            "--restart-stable",
            "10",
        ]
    )
    assert restart_config(args) == RestartConfig(2, 30.0, 0.25, 2.0, 4.0, 10.0)


# The supervisor


def test_a_dead_child_is_respawned_after_the_backoff_and_reported_ready_again():
    supervisor, [child], clock, out = make_supervisor("prefill-0")
    assert supervisor.tick() is None and lines(out) == []
    clock.now, child.code = 10.0, -9
    assert supervisor.tick() is None
    assert lines(out) == ["prefill-0 exited (code -9); restarting in 1.0 s (restart 1 of 5)"]
    assert supervisor.states() == {"prefill-0": WAITING}
    clock.now = 10.999
    supervisor.tick()
    assert (child.num_respawns, supervisor.states()["prefill-0"]) == (0, WAITING)
    clock.now = 11.0
    supervisor.tick()
    assert (child.num_respawns, supervisor.states()["prefill-0"]) == (1, STARTING)
    supervisor.tick()
    assert supervisor.states()["prefill-0"] == STARTING and len(lines(out)) == 1
    clock.now, child.ready = 14.0, True
    supervisor.tick()
    assert lines(out)[1:] == ["prefill-0 ready again 127.0.0.1:5001"]
    assert supervisor.states() == {"prefill-0": RUNNING}
    assert supervisor.num_restarts() == {"prefill-0": 1}


def crash_while_starting(supervisor: Supervisor, child: FakeChild, clock: FakeClock) -> str | None:
    """Lets the pending restart happen, then the respawned child exits with code 1."""
    clock.now += 100.0  # past any backoff
    supervisor.tick()
    child.code = 1
    return supervisor.tick()


def test_a_crash_loop_backs_off_exactly_then_gives_up_after_the_fifth_restart():
    supervisor, [child], clock, out = make_supervisor("decode-0", window_s=1000.0)
    child.code = -9
    supervisor.tick()
    reasons = [crash_while_starting(supervisor, child, clock) for _ in range(5)]
    assert reasons[:4] == [None] * 4
    assert (
        reasons[4]
        == "decode-0 exited while starting (code 1) after 5 restarts within 1000 s; giving up"
    )
    assert lines(out) == [
        "decode-0 exited (code -9); restarting in 1.0 s (restart 1 of 5)",
        "decode-0 exited while starting (code 1); restarting in 2.0 s (restart 2 of 5)",
        "decode-0 exited while starting (code 1); restarting in 4.0 s (restart 3 of 5)",
        "decode-0 exited while starting (code 1); restarting in 8.0 s (restart 4 of 5)",
        "decode-0 exited while starting (code 1); restarting in 16.0 s (restart 5 of 5)",
    ]
    assert child.num_respawns == 5
    assert supervisor.states() == {"decode-0": ChildState.GIVEN_UP}
    assert supervisor.run() == reasons[4]  # it stays given up on


def test_the_backoff_starts_over_once_a_restarted_child_ran_the_stable_period():
    supervisor, [child], clock, out = make_supervisor("router", stable_s=60.0)
    child.code = -9
    supervisor.tick()
    clock.now = 1.0
    supervisor.tick()
    clock.now, child.ready = 2.0, True
    supervisor.tick()  # ready at 2 s
    clock.now, child.code = 62.0, -9  # ran 60 s
    supervisor.tick()
    assert lines(out)[-1] == "router exited (code -9); restarting in 1.0 s (restart 2 of 5)"


def test_a_port_still_in_use_is_a_failed_start_retried_later_on_the_same_port():
    supervisor, [child], clock, out = make_supervisor("kvstore-0")
    child.code, child.port_busy = -9, True
    supervisor.tick()
    clock.now = 1.0
    supervisor.tick()
    assert lines(out)[-1] == (
        "kvstore-0 could not restart (port 127.0.0.1:5001 is still in use); "
        "restarting in 2.0 s (restart 2 of 5)"
    )
    assert (child.num_respawns, supervisor.states()["kvstore-0"]) == (0, WAITING)
    clock.now, child.port_busy = 3.0, False
    supervisor.tick()
    assert (child.num_respawns, supervisor.states()["kvstore-0"]) == (1, STARTING)


def test_a_child_not_ready_in_time_is_killed_and_counts_as_a_failed_start():
    clock, out = FakeClock(), io.StringIO()
    child = FakeChild("redis", "127.0.0.1:6379")
    supervisor = Supervisor([child], RestartConfig(), out, clock=clock, start_timeout_s=30.0)
    child.code = -9
    supervisor.tick()
    clock.now = 1.0
    supervisor.tick()  # respawned at 1 s
    clock.now = 31.0
    supervisor.tick()
    assert child.num_kills == 0  # exactly on the deadline: still waited for
    clock.now = 31.001
    supervisor.tick()
    assert child.num_kills == 1
    assert lines(out)[-1] == (
        "redis was not ready within 30 s; restarting in 2.0 s (restart 2 of 5)"
    )


def test_each_child_has_its_own_restart_count():
    supervisor, [redis, node], clock, out = make_supervisor("redis", "kvstore-0")
    redis.code = node.code = -9
    supervisor.tick()
    assert lines(out) == [
        "redis exited (code -9); restarting in 1.0 s (restart 1 of 5)",
        "kvstore-0 exited (code -9); restarting in 1.0 s (restart 1 of 5)",
    ]


def test_without_restarts_the_first_exit_stops_the_cluster():
    supervisor, [child], clock, out = make_supervisor("prefill-0", max_restarts=0)
    child.code = -9
    assert supervisor.run() == "prefill-0 exited (code -9); restarts are off"
    assert lines(out) == [] and child.num_respawns == 0


def test_a_stop_during_the_backoff_respawns_nothing_and_ends_run_at_once():
    supervisor, [child], clock, out = make_supervisor("prefill-0")
    child.code = -9
    supervisor.tick()
    supervisor.stop()
    clock.now = 100.0  # long past the restart's due time
    assert supervisor.run() is None
    assert supervisor.tick() is None
    assert (child.num_respawns, supervisor.states()["prefill-0"]) == (0, WAITING)


def test_a_stop_while_a_child_starts_leaves_it_starting_for_the_launcher_to_stop():
    supervisor, [child], clock, out = make_supervisor("prefill-0")
    child.code = -9
    supervisor.tick()
    clock.now = 1.0
    supervisor.tick()
    supervisor.stop()
    child.ready = True
    assert supervisor.run() is None
    assert supervisor.states() == {"prefill-0": STARTING}
    assert lines(out) == ["prefill-0 exited (code -9); restarting in 1.0 s (restart 1 of 5)"]
