"""The load a fault meets: N concurrent greedy requests, each ending in tokens or a status.

A request either completes (its token ids), fails with a gRPC status before its deadline (the
status's name), runs out its deadline (``DEADLINE_EXCEEDED``: it hung, as far as its caller can
tell) or never returns within the deadline plus a grace (``HUNG``: the client itself hung).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.client.client import BanaServeClient, BanaServeClientError

NUM_REQUESTS = 8
HUNG = "HUNG"
OK = "OK"
# Statuses that mean the caller waited out its deadline or forever.
HANGS = {HUNG, "DEADLINE_EXCEEDED"}
GRACE_S = 15.0  # past the deadline, a call that has not returned is hung


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Mixed lengths: under a block, a few blocks (written back to the store, then read from it).
PROMPTS = [prompt(500 + i, 10 + 9 * i) for i in range(NUM_REQUESTS)]


@dataclass(frozen=True)
class Load:
    max_tokens: int
    deadline_s: float
    # One request every gap_s, so that a fault meets some decoding, some prefilling and some
    # not sent yet; 0: all at once (a migration starts once every request decodes).
    gap_s: float = 0.0


@dataclass(frozen=True)
class Outcome:
    status: str  # OK, a gRPC status code's name, or HUNG
    token_ids: tuple[int, ...] = ()
    seconds: float = 0.0
    message: str = ""  # the status's details


def one(
    client: BanaServeClient, ids: list[int], load: Load, first: threading.Event, after_s=0.0
) -> Outcome:
    """One request, sent ``after_s`` from now (the arrival schedule, not a wait for a state)."""
    time.sleep(after_s)
    start = time.monotonic()
    generation = client.generate(
        ids, temperature=0.0, max_tokens=load.max_tokens, ignore_eos=True, timeout_s=load.deadline_s
    )
    try:
        for _ in generation:
            first.set()
    except BanaServeClientError as exc:
        return Outcome(exc.code.name, seconds=time.monotonic() - start, message=exc.message)
    return Outcome(OK, tuple(generation.result.token_ids), time.monotonic() - start)


class InFlight:
    """``NUM_REQUESTS`` requests through ``router``, one every ``load.gap_s``; ``first`` is set
    when any token has come back."""

    def __init__(self, router: str, load: Load) -> None:
        self.load = load
        self.first = threading.Event()
        self._client = BanaServeClient(router)
        self._pool = ThreadPoolExecutor(NUM_REQUESTS)
        self._started = time.monotonic()
        self._futures: list[Future[Outcome]] = [
            self._pool.submit(one, self._client, ids, load, self.first, i * load.gap_s)
            for i, ids in enumerate(PROMPTS)
        ]

    def wait_started(self, within_s: float = 60.0) -> bool:
        """True once a token came back; False if every request ended before any did."""
        deadline = time.monotonic() + within_s
        while not self.first.wait(0.05):
            if all(f.done() for f in self._futures):
                return self.first.is_set()
            assert time.monotonic() < deadline, "no request got a token or ended"
        return True

    def outcomes(self) -> list[Outcome]:
        """Each request's outcome; waits at most the deadline plus ``GRACE_S`` in all."""
        limit = self._started + self.load.deadline_s + NUM_REQUESTS * self.load.gap_s + GRACE_S
        outcomes = []
        for future in self._futures:
            try:
                outcomes.append(future.result(timeout=max(0.0, limit - time.monotonic())))
            except TimeoutError:
                outcomes.append(Outcome(HUNG))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        return outcomes


def run_all(router: str, load: Load) -> list[Outcome]:
    return InFlight(router, load).outcomes()


@dataclass(frozen=True)
class Tally:
    completed: int
    failed: dict[str, int]  # status name -> count, hangs excluded
    hung: int
    wrong: int  # completed with tokens other than the clean run's
    messages: dict[str, str]  # status name -> the first failure's details

    @staticmethod
    def of(outcomes: list[Outcome], clean: list[tuple[int, ...]]) -> Tally:
        ok = [(o, c) for o, c in zip(outcomes, clean, strict=True) if o.status == OK]
        failed = Counter(o.status for o in outcomes if o.status not in HANGS | {OK})
        return Tally(
            completed=len(ok),
            failed=dict(sorted(failed.items())),
            hung=sum(o.status in HANGS for o in outcomes),
            wrong=sum(o.token_ids != c for o, c in ok),
            messages={o.status: o.message[:160] for o in reversed(outcomes) if o.status != OK},
        )
