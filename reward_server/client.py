"""The Python client trainers import: ``RewardClient("127.0.0.1:50051").score([...])``.

It encodes tensors/arrays/PIL images (raw RGB8 by default: cheapest to encode and to decode),
splits groups that exceed the message budget into several requests and stitches the answers
back, sets a deadline on every call, and retries UNAVAILABLE with exponential backoff.
Discriminator updates carry an idempotency key, so retrying them is safe too.

Depends only on grpc, numpy and PIL: no torch, no server code.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .images import encode_image_parts
from .shared_memory import SharedMemoryArena, SharedMemoryFull, SharedMemorySlots, StreamClosed

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
    max_attempts: int = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retryable: tuple = field(default=_RETRYABLE)


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
    ):
        """``keep_freed_memory``: tune this process's glibc allocator to keep freed buffers (see
        reward_server.allocator); it makes raw image transfers much cheaper, process-wide.

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
        to this many times; then ``score`` raises rather than mix versions within a group."""
        if parallel_calls < 1 or min_call_bytes < 1 or max_rescores < 0:
            raise ValueError("parallel_calls and min_call_bytes must be >= 1, max_rescores >= 0")
        if shared_memory not in (True, False, "auto"):
            raise ValueError(f"shared_memory must be True, False or 'auto', got {shared_memory!r}")
        if keep_freed_memory:
            from .allocator import keep_freed_memory as _keep

            _keep()
        self.target = target
        self.timeout_s = timeout_s
        self.encoding = encoding
        self.retry = retry or RetryPolicy()
        # Leave headroom below the limit for the non-image fields of a request.
        self.chunk_bytes = max(1024, int(max_message_bytes * 0.9))
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
            ],
        )
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        # Score, ScoreStream and UpdateDiscriminator carry the images: their requests are written
        # straight to the wire format (one copy of the pixels, see _ScoreBatch); the rest uses
        # protobuf as is.
        service = "/" + reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
        self._score = self._channel.unary_unary(
            f"{service}/Score", request_serializer=_ScoreBatch.serialize,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._score_stream = self._channel.stream_stream(
            f"{service}/ScoreStream", request_serializer=_ScoreBatch.serialize,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._update = self._channel.unary_unary(
            f"{service}/UpdateDiscriminator", request_serializer=_UpdateBatch.serialize,
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
        """"SERVING", "NOT_SERVING", ... of the server (or of one service)."""
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
            log.warning("reward server %s cannot read this client's shared memory (%s): image bytes "
                        "go through the socket", self.target, answer.detail)
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
            log.info("reward server %s: %d split group(s) straddled a model update; scoring them again",
                     self.target, len(straddled))
            again, still = self._score_once([(i, groups[i]) for i in straddled], weights)
            for i, s in zip(straddled, again):
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
        results = [p for response, (_, parts) in zip(responses, requests) for p in _collect(response, parts)]
        merged, straddled = _merge_parts(results)
        if len(merged) != len(indexed):
            raise RuntimeError(f"expected scores for {len(indexed)} groups, got {len(merged)}")
        position = {index: k for k, (index, _) in enumerate(indexed)}
        return merged, sorted(position[i] for i in straddled)

    def score_stream(
        self, groups: Iterable[Group], weights: dict[str, float] | None = None
    ) -> Iterator[GroupScore]:
        """Streams groups as they come (e.g. as a sampler decodes them) and yields each group's
        scores in order, as soon as the server has them. The server scores several at once."""
        parts_fifo: list[list[tuple[int, int]]] = []
        counter = [0]
        slots = self._stream_slots if self._stream_slots is not None and self.uses_shared_memory() else None
        # One entry per message in flight: its arena, or None for a message sent inline.
        held: collections.deque[SharedMemoryArena | None] = collections.deque()
        ended = threading.Event()
        held_lock = threading.Lock()  # the request thread appends, this one drains at the end

        def requests() -> Iterator[reward_pb2.ScoreRequest]:
            for g in groups:
                index = counter[0]
                counter[0] += 1
                for request, parts in self._requests([self._encode_group(g, index)], weights, self.chunk_bytes):
                    if slots is not None:
                        try:
                            arena = slots.acquire(ended.is_set)
                        except StreamClosed:
                            return
                        # Under the lock, so that the stream's end (which drops what is held)
                        # never races a segment being made.
                        with held_lock:
                            if ended.is_set():  # the stream ended while we waited: never sent
                                slots.release(arena)
                                return
                            try:
                                request = request.via_shared_memory(arena)
                            except SharedMemoryFull as exc:
                                log.warning("stream group %d goes through the socket: %s", index, exc)
                                slots.release(arena)
                                arena = None
                            held.append(arena)
                    parts_fifo.append(parts)
                    yield request

        pending: list[_Part] = []
        ok = False
        try:
            for response in self._score_stream(requests(), metadata=self._metadata, timeout=None):
                parts = parts_fifo.pop(0)
                if slots is not None and (arena := held.popleft()) is not None:
                    slots.release(arena)  # answered: the server has copied its bytes out
                for part in _collect(response, parts):
                    if pending and part.index != pending[0].index:
                        yield _merge_stream_parts(pending)
                        pending = []
                    pending.append(part)
            ok = True
        finally:
            with held_lock:
                ended.set()
                while held:  # unanswered (a failed or abandoned stream): the server may still read them
                    arena = held.popleft()
                    if arena is None:
                        continue
                    if ok:
                        slots.release(arena)
                    else:
                        slots.drop(arena)
        if pending:
            yield _merge_stream_parts(pending)

    def update_discriminator(
        self,
        model: str,
        references: Sequence[Group],
        generated: Sequence[Group],
        steps: int = 1,
        update_id: str | None = None,
    ) -> UpdateResult:
        """One discriminator update (``steps`` optimizer steps); safe to retry (idempotency key)."""
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

    def _call(self, method: Callable[..., T], request) -> T:
        policy = self.retry
        backoff = policy.initial_backoff_s
        for attempt in range(1, policy.max_attempts + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in policy.retryable or attempt == policy.max_attempts:
                    raise
                delay = backoff * (0.5 + random.random() / 2)  # jitter keeps clients from stampeding
                log.warning("reward server %s: %s; retry %d in %.2fs", self.target, exc.code().name, attempt, delay)
                time.sleep(delay)
                backoff = min(backoff * policy.multiplier, policy.max_backoff_s)
        raise AssertionError("unreachable")

    def _call_concurrently(self, method, requests: list) -> list:
        """The responses to ``requests``, in order, with up to ``parallel_calls`` in flight.
        A call that fails with a retryable status is retried alone (``_call``, with backoff);
        any other failure cancels the calls still running and is raised."""
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
                    if exc.code() not in self.retry.retryable:
                        raise
                    responses[k] = self._call(method, requests[k])
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
            return self._call(method, request)
        try:
            placed = request.via_shared_memory(arena)
        except SharedMemoryFull as exc:
            log.warning("reward server %s: this call's images go through the socket: %s", self.target, exc)
            return self._call(method, request)
        try:
            return self._call(method, placed)
        except BaseException:
            arena.discard()  # the server may still be reading it: never rewrite it
            raise

    def _encode_group(self, group: Group, index: int) -> "_Encoded":
        images = [encode_image_parts(img, self.encoding) for img in group.images]
        return _Encoded(index, group.group_id or str(index), group.prompt, images)

    def _requests(
        self, encoded: Sequence["_Encoded"], weights, budget: int
    ) -> Iterator[tuple["_ScoreBatch", list]]:
        """Packs groups into requests of at most ``budget`` bytes, in order, filling each request
        image by image: a group that does not fit the room left is split there (one image always
        goes, so an image bigger than the budget travels alone). Every request but the last thus
        holds more than ``budget`` minus one image. Sizes are summed from the image bytes
        (protobuf's ByteSize() walks 12 MB per call)."""
        batch = _ScoreBatch([], dict(weights or {}))
        parts: list[tuple[int, int]] = []  # (group index, part number) per group in the request
        size = 0
        for enc in encoded:
            head, images = enc.head_bytes(), enc.images
            start = part_no = 0
            while True:
                taken, piece_size = start, head  # images[start:taken] fit the room left
                while taken < len(images):
                    image_size = len(images[taken][3]) + _FIELD_OVERHEAD
                    if size + piece_size + image_size > budget:
                        break
                    piece_size += image_size
                    taken += 1
                if taken == start and parts and (start < len(images) or size + head > budget):
                    yield batch, parts  # no room left: the rest goes in a new request
                    batch, parts, size = _ScoreBatch([], dict(weights or {})), [], 0
                    continue
                if taken == start < len(images):  # alone, and still over the budget: it goes anyway
                    piece_size += len(images[taken][3]) + _FIELD_OVERHEAD
                    taken += 1
                batch.groups.append(_Encoded(enc.index, enc.group_id, enc.prompt, images[start:taken]))
                parts.append((enc.index, part_no))
                size += piece_size
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

    def via_shared_memory(self, arena: SharedMemoryArena) -> "_UpdateBatch":
        placed = _place_groups(self.references + self.generated, arena)
        n = len(self.references)
        return _UpdateBatch(self.model, placed[:n], placed[n:], self.steps, self.update_id)


_FIELD_OVERHEAD = 16  # bytes of tags and lengths per image / group, generously


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
        for g, (index, part_no) in zip(response.groups, parts)
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
    """One streamed group's pieces. A stream cannot re-send a group, so a group that straddled an
    update is reported under the newest version involved, and logged."""
    (merged,), straddled = _merge_parts(parts)
    if straddled:
        log.warning("group %r: its parts were scored under different model versions", merged.group_id)
    return merged
