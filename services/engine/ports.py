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
2. ``release(request_ids)`` — the engine thread, when sequences finish, are aborted or are
   preempted: the helper frees their KV. Idempotent, unknown ids ignored; it never blocks on
   work and never raises (a helper that cannot be reached frees them when their lease ends).
3. ``close()`` — whoever made the port, once no stage uses it.

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
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

import torch

from services.common.errors import BanaServeError
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


class StagePort(ABC):
    @abstractmethod
    def submit(self, work: StageWork) -> Future[torch.Tensor]:
        """Start ``work``; the future gives the hidden states after its last layer."""

    @abstractmethod
    def release(self, request_ids: Sequence[str]) -> None:
        """The helper may free these sequences' KV."""

    @abstractmethod
    def close(self) -> None:
        """Release the port's own resources (threads, connections)."""


class AttentionPort(ABC):
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
