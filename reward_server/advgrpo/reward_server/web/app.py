"""The HTTP side (Starlette on uvicorn, same process and event loop as gRPC).

/healthz  liveness: the process answers.
/readyz   readiness: models loaded and warmed up, not draining (503 otherwise).
/metrics  Prometheus text format.
/v1/models, /v1/score, /v1/update  JSON gateway: bodies are the proto3 JSON mapping of the gRPC
          messages (bytes as base64, uint64 as strings), handled by the same host code as gRPC.
/v1/stats per-model state, discriminator update history and recent scoring activity, for the
          dashboard.
/dashboard (and /) the live page: one self-contained HTML file that polls /v1/stats.

Auth: when the server has tokens (advgrpo.reward_server.auth), the gateway routes need
``Authorization: Bearer <token>`` with the scope of the RPC they stand for, as on the gRPC side:
/v1/models and /v1/score a ``score`` token, /v1/update an ``update`` one. A missing or unknown
token gets 401, a ``score`` token on /v1/update 403.
Probes (/healthz, /readyz, /metrics) stay open for orchestrators and scrapers, and so do
/v1/stats and /dashboard: they show model names, versions and training curves, never images,
prompts or the token, and they cannot change anything.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from advgrpo.common.errors import RewardError
from advgrpo.reward.v1 import reward_pb2
from advgrpo.reward_server.auth import Scope, allows, build_table
from advgrpo.reward_server.host import Event, ModelHost

from .. import convert

log = logging.getLogger(__name__)

_DASHBOARD = Path(__file__).with_name("dashboard.html")
_UPDATE_FIELDS = ("version", "loss", "reference_score", "generated_score", "accuracy")
_ACTIVITY_WINDOW_S = 60.0
_RECENT_EVENTS = 50


class HttpState:
    def __init__(self) -> None:
        self.ready = False
        self.draining = False


def build_app(host: ModelHost, state: HttpState) -> Starlette:
    settings = host.config.server

    def error(status: int, message: str, retry_after_s: float | None = None) -> JSONResponse:
        # Retry-After is in whole seconds: a transient refusal asks for at least 1 s.
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    tokens = build_table(settings.tokens_file, settings.tokens, settings.auth_token)

    def refusal(request: Request, needed: Scope) -> JSONResponse | None:
        """None when the request may go on; else the 401 or 403 to answer."""
        if not tokens:
            return None
        granted = tokens.scope_of_header(request.headers.get("authorization"))
        if granted is None:
            response = error(401, "missing or invalid bearer token (header 'Authorization: Bearer <token>')")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if not allows(granted, needed):
            return error(403, f"{request.url.path} needs a token with the '{needed}' scope")
        return None

    body_limit = settings.max_message_bytes * 2  # base64 inflates by 4/3

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to be over the limit: from Content-Length
        before reading anything, else while it streams in."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > body_limit:
            raise _HttpError(413, f"request body of {int(declared)} bytes exceeds the limit of {body_limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > body_limit:
                raise _HttpError(413, f"request body exceeds the limit of {body_limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request, message_type):
        body = await read_body(request)
        name = message_type.DESCRIPTOR.full_name
        try:
            data = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise _HttpError(400, f"invalid JSON for {name}: {exc}") from None
        except RecursionError:
            raise _HttpError(400, f"invalid JSON for {name}: nested too deeply") from None
        if not isinstance(data, dict):
            raise _HttpError(400, f"invalid JSON for {name}: expected an object, got {type(data).__name__}")
        try:
            return json_format.ParseDict(data, message_type())
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise _HttpError(400, f"invalid JSON for {name}: {exc}") from None
        except RecursionError:
            raise _HttpError(400, f"invalid JSON for {name}: nested too deeply") from None

    def to_json(message) -> JSONResponse:
        return JSONResponse(
            json_format.MessageToDict(
                message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )

    def gateway(handler, message_type, needed: Scope):
        async def endpoint(request: Request) -> Response:
            if (refused := refusal(request, needed)) is not None:
                return refused
            try:
                message = await parse(request, message_type)
                response = await handler(host, message)
            except _HttpError as exc:
                return error(exc.status, str(exc))
            except RewardError as exc:
                return error(exc.http_status, str(exc), exc.retry_after_s)
            except Exception as exc:  # a bug: log it, answer JSON like every other error
                log.exception("unexpected error in %s", request.url.path)
                return error(500, f"internal error: {type(exc).__name__}: {exc}")
            return to_json(response)

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
        if (refused := refusal(request, "score")) is not None:
            return refused
        return to_json(convert.list_models_response(await host.describe_models()))

    async def stats(request: Request) -> Response:
        now = time.time()
        events = list(host.events)
        updates = {
            name: [{"time": p["time"], **{k: p[k] for k in _UPDATE_FIELDS}} for p in points]
            for name, points in host.update_history.items()
            if points
        }
        registry = host.metrics.registry

        def counter(sample: str, model: str) -> int:
            return int(registry.get_sample_value(sample, {"model": model}) or 0)

        window = [e for e in events if e.kind == "score" and now - e.time <= _ACTIVITY_WINDOW_S]
        models_out = []
        for m in host.list_models():
            mine = [e for e in window if e.model == m.name]
            images = sum(int(e.data.get("images", 0)) for e in mine)
            means = [(e.data.get("mean"), int(e.data.get("images", 0))) for e in mine]
            means = [(v, n) for v, n in means if isinstance(v, (int, float)) and math.isfinite(v) and n > 0]
            last_score = max((e.time for e in events if e.kind == "score" and e.model == m.name), default=None)
            models_out.append(
                {
                    **m.__dict__,
                    "queue_depth": host.queue_depth(m.name),
                    "images_scored": counter("advgrpo_images_scored_total", m.name),
                    "updates": counter("advgrpo_discriminator_updates_total", m.name),
                    "health": host.watch.snapshot(m.name),
                    "activity": {
                        "window_s": _ACTIVITY_WINDOW_S,
                        "images": images,
                        "requests": len(mine),
                        "mean": sum(v * n for v, n in means) / sum(n for _, n in means) if means else None,
                        "last_score_time": last_score,
                    },
                    "last_update": updates[m.name][-1] if updates.get(m.name) else _restored(host, m.name),
                }
            )
        body = {
            "time": now,
            "started_at": host.started_at,
            "uptime_s": now - host.started_at,
            "ready": state.ready and not state.draining,
            "status": "draining" if state.draining else ("ready" if state.ready else "starting"),
            "auth_required": bool(tokens),
            "models": models_out,
            # --backend ray: the discriminator owner and every scoring replica (versions, processes).
            **({"ray": host.replica_report()} if hasattr(host, "replica_report") else {}),
            "updates": updates,
            "events": [_event_dict(e) for e in events[-_RECENT_EVENTS:]],
        }
        return JSONResponse(_finite(body))

    async def dashboard(request: Request) -> Response:
        try:
            page = _DASHBOARD.read_text(encoding="utf-8")
        except OSError:
            page = "<h1>advgrpo reward server</h1><p>dashboard.html is missing from this install.</p>"
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def score(host_, message):
        return await host_.score_message(message)

    async def update(host_, message):
        return await host_.update_message(message)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/v1/score", gateway(score, reward_pb2.ScoreRequest, "score"), methods=["POST"]),
        Route("/v1/update", gateway(update, reward_pb2.UpdateDiscriminatorRequest, "update"), methods=["POST"]),
        Route("/v1/stats", stats),
        Route("/dashboard", dashboard),
        Route("/", dashboard),
    ]
    return Starlette(routes=routes)


def _restored(host: ModelHost, name: str) -> dict | None:
    """The last update of a model restored from the state dir (no history in this process)."""
    outcome = host.last_update(name)
    if outcome is None:
        return None
    return {"time": None, **{k: getattr(outcome, k) for k in _UPDATE_FIELDS}}


def _event_dict(e: Event) -> dict:
    return {"time": e.time, "kind": e.kind, "model": e.model, "data": dict(e.data)}


def _finite(value):
    """JSON has no NaN/Infinity (Starlette refuses them): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
