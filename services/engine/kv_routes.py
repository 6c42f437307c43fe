"""Where a sequence's KV enters and leaves while some layers run on a helper (DESIGN.md §5).

While a stage runs through a ``StagePort`` (placement.py) this engine's pool lacks that stage's
layers' KV for the sequences it serves: it lives on the port's helper. So KV that arrives for
those layers, or must leave from them, goes through the port instead of the pool.

**Imports** (``ImportRoutes``). A sequence whose KV arrives from elsewhere (kv_transfer.py:
``begin_import``, ``import_kv`` per layer, ``finish_import``: a decode worker's handoff) needs
each layer's KV, by its first step, where that layer runs. Per importing sequence the routes
keep where each layer written so far lies; one lock (``lock``) orders the writes against layout
switches and against resizes of the pool (migration.py):

1. ``begin`` (engine thread) — ``begin_import`` registers the sequence;
2. ``write`` (any thread: a decode worker imports beside the steps) — under the lock, a layer
   that runs here goes into the pool; one that runs through a port is forwarded
   (``port.import_kv``) and waited for. A forward that fails leaves the layer *lost*;
3. ``relocate`` (engine thread, inside ``Placement.set_layout``, under the lock) — each layer
   already written moves to where it runs under the new layout: from the pool to the helper
   (read here, forwarded) or back (``port.export_kv``, written here). A move that fails, or one
   from the port that has just failed a step, leaves the layer lost. So an import that began
   before a switch or a revert ends, like any other, with each layer where it runs;
4. ``finish`` (engine thread, ``finish_import``) — the layers on a helper and the lost ones:
   Placement counts them missing here from token 0 (a revert copies them back) and sends a
   sequence with a lost layer to be recomputed, so a failed forward costs time, never output;
5. ``forget`` (engine thread) — an import that ends without joining (abort): each port holding
   some of its layers releases it.

**Exports** (``export_anywhere``). One layer of a running sequence's KV, read here if it is
here, else asked of the helper whose port ran that layer (``port.export_kv``), with the layout
(block hashes) computed here: a prefill donor's handoff of the layers ``[k, L)`` of a prompt it
computed through the helper. ``StagePort.release`` comes after such a read, never before it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from services.common.errors import InvalidRequestError
from services.common.kv_layout import KVLayout
from services.common.kv_wire import DTYPE_NAMES
from services.engine.kv_cache import KVCache
from services.engine.ports import PortError, StagePort, settled, then
from services.engine.sequence import Sequence
from services.engine.stages import StageLayout

if TYPE_CHECKING:
    from services.engine.kv_transfer import KVTransfer
    from services.engine.placement import Placement

log = logging.getLogger(__name__)
T = TypeVar("T")
ExportedKV = tuple[torch.Tensor, KVLayout]


def port_of(layout: StageLayout, layer: int) -> StagePort | None:
    """The port that runs ``layer`` under ``layout`` (None: it runs here)."""
    return next((s.port for s in layout.stages if layer in s.layers), None)


def _wait(future: Future[T], timeout_s: float) -> T:
    return future.result(timeout=timeout_s)


@dataclass(eq=False)
class ImportPlace:
    """Where one importing sequence's layers lie."""

    seq: Sequence
    # Blocks before it were reused from this engine's prefix cache: each layer's KV starts here.
    first_block: int = 0
    layouts: dict[int, KVLayout] = field(default_factory=dict)  # layers written, as written
    ports: dict[int, StagePort] = field(default_factory=dict)  # of those, the ones on a helper
    lost: set[int] = field(default_factory=set)  # written, but a forward or a move failed


class ImportRoutes:
    def __init__(self, kv_cache: KVCache, layout: Callable[[], StageLayout]) -> None:
        self.kv_cache = kv_cache
        self.layout = layout  # the engine's current stage layout
        self.lock = threading.RLock()
        self._places: dict[str, ImportPlace] = {}

    def begin(self, seq: Sequence, first_block: int = 0) -> None:
        with self.lock:
            self._places[seq.request_id] = ImportPlace(seq, first_block)

    def write(self, seq: Sequence, data: torch.Tensor, layout: KVLayout) -> None:
        """One layer where it runs now (any thread); a malformed one raises, nothing written."""
        self._check(data, layout)
        with self.lock:
            place = self._places.get(seq.request_id)
            if place is None:
                raise InvalidRequestError(f"no import in progress for {seq.request_id!r}")
            if layout.first_block != place.first_block:
                raise InvalidRequestError(
                    f"imported KV starts at block {layout.first_block}, this import at "
                    f"{place.first_block} (the blocks before it are reused here)"
                )
            stages, layer = self.layout(), layout.layer
            previous, place.layouts[layer] = place.layouts.get(layer), layout
            try:
                self._put(place, layer, port_of(stages, layer), data, stages.timeout_s)
            except Exception:
                place.layouts[layer] = previous  # type: ignore[assignment]
                if previous is None:
                    del place.layouts[layer]
                raise

    def relocate(self, new: StageLayout, failed: StagePort | None = None) -> None:
        """Engine thread, before ``new`` takes effect: every layer written goes where ``new``
        runs it. ``failed``: a port that just failed a step; what it held is lost."""
        with self.lock:
            dead = set() if failed is None else {failed}
            for place in self._places.values():
                before = set(place.ports.values())
                for layer in sorted(place.layouts):
                    src, dst = place.ports.get(layer), port_of(new, layer)
                    if layer not in place.lost and src is not dst:
                        self._move(place, layer, src, dst, new.timeout_s, dead)
                for port in before - set(place.ports.values()) - dead:
                    port.release([place.seq.request_id])

    def finish(self, request_id: str) -> tuple[set[int], set[int]]:
        """The import joins the batch: (layers on a helper, layers lost)."""
        with self.lock:
            place = self._places.pop(request_id, None)
        if place is None:
            return set(), set()
        return set(place.ports), set(place.lost)

    def forget(self, request_id: str) -> None:
        with self.lock:
            place = self._places.pop(request_id, None)
        for port in set() if place is None else set(place.ports.values()):
            port.release([request_id])

    # -- internals ------------------------------------------------------------------------

    def _check(self, data: torch.Tensor, layout: KVLayout) -> None:
        kv = self.kv_cache
        mine = (kv.dtype_name, kv.block_size, kv.num_kv_heads, kv.head_dim)
        got = (layout.dtype, layout.block_size, layout.num_kv_heads, layout.head_dim)
        if got != mine:
            raise InvalidRequestError(f"KV layout (dtype, block, heads, dim) {got} != {mine}")
        if tuple(data.shape) != layout.shape or DTYPE_NAMES.get(data.dtype) != layout.dtype:
            raise InvalidRequestError(
                f"KV tensor {tuple(data.shape)} {data.dtype} does not match its layout "
                f"{layout.shape} {layout.dtype}"
            )

    def _put(
        self,
        place: ImportPlace,
        layer: int,
        port: StagePort | None,
        data: torch.Tensor,
        timeout_s: float,
    ) -> None:
        """Write ``data`` of ``layer`` into the pool (``port`` None) or through ``port``."""
        place.ports.pop(layer, None)
        place.lost.discard(layer)
        layout = place.layouts[layer]
        if port is None:
            self.kv_cache.import_layer(place.seq.block_table[layout.first_block :], data, layout)
            return
        if layout.first_block:
            self._lose_partial(place, layer)
            return
        try:
            _wait(port.import_kv(place.seq.request_id, data, layout), timeout_s)
        except Exception as e:  # noqa: BLE001 - lost: the sequence recomputes when it joins
            log.info("import %s layer %d not forwarded: %r", place.seq.request_id, layer, e)
            place.lost.add(layer)
        else:
            place.ports[layer] = port

    @staticmethod
    def _lose_partial(place: ImportPlace, layer: int) -> None:
        """A layer whose import reused cached blocks cannot run on a helper: a helper takes a
        sequence's layers whole, and the reused blocks' KV of that layer is in this pool only
        while the layer runs here. Lost: the sequence recomputes when it joins (an import begun
        before a switch; none begins reusing blocks after one, the cache being paused)."""
        log.info("import %s layer %d lost: a helper takes whole layers", place.seq.request_id,
                 layer)  # fmt: skip
        place.ports.pop(layer, None)
        place.lost.add(layer)

    def _move(
        self,
        place: ImportPlace,
        layer: int,
        src: StagePort | None,
        dst: StagePort | None,
        timeout_s: float,
        dead: set[StagePort],
    ) -> None:
        rid, layout = place.seq.request_id, place.layouts[layer]
        if layout.first_block and dst is not None:
            self._lose_partial(place, layer)
            return
        try:
            if src is None:
                blocks = place.seq.block_table[layout.first_block :]
                data = self.kv_cache.export_layer(layer, blocks, layout)
            elif src in dead:
                raise PortError([rid], "the port failed")
            else:
                data, _ = _wait(src.export_kv(rid, layer, 0, layout.num_tokens), timeout_s)
        except Exception as e:  # noqa: BLE001 - lost: the sequence recomputes when it joins
            log.info("import %s layer %d not moved: %r", rid, layer, e)
            if src is not None:
                dead.add(src)  # one failure is enough: never wait on it again
            place.ports.pop(layer, None)
            place.lost.add(layer)
            return
        try:
            self._put(place, layer, dst, data, timeout_s)
        except Exception as e:  # noqa: BLE001 - a layer not held here (yet): lost
            log.info("import %s layer %d not written back: %r", rid, layer, e)
            place.lost.add(layer)
        if dst is not None and layer in place.lost:
            dead.add(dst)


def export_anywhere(
    kv: KVTransfer, placement: Placement, request_id: str, layer: int, start_token: int = 0
) -> Future[ExportedKV]:
    """One layer of a running request's computed KV from the block of ``start_token`` on,
    wherever it lies (module docstring): a helper's copy is read whole and cut here."""
    try:
        if layer not in placement.missing(request_id):
            return settled(lambda: kv.export(request_id, layer, start_token))
        port = port_of(placement.layout, layer)
        if port is None:
            raise InvalidRequestError(
                f"layer {layer} of {request_id}: its KV is neither here nor on a helper"
            )
        whole = kv.layout(request_id, layer)
        layout = kv.layout(request_id, layer, start_token)
    except Exception as e:  # noqa: BLE001 - the future carries it to the caller
        failed: Future[ExportedKV] = Future()
        failed.set_exception(e)
        return failed

    def checked(got: ExportedKV) -> ExportedKV:
        data, theirs = got
        if (theirs.first_block, theirs.num_tokens) != (0, whole.num_tokens) or tuple(
            data.shape
        ) != whole.shape:
            raise PortError(
                [request_id],
                f"helper gave tokens [{theirs.first_token}, {theirs.num_tokens}) "
                f"{list(data.shape)} of layer {layer}, asked [0, {whole.num_tokens})",
            )
        return data[:, layout.first_block :], layout

    return then(port.export_kv(request_id, layer, 0, whole.num_tokens), checked)
