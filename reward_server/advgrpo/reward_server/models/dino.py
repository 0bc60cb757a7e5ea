"""The Adv-GRPO DINO discriminator: a frozen DINOv2 backbone and a small trained head.

reward(image) = cls_weight * head(cls) + (1 - cls_weight) * mean_k head(patch_k), a raw logit, where
the K patch tokens are sampled without replacement from a generator seeded by the image's own
pixels (``content_seed``): the same image always gets the same reward under the same weights,
whatever batch it arrives in. The head is trained with the hinge loss on references (real) vs
generations (fake). Unlike the original code, one feature transform serves scoring and training.

The math lives in small pure functions (``sample_patch_index``, ``transform_tokens``,
``head_scores``, ``hinge_loss``, ``discriminator_loss``); ``head_scores`` is the one step a fused
kernel may replace on the scoring path.

Feature cache: the backbone is frozen, so an image's transformed tokens never change. ``update``
keeps its references' tokens in a bounded LRU cache keyed by content (``feature_cache_bytes``);
scoring and updates look every image up and run the backbone for the misses only. Generations
are not inserted: they are new every epoch and would only evict references.

The cache never changes a result because an image's tokens do not depend on the batch it came in.
On the CPU that holds by construction: the backbone runs one image per forward, so every image goes
through the same shapes, hence the same kernels and summation orders, whatever it was scored with
(for a given number of threads). In chunks of several images it did not always hold (an AMD EPYC,
torch 2.13 with MKL): every image's tokens changed with its chunk (2, 3, 5 or 12 images) for a tiny
backbone of width 33 with 2 or 5 threads, and up to half of them for width 34 with 5 threads,
though width 32 (the tiny preset), 36 and ViT-B/14 dimensions at 112 px came out bit-identical. At
width 33 the first difference was in the first layer's attention output
(``scaled_dot_product_attention`` on bit-identical q, k, v: the CPU kernel multiplies each image's
and head's blocks where they lie in the batch), likely the cause found in the head: MKL's SGEMM
picks its summation order by an operand's alignment
(``advgrpo.kernels.patch_score.row_logits_reference``). The cost is the backbone's fixed overhead
per forward (``_backbone_images``). On a GPU the backbone still runs chunks of ``backbone_chunk``
images: cuBLAS may choose other kernels for other batch sizes, so there an image's tokens, and so
its reward, may differ in the last bits with its batch (tests/test_feature_cache.py checks
bit-identity on a GPU where there is one; not run on one yet). The head is batch-invariant by
construction on the CPU path (``advgrpo.kernels.patch_score.row_logits_reference``): the batcher
merges requests, and an image's reward must not change in its last bits with the company it was
scored in.

Loading, preprocessing and the backbone's forwards are shared with the ``dino_similarity`` metric
(``advgrpo.reward_server.models.dinov2``), so both see an image alike.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advgrpo.common.errors import InvalidArgument
from advgrpo.common.optimizer_state import optimizer_state_from_tensors, optimizer_state_to_tensors
from advgrpo.kernels import patch_hinge_loss, patch_score
from advgrpo.reward_server.config import TINY, TOY, DinoParams
from advgrpo.reward_server.feature_cache import FeatureCache
from advgrpo.reward_server.models.base import (
    Image,
    ModelUpdate,
    TrainableRewardModel,
    check_images,
    check_prompts,
    content_digest,
    digest_seeds,
    mix_seeds,
    resolve_device,
    splitmix64,
)
from advgrpo.reward_server.models.dinov2 import (
    Preprocess,
    backbone_tokens,
    images_per_forward,
    load_dinov2,
    toy_backbone_digest,
)

__all__ = [
    "DinoDiscriminator",
    "build_head",
    "discriminator_loss",
    "head_scores",
    "hinge_loss",
    "mix_seed",
    "mix_seeds",
    "sample_patch_index",
    "transform_tokens",
]

_HEAD_PREFIX = "head."
_OPTIM_PREFIX = "optim."
_OPTIM_META = "optim"
_FINGERPRINT_META = "fingerprint"


# --------------------------------------------------------------------------------------------
# Pure math


def mix_seed(seed: int, *values: int) -> int:
    """``mix_seeds`` for one seed."""
    return mix_seeds([seed], *values)[0]


def sample_patch_index(
    seeds: Sequence[int], n_patches: int, k: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[B, K] patch indices (0..n_patches-1, CLS excluded), K distinct ones per row.

    Row b is the first K of a permutation of the patches set by ``seeds[b]`` alone: patch j gets
    the key mix(mix(seed) ^ j), which is distinct for every j (the mixer is a bijection), and the
    K smallest keys win, in key order. So a row is the same on every device and in every batch,
    and one vectorised pass serves the whole batch.
    """
    if not 1 <= k <= n_patches:
        raise ValueError(f"k must be in 1..{n_patches}, got {k}")
    if len(seeds) == 0:
        return torch.empty(0, k, dtype=torch.long, device=device)
    base = splitmix64(np.asarray(seeds, dtype=np.uint64).reshape(-1, 1))
    keys = splitmix64(base ^ np.arange(n_patches, dtype=np.uint64))
    if n_patches <= 256:  # small rows: one sort beats partition + sort + two gathers
        index = np.argsort(keys, axis=1)[:, :k]  # keys in a row are distinct: no ties
    elif k < n_patches:
        picked = np.argpartition(keys, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(keys, picked, axis=1), axis=1)
        index = np.take_along_axis(picked, order, axis=1)
    else:
        index = np.argsort(keys, axis=1)
    return torch.from_numpy(index.astype(np.int64)).to(device)


def transform_tokens(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """The feature transform shared by scoring and training: "l2" normalises each token over D."""
    if kind == "l2":
        return F.normalize(tokens, p=2.0, dim=-1, eps=1e-12)
    if kind == "none":
        return tokens
    raise ValueError(f"unknown feature_transform {kind!r} (expected 'l2' or 'none')")


def build_head(dim: int, hidden: int, seed: int) -> nn.Sequential:
    """Linear(D, hidden) -> GELU (exact) -> Linear(hidden, 1), initialised from ``seed``.

    Same distribution as torch's default Linear init (U(+-1/sqrt(fan_in))) but drawn from a
    private generator on the CPU, so weights are identical on every device and the global RNG is
    not touched.
    """
    # skip_init: constructing a Linear normally would draw (and advance) the global RNG.
    head = nn.Sequential(
        nn.utils.skip_init(nn.Linear, dim, hidden),
        nn.GELU(approximate="none"),
        nn.utils.skip_init(nn.Linear, hidden, 1),
    )
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer in (head[0], head[2]):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
    return head


def head_scores(
    tokens: torch.Tensor, patch_index: torch.Tensor, head: nn.Module, cls_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores CLS and sampled patch tokens with the shared head.

    tokens [B, 1+N, D] (already transformed), patch_index [B, K] into the N patch tokens; the
    head's weights are head[0] (w1, b1) and head[2] (w2, b2).
    Returns cls_logit [B], patch_logit [B, K], reward [B] = w*cls + (1-w)*mean(patch).
    """
    b, _, d = tokens.shape
    k = patch_index.shape[1]
    patches = tokens[:, 1:, :].gather(1, patch_index.unsqueeze(-1).expand(b, k, d))
    picked = torch.cat([tokens[:, :1, :], patches], dim=1)  # one head call for CLS + patches
    logits = head(picked).squeeze(-1)  # [B, 1+K]
    cls_logit, patch_logit = logits[:, 0], logits[:, 1:]
    reward = cls_weight * cls_logit + (1.0 - cls_weight) * patch_logit.mean(dim=1)
    return cls_logit, patch_logit, reward


def hinge_loss(ref_logits: torch.Tensor, gen_logits: torch.Tensor) -> torch.Tensor:
    """½(mean relu(1 − D(ref)) + mean relu(1 + D(gen))), each mean over all given logits."""
    return 0.5 * (F.relu(1.0 - ref_logits).mean() + F.relu(1.0 + gen_logits).mean())


def discriminator_loss(
    ref_cls: torch.Tensor,
    ref_patch: torch.Tensor,
    gen_cls: torch.Tensor,
    gen_patch: torch.Tensor,
    patch_loss_weight: float,
) -> torch.Tensor:
    """Hinge loss on CLS logits plus ``patch_loss_weight`` × the hinge loss on every patch logit."""
    return hinge_loss(ref_cls, gen_cls) + patch_loss_weight * hinge_loss(ref_patch, gen_patch)


# --------------------------------------------------------------------------------------------
# The model


class DinoDiscriminator(TrainableRewardModel):
    kind = "dino"
    # Images per backbone forward on a GPU (on the CPU: one, see ``_backbone_images``); bounds
    # activation memory when an update brings many images.
    backbone_chunk = 32

    def __init__(self, name: str, params: DinoParams, device: str = "cpu"):
        super().__init__(name)
        self.params = params
        self.device = resolve_device(device)
        self.backbone = load_dinov2(params.backbone, params.image_size, params.seed, self.device)
        self.dim = int(self.backbone.config.hidden_size)
        patch = int(self.backbone.config.patch_size)
        self.n_patches = (params.image_size // patch) ** 2
        if self.n_patches < 1:
            raise ValueError(f"image_size {params.image_size} is smaller than the patch size {patch}")
        self.k = min(params.num_patches, self.n_patches)
        transform_tokens(torch.zeros(1, 1), params.feature_transform)  # fail fast on a bad name

        self.head = build_head(self.dim, params.head_hidden, params.seed).to(self.device)
        # fused: one kernel for all head tensors (CPU and CUDA); the head is small, so per-tensor
        # dispatch is most of an optimizer step on cached features.
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=params.lr, betas=tuple(params.betas), fused=True)
        self._trainable = list(self.head.parameters())
        self._preprocessor = Preprocess(params.image_size, params.image_mean, params.image_std, self.device)
        # Tokens stay on the model's device: a hit is then a copy on the device (no host <-> GPU
        # transfer), at the price of device memory, which feature_cache_bytes bounds.
        self.feature_cache = FeatureCache(params.feature_cache_bytes)  # references, kept
        self.recent_cache = FeatureCache(params.recent_feature_cache_bytes)  # scored images, LRU

    # -- features ------------------------------------------------------------------------------

    def _preprocess(self, image: Image) -> torch.Tensor:
        """uint8 [H, W, 3] -> normalised float32 [3, S, S] (``dinov2.Preprocess``)."""
        return self._preprocessor(image)

    @torch.no_grad()
    def features(
        self, images: Sequence[Image], insert: str | None = None, keys: Sequence[bytes] | None = None
    ) -> torch.Tensor:
        """Transformed backbone tokens [B, 1+N, D] (CLS first), float32 on the model's device.

        With the caches on, each image is looked up by content (references first, then recently
        scored images) and only the misses (each distinct image once) go through preprocessing
        and the backbone. ``insert`` keeps the misses' tokens: "reference" in the reference pool,
        "recent" in the pool of scored images. Identical to the uncached result, bit for bit.
        ``keys``: the images' ``content_digest``s when the caller has them already.
        """
        pools = [c for c in (self.feature_cache, self.recent_cache) if c.enabled]
        if not pools:
            return self._backbone_features(images)
        if keys is None:
            keys = [content_digest(img) for img in images]
        found = [self._lookup(key, pools) for key in keys]
        todo: dict[bytes, int] = {}  # missing key -> index of its first image
        for i, (key, tokens) in enumerate(zip(keys, found, strict=True)):
            if tokens is None:
                todo.setdefault(key, i)
        if todo:
            computed = dict(zip(todo, self._backbone_features([images[i] for i in todo.values()]), strict=True))
            found = [computed[key] if tokens is None else tokens for key, tokens in zip(keys, found, strict=True)]
            target = {"reference": self.feature_cache, "recent": self.recent_cache}.get(insert or "")
            if target is not None:
                for key, tokens in computed.items():
                    target.put(key, tokens)
        return torch.stack(found)

    @staticmethod
    def _lookup(key: bytes, pools: list[FeatureCache]) -> torch.Tensor | None:
        for pool in pools:
            tokens = pool.get(key)
            if tokens is not None:
                return tokens
        return None

    def _backbone_images(self) -> int:
        """Images per backbone forward: one on the CPU (batch-invariant tokens, see the module
        docstring), ``backbone_chunk`` on a GPU (``dinov2.images_per_forward``, with its cost)."""
        return images_per_forward(self.device, self.backbone_chunk)

    def _backbone_features(self, images: Sequence[Image]) -> torch.Tensor:
        """``features`` without the cache: preprocessing and the backbone, in chunks of
        ``_backbone_images()``."""
        kind = self.params.feature_transform
        tokens = backbone_tokens(
            self.backbone, images, self._preprocess, self._backbone_images(), lambda t: transform_tokens(t, kind)
        )
        # Registers or odd sizes would break the 1+N layout every index here relies on.
        if tokens.shape[1] != 1 + self.n_patches:
            raise RuntimeError(f"backbone returned {tokens.shape[1]} tokens, expected 1+{self.n_patches}")
        return tokens

    def _digests(self, images: Sequence[Image]) -> tuple[list[bytes], list[int]]:
        """Each image's content digest (its cache key) and its patch-sampling seed, from one pass
        over the original uint8 pixels (before any resizing)."""
        keys = [content_digest(img) for img in images]
        return keys, digest_seeds(keys, self.params.seed)

    @torch.no_grad()
    def _rewards(self, tokens: torch.Tensor, seeds: Sequence[int], batch_invariant: bool = True) -> torch.Tensor:
        """The scoring path (no grad), through the fused kernel (``kernels`` dispatches: Triton on
        CUDA, the PyTorch reference on CPU). ``batch_invariant=False``: for figures about a whole
        batch, never for Score (see ``advgrpo.kernels.patch_score``)."""
        index = sample_patch_index(seeds, self.n_patches, self.k, self.device)
        weights = self._head_weights()
        return patch_score(tokens, index, *weights, cls_weight=self.params.cls_weight, batch_invariant=batch_invariant)[
            2
        ]

    def _head_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        first, last = self.head[0], self.head[2]
        return first.weight, first.bias, last.weight, last.bias

    # -- RewardModel ---------------------------------------------------------------------------

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        # Prompts play no part: the discriminator judges the image alone.
        check_images(images, "images")
        if not images:
            return np.zeros(0, dtype=np.float32)
        keys, seeds = self._digests(images)
        tokens = self.features(images, insert="recent", keys=keys)  # an update of these may follow
        return self._rewards(tokens, seeds).cpu().numpy().astype(np.float32)

    def update(
        self,
        references: Sequence[Image],
        reference_prompts: Sequence[str],
        generated: Sequence[Image],
        generated_prompts: Sequence[str],
        steps: int,
    ) -> ModelUpdate:
        if not references:
            raise InvalidArgument("discriminator update has no references")
        if not generated:
            raise InvalidArgument("discriminator update has no generated images")
        if steps < 1:
            raise InvalidArgument(f"steps must be >= 1, got {steps}")
        check_images(references, "references")
        check_images(generated, "generated")
        check_prompts(references, reference_prompts, "reference_prompts")
        check_prompts(generated, generated_prompts, "generated_prompts")

        p = self.params
        # The backbone is frozen: its tokens are computed once and reused by every step, and the
        # references' are kept for the next update (the same references come back every epoch).
        ref_keys, ref_seeds = self._digests(references)
        gen_keys, gen_seeds = self._digests(generated)
        ref_tokens = self.features(references, insert="reference", keys=ref_keys)
        gen_tokens = self.features(generated, keys=gen_keys)

        # One batch for the fused loss: references (+1) then generations (-1).
        tokens = torch.cat([ref_tokens, gen_tokens])
        n_ref = len(references)
        target = torch.cat([torch.ones(n_ref), -torch.ones(len(generated))]).to(self.device)
        seeds = ref_seeds + gen_seeds
        loss = torch.zeros(())
        for step in range(steps):
            # Fresh patches per step, yet deterministic: seeded by content, version and step.
            index = sample_patch_index(mix_seeds(seeds, self.version, step), self.n_patches, self.k, self.device)
            loss = patch_hinge_loss(tokens, index, target, *self._head_weights(), patch_loss_weight=p.patch_loss_weight)
            for param in self._trainable:  # Optimizer.zero_grad's profiler hooks cost more than this
                param.grad = None
            loss.backward()
            self.optimizer.step()

        # Reported scores are the scoring path's rewards (content-seeded patches) after the update,
        # for the whole batch at once: Score's rewards up to float rounding.
        reward = self._rewards(tokens, seeds, batch_invariant=False).tolist()  # one device sync
        ref_reward, gen_reward = reward[:n_ref], reward[n_ref:]
        correct = sum(r > 0 for r in ref_reward) + sum(r < 0 for r in gen_reward)
        return ModelUpdate(
            loss=float(loss.detach()),
            reference_score=math.fsum(ref_reward) / len(ref_reward),
            generated_score=math.fsum(gen_reward) / len(gen_reward),
            accuracy=correct / len(reward),
        )

    def stats(self) -> dict[str, float]:
        """Both pools as one cache: a lookup is a hit when either pool had the image."""
        ref, recent = self.feature_cache.stats(), self.recent_cache.stats()
        last = recent if recent.max_bytes else ref  # the pool a missing image was looked up in last
        return {
            "feature_cache_hits": ref.hits + recent.hits,
            "feature_cache_misses": last.misses,
            "feature_cache_evictions": ref.evictions + recent.evictions,
            "feature_cache_bytes": ref.bytes + recent.bytes,
            "feature_cache_entries": ref.entries + recent.entries,
        }

    # -- state ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        p = self.params
        backbone = f"tiny-{p.image_size}-s{p.seed}" if p.backbone == TINY else p.backbone
        if p.backbone == TOY:  # the shipped weights by content: a retrained toy backbone is another one
            backbone = "toy-" + toy_backbone_digest()[:16]
        return f"dino|{backbone}|D={self.dim}|head={p.head_hidden}|transform={p.feature_transform}"

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        # Clones: the optimizer updates these tensors in place, and an export is also a rollback
        # snapshot taken before an update.
        tensors = {_HEAD_PREFIX + k: v.detach().clone() for k, v in self.head.state_dict().items()}
        optim_tensors, groups = optimizer_state_to_tensors(self.optimizer, prefix=_OPTIM_PREFIX)
        tensors.update({k: v.detach().clone() for k, v in optim_tensors.items()})
        return tensors, {_OPTIM_META: groups, _FINGERPRINT_META: self.fingerprint()}

    def import_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        fp = metadata.get(_FINGERPRINT_META)
        if fp is not None and fp != self.fingerprint():
            raise ValueError(f"model {self.name}: state is for {fp!r}, this model is {self.fingerprint()!r}")
        head_sd = self.head.state_dict()
        for key, ref in head_sd.items():
            got = tensors.get(_HEAD_PREFIX + key)
            if got is None or tuple(got.shape) != tuple(ref.shape):
                shape = None if got is None else tuple(got.shape)
                raise ValueError(
                    f"model {self.name}: state tensor {_HEAD_PREFIX + key} is {shape}, expected {tuple(ref.shape)}"
                )
        with torch.no_grad():  # copy into the live parameters: the optimizer holds references to them
            for key, param in head_sd.items():
                param.copy_(tensors[_HEAD_PREFIX + key])
        # Clones, so later steps never write into the caller's tensors (load_state_dict may alias
        # them); it moves them to the parameters' device itself.
        optim = {k: v.detach().clone() for k, v in tensors.items() if k.startswith(_OPTIM_PREFIX)}
        if _OPTIM_META in metadata:
            optimizer_state_from_tensors(self.optimizer, optim, metadata[_OPTIM_META], prefix=_OPTIM_PREFIX)
        else:  # weights without optimizer state: start the moments afresh
            self.optimizer.state.clear()
        # The configured hyper-parameters win over saved ones (identical unless the config changed).
        for group in self.optimizer.param_groups:
            group["lr"] = self.params.lr
            group["betas"] = tuple(self.params.betas)
