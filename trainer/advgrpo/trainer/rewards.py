"""Rewards for the trainer, from the reward server only.

``RewardStream`` sends each group as soon as it is decoded (``submit`` returns at once) over one
``ScoreStream`` call, so the server scores while the trainer samples the next batch; ``collect``
waits for the answers, in submission order. With ``overlap=False`` every group is scored with a
blocking unary call instead (the baseline the overlap is measured against).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Sequence

import grpc

from advgrpo.client import Group, GroupScore, RewardClient

log = logging.getLogger(__name__)

_END = object()


class RewardStream:
    def __init__(self, client: RewardClient, weights: dict[str, float], overlap: bool = True):
        self.client = client
        self.weights = weights
        self.overlap = overlap
        self._results: list[GroupScore] = []
        self._submitted = 0
        self.groups: list[Group] = []
        self._error: BaseException | None = None
        self.wait_s = 0.0  # time the trainer spent blocked on rewards
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        if overlap:
            self._thread = threading.Thread(target=self._run, name="reward-stream", daemon=True)
            self._thread.start()

    def _requests(self):
        while (item := self._queue.get()) is not _END:
            yield item

    def _run(self) -> None:
        try:
            for score in self.client.score_stream(self._requests(), self.weights):
                self._results.append(score)
        except BaseException as exc:  # re-raised in the trainer's thread by collect()
            self._error = exc

    def submit(self, group_id: str, prompt: str, images: Sequence[Any]) -> None:
        group = Group(prompt, images, group_id)
        self._submitted += 1
        self.groups.append(group)  # kept: a failed epoch is scored again from them
        if self.overlap:
            self._queue.put(group)
        elif self._error is None:  # after a failure the epoch is scored again whole (score_epoch)
            t0 = time.perf_counter()
            try:
                self._results.extend(self.client.score([group], self.weights))
            except (grpc.RpcError, RuntimeError) as exc:  # raised by collect(), like the stream's
                self._error = exc
            self.wait_s += time.perf_counter() - t0

    def collect(self) -> list[GroupScore]:
        """All scores, in submission order; closes the stream."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._queue.put(_END)
            self._thread.join()
        self.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        if len(self._results) != self._submitted:
            raise RuntimeError(f"reward server answered {len(self._results)} of {self._submitted} groups")
        return self._results


class RewardsFailed(RuntimeError):
    """The reward server did not score an epoch's groups within the retry budget: the run stops
    rather than train on groups without their rewards."""


def score_epoch(
    stream: RewardStream, budget_s: float, epoch: int, *, sleep=time.sleep, clock=time.monotonic
) -> list[GroupScore]:
    """The epoch's scores, in submission order. A failed stream (an error for any group: a model
    failure, NaN, the server gone past the client's own retries) is not trained on: every group is
    scored again with unary calls, after a backoff, until ``budget_s`` has passed; then
    RewardsFailed says why."""
    try:
        return stream.collect()
    except (grpc.RpcError, RuntimeError) as exc:
        failure = exc
    deadline, wait, attempt = clock() + budget_s, 1.0, 1
    while True:
        log.warning(
            "epoch %d: scoring %d groups failed (%s); scoring them again (attempt %d)",
            epoch, len(stream.groups), _reason(failure), attempt + 1,
        )  # fmt: skip
        remaining = deadline - clock()
        if remaining <= 0:
            raise RewardsFailed(
                f"epoch {epoch}: the reward server did not score this epoch's {len(stream.groups)} groups within "
                f"reward.retry_budget_s={budget_s:g} s ({attempt} attempts; last: {_reason(failure)}); stopping, "
                "since no group is trained on without its reward"
            )
        sleep(min(wait, remaining))
        wait = min(wait * 2, 30.0)
        attempt += 1
        try:
            return stream.client.score(stream.groups, stream.weights)
        except (grpc.RpcError, RuntimeError) as exc:
            failure = exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def zero_variance_share(rewards, prompt_ids) -> float:
    """The share of prompt groups (of two or more images) whose rewards are all equal: GRPO's
    advantages are then 0, and the group teaches the policy nothing. ``rewards`` and
    ``prompt_ids`` are 1-D tensors."""
    groups = [rewards[prompt_ids == g] for g in prompt_ids.unique()]
    groups = [g for g in groups if g.numel() >= 2]
    zero = sum(1 for g in groups if g.unique().numel() == 1)
    return zero / len(groups) if groups else 0.0
