"""Rewards for the trainer, from the reward server only.

``RewardStream`` sends each group as soon as it is decoded (``submit`` returns at once) over one
``ScoreStream`` call, so the server scores while the trainer samples the next batch; ``collect``
waits for the answers, in submission order. With ``overlap=False`` every group is scored with a
blocking unary call instead (the baseline the overlap is measured against).

``VersionFloor`` is the consistency rule's side here: every score call carries the version of
each trainable model the trainer last saw acknowledged (ScoreRequest.min_versions), so that no
epoch's groups are scored by an older discriminator.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Mapping, Sequence

import grpc

from advgrpo.client import Group, GroupScore, RewardClient

log = logging.getLogger(__name__)

_END = object()


class VersionFloor:
    """The least version of each trainable reward model the trainer's rewards may come from: the
    version it had when the trainer started (ListModels), raised to the version each acknowledged
    update returns. ``min_versions()`` goes with every score call (ScoreRequest.min_versions): a
    server, or a replica of one, that has not applied the update yet applies it first, so that
    no epoch's groups are scored by an older discriminator."""

    def __init__(self, versions: Mapping[str, int] | None = None):
        self._versions: dict[str, int] = {}
        for model, version in (versions or {}).items():
            self.raise_to(model, version)

    def raise_to(self, model: str, version: int) -> None:
        """``model`` is at ``version`` now (an update's answer); a floor never goes down."""
        self._versions[model] = max(self._versions.get(model, 0), int(version))

    def min_versions(self) -> dict[str, int]:
        """What a score call sends: model name -> least version (a copy)."""
        return dict(self._versions)

    def check(self, scores: Sequence[GroupScore]) -> None:
        """``check_versions`` against this floor."""
        check_versions(scores, self._versions)


def check_versions(scores: Sequence[GroupScore], min_versions: Mapping[str, int]) -> None:
    """RuntimeError if a model produced a score with a version below ``min_versions``: our server
    never does, but one older than the field ignores it, and such a reward is not trained on."""
    for s in scores:
        for model, least in min_versions.items():
            got = s.model_versions.get(model)
            if got is not None and got < least:
                raise RuntimeError(
                    f"group {s.group_id!r}: model {model!r} scored it with version {got}, below version {least} "
                    "that the trainer asked for (min_versions); the reward server ignored it"
                )


class RewardStream:
    def __init__(
        self,
        client: RewardClient,
        weights: dict[str, float],
        overlap: bool = True,
        min_versions: dict[str, int] | None = None,
    ):
        """``min_versions``: sent with every group (``VersionFloor.min_versions()``), and the
        scores checked against it."""
        self.client = client
        self.weights = weights
        self.min_versions = dict(min_versions or {})
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
            for score in self.client.score_stream(self._requests(), self.weights, self.min_versions):
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
                self._results.extend(self.client.score([group], self.weights, self.min_versions))
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
        check_versions(self._results, self.min_versions)
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
            scores = stream.client.score(stream.groups, stream.weights, stream.min_versions)
            check_versions(scores, stream.min_versions)
            return scores
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
