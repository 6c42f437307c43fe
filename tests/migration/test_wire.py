"""Migration data-plane messages: exact round trips, and every malformed payload refused."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidRequestError
from services.engine.kv_cache import KVLayout
from services.engine.ports import PortError, StageSeq, StageWork
from services.migration import wire


def received(payload) -> memoryview:
    """What a data-plane receiver hands over: a writable view of a fresh buffer."""
    return memoryview(bytearray(memoryview(payload).cast("B")))


def work(dtype=torch.float32) -> StageWork:
    hidden = torch.arange(5 * 8, dtype=torch.float32).reshape(5, 8).to(dtype) / 7
    return StageWork(2, 4, hidden, (StageSeq("r1", 0, 3), StageSeq("r2", 17, 2)))


def layout(first_block: int = 1, dtype: str = "float32") -> KVLayout:
    return KVLayout("fp", 3, 40, (b"h" * 16,), dtype, 16, 2, 4, first_block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stage_work_round_trip_exact(dtype):
    sent = work(dtype)
    header, payload = wire.encode_stage_run("m-1", sent)
    msg = wire.parse_request(header)
    assert (msg.migration_id, msg.WhichOneof("kind")) == ("m-1", "stage_run")
    got = wire.decode_stage_run(msg.stage_run, received(payload))
    assert (got.start_layer, got.end_layer, got.seqs) == (2, 4, sent.seqs)
    assert got.hidden.dtype == dtype and torch.equal(got.hidden, sent.hidden)
    header, payload = wire.encode_stage_result(got.hidden * 2)
    result = wire.decode_stage_result(header, received(payload), sent)
    assert torch.equal(result, sent.hidden * 2)


def test_kv_round_trip_exact_with_delta_layout():
    lay = layout(first_block=1)
    data = torch.randn(lay.shape)
    header, payload = wire.encode_kv_import("m-1", "r1", data, lay)
    block = 16 * 2 * 4 * 4  # one block's K (or V) bytes: block-major, K then V (kv_wire.py)
    raw = bytes(memoryview(payload).cast("B"))
    assert raw[:block] == data[0, 0].numpy().tobytes()
    assert raw[block : 2 * block] == data[1, 0].numpy().tobytes()
    msg = wire.parse_request(header).kv_import
    with pytest.raises(InvalidRequestError, match="not 2 blocks"):
        wire.kv_from(msg.layout, msg.layer, memoryview(bytearray(raw[:-block])))
    got, got_layout = wire.kv_from(msg.layout, msg.layer, received(payload))
    assert (msg.request_id, got_layout) == ("r1", lay)
    assert torch.equal(got, data) and got.shape == (2, 2, 16, 2, 4)
    header, payload = wire.encode_kv_exported(data, lay)
    got, got_layout = wire.decode_kv_exported(header, received(payload), 3)
    assert got_layout == lay and torch.equal(got, data)


def test_kv_import_batch_round_trips_every_item_in_order():
    """A pause's deltas: many sequences' layers in one message, each exactly its blocks."""
    chunks = [
        ("r1", torch.randn(layout(1).shape), layout(1)),
        ("r2", torch.randn(layout(0).shape).to(torch.bfloat16), layout(0, "bfloat16")),
        ("r1", torch.randn(layout(2).shape), layout(2)),
    ]
    header, payload = wire.encode_kv_import_batch("m-1", chunks)
    msg = wire.parse_request(header)
    assert (msg.migration_id, msg.WhichOneof("kind")) == ("m-1", "kv_import_batch")
    got = wire.decode_kv_import_batch(msg.kv_import_batch, received(payload))
    assert [(r, lay) for r, _, lay in got] == [(r, lay) for r, _, lay in chunks]
    for (_, data, _), (_, sent, _) in zip(got, chunks, strict=True):
        assert data.dtype == sent.dtype and torch.equal(data, sent)
    whole = bytes(received(payload))
    for bad in (whole[:-4], whole + b"\0" * 4, b""):
        with pytest.raises(InvalidRequestError, match="bytes"):
            wire.decode_kv_import_batch(msg.kv_import_batch, memoryview(bytearray(bad)))
    with pytest.raises(InvalidRequestError, match="at least one"):
        wire.encode_kv_import_batch("m-1", [])
    with pytest.raises(InvalidRequestError, match="not its layout's"):
        wire.encode_kv_import_batch("m-1", [("r1", torch.zeros(2, 1, 16, 2, 4), layout(1))])


def test_kv_tokens_round_trip_exact_and_malformed_ones_are_refused():
    """A token delta: spans of several sequences (starting inside blocks), every moved layer."""
    spans = (StageSeq("r1", 37, 3), StageSeq("r2", 16, 1), StageSeq("r3", 0, 20))
    data = torch.randn(2, 2, 24, 2, 4)
    header, payload = wire.encode_kv_tokens("m-1", spans, range(5, 7), "fp", data)
    msg = wire.parse_request(header)
    assert (msg.migration_id, msg.WhichOneof("kind")) == ("m-1", "kv_tokens")
    got_spans, layers, fingerprint, got = wire.decode_kv_tokens(msg.kv_tokens, received(payload))
    assert (got_spans, layers, fingerprint) == (spans, range(5, 7), "fp")
    assert torch.equal(got, data)
    whole = bytes(received(payload))
    for bad in (whole[:-4], whole + b"\0" * 4, b""):
        with pytest.raises(InvalidRequestError, match="bytes"):
            wire.decode_kv_tokens(msg.kv_tokens, memoryview(bytearray(bad)))
    msg.kv_tokens.seqs[0].num_tokens = 4  # 25 tokens named, 24 sent
    with pytest.raises(InvalidRequestError, match=r"for \[layers, 2, tokens\] = \(2, 2, 25\)"):
        wire.decode_kv_tokens(msg.kv_tokens, received(payload))
    msg.kv_tokens.layers.end = 5
    with pytest.raises(InvalidRequestError, match="needs sequences and layers"):
        wire.decode_kv_tokens(msg.kv_tokens, received(payload))
    with pytest.raises(InvalidRequestError, match="is not 3 layers of spans"):
        wire.encode_kv_tokens("m-1", spans, range(5, 8), "fp", data)
    # the reverse: a revert asks for token ranges back and gets exactly those
    msg = wire.parse_request(wire.encode_kv_tokens_export("m-1", spans))
    assert wire.decode_kv_tokens_export(msg.kv_tokens_export) == spans
    header, payload = wire.encode_kv_tokens_reply(spans, range(5, 7), "fp", data)
    layers, fingerprint, got = wire.decode_kv_tokens_reply(header, received(payload), spans)
    assert (layers, fingerprint) == (range(5, 7), "fp") and torch.equal(got, data)
    with pytest.raises(InvalidRequestError, match="other token ranges"):
        wire.decode_kv_tokens_reply(header, received(payload), spans[::-1])
    with pytest.raises(InvalidRequestError, match="needs sequences"):
        wire.decode_kv_tokens_export(wire.pb.KVTokensExport())


def test_short_long_or_mistyped_payloads_are_refused():
    sent = work()
    header, payload = wire.encode_stage_run("m-1", sent)
    run = wire.parse_request(header).stage_run
    whole = bytes(received(payload))
    for bad in (whole[:-4], whole + b"\0" * 4, b""):
        with pytest.raises(InvalidRequestError, match="bytes"):
            wire.decode_stage_run(run, memoryview(bytearray(bad)))
    run.seqs[0].num_tokens = 4  # rows no longer match the hidden states
    with pytest.raises(InvalidRequestError, match="6 rows"):
        wire.decode_stage_run(run, received(payload))
    lay = layout()
    with pytest.raises(InvalidRequestError, match="not its layout"):
        wire.encode_kv_import("m-1", "r1", torch.zeros(2, 1, 16, 2, 4), lay)
    header, payload = wire.encode_stage_result(sent.hidden[:4])
    with pytest.raises(InvalidRequestError, match="for \\[5, 8\\]"):
        wire.decode_stage_result(header, received(payload), sent)


def test_helper_refusal_becomes_port_error_and_garbage_headers_are_refused():
    header = wire.encode_failed(("r2",), "holds 0 tokens of it, work starts at 17")
    with pytest.raises(PortError) as e:
        wire.decode_stage_result(header, memoryview(b""), work())
    assert (e.value.request_ids, e.value.reason) == (
        ("r2",),
        "holds 0 tokens of it, work starts at 17",
    )
    with pytest.raises(InvalidRequestError):
        wire.parse_request(b"\xff\xff\xff")
    with pytest.raises(InvalidRequestError, match="without a migration id"):
        wire.parse_request(wire.request("", release=wire.pb.SequencesRelease()))
    assert wire.decode_held_tokens(
        wire.response(held_tokens=wire.pb.HeldTokens(num_tokens=[3, 0])), ["a", "b"]
    ) == {"a": 3, "b": 0}
