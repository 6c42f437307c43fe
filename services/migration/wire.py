"""Layer-migration messages on the data plane: one ``MigrationDataRequest`` header, tensor bytes
in the payload (protos/banaserve/v1/migration.proto).

Every tensor travels as raw little-endian bytes of its exact dtype with a ``TensorSpec`` (dtype,
shape) in the header, and every decode checks that the payload holds exactly those bytes before
any receiver touches them: a short, long or mistyped payload is ``InvalidRequestError``, never a
silently reshaped tensor. KV travels in the project's one KV byte layout
(services/common/kv_wire.py: block-major, ``encode`` / ``decode_blocks``), described by its
``KVLayout``, and is decoded as exactly the layout's blocks.

Donor -> helper (request header ``kind``):
- ``stage_run``: a ``StageWork`` (hidden states in the payload), answered by ``stage_result``;
- ``kv_import``: one layer of one sequence's KV (``KVLayout`` in the header);
- ``kv_tokens``: token ranges of many sequences in every hosted layer, one tensor (a delta
  that starts inside a block: copy stages and the switch's pause);
- ``kv_export``: ask for one layer of a hosted sequence's KV back, answered by ``kv_exported``;
- ``kv_tokens_export``: ask for token ranges of many sequences back, answered by ``kv_tokens``;
- ``release`` / ``held_tokens``: free sequences / how many tokens of each the helper holds.
- ``weights_import``: one chunk of one tensor of a layer's weights, for a helper lacking them
  (weights.py checks and assembles them), answered ``ok``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from services.common import kv_wire
from services.common.errors import InvalidRequestError
from services.common.kv_layout import KVLayout
from services.common.kv_wire import DTYPE_NAMES, TORCH_DTYPES
from services.engine.ports import PortError, StageSeq, StageWork
from services.rpc.convert import DTYPE_FROM_PROTO, DTYPE_TO_PROTO, layout_to_proto
from services.rpc.gen.banaserve.v1 import common_pb2
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from services.rpc.status import decode_request

Message = tuple[bytes, object]  # (header, payload with the buffer protocol)


# ---- tensors ----------------------------------------------------------------------------


def tensor_spec(tensor: torch.Tensor) -> pb.TensorSpec:
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise InvalidRequestError(f"no wire dtype for {tensor.dtype}")
    return pb.TensorSpec(dtype=DTYPE_TO_PROTO[name], shape=list(tensor.shape))


def tensor_bytes(tensor: torch.Tensor) -> object:
    """The tensor's bytes without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def tensor_from(spec: pb.TensorSpec, payload: memoryview | bytes) -> torch.Tensor:
    """The tensor ``spec`` describes, over ``payload``'s bytes (no copy when writable)."""
    name = DTYPE_FROM_PROTO.get(spec.dtype)
    if name is None:
        raise InvalidRequestError(f"unknown tensor dtype {spec.dtype}")
    dtype, shape = TORCH_DTYPES[name], tuple(spec.shape)
    expected = math.prod(shape) * dtype.itemsize
    view = memoryview(payload).cast("B")
    if view.nbytes != expected:
        raise InvalidRequestError(
            f"payload of {view.nbytes} bytes for a {name} tensor {list(shape)} ({expected} bytes)"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        view = memoryview(bytearray(view))
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).reshape(shape)


# ---- KV layouts -------------------------------------------------------------------------


def layout_from_proto(msg: common_pb2.KVLayout, layer: int) -> KVLayout:
    name = DTYPE_FROM_PROTO.get(msg.dtype)
    if name is None:
        raise InvalidRequestError(f"unknown KV dtype {msg.dtype}")
    return KVLayout(
        msg.fingerprint,
        layer,
        msg.num_tokens,
        tuple(bytes(h) for h in msg.block_hashes),
        name,
        msg.block_size,
        msg.num_kv_heads,
        msg.head_dim,
        msg.first_block,
    )


def kv_from(
    msg: common_pb2.KVLayout, layer: int, payload: memoryview
) -> tuple[torch.Tensor, KVLayout]:
    """A layer's KV and its layout, checked: the payload is exactly the layout's blocks."""
    layout = layout_from_proto(msg, layer)
    if layout.block_size <= 0 or layout.num_blocks <= 0:
        raise InvalidRequestError(f"KV layout covers no block: {layout}")
    return kv_wire.decode_blocks(payload, layout, layout.num_blocks), layout


# ---- requests (donor -> helper) -------------------------------------------------------------


def request(migration_id: str, **kind: object) -> bytes:
    return pb.MigrationDataRequest(migration_id=migration_id, **kind).SerializeToString()


def _stage_sequence(seq: StageSeq) -> pb.StageSequence:
    return pb.StageSequence(request_id=seq.request_id, start=seq.start, num_tokens=seq.num_tokens)


def encode_stage_run(migration_id: str, work: StageWork) -> Message:
    seqs = [_stage_sequence(s) for s in work.seqs]
    run = pb.StageRun(
        start_layer=work.start_layer,
        end_layer=work.end_layer,
        seqs=seqs,
        hidden=tensor_spec(work.hidden),
    )
    return request(migration_id, stage_run=run), tensor_bytes(work.hidden)


def decode_stage_run(run: pb.StageRun, payload: memoryview) -> StageWork:
    hidden = tensor_from(run.hidden, payload)
    seqs = tuple(StageSeq(s.request_id, s.start, s.num_tokens) for s in run.seqs)
    rows = sum(s.num_tokens for s in seqs)
    if hidden.dim() != 2 or hidden.shape[0] != rows:
        raise InvalidRequestError(f"hidden states {list(hidden.shape)} for {rows} rows")
    if run.start_layer >= run.end_layer:
        raise InvalidRequestError(f"empty layer range [{run.start_layer}, {run.end_layer})")
    return StageWork(run.start_layer, run.end_layer, hidden, seqs)


def _kv_import(request_id: str, data: torch.Tensor, layout: KVLayout) -> pb.KVImport:
    if tuple(data.shape) != layout.shape or DTYPE_NAMES.get(data.dtype) != layout.dtype:
        raise InvalidRequestError(f"KV {list(data.shape)} {data.dtype} is not its layout's")
    return pb.KVImport(request_id=request_id, layer=layout.layer, layout=layout_to_proto(layout, 0))


def encode_kv_import(
    migration_id: str, request_id: str, data: torch.Tensor, layout: KVLayout
) -> Message:
    msg = _kv_import(request_id, data, layout)
    return request(migration_id, kv_import=msg), kv_wire.encode(data)


def encode_kv_import_batch(
    migration_id: str, chunks: Sequence[tuple[str, torch.Tensor, KVLayout]]
) -> Message:
    """Several sequences' layers in one message (``KVImportBatch``): payloads in order."""
    if not chunks:
        raise InvalidRequestError("a KV import batch needs at least one chunk")
    items = [_kv_import(rid, data, layout) for rid, data, layout in chunks]
    payload = np.concatenate([kv_wire.encode(data) for _, data, _ in chunks])
    return request(migration_id, kv_import_batch=pb.KVImportBatch(items=items)), payload


def decode_kv_import_batch(
    batch: pb.KVImportBatch, payload: memoryview
) -> list[tuple[str, torch.Tensor, KVLayout]]:
    """Each item's request id, KV and layout; the payload must be exactly their blocks."""
    view = memoryview(payload).cast("B")
    out, at = [], 0
    for item in batch.items:
        layout = layout_from_proto(item.layout, item.layer)
        if layout.block_size <= 0 or layout.num_blocks <= 0:
            raise InvalidRequestError(f"KV layout covers no block: {layout}")
        size = layout.num_blocks * kv_wire.layout_block_nbytes(layout)
        if at + size > view.nbytes:
            raise InvalidRequestError(f"payload of {view.nbytes} bytes ends inside item {len(out)}")
        data = kv_wire.decode_blocks(view[at : at + size], layout, layout.num_blocks)
        out.append((item.request_id, data, layout))
        at += size
    if at != view.nbytes or not out:
        raise InvalidRequestError(f"payload of {view.nbytes} bytes for KV of {at} bytes")
    return out


def import_each(
    items: Sequence[tuple[str, torch.Tensor, KVLayout]],
    import_kv: Callable[[str, torch.Tensor, KVLayout], None],
) -> tuple[str, ...]:
    """A host's handling of a decoded ``kv_import_batch`` (on one of its threads): every item
    through ``import_kv``, in order; the request ids, once each."""
    for request_id, data, layout in items:
        import_kv(request_id, data, layout)
    return tuple(dict.fromkeys(request_id for request_id, _, _ in items))


def _kv_tokens(
    spans: Sequence[StageSeq], layers: range, fingerprint: str, data: torch.Tensor
) -> pb.KVTokens:
    if data.dim() != 5 or data.shape[:3] != (len(layers), 2, sum(s.num_tokens for s in spans)):
        raise InvalidRequestError(f"KV {list(data.shape)} is not {len(layers)} layers of spans")
    return pb.KVTokens(
        seqs=[_stage_sequence(s) for s in spans],
        layers=pb.LayerRange(start=layers.start, end=layers.stop),
        fingerprint=fingerprint,
        kv=tensor_spec(data),
    )


def encode_kv_tokens(
    migration_id: str,
    spans: Sequence[StageSeq],
    layers: range,
    fingerprint: str,
    data: torch.Tensor,
) -> Message:
    """Token ranges of several sequences in ``layers`` (``KVCache.gather_tokens``'s tensor)."""
    msg = _kv_tokens(spans, layers, fingerprint, data)
    return request(migration_id, kv_tokens=msg), tensor_bytes(data)


def encode_kv_tokens_export(migration_id: str, spans: Sequence[StageSeq]) -> bytes:
    msg = pb.KVTokensExport(seqs=[_stage_sequence(s) for s in spans])
    return request(migration_id, kv_tokens_export=msg)


def decode_kv_tokens_export(msg: pb.KVTokensExport) -> tuple[StageSeq, ...]:
    spans = tuple(StageSeq(s.request_id, s.start, s.num_tokens) for s in msg.seqs)
    if not spans:
        raise InvalidRequestError("a KV token export needs sequences")
    return spans


def encode_kv_tokens_reply(
    spans: Sequence[StageSeq], layers: range, fingerprint: str, data: torch.Tensor
) -> Message:
    return response(kv_tokens=_kv_tokens(spans, layers, fingerprint, data)), tensor_bytes(data)


def decode_kv_tokens(
    msg: pb.KVTokens, payload: memoryview
) -> tuple[tuple[StageSeq, ...], range, str, torch.Tensor]:
    """(spans, layers, fingerprint, KV): the payload exactly the tensor its spec names, the
    tensor exactly the spans' tokens in the named layers (the host checks heads and dim)."""
    data = tensor_from(msg.kv, payload)
    spans = tuple(StageSeq(s.request_id, s.start, s.num_tokens) for s in msg.seqs)
    layers = range(msg.layers.start, msg.layers.end)
    if not spans or not layers:
        raise InvalidRequestError("a KV token delta needs sequences and layers")
    expected = (len(layers), 2, sum(s.num_tokens for s in spans))
    if data.dim() != 5 or tuple(data.shape[:3]) != expected:
        raise InvalidRequestError(f"KV {list(data.shape)} for [layers, 2, tokens] = {expected}")
    return spans, layers, msg.fingerprint, data


def encode_kv_export(
    migration_id: str,
    request_id: str,
    layer: int,
    start_token: int,
    end_token: int,
    handoff: bool = False,
) -> bytes:
    msg = pb.KVExport(
        request_id=request_id,
        layer=layer,
        start_token=start_token,
        end_token=end_token,
        handoff=handoff,
    )
    return request(migration_id, kv_export=msg)


def encode_weights_import(
    migration_id: str, layer: int, name: str, tensor: torch.Tensor, num_tensors: int, chunk: int
) -> list[Message]:
    """One tensor of a layer's weights as ``weights_import`` messages of at most ``chunk``
    payload bytes each, in order (services/migration/weights.py)."""
    spec = tensor_spec(tensor)
    data = memoryview(tensor_bytes(tensor)).cast("B")  # type: ignore[arg-type]
    return [
        (
            request(
                migration_id,
                weights_import=pb.WeightsImport(
                    layer=layer, name=name, tensor=spec, offset=off, num_tensors=num_tensors
                ),
            ),
            data[off : off + chunk],
        )
        for off in range(0, max(data.nbytes, 1), chunk)
    ]


def encode_release(migration_id: str, request_ids: list[str]) -> bytes:
    return request(migration_id, release=pb.SequencesRelease(request_ids=request_ids))


def encode_held_tokens(migration_id: str, request_ids: list[str]) -> bytes:
    return request(migration_id, held_tokens=pb.HeldTokensQuery(request_ids=request_ids))


def parse_request(header: bytes) -> pb.MigrationDataRequest:
    msg = decode_request(pb.MigrationDataRequest, header)
    if not msg.migration_id or msg.WhichOneof("kind") is None:
        raise InvalidRequestError("migration data header without a migration id or a kind")
    return msg


# ---- responses (helper -> donor) ----------------------------------------------------------


def response(**kind: object) -> bytes:
    return pb.MigrationDataResponse(**kind).SerializeToString()


def encode_stage_result(hidden: torch.Tensor) -> Message:
    return response(stage_result=pb.StageResult(hidden=tensor_spec(hidden))), tensor_bytes(hidden)


def encode_kv_exported(data: torch.Tensor, layout: KVLayout) -> Message:
    return response(kv_exported=pb.KVExported(layout=layout_to_proto(layout, 0))), kv_wire.encode(
        data
    )


def parse_response(header: bytes, expected: str) -> pb.MigrationDataResponse:
    msg = decode_request(pb.MigrationDataResponse, header)
    if msg.WhichOneof("kind") != expected:
        raise InvalidRequestError(f"expected {expected}, got {msg.WhichOneof('kind')}")
    return msg


def decode_stage_result(header: bytes, payload: memoryview, work: StageWork) -> torch.Tensor:
    """The helper's hidden states for ``work`` (its rows, width and dtype checked), or the
    ``PortError`` the helper answered for some of its sequences."""
    msg = decode_request(pb.MigrationDataResponse, header)
    if msg.WhichOneof("kind") == "failed":
        raise PortError(list(msg.failed.request_ids), msg.failed.reason)
    hidden = tensor_from(parse_response(header, "stage_result").stage_result.hidden, payload)
    if tuple(hidden.shape) != tuple(work.hidden.shape) or hidden.dtype != work.hidden.dtype:
        raise InvalidRequestError(
            f"helper answered {list(hidden.shape)} {hidden.dtype} for "
            f"{list(work.hidden.shape)} {work.hidden.dtype}"
        )
    return hidden


def decode_kv_exported(
    header: bytes, payload: memoryview, layer: int
) -> tuple[torch.Tensor, KVLayout]:
    return kv_from(parse_response(header, "kv_exported").kv_exported.layout, layer, payload)


def encode_failed(request_ids: tuple[str, ...], reason: str) -> bytes:
    return response(failed=pb.SequencesFailed(request_ids=list(request_ids), reason=reason))


def decode_kv_tokens_reply(
    header: bytes, payload: memoryview, spans: Sequence[StageSeq]
) -> tuple[range, str, torch.Tensor]:
    """The helper's answer to ``kv_tokens_export``: exactly the spans asked for."""
    got, layers, fingerprint, data = decode_kv_tokens(
        parse_response(header, "kv_tokens").kv_tokens, payload
    )
    if got != tuple(spans):
        raise InvalidRequestError("the helper answered other token ranges than those asked")
    return layers, fingerprint, data


def decode_held_tokens(header: bytes, request_ids: list[str]) -> dict[str, int]:
    held = list(parse_response(header, "held_tokens").held_tokens.num_tokens)
    if len(held) != len(request_ids):
        raise InvalidRequestError(f"{len(held)} counts for {len(request_ids)} sequences")
    return dict(zip(request_ids, held, strict=True))
