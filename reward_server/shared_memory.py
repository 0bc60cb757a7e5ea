"""Image bytes passed through POSIX shared memory by a client on the server's host.

The socket then carries only the request's small fields: the client writes its pixels once into
a segment it owns (``/dev/shm/advgrpo-...``), and the server copies them out of it while decoding
(``SharedMemoryReader.read``). Copying out, rather than scoring from the mapping, means nothing
the server keeps (a cached feature, a queued batch) can see the client reuse the segment.

The client side (``SharedMemoryArena``) depends only on the standard library and numpy: the
client library must not import the server's torch-heavy modules. Linux only (``/dev/shm``); in
containers, server and trainer need the same /dev/shm (``ipc: host`` or a shared volume).
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import uuid
from collections import OrderedDict
from multiprocessing import shared_memory
from pathlib import Path

from .errors import FailedPrecondition, InvalidArgument

PREFIX = "advgrpo-"
SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"advgrpo-[A-Za-z0-9_.-]{1,200}")
MAX_CHECK_BYTES = 64  # CheckSharedMemoryRequest.expected


class SegmentUnreadable(InvalidArgument):
    """A well-formed name this server cannot read: no such segment here (another host or IPC
    namespace) or no permission (another user). CheckSharedMemory answers it as not readable."""


class SharedMemoryFull(OSError):
    """Client side: /dev/shm has no room for a segment of the size asked (the bytes go inline)."""


class SharedMemoryReader:
    """Server side: maps client segments read-only (cached, by name and inode) and copies slices out."""

    def __init__(self, root: Path = SHM_DIR, max_mappings: int = 64):
        self.root = root
        self.max_mappings = max_mappings
        self._maps: OrderedDict[str, tuple[int, mmap.mmap]] = OrderedDict()  # name -> (inode, map)
        self._lock = threading.Lock()  # decoding may run on the event loop and in a worker thread

    def read(self, name: str, offset: int, size: int, where: str) -> bytes:
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"{where}.shared_memory.name: {name!r} is not a segment name this server reads "
                f"(expected {PREFIX}[A-Za-z0-9_.-]+)"
            )
        with self._lock:
            mapping = self._mapping(name, where)
            if offset + size > len(mapping):
                raise InvalidArgument(
                    f"{where}.shared_memory: offset {offset} + size {size} is past the end of segment "
                    f"{name!r} ({len(mapping)} bytes)"
                )
            return mapping[offset : offset + size]  # a copy: the client may reuse the segment after we answer

    def _mapping(self, name: str, where: str) -> mmap.mmap:
        path = self.root / name
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            raise SegmentUnreadable(
                f"{where}.shared_memory.name: no shared-memory segment {name!r} on the server's host "
                f"(is the client on another host or in another IPC namespace?)"
            ) from None
        cached = self._maps.get(name)
        if cached is not None and cached[0] == inode:
            self._maps.move_to_end(name)
            return cached[1]
        if cached is not None:  # the client replaced the segment (a new one under the same name)
            cached[1].close()
            del self._maps[name]
        try:
            fd = os.open(path, os.O_RDONLY)
        except PermissionError:
            raise SegmentUnreadable(
                f"{where}.shared_memory.name: segment {name!r}: permission denied (the server runs as "
                f"another user than the client)"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise InvalidArgument(f"{where}.shared_memory.name: segment {name!r} is empty")
            # MAP_POPULATE: fault the pages in with one call instead of one fault per page.
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._maps[name] = (inode, mapping)
        while len(self._maps) > self.max_mappings:
            _, (_, old) = self._maps.popitem(last=False)
            old.close()
        return mapping

    def close(self) -> None:
        with self._lock:
            for _, mapping in self._maps.values():
                mapping.close()
            self._maps.clear()


def read_shared(reader: SharedMemoryReader | None, ref, where: str) -> bytes:
    """The bytes an Image's ``shared_memory`` names; FAILED_PRECONDITION where the server has it off."""
    if reader is None:
        raise FailedPrecondition(
            f"{where}.shared_memory: this server does not read shared memory (server.shared_memory: false)"
        )
    return reader.read(ref.name, int(ref.offset), int(ref.size), where)


def check_readable(reader: SharedMemoryReader | None, ref, expected: bytes) -> tuple[bool, str]:
    """CheckSharedMemory: (readable, why not). Malformed requests are INVALID_ARGUMENT; a segment
    this server cannot see or open, or one holding other bytes, is an answer, not an error."""
    if not 1 <= len(expected) <= MAX_CHECK_BYTES:
        raise InvalidArgument(f"expected: 1 to {MAX_CHECK_BYTES} bytes, got {len(expected)}")
    if int(ref.size) != len(expected):
        raise InvalidArgument(f"slice.size: {ref.size} but expected has {len(expected)} bytes")
    if reader is None:
        return False, "this server does not read shared memory (server.shared_memory: false)"
    try:
        got = reader.read(ref.name, int(ref.offset), int(ref.size), "slice")
    except SegmentUnreadable as exc:
        return False, str(exc)
    if got != expected:
        return False, f"segment {ref.name!r} holds other bytes here (a segment of that name on another host?)"
    return True, ""


class SharedMemoryArena:
    """Client side: one segment this process owns, refilled for every request (one at a time).

    ``place`` copies a request's image bytes into the segment (growing it by replacing it with a
    bigger one) and returns where each landed. ``discard`` drops the segment, e.g. after a failed
    call, so a server still reading it never sees it rewritten. Python's resource tracker unlinks
    the segment should this process die without ``close``.
    """

    ALIGN = 64

    def __init__(self) -> None:
        self._shm: shared_memory.SharedMemory | None = None
        self.lock = threading.Lock()  # held by the call using the segment

    @property
    def name(self) -> str | None:
        return self._shm.name if self._shm is not None else None

    def place(self, chunks: list) -> list[tuple[str, int, int]]:
        """Copies each bytes-like of ``chunks`` into the segment; (name, offset, size) of each."""
        offsets, total = [], 0
        for data in chunks:
            offsets.append(total)
            total += -(-len(data) // self.ALIGN) * self.ALIGN
        if self._shm is None or self._shm.size < total:
            self.discard()
            capacity = max(total, 1 << 20)
            shm = shared_memory.SharedMemory(
                name=f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}", create=True, size=capacity
            )
            try:
                _reserve(shm)
            except OSError as exc:
                shm.close()
                shm.unlink()
                raise SharedMemoryFull(
                    exc.errno, f"/dev/shm has no room for a {capacity}-byte segment ({exc.strerror})"
                ) from None
            self._shm = shm
        buf = self._shm.buf
        for data, offset in zip(chunks, offsets):
            n = len(data)
            if n:
                buf[offset : offset + n] = data
        name = self._shm.name.lstrip("/")
        return [(name, offset, len(data)) for data, offset in zip(chunks, offsets)]

    def discard(self) -> None:
        if self._shm is not None:
            shm, self._shm = self._shm, None
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass

    close = discard


def _reserve(shm: shared_memory.SharedMemory) -> None:
    """Allocates a new segment's pages up front. Writing into a tmpfs that is out of room (Docker
    gives containers a 64 MB /dev/shm by default) kills the writer with SIGBUS; fallocate fails
    with ENOSPC instead, and the caller sends its bytes through the socket."""
    try:
        fd = os.open(SHM_DIR / shm.name.lstrip("/"), os.O_RDWR)
    except FileNotFoundError:  # not Linux's /dev/shm: nothing to reserve through
        return
    try:
        os.posix_fallocate(fd, 0, shm.size)
    finally:
        os.close(fd)


class StreamClosed(Exception):
    """Raised in a stream's request thread waiting for a slot when the stream has ended."""


class SharedMemorySlots:
    """Client side, for streams: one arena per message in flight, at most ``capacity`` at a time.

    A stream has several messages on their way at once, so none may reuse another's segment
    before its answer has come. ``acquire`` blocks (the stream's request thread) until a slot is
    free; ``release`` returns a slot once its message's answer has arrived (answers come in
    order); ``drop`` discards one the server may still be reading (after a failed stream).
    Arenas are kept across streams, so the server keeps its mappings of them.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._free: list[SharedMemoryArena] = []
        self._out = 0
        self._cond = threading.Condition()

    def acquire(self, stopped) -> SharedMemoryArena:
        """A free arena (new if none is kept); raises StreamClosed once ``stopped()`` is true."""
        with self._cond:
            while not self._free and self._out >= self.capacity:
                if stopped():
                    raise StreamClosed()
                self._cond.wait(0.05)
            self._out += 1
            return self._free.pop() if self._free else SharedMemoryArena()

    def release(self, arena: SharedMemoryArena) -> None:
        with self._cond:
            self._free.append(arena)
            self._out -= 1
            self._cond.notify()

    def drop(self, arena: SharedMemoryArena) -> None:
        arena.discard()
        with self._cond:
            self._out -= 1
            self._cond.notify()

    @property
    def segments(self) -> int:
        """Segments this pool holds now (kept plus in use)."""
        with self._cond:
            return len(self._free) + self._out

    def close(self) -> None:
        with self._cond:
            for arena in self._free:
                arena.discard()
            self._free.clear()
