"""The Python client trainers import: ``RewardClient("127.0.0.1:50051").score([...])``.

It encodes tensors/arrays/PIL images (raw RGB8 by default: cheapest to encode and to decode),
splits groups that exceed the message budget or image count into several requests and stitches
the answers back, sets a deadline on every call (and on every unanswered stream message), and
retries UNAVAILABLE with exponential backoff within a time budget.
Discriminator updates carry an idempotency key, so retrying them is safe too.

Depends only on grpc, numpy and PIL: no torch, no server code.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import random
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advgrpo.common.images import RAW, encode_image_parts
from advgrpo.common.protocol import RETRY_AFTER_KEY, STREAM_OPEN_KEY
from advgrpo.common.shared_memory import SharedMemoryArena, SharedMemoryFull, SharedMemorySlots, StreamClosed
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass
class Group:
    """One prompt's images. ``images``: PIL images, uint8 HWC arrays, or float CHW/HWC tensors in [0, 1]."""

    prompt: str
    images: Sequence[Any]
    group_id: str = ""


@dataclass
class GroupScore:
    group_id: str
    rewards: list[float]
    components: dict[str, list[float]]
    model_versions: dict[str, int]


@dataclass
class UpdateResult:
    model: str
    version: int
    loss: float
    reference_score: float
    generated_score: float
    accuracy: float
    replayed: bool = False


@dataclass
class ModelInfo:
    name: str
    kind: str
    trainable: bool
    version: int
    default_weight: float


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

    RESOURCE_EXHAUSTED is retried too when the server marks it transient (a full queue, its
    decoded-bytes budget in use by other requests: the ``advgrpo-retry-after-ms`` trailer), after
    at least that long; one over a size limit fails the same way every time and is raised."""

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


class _RetryBudget:
    """One outage's retries under a ``RetryPolicy``: the attempts made, the next backoff and the
    time limit, all counted from when it was made (or ``renew``ed)."""

    def __init__(self, policy: RetryPolicy, target: str):
        self.policy, self.target = policy, target
        self.backoff = policy.initial_backoff_s
        self.renew()

    def renew(self) -> None:
        """A fresh attempt count and time limit; the backoff goes on growing."""
        self.attempt = 1
        limit = self.policy.max_elapsed_s
        self.give_up_at = None if limit is None else time.monotonic() + limit

    def delay(self, exc: BaseException, what: str) -> float | None:
        """Seconds to wait before the next attempt after ``exc`` (the jittered backoff, or the
        server's hint if longer, cut at the time limit), or None: ``exc`` is not retryable or the
        budget is spent, so raise it."""
        policy = self.policy
        code = exc.code() if isinstance(exc, grpc.RpcError) else None
        hint = _retry_after_s(exc) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        if code not in policy.retryable and hint is None:
            return None
        left = math.inf if self.give_up_at is None else self.give_up_at - time.monotonic()
        if left <= 0 or (policy.max_attempts is not None and self.attempt >= policy.max_attempts):
            log.warning(
                "reward server %s: %s %s; giving up after %d attempt(s)", self.target, what, code.name, self.attempt
            )
            return None
        jittered = self.backoff * (0.5 + random.random() / 2)  # jitter keeps clients from stampeding
        delay = min(max(jittered, hint or 0.0), left)
        log.warning("reward server %s: %s %s; retry %d in %.2fs", self.target, what, code.name, self.attempt, delay)
        self.attempt += 1
        self.backoff = min(self.backoff * policy.multiplier, policy.max_backoff_s)
        return delay


def _retry_after_s(exc: grpc.RpcError) -> float | None:
    """The server's ``advgrpo-retry-after-ms`` trailer: it says the refusal is transient."""
    try:
        trailer = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an error without metadata: no hint
        return None
    for key, value in trailer:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000.0)
            except (TypeError, ValueError):
                return None
    return None


class ClientRpcError(grpc.RpcError):
    """A failure the client itself detected, shaped like grpc's errors (``code()``, ``details()``):
    ``score_stream``'s ``DEADLINE_EXCEEDED`` when the server leaves its messages unanswered."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple:
        return ()

    def trailing_metadata(self) -> tuple:
        return ()

    def debug_error_string(self) -> str:
        return str(self)


class RewardClient:
    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float = 120.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        encoding: str = "raw",
        retry: RetryPolicy | None = None,
        keep_freed_memory: bool = False,
        shared_memory: bool | str = False,
        parallel_calls: int = 4,
        min_call_bytes: int = 4 << 20,
        max_rescores: int = 3,
        stream_slots: int = 8,
        max_images_per_call: int = 1024,
    ):
        """``keep_freed_memory``: tune this process's glibc allocator to keep freed buffers (see
        advgrpo.common.allocator); it makes raw image transfers much cheaper, process-wide.

        ``shared_memory``: for a server on this host (same /dev/shm), ``score`` and
        ``update_discriminator`` pass the image bytes through a shared-memory segment this client
        owns instead of the socket (the server must have ``server.shared_memory`` on, the
        default). One call at a time uses the segment; a concurrent call from another thread
        sends its bytes inline. ``score_stream`` gives each message in flight a segment of its
        own, at most ``stream_slots`` (the server's ``max_stream_inflight`` by default) at a time.
        ``"auto"``: ask the server once, before the first call with images, whether it can read
        this client's segments (CheckSharedMemory); if not (another host, container or user,
        or shared memory off there) the bytes go through the socket, and a warning says why.
        ``True`` skips that question: a server that cannot read the segments fails the calls.
        Either way, a call whose segment finds /dev/shm full sends its bytes inline.

        ``parallel_calls``, ``min_call_bytes``: ``score`` divides a payload of at least
        2·``min_call_bytes`` of image bytes into up to ``parallel_calls`` Score calls of at least
        ``min_call_bytes`` each and keeps them in flight at once, so that this process copying one
        part, the socket, and the server reading another overlap (bench/transport.py). 1 turns
        it off. Each image's reward does not depend on which call carried it.

        ``max_rescores``: a group whose parts (split across calls) came back under different
        model versions, because a discriminator update landed between them, is scored again, up
        to this many times; then ``score`` raises rather than mix versions within a group.

        ``max_images_per_call``: a Score request carries at most this many images (groups are
        split like for bytes); keep it at most the server's ``server.max_images_per_request``.

        ``max_message_bytes``: keep it equal to the server's ``server.max_message_bytes``. An
        ``update_discriminator`` is one request; one whose raw images would exceed this limit
        through the socket sends them as PNG instead (lossless), and raises ValueError if even
        that does not fit.

        ``timeout_s``: the deadline of each call; for ``score_stream``, how long the server may
        leave messages unanswered (see there)."""
        if parallel_calls < 1 or min_call_bytes < 1 or max_rescores < 0 or max_images_per_call < 1:
            raise ValueError("parallel_calls, min_call_bytes and max_images_per_call must be >= 1, max_rescores >= 0")
        if shared_memory not in (True, False, "auto"):
            raise ValueError(f"shared_memory must be True, False or 'auto', got {shared_memory!r}")
        if keep_freed_memory:
            from advgrpo.common.allocator import keep_freed_memory as _keep

            _keep()
        self.target = target
        self.timeout_s = timeout_s
        self.encoding = encoding
        self.retry = retry or RetryPolicy()
        # Leave headroom below the limit for the non-image fields of a request.
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = max(1024, int(max_message_bytes * 0.9))
        self.max_images_per_call = max_images_per_call
        self.parallel_calls = parallel_calls
        self.min_call_bytes = min_call_bytes
        self.max_rescores = max_rescores
        self._arena = SharedMemoryArena() if shared_memory else None
        self._stream_slots = SharedMemorySlots(stream_slots) if shared_memory else None
        # Whether image bytes go through shared memory: None until 'auto' has asked the server.
        self._shm_usable: bool | None = None if shared_memory == "auto" else bool(shared_memory)
        self._shm_check_lock = threading.Lock()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # gRPC's own reconnect backoff grows to 120 s by default: a channel would then
                # sit out a restarted server for longer than the retry budget. Keep it short.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", max(100, int(self.retry.max_backoff_s * 1000))),
            ],
        )
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        # Score, ScoreStream and UpdateDiscriminator carry the images: their requests are written
        # straight to the wire format (one copy of the pixels, see _ScoreBatch); the rest uses
        # protobuf as is.
        service = "/" + reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
        self._score = self._channel.unary_unary(
            f"{service}/Score",
            request_serializer=_ScoreBatch.serialize,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._score_stream = self._channel.stream_stream(
            f"{service}/ScoreStream",
            request_serializer=_ScoreBatch.serialize,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._update = self._channel.unary_unary(
            f"{service}/UpdateDiscriminator",
            request_serializer=_UpdateBatch.serialize,
            response_deserializer=reward_pb2.UpdateDiscriminatorResponse.FromString,
        )
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._channel.close()
        if self._arena is not None:
            with self._arena.lock:
                self._arena.close()
        if self._stream_slots is not None:
            self._stream_slots.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", ... of the server (or of one service)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Blocks until the server reports SERVING; raises TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health(timeout_s=min(5.0, max(0.1, deadline - time.monotonic()))) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"reward server at {self.target} not SERVING after {timeout_s:.0f}s")
            time.sleep(0.2)

    def uses_shared_memory(self) -> bool:
        """Whether this client's image bytes go through shared memory. With ``shared_memory="auto"``
        the first call asks the server (CheckSharedMemory) and the answer is kept."""
        if self._shm_usable is None:
            with self._shm_check_lock:
                if self._shm_usable is None:
                    self._shm_usable = self._server_reads_shared_memory()
        return self._shm_usable

    def _server_reads_shared_memory(self) -> bool:
        """Writes a random token into this client's segment and asks the server to read it back."""
        token = os.urandom(16)
        arena = self._arena
        try:
            with arena.lock:
                ((name, offset, size),) = arena.place([token])
        except OSError as exc:  # no POSIX shared memory here, or /dev/shm is full
            log.warning("shared memory unavailable in this process (%s): image bytes go through the socket", exc)
            return False
        request = reward_pb2.CheckSharedMemoryRequest(
            slice=reward_pb2.SharedMemorySlice(name=name, offset=offset, size=size), expected=token
        )
        try:
            answer = self._call(self._stub.CheckSharedMemory, request)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise  # the server is unreachable or refused us: ask again next call
            answer = reward_pb2.CheckSharedMemoryResponse(detail="the server predates CheckSharedMemory")
        if not answer.readable:
            with arena.lock:
                arena.discard()
            log.warning(
                "reward server %s cannot read this client's shared memory (%s): image bytes go through the socket",
                self.target,
                answer.detail,
            )
        return answer.readable

    # ------------------------------------------------------------------ calls

    def list_models(self) -> list[ModelInfo]:
        response = self._call(self._stub.ListModels, reward_pb2.ListModelsRequest())
        return [ModelInfo(m.name, m.kind, m.trainable, m.version, m.default_weight) for m in response.models]

    def score(self, groups: Sequence[Group], weights: dict[str, float] | None = None) -> list[GroupScore]:
        """Scores groups (message-sized chunks, several calls in flight for big payloads);
        results in the order given. A group is always scored under one version of each model."""
        scores, straddled = self._score_once(list(enumerate(groups)), weights)
        for _ in range(self.max_rescores):
            if not straddled:
                break
            log.info(
                "reward server %s: %d split group(s) straddled a model update; scoring them again",
                self.target,
                len(straddled),
            )
            again, still = self._score_once([(i, groups[i]) for i in straddled], weights)
            for i, s in zip(straddled, again, strict=True):
                scores[i] = s
            straddled = [straddled[j] for j in still]
        if straddled:
            raise RuntimeError(
                f"groups {straddled}: parts scored under different model versions "
                f"{1 + self.max_rescores} times (discriminator updates keep landing between them)"
            )
        return scores

    def _score_once(
        self, indexed: list[tuple[int, Group]], weights: dict[str, float] | None
    ) -> tuple[list[GroupScore], list[int]]:
        """One pass over ``indexed`` (caller's index, group): the scores in that order, and the
        positions (into ``indexed``) of split groups whose parts saw different model versions."""
        encoded = [self._encode_group(g, i) for i, g in indexed]
        with self._segment() as arena:
            budget = self.chunk_bytes if arena is not None else self._call_budget(encoded)
            requests = list(self._requests(encoded, weights, budget))
            if arena is None and len(requests) > 1 and self.parallel_calls > 1:
                responses = self._call_concurrently(self._score, [r for r, _ in requests])
            else:
                responses = [self._call_images(self._score, r, arena) for r, _ in requests]
        results = [
            p for response, (_, parts) in zip(responses, requests, strict=True) for p in _collect(response, parts)
        ]
        merged, straddled = _merge_parts(results)
        if len(merged) != len(indexed):
            raise RuntimeError(f"expected scores for {len(indexed)} groups, got {len(merged)}")
        position = {index: k for k, (index, _) in enumerate(indexed)}
        return merged, sorted(position[i] for i in straddled)

    def score_stream(self, groups: Iterable[Group], weights: dict[str, float] | None = None) -> Iterator[GroupScore]:
        """Streams groups as they come (e.g. as a sampler decodes them) and yields each group's
        scores in order, as soon as the server has them. The server scores several at once.

        No deadline covers the whole stream (it may last as long as ``groups`` does), but while
        messages are unanswered the server must answer one within ``timeout_s`` (counted from
        the oldest unanswered message's sending or the previous answer, whichever is later; and
        once ``groups`` is exhausted, end the stream within ``timeout_s`` of the last answer):
        else the call is cancelled (its segments dropped) and a ``grpc.RpcError`` with
        ``DEADLINE_EXCEEDED`` raised. Answers are taken as they come, so a caller slow to take
        them does not count against the server.

        A stream that fails with a retryable status (UNAVAILABLE: the server restarted, or the
        connection dropped; RESOURCE_EXHAUSTED the server marks transient) is opened again after a
        backoff, as ``retry`` allows. Its budget counts from the failure and starts afresh after an
        answer, or when a stream the server had accepted fails (a restart while the stream was
        idle is a new outage). The messages left unanswered are sent again first, in order, then
        the rest of ``groups``; answers already received are kept, so every group is yielded
        exactly once, in order.

        If ``groups`` raises (or an image cannot be encoded), the stream ends there: the groups
        before it are yielded, then that exception is raised."""
        yield from _StreamRun(self, groups, weights).results()

    def update_discriminator(
        self,
        model: str,
        references: Sequence[Group],
        generated: Sequence[Group],
        steps: int = 1,
        update_id: str | None = None,
    ) -> UpdateResult:
        """One discriminator update (``steps`` optimizer steps); safe to retry (idempotency key).

        It is one request (one atomic update). Through the socket, raw images that would make it
        larger than ``max_message_bytes`` go as PNG (lossless: the same pixels, the same update);
        if even that is too large, ValueError, before anything is sent."""
        request = _UpdateBatch(
            model,
            [self._encode_group(g, i) for i, g in enumerate(references)],
            [self._encode_group(g, i) for i, g in enumerate(generated)],
            steps,
            update_id or uuid.uuid4().hex,
        )
        with self._segment() as arena:
            r = self._call_images(self._update, request, arena)
        return UpdateResult(r.model, r.version, r.loss, r.reference_score, r.generated_score, r.accuracy, r.replayed)

    # ------------------------------------------------------------------ internals

    def _call(self, method: Callable[..., T], request, failed: grpc.RpcError | None = None) -> T:
        """``method(request)`` with this client's deadline, retried as ``self.retry`` says;
        ``failed``: the first attempt, made elsewhere, failed with it."""
        budget = _RetryBudget(self.retry, self.target)
        while True:
            if failed is not None:
                delay = budget.delay(failed, "call")
                if delay is None:
                    raise failed
                time.sleep(delay)
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                failed = exc

    def _call_concurrently(self, method, requests: list) -> list:
        """The responses to ``requests``, in order, with up to ``parallel_calls`` in flight.
        A call that fails with a retryable status is retried alone (``_call``, with backoff);
        any other failure (``_call`` raises it at once) cancels the calls still running."""
        responses: list = [None] * len(requests)
        running: list[tuple[int, Any]] = []
        next_up = 0
        try:
            while next_up < len(requests) or running:
                while next_up < len(requests) and len(running) < self.parallel_calls:
                    future = method.future(requests[next_up], timeout=self.timeout_s, metadata=self._metadata)
                    running.append((next_up, future))
                    next_up += 1
                k, future = running.pop(0)
                try:
                    responses[k] = future.result()
                except grpc.RpcError as exc:
                    responses[k] = self._call(method, requests[k], failed=exc)
        finally:
            for _, future in running:
                future.cancel()
        return responses

    def _call_budget(self, encoded: Sequence["_Encoded"]) -> int:
        """Bytes per Score call for ``encoded``: the message budget, or for a payload worth
        dividing, about 1/n of it (n <= parallel_calls, each part >= min_call_bytes) plus one
        image and a group header, so the packing of ``_requests`` ends with at most n calls."""
        total = sum(e.nbytes() for e in encoded)
        n = min(self.parallel_calls, total // self.min_call_bytes)
        if n < 2:
            return self.chunk_bytes
        largest = max((len(data) + _FIELD_OVERHEAD for e in encoded for *_, data in e.images), default=0)
        head = max(e.head_bytes() for e in encoded)
        return min(self.chunk_bytes, -(-total // n) + largest + head)

    @contextlib.contextmanager
    def _segment(self) -> Iterator[SharedMemoryArena | None]:
        """This client's shared-memory arena, held for the block, if it has one and no other
        thread is using it; else None (the bytes go inline)."""
        arena = self._arena
        if arena is None or not self.uses_shared_memory() or not arena.lock.acquire(blocking=False):
            yield None
            return
        try:
            yield arena
        finally:
            arena.lock.release()

    def _call_images(self, method, request: "_ScoreBatch | _UpdateBatch", arena: SharedMemoryArena | None):
        """``_call``; with ``arena`` (held), the image bytes go through shared memory."""
        if arena is None:
            return self._call(method, self._fit_inline(request))
        try:
            placed = request.via_shared_memory(arena)
        except SharedMemoryFull as exc:
            log.warning("reward server %s: this call's images go through the socket: %s", self.target, exc)
            return self._call(method, self._fit_inline(request))
        try:
            return self._call(method, placed)
        except BaseException:
            arena.discard()  # the server may still be reading it: never rewrite it
            raise

    def _fit_inline(self, request: "_ScoreBatch | _UpdateBatch") -> "_ScoreBatch | _UpdateBatch":
        """``request`` as it can go through the socket. Score requests are packed to fit already;
        an update, which cannot be split, has its raw images re-encoded as PNG when it would
        exceed ``max_message_bytes``, and raises ValueError if it is still too large."""
        if not isinstance(request, _UpdateBatch) or request.nbytes() <= self.max_message_bytes:
            return request
        limit, raw_size = self.max_message_bytes, request.nbytes()
        fix = (
            "pass the images through shared memory (shared_memory=True or 'auto', server on this "
            "host) or raise max_message_bytes on both sides (the client's and the server's "
            "server.max_message_bytes), or send fewer images per update"
        )
        groups = request.references + request.generated
        if not any(e == RAW for g in groups for e, *_ in g.images):
            raise ValueError(
                f"update_discriminator request is {raw_size} bytes, over the message limit of "
                f"{limit} bytes (max_message_bytes): {fix}"
            )
        t0 = time.perf_counter()
        packed = [_Encoded(g.index, g.group_id, g.prompt, [_png_parts(*image) for image in g.images]) for g in groups]
        n = len(request.references)
        fitted = _UpdateBatch(request.model, packed[:n], packed[n:], request.steps, request.update_id)
        size = fitted.nbytes()
        if size > limit:
            raise ValueError(
                f"update_discriminator request is {raw_size} bytes with raw images and {size} bytes as "
                f"PNG, over the message limit of {limit} bytes (max_message_bytes): {fix}"
            )
        log.info(
            "reward server %s: update_discriminator's raw images (%.1f MB) exceed the %.1f MB message "
            "limit; sent as PNG instead (lossless, %.1f MB, encoded in %.2fs)",
            self.target,
            raw_size / 1e6,
            limit / 1e6,
            size / 1e6,
            time.perf_counter() - t0,
        )
        return fitted

    def _encode_group(self, group: Group, index: int) -> "_Encoded":
        images = [encode_image_parts(img, self.encoding) for img in group.images]
        return _Encoded(index, group.group_id or str(index), group.prompt, images)

    def _requests(self, encoded: Sequence["_Encoded"], weights, budget: int) -> Iterator[tuple["_ScoreBatch", list]]:
        """Packs groups into requests of at most ``budget`` bytes and ``max_images_per_call``
        images, in order, filling each request image by image: a group that does not fit the room
        left is split there (one image always goes, so an image bigger than the budget travels
        alone). Every request but the last thus holds more than ``budget`` minus one image, or
        ``max_images_per_call`` images. Sizes are summed from the image bytes (protobuf's
        ByteSize() walks 12 MB per call)."""
        max_images = self.max_images_per_call
        batch = _ScoreBatch([], dict(weights or {}))
        parts: list[tuple[int, int]] = []  # (group index, part number) per group in the request
        size = count = 0  # bytes and images in ``batch``
        for enc in encoded:
            head, images = enc.head_bytes(), enc.images
            start = part_no = 0
            while True:
                taken, piece_size = start, head  # images[start:taken] fit the room left
                while taken < len(images):
                    image_size = len(images[taken][3]) + _FIELD_OVERHEAD
                    if size + piece_size + image_size > budget or count + taken - start >= max_images:
                        break
                    piece_size += image_size
                    taken += 1
                if taken == start and parts and (start < len(images) or size + head > budget):
                    yield batch, parts  # no room left: the rest goes in a new request
                    batch, parts, size, count = _ScoreBatch([], dict(weights or {})), [], 0, 0
                    continue
                if taken == start < len(images):  # alone, and still over the budget: it goes anyway
                    piece_size += len(images[taken][3]) + _FIELD_OVERHEAD
                    taken += 1
                batch.groups.append(_Encoded(enc.index, enc.group_id, enc.prompt, images[start:taken]))
                parts.append((enc.index, part_no))
                size += piece_size
                count += taken - start
                start, part_no = taken, part_no + 1
                if start >= len(images):
                    break
        if parts:
            yield batch, parts


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload_len: int) -> bytes:
    return _varint((field << 3) | 2) + _varint(payload_len)


def _group_chunks(number: int, g: "_Encoded") -> list:
    """An ImageGroup as field ``number`` of its parent, in wire format: tags and lengths as bytes,
    the image data as given (bytes or views of the caller's arrays), for one ``bytes.join``."""
    head = b""
    if g.group_id:
        gid = g.group_id.encode()
        head += _len_field(1, len(gid)) + gid
    if g.prompt:
        prompt = g.prompt.encode()
        head += _len_field(2, len(prompt)) + prompt
    body: list = [head]
    for encoding, height, width, data in g.images:
        fields = b"".join(
            _varint(tag) + _varint(value)
            for tag, value in ((0x08, encoding), (0x10, height), (0x18, width))
            if value  # proto3 leaves zero scalars out
        )
        if isinstance(data, _SharedRef):
            fields += data.serialize()
            data = b""
        fields += _len_field(4, len(data)) if len(data) else b""
        body += [_len_field(3, len(fields) + len(data)), fields, data]
    return [_len_field(number, sum(len(b) for b in body)), *body]


def _string_field(number: int, value: str) -> bytes:
    raw = value.encode()
    return _len_field(number, len(raw)) + raw if raw else b""


@dataclass(frozen=True)
class _SharedRef:
    """An image's bytes in a shared-memory segment: Image.shared_memory instead of Image.data."""

    name: str
    offset: int
    size: int

    def serialize(self) -> bytes:
        """Image field 5, a SharedMemorySlice."""
        body = _string_field(1, self.name)
        body += (b"\x10" + _varint(self.offset)) if self.offset else b""
        body += (b"\x18" + _varint(self.size)) if self.size else b""
        return _len_field(5, len(body)) + body


def _place_groups(groups: list["_Encoded"], arena: SharedMemoryArena) -> list["_Encoded"]:
    """Copies every image's bytes into ``arena``; the groups with _SharedRefs in their place."""
    refs = iter(arena.place([data for g in groups for *_, data in g.images]))
    return [
        _Encoded(g.index, g.group_id, g.prompt, [(e, h, w, _SharedRef(*next(refs))) for e, h, w, _ in g.images])
        for g in groups
    ]


@dataclass
class _ScoreBatch:
    """A ScoreRequest as encoded groups, serialised by hand in protobuf's wire format.

    Building a ScoreRequest message copies every image into it and SerializeToString copies it
    again; here the pixels are copied once, from the caller's arrays, by bytes.join. The result
    parses as the same ScoreRequest (tests/test_client.py checks it against protobuf).
    """

    groups: list["_Encoded"]
    weights: dict[str, float]

    def serialize(self) -> bytes:
        chunks: list = []
        for g in self.groups:
            chunks += _group_chunks(1, g)
        for key, value in self.weights.items():
            entry = _string_field(1, key) + b"\x15" + struct.pack("<f", value)
            chunks.append(_len_field(2, len(entry)) + entry)
        return b"".join(chunks)

    def via_shared_memory(self, arena: SharedMemoryArena) -> "_ScoreBatch":
        return _ScoreBatch(_place_groups(self.groups, arena), self.weights)


@dataclass
class _UpdateBatch:
    """An UpdateDiscriminatorRequest, serialised by hand like ``_ScoreBatch``."""

    model: str
    references: list["_Encoded"]
    generated: list["_Encoded"]
    steps: int
    update_id: str

    def serialize(self) -> bytes:
        chunks: list = [_string_field(1, self.model)]
        for number, groups in ((2, self.references), (3, self.generated)):
            for g in groups:
                chunks += _group_chunks(number, g)
        if self.steps:
            chunks.append(b"\x20" + _varint(self.steps))
        chunks.append(_string_field(5, self.update_id))
        return b"".join(chunks)

    def nbytes(self) -> int:
        """An upper bound of the serialised request's size."""
        groups = self.references + self.generated
        return len(self.model.encode()) + len(self.update_id.encode()) + 32 + sum(g.nbytes() for g in groups)

    def via_shared_memory(self, arena: SharedMemoryArena) -> "_UpdateBatch":
        placed = _place_groups(self.references + self.generated, arena)
        n = len(self.references)
        return _UpdateBatch(self.model, placed[:n], placed[n:], self.steps, self.update_id)


_FIELD_OVERHEAD = 16  # bytes of tags and lengths per image / group, generously


def _png_parts(encoding: int, height: int, width: int, data) -> tuple[int, int, int, Any]:
    """An encoded image's fields with raw RGB8 pixels as PNG (lossless); others as they are."""
    if encoding != RAW:
        return encoding, height, width, data
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    return encode_image_parts(pixels, "png")


@dataclass
class _Encoded:
    index: int
    group_id: str
    prompt: str
    images: list[tuple[int, int, int, Any]]  # (encoding, height, width, data: bytes-like or _SharedRef)

    def head_bytes(self) -> int:
        """An upper bound of the serialised ImageGroup's size without its images."""
        return len(self.group_id.encode()) + len(self.prompt.encode()) + 2 * _FIELD_OVERHEAD

    def nbytes(self) -> int:
        """An upper bound of the serialised ImageGroup's size."""
        return self.head_bytes() + sum(len(data) + _FIELD_OVERHEAD for *_, data in self.images)

    def add_to(self, groups) -> None:
        """Appends this group to a repeated ImageGroup field (images set in place, no extra copy)."""
        g = groups.add(group_id=self.group_id, prompt=self.prompt)
        for encoding, height, width, data in self.images:
            g.images.add(encoding=encoding, height=height, width=width, data=bytes(data))


@dataclass
class _Part:
    index: int  # the group's position in the caller's sequence
    part: int  # which piece of a split group
    score: GroupScore


def _collect(response: reward_pb2.ScoreResponse, parts: list[tuple[int, int]]) -> list[_Part]:
    if len(response.groups) != len(parts):
        raise RuntimeError(f"server answered {len(response.groups)} groups for {len(parts)} sent")
    return [
        _Part(
            index,
            part_no,
            GroupScore(
                g.group_id,
                list(g.rewards),
                {k: list(v.values) for k, v in g.components.items()},
                dict(g.model_versions),
            ),
        )
        for g, (index, part_no) in zip(response.groups, parts, strict=True)
    ]


def _merge_parts(parts: list[_Part]) -> tuple[list[GroupScore], list[int]]:
    """Stitches the pieces of split groups back together, in group order; also the indices of
    groups whose pieces were scored under different model versions (an update between calls)."""
    by_index: dict[int, list[_Part]] = {}
    for p in parts:
        by_index.setdefault(p.index, []).append(p)
    merged, straddled = [], []
    for index in sorted(by_index):
        pieces = [p.score for p in sorted(by_index[index], key=lambda p: p.part)]
        first = pieces[0]
        for p in pieces[1:]:
            if p.model_versions != first.model_versions:
                straddled.append(index)
            first.rewards.extend(p.rewards)
            for k, v in p.components.items():
                first.components[k].extend(v)
            for k, v in p.model_versions.items():
                first.model_versions[k] = max(first.model_versions.get(k, v), v)
        merged.append(first)
    return merged, sorted(set(straddled))


def _merge_stream_parts(parts: list[_Part]) -> GroupScore:
    """One streamed group's pieces. A stream does not score a group again, so one that straddled an
    update is reported under the newest version involved, and logged."""
    (merged,), straddled = _merge_parts(parts)
    if straddled:
        log.warning("group %r: its parts were scored under different model versions", merged.group_id)
    return merged


@dataclass
class _Sent:
    """A stream message on its way: the request as encoded (to send again after a failure), its
    (group, part) list, its shared-memory arena if it has one, and when it was sent."""

    request: _ScoreBatch
    parts: list
    arena: SharedMemoryArena | None
    sent_at: float


@dataclass
class _StreamCall:
    """One ScoreStream call of a ``score_stream`` (the first, or one opened after a failure)."""

    stopped: threading.Event = field(default_factory=threading.Event)  # send nothing more on it
    call: Any = None
    receiver: threading.Thread | None = None
    closed_at: float | None = None  # all sent: the server owes the answers and the stream's end
    opened: bool = False  # the server accepted it (its STREAM_OPEN_KEY header came)
    answered: bool = False
    done: bool = False  # the call has ended
    error: BaseException | None = None


class _StreamRun:
    """One ``score_stream``, over one or more ScoreStream calls (one more per retry).

    Shared by the caller's thread, grpc's request thread of each call and each call's answer
    thread, under ``cond``: ``to_send`` holds the messages to send next, in order (those of the
    groups drawn from the caller, and after a failure the unanswered ones, put back in front),
    ``inflight`` those sent and not answered, ``answers`` those answered and not yet taken by
    the caller. Groups are drawn from the caller's iterator by one thread at a time
    (``draw_lock``); a request thread of a failed call may still be waiting for one, and what it
    draws is queued for the next call."""

    def __init__(self, client: "RewardClient", groups: Iterable[Group], weights: dict[str, float] | None):
        self.client = client
        self.weights = weights
        self.groups = iter(groups)
        self.slots = client._stream_slots if client._stream_slots is not None and client.uses_shared_memory() else None
        self.cond = threading.Condition()
        self.draw_lock = threading.Lock()
        self.ended = threading.Event()  # the caller's side is done with the stream: send nothing more
        self.to_send: collections.deque[tuple[_ScoreBatch, list]] = collections.deque()
        self.inflight: collections.deque[_Sent] = collections.deque()
        self.answers: collections.deque[tuple[Any, list]] = collections.deque()  # received, not yet taken
        self.drawn = 0  # groups taken from the caller
        self.exhausted = False  # the caller's groups have ended (or raised)
        self.failure: BaseException | None = None  # the caller's exception, raised after what came before
        self.failed_at: int | None = None  # the group it belongs to
        self.last_answer = 0.0

    # -------------------------------------------------------- sending (grpc's request threads)

    def _draw(self) -> None:
        """Takes the caller's next group and queues its messages (unless another thread did)."""
        with self.draw_lock:
            with self.cond:
                if self.to_send or self.exhausted:
                    return
                index = self.drawn
            try:
                group = next(self.groups)
                client = self.client
                messages = list(
                    client._requests([client._encode_group(group, index)], self.weights, client.chunk_bytes)
                )
            except StopIteration:
                with self.cond:
                    self.exhausted = True
                    self.cond.notify_all()
                return
            except BaseException as exc:  # noqa: BLE001 - the caller's, raised in the caller's thread
                # Raised in grpc's thread, it would cancel the call as UNKNOWN "Exception iterating
                # requests!"; instead the stream ends (what was sent is answered), then it is raised.
                with self.cond:
                    self.exhausted = True
                    self.failure, self.failed_at = exc, index
                    self.cond.notify_all()
                return
            with self.cond:
                self.drawn += 1
                self.to_send.extend(messages)
                self.cond.notify_all()

    def _requests(self, stream: _StreamCall) -> Iterator[_ScoreBatch]:
        """The messages of one call, until everything is sent or the call is stopped."""
        try:
            while True:
                with self.cond:
                    if stream.stopped.is_set() or self.ended.is_set():
                        return
                    if not self.to_send:
                        if self.exhausted:
                            return
                        ready = False
                    else:
                        ready = True
                if not ready:
                    self._draw()
                    continue
                arena = None
                if self.slots is not None:
                    try:
                        arena = self.slots.acquire(lambda: stream.stopped.is_set() or self.ended.is_set())
                    except StreamClosed:
                        return
                # Taking a message and marking it in flight happen under the lock, so that a
                # failure (which puts what is in flight back) or the stream's end (which drops it)
                # never misses one.
                with self.cond:
                    if stream.stopped.is_set() or self.ended.is_set() or not self.to_send:
                        if arena is not None:
                            self.slots.release(arena)
                        continue
                    request, parts = self.to_send.popleft()
                    sent = request
                    if arena is not None:
                        try:
                            sent = request.via_shared_memory(arena)
                        except SharedMemoryFull as exc:
                            log.warning("stream group %d goes through the socket: %s", parts[0][0], exc)
                            self.slots.release(arena)
                            arena = None
                        except BaseException as exc:  # noqa: BLE001 - ends the stream like the caller's own
                            self.slots.drop(arena)
                            self.exhausted = True
                            if self.failure is None:  # the caller's own exception, if any, comes first
                                self.failure, self.failed_at = exc, parts[0][0]
                            self.to_send.clear()
                            self.cond.notify_all()
                            return
                    self.inflight.append(_Sent(request, parts, arena, time.monotonic()))
                    self.cond.notify_all()
                yield sent
        finally:
            with self.cond:
                stream.closed_at = time.monotonic()
                self.cond.notify_all()

    # -------------------------------------------------------- answers (one thread per call)

    def _receive(self, stream: _StreamCall) -> None:
        """Takes the answers as they come (so the caller's pace never looks like a silent
        server) and frees their segments."""
        try:
            headers = stream.call.initial_metadata() or ()  # waits for them, or for the call's end
            if any(key == STREAM_OPEN_KEY for key, _ in headers):
                with self.cond:
                    stream.opened = True
            for response in stream.call:
                with self.cond:
                    if not self.inflight:
                        raise RuntimeError("reward server answered more stream messages than were sent")
                    sent = self.inflight.popleft()
                    self.answers.append((response, sent.parts))
                    self.last_answer = time.monotonic()
                    stream.answered = True
                    self.cond.notify_all()
                if sent.arena is not None:
                    self.slots.release(sent.arena)  # answered: the server has copied its bytes out
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            with self.cond:
                stream.error = exc
        finally:
            with self.cond:
                stream.done = True
                self.cond.notify_all()

    def _open(self) -> _StreamCall:
        stream = _StreamCall()
        client = self.client
        stream.call = client._score_stream(self._requests(stream), metadata=client._metadata, timeout=None)
        stream.receiver = threading.Thread(
            target=self._receive, args=(stream,), name="score-stream-answers", daemon=True
        )
        stream.receiver.start()
        return stream

    def _reopen(self, stream: _StreamCall) -> _StreamCall:
        """After ``stream`` failed: its unanswered messages go back in front, and a new call starts."""
        with self.cond:
            stream.stopped.set()
            unanswered = list(self.inflight)
            self.inflight.clear()
            self.to_send.extendleft((s.request, s.parts) for s in reversed(unanswered))
            self.cond.notify_all()
        for s in unanswered:
            if s.arena is not None:
                self.slots.drop(s.arena)  # the old server may still be reading it
        stream.receiver.join(5.0)
        return self._open()

    # -------------------------------------------------------- the caller's thread

    def _next_answer(self, stream: _StreamCall):
        """The next answer, or None once ``stream`` has ended with nothing more to take; raises
        DEADLINE_EXCEEDED when the server leaves messages unanswered for ``timeout_s``."""
        timeout_s = self.client.timeout_s
        with self.cond:
            while not self.answers and not stream.done:
                if self.inflight:
                    since = max(self.inflight[0].sent_at, self.last_answer)
                elif stream.closed_at is not None:  # only the stream's end is owed
                    since = max(stream.closed_at, self.last_answer)
                else:  # nothing owed: the caller's groups are slow in coming
                    self.cond.wait()
                    continue
                left = since + timeout_s - time.monotonic()
                if left <= 0:
                    raise ClientRpcError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"reward server {self.client.target}: ScoreStream left unanswered for {timeout_s:g}s "
                        f"({len(self.inflight)} message(s) in flight); the call was cancelled",
                    )
                self.cond.wait(left)
            return self.answers.popleft() if self.answers else None

    def _owed(self) -> bool:
        """Whether anything is left to send or to be answered (the caller's exception aside)."""
        with self.cond:
            return bool(self.inflight or self.to_send or not self.exhausted)

    def _complete(self, index: int) -> bool:
        """Whether every message of group ``index`` has been answered."""
        with self.cond:
            waiting = [parts for _, parts in self.to_send] + [s.parts for s in self.inflight]
        return all(i != index for parts in waiting for i, _ in parts)

    def results(self) -> Iterator[GroupScore]:
        client = self.client
        stream = self._open()
        pending: list[_Part] = []
        ok = False
        budget: _RetryBudget | None = None  # of the current outage
        try:
            while True:
                answer = self._next_answer(stream)
                if answer is not None:
                    response, parts = answer
                    for part in _collect(response, parts):
                        if pending and part.index != pending[0].index:
                            yield _merge_stream_parts(pending)
                            pending = []
                        pending.append(part)
                    continue
                error = stream.error
                if error is None or not self._owed():
                    break  # ended well, or failed with every answer in: nothing to do again
                # A new outage gets a fresh budget: the first failure, or one after an answer.
                # A stream the server had accepted (it was up, e.g. idle while the caller sampled,
                # then restarted) renews the attempts and time limit but not the backoff, so a
                # server that accepts streams and fails them at once is not retried in a hot loop.
                if budget is None or stream.answered:
                    budget = _RetryBudget(client.retry, client.target)
                elif stream.opened:
                    budget.renew()
                delay = budget.delay(error, "ScoreStream")
                if delay is None:
                    break
                time.sleep(delay)
                stream = self._reopen(stream)
            error = stream.error if self._owed() else None
            if pending and pending[0].index != self.failed_at and self._complete(pending[0].index):
                yield _merge_stream_parts(pending)  # a whole group, answered before the failure
                pending = []
            if self.failure is not None:  # the caller's: it ended the stream
                if error is not None:
                    log.warning("reward server %s: ScoreStream failed too: %s", client.target, error)
                raise self.failure
            if error is not None:
                raise error
            if self._owed():
                raise RuntimeError(
                    f"reward server {client.target} ended ScoreStream with {len(self.inflight)} message(s) unanswered"
                )
            ok = True
        finally:
            with self.cond:
                self.ended.set()
                stream.stopped.set()
                unanswered = [s.arena for s in self.inflight]
                self.inflight.clear()
            if not ok:
                stream.call.cancel()  # a failed or abandoned stream (a no-op once the call has ended)
            stream.receiver.join(5.0)
            for arena in unanswered:  # the server may still read them, unless the stream ended well
                if arena is not None:
                    if ok:
                        self.slots.release(arena)
                    else:
                        self.slots.drop(arena)
        if pending:
            yield _merge_stream_parts(pending)
