"""What the scores say about each model's health: the failures that users of reward services in
this field report going unnoticed (a judge's error turned into reward 0, NaN, all-zero or
constant rewards), counted per model for /metrics, /v1/stats and the dashboard.

* failures: model calls that raised (every request in the batch gets the error, never a score);
* nan, inf: images whose score was not finite (the request fails naming the model and image);
* zero-variance groups: groups of two or more images whose scores from this model are all equal,
  from which GRPO learns nothing (advantages are 0);
* constant: the model gave one and the same value to every image of its last ``window`` requests.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

from advgrpo.reward_server.metrics import ServerMetrics


@dataclass
class ModelWatch:
    failures: int = 0
    nan: int = 0
    inf: int = 0
    groups: int = 0  # groups of >= 2 images scored
    zero_variance_groups: int = 0
    recent: collections.deque = field(default_factory=collections.deque)  # (min, max) per request

    def constant(self, window: int) -> bool:
        if len(self.recent) < window:
            return False
        return min(lo for lo, _ in self.recent) == max(hi for _, hi in self.recent)


def nonfinite_counts(scores: Sequence[float]) -> tuple[int, int]:
    """(NaN count, infinity count)."""
    nan = sum(1 for s in scores if math.isnan(s))
    inf = sum(1 for s in scores if math.isinf(s))
    return nan, inf


def zero_variance(values: Sequence[float]) -> bool:
    """A group of >= 2 scores that are all equal (exactly: GRPO's advantages are then 0)."""
    return len(values) >= 2 and min(values) == max(values)


class ScoreWatch:
    def __init__(self, models: Sequence[str], metrics: ServerMetrics, window: int = 8):
        self.window = window
        self._metrics = metrics
        self._lock = threading.Lock()  # batches report from the models' threads
        self._models = {name: ModelWatch(recent=collections.deque(maxlen=window)) for name in models}
        for name in models:
            metrics.model_scores_constant.labels(name).set(0)

    def batch_failed(self, model: str) -> None:
        with self._lock:
            self._models[model].failures += 1
        self._metrics.model_failures.labels(model).inc()

    def batch_scored(self, model: str, scores: Sequence[float]) -> None:
        nan, inf = nonfinite_counts(scores)
        if nan or inf:
            with self._lock:
                self._models[model].nan += nan
                self._models[model].inf += inf
            self._metrics.nonfinite_scores.labels(model, "nan").inc(nan)
            self._metrics.nonfinite_scores.labels(model, "inf").inc(inf)

    def request_scored(self, model: str, groups: Sequence[Sequence[float]]) -> None:
        """One request's scores from ``model``, per group (all finite: checked before)."""
        sized = [g for g in groups if len(g) >= 2]
        flat = [s for g in groups for s in g]
        zero = sum(1 for g in sized if zero_variance(g))
        with self._lock:
            w = self._models[model]
            w.groups += len(sized)
            w.zero_variance_groups += zero
            if flat:
                w.recent.append((min(flat), max(flat)))
            constant = w.constant(self.window)
        self._metrics.groups_scored.labels(model).inc(len(sized))
        self._metrics.zero_variance_groups.labels(model).inc(zero)
        self._metrics.model_scores_constant.labels(model).set(1 if constant else 0)

    def snapshot(self, model: str) -> dict:
        with self._lock:
            w = self._models[model]
            return {
                "failures": w.failures,
                "nan": w.nan,
                "inf": w.inf,
                "groups": w.groups,
                "zero_variance_groups": w.zero_variance_groups,
                "zero_variance_share": w.zero_variance_groups / w.groups if w.groups else None,
                "constant": w.constant(self.window),
                "constant_window": self.window,
            }
