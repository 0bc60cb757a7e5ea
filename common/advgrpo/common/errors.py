"""Errors the reward server raises on purpose, each mapped to one gRPC status and HTTP code.

Model and host code raise these; the gRPC error interceptor and the HTTP gateway translate
them. Anything else that escapes is an INTERNAL error (a bug), logged with its traceback.
"""

from __future__ import annotations

import grpc


class RewardError(Exception):
    """Base class: a failure the caller can act on. ``str(err)`` is the message sent back.

    ``retry_after_s``: set when the refusal is transient (a full queue, the server's decoded-bytes
    budget taken by other requests), so the same request may succeed after about this long. gRPC
    sends it as gRFC A6's ``grpc-retry-pushback-ms`` trailer (advgrpo.common.protocol), HTTP as
    ``Retry-After``; the client retries such a RESOURCE_EXHAUSTED within its retry budget, and
    never one without it: a RESOURCE_EXHAUSTED without ``retry_after_s`` (a request over a size
    limit fails the same way every time) carries the pushback -1, A6's "do not retry"."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str = "", *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidArgument(RewardError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(RewardError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class FailedPrecondition(RewardError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class ResourceExhausted(RewardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class Unavailable(RewardError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Unauthenticated(RewardError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class ModelFailed(RewardError):
    """A model produced no usable score (e.g. NaN): the request fails, and no number stands in."""

    code = grpc.StatusCode.INTERNAL
    http_status = 500


class ConfigError(ValueError):
    """A bad server configuration (file, preset or flag); the CLI prints it without a traceback."""
