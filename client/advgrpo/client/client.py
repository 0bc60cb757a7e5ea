"""``RewardClient``: one channel to a reward server, and the calls trainers make on it.

The jobs it hands out: encoding images and writing requests (advgrpo.client.encoding), packing
groups into calls and stitching the answers (packing), retries (retry), shared memory
(shared_memory), streams (stream) and the health check (health).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import grpc

from advgrpo.client import health
from advgrpo.client.encoding import (
    EncodedGroup,
    ScoreBatch,
    UpdateBatch,
    check_min_versions,
    encode_group,
    fit_inline,
)
from advgrpo.client.packing import PartList, call_budget, collect, merge_parts, pack_requests
from advgrpo.client.retry import RetryPolicy, call_with_retry, channel_options
from advgrpo.client.shared_memory import ClientSegments
from advgrpo.client.stream import StreamRun
from advgrpo.client.types import Group, GroupScore, ModelInfo, UpdateResult
from advgrpo.common.shared_memory import SharedMemoryArena, SharedMemorySlots
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
# The unary methods gRPC retries itself (advgrpo.client.retry); ScoreStream is replayed by us.
UNARY_METHODS = ("Score", "UpdateDiscriminator", "ListModels", "CheckSharedMemory")


def channel_credentials(
    tls: bool, ca: str | Path | None, cert: str | Path | None, key: str | Path | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel, or None for plaintext (no TLS option given)."""
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key: give both (the client certificate and its key) or neither")
    if not (tls or ca is not None or cert is not None):
        return None

    def read(path, name):
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{name} {path}: cannot read ({exc.strerror})") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "tls_ca"), private_key=read(key, "tls_key"), certificate_chain=read(cert, "tls_cert")
    )


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
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
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

        ``tls``: connect over TLS, checking the server's certificate against the system's CAs or
        ``tls_ca`` (a PEM bundle; giving it, or a client certificate, implies ``tls``).
        ``tls_cert``/``tls_key``: this client's PEM certificate chain and key, for a server that
        requires them (mutual TLS, the server's ``--tls-client-ca``). ``tls_server_name``: the
        name to check the server's certificate against, when ``target`` is not it.

        ``timeout_s``: the deadline of each call (gRPC's own retries of it included, see
        RetryPolicy); for ``score_stream``, how long the server may leave messages unanswered
        (see there)."""
        if parallel_calls < 1 or min_call_bytes < 1 or max_rescores < 0 or max_images_per_call < 1:
            raise ValueError("parallel_calls, min_call_bytes and max_images_per_call must be >= 1, max_rescores >= 0")
        self._segments = ClientSegments(shared_memory, stream_slots, target)
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
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC's own reconnect backoff grows to 120 s by default: a channel would then
            # sit out a restarted server for longer than the retry budget. Keep it short.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max(100, int(self.retry.max_backoff_s * 1000))),
            # gRPC retries the unary calls itself first (a service-config retryPolicy).
            *channel_options(self.retry, SERVICE, UNARY_METHODS, max_message_bytes, timeout_s),
        ]
        credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
        # Score, ScoreStream and UpdateDiscriminator carry the images: their requests are written
        # straight to the wire format (one copy of the pixels, advgrpo.client.encoding); the rest
        # uses protobuf as is.
        self._score = self._channel.unary_unary(
            f"/{SERVICE}/Score",
            request_serializer=ScoreBatch.serialize,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._score_stream = self._channel.stream_stream(
            f"/{SERVICE}/ScoreStream",
            request_serializer=ScoreBatch.serialize,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._update = self._channel.unary_unary(
            f"/{SERVICE}/UpdateDiscriminator",
            request_serializer=UpdateBatch.serialize,
            response_deserializer=reward_pb2.UpdateDiscriminatorResponse.FromString,
        )
        self._health = health.check_method(self._channel)

    @property
    def _arena(self) -> SharedMemoryArena | None:
        return self._segments.arena

    @property
    def _stream_slots(self) -> SharedMemorySlots | None:
        return self._segments.slots

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._channel.close()
        self._segments.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", ... of the server (or of one service): the standard
        grpc.health.v1 check (advgrpo.client.health). Raises grpc.RpcError if it cannot be asked."""
        return self._health(service, timeout=timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Blocks until the server reports SERVING; raises TimeoutError after ``timeout_s``.

        The health check is made with gRPC's ``wait_for_ready``: while the server is not reachable
        (not started yet, restarting) gRPC holds the call until the channel connects, instead of
        failing it at once; a server that answers but is not SERVING yet is asked again."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"reward server at {self.target} not SERVING after {timeout_s:.0f}s")
            try:
                if self._health("", timeout=left, wait_for_ready=True) == "SERVING":
                    return
            except grpc.RpcError:
                pass  # the deadline (checked above), or a server not answering health checks yet
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def uses_shared_memory(self) -> bool:
        """Whether this client's image bytes go through shared memory. With ``shared_memory="auto"``
        the first call asks the server (CheckSharedMemory) and the answer is kept."""
        return self._segments.usable(self._check_shared_memory)

    def _check_shared_memory(self, request: reward_pb2.CheckSharedMemoryRequest):
        return self._call(self._stub.CheckSharedMemory, request)

    # ------------------------------------------------------------------ calls

    def list_models(self) -> list[ModelInfo]:
        response = self._call(self._stub.ListModels, reward_pb2.ListModelsRequest())
        return [ModelInfo(m.name, m.kind, m.trainable, m.version, m.default_weight) for m in response.models]

    def score(
        self,
        groups: Sequence[Group],
        weights: dict[str, float] | None = None,
        min_versions: dict[str, int] | None = None,
    ) -> list[GroupScore]:
        """Scores groups (message-sized chunks, several calls in flight for big payloads);
        results in the order given. A group is always scored under one version of each model.

        ``min_versions`` (model name -> version; ScoreRequest.min_versions): every call is scored
        with at least that version of each named model. A server that does not have it yet
        waits for it (up to its ``server.min_version_wait_s``), then fails the call with
        FAILED_PRECONDITION; a name it does not serve is NOT_FOUND. A trainer passes the version
        its last ``update_discriminator`` returned, so that no reward comes from an older
        discriminator (on any replica of the server). ValueError for a name that is not a
        non-empty string or a version that is not an integer >= 0."""
        min_versions = check_min_versions(min_versions)
        scores, straddled = self._score_once(list(enumerate(groups)), weights, min_versions)
        for _ in range(self.max_rescores):
            if not straddled:
                break
            log.info(
                "reward server %s: %d split group(s) straddled a model update; scoring them again",
                self.target,
                len(straddled),
            )
            again, still = self._score_once([(i, groups[i]) for i in straddled], weights, min_versions)
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
        self, indexed: list[tuple[int, Group]], weights: dict[str, float] | None, min_versions: dict[str, int]
    ) -> tuple[list[GroupScore], list[int]]:
        """One pass over ``indexed`` (caller's index, group): the scores in that order, and the
        positions (into ``indexed``) of split groups whose parts saw different model versions."""
        encoded = [self._encode_group(g, i) for i, g in indexed]
        with self._segments.segment(self._check_shared_memory) as arena:
            budget = self.chunk_bytes if arena is not None else self._call_budget(encoded)
            requests = list(self._requests(encoded, weights, budget, min_versions))
            if arena is None and len(requests) > 1 and self.parallel_calls > 1:
                responses = self._call_concurrently(self._score, [r for r, _ in requests])
            else:
                responses = [self._call_images(self._score, r, arena) for r, _ in requests]
        results = [
            p for response, (_, parts) in zip(responses, requests, strict=True) for p in collect(response, parts)
        ]
        merged, straddled = merge_parts(results)
        if len(merged) != len(indexed):
            raise RuntimeError(f"expected scores for {len(indexed)} groups, got {len(merged)}")
        position = {index: k for k, (index, _) in enumerate(indexed)}
        return merged, sorted(position[i] for i in straddled)

    def score_stream(
        self,
        groups: Iterable[Group],
        weights: dict[str, float] | None = None,
        min_versions: dict[str, int] | None = None,
    ) -> Iterator[GroupScore]:
        """Streams groups as they come (e.g. as a sampler decodes them) and yields each group's
        scores in order, as soon as the server has them. The server scores several at once.
        ``min_versions``: every message carries it, as ``score``'s calls do (see there); checked
        here, before anything is sent.

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
        min_versions = check_min_versions(min_versions)
        return self._stream_results(groups, weights, min_versions)

    def _stream_results(self, groups: Iterable[Group], weights, min_versions: dict[str, int]) -> Iterator[GroupScore]:
        yield from StreamRun(self, groups, weights, min_versions).results()

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
        if even that is too large, ValueError, before anything is sent. ``Group.references`` has
        no place here (ValueError): an update's real images are its ``references`` argument."""
        for name, groups in (("references", references), ("generated", generated)):
            for i, g in enumerate(groups):
                if len(g.references):
                    raise ValueError(
                        f"update_discriminator: {name}[{i}] has Group.references, which only score uses; "
                        "pass the real images as update_discriminator's references"
                    )
        request = UpdateBatch(
            model,
            [self._encode_group(g, i) for i, g in enumerate(references)],
            [self._encode_group(g, i) for i, g in enumerate(generated)],
            steps,
            update_id or uuid.uuid4().hex,
        )
        with self._segments.segment(self._check_shared_memory) as arena:
            r = self._call_images(self._update, request, arena)
        return UpdateResult(r.model, r.version, r.loss, r.reference_score, r.generated_score, r.accuracy, r.replayed)

    # ------------------------------------------------------------------ internals

    def _call(self, method: Callable[..., T], request, failed: grpc.RpcError | None = None) -> T:
        """``method(request)`` with this client's deadline, retried as ``self.retry`` says (gRPC's
        own attempts first, advgrpo.client.retry); ``failed``: the first call, made elsewhere,
        failed with it."""
        return call_with_retry(
            method, request, self.retry, self.target, timeout_s=self.timeout_s, metadata=self._metadata, failed=failed
        )

    def _call_concurrently(self, method, requests: list) -> list:
        """The responses to ``requests``, in order, with up to ``parallel_calls`` in flight.
        A call that fails with a retryable status (once gRPC's own retries are spent) is retried
        alone (``_call``, with backoff); any other failure (``_call`` raises it at once) cancels
        the calls still running."""
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

    def _call_budget(self, encoded: Sequence[EncodedGroup]) -> int:
        """Bytes per Score call for ``encoded`` (advgrpo.client.packing.call_budget)."""
        return call_budget(encoded, self.chunk_bytes, self.parallel_calls, self.min_call_bytes)

    def _call_images(self, method, request: ScoreBatch | UpdateBatch, arena: SharedMemoryArena | None):
        """``_call``; with ``arena`` (held), the image bytes go through shared memory."""
        return self._segments.call(lambda r: self._call(method, r), request, arena, self._fit_inline)

    def _fit_inline(self, request: ScoreBatch | UpdateBatch) -> ScoreBatch | UpdateBatch:
        """``request`` as it can go through the socket (advgrpo.client.encoding.fit_inline)."""
        return fit_inline(request, self.max_message_bytes, self.target)

    def _encode_group(self, group: Group, index: int) -> EncodedGroup:
        return encode_group(group, index, self.encoding)

    def _requests(
        self, encoded: Sequence[EncodedGroup], weights, budget: int, min_versions: dict[str, int] | None = None
    ) -> Iterator[tuple[ScoreBatch, PartList]]:
        """Requests of at most ``budget`` bytes and ``max_images_per_call`` images, each carrying
        ``weights`` and ``min_versions`` (advgrpo.client.packing.pack_requests)."""
        return pack_requests(encoded, weights, budget, self.max_images_per_call, min_versions)
