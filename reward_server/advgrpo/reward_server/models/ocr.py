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

from advgrpo.common.errors import ConfigError, InvalidArgument
from advgrpo.reward_server.config import OcrParams
from advgrpo.reward_server.models.base import Image, RewardModel

# Images thinner than 1:MAX_ASPECT are padded (see pad_thin) before they reach RapidOCR.
MAX_ASPECT = 16

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


def pad_thin(image: Image, max_aspect: int = MAX_ASPECT) -> Image:
    """Pads the short side of a very thin image with its background so that long/short <= max_aspect.

    RapidOCR cannot take such images: its preprocessing first scales the long side down to
    ``max_side_len`` (2000) and rounds both sides to multiples of 32, which turns a short side
    under 17 px at that scale into 0 (``ResizeImgError``: 20x2500, 1x4096); it then scales a
    short side under ``min_side_len`` (30) up to 30 with the long side in proportion (1x1000 ->
    30x30000), and the detector scales the short side up to 736 again, so a thin image that
    survives the resize can take gigabytes and minutes. Bounding the aspect ratio keeps the
    short side >= 2000/16 = 125 px after the first step, and both later scalings bounded.

    A thin image is a valid image (typically with no readable text); padding adds none: the
    image is centred on a band of its border's per-channel median colour. Images within the
    ratio are returned as they are (the server refuses thinner ones by default).
    """
    h, w = image.shape[:2]
    if min(h, w) == 0 or min(h, w) >= -(-max(h, w) // max_aspect):  # ceil(long / max_aspect)
        return image  # within the ratio (zero dimensions: refused by decoding before this)
    if h > w:  # a tall image: pad it as the wide one it is transposed
        return pad_thin(image.swapaxes(0, 1), max_aspect).swapaxes(0, 1)
    need = -(-w // max_aspect)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    out = np.empty((need,) + image.shape[1:], dtype=image.dtype)
    out[...] = np.median(border, axis=0).astype(image.dtype)
    top = (need - h) // 2
    out[top : top + h] = image
    return out


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
        for prompt, w in zip(prompts, where, strict=True):
            if ocr_target(prompt) is None:
                raise InvalidArgument(f"{w}: prompt has no quoted text for the ocr reward: {prompt!r}")

    def recognise(self, image: Image) -> str:
        """The image's text: recognised spans in reading order, low-confidence ones dropped."""
        # RapidOCR takes a 3-channel ndarray as BGR (OpenCV order); ours are RGB.
        bgr = np.ascontiguousarray(pad_thin(image)[..., ::-1])
        result, _elapsed = self._engine(bgr)
        if not result:  # (None, None) when nothing is detected
            return ""
        # Rows are [box, text, confidence], already sorted top-to-bottom, left-to-right.
        return "".join(text for _box, text, conf in result if float(conf) >= self.params.min_confidence)

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        rewards = np.empty(len(images), dtype=np.float32)
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            target = ocr_target(prompt)
            if target is None:  # validate() keeps these out; a direct caller gets a clear error
                raise InvalidArgument(f"prompt has no quoted text for the ocr reward: {prompt!r}")
            rewards[i] = ocr_reward(self.recognise(image), target)
        return rewards
