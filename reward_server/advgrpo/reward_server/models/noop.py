"""Simple reward models: a constant (isolates transport cost), brightness (RL sanity checks) and
saturation (the toy world's hackable proxy)."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from advgrpo.reward_server.config import BrightnessParams, NoopParams, SaturationParams
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


def saturation(image: Image) -> float:
    """Mean HSV saturation, (max - min) / max per pixel (0 where the pixel is black), in [0, 1]."""
    rgb = image.astype(np.float32)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    return float(np.mean(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0)))


class SaturationReward(RewardModel):
    """Mean HSV saturation in [0, 1] (``saturation``): the toy world's hackable proxy reward."""

    kind = "saturation"

    def __init__(self, name: str, params: SaturationParams):
        super().__init__(name)

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        return np.array([saturation(img) for img in images], dtype=np.float32)
