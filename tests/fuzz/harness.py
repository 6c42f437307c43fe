"""Sends fuzzed inputs to real services and checks what comes back.

Every input is bytes (``strategies.payloads``), sent on a raw-bytes gRPC method so nothing on
the client side re-encodes or validates it. After each one
``Fuzzer.check`` holds the service to its contract:

- no crash: every service process is still running;
- no hang: the call ended, and a method that must answer promptly did not run out its
  deadline (DEADLINE_EXCEEDED is an answer only where the request's own deadline is the point:
  ``Method.deadline_ok``);
- only documented statuses: the code is in the method's ``allowed`` set (docs/services.md,
  the protos' method comments); a response decodes as the method's response message, and
  says what the method's ``invariant`` requires.

Data-plane messages are checked the same way (dataplanes.py).

Statuses the client caused itself (it cancelled a stream, or broke its request stream) are
counted under their own names and not held against the server. ``Tally`` keeps per-service
counts for the report (docs/reliability.md).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.fuzz.strategies import Hints, message_class, payloads

# Extra time a call may take past its deadline before it counts as hung (the client's deadline
# fires on its own; this catches a client stuck on a server that stopped reading).
HANG_SLACK_S = 5.0
# What the client did to the call itself, not the server's answer.
CLIENT_CANCELLED = "CLIENT_CANCELLED"
CLIENT_BROKE = "CLIENT_BROKE"
# Every call may be answered with this: bytes that do not decode (docs/services.md).
ALWAYS = frozenset({"OK", "INVALID_ARGUMENT"})


@dataclass(frozen=True)
class Method:
    """One RPC under fuzz and what it may answer."""

    service: str  # the report's row: "router", "decode", ...
    descriptor: MethodDescriptor
    allowed: frozenset[str]
    timeout_s: float = 10.0
    deadline_ok: bool = False
    # What an OK answer must say, beyond decoding: raises AssertionError if it does not.
    invariant: Callable[[list[Message]], None] | None = None

    @property
    def path(self) -> str:
        return f"/{self.descriptor.containing_service.full_name}/{self.descriptor.name}"

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def request_class(self) -> type[Message]:
        return message_class(self.descriptor.input_type)

    @property
    def response_class(self) -> type[Message]:
        return message_class(self.descriptor.output_type)


def methods(
    service_descriptor: Any,
    service: str,
    allowed: dict[str, set[str]],
    deadline_ok: Sequence[str] = (),
    invariants: dict[str, Callable[[list[Message]], None]] | None = None,
) -> list[Method]:
    """Every method of a service, each with its allowed codes (and, for some, what an OK
    answer must say); a method missing from ``allowed`` is an error, so a new RPC cannot slip
    past the fuzzer."""
    missing = {m.name for m in service_descriptor.methods} - set(allowed)
    assert not missing, f"no allowed statuses listed for {service}: {sorted(missing)}"
    return [
        Method(
            service,
            m,
            ALWAYS
            | frozenset(allowed[m.name])
            | ({"DEADLINE_EXCEEDED"} if m.name in deadline_ok else set()),
            deadline_ok=m.name in deadline_ok,
            invariant=(invariants or {}).get(m.name),
        )
        for m in service_descriptor.methods
    ]


@dataclass(frozen=True)
class Call:
    """One fuzzed call: the request frames (one unless the method takes a stream) and how the
    client ends it."""

    frames: tuple[bytes, ...]
    timeout_s: float
    # Server streams: cancel after this many responses (None: read to the end).
    cancel_after: int | None = None
    # Client streams: raise in the request iterator after the frames instead of half-closing.
    break_stream: bool = False


@dataclass
class Outcome:
    code: str
    elapsed_s: float
    details: str = ""
    responses: list[bytes] = field(default_factory=list)
    payload: bytes = b""  # a data-plane response's payload


@dataclass
class Tally:
    """Per service: inputs sent, statuses seen, crashes and hangs."""

    inputs: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    crashes: Counter[str] = field(default_factory=Counter)
    hangs: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    # "service method" -> statuses, and the first message seen with each, for the detail table
    by_method: dict[str, Counter[str]] = field(default_factory=dict)
    first_details: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, service: str, method: str, outcome: Outcome) -> None:
        name, code = f"{service} {method}", outcome.code
        self.inputs[service] += 1
        self.statuses.setdefault(service, Counter())[code] += 1
        self.by_method.setdefault(name, Counter())[code] += 1
        self.first_details.setdefault((name, code), outcome.details[:100])
        self.seconds[service] += outcome.elapsed_s

    def method_table(self) -> str:
        """Per method and status: the count and the first message the server gave with it."""
        lines = ["| method | status | count | first message |", "|---|---|---|---|"]
        for name, codes in self.by_method.items():
            for code, n in sorted(codes.items()):
                details = self.first_details[(name, code)].replace("|", "/").replace("\n", " ")
                lines.append(f"| {name} | {code} | {n} | {details} |")
        return "\n".join(lines)

    def rows(self) -> list[tuple[str, int, str, int, int, float]]:
        return [
            (
                service,
                self.inputs[service],
                ", ".join(f"{c} {n}" for c, n in sorted(self.statuses[service].items())),
                self.crashes[service],
                self.hangs[service],
                self.seconds[service],
            )
            for service in self.inputs
        ]

    def table(self) -> str:
        lines = [
            "| service | inputs | statuses seen (count) | crashes | hangs | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for service, n, statuses, crashes, hangs, secs in self.rows():
            lines.append(f"| {service} | {n} | {statuses} | {crashes} | {hangs} | {secs:.0f} |")
        return "\n".join(lines)


class _BrokenByClient(Exception):
    pass


def _broken(frames: Sequence[bytes]) -> Iterator[bytes]:
    yield from frames
    raise _BrokenByClient("the fuzzer breaks its request stream")


def _rpc_error(exc: grpc.RpcError, started: float) -> Outcome:
    code, details = exc.code(), exc.details() or ""
    name = code.name if code is not None else "UNKNOWN"
    if "Exception iterating requests" in details:
        name = CLIENT_BROKE
    return Outcome(name, time.monotonic() - started, details)


def grpc_call(channel: grpc.Channel, method: Method, call: Call) -> Outcome:
    """One raw-bytes call: the frames go out as they are, responses come back undecoded."""
    d, started = method.descriptor, time.monotonic()
    try:
        if d.client_streaming:
            frames = _broken(call.frames) if call.break_stream else iter(call.frames)
            response = channel.stream_unary(method.path)(frames, timeout=call.timeout_s)
            return Outcome("OK", time.monotonic() - started, responses=[response])
        if not d.server_streaming:
            response = channel.unary_unary(method.path)(call.frames[0], timeout=call.timeout_s)
            return Outcome("OK", time.monotonic() - started, responses=[response])
        stream = channel.unary_stream(method.path)(call.frames[0], timeout=call.timeout_s)
        responses = []
        for response in stream:
            responses.append(response)
            if call.cancel_after is not None and len(responses) >= call.cancel_after:
                stream.cancel()
                return Outcome(CLIENT_CANCELLED, time.monotonic() - started, responses=responses)
        return Outcome("OK", time.monotonic() - started, responses=responses)
    except grpc.RpcError as exc:
        return _rpc_error(exc, started)


def _is_hang(outcome: Outcome, timeout_s: float, deadline_ok: bool) -> bool:
    if outcome.elapsed_s > timeout_s + HANG_SLACK_S:
        return True
    # The client's own deadline ran out (not a DEADLINE_EXCEEDED the server chose to send).
    ran_out = outcome.code == "DEADLINE_EXCEEDED" and outcome.elapsed_s >= 0.9 * timeout_s
    return ran_out and not deadline_ok


def _documented(code: str, details: str, allowed: frozenset[str]) -> bool:
    if code in allowed or code in (CLIENT_CANCELLED, CLIENT_BROKE):
        return True
    # Any method, any service: gRPC refuses a message over the server's receive limit.
    # (A streamed one's message starts with "SERVER: ".)
    return code == "RESOURCE_EXHAUSTED" and "Received message larger than max" in details


class Fuzzer:
    """Runs calls, records each in ``tally`` and checks it against the contract (module
    docstring). ``alive`` says which service processes still run (name -> running)."""

    def __init__(self, tally: Tally, alive: Callable[[], dict[str, bool]]) -> None:
        self.tally = tally
        self._alive = alive

    def check(
        self,
        service: str,
        method: str,
        allowed: frozenset[str],
        deadline_ok: bool,
        timeout_s: float,
        outcome: Outcome,
        what: str,
    ) -> None:
        self.tally.add(service, method, outcome)
        dead = [name for name, running in self._alive().items() if not running]
        if dead:
            self.tally.crashes[service] += 1
            raise AssertionError(f"{what}: {', '.join(dead)} died")
        if _is_hang(outcome, timeout_s, deadline_ok):
            self.tally.hangs[service] += 1
            raise AssertionError(
                f"{what}: no answer in {outcome.elapsed_s:.1f}s ({outcome.details})"
            )
        if not _documented(outcome.code, outcome.details, allowed):
            raise AssertionError(
                f"{what}: undocumented status {outcome.code} ({outcome.details!r})"
            )

    def grpc(self, channel: grpc.Channel, method: Method, call: Call) -> Outcome:
        outcome = grpc_call(channel, method, call)
        sizes = [len(f) for f in call.frames]
        self.check(
            method.service,
            method.name,
            method.allowed,
            method.deadline_ok,
            call.timeout_s,
            outcome,
            f"{method.path} with frames of {sizes} bytes, timeout {call.timeout_s}s: "
            f"{_preview(method, call)}",
        )
        # Every answer is a valid response message, and says what the contract says.
        replies = [method.response_class.FromString(r) for r in outcome.responses]
        if method.invariant is not None and outcome.code == "OK":
            method.invariant(replies)
        return outcome


def _preview(method: Method, call: Call, limit: int = 600) -> str:
    """What the failing input was, readably (the bytes themselves if they do not decode)."""
    parts = []
    for frame in call.frames:
        try:
            text = str(method.request_class.FromString(frame))
        except Exception:
            text = repr(frame[:80])
        parts.append(text[:limit].replace("\n", " "))
    return " | ".join(parts)


# -- what one call is --------------------------------------------------------------------

# The request's own deadline, for methods where it is one (``Method.deadline_ok``).
DEADLINES = (0.001, 0.2, 1.0, 3.0)


def calls(method: Method, hints: Hints, seeds: Sequence[Message] = ()) -> st.SearchStrategy[Call]:
    """Calls of ``method``: one request or a stream of them, each a payload from the
    descriptor walker (or a valid seed broken a little); server streams may be cancelled
    early, client streams broken."""
    one = payloads(method.descriptor.input_type, hints, seeds)
    timeouts = st.sampled_from(DEADLINES) if method.deadline_ok else st.just(method.timeout_s)
    d = method.descriptor
    if d.client_streaming:
        frames = st.lists(one, max_size=8).map(tuple)
        return st.builds(Call, frames, timeouts, st.none(), st.booleans())
    cancel = st.one_of(st.none(), st.integers(1, 3)) if d.server_streaming else st.none()
    return st.builds(Call, one.map(lambda b: (b,)), timeouts, cancel)
