"""Simple reward models: a constant (isolates transport cost) and brightness (RL sanity checks)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import BrightnessParams, NoopParams
from .base import Image, RewardModel


class NoopReward(RewardModel):
    kind = "noop"

    def __init__(self, name: str, params: NoopParams):
        super().__init__(name)
        self.value = params.value

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        return np.full(len(images), self.value, dtype=np.float32)


class BrightnessReward(RewardModel):
    """Mean pixel value in [0, 1]: a simple, dense reward for tests and RL sanity checks."""

    kind = "brightness"

    def __init__(self, name: str, params: BrightnessParams):
        super().__init__(name)

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        return np.array([img.mean() / 255.0 for img in images], dtype=np.float32)
