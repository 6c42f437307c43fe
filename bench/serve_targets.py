"""Where the serving benchmark sends requests: a BanaServe router or an OpenAI-compatible server.

A target's ``stream(request, timeout_s)`` is an async generator yielding, for each streamed
delta, how many output tokens it carried; it returns when the server ends the stream and raises
``TargetError(status, message)`` otherwise. The caller stamps the times.

- ``grpc://HOST:PORT``: ``RouterService.Generate`` through ``services.client``, with the
  timeout as the gRPC deadline. A finish reason of ``abort`` is a failure (``ABORTED``).
- ``openai://HOST:PORT``: ``POST /v1/completions`` with ``stream: true``, the token ids as the
  ``prompt`` array, ``ignore_eos`` and ``return_token_ids`` (vLLM extensions; a server that
  lacks them ignores them). A chunk counts ``len(token_ids)`` tokens when the server sends
  them, else one per chunk with text. If the closing ``usage`` reports more completion tokens
  than were counted, the remainder is counted as one final chunk at the end of the stream. One
  HTTP/1.1 connection per request (``Connection: close``), so connection setup is part of TTFT,
  as it is for a client without a pool; on 127.0.0.1 that is well under a millisecond.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from bench.serve_workload import Request
from services.common.errors import ConfigError
from services.common.limits import check_target

SCHEMES = ("grpc", "openai")
MAX_ERROR_BODY = 4096


class TargetError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    ignore_eos: bool = True


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_target(url: str) -> Endpoint:
    """``grpc://HOST:PORT`` or ``openai://HOST:PORT``; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"target must start with grpc:// or openai://, got {url!r}")
    try:  # the one HOST:PORT rule of every client tool (a port in 1..65535)
        check_target(parts.netloc, "target")
    except ConfigError:
        raise ValueError(
            f"target must be {parts.scheme}://HOST:PORT, a port in 1..65535, got {url!r}"
        ) from None
    if not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise ValueError(
            f"target must be {parts.scheme}://HOST:PORT, a port in 1..65535, got {url!r}"
        )
    return Endpoint(parts.scheme, parts.hostname, parts.port)


class Target(Protocol):
    def stream(self, request: Request, timeout_s: float) -> AsyncIterator[int]: ...

    def server_side(self, request: Request) -> dict[str, float]:
        """What the server reported about a finished request (empty when it reports nothing)."""
        ...

    async def prefill_queues(self) -> dict[str, int] | None:
        """Queued prefill tokens per prefill-capable worker now (None: not observable)."""
        ...

    async def close(self) -> None: ...


def make_target(
    endpoint: Endpoint, model: str | None, sampling: Sampling, id_prefix: str = "bench"
) -> Target:
    """``id_prefix``: gRPC request ids are ``PREFIX-INDEX`` (one prefix per run of a plan)."""
    if endpoint.scheme == "grpc":
        return GrpcTarget(endpoint, sampling, id_prefix)
    if not model:
        raise ValueError("openai:// targets need --model (the served model name)")
    return OpenAITarget(endpoint, model, sampling)


# ---- grpc -------------------------------------------------------------------------------


class GrpcTarget:
    def __init__(self, endpoint: Endpoint, sampling: Sampling, id_prefix: str = "bench") -> None:
        from services.client.client import AsyncBanaServeClient

        self._client = AsyncBanaServeClient(endpoint.address)
        self._sampling = sampling
        self._id_prefix = id_prefix
        self._server_side: dict[int, dict[str, float]] = {}

    async def stream(self, request: Request, timeout_s: float) -> AsyncIterator[int]:
        from services.client.client import BanaServeClientError

        generation = self._client.generate(
            request.prompt,
            timeout_s=timeout_s,
            request_id=f"{self._id_prefix}-{request.index}",
            max_tokens=request.max_tokens,
            temperature=self._sampling.temperature,
            ignore_eos=self._sampling.ignore_eos,
        )
        try:
            async for delta in generation:
                if delta.token_ids:
                    yield len(delta.token_ids)
        except BanaServeClientError as exc:
            raise TargetError(exc.code.name, exc.message) from None
        finally:
            generation.cancel()  # no-op once finished; frees the call on timeout or error
        try:
            finish = generation.result.finish_reason
        except RuntimeError:
            raise TargetError("INCOMPLETE", "the stream ended without a finished frame") from None
        if finish == "abort":
            raise TargetError("ABORTED", "the server aborted the request")
        self._server_side[request.index] = server_side(generation.result)

    def server_side(self, request: Request) -> dict[str, float]:
        return self._server_side.pop(request.index, {})

    async def prefill_queues(self) -> dict[str, int] | None:
        workers = await self._client.list_workers(timeout_s=1.0)
        return {
            w.worker_id: w.num_queued_prefill_tokens
            for w in workers
            if w.active and w.role in ("prefill", "mixed")
        }

    async def close(self) -> None:
        await self._client.close()


def server_side(result) -> dict[str, float]:
    """The router's timings of one request (``router.proto`` ``Timings``), in seconds / MiB."""
    t = result.server_timings
    return {
        f"{name}_s": getattr(t, name).ToTimedelta().total_seconds()
        for name in ("routing", "prefill", "kv_transfer", "kv_transfer_exposed")
    } | {
        "kv_mib": t.kv_bytes / 2**20,
        "num_cached_tokens": result.num_cached_tokens,
        "prefill_worker": result.prefill_worker_id,
        "decode_worker": result.decode_worker_id,
    }


# ---- openai -----------------------------------------------------------------------------


def completion_body(request: Request, model: str, sampling: Sampling) -> dict:
    return {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": sampling.temperature,
        "ignore_eos": sampling.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


def http_request(endpoint: Endpoint, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {endpoint.address}\r\n"
        "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of an HTTP/1.1 response."""
    status_line = (await reader.readline()).decode("latin-1").split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise TargetError("BAD_RESPONSE", f"not an HTTP response: {' '.join(status_line)!r}")
    headers: dict[str, str] = {}
    while (line := (await reader.readline()).decode("latin-1").strip()) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line[1]), headers


async def body_lines(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[str]:
    """The response body line by line, undoing chunked transfer encoding when present."""
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        async for raw in reader:
            yield raw.decode().rstrip("\r\n")
        return
    pending = b""
    while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
        pending += await reader.readexactly(size)
        await reader.readline()  # the CRLF after each chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            yield raw.decode().rstrip("\r")
    if pending:
        yield pending.decode().rstrip("\r")


def sse_payloads(lines: Iterable[str]) -> Iterable[dict]:
    """The JSON objects of ``data:`` lines, up to ``data: [DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def chunk_tokens(payload: dict) -> int:
    """Output tokens carried by one streamed completion chunk (see the module docstring)."""
    if "error" in payload:
        error = payload["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        raise TargetError("STREAM_ERROR", message)
    n = 0
    for choice in payload.get("choices") or []:
        ids = choice.get("token_ids")
        n += len(ids) if ids is not None else int(bool(choice.get("text")))
    return n


class OpenAITarget:
    def __init__(self, endpoint: Endpoint, model: str, sampling: Sampling) -> None:
        self._endpoint = endpoint
        self._model = model
        self._sampling = sampling

    async def stream(self, request: Request, timeout_s: float) -> AsyncIterator[int]:
        body = json.dumps(completion_body(request, self._model, self._sampling)).encode()
        try:
            reader, writer = await asyncio.open_connection(self._endpoint.host, self._endpoint.port)
        except OSError as exc:
            raise TargetError("UNAVAILABLE", str(exc)) from None
        try:
            writer.write(http_request(self._endpoint, "/v1/completions", body))
            await writer.drain()
            async for n in self._read(reader):
                yield n
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> AsyncIterator[int]:
        code, headers = await read_head(reader)
        if code != 200:
            text = (await reader.read(MAX_ERROR_BODY)).decode(errors="replace")
            raise TargetError(f"HTTP {code}", text.strip())
        counted, usage = 0, None
        async for line in body_lines(reader, headers):
            for payload in sse_payloads([line]):
                usage = (payload.get("usage") or {}).get("completion_tokens", usage)
                if n := chunk_tokens(payload):
                    counted += n
                    yield n
        if usage is not None and usage > counted:
            yield usage - counted

    def server_side(self, request: Request) -> dict[str, float]:
        return {}  # an OpenAI server reports no per-request timings

    async def prefill_queues(self) -> dict[str, int] | None:
        return None

    async def close(self) -> None:
        return None
