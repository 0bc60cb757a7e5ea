"""Image bytes passed through POSIX shared memory by a client on the server's host.

The socket then carries only the request's small fields: the client writes its pixels once into
a segment it owns (``/dev/shm/advgrpo-...``), and the server copies them out of it with ``pread``
while decoding, off its event loop (``SharedMemoryReader.read``). Copying out, rather than scoring
from the segment, means nothing the server keeps (a cached feature, a queued batch) can see the
client reuse the segment.

The client side (``SharedMemoryArena``) depends only on the standard library and numpy: the
client library must not import the server's torch-heavy modules. Linux only (``/dev/shm``); in
containers, server and trainer need the same /dev/shm (``ipc: host`` or a shared volume).
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import threading
import uuid
from multiprocessing import shared_memory
from pathlib import Path

from advgrpo.common.errors import FailedPrecondition, InvalidArgument

PREFIX = "advgrpo-"
SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"advgrpo-[A-Za-z0-9_.-]{1,200}")
MAX_CHECK_BYTES = 64  # CheckSharedMemoryRequest.expected


class SegmentUnreadable(InvalidArgument):
    """A well-formed name this server cannot read: no such segment here (another host or IPC
    namespace), no permission (another user), or not a regular file (a symlink, FIFO, directory...).
    CheckSharedMemory answers it as not readable."""


class SharedMemoryFull(OSError):
    """Client side: /dev/shm has no room for a segment of the size asked (the bytes go inline)."""


class SharedMemoryReader:
    """Server side: copies slices out of client segments with ``pread``; keeps nothing open.

    Nothing is mapped: a client that shrinks its segment under the server costs the read a short
    count (INVALID_ARGUMENT), where a mapping would kill the server with SIGBUS. Every read opens
    the segment afresh (``O_NOFOLLOW | O_NONBLOCK``) and insists on a regular file, so a symlink,
    FIFO, directory or device named like a segment is refused without being followed, read or
    waited on. Reads block on the kernel's copy only: the server runs them off the event loop.
    """

    def __init__(self, root: Path = SHM_DIR):
        self.root = root

    def read(self, name: str, offset: int, size: int, where: str) -> bytes:
        fd = self._open(name, offset, size, where)
        try:
            data = _pread_exact(fd, size, offset)
        finally:
            os.close(fd)
        if data is None:
            raise InvalidArgument(
                f"{where}.shared_memory: segment {name!r} shrank below offset {offset} + size {size} "
                f"while the server read it"
            )
        return data  # a copy: the client may reuse the segment after we answer

    def open(self, name: str, offset: int, size: int, where: str) -> io.BufferedReader:
        """A read-only file over one slice that reads the segment as it goes (to parse an image's
        header without copying the image out); close it after use."""
        return io.BufferedReader(_SliceFile(self._open(name, offset, size, where), offset, size), 16384)

    def _open(self, name: str, offset: int, size: int, where: str) -> int:
        """An fd of the segment (a regular file holding the slice); SegmentUnreadable otherwise."""
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"{where}.shared_memory.name: {name!r} is not a segment name this server reads "
                f"(expected {PREFIX}[A-Za-z0-9_.-]+)"
            )
        path = self.root / name
        try:  # lstat first: never open (nor wait on) a FIFO or device named like a segment
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise _NotRegular(st.st_mode)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _unreadable(exc, name, where) from None
        try:
            st = os.fstat(fd)  # it may have been replaced between lstat and open
            if not stat.S_ISREG(st.st_mode):
                raise _unreadable(_NotRegular(st.st_mode), name, where)
            if st.st_size == 0:
                raise InvalidArgument(f"{where}.shared_memory.name: segment {name!r} is empty")
            if offset + size > st.st_size:
                raise InvalidArgument(
                    f"{where}.shared_memory: offset {offset} + size {size} is past the end of segment "
                    f"{name!r} ({st.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd


class _NotRegular(OSError):
    def __init__(self, mode: int):
        kinds = (
            (stat.S_ISLNK, "symbolic link"),
            (stat.S_ISDIR, "directory"),
            (stat.S_ISFIFO, "FIFO"),
            (stat.S_ISSOCK, "socket"),
            (stat.S_ISCHR, "character device"),
            (stat.S_ISBLK, "block device"),
        )
        super().__init__(next((k for test, k in kinds if test(mode)), "special file"))


def _unreadable(exc: OSError, name: str, where: str) -> SegmentUnreadable:
    field = f"{where}.shared_memory.name"
    if isinstance(exc, FileNotFoundError):
        return SegmentUnreadable(
            f"{field}: no shared-memory segment {name!r} on the server's host "
            f"(is the client on another host or in another IPC namespace?)"
        )
    if isinstance(exc, PermissionError):
        return SegmentUnreadable(
            f"{field}: segment {name!r}: permission denied (the server runs as another user than the client)"
        )
    if isinstance(exc, _NotRegular):
        return SegmentUnreadable(f"{field}: {name!r} is a {exc}, not a shared-memory segment (a regular file)")
    if exc.errno == errno.ELOOP:
        return SegmentUnreadable(f"{field}: {name!r} is a symbolic link, not a shared-memory segment")
    return SegmentUnreadable(f"{field}: segment {name!r} cannot be opened ({exc.strerror or exc})")


def _pread_exact(fd: int, size: int, offset: int) -> bytes | None:
    """``size`` bytes at ``offset`` (one copy, into the bytes returned); None if the file ends first."""
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts, got = [data], len(data)
    while got < size:  # a read stops short at the end of the file (or after 2 GiB)
        part = os.pread(fd, size - got, offset + got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class _SliceFile(io.RawIOBase):
    """Raw file over bytes [offset, offset + size) of an fd, read with pread; closes the fd."""

    def __init__(self, fd: int, offset: int, size: int):
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        with memoryview(buf) as view:
            got = os.preadv(self._fd, [view.cast("B")[:n]], self._start + self._pos)
        self._pos += got
        return got

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def read_shared(reader: SharedMemoryReader | None, ref, where: str) -> bytes:
    """The bytes an Image's ``shared_memory`` names; FAILED_PRECONDITION where the server has it off."""
    return _reader(reader, where).read(ref.name, int(ref.offset), int(ref.size), where)


def open_shared(reader: SharedMemoryReader | None, ref, where: str) -> io.BufferedReader:
    """A file reading the slice an Image's ``shared_memory`` names as it goes (``SharedMemoryReader.open``)."""
    return _reader(reader, where).open(ref.name, int(ref.offset), int(ref.size), where)


def _reader(reader: SharedMemoryReader | None, where: str) -> SharedMemoryReader:
    if reader is None:
        raise FailedPrecondition(
            f"{where}.shared_memory: this server does not read shared memory (server.shared_memory: false)"
        )
    return reader


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
        for data, offset in zip(chunks, offsets, strict=True):
            n = len(data)
            if n:
                buf[offset : offset + n] = data
        name = self._shm.name.lstrip("/")
        return [(name, offset, len(data)) for data, offset in zip(chunks, offsets, strict=True)]

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
    Arenas are kept across streams, so their segments are made once.
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
