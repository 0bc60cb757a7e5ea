"""The model host: models, their batchers and executors, durable state, and the request logic.

Everything the gRPC servicer and the HTTP gateway do goes through here, so both behave the same.
Each model owns a single-thread executor: scoring batches and discriminator updates of one model
are serialised on it (never concurrent, never on the event loop), while different models run
side by side.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np

from advgrpo.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    ModelFailed,
    NotFound,
    ResourceExhausted,
)
from advgrpo.common.results import GroupScore, ModelInfo, UpdateResult
from advgrpo.common.shared_memory import SharedMemoryReader
from advgrpo.reward_server.batching import BatchStats, DynamicBatcher
from advgrpo.reward_server.config import ModelConfig, ServerConfig
from advgrpo.reward_server.metrics import ServerMetrics
from advgrpo.reward_server.models import References, RewardModel, TrainableRewardModel, build_model
from advgrpo.reward_server.score_watch import ScoreWatch
from advgrpo.reward_server.state import FINGERPRINT_KEY, VERSION_KEY, StateStore

log = logging.getLogger(__name__)

UPDATE_ID_KEY = "update_id"
UPDATE_RESULT_KEY = "update_result"


@dataclass
class GroupInput:
    group_id: str
    prompt: str
    images: list[np.ndarray]  # uint8 [H, W, 3]
    # The prompt's reference images (ImageGroup.references), for models that compare against them.
    references: list[np.ndarray] = field(default_factory=list)


@dataclass
class _Hosted:
    config: ModelConfig
    model: RewardModel
    executor: ThreadPoolExecutor
    batcher: DynamicBatcher
    last_update_id: str = ""
    last_update: UpdateResult | None = None


@dataclass
class Event:
    """A recent happening, for the dashboard."""

    time: float
    kind: str  # "score" | "update"
    model: str
    data: dict = field(default_factory=dict)


class DecodedBytesBudget:
    """The server-wide budget of decoded image bytes in flight (``server.max_inflight_decoded_bytes``):
    every request holds its images' height*width*3 (plus PNG/JPEG bytes read from shared memory)
    from before decoding until it is answered, so concurrent requests cannot together decode more
    than the budget. Thread-safe: requests are decoded in the decode pool and on the event loop."""

    RETRY_AFTER_S = 0.1  # the hint sent with a refusal: about one model call

    def __init__(self, limit: int, gauge=None):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()
        self._gauge = gauge

    def take(self, n: int, images: int) -> None:
        with self._lock:
            held = self.held
            if held + n <= self.limit:
                self._set(held + n)
                return
        raise ResourceExhausted(
            f"server busy: the request's {images} images need {n} bytes decoded, and requests in flight "
            f"hold {held} of server.max_inflight_decoded_bytes = {self.limit}; retry later",
            retry_after_s=self.RETRY_AFTER_S,
        )

    def give_back(self, n: int) -> None:
        with self._lock:
            self._set(self.held - n)

    def _set(self, held: int) -> None:
        self.held = held
        if self._gauge is not None:
            self._gauge.set(held)


class DecodedBytesTicket:
    """One request's share of a ``DecodedBytesBudget``, given back once.

    ``take`` may run in the decode pool after the request was cancelled and ``release``d on the
    event loop; it then takes nothing (a share taken after its release would never come back)."""

    def __init__(self, budget: DecodedBytesBudget):
        self._budget = budget
        self._held = 0
        self._released = False
        self._lock = threading.Lock()

    def take(self, n: int, images: int) -> None:
        with self._lock:
            if self._released:
                raise RuntimeError("the request ended before its images were decoded")
            self._budget.take(n, images)
            self._held = n

    def release(self) -> None:
        with self._lock:
            self._released = True
            held, self._held = self._held, 0
        if held:
            self._budget.give_back(held)


class ModelHost:
    def __init__(self, config: ServerConfig, models: dict[str, RewardModel], metrics: ServerMetrics | None = None):
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.decoded_bytes = DecodedBytesBudget(
            config.server.max_inflight_decoded_bytes, self.metrics.inflight_decoded_bytes
        )
        self.store = StateStore(config.server.state_dir) if config.server.state_dir else None
        self.events: collections.deque[Event] = collections.deque(maxlen=500)
        # Discriminator curves for the dashboard: kept apart from the busy event stream.
        self.update_history: dict[str, collections.deque[dict]] = {
            m.name: collections.deque(maxlen=2000) for m in config.models
        }
        self.started_at = time.time()
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        # Image bytes from clients on this host, through /dev/shm (see shared_memory.py).
        self.shared_memory = SharedMemoryReader() if config.server.shared_memory else None
        self.watch = ScoreWatch([m.name for m in config.models], self.metrics)
        # Requests waiting in ``catch_up`` for a model's version to rise (``min_versions``): each
        # is woken after every version change and looks again. Futures of the running loop, not
        # one asyncio.Condition, so that the host may serve one event loop after another.
        self._version_waiters: set[asyncio.Future] = set()
        self._hosted: dict[str, _Hosted] = {}
        for cfg in config.models:
            model = models[cfg.name]
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{cfg.name}")
            batcher = DynamicBatcher(
                self._batch_fn(cfg.name, model),
                executor=executor,
                max_batch_size=cfg.batching.max_batch_size,
                max_delay_s=cfg.batching.max_delay_ms / 1000.0,
                max_queue_items=cfg.batching.max_queue_images,
                enabled=cfg.batching.enabled,
                name=cfg.name,
                on_batch=self._on_batch(cfg.name),
            )
            self._hosted[cfg.name] = _Hosted(cfg, model, executor, batcher)
        for h in self._hosted.values():
            self._restore(h)
            self.metrics.model_version.labels(h.config.name).set(h.model.version)
            self._record_stats(h.config.name, h.model)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: ServerConfig, device: str = "cpu", warmup: bool = True) -> "ModelHost":
        """Loads every configured model, restores durable state, and proves each model runs."""
        models: dict[str, RewardModel] = {}
        for cfg in config.models:
            t0 = time.perf_counter()
            models[cfg.name] = build_model(cfg, device=device)
            log.info("loaded model %s (%s) in %.1fs", cfg.name, cfg.kind, time.perf_counter() - t0)
        host = cls(config, models)
        if warmup:
            for name, model in models.items():
                model.warmup()
                host._record_stats(name, model)
                log.info("model %s warm-up ok (version %d)", name, model.version)
        host.metrics.ready.set(1)
        return host

    def _restore(self, h: _Hosted) -> None:
        model = h.model
        if self.store is None or not isinstance(model, TrainableRewardModel) or not model.trainable:
            return
        saved = self.store.load(h.config.name)
        if saved is None:
            return
        tensors, meta = saved
        path = self.store.path(h.config.name)
        if meta.get(FINGERPRINT_KEY) != model.fingerprint():
            raise ConfigError(
                f"{path}: state belongs to model {meta.get(FINGERPRINT_KEY)!r}, but {h.config.name!r} is "
                f"{model.fingerprint()!r}; use another --state-dir or remove the file"
            )
        model.import_state(tensors, meta)
        model.version = int(meta[VERSION_KEY])
        h.last_update_id = meta.get(UPDATE_ID_KEY, "")
        if meta.get(UPDATE_RESULT_KEY):
            vals = [float(v) for v in meta[UPDATE_RESULT_KEY].split(",")]
            h.last_update = UpdateResult(h.config.name, model.version, *vals)
        log.info("restored %s at version %d from %s", h.config.name, model.version, path)

    # ------------------------------------------------------------------ queries

    def model_names(self) -> list[str]:
        return list(self._hosted)

    def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo(name, h.config.kind, bool(h.model.trainable), h.model.version, h.config.weight)
            for name, h in self._hosted.items()
        ]

    def queue_depth(self, name: str) -> int:
        """Images waiting in the model's batcher (for the dashboard and the ready line)."""
        return self._get(name).batcher.queue_depth

    def last_update(self, name: str) -> UpdateResult | None:
        """The model's last acknowledged update (also one restored from the state dir)."""
        return self._get(name).last_update

    def _get(self, name: str) -> _Hosted:
        try:
            return self._hosted[name]
        except KeyError:
            raise not_served(name, self._hosted) from None

    def resolve_weights(self, weights: dict[str, float]) -> dict[str, float]:
        return resolve_weights(self.config, weights)

    # ------------------------------------------------------------------ scoring

    def check_groups(self, groups: Sequence, field_name: str = "groups", references: bool = False) -> None:
        check_groups(self.config, groups, field_name, references)

    def check_references(self, groups: Sequence, weights: dict[str, float]) -> None:
        """Every group has references if a model of ``weights`` (resolved: named with any weight, or
        the default spec) compares against them; works on GroupInput and wire ImageGroup alike."""
        users = [name for name in weights if self._hosted[name].model.uses_references]
        if not users:
            return
        for i, g in enumerate(groups):
            if not g.references:
                raise InvalidArgument(
                    f"groups[{i}].references (group_id {g.group_id!r}): none, but model {users[0]!r} compares "
                    f"each image with its group's reference images; send the prompt's references with the group"
                )

    def check_decoded_bytes(self, total: int, images: int) -> None:
        """The request-wide budget: ``total`` is height*width*3 summed over its ``images`` (plus the
        PNG/JPEG bytes read from shared memory), known before any image is decoded or copied."""
        limit = self.config.server.max_request_decoded_bytes
        if total > limit:
            raise ResourceExhausted(
                f"the request's {images} images need {total} bytes decoded (height*width*3 each, plus "
                f"PNG/JPEG bytes read from shared memory), over server.max_request_decoded_bytes = {limit}; "
                f"send fewer or smaller images per request"
            )

    @contextlib.contextmanager
    def decoded_bytes_held(self) -> Iterator[DecodedBytesTicket]:
        """For one request's lifetime (decoding and scoring): what it takes of the server-wide
        decoded-bytes budget (``DecodedBytesTicket.take``) is given back when the block ends."""
        ticket = DecodedBytesTicket(self.decoded_bytes)
        try:
            yield ticket
        finally:
            ticket.release()

    async def score(
        self,
        groups: Sequence[GroupInput],
        weights: dict[str, float],
        min_versions: Mapping[str, int] | None = None,
    ) -> list[GroupScore]:
        """Scores ``groups`` with ``weights`` (empty: the default spec). ``min_versions`` (model ->
        least version, ScoreRequest.min_versions): scored with at least those versions, waiting
        for them first (``reach_min_versions``; the front ends wait before decoding, so that this
        wait is then already over)."""
        weights = self.resolve_weights(weights)
        self.check_groups(groups, references=True)
        self.check_references(groups, weights)
        required = await self.reach_min_versions(min_versions)
        where = [f"groups[{i}] (group_id {g.group_id!r})" for i, g in enumerate(groups)]
        for name in weights:
            self._hosted[name].model.validate([g.prompt for g in groups], where)
        # One References per group, shared by its images (models that use them embed each set once).
        items = []
        for g in groups:
            refs = References(g.references) if g.references else None
            items += [(img, g.prompt, refs) for img in g.images]
        per_model = await _gather_or_cancel([self._hosted[name].batcher.submit(items) for name in weights])
        self._check_finite(groups, weights, per_model)
        self._check_versions(weights, per_model, required)
        results: list[GroupScore] = []
        offset = 0
        for g in groups:
            n = len(g.images)
            components, versions = {}, {}
            for name, scored in zip(weights, per_model, strict=True):
                chunk = scored[offset : offset + n]
                components[name] = [s for s, _ in chunk]
                # A request is enqueued whole and updates run between batches, so one group is
                # scored by one version; max() guards the report should that ever change.
                versions[name] = max(v for _, v in chunk)
            rewards = weighted_rewards(weights, components, len(results), g.group_id)
            results.append(GroupScore(g.group_id, rewards, components, versions))
            offset += n
        now = time.time()
        for name, scored in zip(weights, per_model, strict=True):
            self.watch.request_scored(name, [r.components[name] for r in results])
            self.metrics.images_scored.labels(name).inc(len(items))
            mean = float(np.mean([s for s, _ in scored])) if scored else float("nan")
            self.events.append(Event(now, "score", name, {"images": len(items), "mean": mean}))
        return results

    def _check_finite(self, groups: Sequence[GroupInput], weights: dict[str, float], per_model) -> None:
        """A NaN or infinite score fails the request, naming the model and the image: it is never
        turned into a reward (not even with weight 0, which would hide it)."""
        for name, scored in zip(weights, per_model, strict=True):
            offset = 0
            for i, g in enumerate(groups):
                for j in range(len(g.images)):
                    value = scored[offset + j][0]
                    if not math.isfinite(value):
                        raise ModelFailed(
                            f"model {name!r} scored groups[{i}].images[{j}] (group_id {g.group_id!r}) {value}: "
                            "no reward is sent for this request"
                        )
                offset += len(g.images)

    def _check_versions(self, weights: dict[str, float], per_model, required: dict[str, int]) -> None:
        """No score below a version ``min_versions`` asked for is sent. Updates only raise a version
        and the request was enqueued once every version was reached, so this never fires; it
        guards the rule should that ever change."""
        for name, scored in zip(weights, per_model, strict=True):
            if name in required and scored:
                lowest = min(v for _, v in scored)
                if lowest < required[name]:
                    raise FailedPrecondition(
                        f"min_versions[{name!r}]: version {required[name]} required, but model {name!r} scored this "
                        f"request with version {lowest}; no reward is sent for it"
                    )

    # ------------------------------------------------------------------ the consistency rule: min_versions

    def check_min_versions(self, min_versions: Mapping[str, int] | None) -> dict[str, int]:
        """A request's ``min_versions`` (model -> least version), checked before any waiting or
        decoding: every name a served model (NOT_FOUND), every version an int >= 0 (the wire's
        uint64 always is; INVALID_ARGUMENT for a direct caller's), and a model that cannot be
        trained already at least there (FAILED_PRECONDITION at once: no update will raise it)."""
        required: dict[str, int] = {}
        for name, version in (min_versions or {}).items():
            field_name = f"min_versions[{name!r}]"
            if name not in self._hosted:
                raise NotFound(f"{field_name}: model {name!r} is not served here (models: {', '.join(self._hosted)})")
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise InvalidArgument(f"{field_name}: a version is an integer >= 0, got {version!r}")
            model = self._hosted[name].model
            trainable = isinstance(model, TrainableRewardModel) and model.trainable
            if not trainable and model.version < version:
                raise FailedPrecondition(
                    f"{field_name}: version {version} required, but model {name!r} is not trainable and serves "
                    f"version {model.version} for good"
                )
            required[name] = version
        return required

    async def reach_min_versions(self, min_versions: Mapping[str, int] | None) -> dict[str, int]:
        """Checks ``min_versions`` (``check_min_versions``), then awaits ``catch_up`` for each model
        serving a version below its minimum, all within one ``server.min_version_wait_s``. Returns
        the checked minimums; costs nothing when every model is there already. Once it returns,
        a request scored from here on sees those versions or newer (a version only rises, and
        a request is scored by one version per model: the batcher's barrier)."""
        required = self.check_min_versions(min_versions)
        wait_s = self.config.server.min_version_wait_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        for name, version in required.items():
            model = self._hosted[name].model
            if model.version >= version:
                continue
            log.debug("a request waits for version %d of %s (serving %d)", version, name, model.version)
            await self.catch_up(name, version, max(0.0, deadline - loop.time()))
            if model.version < version:  # a replaced hook that returned without it
                raise FailedPrecondition(
                    f"min_versions[{name!r}]: version {version} required, but model {name!r} serves version "
                    f"{model.version} after waiting {wait_s:g} s (server.min_version_wait_s)"
                )
        return required

    async def catch_up(self, name: str, required: int, timeout_s: float) -> None:
        """The hook ``min_versions`` calls for a trainable model ``name`` serving a version below
        ``required``: returns once it serves ``required`` or newer, or raises FailedPrecondition
        after ``timeout_s`` (what is left of ``server.min_version_wait_s``).

        This default waits for an UpdateDiscriminator of this host to raise the version (woken
        after each acknowledged update). Another backend replaces it with a coroutine function of
        the same signature, either by assigning the instance's attribute
        (``host.catch_up = replica.catch_up``) or by overriding it in a subclass: a scoring replica
        of the Ray backend replaces this with a fetch from the discriminator's owner
        (advgrpo.reward_server.ray_serve.replica)."""
        model = self._hosted[name].model
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while model.version < required:
            left = deadline - loop.time()
            if left <= 0:
                break
            woken = loop.create_future()
            self._version_waiters.add(woken)
            try:
                await asyncio.wait_for(woken, left)
            except TimeoutError:
                break
            finally:
                self._version_waiters.discard(woken)
        if model.version < required:
            raise FailedPrecondition(
                f"min_versions[{name!r}]: version {required} required, but model {name!r} serves version "
                f"{model.version} after waiting {timeout_s:g} s (server.min_version_wait_s); update the "
                "discriminator first"
            )

    def _version_raised(self) -> None:
        """Wakes every ``catch_up`` waiting: a model's version has just risen."""
        for woken in list(self._version_waiters):
            if not woken.done():
                woken.set_result(None)

    def _batch_fn(self, name: str, model: RewardModel):
        def run(items: list[tuple[np.ndarray, str, References | None]]) -> list[tuple[float, int]]:
            try:
                if model.uses_references:
                    scores = model.score_against([img for img, _, _ in items], [r for _, _, r in items])
                else:
                    scores = model.score([img for img, _, _ in items], [p for _, p, _ in items])
                scores = [float(s) for s in scores]
                if len(scores) != len(items):
                    raise RuntimeError(f"model {name!r} returned {len(scores)} scores for {len(items)} images")
            except BaseException:
                self.watch.batch_failed(name)
                raise
            finally:
                self._record_stats(name, model)
            self.watch.batch_scored(name, scores)
            version = model.version
            return [(s, version) for s in scores]

        return run

    def _record_stats(self, name: str, model: RewardModel) -> None:
        """Copies the model's own counters (``RewardModel.stats``) into /metrics; never fails a call."""
        try:
            self.metrics.record_model_stats(name, model.stats())
        except Exception:  # metrics are not worth a failed request
            log.exception("model %s: stats() failed", name)

    def _on_batch(self, name: str):
        m = self.metrics

        def record(stats: BatchStats) -> None:
            m.batch_size.labels(name).observe(stats.size)
            m.batch_requests.labels(name).observe(stats.requests)
            m.queue_wait.labels(name).observe(stats.queue_wait_s)
            m.batch_run.labels(name).observe(stats.run_s)
            m.queue_depth.labels(name).set(self._hosted[name].batcher.queue_depth if name in self._hosted else 0)

        return record

    # ------------------------------------------------------------------ discriminator updates

    def trainable_model(self, model_name: str) -> _Hosted:
        if not model_name:
            raise InvalidArgument("model: required (the name of a trainable model)")
        h = self._get(model_name)
        if not (isinstance(h.model, TrainableRewardModel) and h.model.trainable):
            raise FailedPrecondition(f"model {model_name!r} is not trainable")
        return h

    async def update(
        self,
        model_name: str,
        references: Sequence[GroupInput],
        generated: Sequence[GroupInput],
        steps: int,
        update_id: str = "",
    ) -> UpdateResult:
        h = self.trainable_model(model_name)
        model = h.model
        if not references or not any(g.images for g in references):
            raise InvalidArgument("references: no reference images")
        if not generated or not any(g.images for g in generated):
            raise InvalidArgument("generated: no generated images")
        self.check_groups(references, "references")
        self.check_groups(generated, "generated")
        steps = steps or 1
        if steps > self.config.server.max_update_steps:
            raise InvalidArgument(f"steps: {steps} exceeds the limit of {self.config.server.max_update_steps}")
        refs = [(img, g.prompt) for g in references for img in g.images]
        gens = [(img, g.prompt) for g in generated for img in g.images]

        def run() -> UpdateResult:
            # Runs on the model's executor, between scoring batches.
            if update_id and update_id == h.last_update_id and h.last_update is not None:
                out = h.last_update
                return dataclasses.replace(out, replayed=True)
            snapshot = _clone_state(model.export_state())
            try:
                result = model.update(
                    [i for i, _ in refs], [p for _, p in refs], [i for i, _ in gens], [p for _, p in gens], steps
                )
                version = model.version + 1
                outcome = UpdateResult(
                    model_name, version, result.loss, result.reference_score, result.generated_score, result.accuracy
                )
                tensors, meta = model.export_state()
                _check_update_finite(model_name, outcome, tensors)  # else rolled back below, never saved
                if self.store is not None:
                    meta = {
                        **meta,
                        VERSION_KEY: str(version),
                        FINGERPRINT_KEY: model.fingerprint(),
                        UPDATE_ID_KEY: update_id,
                        UPDATE_RESULT_KEY: ",".join(
                            repr(float(v))
                            for v in (result.loss, result.reference_score, result.generated_score, result.accuracy)
                        ),
                    }
                    self.store.save(model_name, tensors, meta)  # durable before acknowledged
            except BaseException as exc:
                model.import_state(*snapshot)  # roll back: the version did not change
                if isinstance(exc, ModelFailed):
                    self.watch.batch_failed(model_name)
                raise
            finally:
                self._record_stats(model_name, model)
            model.version = version
            h.last_update_id, h.last_update = update_id, outcome
            return outcome

        outcome = await h.batcher.run_exclusive(run)
        if not outcome.replayed:
            self._version_raised()
            record_update(self.metrics, self.events, self.update_history, outcome)
        return outcome

    # ------------------------------------------------------------------ versions shared between processes

    async def snapshot_state(self, model_name: str) -> tuple[int, dict, dict[str, str]]:
        """(version, tensors, metadata) of a trainable model, taken between batches and updates
        so that the tensors are exactly that version's (the Ray backend's owner publishes them)."""
        h = self.trainable_model(model_name)

        def take():
            tensors, meta = h.model.export_state()
            return h.model.version, _clone_state((tensors, meta))

        version, (tensors, meta) = await h.batcher.run_exclusive(take)
        return version, tensors, meta

    async def install_state(self, model_name: str, version: int, tensors: dict, meta: dict[str, str]) -> bool:
        """Serves ``version`` of a trainable model from now on (a Ray scoring replica following the
        owner). Installed between batches, like an update: a request is scored by one version. A
        version not newer than the one served is ignored (False)."""
        h = self.trainable_model(model_name)

        def install() -> bool:
            if version <= h.model.version:
                return False
            snapshot = _clone_state(h.model.export_state())
            try:
                h.model.import_state(tensors, meta)
            except BaseException:
                h.model.import_state(*snapshot)  # half-imported weights never serve under the old version
                raise
            h.model.version = version
            return True

        installed = await h.batcher.run_exclusive(install)
        if installed:
            self._version_raised()
            self.metrics.model_version.labels(model_name).set(version)
            self._record_stats(model_name, h.model)
        return installed

    # ------------------------------------------------------------------ the front end's calls
    # The gRPC servicer and the HTTP gateway call these; the Ray backend's ingress has the same
    # three (advgrpo.reward_server.ray_serve.ingress.RayHost), so both front ends serve either.

    async def score_message(self, request, raw: bytes | None = None):
        from advgrpo.reward_server import convert  # convert imports this module

        return await convert.score(self, request)

    async def update_message(self, request, raw: bytes | None = None):
        from advgrpo.reward_server import convert

        return await convert.update(self, request)

    async def describe_models(self) -> list[ModelInfo]:
        return self.list_models()

    # ------------------------------------------------------------------ decoding & lifecycle

    async def run_decode(self, fn, *args):
        """Runs image decoding (PNG/JPEG) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, fn, *args)

    async def close(self) -> None:
        for h in self._hosted.values():
            await h.batcher.close()
        for h in self._hosted.values():
            h.executor.shutdown(wait=True)
            h.model.close()
        self._decode_pool.shutdown(wait=False)


def weighted_rewards(
    weights: dict[str, float], components: dict[str, Sequence[float]], group_index: int, group_id: str
) -> list[float]:
    """rewards[i] = sum over ``weights`` (in its order) of weight * components[model][i], summed in
    float64 and sent as float32; a sum that overflows float32 fails the request, naming the group:
    finite scores times large weights can."""
    n = len(next(iter(components.values())))
    rewards = np.zeros(n, dtype=np.float64)
    for name, w in weights.items():
        rewards += w * np.asarray(components[name], dtype=np.float64)
    with np.errstate(over="ignore"):  # an overflow is caught just below
        combined = rewards.astype(np.float32)
    if not np.isfinite(combined).all():
        j = int(np.flatnonzero(~np.isfinite(combined))[0])
        raise ModelFailed(
            f"the weighted reward of groups[{group_index}].images[{j}] (group_id {group_id!r}) is {combined[j]} "
            f"(weights {weights}): "
            "no reward is sent for this request"
        )
    return combined.tolist()


def check_groups(config: ServerConfig, groups: Sequence, field_name: str = "groups", references: bool = False) -> None:
    """Group-level checks; works on GroupInput and on wire ImageGroup alike (before decoding).
    ``references``: the groups' reference images count toward the image limit too (Score;
    UpdateDiscriminator ignores ImageGroup.references)."""
    if not groups:
        raise InvalidArgument(f"{field_name}: no image groups")
    total = refs = 0
    for i, g in enumerate(groups):
        if not g.images:
            raise InvalidArgument(f"{field_name}[{i}] (group_id {g.group_id!r}): empty group, no images")
        total += len(g.images)
        if references:
            refs += len(g.references)
    total += refs
    limit = config.server.max_images_per_request
    if total > limit:
        of_which = f" ({refs} of them references)" if refs else ""
        raise ResourceExhausted(f"{field_name}: {total} images in one request{of_which}, the limit is {limit}")


def record_update(metrics: ServerMetrics, events, history: dict, outcome: UpdateResult) -> None:
    """An acknowledged update in /metrics, the recent events and the model's curve (dashboard)."""
    name = outcome.model
    metrics.updates.labels(name).inc()
    metrics.model_version.labels(name).set(outcome.version)
    metrics.update_loss.labels(name).set(outcome.loss)
    metrics.update_accuracy.labels(name).set(outcome.accuracy)
    metrics.reference_score.labels(name).set(outcome.reference_score)
    metrics.generated_score.labels(name).set(outcome.generated_score)
    now = time.time()
    events.append(Event(now, "update", name, dict(outcome.__dict__)))
    history[name].append({"time": now, **outcome.__dict__})


def not_served(name: str, served) -> NotFound:
    return NotFound(f"model {name!r} is not served here (models: {', '.join(served)})")


def resolve_weights(config: ServerConfig, weights: dict[str, float]) -> dict[str, float]:
    """A request's weights, or the config's default spec when it names none: every model served,
    every weight finite."""
    if not weights:
        weights = config.default_weights()
        if not weights:
            raise InvalidArgument("weights: empty, and the server has no default reward spec")
    served = [m.name for m in config.models]
    for name, w in weights.items():
        if name not in served:
            raise not_served(name, served)
        if not math.isfinite(w):
            raise InvalidArgument(f"weights[{name!r}]: must be finite, got {w}")
    return dict(weights)


def _check_update_finite(model_name: str, outcome: UpdateResult, tensors: dict) -> None:
    """An update whose loss, reported means or new weights are not finite is refused (and rolled
    back by the caller): acknowledged and saved, it would break every later score for good."""
    for name in ("loss", "reference_score", "generated_score", "accuracy"):
        value = getattr(outcome, name)
        if not math.isfinite(value):
            raise ModelFailed(f"model {model_name!r}: the update gave {name} = {value}; rolled back, not applied")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ModelFailed(
                f"model {model_name!r}: the update left non-finite values in {key}; rolled back, not applied"
            )


async def _gather_or_cancel(coros):
    """Like gather, but the first failure cancels the rest (a refused model frees the others)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _clone_state(state):
    tensors, meta = state
    return {k: v.detach().clone() for k, v in tensors.items()}, dict(meta)
