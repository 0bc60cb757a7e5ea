"""``score_stream``'s state machine: one stream of groups over one or more ScoreStream calls.

gRPC's own retry cannot take over here: gRFC A6 commits a call once its response headers arrive,
and our server sends them as soon as it accepts a stream (STREAM_OPEN_KEY), so gRPC would never
retry a stream that fails later (a restarted server). ``StreamRun`` keeps every message until its
answer has come and, after a retryable failure, opens a new call and replays the unanswered ones
first, under a RetryBudget (advgrpo.client.retry).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import grpc

from advgrpo.client.encoding import ScoreBatch
from advgrpo.client.packing import Part, collect, merge_stream_parts
from advgrpo.client.retry import RetryBudget
from advgrpo.client.shared_memory import place_request
from advgrpo.client.types import ClientRpcError, Group, GroupScore
from advgrpo.common.protocol import STREAM_OPEN_KEY
from advgrpo.common.shared_memory import SharedMemoryArena, SharedMemoryFull, StreamClosed

if TYPE_CHECKING:
    from advgrpo.client.client import RewardClient

log = logging.getLogger(__name__)


@dataclass
class _Sent:
    """A stream message on its way: the request as encoded (to send again after a failure), its
    (group, part) list, its shared-memory arena if it has one, and when it was sent."""

    request: ScoreBatch
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


class StreamRun:
    """One ``score_stream``, over one or more ScoreStream calls (one more per retry).

    Shared by the caller's thread, grpc's request thread of each call and each call's answer
    thread, under ``cond``: ``to_send`` holds the messages to send next, in order (those of the
    groups drawn from the caller, and after a failure the unanswered ones, put back in front),
    ``inflight`` those sent and not answered, ``answers`` those answered and not yet taken by
    the caller. Groups are drawn from the caller's iterator by one thread at a time
    (``draw_lock``); a request thread of a failed call may still be waiting for one, and what it
    draws is queued for the next call."""

    def __init__(
        self,
        client: "RewardClient",
        groups: Iterable[Group],
        weights: dict[str, float] | None,
        min_versions: dict[str, int] | None = None,
    ):
        self.client = client
        self.weights = weights
        self.min_versions = min_versions or {}  # carried by every message, replays included
        self.groups = iter(groups)
        self.slots = client._stream_slots if client._stream_slots is not None and client.uses_shared_memory() else None
        self.cond = threading.Condition()
        self.draw_lock = threading.Lock()
        self.ended = threading.Event()  # the caller's side is done with the stream: send nothing more
        self.to_send: collections.deque[tuple[ScoreBatch, list]] = collections.deque()
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
                    client._requests(
                        [client._encode_group(group, index)], self.weights, client.chunk_bytes, self.min_versions
                    )
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

    def _requests(self, stream: _StreamCall) -> Iterator[ScoreBatch]:
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
                            sent = place_request(request, arena)
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
        pending: list[Part] = []
        ok = False
        budget: RetryBudget | None = None  # of the current outage
        try:
            while True:
                answer = self._next_answer(stream)
                if answer is not None:
                    response, parts = answer
                    for part in collect(response, parts):
                        if pending and part.index != pending[0].index:
                            yield merge_stream_parts(pending)
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
                    budget = RetryBudget(client.retry, client.target)
                elif stream.opened:
                    budget.renew()
                delay = budget.delay(error, "ScoreStream")
                if delay is None:
                    break
                time.sleep(delay)
                stream = self._reopen(stream)
            error = stream.error if self._owed() else None
            if pending and pending[0].index != self.failed_at and self._complete(pending[0].index):
                yield merge_stream_parts(pending)  # a whole group, answered before the failure
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
            yield merge_stream_parts(pending)
