"""What crosses Ray between our deployments: protobuf bytes, and refusals as plain tuples.

A deployment never raises a ``RewardError`` through Ray (Ray would wrap it in its own error and
a traceback); it returns ``("error", class name, message, retry_after_s)`` and the caller raises
the same error again, so the client sees the status and message a single server would give."""

from __future__ import annotations

from advgrpo.common import errors
from advgrpo.common.errors import RewardError, Unavailable

_ERRORS = {
    cls.__name__: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.FailedPrecondition,
        errors.ResourceExhausted,
        errors.Unavailable,
        errors.Unauthenticated,
        errors.ModelFailed,
    )
}

Reply = tuple


def ok(payload: bytes) -> Reply:
    return ("ok", payload)


def refused(exc: RewardError) -> Reply:
    name = type(exc).__name__
    return ("error", name if name in _ERRORS else "ModelFailed", str(exc), exc.retry_after_s)


def unwrap(reply: Reply) -> bytes:
    """The payload of an ``ok`` reply; raises the refusal of an ``error`` one."""
    if reply[0] == "ok":
        return reply[1]
    if reply[0] == "error":
        _, name, message, retry_after_s = reply
        raise _ERRORS.get(name, errors.ModelFailed)(message, retry_after_s=retry_after_s)
    raise Unavailable(f"unexpected reply from a replica: {reply[0]!r}")
