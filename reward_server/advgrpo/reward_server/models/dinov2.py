"""The frozen DINOv2 backbone of the DINO models (the ``dino`` discriminator and the
``dino_similarity`` metric): loading, preprocessing, and forwards that are batch-invariant on the
CPU. One copy of these, so both models see an image exactly alike.

Loading: a model id or local path (``transformers.Dinov2Model.from_pretrained``, float32), "toy"
(the toy world's pretrained backbone, shipped in the package: ``config.TOY_DINOV2_DIR``), or
"tiny" (``advgrpo.common.tiny_models.tiny_dinov2``: random-initialised from a seed, no download);
frozen (eval, no grad). Preprocessing: uint8 [H, W, 3] -> float32 [3, S, S], bicubic (antialiased
when shrinking), clamped to [0, 1], then ImageNet-style mean/std normalisation. Forwards: one image
per backbone call on the CPU, so an image's tokens do not depend on the batch it came in (see
``advgrpo.reward_server.models.dino``'s docstring for what chunks did there), ``chunk`` images per
call on a GPU.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advgrpo.reward_server.config import TINY, TOY, TOY_DINOV2_DIR

__all__ = ["Preprocess", "backbone_tokens", "images_per_forward", "load_dinov2", "toy_backbone_digest"]


def toy_backbone_digest() -> str:
    """sha256 of the shipped toy backbone's weights, as its training record states them."""
    record = json.loads((TOY_DINOV2_DIR / "training.json").read_text())
    return record["sha256"]["model.safetensors"]


def load_dinov2(backbone: str, image_size: int, seed: int, device: torch.device) -> nn.Module:
    """The frozen DINOv2 ``backbone`` (id, local path, "toy": the shipped toy-world backbone, or
    "tiny": built for ``image_size`` from ``seed``) on ``device``, in float32, eval mode, without
    gradients."""
    if backbone == TINY:
        from advgrpo.common.tiny_models import tiny_dinov2

        model = tiny_dinov2(image_size, seed)
    else:
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(TOY_DINOV2_DIR if backbone == TOY else backbone, dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


class Preprocess:
    """uint8 [H, W, 3] -> normalised float32 [3, S, S] on ``device`` (bicubic, antialiased when
    shrinking; ``mean``/``std`` per RGB channel, applied to pixels in [0, 1])."""

    def __init__(
        self, image_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
    ):
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32, device=self.device).view(3, 1, 1)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        s = self.image_size
        arr = np.ascontiguousarray(image)
        if not arr.flags.writeable:  # a view of the request's bytes: torch warns about wrapping those
            arr = arr.copy()
        x = torch.from_numpy(arr).to(self.device)
        x = x.permute(2, 0, 1).to(torch.float32).div_(255.0)
        if x.shape[1:] != (s, s):
            x = F.interpolate(x[None], size=(s, s), mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; keep the pixel range of a real image
        return (x - self.mean) / self.std


def images_per_forward(device: torch.device, chunk: int) -> int:
    """Images per backbone forward: one on the CPU (batch-invariant tokens), ``chunk`` on a GPU.

    Cost on the CPU, measured on a 2-core AMD EPYC that other jobs shared (medians of
    alternated runs), one image per forward against chunks of up to 32: scoring 64 images with the
    tiny preset's cache off, whose backbone forward is mostly fixed overhead, 105 ms
    instead of 22 ms with 1 thread (108 instead of 20 with 2); a ViT-B/14-sized backbone
    (random weights), 16 images at 112 px: 2.8 s instead of 2.3 s with 1 thread, 4 images
    at 224 px: 2.5 s instead of 2.3 s. With 2 threads there 10.2 s instead of 4.1 s and
    9.6 s instead of 5.3 s, but 2 threads were slower than 1 either way on that shared
    machine: the multi-threaded cost is still to be measured on an idle one."""
    return chunk if device.type == "cuda" else 1


def backbone_tokens(
    backbone: nn.Module,
    images: Sequence[np.ndarray],
    preprocess: Callable[[np.ndarray], torch.Tensor],
    step: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The backbone's final-layer-normed tokens [B, 1+N, D] (``last_hidden_state``: CLS first, the
    token ``pooler_output`` is), float32, ``step`` images per forward (``images_per_forward``).
    ``transform`` applies to each forward's output on its own (so on the CPU to one image's tokens,
    whatever the batch: a reduction over a whole batch might round by where a token lies in it)."""
    out = []
    for start in range(0, len(images), step):
        pixels = torch.stack([preprocess(img) for img in images[start : start + step]])
        tokens = backbone(pixel_values=pixels).last_hidden_state.to(torch.float32)
        out.append(tokens if transform is None else transform(tokens))
    return torch.cat(out)
