"""Weight transfer: a helper lacking the weights of layers ``[k, L)`` gets them from the donor.

In COPYING the helper's Prepare compares the donor's per-layer digests with its own
(records.py: ``layer_digest``); the layers it does not hold, or holds differently, are
``needed``. For those, over the migration data plane (never as gRPC messages):

1. helper, Prepare (engine thread): ``receiving`` builds a ``LayerStack`` (hosting.py) that
   shares the layers the engine holds identically and awaits the others, and the
   ``WeightsReceiver`` that fills it; the range is hosted at once, the KV pool and the
   awaited weights' bytes reserved (under a memory budget the own pool shrinks for both);
2. donor, CopyWeights: ``send_layers`` exports one layer per ``engine_call`` (``layer_tensors``:
   names and ``[out, in]`` weights as an unpacked ``DecoderLayer`` has them, dense, on the CPU)
   and sends each tensor in chunks of at most ``chunk_bytes`` as ``weights_import`` messages
   (wire.py), in name order, each acknowledged before the next;
3. helper, per message (a host thread, ``WeightsReceiver.receive``): the layer must be awaited,
   the tensor's name, dtype and shape those of this worker's ``DecoderLayer`` and the chunk the
   next bytes of it; when a layer's last byte is in, its BLAKE2b digest (``tensors_digest``)
   must equal the donor's from Prepare, else the layer is forgotten and the message refused
   (``InvalidRequestError``: the donor's CopyWeights fails with the reason, the coordinator
   aborts); a verified layer is built like a loaded one (packed on CPU) and put in the stack.
   ``HostedLayers.run`` fails until every awaited layer is in;
4. Release, Abort or lease expiry: the hosted range is released, and with it the stack's
   layers (``HostedLayers.close``): the helper's memory is back to what it was.

The shipped layers run with the helper's rotary tables and norms' epsilon: a helper of another
checkpoint must have the donor's architecture (its layers' tensor shapes are checked, its
``config.json`` rope settings are not).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.errors import ErrorCode, InvalidRequestError, ResourceExhaustedError
from services.engine.engine import Engine
from services.engine.hosting import HostedLayers
from services.engine.layer_stack import LayerStack
from services.engine.memory import physical_memory_bytes
from services.engine.models.llama import DecoderLayer
from services.engine.models.loader import DTYPES
from services.engine.models.packed_linear import pack_linears, packing_supported
from services.migration import wire
from services.migration.records import layer_tensors, tensors_digest
from services.rpc.convert import DTYPE_FROM_PROTO
from services.rpc.dataplane import DataPlaneError
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb

EngineCall = Callable[[Callable[[Engine], Any]], Awaitable[Any]]
Send = Callable[[bytes, Any], Awaitable[Any]]  # (header, payload) -> the helper's answer


# ---- the helper -------------------------------------------------------------------------


@dataclass
class _Layer:
    """One awaited layer's tensors as they fill."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)  # bytes written of each


class WeightsReceiver:
    """Assembles, verifies and installs the layers a helper awaits (module doc, step 3)."""

    def __init__(
        self,
        stack: LayerStack,
        digests: dict[int, str],
        skeleton: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        build: Callable[[int, dict[str, torch.Tensor]], nn.Module],
    ) -> None:
        self.stack = stack
        self.digests = digests
        self.skeleton = skeleton  # name -> (dtype, shape) of every tensor of a layer
        self.build = build
        self.num_bytes = 0  # tensor bytes received
        self._pending: dict[int, _Layer] = {}
        self._lock = threading.Lock()

    def receive(self, msg: pb.WeightsImport, payload: memoryview) -> None:
        """One chunk (any thread); raises ``InvalidRequestError`` naming what is wrong."""
        chunk = memoryview(payload).cast("B")
        with self._lock:
            layer = self._awaited(msg.layer)
            tensor = self._tensor(layer, msg)
            done = layer.filled[msg.name]
            if msg.offset != done or done + chunk.nbytes > tensor.numel() * tensor.element_size():
                raise InvalidRequestError(
                    f"layer {msg.layer} {msg.name}: chunk of {chunk.nbytes} bytes at "
                    f"{msg.offset}, {done} bytes of it are in"
                )
            flat = tensor.view(-1).view(torch.uint8).numpy()
            flat[done : done + chunk.nbytes] = np.frombuffer(chunk, dtype=np.uint8)
            layer.filled[msg.name] = done + chunk.nbytes
            self.num_bytes += chunk.nbytes
            if self._complete(layer):
                del self._pending[msg.layer]
                self._install(msg.layer, layer.tensors)

    def _awaited(self, index: int) -> _Layer:
        if index not in self.stack.shipped or index in self.stack.layers:
            raise InvalidRequestError(f"the weights of layer {index} are not awaited here")
        return self._pending.setdefault(index, _Layer())

    def _tensor(self, layer: _Layer, msg: pb.WeightsImport) -> torch.Tensor:
        if msg.name in layer.tensors:
            return layer.tensors[msg.name]
        if msg.num_tensors != len(self.skeleton):
            raise InvalidRequestError(
                f"layer {msg.layer}: {msg.num_tensors} tensors sent, a layer here has "
                f"{len(self.skeleton)}"
            )
        expected = self.skeleton.get(msg.name)
        name = DTYPE_FROM_PROTO.get(msg.tensor.dtype, "?")
        shape = tuple(msg.tensor.shape)
        if expected is None or (wire.TORCH_DTYPES.get(name), shape) != expected:
            want = "no such tensor" if expected is None else f"{expected[0]} {list(expected[1])}"
            raise InvalidRequestError(
                f"layer {msg.layer} {msg.name}: {name} {list(shape)} sent, this worker's "
                f"layers have {want}"
            )
        layer.tensors[msg.name] = torch.empty(shape, dtype=expected[0])
        layer.filled[msg.name] = 0
        return layer.tensors[msg.name]

    def _complete(self, layer: _Layer) -> bool:
        if len(layer.tensors) < len(self.skeleton):
            return False
        return all(
            layer.filled[n] == t.numel() * t.element_size() for n, t in layer.tensors.items()
        )

    def _install(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        got, want = tensors_digest(tensors), self.digests[index]
        if got != want:
            raise InvalidRequestError(
                f"layer {index}: the weights received have digest {got}, the donor's is "
                f"{want}: refused"
            )
        self.stack.put(index, self.build(index, tensors))


def needed(
    layers: range, fp: str, mine: dict[int, str], theirs_fp: str, theirs: dict[int, str]
) -> list[int]:
    """The layers of ``layers`` whose weights a helper must get: all of them for another
    model or dtype, else those it does not hold or holds with another digest."""
    if theirs_fp and theirs_fp != fp:
        return list(layers)
    return [i for i in layers if i not in mine or (i in theirs and theirs[i] != mine[i])]


def host_range(
    engine: Engine,
    migration_id: str,
    layers: range,
    num_blocks: int,
    fingerprint: str,
    needed: list[int],
    digests: dict[int, str],
) -> tuple[HostedLayers, WeightsReceiver | None]:
    """Engine thread, helper's Prepare: host ``layers`` for the donor, with the engine's own
    weights or, when some are ``needed``, a stack awaiting them (and its receiver). A pool
    larger than this machine's memory is refused before anything is allocated, and an
    allocation that fails is this worker's lack of memory, not an internal error."""
    blocks = num_blocks or engine.block_manager.num_blocks
    need, have = blocks * engine.kv_cache.layer_block_bytes * len(layers), physical_memory_bytes()
    if need > have:
        raise ResourceExhaustedError(
            f"{blocks} hosted blocks of {len(layers)} layers take {need / 2**30:.1f} GiB; this "
            f"machine has {have / 2**30:.1f} GiB"
        )
    fp = fingerprint or engine.fingerprint
    stack, receiver = None, None
    if needed:
        same = fp == engine.fingerprint
        stack, receiver = receiving(engine, layers, needed, digests, same)
    try:
        hosted = engine.migration.host_layers(
            migration_id, layers.start, layers.stop, blocks, fp, stack=stack
        )
    except RuntimeError as e:  # torch's allocator: "can't allocate memory"
        if "allocate" not in str(e):
            raise
        raise ResourceExhaustedError(
            f"no memory for {blocks} hosted blocks of {len(layers)} layers"
        ) from None
    return hosted, receiver


def receiving(
    engine: Engine, layers: range, needed: list[int], digests: dict[int, str], same_model: bool
) -> tuple[LayerStack, WeightsReceiver]:
    """Engine thread, helper's Prepare: the stack to host ``layers`` with and its receiver.
    ``same_model``: the engine's own layers not ``needed`` are the donor's (shared)."""
    missing = [i for i in needed if i not in digests]
    if missing:
        raise InvalidRequestError(f"no donor digest for layers {missing}")
    model, config = engine.model, engine.config
    held = {} if not same_model else {i: model.layers[i] for i in layers if i not in needed}
    dtype = DTYPES[config.dtype]
    with torch.device("meta"):
        skeleton = DecoderLayer(engine.spec, layers.start).to(dtype)
    shapes = {n: (t.dtype, tuple(t.shape)) for n, t in skeleton.state_dict().items()}
    layer_bytes = sum(math.prod(s) * d.itemsize for d, s in shapes.values())
    stack = LayerStack(model, layers, held, layer_bytes * (len(layers) - len(held)))

    def build(index: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        with torch.device("meta"):
            layer = DecoderLayer(engine.spec, index)
        layer = layer.to_empty(device=config.device).to(dtype)
        layer.load_state_dict(tensors)
        layer.eval().requires_grad_(False)
        if packing_supported(dtype, torch.device(config.device)):
            pack_linears(layer)
        return layer

    return stack, WeightsReceiver(stack, {i: digests[i] for i in needed}, shapes, build)


# ---- the donor ------------------------------------------------------------------------


def export_layer(engine: Engine, index: int) -> dict[str, torch.Tensor]:
    """Engine thread: one layer's tensors as they travel (``layer_tensors``)."""
    if not engine.model.holds_layer(index):
        raise InvalidRequestError(f"layer {index} is not held here: its weights were dropped")
    return layer_tensors(engine.model.layers[index])


async def send_layers(
    engine_call: EngineCall,
    send: Send,
    migration_id: str,
    migration_layers: range,
    layers: list[int],
    chunk_bytes: int,
) -> int:
    """Ship ``layers``' weights through ``send``, one acknowledged chunk at a time (module
    doc, step 2); the tensor bytes sent."""
    outside = [i for i in layers if i not in migration_layers]
    if outside or not layers:
        raise InvalidRequestError(
            f"layers {layers} to ship: each must be in [{migration_layers.start}, "
            f"{migration_layers.stop})"
        )
    num_bytes = 0
    for index in sorted(set(layers)):
        tensors = await engine_call(lambda e, i=index: export_layer(e, i))
        for name, tensor in sorted(tensors.items()):
            for header, payload in wire.encode_weights_import(
                migration_id, index, name, tensor, len(tensors), chunk_bytes
            ):
                try:
                    await send(header, payload)
                except DataPlaneError as e:
                    if e.code is not ErrorCode.INVALID_ARGUMENT:
                        raise
                    raise InvalidRequestError(f"the helper refused: {e.message}") from e
                num_bytes += memoryview(payload).nbytes
    return num_bytes
