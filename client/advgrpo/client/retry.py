"""Retrying failed calls: what gRPC does itself, and what stays ours and why.

gRPC's own mechanisms (gRFC A6, https://github.com/grpc/proposal/blob/master/A6-client-retries.md):

- Unary calls (Score, UpdateDiscriminator, ListModels, CheckSharedMemory) get a ``retryPolicy``
  in the channel's service config (``channel_options``): gRPC retries UNAVAILABLE itself, up to
  ``GRPC_MAX_ATTEMPTS`` attempts, with the RetryPolicy's backoff, resending the request it keeps
  (``grpc.per_rpc_retry_buffer_size`` covers the largest request, else a big one would not be
  retried) and honouring the server's ``grpc-retry-pushback-ms`` trailer. It does so where the
  RetryPolicy sets no ``max_attempts`` (the default, and the trainer's): gRPC does not tell the
  caller how many attempts a failed call made (A6's ``grpc-previous-rpc-attempts`` goes to the
  server only), so under a policy that counts attempts the client makes each of them itself.
- The server marks a transient refusal with that standard pushback trailer, and a
  RESOURCE_EXHAUSTED that will fail the same way every time with a negative one (advgrpo.common.protocol).
- ``RewardClient.wait_ready`` waits for the server with ``wait_for_ready``.

What stays ours (``RetryBudget``), because gRPC's retry cannot express it:

- The time budget. gRPC caps ``maxAttempts`` at 5 and has no time limit, but a restarted server
  (drain plus model reload) is away for tens of seconds. Once gRPC's attempts for a call are
  spent, our loop waits on (the backoff goes on growing from where gRPC's stopped) and makes the
  call again, for as long as ``max_elapsed_s`` allows.
- ``max_attempts``: counted by our loop, which then makes every attempt (see above).
- RESOURCE_EXHAUSTED. gRPC retries a status code whatever its trailer says unless the pushback is
  negative, so it would also retry the RESOURCE_EXHAUSTED that gRPC itself produces for a
  message over a size limit (the client's or the server's; it carries no trailer of ours) and
  send such a request five times. Our loop retries a RESOURCE_EXHAUSTED only when its pushback
  says it is transient (>= 0 ms), after at least that long.
- Streams (ScoreStream). A6 commits a call once its response headers arrive, and our server sends
  them as soon as it accepts a stream: gRPC would never retry it. advgrpo.client.stream opens a
  new stream and replays the unanswered messages itself, under a RetryBudget.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

import grpc

from advgrpo.common.protocol import RETRY_PUSHBACK_KEY

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
GRPC_MAX_ATTEMPTS = 5  # gRPC's client-side cap on a retryPolicy's maxAttempts (A6); it clamps more to this
_INT32 = re.compile(r"-?[0-9]+")


@dataclass
class RetryPolicy:
    """How a call that fails with a ``retryable`` status (UNAVAILABLE) is retried: after a jittered
    exponential backoff (``initial_backoff_s``, times ``multiplier`` per retry, at most
    ``max_backoff_s``), for as long as both limits allow. ``max_elapsed_s``: no retry starts later
    than this many seconds after the first attempt began (the last wait is shortened to end by
    then; an attempt in progress runs to its own deadline), so the default 30 s outlasts a server
    restart (drain plus model reload). ``max_attempts``: at most this many attempts in all.
    ``None`` turns a limit off; at least one must be set. ``score_stream`` retries a failed stream
    the same way, counting from its failure (see there).

    Without ``max_attempts``, a unary call's first attempts are gRPC's own (a service-config
    retryPolicy: up to 5 attempts, this backoff with gRPC's jitter; advgrpo.client.retry), and the
    client calls again after those until ``max_elapsed_s``. gRPC's attempts within one call are not
    cut at that limit: a call begun before it may make its last few attempts, each after its own
    backoff, after it. With ``max_attempts`` the client makes every attempt itself, to count them.

    RESOURCE_EXHAUSTED is retried too when the server marks it transient (a full queue, its
    decoded-bytes budget in use by other requests: gRFC A6's ``grpc-retry-pushback-ms`` trailer
    with a delay), after at least that long; one over a size limit fails the same way every time
    and is raised. A negative pushback (A6: "do not retry") is raised whatever the status."""

    max_attempts: int | None = None
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retryable: tuple = field(default=_RETRYABLE)
    max_elapsed_s: float | None = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts is None and self.max_elapsed_s is None:
            raise ValueError("RetryPolicy: set max_attempts or max_elapsed_s (or both)")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_elapsed_s is not None and self.max_elapsed_s < 0:
            raise ValueError(f"RetryPolicy.max_elapsed_s must be >= 0, got {self.max_elapsed_s}")


# ---------------------------------------------------------------- gRPC's own retry


def grpc_retry_policy(policy: RetryPolicy, deadline_s: float | None = None) -> dict | None:
    """The part of ``policy`` that gRPC's retry runs for each unary call, as a service config's
    ``retryPolicy`` (A6), or None where gRPC should make one attempt per call: the policy counts
    attempts (``max_attempts``, which only our loop can count), has no time to retry in, retries
    nothing gRPC may, or has a backoff a service config cannot write.

    gRPC's attempts share the call's deadline (``deadline_s``, the client's ``timeout_s``), and a
    call that runs out of it ends with DEADLINE_EXCEEDED, which is not retried: so gRPC gets only
    as many attempts as its longest backoffs leave most of the deadline to (their sum at most a
    quarter of it), and none where even one backoff would not fit; our loop retries the rest."""
    # RESOURCE_EXHAUSTED stays ours (see the module's docstring).
    codes = sorted({c.name for c in policy.retryable} - {grpc.StatusCode.RESOURCE_EXHAUSTED.name})
    numbers = (policy.multiplier, policy.initial_backoff_s, policy.max_backoff_s)
    if (
        policy.max_attempts is not None
        or policy.max_elapsed_s == 0
        or not codes
        or not policy.multiplier > 0
        or not all(math.isfinite(x) for x in numbers)
    ):
        return None
    max_backoff = max(policy.max_backoff_s, policy.initial_backoff_s)
    attempts, waited = 1, 0.0
    while attempts < GRPC_MAX_ATTEMPTS:
        # A6: the n-th retry waits at most min(initial * multiplier**(n-1), max) (jitter below it).
        longest = min(policy.initial_backoff_s * policy.multiplier ** (attempts - 1), max_backoff)
        if deadline_s is not None and waited + longest > deadline_s / 4:
            break
        attempts, waited = attempts + 1, waited + longest
    if attempts == 1:
        return None
    return {
        "maxAttempts": attempts,
        "initialBackoff": _duration(policy.initial_backoff_s),
        "maxBackoff": _duration(max_backoff),
        "backoffMultiplier": policy.multiplier,
        "retryableStatusCodes": codes,
    }


def _duration(seconds: float) -> str:
    """A proto3 JSON Duration; gRPC wants backoffs > 0, so at least 1 ms."""
    return f"{max(seconds, 0.001):.3f}s"


def channel_options(
    policy: RetryPolicy, service: str, methods: Iterable[str], max_message_bytes: int, deadline_s: float | None = None
) -> list:
    """Channel options that make gRPC retry ``methods`` of ``service`` as ``grpc_retry_policy``
    says, buffering requests up to ``max_message_bytes`` so that every request can be resent."""
    options: list = [("grpc.enable_retries", 1)]
    retry_policy = grpc_retry_policy(policy, deadline_s)
    if retry_policy is not None:
        config = {
            "methodConfig": [
                {"name": [{"service": service, "method": m} for m in methods], "retryPolicy": retry_policy}
            ]
        }
        options += [
            ("grpc.service_config", json.dumps(config)),
            # Beyond this (256 KiB by default) gRPC sends a request but does not retry it.
            ("grpc.per_rpc_retry_buffer_size", min(max_message_bytes + 1024, 2**31 - 1)),
        ]
    return options


def grpc_attempts(policy: RetryPolicy, exc: BaseException, deadline_s: float | None = None) -> int:
    """How many attempts a unary call that failed with ``exc`` made, as far as the client can tell
    (for its logs and for how far the backoff has grown): all of gRPC's where gRPC retries its
    status (a call ends with it once they are spent; its deadline would end it with
    DEADLINE_EXCEEDED), else one."""
    retry_policy = grpc_retry_policy(policy, deadline_s)
    if retry_policy is None or not isinstance(exc, grpc.RpcError):
        return 1
    pushback = pushback_s(exc)
    if exc.code().name not in retry_policy["retryableStatusCodes"] or (pushback is not None and pushback < 0):
        return 1
    return retry_policy["maxAttempts"]


# ---------------------------------------------------------------- pushback and our loop


def pushback_s(exc: BaseException) -> float | None:
    """The server's pushback (A6's ``grpc-retry-pushback-ms`` trailer) of a failed call: seconds to
    wait before retrying (>= 0), -1.0 where it asks not to retry (A6: a negative value, or one that
    does not parse as an integer), or None where it sent none."""
    try:
        trailer = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an error without metadata: no pushback
        return None
    for key, value in trailer:
        if key == RETRY_PUSHBACK_KEY:
            if isinstance(value, bytes):
                value = value.decode("ascii", errors="replace")
            value = str(value).strip()
            if not _INT32.fullmatch(value) or int(value) < 0:
                return -1.0
            return int(value) / 1000.0
    return None


class RetryBudget:
    """One outage's retries under a ``RetryPolicy``: the attempts made, the next backoff and the
    time limit, all counted from when it was made (or ``renew``ed)."""

    def __init__(self, policy: RetryPolicy, target: str):
        self.policy, self.target = policy, target
        self.backoff = policy.initial_backoff_s
        self.renew()

    def renew(self) -> None:
        """A fresh attempt count and time limit; the backoff goes on growing."""
        self.made = 0  # attempts made (and failed) in this outage
        limit = self.policy.max_elapsed_s
        self.give_up_at = None if limit is None else time.monotonic() + limit

    def _grow(self) -> None:
        self.backoff = min(self.backoff * self.policy.multiplier, self.policy.max_backoff_s)

    def delay(self, exc: BaseException, what: str, attempts: int = 1) -> float | None:
        """Seconds to wait before the next attempt after ``exc``, which ended ``attempts`` attempts
        (more than one: gRPC retried the call itself first): the jittered backoff, or the server's
        pushback if longer, cut at the time limit. None: ``exc`` is not retryable, the server asks
        not to retry, or the budget is spent; raise it."""
        policy = self.policy
        code = exc.code() if isinstance(exc, grpc.RpcError) else None
        pushback = pushback_s(exc) if code is not None else None
        if pushback is not None and pushback < 0:
            return None  # A6: the server says do not retry
        transient = code == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is not None
        if code not in policy.retryable and not transient:
            return None
        self.made += attempts
        left = math.inf if self.give_up_at is None else self.give_up_at - time.monotonic()
        if left <= 0 or (policy.max_attempts is not None and self.made >= policy.max_attempts):
            log.warning(
                "reward server %s: %s %s; giving up after %d attempt(s)", self.target, what, code.name, self.made
            )
            return None
        for _ in range(attempts - 1):
            self._grow()  # gRPC waited its backoffs between its own attempts: ours go on from there
        jittered = self.backoff * (0.5 + random.random() / 2)  # jitter keeps clients from stampeding
        delay = min(max(jittered, pushback or 0.0), left)
        log.warning(
            "reward server %s: %s %s after %d attempt(s); retry in %.2fs",
            self.target,
            what,
            code.name,
            self.made,
            delay,
        )
        self._grow()
        return delay


def call_with_retry(
    method: Callable[..., T],
    request,
    policy: RetryPolicy,
    target: str,
    *,
    timeout_s: float,
    metadata,
    failed: grpc.RpcError | None = None,
) -> T:
    """``method(request)`` (a unary call on a channel made with ``channel_options``) with a
    deadline of ``timeout_s`` per call, called again as ``policy`` allows once gRPC's own
    attempts are spent; ``failed``: the first call, made elsewhere, failed with it."""
    budget = RetryBudget(policy, target)
    while True:
        if failed is not None:
            delay = budget.delay(failed, "call", grpc_attempts(policy, failed, timeout_s))
            if delay is None:
                raise failed
            time.sleep(delay)
        try:
            return method(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            failed = exc
