"""What a request emits per token: the token, the text it adds, and whether it finished.

Text is detokenized incrementally. While a request has stop strings, the tail that could be the
start of one is held back; when one appears the text ends right before it. Finish reasons:
a stop token (EOS unless ``ignore_eos``) or stop string -> STOP; ``max_tokens`` or the context
limit -> LENGTH.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.errors import InvalidRequestError
from services.common.types import FinishReason, RequestOutput, SamplingParams
from services.engine.requests import RequestState, stop_ids
from services.engine.sequence import Sequence as EngineSequence
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0


def append_token(request: RequestState, token: int, max_model_len: int) -> RequestOutput:
    """Add ``token`` to the request; the output says if it finished (the caller frees it)."""
    seq = request.seq
    seq.token_ids.append(token)
    if seq.params.detokenize:
        request.detokenizer.add([token])
    reason = finish_reason(request, token, max_model_len)
    text = request.detokenizer.text
    if reason is None:
        hold = max((len(s) - 1 for s in seq.params.stop), default=0)
        end = max(request.num_emitted_chars, len(text) - hold)
    else:
        end = _stop_string_end(request, text) if seq.params.stop else len(text)
    delta = text[request.num_emitted_chars : end]
    request.num_emitted_chars = end
    return RequestOutput(
        seq.request_id,
        [token],
        delta,
        reason is not None,
        reason,
        seq.num_prompt_tokens,
        seq.num_cached_tokens,
    )


class ResumeComplete(Exception):  # noqa: N818 (an outcome, not an error)
    """The resumed tokens end the request (their last was its stop token, completed its stop
    string, or reached ``max_tokens`` or the context): its worker was lost after sending them
    all but before saying it had finished. Nothing is left to compute; ``reason`` is how it
    ended there."""

    def __init__(self, reason: FinishReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def resume(request: RequestState, outputs: list[int], max_model_len: int) -> None:
    """Replay ``outputs``, tokens this request generated on a worker since lost, into a new
    request as ``append_token`` added them there: one at a time, so its text, the part of it
    already emitted and the part held back for stop strings are what they were. Their last
    ending the request is ``ResumeComplete``; an earlier one, ``InvalidRequestError`` (the
    request would have ended there: no tokens came after it)."""
    for index, token in enumerate(outputs):
        out = append_token(request, token, max_model_len)
        if out.finished and index == len(outputs) - 1:
            raise ResumeComplete(out.finish_reason or FinishReason.STOP)
        if out.finished:
            raise InvalidRequestError(
                f"resumed output token {index} ({token}) would have finished the request "
                f"({out.finish_reason.value if out.finish_reason else 'done'}), "
                f"{len(outputs) - index - 1} tokens before the last"
            )


def check_resumable(
    tokenizer: Tokenizer,
    eos_token_ids: frozenset[int],
    prompt_token_ids: Sequence[int],
    outputs: Sequence[int],
    params: SamplingParams,
    max_model_len: int,
) -> None:
    """What ``resume`` would refuse, without an engine: ``InvalidRequestError`` when a token
    before the last of ``outputs`` would have finished the request (a stop token, the model's
    end of sequence, a completed stop string, the context). The router checks a client's resend
    with it before it ends the request still running under that id (take-over)."""
    seq = EngineSequence("resume-check", list(prompt_token_ids), params, block_size=1)
    request = RequestState(seq, IncrementalDetokenizer(tokenizer), stop_ids(params, eos_token_ids))
    with contextlib.suppress(ResumeComplete):  # the last one may end it: nothing left to do
        resume(request, list(outputs), max_model_len)


def finish_reason(request: RequestState, token: int, max_model_len: int) -> FinishReason | None:
    seq = request.seq
    if token in request.stop_ids:
        return FinishReason.STOP
    if seq.params.stop and any(s in request.detokenizer.text for s in seq.params.stop):
        return FinishReason.STOP
    if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


def _stop_string_end(request: RequestState, text: str) -> int:
    found = [text.find(s) for s in request.seq.params.stop if s in text]
    return min(found, default=len(text))


def aborted(request: RequestState) -> RequestOutput:
    seq = request.seq
    return RequestOutput(
        seq.request_id,
        [],
        "",
        True,
        FinishReason.ABORT,
        seq.num_prompt_tokens,
        seq.num_cached_tokens,
    )
