"""Rewards for the trainer, from the reward server only.

``RewardStream`` sends each group as soon as it is decoded (``submit`` returns at once) over one
``ScoreStream`` call, so the server scores while the trainer samples the next batch; ``collect``
waits for the answers, in submission order. With ``overlap=False`` every group is scored with a
blocking unary call instead (the baseline the overlap is measured against).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Sequence

from advgrpo.client import Group, GroupScore, RewardClient

_END = object()


class RewardStream:
    def __init__(self, client: RewardClient, weights: dict[str, float], overlap: bool = True):
        self.client = client
        self.weights = weights
        self.overlap = overlap
        self._results: list[GroupScore] = []
        self._submitted = 0
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
        if self.overlap:
            self._queue.put(group)
        else:
            t0 = time.perf_counter()
            self._results.extend(self.client.score([group], self.weights))
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
