"""The attention-migration messages: exact round trips and refused payloads."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidRequestError
from services.engine.attention import PartialAttention
from services.engine.ports import AttentionQuery, PortError
from services.migration import attention_wire, wire


def queries(dtype: torch.dtype = torch.float32) -> list[AttentionQuery]:
    g = torch.Generator().manual_seed(3)
    return [
        AttentionQuery("r0", torch.randn(1, 4, 8, generator=g).to(dtype), torch.tensor([37]), 32),
        AttentionQuery("r1", torch.randn(3, 4, 8, generator=g).to(dtype), torch.arange(5, 8), 16),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_run_round_trips(dtype):
    sent = queries(dtype)
    header, payload = attention_wire.encode_attention_run("m-1", 7, sent)
    msg = wire.parse_request(header)
    assert (msg.migration_id, msg.WhichOneof("kind"), msg.attention_run.layer) == (
        "m-1",
        "attention_run",
        7,
    )
    got = attention_wire.decode_attention_run(msg.attention_run, memoryview(bytearray(payload)))
    assert [(q.request_id, q.num_tokens, q.positions.tolist()) for q in got] == [
        ("r0", 32, [37]),
        ("r1", 16, [5, 6, 7]),
    ]
    for a, b in zip(sent, got, strict=True):
        assert b.q.dtype == dtype and torch.equal(a.q, b.q)


def test_attention_result_round_trips():
    sent = queries()
    parts = [
        PartialAttention(torch.full((1, 4, 8), 1.5), torch.full((1, 4), -2.0), torch.ones(1, 4)),
        PartialAttention(torch.arange(96.0).view(3, 4, 8), torch.zeros(3, 4), torch.full((3, 4), 3.0)),
    ]  # fmt: skip
    header, payload = attention_wire.encode_attention_result(parts)
    got = attention_wire.decode_attention_result(header, memoryview(bytearray(payload)), sent)
    for a, b in zip(parts, got, strict=True):
        assert torch.equal(a.out, b.out) and torch.equal(a.max, b.max)
        assert torch.equal(a.denom, b.denom)


def test_a_failed_answer_is_the_helpers_port_error():
    header = wire.encode_failed(("r1",), "no blocks held for it")
    with pytest.raises(PortError) as e:
        attention_wire.decode_attention_result(header, memoryview(b""), queries())
    assert (e.value.request_ids, e.value.reason) == (("r1",), "no blocks held for it")


def test_short_long_and_mismatched_payloads_are_refused():
    header, payload = attention_wire.encode_attention_run("m-1", 0, queries())
    run = wire.parse_request(header).attention_run
    data = bytes(memoryview(payload).cast("B"))
    for bad in (data[:-4], data + b"\0\0\0\0"):
        with pytest.raises(InvalidRequestError, match="payload of"):
            attention_wire.decode_attention_run(run, memoryview(bytearray(bad)))
    parts = [PartialAttention(torch.zeros(2, 4, 8), torch.zeros(2, 4), torch.ones(2, 4))]
    h, p = attention_wire.encode_attention_result(parts)  # 2 rows for 4
    with pytest.raises(InvalidRequestError, match="for 4 rows"):
        attention_wire.decode_attention_result(h, memoryview(bytearray(p)), queries())


def test_rows_that_are_not_consecutive_tokens_are_refused():
    q = AttentionQuery("r0", torch.zeros(2, 4, 8), torch.tensor([3, 5]), 16)
    with pytest.raises(InvalidRequestError, match="consecutive"):
        attention_wire.encode_attention_run("m-1", 0, [q])


def test_blocks_hold_carries_the_hashes():
    msg = wire.parse_request(
        attention_wire.encode_blocks_hold("m-2", "r9", [b"\x01" * 16, b"\x02" * 16])
    )
    assert (msg.blocks_hold.request_id, list(msg.blocks_hold.block_hashes)) == (
        "r9",
        [b"\x01" * 16, b"\x02" * 16],
    )
