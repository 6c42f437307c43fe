"""The KV layout's wire form: ``first_block`` round-trips, and a handoff that is not a whole
prompt is refused before any KV is taken."""

import pytest

from services.common.errors import InvalidRequestError
from services.common.kv_layout import KVLayout
from services.decode.servicer import header_from_proto
from services.rpc.convert import layout_to_proto
from services.rpc.gen.banaserve.v1 import decode_pb2


def _layout(first_block: int) -> KVLayout:
    return KVLayout(
        "fp", 0, 48, (b"\x01" * 16, b"\x02" * 16, b"\x03" * 16), "float32", 16, 2, 64, first_block
    )


def test_layout_carries_first_block():
    assert layout_to_proto(_layout(2), num_layers=4).first_block == 2
    assert layout_to_proto(_layout(0), num_layers=4).first_block == 0


def test_whole_prompt_header_is_accepted():
    msg = decode_pb2.KVTransferHeader(
        request_id="r1", reservation_id="res1", layout=layout_to_proto(_layout(0), 4)
    )
    header = header_from_proto(msg)
    assert (header.layout.first_block, header.num_layers, header.layout.num_tokens) == (0, 4, 48)


def test_handoff_of_a_delta_is_refused():
    msg = decode_pb2.KVTransferHeader(
        request_id="r1", reservation_id="res1", layout=layout_to_proto(_layout(1), 4)
    )
    with pytest.raises(InvalidRequestError, match="first_block 0"):
        header_from_proto(msg)
