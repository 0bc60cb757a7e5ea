"""Reward models by kind. ``build_model`` is the one place a config becomes a model object."""

from __future__ import annotations

from advgrpo.reward_server.config import ModelConfig
from advgrpo.reward_server.models.base import (
    ModelUpdate,
    ReferenceRewardModel,
    References,
    RewardModel,
    TrainableRewardModel,
    content_seed,
)

__all__ = [
    "ModelUpdate",
    "ReferenceRewardModel",
    "References",
    "RewardModel",
    "TrainableRewardModel",
    "build_model",
    "content_seed",
]


def build_model(cfg: ModelConfig, device: str = "cpu") -> RewardModel:
    """Builds (and loads the weights of) the model ``cfg`` describes, on ``device``."""
    if cfg.kind == "dino":
        from advgrpo.reward_server.models.dino import DinoDiscriminator

        return DinoDiscriminator(cfg.name, cfg.params, device=device)
    if cfg.kind == "dino_similarity":
        from advgrpo.reward_server.models.dino_similarity import DinoSimilarity

        return DinoSimilarity(cfg.name, cfg.params, device=device)
    if cfg.kind == "pickscore":
        from advgrpo.reward_server.models.pickscore import PickScoreModel

        return PickScoreModel(cfg.name, cfg.params, device=device)
    if cfg.kind == "ocr":
        from advgrpo.reward_server.models.ocr import OcrReward

        return OcrReward(cfg.name, cfg.params)
    if cfg.kind == "noop":
        from advgrpo.reward_server.models.noop import NoopReward

        return NoopReward(cfg.name, cfg.params)
    if cfg.kind == "brightness":
        from advgrpo.reward_server.models.noop import BrightnessReward

        return BrightnessReward(cfg.name, cfg.params)
    if cfg.kind == "saturation":
        from advgrpo.reward_server.models.noop import SaturationReward

        return SaturationReward(cfg.name, cfg.params)
    raise ValueError(f"unknown model kind {cfg.kind!r}")
