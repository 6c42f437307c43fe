"""Domain errors. Services map each class to one gRPC status code in one table
(services/rpc); nothing else decides a status code."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Why a call failed, as gRPC names it; what a driver or transport records and compares
    (``is ErrorCode.UNAVAILABLE``), never the name as a string. services/rpc/status.py maps it
    to and from ``grpc.StatusCode`` in its one table. (A ``StrEnum`` so that logs, reports and
    JSON show the name.)"""

    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


# A call refused after a wait (a queue slot never freed, no worker to serve it, its id still
# taken) is told why at least this long before its deadline: at the deadline itself the
# caller's own timer wins and reads DEADLINE_EXCEEDED, the reason lost (a reply takes ~1 ms on
# one machine, more under load). Every such wait ends this much early.
REASON_MARGIN_S = 0.05


class BanaServeError(Exception):
    """Base of every error BanaServe raises on purpose."""


class ConfigError(BanaServeError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class InvalidRequestError(BanaServeError, ValueError):
    """A request is malformed (empty prompt, bad sampling parameter...)."""


class MalformedMessageError(InvalidRequestError):
    """A request's bytes do not decode as the message its method takes."""


class OutOfRangeError(InvalidRequestError):
    """A request is well-formed but exceeds a limit (prompt longer than the context...)."""


class ModelNotFoundError(BanaServeError, LookupError):
    """The named model is neither a prepared model nor a model directory."""


class ModelFormatError(BanaServeError, ValueError):
    """A model directory is present but cannot be loaded (unsupported architecture...)."""


class RequestNotFoundError(BanaServeError, LookupError):
    """No request with that id is known."""


class ResourceExhaustedError(BanaServeError):
    """Not enough KV blocks or queue space, now or ever, for the request."""


class AlreadyExistsError(BanaServeError):
    """A live request already has this id (ids of ended requests may be used again)."""


class SupersededError(BanaServeError):
    """A newer call with this request's id and caller took it over (the client sent it again
    after its stream broke on the client's side, GenerateRequest.resume): this call ends."""


class StepFailedError(BanaServeError):
    """The engine step computing the request failed; the request was dropped and the worker
    serves on. The message names a reference into the worker's log, never the cause itself."""


class PreconditionError(BanaServeError):
    """The request is valid, but what it acts on is not in a state that allows it now (a
    migration that is not ACTIVE asked to revert, a worker already in a live migration)."""


class PermissionDeniedError(BanaServeError):
    """The caller may not act on this: another client's request (docs/security.md)."""


class DependencyUnavailableError(BanaServeError):
    """A service this one depends on (e.g. the kvstore's Redis) cannot be reached now; the
    caller may retry or do without."""


class ShuttingDownError(BanaServeError):
    """This service is stopping: it takes no new work, and work it could not finish within its
    drain (``--drain-timeout``) ends with this. The caller may send it again, to another
    instance or to this one once it is back (the client library does)."""
