"""Errors of the OpenAI-compatible HTTP API: OpenAI's shape, the status gRPC would give.

One chain decides a status: the domain error -> the gRPC code ``Generate`` fails with for it
(``services/rpc/status.py``'s table, after ``RouterServicer``'s own choices for the driver's
errors) -> the HTTP status (``HTTP_STATUS``). The body is ``{"error": {"message", "type",
"param", "code"}}``: ``code`` the gRPC code in lower case (``model_not_found`` for an unknown
model), ``param`` the request field at fault when one is known.

Overload (``services/common/admission.py``): a request shed because its client holds its share
is 429 (``rate_limit_error``), one shed because the router is full (queue full, or no slot
within the wait) is 503; every 429 and 503 carries a ``Retry-After`` header (whole seconds).
"""

from __future__ import annotations

from typing import Any

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.admission import (
    CLIENT_METADATA_KEY,
    MAX_CLIENT_NAME,
    Outcome,
    OverloadedError,
)
from services.common.errors import InvalidRequestError, ModelNotFoundError, OutOfRangeError
from services.router import core
from services.router import driver as drv
from services.router.openai_schema import error_body
from services.rpc.admission import retry_after_header
from services.rpc.security import caller_of_token, token_from_header
from services.rpc.status import grpc_code, status_for

Code = grpc.StatusCode
DEFAULT_RETRY_AFTER_S = 1.0  # a worker's RESOURCE_EXHAUSTED, an unavailable cluster
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.OUT_OF_RANGE: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class BodyTooLargeError(OutOfRangeError):
    """The body is larger than any valid request (413)."""


class BodyTimeoutError(InvalidRequestError):
    """The body did not arrive in time (408)."""


class UnsupportedMediaTypeError(InvalidRequestError):
    """The body is declared as something other than JSON, or encoded (415)."""


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status gRPC ``Generate`` fails with for ``exc`` (RouterServicer's choices first)."""
    if isinstance(exc, drv.WorkerLostError | core.NoWorkerError):
        return Code.UNAVAILABLE, str(exc)
    if isinstance(exc, drv.WorkerCallError):
        return grpc_code(exc.code), str(exc)
    if isinstance(exc, BodyTooLargeError):
        return Code.RESOURCE_EXHAUSTED, str(exc)  # as gRPC refuses a message over its limit
    return status_for(exc)


# The HTTP API's own refusals of a body, whose status HTTP has a name for (gRPC's code stays).
BODY_STATUS: dict[type[BaseException], int] = {
    BodyTooLargeError: 413,
    BodyTimeoutError: 408,
    UnsupportedMediaTypeError: 415,
}


def error_json(exc: BaseException) -> tuple[int, dict[str, Any]]:
    code, message = grpc_status(exc)
    status = BODY_STATUS.get(type(exc)) or HTTP_STATUS.get(code, 500)
    if isinstance(exc, OverloadedError) and exc.outcome is not Outcome.SHED_CLIENT_LIMIT:
        status = 503  # the router as a whole is full, not this client over its share
    if status == 404 and not isinstance(exc, ModelNotFoundError):
        status = 500  # a worker lost track of something: not the client's unknown model
    name = "model_not_found" if isinstance(exc, ModelNotFoundError) else code.name.lower()
    param = getattr(exc, "param", None)
    return status, error_body(message, ERROR_TYPES.get(status, "server_error"), name, param)


def error_response(exc: BaseException) -> Response:
    status, body = error_json(exc)
    headers = None
    if status in (429, 503):
        retry_after = getattr(exc, "retry_after_s", DEFAULT_RETRY_AFTER_S)
        headers = {"Retry-After": retry_after_header(retry_after)}
    return JSONResponse(body, status_code=status, headers=headers)


def http_client_identity(request: Request) -> str:
    """Who is calling, for per-client caps: the HTTP side of ``services.rpc.admission.
    client_identity``: the bearer token it showed (a digest; verified where the API requires
    tokens), else the ``x-banaserve-client`` header, else the peer's host — not its port: an
    HTTP client spreads its requests over many connections (a pool; a slow sender, one per
    request), and each connection counted apart would never reach a per-client cap."""
    token = caller_of_token(token_from_header(request.headers.get("authorization")))
    if token:
        return token
    name = request.headers.get(CLIENT_METADATA_KEY, "")
    if name:
        return "client:" + name[:MAX_CLIENT_NAME]
    peer = request.client
    return f"peer:{peer.host}" if peer is not None else "peer:unknown"


# Starlette's own errors (no route, a route's other method) in the codes' words: gRPC's name
# for the same refusal, as every other error body here.
HTTP_ERROR_CODES = {404: Code.NOT_FOUND, 405: Code.UNIMPLEMENTED}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = HTTP_ERROR_CODES.get(exc.status_code, Code.INVALID_ARGUMENT)
    body = error_body(
        exc.detail, ERROR_TYPES.get(exc.status_code, "invalid_request_error"), code.name.lower()
    )
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)
