"""Sync and async clients of RouterService; see the package docstring for use.

A Generate stream is ``started``, ``delta``..., ``finished`` (router.proto); ``Accumulator``
folds the frames into deltas for the caller and one ``GenerationResult`` at the end, with TTFT
and tokens/s measured here, on the client's clock.

A stream broken because the router itself was lost (UNAVAILABLE without the router's own
marker, ``status.ROUTER_UNAVAILABLE``: a broken connection, a router that stopped) is resumed:
the client waits for the router to be back (``banaserve up`` restarts it on its port; at most
``reconnect_timeout_s`` and the deadline) and sends the request again with the tokens it has
(``GenerateRequest.resume_output_token_ids``), so the caller's iteration goes on with the
tokens and text the broken stream would have sent; at most ``max_resumes`` times a request (0:
fail as before). A resend that never reaches the router (the channel said ready for the
connection that has just died) goes again within the same wait, after a short pause, and is not
another resume. A request that cannot connect is sent again the same way once this client
has had an answer from the router (it is away, a restart or a cut link); a router never reached
(a wrong address, nothing listening) fails at once, as before.

A connection that dies without closing (a partition, a middlebox that dropped it, a host gone
without a reset) is found by keepalive pings while a call is open: one unanswered within
``min(keepalive_s, 5 s)`` of being sent, at most ``keepalive_s`` after the last, breaks the
call UNAVAILABLE, which is resumed as above on a new connection. The resend is marked
(``GenerateRequest.resume``), so a router that still streams the old call into the dead
connection ends that call and goes on with this one instead of refusing the id.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.client.resume import (
    MAX_RESUMES,
    RECONNECT_TIMEOUT_S,
    Reached,
    Resume,
    ready_after,
    resume_for,
)
from services.common.config import RpcConfig
from services.common.errors import ConfigError
from services.common.limits import check_target
from services.rpc import aio_calls, security
from services.rpc.channels import MIN_CLIENT_KEEPALIVE_S, client_library_options
from services.rpc.deadlines import bounded
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc

MAX_MESSAGE_BYTES = 256 << 20
# Pings while a call is open, as the services' servers do (10 s, an answer within 5 s), at most
# as often as the router's servers accept them (services/rpc/channels.py, MIN_CLIENT_KEEPALIVE_S).
KEEPALIVE_S = RpcConfig.keepalive_s


def _options(keepalive_s: float) -> list[tuple[str, int | str]]:
    timeout_s = min(keepalive_s, RpcConfig.keepalive_timeout_s)
    config = RpcConfig(
        max_message_bytes=MAX_MESSAGE_BYTES, keepalive_s=keepalive_s, keepalive_timeout_s=timeout_s
    )
    return client_library_options(config)


_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}
_ROLES = {
    common_pb2.WORKER_ROLE_PREFILL: "prefill",
    common_pb2.WORKER_ROLE_DECODE: "decode",
    common_pb2.WORKER_ROLE_MIXED: "mixed",
}


class BanaServeClientError(Exception):
    """A call failed: ``code`` is the gRPC status code, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def _error(exc: grpc.RpcError) -> BanaServeClientError:
    return BanaServeClientError(exc.code(), exc.details() or "")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Delta:
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop", "length" or "abort"
    num_prompt_tokens: int
    num_cached_tokens: int
    ttft_s: float  # call start to first token, on this client's clock
    total_s: float
    tokens_per_s: float  # output tokens after the first, per second after the first
    prefill_worker_id: str
    decode_worker_id: str
    server_timings: router_pb2.Timings


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    address: str
    role: str
    active: bool
    num_running_seqs: int
    num_kv_blocks_free: int
    num_kv_blocks_used: int
    num_queued_prefill_tokens: int = 0


def _cancelled() -> BanaServeClientError:
    return BanaServeClientError(grpc.StatusCode.CANCELLED, "cancelled by the caller")


def _invalid(message: str) -> BanaServeClientError:
    """A call refused here, before it is sent: the status the router gives the same mistake."""
    return BanaServeClientError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _timeout(timeout_s: float | None) -> float | None:
    """A request's ``timeout_s``, at most a day: grpc's client fails a longer one at once
    (services/rpc/deadlines.py)."""
    if timeout_s is not None and math.isnan(timeout_s):
        raise _invalid("timeout_s must be a number of seconds, got nan")
    return bounded(timeout_s)


def _target(target: str) -> str:
    try:
        return check_target(target, "target")
    except ConfigError as exc:
        raise _invalid(str(exc)) from None


def _check_resume_args(max_resumes: int, reconnect_timeout_s: float, keepalive_s: float) -> None:
    if not MIN_CLIENT_KEEPALIVE_S <= keepalive_s <= 3600:
        # Faster pings are more than the router accepts while its stream is quiet: it would
        # end the connection (too_many_pings) under a request waiting for its first token.
        raise _invalid(
            f"keepalive_s must be in [{MIN_CLIENT_KEEPALIVE_S:g}, 3600], got {keepalive_s}"
        )
    if not 0 <= max_resumes <= 1000:
        raise _invalid(f"max_resumes must be in 0..1000, got {max_resumes}")
    if not 0 < reconnect_timeout_s <= 3600:
        raise _invalid(f"reconnect_timeout_s must be in (0, 3600], got {reconnect_timeout_s}")


def _encoded(message_type: Any, what: str, **fields: Any) -> Any:
    """``message_type(**fields)``; a value protobuf cannot encode (a seed of -1, max_tokens past
    int32, text that is not UTF-8, a token id that is no uint32) refused as INVALID_ARGUMENT."""
    try:
        return message_type(**fields)
    except UnicodeEncodeError:
        raise _invalid(f"{what} is not valid UTF-8") from None
    except (ValueError, TypeError) as exc:
        raise _invalid(f"{what}: {exc}") from None


def _sampling(**params: Any) -> common_pb2.SamplingParams:
    message = common_pb2.SamplingParams()
    for name, value in params.items():
        if value is not None:  # one field at a time: the refusal names it
            message.MergeFrom(_encoded(common_pb2.SamplingParams, name, **{name: value}))
    return message


def _request(
    prompt: str | Sequence[int], request_id: str, chat: bool, **sampling: Any
) -> router_pb2.GenerateRequest:
    if isinstance(prompt, bytes | bytearray | memoryview):  # would pass as a list of ints
        raise _invalid(f"prompt must be text or token ids, got {type(prompt).__name__}")
    message = _encoded(router_pb2.GenerateRequest, "request_id", request_id=request_id, chat=chat)
    message.sampling.CopyFrom(_sampling(**sampling))
    if isinstance(prompt, str):
        message.text = _encoded(router_pb2.GenerateRequest, "prompt", text=prompt).text
    else:
        message.token_ids.ids.extend(_encoded(common_pb2.TokenIds, "prompt", ids=prompt).ids)
    return message


@dataclass
class Accumulator:
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    request_id: str = ""
    started: router_pb2.GenerateStarted | None = None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    result: GenerationResult | None = None

    def add(self, frame: router_pb2.GenerateResponse) -> Delta | None:
        kind = frame.WhichOneof("frame")
        if kind == "started":
            self.started = frame.started
            self.request_id = frame.started.request_id
        elif kind == "delta":
            self.first = self.first or time.perf_counter()
            self.token_ids.extend(frame.delta.token_ids)
            self.text.append(frame.delta.text)
            return Delta(tuple(frame.delta.token_ids), frame.delta.text)
        else:
            self.result = self._finish(frame.finished)
        return None

    def _finish(self, finished: router_pb2.GenerateFinished) -> GenerationResult:
        done = time.perf_counter()
        first = self.first or done
        num_after_first = max(0, len(self.token_ids) - 1)
        rate = num_after_first / (done - first) if num_after_first and done > first else 0.0
        started = self.started or router_pb2.GenerateStarted()
        return GenerationResult(
            request_id=self.request_id,
            text="".join(self.text),
            token_ids=tuple(self.token_ids),
            finish_reason=_FINISH.get(finished.finish_reason, "unspecified"),
            num_prompt_tokens=finished.usage.num_prompt_tokens,
            num_cached_tokens=finished.usage.num_cached_tokens,
            ttft_s=first - self.start,
            total_s=done - self.start,
            tokens_per_s=rate,
            prefill_worker_id=started.prefill_worker_id,
            # where it ended: another worker than the first after a resume
            decode_worker_id=finished.decode_worker_id or started.decode_worker_id,
            server_timings=finished.timings,
        )


class Generation:
    """Iterate for deltas; ``result`` is set once the stream has ended."""

    def __init__(
        self,
        call: Any,
        resume: Resume | None = None,
        reopen: Callable[[Resume, router_pb2.GenerateRequest], Any] | None = None,
        request_id: str = "",
    ) -> None:
        """``reopen(resume, message)``: the call of ``message`` once the router is back, or
        None if it is not within ``resume.wait_s()``. ``request_id``: the id the client named
        the request by, known before the router answers (``abort`` takes it while the request
        still waits for a worker)."""
        self._call = call
        self._acc = Accumulator(request_id=request_id)
        self._resume, self._reopen = resume, reopen
        self._cancelled = False  # (a resume waiting for the router then sends nothing)

    @property
    def request_id(self) -> str:
        return self._acc.request_id

    @property
    def result(self) -> GenerationResult:
        if self._acc.result is None:
            raise RuntimeError("the generation has not finished; iterate it to the end first")
        return self._acc.result

    def __iter__(self) -> Iterator[Delta]:
        while True:
            try:
                for frame in self._call:
                    delta = self._add(frame)
                    if delta is not None:
                        yield delta
                return
            except grpc.RpcError as exc:
                call = self._unless_cancelled(self._resumed(exc))
                if call is None:
                    raise self._failure(exc) from None
                self._call = call

    def _add(self, frame: router_pb2.GenerateResponse) -> Delta | None:
        if self._resume is not None:
            self._resume.reached.once = self._resume.answered = True
        return self._acc.add(frame)

    def _resumed(self, exc: grpc.RpcError) -> Any:
        resume = self._resume
        if resume is None or self._reopen is None or self._cancelled:
            return None
        if not resume.allows(exc, self._acc):
            return None
        return self._reopen(resume, resume.next_message(self._acc))

    def _unless_cancelled(self, call: Any) -> Any:
        """A call opened while ``cancel`` ran: cancelled too."""
        if call is not None and self._cancelled:
            call.cancel()
        return call

    def _failure(self, exc: grpc.RpcError) -> BanaServeClientError:
        if self._cancelled:  # (not the broken call's UNAVAILABLE it was resuming from)
            return _cancelled()
        resume = self._resume
        unavailable = exc.code() == grpc.StatusCode.UNAVAILABLE
        if resume is not None and resume.past_deadline() and unavailable:
            # Broken, and the router not back before the deadline: the deadline is why it ends.
            return BanaServeClientError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline passed before the router was back (the stream broke: "
                f"{exc.details()})",
            )
        return _error(exc)

    def cancel(self) -> None:
        """Ends the stream; a resume waiting for the router ends at once and sends nothing."""
        self._cancelled = True
        self._call.cancel()
        if self._resume is not None:
            self._resume.cancel()


class AsyncGeneration(Generation):
    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[Delta]:
        while True:
            try:
                async for frame in aio_calls.frames(self._call):
                    delta = self._add(frame)
                    if delta is not None:
                        yield delta
                return
            except grpc.RpcError as exc:
                call = self._resumed(exc)
                if call is not None:
                    call = self._unless_cancelled(await call)  # the async reopen's coroutine
                if call is None:
                    raise self._failure(exc) from None
                self._call = call
            except asyncio.CancelledError:
                # grpc.aio ends a call its caller cancelled so: CANCELLED, as the sync client
                # says, unless this task itself is being cancelled.
                task = asyncio.current_task()
                if not self._cancelled or (task is not None and task.cancelling()):
                    raise
                raise _cancelled() from None


def _workers(reply: router_pb2.ListWorkersResponse) -> list[WorkerStatus]:
    return [
        WorkerStatus(
            worker_id=w.info.worker_id,
            address=w.info.address,
            role=_ROLES.get(w.info.role, "unspecified"),
            active=w.state == router_pb2.WORKER_STATE_ACTIVE,
            num_running_seqs=w.last_load.num_running_seqs,
            num_kv_blocks_free=w.last_load.num_kv_blocks_free,
            num_kv_blocks_used=w.last_load.num_kv_blocks_used,
            num_queued_prefill_tokens=w.last_load.num_queued_prefill_tokens,
        )
        for w in reply.workers
    ]


def _tls(tls_dir: str) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """The ``client`` role certificate of ``banaserve certs DIR`` (docs/security.md)."""
    if not tls_dir:
        return None, []
    files = security.TlsFiles.in_dir(Path(tls_dir), security.Role.CLIENT)
    return security.channel_credentials(files), list(security.channel_options())


class BanaServeClient:
    """Blocking client. ``generate`` keyword arguments are SamplingParams fields (None: the
    server's default); ``timeout_s`` is the request's deadline. ``tls_dir``: mutual TLS with
    the client certificate there; ``token``: the bearer token the router's client API wants.
    A ``target`` that is not HOST:PORT (a port in 1..65535), or a request the wire cannot carry
    (a prompt of bytes, a seed of -1, a token id past uint32), raises BanaServeClientError
    with INVALID_ARGUMENT before anything is sent, as the router would answer.
    ``max_resumes``, ``reconnect_timeout_s`` and ``keepalive_s``: the module docstring."""

    _grpc: Any = grpc  # the module whose channels it opens

    def __init__(
        self,
        target: str,
        *,
        tls_dir: str = "",
        token: str = "",
        max_resumes: int = MAX_RESUMES,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        target = _target(target)
        _check_resume_args(max_resumes, reconnect_timeout_s, keepalive_s)
        credentials, tls_options = _tls(tls_dir)
        options = [*_options(keepalive_s), *tls_options]
        if credentials is None:
            self._channel = self._grpc.insecure_channel(target, options=options)
        else:
            self._channel = self._grpc.secure_channel(target, credentials, options=options)
        self._metadata = security.bearer_metadata(token)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._max_resumes, self._reconnect_timeout_s = max_resumes, reconnect_timeout_s
        self._reached = Reached()

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        timeout_s: float | None = None,
        request_id: str = "",
        chat: bool = False,
        **sampling: Any,
    ) -> Generation:
        # Named here, not by the router: a stream broken before its started frame is resent
        # under its id, and takes over the request the router may still run.
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        message = _request(prompt, request_id, chat, **sampling)
        timeout_s = _timeout(timeout_s)
        resume = resume_for(
            message, timeout_s, self._max_resumes, self._reconnect_timeout_s, self._reached
        )
        call = self._stub.Generate(message, timeout=timeout_s, metadata=self._metadata)
        return self._generation(call, resume, self._reopen, request_id)

    _generation: Callable[..., Generation] = Generation

    def _reopen(self, resume: Resume, message: router_pb2.GenerateRequest) -> Any:
        if not resume.paused():
            return None
        ready = grpc.channel_ready_future(self._channel)
        with resume.waiting_on(ready):
            try:
                ready.result(timeout=resume.wait_s())
            except (grpc.FutureTimeoutError, grpc.FutureCancelledError):
                return None
        return self._stub.Generate(message, timeout=resume.timeout_s(), metadata=self._metadata)

    def complete(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        generation = self.generate(prompt, **kwargs)
        for _ in generation:
            pass
        return generation.result

    def abort(self, request_id: str, timeout_s: float = 5.0) -> None:
        """Ends request ``request_id`` (its stream then ends with finish reason ``abort``).
        An id that is not running is ``RequestNotFoundError`` (NOT_FOUND): never sent, or
        finished already, which a caller still reading its stream's buffered tokens may not
        have seen yet."""
        try:
            self._stub.Abort(
                router_pb2.AbortRequest(request_id=request_id),
                timeout=_timeout(timeout_s),
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def list_workers(self, timeout_s: float = 5.0) -> list[WorkerStatus]:
        try:
            return _workers(
                self._stub.ListWorkers(
                    router_pb2.ListWorkersRequest(),
                    timeout=_timeout(timeout_s),
                    metadata=self._metadata,
                )
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BanaServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBanaServeClient:
    """The same over grpc.aio; create and use it inside one event loop."""

    _grpc = grpc.aio
    _generation = AsyncGeneration
    __init__ = BanaServeClient.__init__
    generate = BanaServeClient.generate  # type: ignore[assignment]  # an AsyncGeneration

    async def _reopen(self, resume: Resume, message: router_pb2.GenerateRequest) -> Any:
        ready = asyncio.ensure_future(ready_after(resume.pause_s(), self._channel))
        with resume.waiting_on(ready):
            await asyncio.wait({ready}, timeout=resume.wait_s())
        if ready.cancelled() or not ready.done() or ready.exception() is not None:
            return None
        return self._stub.Generate(message, timeout=resume.timeout_s(), metadata=self._metadata)

    async def complete(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        generation = self.generate(prompt, **kwargs)
        async for _ in generation:
            pass
        return generation.result

    async def abort(self, request_id: str, timeout_s: float = 5.0) -> None:
        """As ``BanaServeClient.abort`` (an id not running: ``RequestNotFoundError``)."""
        try:
            await aio_calls.unary(
                self._stub.Abort(
                    router_pb2.AbortRequest(request_id=request_id),
                    timeout=_timeout(timeout_s),
                    metadata=self._metadata,
                )
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def list_workers(self, timeout_s: float = 5.0) -> list[WorkerStatus]:
        try:
            reply = await aio_calls.unary(
                self._stub.ListWorkers(
                    router_pb2.ListWorkersRequest(),
                    timeout=_timeout(timeout_s),
                    metadata=self._metadata,
                )
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _workers(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncBanaServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
