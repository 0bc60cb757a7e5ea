"""The Python client trainers import: ``RewardClient("127.0.0.1:50051").score([...])``.

It encodes tensors/arrays/PIL images (raw RGB8 by default: cheapest to encode and to decode),
splits groups that exceed the message budget into several requests and stitches the answers
back, sets a deadline on every call, and retries UNAVAILABLE with exponential backoff.
Discriminator updates carry an idempotency key, so retrying them is safe too.

Depends only on grpc, numpy and PIL: no torch, no server code.
"""

from __future__ import annotations

import contextlib
import logging
import random
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

from .images import encode_image_parts
from .shared_memory import SharedMemoryArena

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
        shared_memory: bool = False,
    ):
        """``keep_freed_memory``: tune this process's glibc allocator to keep freed buffers (see
        reward_server.allocator); it makes raw image transfers much cheaper, process-wide.

        ``shared_memory``: for a server on this host (same /dev/shm), ``score`` and
        ``update_discriminator`` pass the image bytes through a shared-memory segment this client
        owns instead of the socket (the server must have ``server.shared_memory`` on, the
        default). One call at a time uses the segment; a concurrent call from another thread
        sends its bytes inline. Streams always send inline."""
        if keep_freed_memory:
            from .allocator import keep_freed_memory as _keep

            _keep()
        self.target = target
        self.timeout_s = timeout_s
        self.encoding = encoding
        self.retry = retry or RetryPolicy()
        # Leave headroom below the limit for the non-image fields of a request.
        self.chunk_bytes = max(1024, int(max_message_bytes * 0.9))
        self._arena = SharedMemoryArena() if shared_memory else None
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

    # ------------------------------------------------------------------ calls

    def list_models(self) -> list[ModelInfo]:
        response = self._call(self._stub.ListModels, reward_pb2.ListModelsRequest())
        return [ModelInfo(m.name, m.kind, m.trainable, m.version, m.default_weight) for m in response.models]

    def score(self, groups: Sequence[Group], weights: dict[str, float] | None = None) -> list[GroupScore]:
        """Scores groups (one unary call per message-sized chunk); results in the order given."""
        encoded = [self._encode_group(g, i) for i, g in enumerate(groups)]
        results: list[_Part] = []
        with self._segment() as arena:
            for request, parts in self._requests(encoded, weights):
                response = self._call_images(self._score, request, arena)
                results.extend(_collect(response, parts))
        merged = _merge_parts(results)
        if len(merged) != len(groups):
            raise RuntimeError(f"expected scores for {len(groups)} groups, got {len(merged)}")
        return merged

    def score_stream(
        self, groups: Iterable[Group], weights: dict[str, float] | None = None
    ) -> Iterator[GroupScore]:
        """Streams groups as they come (e.g. as a sampler decodes them) and yields each group's
        scores in order, as soon as the server has them. The server scores several at once."""
        parts_fifo: list[list[tuple[int, int]]] = []
        counter = [0]

        def requests() -> Iterator[reward_pb2.ScoreRequest]:
            for g in groups:
                index = counter[0]
                counter[0] += 1
                for request, parts in self._requests([self._encode_group(g, index)], weights):
                    parts_fifo.append(parts)
                    yield request

        pending: list[_Part] = []
        for response in self._score_stream(requests(), metadata=self._metadata, timeout=None):
            for part in _collect(response, parts_fifo.pop(0)):
                if pending and part.index != pending[0].index:
                    yield _merge_parts(pending)[0]
                    pending = []
                pending.append(part)
        if pending:
            yield _merge_parts(pending)[0]

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

    @contextlib.contextmanager
    def _segment(self) -> Iterator[SharedMemoryArena | None]:
        """This client's shared-memory arena, held for the block, if it has one and no other
        thread is using it; else None (the bytes go inline)."""
        arena = self._arena
        if arena is None or not arena.lock.acquire(blocking=False):
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
        placed = request.via_shared_memory(arena)
        try:
            return self._call(method, placed)
        except BaseException:
            arena.discard()  # the server may still be reading it: never rewrite it
            raise

    def _encode_group(self, group: Group, index: int) -> "_Encoded":
        images = [encode_image_parts(img, self.encoding) for img in group.images]
        return _Encoded(index, group.group_id or str(index), group.prompt, images)

    def _requests(self, encoded: Sequence["_Encoded"], weights) -> Iterator[tuple["_ScoreBatch", list]]:
        """Packs groups into requests below the chunk budget, splitting groups that are too big.
        Sizes are summed from the image bytes (protobuf's ByteSize() walks 12 MB per call)."""
        batch = _ScoreBatch([], dict(weights or {}))
        parts: list[tuple[int, int]] = []  # (group index, part number) per group in the request
        size = 0
        for enc in encoded:
            for part_no, piece in enumerate(enc.split(self.chunk_bytes)):
                piece_size = piece.nbytes()
                if parts and size + piece_size > self.chunk_bytes:
                    yield batch, parts
                    batch, parts, size = _ScoreBatch([], dict(weights or {})), [], 0
                batch.groups.append(piece)
                parts.append((enc.index, part_no))
                size += piece_size
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

    def nbytes(self) -> int:
        """An upper bound of the serialised ImageGroup's size."""
        text = len(self.group_id.encode()) + len(self.prompt.encode()) + 2 * _FIELD_OVERHEAD
        return text + sum(len(data) + _FIELD_OVERHEAD for *_, data in self.images)

    def split(self, budget: int) -> list["_Encoded"]:
        """Pieces of this group (same id and prompt) that each fit ``budget``, images in order."""
        if self.nbytes() <= budget:
            return [self]
        pieces: list[_Encoded] = []
        current: list[tuple[int, int, int, bytes | memoryview]] = []
        for image in self.images:
            candidate = _Encoded(self.index, self.group_id, self.prompt, current + [image])
            if current and candidate.nbytes() > budget:
                pieces.append(_Encoded(self.index, self.group_id, self.prompt, current))
                current = []
            current.append(image)
        pieces.append(_Encoded(self.index, self.group_id, self.prompt, current))
        return pieces

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


def _merge_parts(parts: list[_Part]) -> list[GroupScore]:
    """Stitches the pieces of split groups back together, in group order."""
    by_index: dict[int, list[_Part]] = {}
    for p in parts:
        by_index.setdefault(p.index, []).append(p)
    merged = []
    for index in sorted(by_index):
        pieces = [p.score for p in sorted(by_index[index], key=lambda p: p.part)]
        first = pieces[0]
        for p in pieces[1:]:
            first.rewards.extend(p.rewards)
            for k, v in p.components.items():
                first.components[k].extend(v)
            for k, v in p.model_versions.items():
                # A split group may straddle an update: report the newest version involved.
                first.model_versions[k] = max(first.model_versions[k], v)
        merged.append(first)
    return merged
