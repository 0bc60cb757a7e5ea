"""Simple reward models: a constant (isolates transport cost) and brightness (RL sanity checks)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from advgrpo.reward_server.config import BrightnessParams, NoopParams
from advgrpo.reward_server.models.base import Image, RewardModel


class NoopReward(RewardModel):
    kind = "noop"

    def __init__(self, name: str, params: NoopParams):
        super().__init__(name)
        self.value = params.value
        self.delay_s = params.delay_ms / 1000.0

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        return np.full(len(images), self.value, dtype=np.float32)


class BrightnessReward(RewardModel):
    """Mean pixel value in [0, 1]: a simple, dense reward for tests and RL sanity checks."""

    kind = "brightness"

    def __init__(self, name: str, params: BrightnessParams):
        super().__init__(name)

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        return np.array([img.mean() / 255.0 for img in images], dtype=np.float32)
