"""Domain errors. Services map each class to one gRPC status code in one table
(services/rpc); nothing else decides a status code."""

from __future__ import annotations


class BanaServeError(Exception):
    """Base of every error BanaServe raises on purpose."""


class ConfigError(BanaServeError, ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class InvalidRequestError(BanaServeError, ValueError):
    """A request is malformed (empty prompt, bad sampling parameter...)."""


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


class DependencyUnavailableError(BanaServeError):
    """A service this one depends on (e.g. the kvstore's Redis) cannot be reached now; the
    caller may retry or do without."""
