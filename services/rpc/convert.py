"""Conversions between protobuf messages and domain types that every service shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration

from services.common.types import FinishReason, SamplingParams
from services.rpc.gen.banaserve.v1 import common_pb2, kvstore_pb2

if TYPE_CHECKING:  # the engine imports torch; this module must not
    from services.common.kv_layout import KVLayout

FINISH_TO_PROTO = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}
FINISH_FROM_PROTO = {v: k for k, v in FINISH_TO_PROTO.items()}
DTYPE_TO_PROTO = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float16": common_pb2.DTYPE_FLOAT16,
}
DTYPE_FROM_PROTO = {v: k for k, v in DTYPE_TO_PROTO.items()}
# A data plane's kind (services.rpc.dataplane.KINDS) <-> DataTransport. A worker without one
# ("") is UNSPECIFIED on the wire.
DATA_TRANSPORT_TO_PROTO = {
    "ucx": kvstore_pb2.DATA_TRANSPORT_UCX,
    "tcp": kvstore_pb2.DATA_TRANSPORT_TCP,
    "grpc": kvstore_pb2.DATA_TRANSPORT_GRPC,
}
DATA_TRANSPORT_FROM_PROTO = {v: k for k, v in DATA_TRANSPORT_TO_PROTO.items()}

# Proto3-optional fields of SamplingParams: absent means the domain default.
_OPTIONAL_SAMPLING = ("temperature", "top_p", "seed", "max_tokens", "detokenize")


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Absent optional fields take the dataclass defaults; the result is validated."""
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}
    return SamplingParams(
        top_k=msg.top_k,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        **kwargs,
    )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        max_tokens=params.max_tokens,
        stop_token_ids=params.stop_token_ids,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
        detokenize=params.detokenize,
    )


def finish_to_proto(reason: FinishReason | None) -> int:
    return common_pb2.FINISH_REASON_UNSPECIFIED if reason is None else FINISH_TO_PROTO[reason]


def layout_to_proto(layout: KVLayout, num_layers: int) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        fingerprint=layout.fingerprint,
        num_tokens=layout.num_tokens,
        block_hashes=list(layout.block_hashes),
        dtype=DTYPE_TO_PROTO[layout.dtype],
        block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        num_layers=num_layers,
        first_block=layout.first_block,
    )
