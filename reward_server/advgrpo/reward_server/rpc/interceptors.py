"""Cross-cutting concerns of every RPC, as grpc.aio server interceptors (outermost first):
metrics (count, latency, status code), auth (bearer tokens with scopes), errors (RewardError -> status)."""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import grpc

from advgrpo.common.errors import RewardError
from advgrpo.common.protocol import NO_RETRY_PUSHBACK, RETRY_PUSHBACK_KEY
from advgrpo.reward_server.auth import TokenTable, allows, needed_scope
from advgrpo.reward_server.metrics import ServerMetrics

log = logging.getLogger(__name__)

# Health and reflection stay open without a token: orchestrators and grpcurl probe them.
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _wrap(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """Wraps a handler's behaviour; unary-response and streaming-response RPCs need different shapes."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    return handler._replace(stream_stream=wrap_stream(handler.stream_stream))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """RewardError -> its status with its message; anything else -> INTERNAL, logged with traceback.

    A refusal carries gRFC A6's pushback trailer (``grpc-retry-pushback-ms``), which gRPC's own
    retry reads as well as our client: a transient one (``retry_after_s``) the milliseconds to
    wait, and a RESOURCE_EXHAUSTED that will fail the same way every time (a size limit) -1,
    "do not retry", so that no A6 client retrying RESOURCE_EXHAUSTED sends it again."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method

        async def fail(exc: BaseException, context) -> None:
            if isinstance(exc, RewardError):
                trailer = ()
                if exc.retry_after_s is not None:  # transient: the client may try again after it
                    trailer = ((RETRY_PUSHBACK_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
                elif exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    trailer = ((RETRY_PUSHBACK_KEY, NO_RETRY_PUSHBACK),)
                await context.abort(exc.code, str(exc), trailing_metadata=trailer)
            log.exception("unexpected error in %s", method, exc_info=exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

        def wrap_unary(behaviour):
            async def run(request, context):
                try:
                    return await behaviour(request, context)
                except (grpc.aio.AbortError, GeneratorExit):
                    raise
                except Exception as exc:
                    await fail(exc, context)

            return run

        def wrap_stream(behaviour):
            async def run(request, context):
                try:
                    async for response in behaviour(request, context):
                        yield response
                except (grpc.aio.AbortError, GeneratorExit):
                    raise
                except Exception as exc:
                    await fail(exc, context)

            return run

        return _wrap(handler, wrap_unary, wrap_stream)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC but health and reflection, with the
    scope the RPC needs (advgrpo.reward_server.auth): a missing or unknown token is
    UNAUTHENTICATED, a ``score`` token calling UpdateDiscriminator PERMISSION_DENIED."""

    def __init__(self, tokens: TokenTable):
        self._tokens = tokens

    async def intercept_service(self, continuation, details):
        if details.method.startswith(PUBLIC_SERVICES):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization")
        granted = self._tokens.scope_of_header(given)
        needed = needed_scope(details.method)
        if granted is not None and allows(granted, needed):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if granted is None:
            code, message = (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
            )
        else:
            method = details.method.rsplit("/", 1)[-1]
            code, message = grpc.StatusCode.PERMISSION_DENIED, f"{method} needs a token with the '{needed}' scope"

        def deny_unary(_behaviour):
            async def run(request, context):
                await context.abort(code, message)

            return run

        def deny_stream(_behaviour):
            async def run(request, context):
                await context.abort(code, message)
                yield  # pragma: no cover - makes this an async generator

            return run

        return _wrap(handler, deny_unary, deny_stream)


class ConcurrencyInterceptor(grpc.aio.ServerInterceptor):
    """At most ``limit`` RPCs of RewardService in progress (a stream counts while it is open); one
    more is RESOURCE_EXHAUSTED at once, with a retry hint (gRFC A6 pushback), rather than queued
    without bound. Health and reflection are not counted: probes must answer under load."""

    RETRY_AFTER_MS = 100

    def __init__(self, limit: int, metrics: ServerMetrics):
        self.limit = limit
        self.active = 0
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_SERVICES):
            return handler
        interceptor = self
        message = f"server.max_concurrent_rpcs: {self.limit} RPCs already in progress; retry shortly"
        trailer = ((RETRY_PUSHBACK_KEY, str(self.RETRY_AFTER_MS)),)

        def enter() -> bool:
            if interceptor.active >= interceptor.limit:
                return False
            interceptor.active += 1  # one event loop: no lock needed
            interceptor._metrics.concurrent_rpcs.set(interceptor.active)
            return True

        def leave() -> None:
            interceptor.active -= 1
            interceptor._metrics.concurrent_rpcs.set(interceptor.active)

        def wrap_unary(behaviour):
            async def run(request, context):
                if not enter():
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailer)
                try:
                    return await behaviour(request, context)
                finally:
                    leave()

            return run

        def wrap_stream(behaviour):
            async def run(request, context):
                if not enter():
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=trailer)
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    leave()

            return run

        return _wrap(handler, wrap_unary, wrap_stream)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        m = self.metrics

        def record(context, started: float, failed: bool) -> None:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            m.rpc_requests.labels(method, name).inc()
            m.rpc_latency.labels(method).observe(time.perf_counter() - started)

        def wrap_unary(behaviour: Callable[..., Awaitable]):
            async def run(request, context):
                started, failed = time.perf_counter(), True
                try:
                    response = await behaviour(request, context)
                    failed = False
                    return response
                finally:
                    record(context, started, failed)

            return run

        def wrap_stream(behaviour):
            async def run(request, context):
                started, failed = time.perf_counter(), True
                try:
                    async for response in behaviour(request, context):
                        yield response
                    failed = False
                finally:
                    record(context, started, failed)

            return run

        return _wrap(handler, wrap_unary, wrap_stream)
