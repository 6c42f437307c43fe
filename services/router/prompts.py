"""Client prompts to token ids: within limits, and off the router's event loop (no grpc).

Per request, for every front end of the router (gRPC ``Generate``, the OpenAI HTTP API):
  1. sizes are checked before any work (``services.common.limits.PromptLimits``): token ids by
     their count (``len`` of the proto's repeated field: O(1), nothing converted), text by its
     UTF-8 size; over a limit → ``OutOfRangeError`` at once;
  2. text is tokenized on a small thread pool, never on the event loop. The tokenizer releases
     the GIL while it encodes (services/engine/tokenizer.py), so the router's other calls, its
     workers' load reports and every token stream carry on meanwhile; at most ``num_threads``
     prompts are encoded at once, the rest wait their turn (a cancelled request leaves the
     queue without being encoded). After a long text the thread hands the memory the tokenizer
     freed back to the OS (``malloc_trim``): glibc keeps each thread's arena otherwise, and the
     router would stay ~100 MB larger after one 512 KiB prompt, for good;
  3. the token count is checked again, against the limits and the largest context of any
     worker registered now (``max_model_len``), so a prompt no worker could serve is
     OUT_OF_RANGE here rather than after routing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.common.errors import InvalidRequestError, ModelFormatError
from services.common.limits import DEFAULT_CONTEXT, PromptLimits
from services.common.model_files import (
    DEFAULT_MAX_POSITIONS,
    declared_sliding_window,
    read_json_object,
)
from services.common.types import SamplingParams

# text, chat → token ids (chat: apply the model's chat template to the text as one user turn).
Encoder = Callable[[str, bool], Sequence[int]]
# prompt, a resend's output tokens, its sampling, the context → None, or InvalidRequestError
# when a token before the last would have ended the request (services/engine/outputs.py).
ResumeCheck = Callable[[Sequence[int], Sequence[int], SamplingParams, int], None]

DEFAULT_NUM_THREADS = 2
# Texts from this size on are followed by a malloc_trim (a few ms; smaller ones leave little).
TRIM_AFTER_BYTES = 64 << 10


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (every arena), or None where there is none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


_TRIM = _malloc_trim()


def model_context(model_dir: Path) -> int:
    """The context length a model's config.json declares (as the engine reads it)."""
    config = read_json_object(model_dir / "config.json")
    try:
        limit = int(config.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS)
        window = declared_sliding_window(config)
        return min(limit, int(window)) if window else limit
    except (ValueError, TypeError) as exc:
        raise ModelFormatError(f"{model_dir}: config.json's context length: {exc}") from None


def model_vocab(model_dir: Path) -> int | None:
    """The vocabulary size a model's config.json declares (None: it declares none)."""
    try:
        return int(read_json_object(model_dir / "config.json")["vocab_size"])
    except (ModelFormatError, ValueError, KeyError, TypeError):
        return None


def prompt_limits(
    model_dir: Path | None = None,
    max_prompt_tokens: int | None = None,
    max_text_bytes: int | None = None,
) -> PromptLimits:
    """The router's limits: each as given, else derived from the context — the model's when the
    router has one, else ``max_prompt_tokens + 1``, else ``DEFAULT_CONTEXT``."""
    if max_prompt_tokens is not None:
        context = max_prompt_tokens + 1
    elif model_dir is not None:
        context = model_context(model_dir)
    else:
        context = DEFAULT_CONTEXT
    return PromptLimits.for_context(context, max_text_bytes)


class PromptEncoder:
    """Checks and encodes prompts (module docstring). ``encode`` None: token ids only."""

    def __init__(
        self,
        encode: Encoder | None = None,
        limits: PromptLimits | None = None,
        num_threads: int = DEFAULT_NUM_THREADS,
        vocab_size: int | None = None,
        resumable: ResumeCheck | None = None,
    ) -> None:
        """``vocab_size``: the served model's, to refuse token ids outside it here rather than
        at a worker (None: not known, the workers check); ``resumable``: its stop conditions
        for a resend's tokens, likewise (None: the workers check, after a take-over)."""
        self.limits = limits or PromptLimits()
        self.vocab_size = vocab_size
        self._encode = encode
        self._resumable = resumable
        self._pool = (
            ThreadPoolExecutor(num_threads, thread_name_prefix="tokenize") if encode else None
        )

    def check_num_tokens(self, num_tokens: int, max_model_len: int | None = None) -> None:
        if num_tokens == 0:
            raise InvalidRequestError("prompt is empty: it has no tokens")
        self.limits.check_num_tokens(num_tokens, max_model_len)

    def check_token_ids(self, token_ids: Sequence[int], max_model_len: int | None = None) -> None:
        """A prompt sent as token ids: its count, then each id within the model's vocabulary."""
        self.check_num_tokens(len(token_ids), max_model_len)
        if self.vocab_size is not None and max(token_ids) >= self.vocab_size:
            bad = next(t for t in token_ids if t >= self.vocab_size)
            raise InvalidRequestError(
                f"prompt: token id {bad} is outside the model's vocabulary [0, {self.vocab_size})"
            )

    def check_resume(
        self,
        prompt_len: int,
        token_ids: Sequence[int],
        max_tokens: int,
        max_model_len: int | None = None,
    ) -> None:
        """A request's output tokens its client already has (GenerateRequest
        .resume_output_token_ids): at most ``max_tokens``, each in the vocabulary, and the
        prompt with them within the context."""
        what = "resume_output_token_ids"
        if len(token_ids) > max_tokens:
            raise InvalidRequestError(
                f"{what}: {len(token_ids)} tokens, more than max_tokens ({max_tokens})"
            )
        if self.vocab_size is not None and token_ids and max(token_ids) >= self.vocab_size:
            bad = next(t for t in token_ids if t >= self.vocab_size)
            raise InvalidRequestError(
                f"{what}: token id {bad} is outside the model's vocabulary [0, {self.vocab_size})"
            )
        if max_model_len is not None and prompt_len + len(token_ids) > max_model_len:
            raise InvalidRequestError(
                f"{what}: the prompt ({prompt_len} tokens) and these {len(token_ids)} pass "
                f"the model's context of {max_model_len}"
            )

    async def check_resume_stops(
        self,
        prompt_token_ids: Sequence[int],
        token_ids: Sequence[int],
        params: SamplingParams,
        max_model_len: int | None,
    ) -> None:
        """A resend's tokens replayed against the request's stop conditions as the worker that
        resumes it would (stop and end-of-sequence ids, stop strings, the context), on the
        tokenizer's threads: a token before the last that would have ended the request is
        INVALID_ARGUMENT here, before the resend takes over the request still running under its
        id (else the take-over ended it and the worker then refused the resend)."""
        if self._resumable is None or self._pool is None or not token_ids:
            return
        context = max_model_len or self.limits.max_prompt_tokens + 1
        loop = asyncio.get_running_loop()
        check = self._resumable
        await loop.run_in_executor(self._pool, check, prompt_token_ids, token_ids, params, context)

    async def encode(
        self, text: str, chat: bool = False, max_model_len: int | None = None
    ) -> tuple[int, ...]:
        if self._encode is None or self._pool is None:
            raise InvalidRequestError(
                "this router has no tokenizer (started without --model); send token_ids"
            )
        self.limits.check_text(text)
        loop = asyncio.get_running_loop()
        token_ids = await loop.run_in_executor(
            self._pool, self._encode_and_trim, self._encode, text, chat
        )
        self.check_num_tokens(len(token_ids), max_model_len)
        return token_ids

    @staticmethod
    def _encode_and_trim(encode: Encoder, text: str, chat: bool) -> tuple[int, ...]:
        token_ids = tuple(encode(text, chat))
        if len(text) >= TRIM_AFTER_BYTES and _TRIM is not None:
            _TRIM()
        return token_ids

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
