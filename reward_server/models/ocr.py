"""OCR reward (Flow-GRPO): how closely the text rendered in an image matches the prompt's quote.

PP-OCRv4 (detector + recogniser) runs through rapidocr-onnxruntime, whose wheel ships the
weights, so the reward works offline. The reward math lives in pure functions below.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

from ..config import OcrParams
from ..errors import ConfigError, InvalidArgument
from .base import Image, RewardModel

# The first "straight" or “curly” quoted span; re.search picks whichever opens first.
_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')
_WHITESPACE = re.compile(r"\s+")


def ocr_target(prompt: str) -> str | None:
    """The text inside the prompt's first quoted span, or None if there is none or it is blank."""
    m = _QUOTED.search(prompt)
    if m is None:
        return None
    text = m.group(1) if m.group(1) is not None else m.group(2)
    return text if normalise(text) else None


def normalise(text: str) -> str:
    """Lower-cased with all whitespace removed (OCR splits and joins words unpredictably)."""
    return _WHITESPACE.sub("", text).lower()


def ocr_reward(recognised: str, target: str) -> float:
    """1 − d/len(target): d = 0 if the target occurs in the text, else the Levenshtein distance
    clipped to len(target). Both strings are normalised first."""
    recognised, target = normalise(recognised), normalise(target)
    if not target:
        raise ValueError("ocr_reward: the target has no characters")
    if target in recognised:
        return 1.0
    d = min(Levenshtein.distance(recognised, target), len(target))
    return 1.0 - d / len(target)


class OcrReward(RewardModel):
    kind = "ocr"

    def __init__(self, name: str, params: OcrParams):
        super().__init__(name)
        from rapidocr_onnxruntime import RapidOCR  # heavy import: only when an OCR model is configured

        if params.num_threads < 0:
            raise ConfigError(f"models.{name}.params.num_threads: must be >= 0")
        self.params = params
        # RapidOCR silently falls back to all cores for counts above os.cpu_count(): clamp instead.
        threads = min(params.num_threads, os.cpu_count() or 1) if params.num_threads else -1
        self._engine = RapidOCR(
            intra_op_num_threads=threads,
            inter_op_num_threads=1,
            # Generated text is upright; the 0/180° classifier costs time and can flip lines
            # (Flow-GRPO runs PaddleOCR with cls=False too).
            use_cls=False,
            # Confidence filtering happens here, with params.min_confidence, not in RapidOCR.
            text_score=0.0,
        )

    def validate(self, prompts: Sequence[str], where: Sequence[str]) -> None:
        for prompt, w in zip(prompts, where):
            if ocr_target(prompt) is None:
                raise InvalidArgument(f"{w}: prompt has no quoted text for the ocr reward: {prompt!r}")

    def recognise(self, image: Image) -> str:
        """The image's text: recognised spans in reading order, low-confidence ones dropped."""
        # RapidOCR takes a 3-channel ndarray as BGR (OpenCV order); ours are RGB.
        bgr = np.ascontiguousarray(image[..., ::-1])
        result, _elapsed = self._engine(bgr)
        if not result:  # (None, None) when nothing is detected
            return ""
        # Rows are [box, text, confidence], already sorted top-to-bottom, left-to-right.
        return "".join(text for _box, text, conf in result if float(conf) >= self.params.min_confidence)

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        rewards = np.empty(len(images), dtype=np.float32)
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            target = ocr_target(prompt)
            if target is None:  # validate() keeps these out; a direct caller gets a clear error
                raise InvalidArgument(f"prompt has no quoted text for the ocr reward: {prompt!r}")
            rewards[i] = ocr_reward(self.recognise(image), target)
        return rewards
