"""The HTTP side (Starlette on uvicorn, same process and event loop as gRPC).

/healthz  liveness: the process answers.
/readyz   readiness: models loaded and warmed up, not draining (503 otherwise).
/metrics  Prometheus text format.
/v1/models, /v1/score, /v1/update  JSON gateway: bodies are the proto3 JSON mapping of the gRPC
          messages (bytes as base64), handled by the same host code as gRPC.
/v1/stats recent updates and per-model state, for the dashboard.
/dashboard live page.
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path

from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from advgrpo.reward.v1 import reward_pb2

from .. import convert
from ..errors import RewardError
from ..host import ModelHost

_DASHBOARD = Path(__file__).with_name("dashboard.html")


class HttpState:
    def __init__(self) -> None:
        self.ready = False
        self.draining = False


def build_app(host: ModelHost, state: HttpState) -> Starlette:
    settings = host.config.server

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if not settings.auth_token:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), settings.auth_token.encode())

    async def parse(request: Request, message_type):
        body = await request.body()
        if len(body) > settings.max_message_bytes * 2:  # base64 inflates by 4/3
            raise _HttpError(413, f"request body of {len(body)} bytes exceeds the limit")
        try:
            return json_format.Parse(body or b"{}", message_type())
        except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
            raise _HttpError(400, f"invalid JSON for {message_type.DESCRIPTOR.full_name}: {exc}") from None

    def gateway(handler, message_type):
        async def endpoint(request: Request) -> Response:
            if not authorised(request):
                return error(401, "missing or invalid bearer token (header 'Authorization: Bearer <token>')")
            try:
                message = await parse(request, message_type)
                response = await handler(host, message)
            except _HttpError as exc:
                return error(exc.status, str(exc))
            except RewardError as exc:
                return error(exc.http_status, str(exc))
            return JSONResponse(
                json_format.MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            )

        return endpoint

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready", "models": host.model_names()})
        return JSONResponse({"status": "draining" if state.draining else "starting"}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(host.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(request: Request) -> Response:
        if not authorised(request):
            return error(401, "missing or invalid bearer token")
        response = convert.list_models_response(host.list_models())
        return JSONResponse(json_format.MessageToDict(response, preserving_proto_field_name=True))

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "time": time.time(),
                "uptime_s": time.time() - host.started_at,
                "ready": state.ready and not state.draining,
                "models": [m.__dict__ for m in host.list_models()],
                "events": [e.__dict__ for e in list(host.events)[-200:]],
            }
        )

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(_DASHBOARD.read_text() if _DASHBOARD.exists() else "<h1>advgrpo reward server</h1>")

    async def score(host_, message):
        return await convert.score(host_, message)

    async def update(host_, message):
        return await convert.update(host_, message)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/score", gateway(score, reward_pb2.ScoreRequest), methods=["POST"]),
        Route("/v1/update", gateway(update, reward_pb2.UpdateDiscriminatorRequest), methods=["POST"]),
        Route("/v1/stats", stats),
        Route("/dashboard", dashboard),
        Route("/", dashboard),
    ]
    return Starlette(routes=routes)


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
