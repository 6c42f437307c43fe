"""Errors of the OpenAI-compatible HTTP API: OpenAI's shape, the status gRPC would give.

One chain decides a status: the domain error -> the gRPC code ``Generate`` fails with for it
(``services/rpc/status.py``'s table, after ``RouterServicer``'s own choices for the driver's
errors) -> the HTTP status (``HTTP_STATUS``). The body is ``{"error": {"message", "type",
"param", "code"}}``: ``code`` the gRPC code in lower case (``model_not_found`` for an unknown
model), ``param`` the request field at fault when one is known.
"""

from __future__ import annotations

from typing import Any

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.errors import ModelNotFoundError, OutOfRangeError
from services.router import core
from services.router import driver as drv
from services.router.openai_schema import error_body
from services.rpc.status import status_for

Code = grpc.StatusCode
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
    413: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class BodyTooLargeError(OutOfRangeError):
    """The body is larger than any valid request (413)."""


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status gRPC ``Generate`` fails with for ``exc`` (RouterServicer's choices first)."""
    if isinstance(exc, drv.WorkerLostError | core.NoWorkerError):
        return Code.UNAVAILABLE, str(exc)
    if isinstance(exc, drv.WorkerCallError):
        return Code[exc.code], str(exc)
    if isinstance(exc, BodyTooLargeError):
        return Code.RESOURCE_EXHAUSTED, str(exc)  # as gRPC refuses a message over its limit
    return status_for(exc)


def error_json(exc: BaseException) -> tuple[int, dict[str, Any]]:
    code, message = grpc_status(exc)
    status = 413 if isinstance(exc, BodyTooLargeError) else HTTP_STATUS.get(code, 500)
    if status == 404 and not isinstance(exc, ModelNotFoundError):
        status = 500  # a worker lost track of something: not the client's unknown model
    name = "model_not_found" if isinstance(exc, ModelNotFoundError) else code.name.lower()
    param = getattr(exc, "param", None)
    return status, error_body(message, ERROR_TYPES.get(status, "server_error"), name, param)


def error_response(exc: BaseException) -> Response:
    status, body = error_json(exc)
    return JSONResponse(body, status_code=status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = error_body(
        exc.detail, ERROR_TYPES.get(exc.status_code, "invalid_request_error"), str(exc.status_code)
    )
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)
