"""Keeps ``banaserve up``'s services running: a child that dies is restarted on its own port.

Lifecycle of one supervised child (only ``Supervisor`` changes its state):

    RUNNING ──exits──► policy ──restart in d s──► WAITING ──d s later──► STARTING ──ready──► RUNNING
                         │                                                  │
                         └──give up: the launcher stops the cluster         └──fails──► policy

1. RUNNING: the child serves; ``Supervisor.tick`` notices within one tick that it exited;
2. ``RestartPolicy.on_exit`` answers ``Restart(delay_s, number)`` or ``GiveUp``. A child is
   restarted at most ``max_restarts`` times within any ``window_s``; the delay starts at
   ``backoff_s`` and is multiplied by ``backoff_multiplier`` with each restart (at most
   ``backoff_max_s``), and starts over once the child has run ``stable_s`` since it was ready;
3. WAITING: no process runs; a stop now has nothing to undo;
4. STARTING: respawned with its old flags on the port it had (so the router, the workers and
   clients that know its address keep working). A port another process still listens on, an
   exit, or no readiness (the LISTENING line, or PING for Redis) within ``start_timeout_s`` is
   a failed start: back to 2 with no uptime. Ready: RUNNING again.

A stop (``stop()``, from SIGINT/SIGTERM) may come in any state: ticking ends, no child is
respawned after it, and the launcher stops every process still there.

Every event is one line on ``out``, e.g. ``prefill-0 exited (code -9); restarting in 1.0 s
(restart 1 of 5)`` and ``prefill-0 ready again 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import collections
import enum
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from services.common.errors import ConfigError

START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RestartConfig:
    # Restarts allowed per child within any window_s; 0: the first exit stops the cluster.
    max_restarts: int = 5
    window_s: float = 300.0
    backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max_s: float = 30.0
    # A child that ran this long since it was last ready has its backoff start over.
    stable_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError(f"max restarts must be >= 0, got {self.max_restarts}")
        for name in ("window_s", "backoff_s", "backoff_max_s", "stable_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0, got {value}")
        if self.window_s == 0:
            raise ConfigError("window_s must be > 0")
        if not (math.isfinite(self.backoff_multiplier) and self.backoff_multiplier >= 1):
            raise ConfigError(f"backoff multiplier must be >= 1, got {self.backoff_multiplier}")
        if self.backoff_max_s < self.backoff_s:
            raise ConfigError(
                f"backoff max ({self.backoff_max_s} s) is below the backoff ({self.backoff_s} s)"
            )


@dataclass(frozen=True)
class Restart:
    delay_s: float
    number: int  # this restart's rank among those within the window, from 1


@dataclass(frozen=True)
class GiveUp:
    num_restarts: int  # restarts already made within the window


class RestartPolicy:
    """One child's restart history: when it may be restarted, and after how long."""

    def __init__(self, config: RestartConfig) -> None:
        self.config = config
        self._restarts: collections.deque[float] = collections.deque()
        self._num_unstable = 0  # restarts since the child last ran stable_s

    def on_exit(self, now: float, uptime_s: float) -> Restart | GiveUp:
        """The child failed at ``now`` after running ``uptime_s`` since it was ready."""
        config = self.config
        if uptime_s >= config.stable_s:
            self._num_unstable = 0
        while self._restarts and now - self._restarts[0] >= config.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= config.max_restarts:
            return GiveUp(len(self._restarts))
        delay = config.backoff_s * config.backoff_multiplier**self._num_unstable
        self._num_unstable += 1
        self._restarts.append(now)
        return Restart(min(delay, config.backoff_max_s), len(self._restarts))


class PortInUseError(RuntimeError):
    """A child's port is still held by a listening socket, so it cannot be respawned yet."""


class Supervised(Protocol):
    """What the supervisor needs of a child process (``services.child_process.Child``)."""

    name: str
    address: str

    def exit_code(self) -> int | None:
        """None while the process runs."""

    def respawn(self) -> None:
        """Starts the process again on its old port; raises ``PortInUseError``."""

    def poll_ready(self) -> bool:
        """True once the respawned process serves (does not block for long)."""

    def kill(self) -> None:
        """Kills the process and reaps it."""


class ChildState(enum.Enum):
    RUNNING = "running"
    WAITING = "waiting"  # to be respawned at due_at
    STARTING = "starting"  # respawned, not ready yet
    GIVEN_UP = "given up"  # failed too often: the cluster is to stop


@dataclass
class _Watch:
    child: Supervised
    policy: RestartPolicy
    state: ChildState = ChildState.RUNNING
    ready_at: float = 0.0
    due_at: float = 0.0
    start_deadline: float = 0.0
    restarts: int = 0  # every respawn so far


class Supervisor:
    """Watches children started by the launcher and restarts those that die (lifecycle above).

    ``tick`` is called from one thread (``run``'s); ``stop`` from any thread or a signal handler.
    """

    def __init__(
        self,
        children: Sequence[Supervised],
        config: RestartConfig,
        out: IO[str],
        clock: Callable[[], float] = time.monotonic,
        start_timeout_s: float = START_TIMEOUT_S,
        stopping: threading.Event | None = None,
    ) -> None:
        """``stopping``: set by ``stop`` (or by whoever shares it) to end ``run``."""
        self.config = config
        self._out = out
        self._clock = clock
        self._start_timeout_s = start_timeout_s
        now = clock()
        self._watches = [_Watch(c, RestartPolicy(config), ready_at=now) for c in children]
        self._stopping = stopping or threading.Event()
        self._given_up = ""  # why, once a child was given up on

    def stop(self) -> None:
        self._stopping.set()

    def run(self, tick_s: float = 0.1) -> str | None:
        """Ticks until ``stop`` (returns None) or a child is given up on (returns why)."""
        while not self._stopping.is_set():
            if reason := self.tick():
                return reason
            self._stopping.wait(tick_s)
        return None

    def states(self) -> dict[str, ChildState]:
        return {w.child.name: w.state for w in self._watches}

    def num_restarts(self) -> dict[str, int]:
        return {w.child.name: w.restarts for w in self._watches}

    def tick(self) -> str | None:
        """One pass over every child; returns why the cluster must stop, if it must."""
        if self._given_up:
            return self._given_up
        for watch in self._watches:
            if self._stopping.is_set():
                return None
            if reason := self._step(watch, self._clock()):
                return reason
        return None

    def _step(self, watch: _Watch, now: float) -> str | None:
        if watch.state is ChildState.RUNNING:
            if (code := watch.child.exit_code()) is not None:
                return self._failed(watch, now, f"exited (code {code})", now - watch.ready_at)
        elif watch.state is ChildState.WAITING:
            if now >= watch.due_at:
                return self._respawn(watch, now)
        elif watch.state is ChildState.STARTING:
            return self._check_start(watch, now)
        return None

    def _respawn(self, watch: _Watch, now: float) -> str | None:
        try:
            watch.child.respawn()
        except (PortInUseError, OSError) as exc:
            return self._failed(watch, now, f"could not restart ({exc})", 0.0)
        watch.restarts += 1
        watch.state = ChildState.STARTING
        watch.start_deadline = now + self._start_timeout_s
        return None

    def _check_start(self, watch: _Watch, now: float) -> str | None:
        child = watch.child
        if child.poll_ready():
            watch.state, watch.ready_at = ChildState.RUNNING, now
            self._say(f"{child.name} ready again {child.address}")
        elif (code := child.exit_code()) is not None:
            return self._failed(watch, now, f"exited while starting (code {code})", 0.0)
        elif now > watch.start_deadline:
            child.kill()
            what = f"was not ready within {self._start_timeout_s:g} s"
            return self._failed(watch, now, what, 0.0)
        return None

    def _failed(self, watch: _Watch, now: float, what: str, uptime_s: float) -> str | None:
        name = watch.child.name
        decision = watch.policy.on_exit(now, uptime_s)
        if isinstance(decision, GiveUp):
            watch.state = ChildState.GIVEN_UP
            self._given_up = (
                f"{name} {what} after {decision.num_restarts} restarts within "
                f"{self.config.window_s:g} s; giving up"
                if self.config.max_restarts
                else f"{name} {what}; restarts are off"
            )
            return self._given_up
        watch.state, watch.due_at = ChildState.WAITING, now + decision.delay_s
        self._say(
            f"{name} {what}; restarting in {decision.delay_s:.1f} s "
            f"(restart {decision.number} of {self.config.max_restarts})"
        )
        return None

    def _say(self, line: str) -> None:
        print(line, file=self._out, flush=True)


def add_restart_arguments(p: argparse.ArgumentParser) -> None:
    defaults = RestartConfig()
    p.add_argument(
        "--max-restarts",
        type=int,
        default=defaults.max_restarts,
        help="restarts of one service within --restart-window before the cluster is stopped "
        "(0: the first service that dies stops the cluster)",
    )
    p.add_argument("--restart-window", type=float, default=defaults.window_s, metavar="S")
    p.add_argument(
        "--restart-backoff",
        type=float,
        default=defaults.backoff_s,
        metavar="S",
        help=f"delay before the first restart, x{defaults.backoff_multiplier:g} for each next one",
    )
    p.add_argument("--restart-backoff-max", type=float, default=defaults.backoff_max_s, metavar="S")
    p.add_argument(
        "--restart-stable",
        type=float,
        default=defaults.stable_s,
        metavar="S",
        help="a service that ran this long since it was ready has its backoff start over",
    )


def restart_config(args: argparse.Namespace) -> RestartConfig:
    return RestartConfig(
        max_restarts=args.max_restarts,
        window_s=args.restart_window,
        backoff_s=args.restart_backoff,
        backoff_max_s=args.restart_backoff_max,
        stable_s=args.restart_stable,
    )
