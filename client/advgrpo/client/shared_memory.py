"""The client's use of shared-memory segments (advgrpo.common.shared_memory) for a server on this
host: whether to use them (``"auto"`` asks the server once, CheckSharedMemory), the one arena of
unary calls, the slots of streams, and placing a request's image bytes into a segment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Callable, Iterator, TypeVar

import grpc

from advgrpo.client.encoding import EncodedGroup, ScoreBatch, SharedRef, UpdateBatch
from advgrpo.common.shared_memory import SharedMemoryArena, SharedMemoryFull, SharedMemorySlots
from advgrpo.reward.v1 import reward_pb2

log = logging.getLogger(__name__)
Request = TypeVar("Request", ScoreBatch, UpdateBatch)


def place_groups(groups: list[EncodedGroup], arena: SharedMemoryArena) -> list[EncodedGroup]:
    """Copies every image's (and reference's) bytes into ``arena``; the groups with SharedRefs in
    their place."""
    slices = iter(arena.place([data for g in groups for *_, data in g.images + g.references]))

    def placed(image):
        e, h, w, _ = image
        return e, h, w, SharedRef(*next(slices))

    return [g.with_images(placed) for g in groups]  # images, then references: the order placed


def place_request(request: Request, arena: SharedMemoryArena) -> Request:
    """``request`` with its image bytes in ``arena`` (raises SharedMemoryFull where /dev/shm is)."""
    return request.with_groups(place_groups(request.all_groups(), arena))


class ClientSegments:
    """A client's segments: ``arena`` for unary calls (one call at a time), ``slots`` for streams
    (``stream_slots`` messages in flight); both None when shared memory is off."""

    def __init__(self, mode: bool | str, stream_slots: int, target: str):
        if mode not in (True, False, "auto"):
            raise ValueError(f"shared_memory must be True, False or 'auto', got {mode!r}")
        self.target = target
        self.arena = SharedMemoryArena() if mode else None
        self.slots = SharedMemorySlots(stream_slots) if mode else None
        # Whether image bytes go through shared memory: None until 'auto' has asked the server.
        self._usable: bool | None = None if mode == "auto" else bool(mode)
        self._check_lock = threading.Lock()

    def usable(self, check: Callable[[reward_pb2.CheckSharedMemoryRequest], reward_pb2.CheckSharedMemoryResponse]):
        """Whether image bytes go through shared memory; with ``"auto"`` the first call asks the
        server through ``check`` (CheckSharedMemory) and the answer is kept."""
        if self._usable is None:
            with self._check_lock:
                if self._usable is None:
                    self._usable = self._server_reads(check)
        return self._usable

    def _server_reads(self, check) -> bool:
        """Writes a random token into the arena and asks the server to read it back."""
        token = os.urandom(16)
        arena = self.arena
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
            answer = check(request)
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

    @contextlib.contextmanager
    def segment(self, check) -> Iterator[SharedMemoryArena | None]:
        """The arena, held for the block, if there is one, it is ``usable`` and no other thread is
        using it; else None (the bytes go inline)."""
        arena = self.arena
        if arena is None or not self.usable(check) or not arena.lock.acquire(blocking=False):
            yield None
            return
        try:
            yield arena
        finally:
            arena.lock.release()

    def call(self, call: Callable[[Request], object], request: Request, arena: SharedMemoryArena | None, inline):
        """``call(request)``; with ``arena`` (held), the image bytes go through shared memory;
        without, or where /dev/shm is full, ``call(inline(request))`` sends them in the message."""
        if arena is None:
            return call(inline(request))
        try:
            placed = place_request(request, arena)
        except SharedMemoryFull as exc:
            log.warning("reward server %s: this call's images go through the socket: %s", self.target, exc)
            return call(inline(request))
        try:
            return call(placed)
        except BaseException:
            arena.discard()  # the server may still be reading it: never rewrite it
            raise

    def close(self) -> None:
        if self.arena is not None:
            with self.arena.lock:
                self.arena.close()
        if self.slots is not None:
            self.slots.close()
