"""The model-hosting deployments: scoring replicas and the discriminator owner.

Versions flow one way. The owner applies an update (durable before it is acknowledged, as in the
single server), then puts the new state into Ray's object store once, as checksummed safetensors
bytes. Each scoring replica keeps one long poll open to the owner per trainable model; when it
returns a newer version the replica fetches the state from the object store and installs it
between two batches (the batcher's barrier), so a request is always scored by one version. A
request whose ``min_versions`` the replica cannot meet yet makes it fetch that version at once
(``catch_up``), or fails with FAILED_PRECONDITION after ``server.min_version_wait_s``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import serve

from advgrpo.common.errors import FailedPrecondition, RewardError, Unavailable
from advgrpo.reward.v1 import reward_pb2
from advgrpo.reward_server import convert, wire
from advgrpo.reward_server.config import ServerConfig, build_config
from advgrpo.reward_server.host import ModelHost
from advgrpo.reward_server.ray_serve import replies
from advgrpo.reward_server.server import check_device
from advgrpo.reward_server.state import VERSION_KEY, state_from_bytes, state_to_bytes

log = logging.getLogger("advgrpo.reward_server.ray")

OWNER = "DiscriminatorOwner"
# A call to the owner waits at most its own timeout plus this: while the owner restarts, a Serve
# handle call would wait for it without limit.
OWNER_CALL_MARGIN_S = 5.0


def hosted_config(config_map: dict[str, Any], models: list[str], *, durable: bool) -> ServerConfig:
    """The config of a model-hosting replica: only ``models``; no front end (the ingress has it:
    no tokens, ports or TLS here); the state dir only for the owner (``durable``); shared memory
    off (a client's segments are on the ingress's host, not necessarily on this one)."""
    data = copy.deepcopy(config_map)
    data["models"] = {name: spec for name, spec in data["models"].items() if name in models}
    data["ray"] = {}
    server = data["server"]
    for key in ("auth_token", "tokens_file", "tokens", "tls_cert", "tls_key", "tls_client_ca"):
        server[key] = None
    server.update(host="127.0.0.1", http_port=None, shared_memory=False)
    if not durable:
        server["state_dir"] = None
    return build_config(data)


def _load_host(config: ServerConfig) -> ModelHost:
    if config.server.torch_threads:  # else Ray's OMP_NUM_THREADS: the replica's num_cpus
        torch.set_num_threads(config.server.torch_threads)
    return ModelHost.from_config(config, check_device(config.server.device))


def replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


@dataclass
class _Published:
    version: int
    ref: ray.ObjectRef
    at: float  # time.time() when it was published (the update's acknowledgement)


class DiscriminatorOwner:
    """Hosts the trainable models, applies every update and makes it durable; publishes versions."""

    async def __init__(self, config_map: dict[str, Any], models: list[str], poll_s: float):
        self.config = hosted_config(config_map, models, durable=True)
        self.poll_s = poll_s
        self.host = await asyncio.to_thread(_load_host, self.config)
        self._published: dict[str, _Published] = {}
        self._changed = asyncio.Condition()
        # (model, replica) -> what the replica last told us (its version, when, its queue).
        self._replicas: dict[str, dict] = {}  # replica id -> its last report
        for name in models:
            await self._publish(name)
        log.info("discriminator owner ready: %s", {n: p.version for n, p in self._published.items()})

    async def _publish(self, name: str) -> None:
        version, tensors, meta = await self.host.snapshot_state(name)
        current = self._published.get(name)
        if current is not None and current.version >= version:
            return
        data = await asyncio.to_thread(state_to_bytes, tensors, {**meta, VERSION_KEY: str(version)})
        ref = ray.put(data)
        async with self._changed:
            current = self._published.get(name)  # again: a concurrent update may have published a newer one
            if current is not None and current.version >= version:
                return
            self._published[name] = _Published(version, ref, time.time())
            self._changed.notify_all()

    async def update(self, raw: bytes) -> replies.Reply:
        try:
            request = wire.parse(reward_pb2.UpdateDiscriminatorRequest, raw)
            response = await convert.update(self.host, request)
        except RewardError as exc:
            return replies.refused(exc)
        try:
            await self._publish(request.model)  # before the acknowledgement: a replica can fetch it at once
        except Exception as exc:  # durable but not published: a retry with its update_id publishes it
            log.exception("publishing %s failed", request.model)
            return replies.refused(
                Unavailable(
                    f"model {request.model!r}: the update is durable but was not published to the replicas ({exc}); "
                    "resend it with the same update_id",
                    retry_after_s=0.5,
                )
            )
        return replies.ok(response.SerializeToString())

    async def report(self, replica: str, report: dict) -> None:
        """A replica's versions and queues (``ScoringReplica.report``), for status()."""
        self._replicas[replica] = {**report, "seen": time.time()}

    async def wait_version(
        self, name: str, replica: str, have: int, until_above: int, report: dict, timeout_s: float
    ) -> tuple[int, list | None]:
        """A replica's long poll: returns when the published version of ``name`` is above
        ``until_above`` or after ``timeout_s``: (that version, [state ref] if newer than ``have``).
        The call also records the replica's ``report`` for status()."""
        await self.report(replica, report)
        if name not in self._published:
            return -1, None  # not a model of this owner (a replica's config differs): nothing to follow
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._published[name].version > until_above), timeout_s
                )
            except asyncio.TimeoutError:
                pass
            p = self._published[name]
        return p.version, ([p.ref] if p.version > have else None)

    async def wait_published(self, name: str, at_least: int, timeout_s: float) -> int:
        """The published version of ``name`` once it is ``at_least`` (or after ``timeout_s``)."""
        if name not in self._published:
            return -1
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._published[name].version >= at_least), timeout_s
                )
            except asyncio.TimeoutError:
                pass
            return self._published[name].version

    async def status(self) -> dict:
        """Published versions, and each replica's last report (a replica reports at least every
        ray.sync_poll_s; one silent for three of those is left out)."""
        now, stale = time.time(), 3 * self.poll_s
        for replica, r in list(self._replicas.items()):
            if now - r["seen"] > stale:
                del self._replicas[replica]
        return {
            "versions": {n: p.version for n, p in self._published.items()},
            "published_at": {n: p.at for n, p in self._published.items()},
            "last_updates": {
                n: (u.__dict__ if (u := self.host.last_update(n)) is not None else None) for n in self._published
            },
            "replicas": dict(self._replicas),
            "owner": {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()},
        }

    async def __del__(self):
        await self.host.close()


class ScoringReplica:
    """Hosts some models (``ray.deployments``) and scores; follows the owner's versions of the
    trainable ones."""

    async def __init__(
        self, config_map: dict[str, Any], models: list[str], deployment: str, owner=None, poll_s: float = 5.0
    ):
        self.config = hosted_config(config_map, models, durable=False)
        self.host = await asyncio.to_thread(_load_host, self.config)
        self.id = replica_id()
        self.deployment = deployment
        self.poll_s = poll_s
        self.owner = owner
        self.trainable = [m.name for m in self.config.models if m.trainable] if owner is not None else []
        self.installed_at: dict[str, float] = {}
        self._followers: dict[str, asyncio.Task] = {}
        self._diverged: str | None = None  # set when the owner publishes below what this replica serves
        if self.trainable:
            self.host.catch_up = self.catch_up
            # Serve the owner's current versions before taking requests (a restarted replica
            # comes back at the current version, not at its initial weights).
            for name in self.trainable:
                await self._sync(name, until_above=-1, timeout_s=0)
                self._followers[name] = asyncio.create_task(self._follow(name))
        elif owner is not None:  # nothing to follow: report queues to the owner all the same
            self._followers["report"] = asyncio.create_task(self._report_loop())
        log.info("scoring replica %s ready: %s", self.id, {m.name: m.version for m in self.host.list_models()})

    def _version(self, name: str) -> int:
        return self.host.trainable_model(name).model.version

    async def _sync(self, name: str, until_above: int, timeout_s: float) -> int:
        """One poll of the owner; installs what it returns if newer. Returns the owner's version."""
        have = self._version(name)
        version, refs = await asyncio.wait_for(
            self.owner.wait_version.remote(name, self.id, have, until_above, self.report(), timeout_s),
            timeout_s + OWNER_CALL_MARGIN_S,  # the owner restarting: a handle call would wait for it
        )
        if 0 <= version < have:
            # An owner that lost its state (restarted elsewhere without it): its versions no longer
            # name these weights. Fail health: Serve replaces this replica, which then serves the
            # owner's state; scores asking for the lost versions fail, never silently use others.
            self._diverged = f"the owner publishes {name} version {version}, below the {have} served here"
        if refs and version > self._version(name):
            data = await refs[0]
            tensors, meta = await asyncio.to_thread(
                state_from_bytes, data, f"model {name!r} version {version} from the discriminator owner"
            )
            if await self.host.install_state(name, version, tensors, meta):
                self.installed_at[name] = time.time()
                log.info("replica %s: model %s now at version %d", self.id, name, version)
        return version

    def report(self) -> dict:
        models = [m.name for m in self.config.models]
        return {
            "deployment": self.deployment,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "versions": {m.name: m.version for m in self.host.list_models()},
            "queues": {n: self.host.queue_depth(n) for n in models},
            "installed_at": dict(self.installed_at),
        }

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.owner.report.remote(self.id, self.report())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("replica %s: report to the owner failed (%s)", self.id, exc)
            await asyncio.sleep(self.poll_s)

    async def _follow(self, name: str) -> None:
        backoff = 0.1
        while True:
            try:
                if await self._sync(name, until_above=self._version(name), timeout_s=self.poll_s) < 0:
                    await asyncio.sleep(self.poll_s)  # the owner does not host it: nothing to follow
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the owner restarting, a lost object: poll again soon
                log.warning("replica %s: following %s failed (%s); retrying in %.1fs", self.id, name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)

    async def catch_up(self, name: str, required: int, timeout_s: float) -> None:
        """ModelHost's hook for ``min_versions``: fetch ``required`` (or newer) from the owner now,
        waiting for the owner to have it at most ``timeout_s``. FAILED_PRECONDITION when the owner
        answered without it; UNAVAILABLE (retry) when the owner could not be reached."""
        if name not in self.trainable:  # the host refuses these before asking; a guard
            raise FailedPrecondition(f"min_versions[{name!r}]: model {name!r} is not trainable")
        deadline = time.monotonic() + timeout_s
        owner_version, failure = None, None
        while self._version(name) < required:  # the follower may install it meanwhile
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # No lock: concurrent catch-ups each ask the owner; installing is idempotent (newer only).
            try:
                owner_version = await self._sync(name, until_above=required - 1, timeout_s=left)
                failure = None
            except RewardError:
                raise
            except Exception as exc:  # the owner is restarting, an object was lost: again until the deadline
                failure = exc
                log.warning("replica %s: catching up %s failed (%r)", self.id, name, exc)
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        have = self._version(name)
        if have >= required:
            return
        if owner_version is None:
            raise Unavailable(
                f"min_versions[{name!r}]: version {required} required, this replica serves version {have}, and the "
                f"discriminator's owner could not be reached in {timeout_s:g} s ({failure!r}); retry",
                retry_after_s=1.0,
            )
        raise FailedPrecondition(
            f"min_versions[{name!r}]: version {required} required, but this replica serves version {have} and "
            f"the discriminator's owner has version {owner_version} after waiting {timeout_s:g} s "
            "(server.min_version_wait_s); update the discriminator first"
        )

    async def score(self, raw: bytes, floor: dict[str, int]) -> replies.Reply:
        """``raw``: the ScoreRequest's bytes; ``floor``: versions the ingress knows acknowledged,
        raised into its min_versions here (no copy of the request's bytes to add them)."""
        try:
            request = wire.parse(reward_pb2.ScoreRequest, raw)
            for name, version in floor.items():
                request.min_versions[name] = max(request.min_versions.get(name, 0), version)
            response = await convert.score(self.host, request)
        except RewardError as exc:
            return replies.refused(exc)
        return replies.ok(response.SerializeToString())

    async def versions(self) -> dict[str, int]:
        return {m.name: m.version for m in self.host.list_models()}

    async def check_health(self) -> None:
        if self._diverged is not None:
            raise RuntimeError(self._diverged)
        for name, task in self._followers.items():
            if task.done():
                raise RuntimeError(f"the follower of {name} stopped: {task.exception()!r}")

    async def __del__(self):
        for task in self._followers.values():
            task.cancel()
        await self.host.close()
