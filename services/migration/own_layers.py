"""What a worker knows of its own layers, for migration calls that must not wait for a step.

Every call that visits a worker's engine thread waits for the step in flight: on a loaded
prefill worker 2-3 s (docs/coordinator.md, "Time to switch"). ``OwnLayers`` is learnt once, in
one visit (``learn``, at the agent's start), and then answers without one:

- ``described(layers)``: the fingerprint and the digests of ``[k, L)`` that ``Prepare`` returns
  (a layer's weights never change: a dropped one comes back the same, so its digest stands);
  None while a layer of the range has no digest (never held: ``describe`` asks the engine);
- ``kv_bound(snapshot, layers)``: at most how many bytes of KV of ``layers`` the worker's
  sequences hold (every block in use, whole), from the engine's snapshot.
"""

from __future__ import annotations

from services.common.errors import InvalidRequestError
from services.engine.engine import Engine
from services.engine.snapshot import EngineSnapshot
from services.migration.records import layer_digest

Described = tuple[str, dict[int, str]]  # fingerprint, digest by layer


class OwnLayers:
    def __init__(self) -> None:
        self.digests: dict[int, str] = {}  # by layer, once computed
        self.fingerprint = ""
        self.num_layers = 0  # 0: not learnt yet
        self.layer_block_bytes = 0  # one block of one layer's K and V

    def learn(self, engine: Engine) -> None:
        """(engine thread) Digest every layer held now (~0.4 s for smollm2's 30)."""
        if engine.spec.num_layers > 1:  # layer 0 never moves
            self.describe(engine, range(1, engine.spec.num_layers))
        self.fingerprint, self.layer_block_bytes = (
            engine.fingerprint,
            engine.kv_cache.layer_block_bytes,
        )
        self.num_layers = engine.spec.num_layers

    def describe(self, engine: Engine, layers: range) -> Described:
        """(engine thread) The fingerprint and the digests of the layers of ``layers`` held or
        held before."""
        check_range(layers, engine.spec.num_layers)
        for i in layers:
            if i not in self.digests and engine.model.holds_layer(i):
                self.digests[i] = layer_digest(engine.model.layers[i])
        return engine.fingerprint, {i: self.digests[i] for i in layers if i in self.digests}

    def described(self, layers: range) -> Described | None:
        """``describe`` without the engine, once learnt and every layer of ``layers`` digested."""
        if not self.num_layers:
            return None
        check_range(layers, self.num_layers)
        if any(i not in self.digests for i in layers):
            return None
        return self.fingerprint, {i: self.digests[i] for i in layers}

    def kv_bound(self, snapshot: EngineSnapshot, layers: range) -> int | None:
        """Bytes of KV of ``layers`` in use at most; None before ``learn``."""
        if not self.layer_block_bytes:
            return None
        in_use = snapshot.num_blocks - snapshot.num_free_blocks
        return in_use * self.layer_block_bytes * len(layers)


def check_range(layers: range, num_layers: int) -> None:
    if not 0 < layers.start < layers.stop == num_layers:
        raise InvalidRequestError(
            f"layers [{layers.start}, {layers.stop}): only [k, {num_layers}) with k >= 1 move"
        )
