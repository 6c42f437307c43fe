"""Conversions between protobuf messages and domain types that every service shares."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from services.common.types import SamplingParams
from services.rpc.gen.banaserve.v1 import common_pb2

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
