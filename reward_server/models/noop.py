"""A model that returns a constant: isolates transport cost in benchmarks and tests."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import NoopParams
from .base import Image, RewardModel


class NoopReward(RewardModel):
    kind = "noop"

    def __init__(self, name: str, params: NoopParams):
        super().__init__(name)
        self.value = params.value

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        return np.full(len(images), self.value, dtype=np.float32)
