"""Ports: how one engine's step gets work done by another engine (DESIGN.md §5).

Each port is a small interface; ``local_ports.py`` implements both in-process (the reference a
test holds the data-plane implementations against), a later issue over the data plane.

**StagePort** runs a layer range ``[start, end)`` of this engine's model for the step's
sequences (layer migration). Who calls what, and when:

1. ``submit(work)`` — the stepping thread (inside ``Engine.step``), once per remote stage per
   micro-batch, as soon as the layers before the stage have run. It returns a ``Future`` at once
   and never waits for the work, so the engine computes the other micro-batch meanwhile. The
   result is the hidden states after layer ``end - 1``, ``[rows, hidden]``, rows in the order of
   ``work.seqs``. The helper keeps each sequence's KV for those layers between steps: a work item
   that starts a sequence at a position below what it holds rewinds it (the retry of a failed
   step), one beyond it fails with ``PortError``.
2. ``import_kv(request_id, data, layout)`` — any thread (kv_routes.py: a sequence imported
   while the stage is remote, or moved at a layout switch): the helper writes one layer of the
   sequence's KV, tokens ``[layout.first_token, layout.num_tokens)``; the future settles once it
   is written there.
3. ``export_kv(request_id, layer, start_token, end_token)`` — any thread: one layer of a
   sequence's KV the helper holds, the blocks of tokens ``[start_token, end_token)`` (a prefill
   donor's handoff of the layers it ran there; a layout switch moving an import back).
4. ``release(request_ids)`` — the engine thread, when sequences finish, are aborted or are
   preempted: the helper frees their KV. Idempotent, unknown ids ignored; it never blocks on
   work and never raises (a helper that cannot be reached frees them when their lease ends).
   It takes effect after every ``import_kv`` / ``export_kv`` of those sequences submitted
   before it has been answered, so a handoff read just before the release still finds the KV.
5. ``close()`` — whoever made the port, once no stage uses it.

``import_kv`` and ``export_kv`` have a default that fails (``PortError``): a port that carries
no KV (a test's) makes an import forwarded to it *lost*, which kv_routes.py answers by
recomputing the sequence.

**AttentionPort** computes partial attention over leading blocks of a sequence that a helper
holds, all layers (attention migration):

1. ``submit(layer, queries)`` — the stepping thread, once per layer of a step whose batch has
   sequences located on this port, before the engine computes their local part; the result is
   one ``PartialAttention`` (unnormalised ``O``, row max ``m``, denominator ``l``) per query,
   which the engine merges with its own part by log-sum-exp.
2. ``release(request_ids)``, ``close()`` — as for StagePort.

A future that raises ``PortError`` names the requests the helper could not serve; any other
exception counts against every request of the call. Either way the engine's step fails as a whole
and keeps nothing ("a failed step never happened"), then the engine recovers: see
docs/engine.md, "Stages and ports".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch

from services.common.errors import BanaServeError
from services.common.kv_layout import KVLayout
from services.engine.attention import PartialAttention


class PortError(BanaServeError):
    """A helper could not serve ``request_ids``: their KV there is gone or out of step, the
    helper is unreachable, or it refused the work."""

    def __init__(self, request_ids: Sequence[str], reason: str) -> None:
        super().__init__(f"helper failed for {', '.join(request_ids)}: {reason}")
        self.request_ids = tuple(request_ids)
        self.reason = reason


class StageFailedError(BanaServeError):
    """A helper failed requests this engine cannot serve alone (it no longer holds the layers).

    ``Engine.step`` raises it after finishing and freeing every request in ``request_ids``
    (like an abort); the rest of the batch is untouched and continues at the next step.
    """

    def __init__(self, request_ids: Sequence[str], reason: str) -> None:
        super().__init__(f"remote stage failed {', '.join(request_ids)}: {reason}")
        self.request_ids = tuple(request_ids)
        self.reason = reason


T = TypeVar("T")
U = TypeVar("U")


def settled(fn: Callable[[], T]) -> Future[T]:
    """A future already settled with ``fn()``'s result or exception."""
    future: Future[T] = Future()
    try:
        future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - the future carries it to the caller
        future.set_exception(e)
    return future


def then(future: Future[T], fn: Callable[[T], U]) -> Future[U]:
    """A future of ``fn(result)`` once ``future`` settles (its exception passes through, its
    cancellation too); cancelling the returned future cancels ``future`` if it can be."""
    out: Future[U] = Future()

    def done(f: Future[T]) -> None:
        if f.cancelled():
            out.cancel()
            return
        try:
            result = fn(f.result())
        except BaseException as e:  # noqa: BLE001 - carried to whoever waits on ``out``
            _settle(out, out.set_exception, e)
        else:
            _settle(out, out.set_result, result)

    out.add_done_callback(lambda o: o.cancelled() and future.cancel())
    future.add_done_callback(done)
    return out


def settle_like(target: Future[T], source: Future[T]) -> None:
    """Gives ``target`` the outcome of the settled ``source``: its result, its exception or its
    cancellation. A ``target`` its waiter has cancelled meanwhile (a stream aborted, a call
    cancelled) keeps that: the outcome has no taker. Safe in a done-callback."""
    if source.cancelled():
        target.cancel()
        return
    error = source.exception()
    if error is None:
        _settle(target, target.set_result, source.result())
    else:
        _settle(target, target.set_exception, error)


def _settle(target: Future[Any], setter: Callable[[Any], None], outcome: Any) -> None:
    try:
        setter(outcome)
    except InvalidStateError:
        if not target.cancelled():  # set twice: a defect, not a waiter that left
            raise


class PortFailed(Exception):
    """A port's call failed during a step; carries which port and which requests it hit."""

    def __init__(self, port: object, request_ids: Sequence[str], reason: str) -> None:
        super().__init__(f"{', '.join(request_ids)}: {reason}")
        self.port = port
        self.request_ids = tuple(request_ids)
        self.reason = reason


def wait(future: Future[T], port: object, request_ids: Sequence[str], timeout_s: float) -> T:
    """A port future's result, or ``PortFailed`` naming the requests it failed."""
    try:
        return future.result(timeout=timeout_s)
    except PortError as e:
        raise PortFailed(port, e.request_ids, e.reason) from e
    except TimeoutError as e:
        raise PortFailed(port, request_ids, f"no answer within {timeout_s}s") from e
    except Exception as e:  # noqa: BLE001 - any failure of the helper fails its requests
        raise PortFailed(port, request_ids, f"{type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class StageSeq:
    """One sequence's rows in a stage's work: positions ``[start, start + num_tokens)``."""

    request_id: str
    start: int  # tokens whose KV the helper must already hold for this sequence
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class StageWork:
    """Run layers ``[start_layer, end_layer)`` on ``hidden`` (``[rows, hidden]``).

    ``seqs`` owns the rows in order: the first ``seqs[0].num_tokens`` rows are its tokens at
    positions ``seqs[0].start...``, and so on.
    """

    start_layer: int
    end_layer: int
    hidden: torch.Tensor
    seqs: tuple[StageSeq, ...]

    @property
    def request_ids(self) -> tuple[str, ...]:
        return tuple(s.request_id for s in self.seqs)


@dataclass(frozen=True)
class AttentionQuery:
    """The query rows of one located sequence at one layer."""

    request_id: str
    q: torch.Tensor  # [n, heads, head_dim], after RoPE
    positions: torch.Tensor  # [n] absolute positions, for causality
    num_tokens: int  # tokens [0, num_tokens) the helper must hold for this sequence


class EvictionCount:
    """What a port's migration reports as recomputed at its end: the sequences the engine sent
    back to recompute, their KV on the helper lost, after the port failed a step
    (``Placement.recover``, on the stepping thread: read once it is done)."""

    num_evicted = 0

    def evicted(self, request_ids: Sequence[str]) -> None:
        self.num_evicted += len(request_ids)


class StagePort(EvictionCount, ABC):
    @abstractmethod
    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        """Start ``work``; the future gives the hidden states after its last layer."""

    def import_kv(self, request_id: str, data: torch.Tensor, layout: KVLayout) -> Future[None]:
        """Write one layer of a sequence's KV on the helper (any thread)."""
        return settled(lambda: _no_kv(self, request_id))

    def export_kv(
        self, request_id: str, layer: int, start_token: int, end_token: int
    ) -> Future[tuple[torch.Tensor, KVLayout]]:
        """One layer of a sequence's KV from the helper, tokens ``[start_token, end_token)``."""
        return settled(lambda: _no_kv(self, request_id))

    @abstractmethod
    def release(self, request_ids: Sequence[str]) -> None:
        """The helper may free these sequences' KV (after the KV calls submitted before)."""

    @abstractmethod
    def close(self) -> None:
        """Release the port's own resources (threads, connections)."""


def _no_kv(port: StagePort, request_id: str) -> NoReturn:
    raise PortError([request_id], f"{type(port).__name__} carries no KV")


class AttentionPort(EvictionCount, ABC):
    @abstractmethod
    def submit(
        self, layer: int, queries: Sequence[AttentionQuery]
    ) -> Future[list[PartialAttention]]:
        """Start partial attention of each query over the helper's blocks at ``layer``."""

    @abstractmethod
    def release(self, request_ids: Sequence[str]) -> None:
        """The helper may free these sequences' blocks."""

    @abstractmethod
    def close(self) -> None:
        """Release the port's own resources (threads, connections)."""
