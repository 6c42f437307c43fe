"""The OpenAI API's JSON shapes: requests parsed into the driver's types, results rendered back.

Requests (``/v1/completions``, ``/v1/chat/completions``) are pydantic models in strict mode
(``"5"`` is not an int): fields we honour are typed, unknown fields are ignored, and the common
fields we cannot honour (``n > 1``, logprobs, penalties, ...) are accepted only at their no-op
values and otherwise refused with 400, never silently ignored. Values are checked where the gRPC
path checks them (``SamplingParams``, the driver, the workers); here only what the proto types
would have refused on the wire (integer widths) and what OpenAI's shape adds.

Responses and stream chunks follow OpenAI's objects (``text_completion``, ``chat.completion``,
``chat.completion.chunk``); ``return_token_ids`` (a vLLM extension) adds the token ids.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from services.common.errors import InvalidRequestError, OutOfRangeError
from services.common.limits import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from services.common.types import FinishReason, SamplingParams
from services.router import driver as drv

UINT32 = 1 << 32
INT32 = 1 << 31
UINT64 = 1 << 64
# OpenAI's documented default for /v1/completions; chat defaults to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# A chat's messages, and its content parts in all: each renders to at least one token, so a
# conversation past these does not fit any context served here, and they bound what a parsed
# request costs the router's event loop afterwards (openai_parse.py).
MAX_CHAT_MESSAGES = 4096
MAX_CONTENT_PARTS = 4096


class InvalidFieldError(InvalidRequestError):
    """A request field is wrong; ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:  # pickled back from the parser process
        return type(self), (self.param, str(self))


class Kind(enum.Enum):
    COMPLETION = "text_completion"
    CHAT = "chat.completion"


def _null_is_false(value: Any) -> Any:
    return False if value is None else value


# A flag that defaults to false: JSON's null is the default, as for every other optional field
# (OpenAI types them "boolean or null").
Flag = Annotated[bool, BeforeValidator(_null_is_false)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: Flag = False


class _GenerateRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: Flag = False
    stream: Flag = False
    stream_options: StreamOptions | None = None
    return_token_ids: Flag = False
    user: str | None = None
    # Accepted only at these values (checked by ``check_supported``), any type.
    n: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    min_tokens: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    use_beam_search: Any = None
    include_stop_str_in_output: Any = None
    min_p: Any = None
    typical_p: Any = None
    length_penalty: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    skip_special_tokens: Any = None
    echo: Any = None
    best_of: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    structured_outputs: Any = None
    logits_processors: Any = None
    prompt_embeds: Any = None
    return_tokens_as_token_ids: Any = None
    add_special_tokens: Any = None
    reasoning_effort: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    # field -> the values that change nothing here, beside the shared ``_NO_OP_VALUES``
    no_op_values: ClassVar[dict[str, tuple[Any, ...]]] = {}


class CompletionRequest(_GenerateRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    suffix: Any = None

    no_op_values: ClassVar[dict[str, tuple[Any, ...]]] = {
        "suffix": (None, ""),
        "add_special_tokens": (None, True),  # a completion's prompt gets them (vLLM's default)
    }


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


# OpenAI's roles but ``tool`` and ``function``, which answer tool calls (none are accepted);
# ``developer`` is OpenAI's newer name for ``system`` and is rendered as one.


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    # An assistant turn's calls: refused unless empty (no tools are accepted; dropping them
    # would render another conversation than the client's).
    tool_calls: Any = None
    function_call: Any = None


class ChatRequest(_GenerateRequest):
    messages: list[ChatMessage] = Field(max_length=MAX_CHAT_MESSAGES)
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    documents: Any = None

    no_op_values: ClassVar[dict[str, tuple[Any, ...]]] = {
        # the model's own template, ending with the assistant's turn opened
        "add_generation_prompt": (None, True),
        "continue_final_message": (None, False),
        "chat_template": (None,),
        "chat_template_kwargs": (None, {}),
        "documents": (None, []),
        "add_special_tokens": (None, False),  # the template writes them (vLLM's default)
    }


# field -> the values that change nothing (anything else is refused); each request type adds
# its own (``no_op_values``).
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "min_tokens": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "use_beam_search": (None, False),
    "include_stop_str_in_output": (None, False),
    # vLLM's and OpenAI's other knobs that change what is generated (session 20's probe found
    # them accepted and ignored): refused unless they ask for what happens anyway.
    "min_p": (None, 0),
    "typical_p": (None, 1),
    "length_penalty": (None, 1),
    "tool_choice": (None, "none", "auto"),  # no tools are accepted: nothing to call
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "skip_special_tokens": (None, True),  # the detokenizer skips them
    # Session 40's probe found these accepted and ignored: vLLM's sampling and output
    # extensions, OpenAI's newer generation options.
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "structured_outputs": (None,),
    "logits_processors": (None, []),
    "prompt_embeds": (None,),
    "return_tokens_as_token_ids": (None, False),  # return_token_ids gives the ids
    "reasoning_effort": (None,),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}


def parse(cls: type[CompletionRequest] | type[ChatRequest], body: bytes) -> Any:
    """The request, or ``InvalidFieldError`` naming the first bad field."""
    try:
        request = cls.model_validate_json(body)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise InvalidFieldError(None, f"the body is not valid JSON: {error['msg']}") from None
        param = ".".join(str(p) for p in _field_path(error["loc"])) or None
        told = f"{param}: {error['msg']}" if param else f"the body: {error['msg']}"
        raise InvalidFieldError(param, told) from None
    check_supported(request)
    check_shape(request)
    return request


def check_shape(request: _GenerateRequest) -> None:
    """What OpenAI's shape allows but this API does not take, refused where the body is parsed
    (so a request too large in these counts never reaches the event loop, openai_parse.py)."""
    if isinstance(request.stop, list) and len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidFieldError(
            "stop", f"stop: {len(request.stop)} stop strings; at most {MAX_STOP_STRINGS}"
        )
    if request.stream_options is not None and not request.stream:
        raise InvalidFieldError("stream_options", "stream_options is only allowed with stream")
    if isinstance(request, CompletionRequest):
        p = request.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list) and len(p) != 1:
            raise InvalidFieldError("prompt", "one prompt per request (batches are not supported)")
    elif isinstance(request, ChatRequest):
        parts = sum(len(m.content) for m in request.messages if isinstance(m.content, list))
        if parts > MAX_CONTENT_PARTS:
            raise InvalidFieldError(
                "messages", f"messages: {parts} content parts in all; at most {MAX_CONTENT_PARTS}"
            )


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic's error location without the union member it tried last (``prompt.str``,
    ``stop.list[str]``: the field is ``prompt``, ``stop``)."""
    path = list(loc)
    while path and isinstance(path[-1], str) and not path[-1].isidentifier():
        path.pop()  # list[str], function-after[...]
    if len(path) > 1 and path[-1] in _TYPE_TAGS:
        path.pop()
    return tuple(path)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def check_supported(request: _GenerateRequest) -> None:
    for name, allowed in (_NO_OP_VALUES | request.no_op_values).items():
        value = getattr(request, name, None)
        if not any(_same(value, a) for a in allowed):
            raise InvalidFieldError(
                name, f"{name}={json.dumps(value)} is not supported (accepted: {_show(allowed)})"
            )


def _same(value: Any, allowed: Any) -> bool:
    """Equality that keeps JSON's types apart: ``0`` is not ``false``, ``1.0`` is ``1``."""
    if value is None or allowed is None:
        return value is allowed
    if isinstance(value, bool) != isinstance(allowed, bool):
        return False
    return bool(value == allowed)


def _show(values: tuple[Any, ...]) -> str:
    return " or ".join(json.dumps(v) for v in values)


def completion_prompt(request: CompletionRequest) -> str | tuple[int, ...]:
    """One prompt: text or token ids (a list holding one of either is unwrapped)."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one of them (``check_shape``)
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidFieldError("prompt", "prompt is empty")
        return prompt
    return token_ids("prompt", prompt)


def token_ids(param: str, ids: list[int]) -> tuple[int, ...]:
    if not ids:
        raise InvalidFieldError(param, f"{param} is empty")
    bad = next((t for t in ids if not 0 <= t < UINT32), None)
    if bad is not None:
        raise InvalidFieldError(param, f"{param}: token id {bad} is not in [0, 2^32)")
    return tuple(ids)


def chat_messages(request: ChatRequest) -> list[dict[str, str]]:
    """Messages as the chat template takes them; text parts joined by newlines (as vLLM)."""
    if not request.messages:
        raise InvalidFieldError("messages", "messages is empty")
    for i, m in enumerate(request.messages):
        for name in ("tool_calls", "function_call"):
            if getattr(m, name) not in (None, []):
                raise InvalidFieldError(
                    f"messages.{i}.{name}", f"messages.{i}.{name}: tool calls are not supported"
                )
        if m.content is None and m.role != "assistant":  # an assistant's may be absent
            raise InvalidFieldError(
                f"messages.{i}.content", f"messages.{i}.content is required for role {m.role!r}"
            )
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": _content(i, m.content)}
        for i, m in enumerate(request.messages)
    ]


def _content(index: int, content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for j, part in enumerate(content):
        where = f"messages.{index}.content.{j}"
        if part.type != "text":
            raise InvalidFieldError(
                where, f"{where}: only text parts are supported, got type {part.type!r}"
            )
        if part.text is None:
            raise InvalidFieldError(where, f"{where}: a text part needs its text")
    return "\n".join(part.text or "" for part in content)


def sampling_params(
    request: _GenerateRequest, num_prompt_tokens: int, context_len: int, kind: Kind
) -> SamplingParams:
    """``max_completion_tokens`` wins over ``max_tokens``; absent, a completion gets OpenAI's
    default and a chat the rest of the context (``context_len`` tokens in all)."""
    field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = request.max_tokens
    if max_tokens is None and kind is Kind.COMPLETION:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    elif max_tokens is None:
        max_tokens = context_len - num_prompt_tokens
        if max_tokens < 1:
            raise OutOfRangeError(
                f"the prompt has {num_prompt_tokens} tokens; the context holds {context_len}"
            )
    _within(field, max_tokens, INT32)
    if max_tokens > 0 and num_prompt_tokens + max_tokens > context_len:
        # As OpenAI and vLLM answer, rather than a completion cut short at the context's end.
        raise InvalidFieldError(
            field,
            f"the context holds {context_len} tokens; {num_prompt_tokens} in the prompt and "
            f"{field}={max_tokens} ask for {num_prompt_tokens + max_tokens}",
        )
    _within("top_k", request.top_k or 0, INT32)
    if request.seed is not None:
        _within("seed", request.seed, UINT64)
    # "" is one (empty) stop string, refused as [""] is; null is none
    stop = request.stop if isinstance(request.stop, list) else [request.stop]
    if request.stop is None:
        stop = []
    try:
        return SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_k=0 if request.top_k in (None, -1) else request.top_k,  # -1: no cut, as vLLM
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            max_tokens=max_tokens,
            stop_token_ids=token_ids("stop_token_ids", request.stop_token_ids)
            if request.stop_token_ids
            else (),
            stop=tuple(stop),
            ignore_eos=request.ignore_eos,
        )
    except InvalidRequestError as exc:
        # SamplingParams names the field first, in gRPC's words; the request's name for it
        # becomes OpenAI's ``param``.
        named = str(exc).split(" ", 1)[0]
        if named == "max_tokens" and field != named:  # the message names the request's field
            raise InvalidFieldError(field, field + str(exc)[len(named) :]) from None
        if named in type(request).model_fields and getattr(exc, "param", None) is None:
            exc.param = named  # type: ignore[attr-defined]
        raise


def _within(name: str, value: int, bound: int) -> None:
    if value >= bound:
        raise InvalidFieldError(name, f"{name} must be < {bound}, got {value}")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @classmethod
    def of(cls, finished: drv.Finished) -> Usage:
        return cls(
            finished.num_prompt_tokens, finished.num_completion_tokens, finished.num_cached_tokens
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class Rendering:
    """Renders one request's response or stream chunks; remembers whether a chunk went out."""

    kind: Kind
    request_id: str
    model: str
    created: int
    prompt_token_ids: tuple[int, ...]
    return_token_ids: bool = False
    include_usage: bool = False
    _sent_first: bool = False

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    def chunk(
        self, text: str, token_ids: tuple[int, ...], finish: FinishReason | None
    ) -> dict[str, Any]:
        """A stream chunk. The first one carries the role (chat) and prompt ids (if asked):
        no chunk without a token goes ahead of the first token."""
        first, self._sent_first = not self._sent_first, True
        if self.kind is Kind.CHAT:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if first or finish is None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": None if finish is None else finish.value}
        self._add_ids(choice, token_ids, first)
        chunk = self._head(self._chunk_object) | {"choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind is Kind.CHAT else Kind.COMPLETION.value

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._head(self._chunk_object) | {"choices": [], "usage": usage.to_json()}

    def response(
        self, text: str, token_ids: tuple[int, ...], finish: FinishReason, usage: Usage
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.kind is Kind.CHAT:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": finish.value}
        self._add_ids(choice, token_ids, first=True)
        return self._head(self.kind.value) | {"choices": [choice], "usage": usage.to_json()}

    def _add_ids(self, choice: dict[str, Any], token_ids: tuple[int, ...], first: bool) -> None:
        if not self.return_token_ids:
            return
        choice["token_ids"] = list(token_ids)
        if first:
            choice["prompt_token_ids"] = list(self.prompt_token_ids)


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(name: str, root: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "banaserve",
        "root": root,
        "parent": None,
        "max_model_len": max_model_len,
    }
