"""The OpenAI-compatible HTTP API: a translation layer over the router's request driver.

Lifecycle of one ``POST /v1/completions`` or ``/v1/chat/completions``:
  1. PARSED    - the JSON body (at most ``max_body_bytes``, else 413) becomes a request
                 (``openai_schema``); a named model other than the served one is 404; the prompt
                 is checked and tokenized as gRPC ``Generate``'s is (``services/router/
                 prompts.py``: the same limits, off the event loop; a chat is the model's chat
                 template over its messages), stop conditions checked against the shared
                 limits, sampling validated into ``SamplingParams``: a ``drv.GenerateInput``;
  2. STARTED   - ``RequestDriver.generate``, the path gRPC ``Generate`` takes, with the
                 ``X-Request-Timeout`` header (seconds) as the deadline, or the driver's default.
                 A stream waits for its first event before answering 200, so a request that
                 fails before its first token (no worker, too large, deadline) gets its status;
  3. RELAYED   - each delta becomes an SSE event ``data: {json}\\n\\n``, then a chunk with the
                 finish reason, the usage chunk if ``stream_options.include_usage``, and
                 ``data: [DONE]\\n\\n``; without ``stream``, one JSON body at the end. An error
                 after the 200 goes out as one ``data: {"error": ...}`` event before [DONE];
  4. a client that disconnects at any step stops its request: the driver's event stream is
     closed, which cancels the request's work and waits for it to release every block it held
     on every worker, as for a cancelled gRPC call.

Each request is one span (kind SERVER, ``POST /v1/completions``), from its headers to its
response's last byte, under the caller's W3C ``traceparent``/``tracestate`` when it sends one;
the driver's worker calls are started with it current, so they are its children, as under gRPC
``Generate``'s span (one trace across router, prefill and decode). It carries
``http.response.status_code``; a 5xx, an error event after the 200 and a client that went away
(499, or a stream cut off) mark it ERROR.

Errors keep OpenAI's shape, with the status of ``openai_errors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.common.admission import AdmissionController, MethodClass, OverloadedError
from services.common.errors import InvalidRequestError, ModelNotFoundError
from services.common.limits import MIN_RECEIVE_BYTES, PromptLimits, check_name, check_stop
from services.router import driver as drv
from services.router import openai_schema as schema
from services.router.openai_errors import (
    BodyTimeoutError,
    BodyTooLargeError,
    UnsupportedMediaTypeError,
    error_json,
    error_response,
    http_client_identity,
    http_error,
    internal_error,
)
from services.router.openai_parse import BodyParser
from services.router.openai_schema import Kind, Rendering, Usage
from services.router.prompts import Encoder, PromptEncoder, model_context, model_vocab
from services.router.registry import WorkerRole, WorkerStatus
from services.rpc.deadlines import MAX_DEADLINE_S
from services.rpc.security import caller_of_token, token_from_header

T = TypeVar("T")
log = logging.getLogger(__name__)
TIMEOUT_HEADER = "x-request-timeout"
# The longest deadline the header may ask for: a day, far past any generation here; a larger
# one used to overflow the deadline's conversion (500) or the workers' (instant 504). The
# same bound as a gRPC caller's deadline (services/rpc/deadlines.py).
MAX_REQUEST_TIMEOUT_S = MAX_DEADLINE_S
# How long a request's body may take to arrive, before it holds any slot: a body of the
# largest size (``max_body_bytes``, 4 MiB) arrives in well under a second on any network this
# API serves; a client that opens a request and dribbles or withholds its body is cut off.
BODY_TIMEOUT_S = 30.0
DONE = "data: [DONE]\n\n"
# JSON spends more bytes than protobuf on a prompt: up to 11 per token id ("4294967295,"
# against a 5-byte varint), 6 per character escaped as \uXXXX.
JSON_BYTES_PER_PROTO_BYTE = 8


@dataclass(frozen=True)
class ServedModel:
    """What the API says about, and needs of, the model the router serves."""

    name: str  # the id clients send as ``model``
    root: str  # where it was loaded from
    context_len: int  # the model's own limit; a worker's KV pool may cap it further
    # (text, rendered chat) -> token ids: a rendered chat template is encoded without adding
    # special tokens (its text has them), as ``Tokenizer.encode_chat`` does.
    encode: Encoder
    render_chat: Callable[[list[dict[str, str]]], str]
    vocab_size: int | None = None  # token ids outside it are refused here (None: not known)


def load_served_model(name: str) -> ServedModel:
    """The prepared model ``name`` (or a model directory): its tokenizer and context length."""
    from services.engine.models.prepare import resolve_model
    from services.engine.tokenizer import Tokenizer

    path = resolve_model(name)
    tokenizer = Tokenizer(path)

    def encode(text: str, rendered_chat: bool) -> Sequence[int]:
        return tokenizer.encode(text, add_special_tokens=not rendered_chat)

    return ServedModel(name, str(path), model_context(path), encode, tokenizer.apply_chat_template,
                       model_vocab(path))  # fmt: skip


def max_body_bytes(limits: PromptLimits) -> int:
    """The largest body read: any request within ``limits`` fits, written as JSON."""
    return max(MIN_RECEIVE_BYTES, JSON_BYTES_PER_PROTO_BYTE * limits.max_request_bytes)


class ClientDisconnectedError(Exception):
    """The HTTP client went away before its response was complete."""


@dataclass(frozen=True)
class _Call:
    input: drv.GenerateInput
    timeout_s: float | None
    stream: bool
    rendering: Rendering


class OpenAIApi:
    """The Starlette app (``.app``) over one driver. Runs on the driver's event loop."""

    def __init__(
        self,
        driver: drv.RequestDriver,
        model: ServedModel,
        limits: PromptLimits | None = None,
        clock: Callable[[], float] = time.time,
        admission: AdmissionController | None = None,
        body_timeout_s: float = BODY_TIMEOUT_S,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """``admission``: the router's (its gRPC API's) controller, so both APIs share its
        limits; None: every request admitted. ``body_timeout_s``: how long a request's body
        may take to arrive. ``tracer``: the requests' spans (default: the process's global
        provider's, which ``setup_tracing`` sets; none set, nothing is recorded)."""
        self._tracer = tracer or trace.get_tracer(__name__)
        self._driver = driver
        self._admission = admission
        self._router = driver.router
        self._model = model
        self._prompts = PromptEncoder(model.encode, limits, vocab_size=model.vocab_size)
        self._parser = BodyParser()
        self.max_body_bytes = max_body_bytes(self._prompts.limits)
        self.body_timeout_s = body_timeout_s
        self._clock = clock
        self._created = int(clock())
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/ready", self.ready),
                Route("/v1/models", self.models),
                Route("/v1/models/{model:path}", self.model),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: http_error, Exception: internal_error},
        )
        # ``/v1/completions/`` is no route (404), not a redirect to a URL built from the
        # client's own Host header.
        self.app.router.redirect_slashes = False

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """200 once a prefill-capable and a decode-capable worker are registered (and not
        draining: stopping), else 503; 503 ``draining`` while the router itself stops."""
        roles = [
            w.role
            for w in self._router.workers()
            if w.status is WorkerStatus.HEALTHY and not w.draining
        ]
        counts = {role.value: roles.count(role) for role in WorkerRole}
        colocated = self._router.config.policy == "colocated"
        prefill = counts["mixed"] + (0 if colocated else counts["prefill"])
        decode = counts["mixed"] + (0 if colocated else counts["decode"])
        ready = prefill > 0 and decode > 0 and not self._driver.draining
        status = "draining" if self._driver.draining else "ready" if ready else "not_ready"
        return JSONResponse({"status": status, "workers": counts}, 200 if ready else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if not name:  # "/v1/models/": no route, as any other trailing slash
            raise HTTPException(404)
        if name != self._model.name:
            return error_response(self._unknown_model(name))
        return JSONResponse(self._card())

    def _card(self) -> dict[str, Any]:
        m = self._model
        return schema.model_card(m.name, m.root, self._created, self._context_limit())

    def _unknown_model(self, name: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"model {name!r} is not served; this router serves {self._model.name!r}"
        )

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, Kind.COMPLETION)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, Kind.CHAT)

    def close(self) -> None:
        self._prompts.close()
        self._parser.close()

    async def _generate(self, request: Request, kind: Kind) -> Response:
        """The request's span (module docstring) around ``_serve``: current while the request
        starts, ended with the response (a stream's: once its body is closed)."""
        span = self._tracer.start_span(
            f"{request.method} {request.url.path}",
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": request.url.path,
                "url.path": request.url.path,
                "url.scheme": request.url.scheme,
            },
        )
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                response = await self._serve(request, kind)
        except BaseException as exc:
            _span_failed(span, exc)
            span.end()
            raise
        if isinstance(response, SSEResponse):
            closed = response.on_close

            def on_close() -> None:
                try:
                    closed()
                finally:
                    _stream_closed(span)

            response.on_close = on_close
        else:
            _span_answered(span, response)
        return response

    async def _serve(self, request: Request, kind: Kind) -> Response:
        """The body is read first (at most ``max_body_bytes``, within ``body_timeout_s``: a
        client that sends it slowly or never holds no slot), then the request is admitted
        (``services/common/admission.py``: shed at once with 429 or 503 and a Retry-After);
        the slot is held until the response has been sent or cut off."""
        try:
            check_media_type(request.headers)
            body = await self._body(request)
        except ClientDisconnect:
            log.debug("a client went away before its request body was complete")
            return Response(status_code=499)
        except Exception as exc:
            return error_response(exc)
        if self._admission is None:
            return await self._generate_admitted(request, kind, body)
        try:
            ticket = await self._admission.admit(MethodClass.WORK, http_client_identity(request))
        except OverloadedError as exc:
            return error_response(exc)
        response: Response | None = None
        try:
            response = await self._generate_admitted(request, kind, body)
            return response
        finally:
            if isinstance(response, SSEResponse):
                response.on_close = ticket.release
            else:
                ticket.release()

    async def _generate_admitted(self, request: Request, kind: Kind, body: bytes) -> Response:
        try:
            call = await self._prepare(kind, body, request.headers)
        except Exception as exc:
            self._driver.refused(exc)  # counted as refused (RequestMetrics)
            return error_response(exc)
        trace.get_current_span().set_attribute("banaserve.request_id", call.input.request_id)
        events = self._driver.generate(call.input, call.timeout_s)
        if call.stream:
            return await self._stream(request, call, events)
        return await self._collect(request, call, events)

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than ``max_body_bytes`` and for at most
        ``body_timeout_s`` (``BodyTimeoutError``: 408)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = BodyTooLargeError(f"the request body is over {limit} bytes")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise too_large
        except TimeoutError:
            raise BodyTimeoutError(
                f"the request body did not arrive within {self.body_timeout_s:g} s "
                f"({len(body)} bytes came)"
            ) from None
        return bytes(body)

    async def _prepare(self, kind: Kind, body: bytes, headers: Mapping[str, str]) -> _Call:
        req = await self._parser.parse(kind, body)
        with naming("model"):
            check_name(req.model or "", "model")
        if req.model is not None and req.model != self._model.name:
            raise self._unknown_model(req.model)
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        with naming("stop"):  # their counts are the schema's; here the strings' sizes
            check_stop(stop, req.stop_token_ids or [])
        context = self._context_limit()
        with naming("messages" if kind is Kind.CHAT else "prompt"):
            tokens = await self._tokens(kind, req, context)
        sampling = schema.sampling_params(req, len(tokens), context, kind)
        request_id = f"{'chatcmpl' if kind is Kind.CHAT else 'cmpl'}-{uuid.uuid4().hex}"
        rendering = Rendering(
            kind,
            request_id,
            self._model.name,
            int(self._clock()),
            tokens,
            return_token_ids=req.return_token_ids,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )
        owner = caller_of_token(token_from_header(headers.get("authorization")))
        generate_input = drv.GenerateInput(request_id, tokens, sampling, owner)
        return _Call(generate_input, request_timeout(headers), req.stream, rendering)

    async def _tokens(self, kind: Kind, req: Any, context: int) -> tuple[int, ...]:
        if kind is Kind.CHAT:
            messages = schema.chat_messages(req)
            # Bounded before rendering, as the rendered text is before encoding.
            self._prompts.limits.check_text("".join(m["content"] for m in messages))
            text = self._model.render_chat(messages)
            return await self._prompts.encode(text, True, context)
        prompt = schema.completion_prompt(req)
        if isinstance(prompt, str):
            return await self._prompts.encode(prompt, False, context)
        self._prompts.check_token_ids(prompt, context)
        return prompt

    def _context_limit(self) -> int:
        """The largest context of a decode-capable worker now (what it declared, else its KV
        pool), within the model's; the model's while none is registered."""
        contexts = [
            w.capacity.max_model_len or w.capacity.num_kv_blocks * w.capacity.block_size
            for w in self._router.workers()
            if w.status is WorkerStatus.HEALTHY and w.role is not WorkerRole.PREFILL
        ]
        return min(self._model.context_len, max(contexts, default=self._model.context_len))

    async def _collect(self, request: Request, call: _Call, events: drv.EventStream) -> Response:
        async def run() -> dict[str, Any]:
            text: list[str] = []
            token_ids: list[int] = []
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, drv.Delta):
                        text.append(event.text)
                        token_ids.extend(event.token_ids)
                    elif isinstance(event, drv.Finished):
                        reason, usage = event.finish_reason, Usage.of(event)
                        return call.rendering.response("".join(text), (*token_ids,), reason, usage)
            raise RuntimeError(f"request {call.input.request_id!r} ended without finishing")

        try:
            body = await self._unless_disconnected(request, call, run())
        except ClientDisconnectedError:
            return Response(status_code=499)
        except Exception as exc:
            return error_response(exc)
        return JSONResponse(body)

    async def _stream(self, request: Request, call: _Call, events: drv.EventStream) -> Response:
        async def first() -> drv.Event:
            return await anext(events)

        try:
            event = await self._unless_disconnected(request, call, first())
        except Exception as exc:
            await events.aclose()
            if isinstance(exc, ClientDisconnectedError):
                return Response(status_code=499)
            return error_response(exc)
        span = trace.get_current_span()  # the request's (``_generate``)
        return SSEResponse(self._sse(call.rendering, event, events, span))

    async def _sse(
        self, rendering: Rendering, first: drv.Event, events: drv.EventStream, span: Span
    ) -> AsyncIterator[str]:
        async with contextlib.aclosing(events):
            try:
                for chunk in _chunks(rendering, first):
                    yield chunk
                async for event in events:
                    for chunk in _chunks(rendering, event):
                        yield chunk
            except Exception as exc:
                status, body = error_json(exc)
                _span_error(span, status, body)
                yield _sse(body)
        yield DONE
        _span_answered(span, None)  # sent to its end (a stream cut off: ``_stream_closed``)

    async def _unless_disconnected(
        self, request: Request, call: _Call, work: Coroutine[Any, Any, T]
    ) -> T:
        """``work``'s result, unless the client disconnects first: then the request is
        cancelled (its blocks released) and ClientDisconnectedError raised."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise ClientDisconnectedError(call.input.request_id)
        finally:
            watcher.cancel()
            if not task.done():
                # Closing the driver's event stream stops the request and waits for its
                # release; cancelling it through ``RequestDriver.cancel`` as well would cancel
                # that release midway.
                task.cancel()
                await asyncio.wait({task})


def _span_answered(span: Span, response: Response | None) -> None:
    """Ends the request's span with its response (None: a stream sent to its end, 200)."""
    status = 200 if response is None else response.status_code
    span.set_attribute("http.response.status_code", status)
    if response is not None and (status >= 500 or status == 499):
        try:
            body = json.loads(bytes(response.body))
        except (ValueError, TypeError):
            body = {}
        if status == 499:  # no body: the client went away
            body = {"error": {"message": "the client went away before its response"}}
        _span_error(span, status, body)
    span.end()


def _span_error(span: Span, status: int, body: dict[str, Any]) -> None:
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    span.set_attribute("error.type", str(error.get("code") or status))
    span.set_status(Status(StatusCode.ERROR, f"{status}: {error.get('message', '')}"))


def _span_failed(span: Span, exc: BaseException) -> None:
    """The request's handling raised (a cancellation: the server stopping)."""
    if isinstance(exc, Exception):
        span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _stream_closed(span: Span) -> None:
    """A stream's body was closed: its span ends, unless the stream ran to its end."""
    if not span.is_recording():  # ended (or never recorded)
        return
    span.set_attribute("http.response.status_code", 200)
    message = "the client went away before the stream ended"
    _span_error(span, 499, {"error": {"message": message, "code": "client_disconnected"}})
    span.end()


@contextlib.contextmanager
def naming(param: str) -> Iterator[None]:
    """A request error raised inside without a field named names ``param`` (OpenAI's
    ``error.param``): the shared checks (limits.py, prompts.py) speak gRPC's words."""
    try:
        yield
    except InvalidRequestError as exc:
        if getattr(exc, "param", None) is None:
            exc.param = param  # type: ignore[attr-defined]
        raise


def _chunks(rendering: Rendering, event: drv.Event) -> list[str]:
    if isinstance(event, drv.Delta):
        return [_sse(rendering.chunk(event.text, event.token_ids, None))]
    if isinstance(event, drv.Finished):
        chunks = [_sse(rendering.chunk("", (), event.finish_reason))]
        if rendering.include_usage:
            chunks.append(_sse(rendering.usage_chunk(Usage.of(event))))
        return chunks
    return []  # Started: nothing the client sees


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """An SSE response that closes its body however it ends (finished, failed, or cut off by a
    disconnect). Starlette may abandon the body generator suspended at a ``yield``, and a
    request must not wait for garbage collection to be stopped: closing the body closes the
    driver's event stream, which cancels the request's work once and waits for its release.
    (``RequestDriver.cancel`` is not called as well: a second cancellation would interrupt
    that release.)"""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self._content = content
        self.on_close: Callable[[], None] = lambda: None  # after the body is closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()  # type: ignore[attr-defined]
            finally:
                self.on_close()


def check_media_type(headers: Mapping[str, str]) -> None:
    """A body is JSON: declared so (``application/json`` or ``…+json``, any parameters) or not
    declared at all, and not compressed. Refusing other types keeps a web page from posting
    here through a visitor's browser without a CORS preflight (a form or a text/plain body),
    as FastAPI does since its advisory GHSA-8h2j-cgx8-6xv7."""
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"the body must be JSON (Content-Type: application/json), not {media!r}"
        )
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaTypeError(f"Content-Encoding {encoding!r} is not supported")


_SECONDS = re.compile(r"[ \t]*(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?[ \t]*")


def request_timeout(headers: Mapping[str, str]) -> float | None:
    value = headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    # A decimal number: ``float`` alone also takes "1_0", "inf" and "nan" (session 40's probe)
    seconds = float(value) if _SECONDS.fullmatch(value) else math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_REQUEST_TIMEOUT_S):
        raise schema.InvalidFieldError(
            None,
            f"the {TIMEOUT_HEADER} header must be a positive number of seconds up to "
            f"{MAX_REQUEST_TIMEOUT_S:g}, got {value!r}",
        )
    return seconds
