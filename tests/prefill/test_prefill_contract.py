"""PrefillService status codes and cleanup: bad input, unreachable or rejecting targets,
deadlines and cancellation. Every test ends with the prefill worker holding no block."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.common.types import SamplingParams
from tests.engine.helpers import make_engine
from tests.prefill.helpers import (
    ImportingDecode,
    cluster,
    prefill_request,
    prompt_ids,
    run_prefill,
    status_of,
)

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
INVALID, OUT_OF_RANGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE


def small_engine(tiny_llama):
    return make_engine(tiny_llama, num_kv_blocks=8)  # 128 KV slots: max_model_len 128


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (dict(prompt=[]), INVALID, "prompt is empty"),
        (dict(prompt=[5, 4096]), INVALID, "token id 4096 outside the vocabulary [0, 4096)"),
        (
            dict(prompt=[5] * 128),
            OUT_OF_RANGE,
            "prompt has 128 tokens; this model serves at most 127",
        ),
        (dict(max_tokens=0), INVALID, "max_tokens must be > 0, got 0"),
        (dict(top_p=1.5), INVALID, "top_p must be in (0, 1], got 1.5"),
        (dict(request_id=""), INVALID, "request_id is empty"),
        (dict(address=""), INVALID, "target.address is empty"),
        (dict(reservation=""), INVALID, "target.reservation_id is empty"),
    ],
    ids=[
        "empty",
        "vocab",
        "too-long",
        "max-tokens",
        "top-p",
        "no-id",
        "no-address",
        "no-reservation",
    ],
)
def test_bad_requests_are_rejected_with_a_clear_message(tiny_llama, change, code, message):
    async def main():
        async with cluster(small_engine(tiny_llama), None) as c:
            args = dict(
                request_id="r1", prompt=[5, 6, 7], address=c.decode_address, reservation="res-1"
            )
            sampling = {k: change.pop(k) for k in ("max_tokens", "top_p") if k in change}
            args.update(change)
            request = prefill_request(
                args["request_id"], args["prompt"], args["address"], args["reservation"], **sampling
            )
            got = await status_of(run_prefill(c.prefill, request))
            await c.assert_idle()
            return got

    got_code, details = asyncio.run(main())
    assert got_code == code
    assert message in details


def test_unreachable_target_is_unavailable_within_the_deadline(tiny_llama):
    async def main():
        async with cluster(small_engine(tiny_llama), None) as c:
            request = prefill_request("r1", prompt_ids(40, 1), c.decode_address, max_tokens=4)
            start = time.monotonic()
            got = await status_of(run_prefill(c.prefill, request, timeout=3))
            elapsed = time.monotonic() - start
            await c.assert_idle()
            return got, elapsed

    (code, details), elapsed = asyncio.run(main())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "KV transfer to decode-0" in details
    assert elapsed < 3


def test_a_rejected_transfer_carries_the_receivers_status(tiny_llama):
    decode = ImportingDecode(make_engine(tiny_llama))  # no reservation registered

    async def main():
        async with cluster(small_engine(tiny_llama), decode) as c:
            request = prefill_request("r1", prompt_ids(40, 2), c.decode_address, "res-x")
            got = await status_of(run_prefill(c.prefill, request))
            await c.assert_idle()
            return got

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.NOT_FOUND
    assert "no reservation 'res-x'" in details


def test_deadline_during_the_transfer_frees_everything(tiny_llama):
    prompt = prompt_ids(40, 3)
    decode = ImportingDecode(make_engine(tiny_llama), hold_s=30)  # never acknowledges in time
    decode.reservations["res-1"] = (prompt, GREEDY)

    async def main():
        async with cluster(small_engine(tiny_llama), decode) as c:
            request = prefill_request("r1", prompt, c.decode_address, max_tokens=4)
            start = time.monotonic()
            got = await status_of(run_prefill(c.prefill, request, timeout=0.8))
            elapsed = time.monotonic() - start
            await c.assert_idle()
            return got, elapsed

    (code, _), elapsed = asyncio.run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2


def test_cancel_after_the_first_token_frees_everything(tiny_llama):
    prompt = prompt_ids(40, 4)
    decode = ImportingDecode(make_engine(tiny_llama), hold_s=30)
    decode.reservations["res-1"] = (prompt, GREEDY)

    async def main():
        async with cluster(small_engine(tiny_llama), decode) as c:
            call = c.prefill.Prefill(prefill_request("r1", prompt, c.decode_address), timeout=4)
            first = await call.read()
            assert first.WhichOneof("frame") == "first_token"
            call.cancel()
            await c.assert_idle()
            # The worker still serves: a second request gets its first token.
            again = c.prefill.Prefill(prefill_request("r2", prompt, c.decode_address), timeout=4)
            assert (await again.read()).WhichOneof("frame") == "first_token"
            again.cancel()
            await c.assert_idle()
            return (await c.stats()).kv

    kv = asyncio.run(main())
    assert kv.num_blocks_used == 0 and kv.num_blocks_cached == 2  # the prompt's full blocks


def test_duplicate_request_id_in_flight_is_rejected(tiny_llama):
    prompt = prompt_ids(40, 5)
    decode = ImportingDecode(make_engine(tiny_llama), hold_s=30)
    decode.reservations["res-1"] = (prompt, GREEDY)

    async def main():
        async with cluster(small_engine(tiny_llama), decode) as c:
            call = c.prefill.Prefill(prefill_request("r1", prompt, c.decode_address), timeout=4)
            await call.read()
            got = await status_of(
                run_prefill(c.prefill, prefill_request("r1", prompt, c.decode_address))
            )
            call.cancel()
            await c.assert_idle()
            return got

    code, details = asyncio.run(main())
    assert code == grpc.StatusCode.ALREADY_EXISTS and "request id 'r1' is already in use" in details
