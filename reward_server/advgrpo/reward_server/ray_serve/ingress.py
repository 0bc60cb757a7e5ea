"""The ingress deployment: our own grpc.aio front end and HTTP side, backed by Serve handles.

Ray 2.60's Serve gRPC proxy does carry bidirectional streams (``gRPCProxy.stream_stream``), but
it has no place for our interceptors (bearer-token scopes, the concurrency limit, per-RPC
metrics), no TLS, its own health service instead of ``grpc.health.v1``, and it deserialises
requests before any of our code runs (malformed bytes would come back UNKNOWN). So the ingress
is the single server's front end, unchanged, over ``RayHost``: a host that answers the same
calls by calling the model deployments.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import numpy as np
from prometheus_client import Gauge
from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, OwnerDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from advgrpo.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from advgrpo.common.results import ModelInfo, UpdateResult
from advgrpo.reward.v1 import reward_pb2
from advgrpo.reward_server.config import ServerConfig, build_config
from advgrpo.reward_server.host import (
    Event,
    _gather_or_cancel,
    check_groups,
    not_served,
    record_update,
    resolve_weights,
    weighted_rewards,
)
from advgrpo.reward_server.metrics import ServerMetrics
from advgrpo.reward_server.ray_serve import replies
from advgrpo.reward_server.score_watch import ScoreWatch
from advgrpo.reward_server.server import RewardServer

log = logging.getLogger("advgrpo.reward_server.ray")

BACKPRESSURE_RETRY_S = 0.1  # the hint with a refusal because every replica's queue is full
STATUS_POLL_S = 1.0  # how often the ingress asks the owner for versions and replica reports
OWNER_STATUS_TIMEOUT_S = 5.0  # a status call while the owner restarts: answer from what is known


class RayHost:
    """What the front end (servicer, HTTP gateway, dashboard) calls, answered by the deployments.

    ``scorers``: deployment name -> (handle, the models its replicas host); ``owner``: the
    discriminator owner's handle (None when no model is trainable)."""

    def __init__(self, config: ServerConfig, scorers: dict[str, tuple[Any, list[str]]], owner):
        self.config = config
        self.metrics = ServerMetrics()
        names = [m.name for m in config.models]
        self.watch = ScoreWatch(names, self.metrics)
        self.events: collections.deque[Event] = collections.deque(maxlen=500)
        self.update_history: dict[str, collections.deque[dict]] = {n: collections.deque(maxlen=2000) for n in names}
        self.started_at = time.time()
        self.shared_memory = None  # replicas may run on other hosts than the client's
        self._models = {m.name: m for m in config.models}
        self._scorers = {dep: handle for dep, (handle, _) in scorers.items()}
        self._deployment_of = {name: dep for dep, (_, models) in scorers.items() for name in models}
        self._owner = owner
        self._versions = dict.fromkeys(names, 0)
        self._last_update: dict[str, UpdateResult] = {}
        self._replicas: dict[str, dict] = {}
        self._owner_info: dict = {}
        self._status_task: asyncio.Task | None = None
        r = self.metrics.registry
        self._replica_version = Gauge(
            "advgrpo_ray_replica_version",
            "Version each scoring replica serves, by model (as last reported to the owner)",
            ["model", "replica"],
            registry=r,
        )
        self._replicas_behind = Gauge(
            "advgrpo_ray_replicas_behind",
            "Scoring replicas behind the owner's version, by model",
            ["model"],
            registry=r,
        )
        self._replica_count = Gauge("advgrpo_ray_replicas", "Scoring replicas reporting to the owner", registry=r)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._owner is not None:
            await self.refresh()
            self._status_task = asyncio.create_task(self._poll_status())
        self.metrics.ready.set(1)

    async def refresh(self) -> None:
        """Versions, last updates and replica reports from the owner."""
        status = await self._call_owner("status")
        for name, version in status["versions"].items():
            self._versions[name] = max(self._versions[name], version)
            self.metrics.model_version.labels(name).set(self._versions[name])
        for name, update in status["last_updates"].items():
            if update is not None and name not in self._last_update:
                self._last_update[name] = UpdateResult(**update)
        self._replicas = status["replicas"]
        self._owner_info = {**status["owner"], "versions": status["versions"], "published_at": status["published_at"]}
        self._replica_count.set(len(self._replicas))
        self._replica_version.clear()
        for name, version in status["versions"].items():
            behind = 0
            for replica, report in self._replicas.items():
                served = report["versions"].get(name)
                if served is not None:
                    self._replica_version.labels(name, replica).set(served)
                    behind += served < version
            self._replicas_behind.labels(name).set(behind)

    async def _poll_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_POLL_S)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the owner restarting: the next poll will do
                log.warning("status from the discriminator owner failed: %s", exc)

    async def close(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()

    # ------------------------------------------------------------------ queries (front end, dashboard)

    def model_names(self) -> list[str]:
        return list(self._models)

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(n, m.kind, m.trainable, self._versions[n], m.weight) for n, m in self._models.items()]

    async def describe_models(self) -> list[ModelInfo]:
        if self._owner is not None:
            try:  # the owner's versions, not the last ones this ingress saw
                await asyncio.wait_for(self.refresh(), OWNER_STATUS_TIMEOUT_S)
            except (asyncio.TimeoutError, Unavailable) as exc:  # restarting: the versions known here
                log.warning("ListModels: the discriminator owner did not answer (%r); versions as last known", exc)
        return self.list_models()

    def queue_depth(self, name: str) -> int:
        """Images waiting in the model's batchers, summed over the replicas' last reports."""
        return sum(r["queues"].get(name, 0) for r in self._replicas.values())

    def last_update(self, name: str) -> UpdateResult | None:
        return self._last_update.get(name)

    def replica_report(self) -> dict:
        """For /v1/stats: the owner (its versions, when each was published) and, per scoring
        replica, its deployment, process, the versions it serves and when it installed them."""
        return {"owner": self._owner_info, "replicas": self._replicas}

    async def run_decode(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    # ------------------------------------------------------------------ calls

    def _model(self, name: str, field: str):
        if not name:
            raise InvalidArgument(f"{field}: required (the name of a trainable model)")
        if name not in self._models:
            raise not_served(name, self._models)
        return self._models[name]

    async def score_message(self, request: reward_pb2.ScoreRequest, raw: bytes | None = None):
        # The single server's checks, in its order, before anything waits or is sent on.
        check_groups(self.config, request.groups, references=True)
        weights = resolve_weights(self.config, dict(request.weights))
        for name in request.min_versions:
            if name not in self._models:
                raise NotFound(
                    f"min_versions[{name!r}]: model {name!r} is not served here (models: {', '.join(self._models)})"
                )
        floor = self._read_your_writes(request, weights)
        request.min_versions.update(floor)  # the request's bytes stay as they came: the floor goes beside them
        by_deployment: dict[str, list[str]] = {}
        for name in weights:
            by_deployment.setdefault(self._deployment_of[name], []).append(name)
        # A model named in min_versions that does not score this request: its version must exist
        # (as on a single server, which waits for it all the same); the others wait in their replica.
        unscored = {n: v for n, v in request.min_versions.items() if n not in weights and v > 0}
        if unscored:
            await self._await_published(unscored)
        whole = len(by_deployment) == 1 and all(self._deployment_of[n] in by_deployment for n in request.min_versions)
        if whole:  # the request as it came: one deployment hosts every model it names
            (deployment,) = by_deployment
            payload = raw if raw is not None else request.SerializeToString()
            response = reward_pb2.ScoreResponse.FromString(await self._call_scorer(deployment, payload, floor))
        else:
            # The request again as protobuf (the front end's parse keeps pixels as views, for a
            # single-process host): each deployment gets its groups with its own models' fields.
            groups = (reward_pb2.ScoreRequest.FromString(raw) if raw is not None else request).groups
            parts = [self._part(groups, request.min_versions, weights, names) for names in by_deployment.values()]
            answers = await _gather_or_cancel(
                [self._call_scorer(dep, part) for dep, part in zip(by_deployment, parts, strict=True)]
            )
            response = _combine(weights, [reward_pb2.ScoreResponse.FromString(a) for a in answers])
        self._record_scores(weights, response)
        return response

    async def _await_published(self, required: dict[str, int]) -> None:
        wait_s = self.config.server.min_version_wait_s
        for name, version in required.items():
            if version <= self._versions[name]:
                continue
            if not self._models[name].trainable or self._owner is None:
                raise FailedPrecondition(
                    f"min_versions[{name!r}]: version {version} required, but model {name!r} is not trainable and "
                    f"serves version {self._versions[name]} for good"
                )
            try:
                have = await asyncio.wait_for(
                    self._remote(self._owner.wait_published, "DiscriminatorOwner", name, version, wait_s), wait_s + 5
                )
            except asyncio.TimeoutError:
                raise Unavailable(
                    f"min_versions[{name!r}]: the discriminator's owner did not answer in {wait_s:g} s; retry",
                    retry_after_s=1.0,
                ) from None
            self._versions[name] = max(self._versions[name], have)
            if have < version:
                raise FailedPrecondition(
                    f"min_versions[{name!r}]: version {version} required, but the discriminator's owner has version "
                    f"{have} after waiting {wait_s:g} s (server.min_version_wait_s); update the discriminator first"
                )

    def _read_your_writes(self, request: reward_pb2.ScoreRequest, weights: dict[str, float]) -> dict[str, int]:
        """The versions this ingress knows to be acknowledged, for the trainable models that
        score ``request``, where they are above what it asks for: a score that starts after an
        update's acknowledgement is scored by that version or a newer one, as in the single
        server, even on a replica that has not caught up yet (it fetches the version first)."""
        floor = {}
        for name in weights:
            known = self._versions[name] if self._models[name].trainable else 0
            if known > request.min_versions.get(name, 0):
                floor[name] = known
        return floor

    def _part(self, groups, min_versions, weights: dict[str, float], names: list[str]) -> bytes:
        """The request for one deployment: its models' weights and min_versions only."""
        part = reward_pb2.ScoreRequest()
        part.groups.extend(groups)
        for name in names:
            part.weights[name] = weights[name]
            if name in min_versions:  # only its own models: the replica hosts no other
                part.min_versions[name] = min_versions[name]
        return part.SerializeToString()

    async def update_message(self, request: reward_pb2.UpdateDiscriminatorRequest, raw: bytes | None = None):
        cfg = self._model(request.model, "model")
        if not cfg.trainable or self._owner is None:
            raise FailedPrecondition(f"model {request.model!r} is not trainable")
        payload = raw if raw is not None else request.SerializeToString()
        response = reward_pb2.UpdateDiscriminatorResponse.FromString(await self._call_owner("update", payload))
        if not response.replayed:
            self._record_update(response)
        return response

    async def _call_scorer(self, deployment: str, payload: bytes, floor: dict[str, int] | None = None) -> bytes:
        return replies.unwrap(await self._remote(self._scorers[deployment].score, deployment, payload, floor or {}))

    async def _call_owner(self, method: str, *args):
        reply = await self._remote(getattr(self._owner, method), "DiscriminatorOwner", *args)
        return replies.unwrap(reply) if method == "update" else reply

    async def _remote(self, method, deployment: str, *args):
        try:
            return await method.remote(*args)
        except BackPressureError:
            raise ResourceExhausted(
                f"deployment {deployment}: every replica is busy and its queue is full "
                "(ray.deployments.*.max_queued_requests); retry later",
                retry_after_s=BACKPRESSURE_RETRY_S,
            ) from None
        except (
            ActorDiedError,
            ActorUnavailableError,
            RayActorError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
            ObjectLostError,
            OwnerDiedError,
        ) as exc:
            raise Unavailable(f"deployment {deployment}: a replica is down ({type(exc).__name__}); retry") from None

    # ------------------------------------------------------------------ bookkeeping (as ModelHost does)

    def _record_scores(self, weights: dict[str, float], response: reward_pb2.ScoreResponse) -> None:
        now = time.time()
        for name in weights:
            per_group = [list(g.components[name].values) for g in response.groups]
            self.watch.request_scored(name, per_group)
            flat = [v for g in per_group for v in g]
            self.metrics.images_scored.labels(name).inc(len(flat))
            self.events.append(
                Event(now, "score", name, {"images": len(flat), "mean": float(np.mean(flat)) if flat else float("nan")})
            )
            for g in response.groups:
                if name in g.model_versions and g.model_versions[name] > self._versions[name]:
                    self._versions[name] = g.model_versions[name]

    def _record_update(self, r: reward_pb2.UpdateDiscriminatorResponse) -> None:
        outcome = UpdateResult(r.model, r.version, r.loss, r.reference_score, r.generated_score, r.accuracy)
        self._versions[r.model] = max(self._versions[r.model], r.version)
        self._last_update[r.model] = outcome
        record_update(self.metrics, self.events, self.update_history, outcome)


def _combine(weights: dict[str, float], parts: list[reward_pb2.ScoreResponse]) -> reward_pb2.ScoreResponse:
    """One response from the deployments' answers for the same groups: their components and
    versions side by side, the rewards summed again from the components (as a single server does)."""
    out = reward_pb2.ScoreResponse()
    for i, groups in enumerate(zip(*(p.groups for p in parts), strict=True)):
        g = out.groups.add(group_id=groups[0].group_id)
        components = {}
        for part in groups:
            for name, values in part.components.items():
                components[name] = list(values.values)
                g.components[name].values.extend(values.values)
            for name, version in part.model_versions.items():
                g.model_versions[name] = version
        g.rewards.extend(weighted_rewards(weights, components, i, g.group_id))
    return out


class RewardIngress:
    """One replica: the single server's front end over a ``RayHost``; ``--port`` and
    ``--http-port`` are on the node it runs on."""

    async def __init__(self, config_map: dict[str, Any], scorers: dict[str, tuple[Any, list[str]]], owner=None):
        self._stopped = False
        config = build_config(config_map)
        self.host = RayHost(config, scorers, owner)
        await self.host.start()
        self.server = RewardServer(config, host=self.host)
        await self.server.start()
        self.info = self.server.ready_info()
        log.info("ingress serving gRPC on %s", self.info["grpc"])

    async def ready_info(self) -> dict:
        return self.info

    async def drain(self) -> None:
        """Stop as a single server does on SIGTERM: NOT_SERVING, then finish what is in flight."""
        if not self._stopped:
            self._stopped = True
            await self.server.stop()

    async def __del__(self):
        await self.drain()
