"""Adv-GRPO's evaluation metric, DINO similarity: how close an image is to its prompt's references.

score(image) = max over the group's references r of cos(cls(image), cls(r)), where cls is the
frozen DINOv2's final-layer-normed CLS token (transformers' ``Dinov2Model(...).pooler_output``;
timm's ``vit_base_patch14_dinov2.lvd142m`` with ``num_classes=0`` returns the same), after the
paper's preprocessing: 518x518 bicubic, ImageNet mean/std. In fp32. An image identical to one of
its references scores 1 (up to rounding). The prompt plays no part.

The backbone is loaded and images are preprocessed exactly as for the ``dino`` discriminator
(``advgrpo.reward_server.models.dinov2``). On the CPU every image and every reference goes through
the backbone alone, and each image's similarities are a product of its own unit embedding with its
group's (each in memory of its own), so a score is the same bit for bit whatever else was in the
batch; on a GPU the backbone runs chunks of ``backbone_chunk`` images, and the last bits may vary.

References arrive with the request (``ImageGroup.references``), decoded once per group; the host
hands every image its group's ``References``. Their unit embeddings are computed once per set in a
batch and kept by content in a small LRU cache (``reference_cache_bytes``): the same references come
back with every request for their prompt.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from advgrpo.reward_server.config import DinoSimilarityParams
from advgrpo.reward_server.feature_cache import FeatureCache
from advgrpo.reward_server.models.base import (
    Image,
    ReferenceRewardModel,
    References,
    check_images,
    resolve_device,
)
from advgrpo.reward_server.models.dinov2 import Preprocess, backbone_tokens, images_per_forward, load_dinov2

__all__ = ["DinoSimilarity", "max_cosine"]


def max_cosine(embedding: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """max_j cos(embedding, references[j]) for unit vectors: embedding [D], references [R, D]."""
    return torch.mv(references, embedding).max()


class DinoSimilarity(ReferenceRewardModel):
    kind = "dino_similarity"
    backbone_chunk = 32  # images per backbone forward on a GPU (one on the CPU)

    def __init__(self, name: str, params: DinoSimilarityParams, device: str = "cpu"):
        super().__init__(name)
        self.params = params
        self.device = resolve_device(device)
        self.backbone = load_dinov2(params.backbone, params.image_size, params.seed, self.device)
        self.dim = int(self.backbone.config.hidden_size)
        self._preprocess = Preprocess(params.image_size, params.image_mean, params.image_std, self.device)
        self.reference_cache = FeatureCache(params.reference_cache_bytes)  # unit CLS embeddings [D]

    @torch.no_grad()
    def embed(self, images: Sequence[Image]) -> list[torch.Tensor]:
        """Each image's unit CLS embedding [D], float32, each in memory of its own."""
        step = images_per_forward(self.device, self.backbone_chunk)
        out = []
        for start in range(0, len(images), step):
            tokens = backbone_tokens(self.backbone, images[start : start + step], self._preprocess, step)
            out += [F.normalize(cls.clone(), p=2.0, dim=0, eps=1e-12) for cls in tokens[:, 0]]
        return out

    def _reference_matrix(self, refs: References) -> torch.Tensor:
        """The unit embeddings [R, D] of one group's references (cached ones looked up by content)."""
        if not self.reference_cache.enabled:
            return torch.stack(self.embed(refs.images))
        keys = refs.digests()
        found = [self.reference_cache.get(key) for key in keys]
        todo: dict[bytes, int] = {}  # missing key -> index of its first image
        for i, (key, emb) in enumerate(zip(keys, found, strict=True)):
            if emb is None:
                todo.setdefault(key, i)
        if todo:
            computed = dict(zip(todo, self.embed([refs.images[i] for i in todo.values()]), strict=True))
            for key, emb in computed.items():
                self.reference_cache.put(key, emb)
            found = [computed[key] if emb is None else emb for key, emb in zip(keys, found, strict=True)]
        return torch.stack(found)

    @torch.no_grad()
    def score_against(self, images: Sequence[Image], references: Sequence[References]) -> np.ndarray:
        check_images(images, "images")
        if len(references) != len(images):
            raise ValueError(f"{len(references)} reference sets for {len(images)} images")
        if not images:
            return np.zeros(0, dtype=np.float32)
        matrices: dict[int, torch.Tensor] = {}  # id(References) -> [R, D], once per set in this call
        for i, refs in enumerate(references):
            if id(refs) not in matrices:
                if not len(refs):
                    raise ValueError(f"images[{i}]: its group has no references")
                check_images(refs.images, f"images[{i}].references")
                matrices[id(refs)] = self._reference_matrix(refs)
        embeddings = self.embed(images)
        scores = [max_cosine(e, matrices[id(r)]) for e, r in zip(embeddings, references, strict=True)]
        return torch.stack(scores).cpu().numpy().astype(np.float32)

    def stats(self) -> dict[str, float]:
        return self.reference_cache.stats().as_dict("feature_cache_")
