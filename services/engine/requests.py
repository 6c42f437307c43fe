"""The engine's requests: their state, their ids, and what a new one must satisfy.

A request is *active* from ``add_request`` (or ``finish_import``) until it finishes or is
aborted, and *importing* between ``begin_import`` and ``finish_import`` while its KV arrives.
The engine thread alone changes the table; other threads may read ``num_*`` counters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from services.common.errors import InvalidRequestError, OutOfRangeError, RequestNotFoundError
from services.common.types import SamplingParams
from services.engine.sequence import Sequence
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(eq=False)
class RequestState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]
    num_emitted_chars: int = 0

    @property
    def request_id(self) -> str:
        return self.seq.request_id


def stop_ids(params: SamplingParams, eos_token_ids: frozenset[int]) -> frozenset[int]:
    """The ids that end a request: its ``stop_token_ids``, and the model's end of sequence
    unless it ignores it."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)


class RequestTable:
    def __init__(
        self,
        tokenizer: Tokenizer,
        block_size: int,
        vocab_size: int,
        max_model_len: int,
        refusal: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.refusal = refusal  # non-empty: why this engine takes no request (prompt or import)
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.active: dict[str, RequestState] = {}
        self.importing: dict[str, RequestState] = {}
        self._arrivals = itertools.count()

    def next_arrival(self) -> int:
        return next(self._arrivals)

    def get(self, request_id: str) -> RequestState:
        request = self.active.get(request_id) or self.importing.get(request_id)
        if request is None:
            raise RequestNotFoundError(f"no request {request_id!r}")
        return request

    def seq(self, request_id: str) -> Sequence:
        return self.get(request_id).seq

    def new(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int],
        num_prompt_tokens: int | None = None,
    ) -> RequestState:
        if request_id in self.active or request_id in self.importing:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(
            request_id,
            token_ids,
            params,
            self.block_size,
            num_prompt_tokens=num_prompt_tokens or len(token_ids),
            arrival=self.next_arrival(),
        )
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        return RequestState(seq, detokenizer, stop_ids(params, eos_token_ids))

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        self.check_vocab(token_ids)
        if len(token_ids) >= self.max_model_len:
            raise OutOfRangeError(
                f"prompt has {len(token_ids)} tokens; this model serves at most "
                f"{self.max_model_len - 1} prompt tokens"
            )

    def check_vocab(self, token_ids: list[int]) -> None:
        """Every way in (a prompt, imported KV) passes here."""
        if self.refusal:
            raise InvalidRequestError(self.refusal)
        vocab = self.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} outside the vocabulary [0, {vocab})")
