"""Attention-migration messages on the data plane (the kinds of ``wire.py`` for the attention kind).

Donor -> helper (``MigrationDataRequest`` kinds, protos/banaserve/v1/migration.proto):

- ``blocks_hold``: reserve one block of the helper's pool per content hash for a sequence;
- ``kv_import`` (``wire.encode_kv_import``): one layer of those blocks, from block 0;
- ``attention_run``: the query rows of every located sequence of one step at one layer, batched
  (payload: ``q`` ``[rows, heads, head_dim]``), answered ``attention_result`` (payload: ``out``,
  ``max``, ``denom`` one after the other) or ``failed`` naming the sequences the helper could
  not serve;
- ``kv_export`` (``wire.encode_kv_export``): one layer of a sequence's held blocks back (the
  revert); ``release`` (``wire.encode_release``): the helper may free sequences' blocks.

Tensors travel as raw bytes with a ``TensorSpec`` each (``wire.tensor_from`` checks every size);
a query's positions travel as its first position, since a sequence's rows in one step are
consecutive tokens. Never protobuf tensors on the step path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from services.common.errors import InvalidRequestError
from services.common.hashing import BlockHash
from services.common.kv_wire import TORCH_DTYPES
from services.engine.attention import PartialAttention
from services.engine.ports import AttentionQuery, PortError
from services.migration import wire
from services.rpc.convert import DTYPE_FROM_PROTO
from services.rpc.gen.banaserve.v1 import migration_pb2 as pb
from services.rpc.status import decode_request

Message = wire.Message


def _nbytes(spec: pb.TensorSpec) -> int:
    name = DTYPE_FROM_PROTO.get(spec.dtype)
    if name is None:
        raise InvalidRequestError(f"unknown tensor dtype {spec.dtype}")
    return math.prod(spec.shape) * TORCH_DTYPES[name].itemsize


def _join(*tensors: torch.Tensor) -> object:
    parts = [wire.tensor_bytes(t) for t in tensors]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _split(payload: memoryview, specs: Sequence[pb.TensorSpec]) -> list[torch.Tensor]:
    """The tensors ``specs`` describe, one after the other in ``payload``, which they fill."""
    view = memoryview(payload).cast("B")
    sizes = [_nbytes(s) for s in specs]
    if sum(sizes) != view.nbytes:
        raise InvalidRequestError(f"payload of {view.nbytes} bytes for tensors of {sum(sizes)}")
    out, at = [], 0
    for spec, size in zip(specs, sizes, strict=True):
        out.append(wire.tensor_from(spec, view[at : at + size]))
        at += size
    return out


# ---- requests ------------------------------------------------------------------------------


def encode_blocks_hold(migration_id: str, request_id: str, hashes: Sequence[BlockHash]) -> bytes:
    hold = pb.BlocksHold(request_id=request_id, block_hashes=list(hashes))
    return wire.request(migration_id, blocks_hold=hold)


def encode_attention_run(
    migration_id: str, layer: int, queries: Sequence[AttentionQuery]
) -> Message:
    rows = []
    for query in queries:
        n = query.q.shape[0]
        first = int(query.positions[0]) if n else 0
        if n and not torch.equal(query.positions.cpu(), torch.arange(first, first + n)):
            raise InvalidRequestError(f"rows of {query.request_id} are not consecutive tokens")
        rows.append(
            pb.AttentionRows(
                request_id=query.request_id,
                num_rows=n,
                num_tokens=query.num_tokens,
                first_position=first,
            )
        )
    q = torch.cat([query.q for query in queries])
    run = pb.AttentionRun(layer=layer, seqs=rows, q=wire.tensor_spec(q))
    return wire.request(migration_id, attention_run=run), _join(q)


def decode_attention_run(run: pb.AttentionRun, payload: memoryview) -> list[AttentionQuery]:
    [q] = _split(payload, [run.q])
    if q.dim() != 3 or q.shape[0] != sum(r.num_rows for r in run.seqs):
        raise InvalidRequestError(f"queries {list(q.shape)} for {len(run.seqs)} sequences")
    queries, at = [], 0
    for rows in run.seqs:
        first, n = rows.first_position, rows.num_rows
        positions = torch.arange(first, first + n)
        queries.append(AttentionQuery(rows.request_id, q[at : at + n], positions, rows.num_tokens))
        at += n
    return queries


# ---- responses -----------------------------------------------------------------------------


def encode_attention_result(parts: Sequence[PartialAttention]) -> Message:
    out = torch.cat([p.out for p in parts])
    m = torch.cat([p.max for p in parts])
    denom = torch.cat([p.denom for p in parts])
    specs = pb.AttentionResult(
        out=wire.tensor_spec(out), max=wire.tensor_spec(m), denom=wire.tensor_spec(denom)
    )
    return wire.response(attention_result=specs), _join(out, m, denom)


def decode_attention_result(
    header: bytes, payload: memoryview, queries: Sequence[AttentionQuery]
) -> list[PartialAttention]:
    """One partial result per query (shapes checked), or the helper's ``PortError``."""
    msg = decode_request(pb.MigrationDataResponse, header)
    if msg.WhichOneof("kind") == "failed":
        raise PortError(list(msg.failed.request_ids), msg.failed.reason)
    specs = wire.parse_response(header, "attention_result").attention_result
    out, m, denom = _split(payload, [specs.out, specs.max, specs.denom])
    rows = sum(query.q.shape[0] for query in queries)
    heads = queries[0].q.shape[1] if queries else 0
    if out.shape[:2] != (rows, heads) or m.shape != (rows, heads) or denom.shape != m.shape:
        raise InvalidRequestError(
            f"helper answered {list(out.shape)}/{list(m.shape)} for {rows} rows of {heads} heads"
        )
    parts, at = [], 0
    for query in queries:
        n = query.q.shape[0]
        parts.append(PartialAttention(out[at : at + n], m[at : at + n], denom[at : at + n]))
        at += n
    return parts
