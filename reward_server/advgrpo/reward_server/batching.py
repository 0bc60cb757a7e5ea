"""Per-model dynamic batcher (in the style of Triton Inference Server's dynamic batcher).

Requests submit lists of items (images); one worker task per model merges queued items into
batches of at most ``max_batch_size`` and runs the blocking model call on the model's executor,
so the event loop never blocks and model calls never overlap.

Batch composition (item-level, FIFO):

* a batch takes up to ``max_batch_size`` items from the head of the queue: several whole
  requests, and/or part of a large request that is then finished by the following batches;
* a full batch is dispatched at once; a partial one waits for company at most ``max_delay_s``
  from the arrival of its oldest item (a request's items all "arrive" when it is submitted,
  so the remainder of a split request never waits again);
* the next batch is formed only when the previous one has finished, so items that arrive while
  the model is busy merge into the next batch instead of queueing behind it in the executor.

``run_exclusive(fn)`` is a barrier in the same FIFO queue: every request submitted before it
runs (entirely) before ``fn``, every request submitted after it runs after ``fn``, and ``fn``
never overlaps a batch. A partial batch in front of a barrier is dispatched without waiting
for ``max_delay_s`` (nothing could join it). So a request is scored by one model version
only, even when it is split across batches.

Admission: ``max_queue_items`` bounds the items queued and not yet dispatched; a request that
would exceed it is rejected whole with ``ResourceExhausted``. Callers are expected to hold
a deadline; a caller cancelled while waiting loses its undispatched items, and results of its
dispatched ones are discarded.

Failures: ``run_batch`` raising (or returning a result count other than its item count, a
``RuntimeError``) fails a batch. One bad request must not fail the requests it was merged
with, so when a failed batch holds items of more than one request, each request's items of
that batch are run again alone, in batch order, before anything else runs (so still under the
same model version): a request whose items succeed alone gets their results, one whose items
fail alone gets that exception. A batch of one request's items is not run again: the request
gets the batch's exception. A failed request's queued items are dropped (a split request is
not run further); requests outside that batch are unaffected. Each re-run is a model call of
its own (``on_batch`` sees it with ``retry=True``).

Event loop: the batcher can be constructed anywhere (it creates no asyncio objects); it binds
to the running loop on the first ``submit``/``run_exclusive``, where it starts its worker task.
From then on it must be used from that loop's thread only. If that loop shuts down (its tasks
cancelled, as ``asyncio.run`` does), waiting callers get ``Unavailable`` and the batcher binds
again to the next loop that uses it; ``close()`` is what stops it for good.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from advgrpo.common.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
X = TypeVar("X")


@dataclass(frozen=True)
class BatchStats:
    """One model call, as reported to ``on_batch`` (metrics)."""

    size: int  # items in the batch
    requests: int  # requests with items in the batch (a split request counts in each batch)
    queue_wait_s: float  # oldest item: submission -> dispatch
    run_s: float  # dispatch -> results back on the event loop
    ok: bool = True  # False when run_batch raised or returned the wrong number of results
    retry: bool = False  # a re-run of one request's items alone, after their merged batch failed


class _Request:
    """One submit() call. ``taken`` items have been dispatched; the rest are queued."""

    __slots__ = ("items", "results", "taken", "remaining", "arrival", "future")

    def __init__(self, items: list, arrival: float, future: asyncio.Future):
        self.items = items
        self.results: list = [None] * len(items)
        self.taken = 0
        self.remaining = len(items)  # items without a result yet
        self.arrival = arrival
        self.future = future

    @property
    def queued(self) -> int:
        return len(self.items) - self.taken


class _Exclusive:
    """One run_exclusive() call, waiting in the queue as a barrier."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], object], future: asyncio.Future):
        self.fn = fn
        self.future = future


class DynamicBatcher(Generic[T, R]):
    """Merges concurrent requests' items into batches for one model. See the module docstring.

    ``enabled=False`` turns merging off: each request runs alone, in chunks of at most
    ``max_batch_size``, FIFO, on the same executor and behind the same queue limit, which then
    also counts the items of the chunk being run (in-flight).
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        executor: concurrent.futures.Executor,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_items: int,
        enabled: bool = True,
        name: str = "",
        on_batch: Callable[[BatchStats], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue_items < 1:
            raise ValueError(f"max_queue_items must be >= 1, got {max_queue_items}")
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_items = max_queue_items
        self.enabled = enabled
        self.name = name
        self._on_batch = on_batch
        self._label = f"model {name!r}" if name else "batcher"

        self._queue: collections.deque[_Request | _Exclusive] = collections.deque()
        self._queued = 0  # items queued, not yet dispatched
        self._barriers = 0  # _Exclusive entries in the queue
        self._inflight = 0  # items of the batch being run
        self._running: list[tuple[_Request, int, int]] = []  # (request, start, stop) being run
        self._running_job: _Exclusive | None = None  # run_exclusive() job being run
        self._closing = False  # no new work; drain the queue, then stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

        # Counters (monotonic; read them for metrics).
        self.batches_run = 0  # model calls, re-runs included
        self.items_run = 0
        self.requests_rejected = 0
        self.retries_run = 0  # re-runs of one request's items after a merged batch failed

    # -- public API ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Items waiting to be dispatched."""
        return self._queued

    @property
    def closed(self) -> bool:
        return self._closing

    async def submit(self, items: list[T]) -> list[R]:
        """Runs ``items`` through the model (merged with other requests); results in order.

        Raises ``ResourceExhausted`` when the queue cannot take the request, ``Unavailable``
        after ``close()``, and whatever ``run_batch`` raised for a batch holding its items.
        """
        self._check_open()
        if not items:
            return []
        loop = self._bind()
        n = len(items)
        if n > self.max_queue_items:
            self.requests_rejected += 1
            raise ResourceExhausted(
                f"{self._label}: request has {n} items, more than the queue limit of {self.max_queue_items}"
            )
        # With merging off there is no batch to join: count the running chunk as well.
        load = self._queued if self.enabled else self._queued + self._inflight
        if load + n > self.max_queue_items:
            self.requests_rejected += 1
            raise ResourceExhausted(
                f"{self._label}: queue is full ({load} items queued, request has {n}, "
                f"limit {self.max_queue_items}); retry later",
                retry_after_s=max(self.max_delay_s, 0.05),
            )
        req = _Request(list(items), loop.time(), loop.create_future())
        self._queue.append(req)
        self._queued += n
        self._wakeup.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._abandon(req)
            raise

    async def run_exclusive(self, fn: Callable[[], X]) -> X:
        """Runs ``fn`` on the executor between batches, as a barrier in the queue.

        Requests submitted before this call finish before ``fn`` starts; requests submitted
        after it start after ``fn`` ends. If the caller is cancelled before ``fn`` starts,
        ``fn`` never runs; once started it runs to completion and its result is discarded.
        """
        self._check_open()
        loop = self._bind()
        job = _Exclusive(fn, loop.create_future())
        self._queue.append(job)
        self._barriers += 1
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._abandon(job)
            raise

    async def close(self) -> None:
        """Stops accepting work (``Unavailable``), runs what is queued, stops the worker.

        Partial batches are dispatched without waiting for ``max_delay_s``. Idempotent.
        Cancelling ``close()`` does not interrupt the drain.
        """
        self._closing = True
        if self._worker is None:
            return
        self._wakeup.set()
        # wait() rather than await: neither re-raises the worker's fate nor cancels it.
        await asyncio.wait({self._worker})

    # -- admission and cancellation ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise Unavailable(f"{self._label}: shutting down, not accepting requests")

    def _bind(self) -> asyncio.AbstractEventLoop:
        """Binds to the running loop and starts the worker on first use."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(f"{self._label}: batcher is bound to another event loop")
            self._loop = loop
            self._wakeup = asyncio.Event()  # an Event binds to the loop that first waits on it
            self._worker = loop.create_task(self._work(), name=f"batcher:{self.name}")
        return loop

    def _abandon(self, entry: _Request | _Exclusive) -> None:
        """A cancelled caller: drops what it still has in the queue."""
        if isinstance(entry, _Request):
            if entry.queued:
                self._queue.remove(entry)
                self._queued -= entry.queued
                entry.taken = len(entry.items)
                self._wakeup.set()  # it may have been the head the worker is waiting on
        elif entry in self._queue:  # not started yet: fn never runs
            self._queue.remove(entry)
            self._barriers -= 1
            self._wakeup.set()
        # An exception set just before the cancel would otherwise be logged as never retrieved.
        if entry.future.done() and not entry.future.cancelled():
            entry.future.exception()

    def _fail(self, req: _Request, exc: BaseException) -> None:
        """Fails a request and drops its items that are still queued."""
        if req.queued:
            self._queue.remove(req)
            self._queued -= req.queued
            req.taken = len(req.items)
        if not req.future.done():
            req.future.set_exception(exc)

    # -- worker --------------------------------------------------------------------------------

    async def _work(self) -> None:
        try:
            await self._serve()
        except BaseException as exc:
            # Nothing would ever answer the waiters: fail them all.
            if isinstance(exc, asyncio.CancelledError):
                # Loop shutdown: unbind, so the batcher can start again on a new loop.
                self._loop = self._wakeup = self._worker = None
            else:  # a bug: stop for good rather than hang every later caller
                self._closing = True
                log.exception("%s: batcher worker crashed", self._label)
            err = Unavailable(f"{self._label}: batcher stopped")
            running = [req for req, _, _ in self._running]
            if self._running_job is not None:
                running.append(self._running_job)
            for entry in running + list(self._queue):
                if not entry.future.done():
                    entry.future.set_exception(err)
            self._queue.clear()
            self._queued = self._barriers = 0
            raise

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            if isinstance(head, _Exclusive):
                self._queue.popleft()
                self._barriers -= 1
                await self._run_exclusive_job(loop, head)
                continue
            # Wait for company only while the batch can still grow.
            if self.enabled and not self._closing and not self._barriers and self._queued < self.max_batch_size:
                deadline = head.arrival + self.max_delay_s
                if loop.time() < deadline:
                    self._wakeup.clear()
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self._wakeup.wait()
                    except TimeoutError:
                        pass
                    continue  # re-evaluate: the head may be gone, the batch may be full
            await self._run_one_batch(loop, self._take_batch())

    def _take_batch(self) -> list[tuple[_Request, int, int]]:
        """Takes up to max_batch_size items FIFO, stopping at a barrier."""
        parts: list[tuple[_Request, int, int]] = []
        size = 0
        while self._queue and size < self.max_batch_size:
            req = self._queue[0]
            if isinstance(req, _Exclusive) or (parts and not self.enabled):
                break
            start = req.taken
            stop = min(len(req.items), start + self.max_batch_size - size)
            req.taken = stop
            parts.append((req, start, stop))
            size += stop - start
            if not req.queued:
                self._queue.popleft()
        self._queued -= size
        return parts

    async def _run_one_batch(self, loop: asyncio.AbstractEventLoop, parts: list[tuple[_Request, int, int]]) -> None:
        items = [x for req, start, stop in parts for x in req.items[start:stop]]
        dispatched = loop.time()
        wait = dispatched - parts[0][0].arrival
        # _running covers the re-runs too: a worker stopped during one fails all these callers.
        self._running, self._inflight = parts, len(items)
        try:
            try:
                out = await self._call(loop, items)
            except Exception as exc:
                error: Exception | None = exc
            else:
                error = None
                self._deliver(parts, out)
            self._record(len(items), len(parts), wait, loop.time() - dispatched, error is None)
            if error is None:
                return
            if len(parts) == 1:  # nothing else was in the batch: running it again changes nothing
                self._fail(parts[0][0], error)
                return
            log.warning(
                "%s: a batch of %d requests failed (%s: %s); running each request's items alone",
                self._label,
                len(parts),
                type(error).__name__,
                error,
            )
            for part in parts:
                await self._run_alone(loop, part)
        finally:
            self._running, self._inflight = [], 0

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, part: tuple[_Request, int, int]) -> None:
        """Re-runs one request's part of a failed merged batch on its own."""
        req, start, stop = part
        if req.future.done():  # its caller was cancelled: nobody wants the results
            return
        dispatched = loop.time()
        try:
            out = await self._call(loop, req.items[start:stop])
        except Exception as exc:
            ok = False
            self._fail(req, exc)
        else:
            ok = True
            self._deliver([part], out)
        self.retries_run += 1
        self._record(stop - start, 1, dispatched - req.arrival, loop.time() - dispatched, ok, retry=True)

    async def _call(self, loop: asyncio.AbstractEventLoop, items: list) -> Sequence:
        """One model call on the executor; its results, checked to be one per item."""
        out = await loop.run_in_executor(self._executor, self._run_batch, items)
        try:
            n = len(out)
        except TypeError:
            n = None
        if n != len(items):
            got = f"{n} results" if n is not None else f"a {type(out).__name__}"
            raise RuntimeError(f"{self._label}: run_batch returned {got} for a batch of {len(items)} items")
        return out

    def _deliver(self, parts: list[tuple[_Request, int, int]], out: Sequence) -> None:
        """Routes a call's results (in ``parts`` order) to their requests."""
        offset = 0
        for req, start, stop in parts:
            k = stop - start
            if not req.future.done():  # done: its caller was cancelled or it failed earlier
                req.results[start:stop] = out[offset : offset + k]
                req.remaining -= k
                if req.remaining == 0:
                    req.future.set_result(req.results)
            offset += k

    def _record(self, size: int, requests: int, wait: float, run: float, ok: bool, retry: bool = False) -> None:
        self.batches_run += 1
        self.items_run += size
        if self._on_batch is not None:
            stats = BatchStats(size, requests, wait, run, ok, retry)
            try:
                self._on_batch(stats)
            except Exception:  # metrics must never stop the batcher
                log.exception("%s: on_batch callback failed", self._label)

    async def _run_exclusive_job(self, loop: asyncio.AbstractEventLoop, job: _Exclusive) -> None:
        self._running_job = job
        try:
            result = await loop.run_in_executor(self._executor, job.fn)
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)
        finally:
            self._running_job = None
