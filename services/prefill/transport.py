"""How a prefill worker hands a request's KV to a decode worker (DESIGN.md §4, step 3).

One ``KVSender`` carries one request's KV; a ``KVTransport`` opens them. Who calls what, and
when (all on the prefill worker's event loop unless marked otherwise):

1. ``KVTransport.open(target, request_id, num_layers)`` — the worker, when the request is
   admitted and before its prompt computes, so connecting overlaps queueing and compute;
2. ``KVSender.send_layer(data, layout)`` — the engine's stepping thread, from the layer hook,
   once per layer as soon as that layer's KV is written (``data`` is a copy the engine no longer
   touches). It must not block: the sending happens elsewhere while the next layer computes;
3. ``KVSender.finish(first_token_id, compute_done_at)`` — the worker, after the step that
   sampled the first token; sends the end frame and waits (bounded by ``timeout_s``) for the
   receiver to acknowledge every layer. Raises ``TransferError`` if the transfer failed;
4. ``KVSender.abort()`` — the worker, instead of ``finish``, on cancel, deadline or error (and
   when the first token already ends the request). Idempotent; the receiver then frees its
   reservation. A sender that was neither finished nor aborted is a leak.

``failed`` may be read at any time: a transfer that already broke (unreachable target, a
rejected header) lets the worker fail the request before spending more compute on it.

Implementations: a gRPC client stream to ``DecodeService.TransferKV``
(``services/prefill/clients.py``), and data-plane messages to the decode worker's data plane,
UCX by default (``services/prefill/dataplane_transport.py``, which also picks one of the two per
target).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from services.common.errors import ErrorCode
from services.common.kv_layout import KVLayout


class TransferError(Exception):
    """A transfer failed; ``code`` is the status the caller should see (e.g. UNAVAILABLE, or
    the receiver's own status when it rejected the KV)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class KVTarget:
    worker_id: str
    address: str  # DecodeService "HOST:PORT"
    reservation_id: str
    data_address: str = ""  # the decode worker's data plane, "HOST:PORT"; "": none
    data_transport: str = ""  # its kind (services.rpc.dataplane.KINDS) when it has one
    first_block: int = 0  # the target holds the prompt's blocks before it: KV is sent from here


@dataclass(frozen=True)
class TransferStats:
    num_layers: int
    num_bytes: int
    # From the first KV byte sent to the receiver's acknowledgement.
    transfer_s: float
    # The part of transfer_s after compute finished: what compute did not hide.
    exposed_s: float

    @classmethod
    def measured(
        cls,
        num_layers: int,
        num_bytes: int,
        first_sent_at: float | None,
        compute_done_at: float,
        acked_at: float,
    ) -> TransferStats:
        """The one way every transport times a transfer (None: nothing left before compute
        finished, so the transfer starts there)."""
        started = compute_done_at if first_sent_at is None else first_sent_at
        return cls(
            num_layers,
            num_bytes,
            acked_at - started,
            max(0.0, acked_at - max(started, compute_done_at)),
        )


class KVSender(ABC):
    @abstractmethod
    def send_layer(self, data: torch.Tensor, layout: KVLayout) -> None:
        """Queue one layer's KV (thread-safe, never blocks)."""

    @abstractmethod
    async def finish(self, first_token_id: int, compute_done_at: float) -> TransferStats:
        """Send the end frame and wait for the receiver to acknowledge the whole transfer."""

    @abstractmethod
    async def abort(self) -> None:
        """Stop the transfer; the receiver frees what it reserved."""

    @property
    @abstractmethod
    def failed(self) -> TransferError | None:
        """The error that already ended the transfer, if any."""


class KVTransport(ABC):
    @abstractmethod
    async def open(
        self, target: KVTarget, request_id: str, num_layers: int, timeout_s: float | None
    ) -> KVSender:
        """Start a transfer of ``num_layers`` layers into ``target``'s reservation."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; senders still open are aborted."""
