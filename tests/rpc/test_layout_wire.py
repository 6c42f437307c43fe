"""The KV layout's wire form: ``first_block`` round-trips (a handoff to a decode worker that
holds the prompt's first blocks starts after them), and one past the layout's own tokens is
refused before any KV is taken."""

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


def test_handoff_from_a_later_block_keeps_it():
    msg = decode_pb2.KVTransferHeader(
        request_id="r1", reservation_id="res1", layout=layout_to_proto(_layout(2), 4)
    )
    header = header_from_proto(msg)
    assert (header.layout.first_block, header.layout.num_blocks) == (2, 1)


@pytest.mark.parametrize("first_block", [3, 4, 1000])
def test_handoff_starting_past_its_tokens_is_refused(first_block):
    msg = decode_pb2.KVTransferHeader(
        request_id="r1", reservation_id="res1", layout=layout_to_proto(_layout(first_block), 4)
    )
    with pytest.raises(InvalidRequestError, match=f"starts at block {first_block}, past its 48"):
        header_from_proto(msg)
