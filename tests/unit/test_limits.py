"""The shared bounds (services/common/limits.py) and the router's prompt encoder
(services/router/prompts.py): derived defaults, exact messages, and tokenization off the loop."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from services.common.errors import ConfigError, InvalidRequestError, OutOfRangeError
from services.common.limits import (
    DEFAULT_CONTEXT,
    MIN_RECEIVE_BYTES,
    PromptLimits,
    check_block_hashes,
    check_id,
    check_reason,
    check_request_ids,
    clip_reason,
    required_id,
)
from services.router.prompts import PromptEncoder, model_context, prompt_limits


def test_limits_derive_from_the_context():
    limits = PromptLimits.for_context(2048)
    assert (limits.max_prompt_tokens, limits.max_text_bytes) == (2047, 65536)
    assert limits.max_request_bytes == 65536 + 16 * 262 + 5 * 256 + 128 + 256 + 24 + 1024
    assert limits.receive_bytes == MIN_RECEIVE_BYTES  # twice the largest request is less
    big = PromptLimits.for_context(131072)  # a 128 Ki-token model: 4 MiB of text
    assert big.max_text_bytes == 4 << 20
    assert big.receive_bytes == 2 * big.max_request_bytes
    assert PromptLimits() == PromptLimits.for_context(DEFAULT_CONTEXT)
    with pytest.raises(ConfigError):
        PromptLimits.for_context(1)


def test_router_limits_come_from_flags_else_the_model_else_the_default(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert prompt_limits(tmp_path) == PromptLimits(4095, 131072)
    assert prompt_limits(tmp_path, max_prompt_tokens=99) == PromptLimits(99, 3200)
    assert prompt_limits(tmp_path, max_text_bytes=10) == PromptLimits(4095, 10)
    assert prompt_limits() == PromptLimits(DEFAULT_CONTEXT - 1, 32 * DEFAULT_CONTEXT)
    (tmp_path / "config.json").write_text(
        json.dumps({"max_position_embeddings": 4096, "sliding_window": 1024})
    )
    assert model_context(tmp_path) == 1024
    # As the engine reads it (ModelSpec): a window not in use is no limit (Qwen2's configs), and
    # no max_position_embeddings is Hugging Face's default (the router refused to start).
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"max_position_embeddings": 4096, "sliding_window": 1024, "use_sliding_window": False}
        )
    )
    assert model_context(tmp_path) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 4096}))
    assert model_context(tmp_path) == 2048


def test_text_is_measured_in_utf8_bytes_and_tokens_against_the_smaller_context():
    limits = PromptLimits.for_context(2048)
    limits.check_text("é" * 32768)  # 65536 bytes: at the limit
    with pytest.raises(OutOfRangeError) as info:
        limits.check_text("é" * 32769)  # fewer characters than the limit, more bytes
    assert str(info.value) == (
        "prompt text is over 65536 bytes, the most accepted (for a context of 2048 tokens)"
    )
    limits.check_num_tokens(2047)
    limits.check_num_tokens(99, max_model_len=100)
    with pytest.raises(OutOfRangeError) as info:
        limits.check_num_tokens(100, max_model_len=100)
    assert str(info.value) == (
        "prompt has 100 tokens; at most 99 are accepted (a context of 100 tokens)"
    )


@pytest.mark.parametrize("good", ["", "r1", "req-0123456789abcdef", "a" * 128, "~!#:/=+@"])
def test_ids_within_the_bound_pass(good):
    check_id(good, "request_id")


def test_hashes_are_checked_by_count_type_and_size():
    check_block_hashes([bytes(16)] * 3)
    for hashes, message in (
        ([bytes(16), b"abc"], "block_hashes[1] must be a 16-byte block hash, got 3 bytes"),
        ([bytes(17)], "block_hashes[0] must be a 16-byte block hash, got 17 bytes"),
        (["x" * 16], "block_hashes[0] must be bytes, got str"),
    ):
        with pytest.raises(InvalidRequestError) as info:
            check_block_hashes(hashes)
        assert str(info.value) == message


def test_text_is_encoded_on_a_thread_while_the_event_loop_runs():
    """The encoder blocks until the event loop sets an event: on the loop it would deadlock."""
    loop_ran = threading.Event()
    threads = []

    def encode(text: str, chat: bool) -> list[int]:
        threads.append(threading.get_ident())
        assert loop_ran.wait(5), "the event loop did not run while the text was encoded"
        return [ord(c) for c in text] + ([0] if chat else [])

    async def main():
        encoder = PromptEncoder(encode, PromptLimits.for_context(8))
        try:
            task = asyncio.create_task(encoder.encode("abc", chat=True))
            await asyncio.sleep(0)  # the task submits the work and waits
            loop_ran.set()
            assert await task == (97, 98, 99, 0)
            assert threads and threads[0] != threading.get_ident()
            with pytest.raises(OutOfRangeError):  # 8 tokens: over the 7 a context of 8 takes
                await encoder.encode("abcdefgh")
            with pytest.raises(OutOfRangeError):  # 257 bytes of 256: refused unencoded
                await encoder.encode("a" * 257)
            assert len(threads) == 2
        finally:
            encoder.close()

    asyncio.run(main())


def test_without_a_tokenizer_text_is_refused():
    async def main():
        with pytest.raises(InvalidRequestError, match="no tokenizer"):
            await PromptEncoder(None).encode("hi")

    asyncio.run(main())


def test_reasons_are_bounded_from_callers_and_cut_from_errors():
    check_reason("é" * 512)  # 1,024 bytes
    with pytest.raises(InvalidRequestError, match="reason is longer than 1024 bytes"):
        check_reason("é" * 513)
    assert clip_reason("short") == "short"
    cut = clip_reason("é" * 2000)  # never half a character
    assert len(cut.encode()) <= 1024 and cut.endswith("...") and "\ufffd" not in cut


@pytest.mark.parametrize("reason", ["op\x1b[2J\x1b[31mRED", "a\rb", "two\nlines", "tab\there"])
def test_a_reason_is_one_printable_line(reason):
    # Session 40's probe: escape sequences in an abort reason cleared the screen of whoever
    # listed the migrations, and a newline broke the one-line-a-migration listing.
    with pytest.raises(InvalidRequestError, match="reason must be one line of printable text"):
        check_reason(reason)
    check_reason("operator: node 3 drained — résumé ok")
    assert clip_reason("Traceback:\n  File x\n\tline 2\x1b") == "Traceback: File x line 2"


def test_listed_request_ids_are_ids_without_repeats_and_bounded():
    check_request_ids(["r-1", "r-2"])
    check_request_ids([])
    for ids, match in [
        (["r-1", ""], r"request_ids\[1\] is empty"),
        (["r 1"], "must be printable ASCII"),
        (["x" * 129], "129 characters long"),
        (["r-1", "r-2", "r-1"], "names 'r-1' twice"),
        ([f"r-{i}" for i in range(1025)], "1025 request_ids; at most 1024"),
    ]:
        with pytest.raises(InvalidRequestError, match=match):
            check_request_ids(ids)
    assert required_id("m-1", "migration_id") == "m-1"
    with pytest.raises(InvalidRequestError, match="migration_id is empty"):
        required_id("", "migration_id")
