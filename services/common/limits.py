"""Bounds on every size a caller controls, in one place (docs/services.md, "Limits").

Each service checks what it is sent against these at its edge, before it does any work with
it, so an oversized or malformed field fails at once, with a message that says which field and
what the bound is:

- ids (request, reservation, worker ids): at most ``MAX_ID_BYTES`` of printable ASCII without
  spaces, everywhere, so an id fits any header, log line or Redis key it is copied into
  (INVALID_ARGUMENT);
- other names (model, fingerprint, "HOST:PORT" addresses): at most ``MAX_NAME_BYTES``; an
  address a service will connect to is also checked for its form (``check_address``), and so
  is the one a client tool or the client library is given (``check_target``: not empty);
- stop conditions: ``MAX_STOP_STRINGS`` strings of at most ``MAX_STOP_STRING_BYTES`` each,
  ``MAX_STOP_TOKEN_IDS`` token ids (INVALID_ARGUMENT);
- reasons (a migration's abort reason, a worker's): at most ``MAX_REASON_BYTES`` from a caller
  (INVALID_ARGUMENT); reasons made inside a service (an error's text) are cut there
  (``clip_reason``), so records listed together stay far below a message's 4 MiB;
- request ids a caller lists (an attention migration's): at most ``MAX_LISTED_REQUESTS``, each
  an id, none twice (INVALID_ARGUMENT);
- block hashes: exactly ``HASH_SIZE`` bytes each, at most ``MAX_BLOCK_HASHES`` per call
  (INVALID_ARGUMENT): ``check_block_hashes`` is the one check every kvstore and decode entry
  point uses;
- prompts (``PromptLimits``, configurable on the router): token count within the context, text
  within a byte budget derived from it (OUT_OF_RANGE). Counting needs no conversion of the
  prompt (``len`` of a repeated field is O(1)), so a prompt of any size costs nothing to refuse.

The fixed bounds are constants, not settings: every worker must accept whatever any router
accepted. Pure: no grpc, no tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import ConfigError, InvalidRequestError, OutOfRangeError
from services.common.hashing import HASH_SIZE

MAX_ID_BYTES = 128
MAX_NAME_BYTES = 256
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_BYTES = 256
MAX_STOP_TOKEN_IDS = 256
# 256 Ki blocks: a context of 256 Ki tokens even at block size 1 (4 Mi at the default 16).
MAX_BLOCK_HASHES = 1 << 18
# Torch (OpenMP) threads one process may ask for: more than any host this runs on has cores,
# far below the ~100,000 at which OpenMP's pool crashes the process (SIGSEGV, no message) as
# the first matmul creates it. Past the host's cores threads only contend for them.
MAX_THREADS = 1024
# The most micro-batches a layer migration's split step is cut into (Switch, the policy, the
# engine's StageLayout).
MAX_MICRO_BATCHES = 8
# A migration's reason: room for any error message this project writes (the longest, a
# worker's reason with a peer's gRPC details inside, are a few hundred bytes), while 4 MiB of
# ListMigrations holds thousands of records.
MAX_REASON_BYTES = 1024
# Request ids one attention migration names: more than any worker runs at once (its
# ``max_num_seqs``, 64 by default).
MAX_LISTED_REQUESTS = 1024
# The context assumed when nothing better is known (no model, no worker registered yet).
DEFAULT_CONTEXT = 1 << 20
# The text budget per token of context. English averages ~4 bytes a token; 32 leaves room for
# code, other scripts and long-token vocabularies, while keeping tokenization of the largest
# text accepted bounded (32 x the context).
TEXT_BYTES_PER_TOKEN = 32
# gRPC's own default receive limit; the router's client API never goes below it.
MIN_RECEIVE_BYTES = 4 << 20
# Per-item overhead of a protobuf field (tag + length) in the worst case, and of a varint.
_FIELD_OVERHEAD = 6
_VARINT_BYTES = 5

_PRINTABLE = re.compile(r"[!-~]*")  # printable ASCII, no space
# HOST:PORT with ASCII digits only (``str.isdigit`` also takes "²", which ``int`` refuses).
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
MAX_PORT = 65535


def check_id(value: str, field: str) -> None:
    """An id: empty (the caller decides what that means) or printable ASCII without spaces, at
    most ``MAX_ID_BYTES``."""
    if len(value) > MAX_ID_BYTES:
        raise InvalidRequestError(
            f"{field} is {len(value)} characters long; at most {MAX_ID_BYTES} are allowed"
        )
    if not _PRINTABLE.fullmatch(value):
        raise InvalidRequestError(
            f"{field} {value!r} must be printable ASCII without spaces or control characters"
        )


def required_id(value: str, field: str) -> str:
    """An id that must be given: ``check_id`` and not empty. Returns it."""
    check_id(value, field)
    if not value:
        raise InvalidRequestError(f"{field} is empty")
    return value


def check_reason(value: str, field: str = "reason") -> None:
    """A reason a caller gives: at most ``MAX_REASON_BYTES`` of UTF-8, one printable line (it is
    listed one migration a line, and printed to terminals: session 40's probe sent escape
    sequences that cleared the screen of whoever listed the migrations)."""
    if len(value) > MAX_REASON_BYTES or len(value.encode()) > MAX_REASON_BYTES:
        raise InvalidRequestError(f"{field} is longer than {MAX_REASON_BYTES} bytes")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise InvalidRequestError(
            f"{field} must be one line of printable text, got the character {bad!r}"
        )


def clip_reason(value: str) -> str:
    """A reason made inside a service (an error's text, which may span lines), as one
    printable line cut to at most ``MAX_REASON_BYTES`` of UTF-8."""
    if not value.isprintable():
        value = " ".join("".join(c if c.isprintable() else " " for c in value).split())
    data = value.encode()
    if len(data) <= MAX_REASON_BYTES:
        return value
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


def check_request_ids(ids: Sequence[str], field: str = "request_ids") -> None:
    """Request ids a caller names: at most ``MAX_LISTED_REQUESTS``, each a non-empty id, none
    twice."""
    if len(ids) > MAX_LISTED_REQUESTS:
        raise InvalidRequestError(f"{len(ids)} {field}; at most {MAX_LISTED_REQUESTS} are allowed")
    seen: set[str] = set()
    for i, value in enumerate(ids):
        if not value:
            raise InvalidRequestError(f"{field}[{i}] is empty")
        check_id(value, f"{field}[{i}]")
        if value in seen:
            raise InvalidRequestError(f"{field} names {value!r} twice")
        seen.add(value)


def check_name(value: str, field: str) -> None:
    """A model name, fingerprint or address: at most ``MAX_NAME_BYTES`` of UTF-8."""
    # len() counts characters, each at least one byte: the encode runs on short strings only.
    if len(value) > MAX_NAME_BYTES or len(value.encode()) > MAX_NAME_BYTES:
        raise InvalidRequestError(f"{field} is longer than {MAX_NAME_BYTES} bytes")


def check_address(value: str, field: str) -> None:
    """A "HOST:PORT" address: empty (the caller decides what that means) or a host name, an
    IPv4 address or a bracketed IPv6 one, and a port in 1..65535, at most ``MAX_NAME_BYTES``.
    Checked where a caller names an address a service will connect to, so a malformed one is
    refused at the edge instead of failing in whichever transport parses it first."""
    check_name(value, field)
    match = _ADDRESS.fullmatch(value)
    if value and (match is None or not 0 < int(match.group(2)) <= MAX_PORT):
        raise InvalidRequestError(f"{field} {value!r} is not HOST:PORT (a port in 1..{MAX_PORT})")


def check_target(value: str, field: str) -> str:
    """The "HOST:PORT" a client connects to: ``check_address``'s form, and not empty (gRPC
    would dial a port taken modulo 65536, or resolve "" to nothing). Returns it."""
    if not value:
        raise ConfigError(f"{field} is empty; expected HOST:PORT")
    try:
        check_address(value, field)
    except InvalidRequestError as exc:
        raise ConfigError(str(exc)) from None
    return value


def check_stop(stop: Sequence[str], stop_token_ids: Sequence[int]) -> None:
    """Sampling's stop strings and stop token ids, by count and size (not by value)."""
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS} are allowed"
        )
    for i, s in enumerate(stop):
        if len(s) > MAX_STOP_STRING_BYTES or len(s.encode()) > MAX_STOP_STRING_BYTES:
            raise InvalidRequestError(
                f"stop string {i} is longer than {MAX_STOP_STRING_BYTES} bytes"
            )
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(
            f"{len(stop_token_ids)} stop token ids; at most {MAX_STOP_TOKEN_IDS} are allowed"
        )


def check_block_hashes(hashes: Sequence[bytes], field: str = "block_hashes") -> None:
    """The one block-hash check (services/common/hashing.py makes them): every entry point that
    takes hashes from a caller (kvstore Lookup, Pin, Reserve, data-plane writes; a decode
    worker's KV layout) runs this, so no call accepts a hash another rejects."""
    if len(hashes) > MAX_BLOCK_HASHES:
        raise InvalidRequestError(
            f"{field} has {len(hashes)} hashes; at most {MAX_BLOCK_HASHES} are allowed"
        )
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes):
            raise InvalidRequestError(f"{field}[{i}] must be bytes, got {type(h).__name__}")
        if len(h) != HASH_SIZE:
            raise InvalidRequestError(
                f"{field}[{i}] must be a {HASH_SIZE}-byte block hash, got {len(h)} bytes"
            )


@dataclass(frozen=True)
class PromptLimits:
    """How large a prompt the router takes. ``for_context`` derives both bounds from a model's
    context length; the defaults serve a router that knows no model."""

    max_prompt_tokens: int = DEFAULT_CONTEXT - 1
    max_text_bytes: int = TEXT_BYTES_PER_TOKEN * DEFAULT_CONTEXT

    def __post_init__(self) -> None:
        if self.max_prompt_tokens <= 0:
            raise ConfigError(f"max_prompt_tokens must be positive, got {self.max_prompt_tokens}")
        if self.max_text_bytes <= 0:
            raise ConfigError(f"max_text_bytes must be positive, got {self.max_text_bytes}")

    @classmethod
    def for_context(cls, max_model_len: int, max_text_bytes: int | None = None) -> PromptLimits:
        """A model whose context holds ``max_model_len`` tokens takes prompts of at most
        ``max_model_len - 1`` (one slot for the first output token, as the engine requires)."""
        if max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {max_model_len}")
        text = TEXT_BYTES_PER_TOKEN * max_model_len if max_text_bytes is None else max_text_bytes
        return cls(max_model_len - 1, text)

    @property
    def max_request_bytes(self) -> int:
        """The encoded size of the largest request these limits (and the fixed ones) accept."""
        prompt = max(self.max_text_bytes, _VARINT_BYTES * self.max_prompt_tokens)
        stops = MAX_STOP_STRINGS * (MAX_STOP_STRING_BYTES + _FIELD_OVERHEAD)
        stop_ids = _VARINT_BYTES * MAX_STOP_TOKEN_IDS
        names = MAX_ID_BYTES + MAX_NAME_BYTES + 4 * _FIELD_OVERHEAD
        return prompt + stops + stop_ids + names + 1024  # + scalar sampling fields

    @property
    def receive_bytes(self) -> int:
        """The gRPC receive limit for the client API: twice the largest valid request (so one
        a little over a limit is read and answered OUT_OF_RANGE with the limit named), never
        below gRPC's default. Larger messages are refused by gRPC before they are read."""
        return max(MIN_RECEIVE_BYTES, 2 * self.max_request_bytes)

    def check_text(self, text: str) -> None:
        # Characters <= UTF-8 bytes: a text too long in characters is refused without encoding.
        if len(text) > self.max_text_bytes or len(text.encode()) > self.max_text_bytes:
            raise OutOfRangeError(
                f"prompt text is over {self.max_text_bytes} bytes, the most accepted "
                f"(for a context of {self.max_prompt_tokens + 1} tokens)"
            )

    def check_num_tokens(self, num_tokens: int, max_model_len: int | None = None) -> None:
        """``max_model_len``: the largest context of any worker now, when one is known."""
        limit = self.max_prompt_tokens
        if max_model_len:
            limit = min(limit, max_model_len - 1)
        if num_tokens > limit:
            raise OutOfRangeError(
                f"prompt has {num_tokens} tokens; at most {limit} are accepted "
                f"(a context of {limit + 1} tokens)"
            )
