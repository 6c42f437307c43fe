"""The longest deadline a request keeps, on every path into the cluster.

gRPC lets a caller send a deadline of up to 99,999,999 hours (the ``grpc-timeout`` header),
but grpc's Python client cannot hold one past 2^63 ns after the epoch (about 7.4e9 s from
2026): a call made with a longer timeout fails DEADLINE_EXCEEDED at once, before it is sent.
A service that handed such a deadline on to its own calls (the router to its workers, a
prefill worker to its decode worker) therefore failed at once a request that had asked for
*more* time: ``grpc-timeout: 99999999H`` got DEADLINE_EXCEEDED "ReserveKV on worker
'decode-0' failed", and the client library given ``timeout_s=1e10`` (or ``banaserve generate
--timeout 1e20``) failed the same way, before sending anything (session 37's probe).

So each service takes what is left of a call's deadline through ``time_left``, and the client
library its ``timeout_s`` through ``bounded``: at most ``MAX_DEADLINE_S``, a day, far past any
generation here (the OpenAI HTTP API's ``x-request-timeout`` refuses more than that, 400). A
request that asked for longer fails DEADLINE_EXCEEDED after a day, not at once.
"""

from __future__ import annotations

from typing import Protocol

MAX_DEADLINE_S = 86_400.0


class _HasDeadline(Protocol):
    def time_remaining(self) -> float | None: ...


def bounded(timeout_s: float | None) -> float | None:
    """``timeout_s``, at most ``MAX_DEADLINE_S`` (None, no deadline, stays None; NaN is the
    caller's to refuse)."""
    return None if timeout_s is None else min(timeout_s, MAX_DEADLINE_S)


def time_left(context: _HasDeadline) -> float | None:
    """What is left of a call's deadline, at most ``MAX_DEADLINE_S``; None: it has none."""
    return bounded(context.time_remaining())
