"""DynamicBatcher: batch composition, queue limits, timeouts, failures, cancellation, exclusivity.

Plain test functions drive asyncio with asyncio.run (no pytest-asyncio). Model calls block on
threading.Events where a test needs the model "busy"; timing bounds are loose on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from advgrpo.common.errors import ResourceExhausted, Unavailable
from advgrpo.reward_server.batching import BatchStats, DynamicBatcher


class FakeModel:
    """run_batch stand-in: records calls, returns item * 10, can block, fail or sleep."""

    def __init__(self, sleep_s: float = 0.0, fail_on=None, wrong_count: bool = False, hold_on=None):
        self.calls: list[list] = []
        self.events: list[str] = []  # enter/exit log shared with exclusive jobs
        self.lock = threading.Lock()
        self.gate = threading.Event()  # cleared: calls block until released
        self.gate.set()
        self.entered = threading.Event()  # set when a call has started
        self.sleep_s = sleep_s
        self.fail_on = fail_on
        self.wrong_count = wrong_count
        self.hold_on = hold_on  # a call with exactly these items also waits for `held`
        self.held = threading.Event()
        self.holding = threading.Event()  # set when such a call is waiting

    def __call__(self, items: list) -> list:
        with self.lock:
            self.calls.append(list(items))
            self.events.append("batch-enter")
        self.entered.set()
        try:
            assert self.gate.wait(10), "test never released the model"
            if self.hold_on is not None and list(items) == self.hold_on:
                self.holding.set()
                assert self.held.wait(10), "test never released the held call"
            if self.sleep_s:
                time.sleep(self.sleep_s)
            if self.fail_on is not None and self.fail_on in items:
                raise ValueError(f"bad item {self.fail_on!r} in a call of {len(items)}")
            out = [x * 10 for x in items]
            return out[:-1] if self.wrong_count else out
        finally:
            with self.lock:
                self.events.append("batch-exit")

    def block(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)


def make(model, executor, **kw) -> DynamicBatcher:
    opts = dict(max_batch_size=8, max_delay_s=0.05, max_queue_items=64, name="m")
    opts.update(kw)
    return DynamicBatcher(model, executor=executor, **opts)


async def wait_entered(model: FakeModel) -> None:
    """Waits (off the loop) until the model is inside a call."""
    assert await asyncio.to_thread(model.entered.wait, 5)


async def until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


# -- composition ----------------------------------------------------------------------------


def test_concurrent_requests_merge_into_one_batch_and_route_results(executor):
    model = FakeModel()
    stats: list[BatchStats] = []
    b = make(model, executor, max_delay_s=0.2, on_batch=stats.append)

    async def main():
        res = await asyncio.gather(b.submit([1, 2]), b.submit([3, 4, 5]), b.submit([6]))
        await b.close()
        return res

    assert asyncio.run(main()) == [[10, 20], [30, 40, 50], [60]]
    assert model.calls == [[1, 2, 3, 4, 5, 6]]
    assert (b.batches_run, b.items_run) == (1, 6)
    (s,) = stats
    assert (s.size, s.requests, s.ok) == (6, 3, True)
    assert s.queue_wait_s >= 0 and s.run_s >= 0


def test_empty_request_returns_immediately(executor):
    model = FakeModel()
    b = make(model, executor)
    assert asyncio.run(b.submit([])) == []
    assert model.calls == []


def test_full_batch_dispatches_without_waiting_for_delay(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=4, max_delay_s=5.0)

    async def main():
        t0 = time.monotonic()
        res = await asyncio.gather(b.submit([1, 2]), b.submit([3, 4]))
        return res, time.monotonic() - t0

    res, elapsed = asyncio.run(main())
    assert res == [[10, 20], [30, 40]]
    assert model.sizes == [4]
    assert elapsed < 2.0  # far below max_delay_s


def test_lone_request_waits_about_max_delay(executor):
    model = FakeModel()
    delay = 0.2
    b = make(model, executor, max_batch_size=8, max_delay_s=delay)

    async def main():
        t0 = time.monotonic()
        res = await b.submit([7])
        return res, time.monotonic() - t0

    res, elapsed = asyncio.run(main())
    assert res == [70]
    assert delay * 0.9 <= elapsed < delay + 2.0


def test_zero_delay_dispatches_at_once(executor):
    model = FakeModel()
    b = make(model, executor, max_delay_s=0.0)

    async def main():
        t0 = time.monotonic()
        await b.submit([1])
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0


def test_large_request_is_split_into_max_batch_size_chunks(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=4, max_delay_s=0.01)
    items = list(range(10))
    assert asyncio.run(b.submit(items)) == [x * 10 for x in items]
    assert model.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_split_request_tail_merges_with_next_request(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=4, max_delay_s=0.05)

    async def main():
        return await asyncio.gather(b.submit(list(range(6))), b.submit([100, 101, 102]))

    a, c = asyncio.run(main())
    assert a == [0, 10, 20, 30, 40, 50] and c == [1000, 1010, 1020]
    assert model.calls == [[0, 1, 2, 3], [4, 5, 100, 101], [102]]


def test_items_arriving_while_busy_merge_into_next_batch(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=8, max_delay_s=0.0)

    async def main():
        model.block()
        first = asyncio.create_task(b.submit([1]))
        await wait_entered(model)
        rest = [asyncio.create_task(b.submit([i])) for i in (2, 3, 4)]
        await until(lambda: b.queue_depth == 3)
        model.release()
        return await first, await asyncio.gather(*rest)

    assert asyncio.run(main()) == ([10], [[20], [30], [40]])
    assert model.calls == [[1], [2, 3, 4]]


# -- queue limit ----------------------------------------------------------------------------


def test_queue_limit_rejects_whole_request_and_keeps_serving(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=4, max_delay_s=0.0, max_queue_items=8, name="dino")

    async def main():
        model.block()
        running = asyncio.create_task(b.submit([1, 2, 3, 4]))
        await wait_entered(model)  # dispatched: no longer counts against the queue
        queued = asyncio.create_task(b.submit(list(range(8))))
        await until(lambda: b.queue_depth == 8)

        with pytest.raises(ResourceExhausted) as err:
            await b.submit([99])
        msg = str(err.value)
        assert "dino" in msg and "8" in msg and "limit" in msg
        assert err.value.retry_after_s is not None and err.value.retry_after_s > 0  # transient: try again
        assert b.queue_depth == 8  # nothing of the rejected request was enqueued

        with pytest.raises(ResourceExhausted, match="more than the queue limit") as err:
            await b.submit(list(range(9)))
        assert err.value.retry_after_s is None  # never fits: no point in retrying

        model.release()
        assert await running == [10, 20, 30, 40]
        assert await queued == [x * 10 for x in range(8)]
        assert await b.submit([5]) == [50]  # still serving

    asyncio.run(main())
    assert b.requests_rejected == 2
    assert 99 not in sum(model.calls, [])


# -- failures -------------------------------------------------------------------------------


def test_run_batch_exception_fails_only_the_request_that_fails_alone(executor):
    model = FakeModel(fail_on="bad")
    stats: list[BatchStats] = []
    b = make(model, executor, max_batch_size=4, max_delay_s=0.05, on_batch=stats.append)

    async def main():
        r = await asyncio.gather(b.submit([1, 2]), b.submit(["bad"]), return_exceptions=True)
        ok = await b.submit([3])
        return r, ok

    (a, c), ok = asyncio.run(main())
    assert a == [10, 20]  # merged with the bad request, but fine on its own
    assert isinstance(c, ValueError) and "a call of 1" in str(c)  # the exception of its own run
    assert ok == [30]
    assert model.calls == [[1, 2, "bad"], [1, 2], ["bad"], [3]]
    assert [(s.size, s.requests, s.ok, s.retry) for s in stats] == [
        (3, 2, False, False),
        (2, 1, True, True),
        (1, 1, False, True),
        (1, 1, True, False),
    ]
    assert (b.batches_run, b.items_run, b.retries_run) == (4, 7, 2)


def test_failed_split_request_drops_its_queued_items(executor):
    model = FakeModel(fail_on="bad")
    b = make(model, executor, max_batch_size=2, max_delay_s=0.0)

    async def main():
        model.block()
        first = asyncio.create_task(b.submit([1, "bad", 3, 4, 5]))
        await wait_entered(model)
        other = asyncio.create_task(b.submit([7]))
        await until(lambda: b.queue_depth == 4)
        model.release()
        with pytest.raises(ValueError, match="bad item"):
            await first
        assert await other == [70]
        assert b.queue_depth == 0

    asyncio.run(main())
    assert model.calls == [[1, "bad"], [7]]


def test_wrong_result_count_is_runtime_error(executor):
    model = FakeModel(wrong_count=True)
    b = make(model, executor, max_delay_s=0.0)
    with pytest.raises(RuntimeError, match="returned 1 results for a batch of 2"):
        asyncio.run(b.submit([1, 2]))


# -- a failed merged batch: each request's items run again alone -----------------------------


def test_failed_merged_batch_answers_good_requests_around_a_bad_one(executor):
    model = FakeModel(fail_on="bad")
    b = make(model, executor, max_batch_size=8, max_delay_s=0.05)

    async def main():
        reqs = [[1, 2], [3], ["bad", 4], [5, 6, 7]]
        return await asyncio.gather(*(b.submit(r) for r in reqs), return_exceptions=True)

    a, c, bad, d = asyncio.run(main())
    assert (a, c, d) == ([10, 20], [30], [50, 60, 70])
    assert isinstance(bad, ValueError) and "a call of 2" in str(bad)
    # One merged call, then each request's part alone, in batch order.
    assert model.calls == [[1, 2, 3, "bad", 4, 5, 6, 7], [1, 2], [3], ["bad", 4], [5, 6, 7]]
    assert b.retries_run == 4 and b.queue_depth == 0


def test_every_request_failing_alone_gets_its_own_exception(executor):
    def run(items):
        raise ValueError(f"items {items}")

    b = make(run, executor, max_delay_s=0.05)

    async def main():
        return await asyncio.gather(b.submit([1]), b.submit([2, 3]), return_exceptions=True)

    a, c = asyncio.run(main())
    assert str(a) == "items [1]" and str(c) == "items [2, 3]"
    assert b.retries_run == 2


def test_failure_only_the_merge_causes_is_recovered(executor):
    # A model that cannot take the merged batch (e.g. out of memory) but can take each request.
    model = FakeModel()

    def run(items):
        if len(items) > 2:
            raise MemoryError("batch too large")
        return model(items)

    b = make(run, executor, max_delay_s=0.05)

    async def main():
        return await asyncio.gather(b.submit([1, 2]), b.submit([3]))

    assert asyncio.run(main()) == [[10, 20], [30]]
    assert model.calls == [[1, 2], [3]]


def test_failed_batch_of_one_request_is_not_run_again(executor):
    model = FakeModel(fail_on="bad")
    stats: list[BatchStats] = []
    b = make(model, executor, max_delay_s=0.0, on_batch=stats.append)

    async def main():
        with pytest.raises(ValueError, match="a call of 3"):
            await b.submit([1, "bad", 2])
        return await b.submit([4])

    assert asyncio.run(main()) == [40]
    assert model.calls == [[1, "bad", 2], [4]]
    assert b.retries_run == 0 and [s.retry for s in stats] == [False, False]


def test_wrong_result_count_in_merged_batch_is_retried_alone(executor):
    model = FakeModel()

    def run(items):
        out = model(items)
        return out[:-1] if len(items) == 3 else out

    b = make(run, executor, max_delay_s=0.05)

    async def main():
        return await asyncio.gather(b.submit([1, 2]), b.submit([3]))

    assert asyncio.run(main()) == [[10, 20], [30]]
    assert model.calls == [[1, 2, 3], [1, 2], [3]]


def test_split_bad_request_fails_and_its_tail_is_dropped(executor):
    model = FakeModel(fail_on="bad")
    b = make(model, executor, max_batch_size=4, max_delay_s=0.05)

    async def main():
        good = asyncio.create_task(b.submit([7, 8]))
        bad = asyncio.create_task(b.submit([1, "bad", 3, 4, 5, 6]))  # [1, "bad"] in batch 1
        later = asyncio.create_task(b.submit([9]))
        with pytest.raises(ValueError, match="a call of 2"):
            await bad
        assert b.queue_depth <= 1  # the bad request's tail [3, 4, 5, 6] is gone
        return await good, await later

    assert asyncio.run(main()) == ([70, 80], [90])
    assert model.calls == [[7, 8, 1, "bad"], [7, 8], [1, "bad"], [9]]


def test_split_good_request_keeps_results_from_every_batch(executor):
    model = FakeModel(fail_on="bad")
    b = make(model, executor, max_batch_size=4, max_delay_s=0.05)

    async def main():
        # The good request's head runs with the bad request, its tail in the next batch.
        return await asyncio.gather(b.submit(["bad"]), b.submit([1, 2, 3, 4, 5]), b.submit([6]), return_exceptions=True)

    bad, good, other = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert good == [10, 20, 30, 40, 50] and other == [60]
    assert model.calls == [["bad", 1, 2, 3], ["bad"], [1, 2, 3], [4, 5, 6]]


def test_split_good_request_tail_in_failed_batch(executor):
    model = FakeModel(fail_on="bad")
    b = make(model, executor, max_batch_size=4, max_delay_s=0.05)

    async def main():
        # The good request's head runs first (and succeeds), its tail with the bad request.
        return await asyncio.gather(b.submit([1, 2, 3, 4, 5, 6]), b.submit(["bad"]), return_exceptions=True)

    good, bad = asyncio.run(main())
    assert good == [10, 20, 30, 40, 50, 60] and isinstance(bad, ValueError)
    assert model.calls == [[1, 2, 3, 4], [5, 6, "bad"], [5, 6], ["bad"]]


def test_caller_cancelled_before_rerun_is_not_run_again(executor):
    model = FakeModel(fail_on="bad")
    b = make(model, executor, max_batch_size=8, max_delay_s=0.05)

    async def main():
        model.block()
        victim = asyncio.create_task(b.submit([1]))
        bad = asyncio.create_task(b.submit(["bad"]))
        good = asyncio.create_task(b.submit([2]))
        await wait_entered(model)  # the merged batch is running
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        model.release()
        with pytest.raises(ValueError):
            await bad
        return await good

    assert asyncio.run(main()) == [20]
    assert model.calls == [[1, "bad", 2], ["bad"], [2]]


def test_reruns_keep_queue_accounting_cancellation_and_barriers(executor):
    # While a re-run is in flight: new requests queue (and count) behind it, a barrier waits
    # for the re-runs, and a caller cancelled during its own re-run leaves the rest intact.
    model = FakeModel(fail_on="bad", hold_on=[3])
    b = make(model, executor, max_batch_size=8, max_delay_s=0.05, max_queue_items=4)

    def update():
        with model.lock:
            model.events.append("update")
        return "updated"

    async def main():
        first = asyncio.create_task(b.submit([1]))
        bad = asyncio.create_task(b.submit(["bad"]))
        held = asyncio.create_task(b.submit([3]))
        last = asyncio.create_task(b.submit([4]))
        assert await asyncio.to_thread(model.holding.wait, 5)  # [3] is being run again alone
        assert await first == [10]
        with pytest.raises(ValueError):
            await bad
        assert b.queue_depth == 0  # nothing of the failed batch went back to the queue
        barrier = asyncio.create_task(b.run_exclusive(update))
        after = asyncio.create_task(b.submit([5, 6, 7]))
        await until(lambda: b.queue_depth == 3)
        with pytest.raises(ResourceExhausted):
            await b.submit([8, 9])  # 3 queued + 2 > 4: the re-runs do not free the queue
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        model.held.set()
        assert await last == [40]
        assert await barrier == "updated"
        return await after

    assert asyncio.run(main()) == [50, 60, 70]
    assert model.calls == [[1, "bad", 3, 4], [1], ["bad"], [3], [4], [5, 6, 7]]
    ev = model.events
    assert ev.index("update") == len(ev) - 3  # after every re-run, before the next batch
    assert b.queue_depth == 0


def test_close_during_reruns_drains_them(executor):
    model = FakeModel(fail_on="bad", hold_on=[2])
    b = make(model, executor, max_batch_size=8, max_delay_s=0.05)

    async def main():
        tasks = [asyncio.create_task(b.submit(r)) for r in ([1], ["bad"], [2])]
        assert await asyncio.to_thread(model.holding.wait, 5)
        closing = asyncio.create_task(b.close())
        await asyncio.sleep(0.01)
        assert not closing.done()
        model.held.set()
        await closing
        return await asyncio.gather(*tasks, return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert a == [10] and c == [20] and isinstance(bad, ValueError)
    assert b.closed


def test_loop_shutdown_during_rerun_fails_waiters_with_unavailable(executor):
    model = FakeModel(fail_on="bad", hold_on=[2])
    b = make(model, executor, max_batch_size=8, max_delay_s=0.05)
    seen = []

    async def client(items):
        try:
            seen.append(await b.submit(items))
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        except Exception as exc:
            seen.append(type(exc).__name__)

    async def main():
        for r in ([1], ["bad"], [2]):
            asyncio.get_running_loop().create_task(client(r))
        assert await asyncio.to_thread(model.holding.wait, 5)
        # asyncio.run cancels the worker (mid re-run) and the waiting client at exit.

    try:
        asyncio.run(main())
    finally:
        model.held.set()
    assert seen[:2] == [[10], "ValueError"] and seen[2] in ("cancelled", "Unavailable")
    assert b.queue_depth == 0 and not b.closed
    assert asyncio.run(b.submit([5])) == [50]  # binds to the new loop and serves again


# -- cancellation ---------------------------------------------------------------------------


def test_cancelled_waiting_caller_is_dropped_and_others_served(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=4, max_delay_s=0.0)

    async def main():
        model.block()
        running = asyncio.create_task(b.submit([1]))
        await wait_entered(model)
        # A client deadline expires while its items are still queued.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.submit([2, 3]), timeout=0.05)
        assert b.queue_depth == 0
        later = asyncio.create_task(b.submit([4]))
        await until(lambda: b.queue_depth == 1)
        model.release()
        return await running, await later

    assert asyncio.run(main()) == ([10], [40])
    assert model.calls == [[1], [4]]


def test_cancelled_caller_with_dispatched_items_does_not_break_batch(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=2, max_delay_s=0.0)

    async def main():
        model.block()
        # The victim is split: [1, 3] is dispatched (and blocks), its tail [4] stays queued.
        victim = asyncio.create_task(b.submit([1, 3, 4]))
        await wait_entered(model)
        other = asyncio.create_task(b.submit([2]))
        await until(lambda: b.queue_depth == 2)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert b.queue_depth == 1  # the tail is dropped, the running part is left alone
        model.release()
        assert await other == [20]
        assert await b.submit([5]) == [50]

    asyncio.run(main())
    assert model.calls == [[1, 3], [2], [5]]


# -- enabled=False --------------------------------------------------------------------------


def test_disabled_never_merges_and_still_chunks(executor):
    model = FakeModel()
    b = make(model, executor, enabled=False, max_batch_size=4, max_delay_s=1.0)

    async def main():
        small = await asyncio.gather(b.submit([1, 2]), b.submit([3, 4]), b.submit([5]))
        big = await b.submit(list(range(10)))
        return small, big

    small, big = asyncio.run(main())
    assert small == [[10, 20], [30, 40], [50]]
    assert big == [x * 10 for x in range(10)]
    assert model.calls == [[1, 2], [3, 4], [5], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_disabled_queue_limit_counts_in_flight_items(executor):
    model = FakeModel()
    b = make(model, executor, enabled=False, max_batch_size=4, max_queue_items=4)

    async def main():
        model.block()
        running = asyncio.create_task(b.submit([1, 2, 3, 4]))
        await wait_entered(model)
        assert b.queue_depth == 0
        with pytest.raises(ResourceExhausted):
            await b.submit([5])
        model.release()
        assert await running == [10, 20, 30, 40]
        assert await b.submit([5]) == [50]

    asyncio.run(main())


# -- run_exclusive --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 4])
def test_run_exclusive_never_overlaps_batches(workers):
    # With 4 threads the executor alone would allow overlap: the batcher must serialise.
    model = FakeModel(sleep_s=0.002)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        b = make(model, ex, max_batch_size=3, max_delay_s=0.001)

        def job(i):
            def fn():
                with model.lock:
                    model.events.append("excl-enter")
                time.sleep(0.002)
                with model.lock:
                    model.events.append("excl-exit")
                return i

            return fn

        async def main():
            tasks = []
            for i in range(30):
                tasks.append(b.submit([i, i + 1]))
                if i % 5 == 0:
                    tasks.append(b.run_exclusive(job(i)))
            return await asyncio.gather(*tasks)

        asyncio.run(main())
    ev = model.events
    assert ev.count("excl-enter") == 6
    assert all(ev[k].endswith("enter") and ev[k + 1].endswith("exit") for k in range(0, len(ev), 2))
    assert all(ev[k].split("-")[0] == ev[k + 1].split("-")[0] for k in range(0, len(ev), 2))


def test_run_exclusive_is_a_fifo_barrier(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=8, max_delay_s=5.0)

    def update():
        with model.lock:
            model.events.append("update")
        return "updated"

    async def main():
        t0 = time.monotonic()
        before = asyncio.create_task(b.submit([1, 2]))
        await asyncio.sleep(0)
        excl = asyncio.create_task(b.run_exclusive(update))
        await asyncio.sleep(0)
        after = asyncio.create_task(b.submit([3]))
        await asyncio.sleep(0)
        # The partial batch in front of the barrier does not wait for max_delay_s.
        assert await before == [10, 20]
        assert time.monotonic() - t0 < 2.0
        assert await excl == "updated"
        await b.close()  # flushes [3] without waiting for max_delay_s
        return await after

    assert asyncio.run(main()) == [30]
    assert model.events == ["batch-enter", "batch-exit", "update", "batch-enter", "batch-exit"]
    assert model.calls == [[1, 2], [3]]


def test_run_exclusive_exception_propagates_and_batcher_continues(executor):
    model = FakeModel()
    b = make(model, executor, max_delay_s=0.0)

    def boom():
        raise KeyError("nope")

    async def main():
        with pytest.raises(KeyError):
            await b.run_exclusive(boom)
        return await b.submit([1])

    assert asyncio.run(main()) == [10]


# -- close ----------------------------------------------------------------------------------


def test_close_drains_then_rejects(executor):
    model = FakeModel()
    b = make(model, executor, max_batch_size=4, max_delay_s=5.0)

    async def main():
        t0 = time.monotonic()
        pending = [asyncio.create_task(b.submit([i])) for i in range(6)]
        await asyncio.sleep(0.01)
        await b.close()  # runs [0..3] then the partial [4, 5] without waiting 5 s
        assert time.monotonic() - t0 < 2.0
        assert [await p for p in pending] == [[i * 10] for i in range(6)]
        with pytest.raises(Unavailable):
            await b.submit([9])
        with pytest.raises(Unavailable):
            await b.run_exclusive(lambda: None)
        await b.close()  # idempotent

    asyncio.run(main())
    assert model.calls == [[0, 1, 2, 3], [4, 5]]
    assert b.closed


def test_close_before_use_and_construction_outside_loop(executor):
    b = make(FakeModel(), executor)  # no running loop here: binds lazily
    asyncio.run(b.close())
    with pytest.raises(Unavailable):
        asyncio.run(b.submit([1]))


def test_loop_shutdown_fails_waiters_and_batcher_rebinds(executor):
    model = FakeModel()
    b = make(model, executor, max_delay_s=0.2)

    async def main():
        # asyncio.run cancels the worker and the waiting client at exit: neither may hang.
        asyncio.get_running_loop().create_task(b.submit([1]))
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert b.queue_depth == 0 and not b.closed
    assert asyncio.run(b.submit([2])) == [20]  # a new loop: the worker starts again
    assert model.calls == [[2]]


def test_used_from_two_live_loops_is_an_error(executor):
    b = make(FakeModel(), executor, max_delay_s=0.0)
    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(b.submit([1])) == [10]
        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(b.submit([2]))
    finally:
        first.run_until_complete(b.close())
        first.close()


def test_invalid_settings(executor):
    with pytest.raises(ValueError):
        make(FakeModel(), executor, max_batch_size=0)
    with pytest.raises(ValueError):
        make(FakeModel(), executor, max_delay_s=-1)
    with pytest.raises(ValueError):
        make(FakeModel(), executor, max_queue_items=0)
