"""The protos mirror the domain types they carry; these keep them in step."""

from __future__ import annotations

import dataclasses

from services.common.kv_layout import KVLayout
from services.common.kv_wire import DTYPE_NAMES
from services.common.types import FinishReason, SamplingParams
from services.rpc.gen.banaserve.v1 import common_pb2, decode_pb2, prefill_pb2, router_pb2


def field_names(message) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


def test_sampling_params_mirror_the_dataclass():
    assert field_names(common_pb2.SamplingParams) == {
        f.name for f in dataclasses.fields(SamplingParams)
    }


def test_sampling_fields_with_nonzero_defaults_have_presence():
    defaults = SamplingParams()
    fields = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    for f in dataclasses.fields(SamplingParams):
        default = getattr(defaults, f.name)
        if default not in (0, False, (), None) or f.name == "seed":
            assert fields[f.name].has_presence, f.name


def test_kv_layout_mirrors_the_engine_with_layer_moved_to_the_chunk():
    engine = {f.name for f in dataclasses.fields(KVLayout)}
    assert field_names(common_pb2.KVLayout) == engine - {"layer"} | {"num_layers"}
    assert "layer" in field_names(common_pb2.KVLayerChunk)


def test_enums_mirror_the_domain():
    finish = {v.name for v in common_pb2.FinishReason.DESCRIPTOR.values}
    assert finish == {"FINISH_REASON_UNSPECIFIED"} | {
        f"FINISH_REASON_{r.name}" for r in FinishReason
    }
    dtypes = {v.name for v in common_pb2.Dtype.DESCRIPTOR.values}
    assert dtypes == {"DTYPE_UNSPECIFIED"} | {f"DTYPE_{n.upper()}" for n in DTYPE_NAMES.values()}


def test_every_enum_starts_unspecified():
    for module in (common_pb2, router_pb2, prefill_pb2, decode_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name
