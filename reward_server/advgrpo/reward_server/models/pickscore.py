"""PickScore: a CLIP model scoring image/prompt agreement, optionally trained as a discriminator.

reward = logit_scale.exp() * cos(text_emb, image_emb) / scale (Flow-GRPO's PickScore reward).

As a discriminator (Adv-GRPO) only the last ``trainable_blocks`` vision transformer blocks train;
everything else — embeddings, earlier blocks, post_layernorm, visual_projection, the text tower
and logit_scale — stays frozen. That is the paper's "only the last vision block trains", and it
lets an update run the frozen prefix of the vision tower once and only the trained blocks per step.
The loss pairs each generation with the references of its prompt: −log σ(s_ref − s_gen).

Scoring is batch-invariant on the CPU: the batcher merges requests, and an image's reward must
not change in its last bits with the company it was scored in. So there each image runs through
the vision tower on its own, and each distinct prompt through the text tower on its own: one
shape for every image (and prompt), so the same kernels and summation orders whatever else was
in the batch (for a given number of threads). Batched, the towers' projections to the embedding
are products with one row per image (or prompt), and MKL's SGEMM sums in another order for
other small row counts: 15 of 18 tiny-model rewards changed in their last bits between a batch
of 18 and one image at a time (an AMD EPYC, with 1, 2 and 5 threads), while the vision tower's
pooled output before the projection was bit-identical (its GEMMs have 17 rows per image there).
See ``advgrpo.kernels.patch_score.row_logits_reference`` for what MKL's order depends on. On a
GPU the towers run the whole batch at once, as before (cuBLAS may choose other kernels for other
batch sizes, so there the last bits may change with the batch).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from advgrpo.common.errors import ConfigError, FailedPrecondition, InvalidArgument
from advgrpo.common.optimizer_state import optimizer_state_from_tensors, optimizer_state_to_tensors
from advgrpo.reward_server.config import TINY, PickScoreParams
from advgrpo.reward_server.models.base import (
    Image,
    ModelUpdate,
    TrainableRewardModel,
    check_images,
    check_prompts,
    resolve_device,
)

__all__ = ["PickScoreModel", "pair_mask", "pairwise_accuracy", "pairwise_logistic_loss"]

_PARAM_PREFIX = "param."
_OPTIM_PREFIX = "optim."
_OPTIM_META = "optim"
_FINGERPRINT_META = "fingerprint"
_MAX_TEXT_LEN = 77  # CLIP's context length


# --------------------------------------------------------------------------------------------
# Pure math


def pair_mask(reference_prompts: Sequence[str], generated_prompts: Sequence[str]) -> torch.Tensor:
    """[R, G] bool: True where reference r and generation g share a prompt."""
    return torch.tensor([[r == g for g in generated_prompts] for r in reference_prompts], dtype=torch.bool).reshape(
        len(reference_prompts), len(generated_prompts)
    )


def pairwise_logistic_loss(s_ref: torch.Tensor, s_gen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over generations of (mean over its prompt's references of −log σ(s_ref − s_gen)).

    s_ref [R], s_gen [G], mask [R, G]; every generation must have at least one reference. Each
    generation weighs the same whatever the number of references of its prompt.
    """
    pair_loss = -F.logsigmoid(s_ref[:, None] - s_gen[None, :])  # [R, G]
    m = mask.to(pair_loss.dtype)
    per_gen = (pair_loss * m).sum(dim=0) / m.sum(dim=0)
    return per_gen.mean()


def pairwise_accuracy(s_ref: torch.Tensor, s_gen: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of same-prompt (reference, generation) pairs where the reference scores higher."""
    wins = (s_ref[:, None] > s_gen[None, :]) & mask
    return float(wins.sum()) / max(int(mask.sum()), 1)


# --------------------------------------------------------------------------------------------
# The model


class PickScoreModel(TrainableRewardModel):
    kind = "pickscore"

    def __init__(self, name: str, params: PickScoreParams, device: str = "cpu"):
        super().__init__(name)
        self.params = params
        self.device = resolve_device(device)
        self.trainable = bool(params.trainable)  # False: behaves as a plain RewardModel

        if (params.model == TINY) != (params.processor == TINY):
            raise ConfigError(
                f"models.{name}.params: model and processor must both be {TINY!r} or neither "
                f"(the tiny model only works with the tiny tokenizer)"
            )
        if params.model == TINY:
            from advgrpo.common.tiny_models import tiny_clip

            model, self.tokenizer, self.image_processor = tiny_clip(params.seed)
        else:
            from transformers import AutoProcessor, CLIPModel

            model = CLIPModel.from_pretrained(params.model, dtype=torch.float32)
            processor = AutoProcessor.from_pretrained(params.processor)
            self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        # eval() for good: dropout would make updates non-deterministic.
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._text_len = min(_MAX_TEXT_LEN, int(self.model.config.text_config.max_position_embeddings))

        layers = self.model.vision_model.encoder.layers
        if not 1 <= params.trainable_blocks <= len(layers):
            raise ConfigError(
                f"models.{name}.params.trainable_blocks: must be in 1..{len(layers)}, got {params.trainable_blocks}"
            )
        self._split = len(layers) - params.trainable_blocks  # index of the first trained block
        prefix = "vision_model.encoder.layers."
        self._state_names = [
            n
            for n, _ in self.model.named_parameters()
            if n.startswith(prefix) and int(n[len(prefix) :].split(".")[0]) >= self._split
        ]
        params_by_name = dict(self.model.named_parameters())
        self._state_params = [params_by_name[n] for n in self._state_names]
        self.optimizer = None
        if self.trainable:
            for p in self._state_params:
                p.requires_grad_(True)
            self.optimizer = torch.optim.Adam(self._state_params, lr=params.lr, betas=tuple(params.betas))

    # -- embeddings ----------------------------------------------------------------------------

    def _pixels(self, images: Sequence[Image]) -> torch.Tensor:
        # PIL images: unambiguous channel layout even for tiny arrays.
        pil = [PILImage.fromarray(np.ascontiguousarray(img), mode="RGB") for img in images]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, torch.float32)

    def _one_at_a_time(self) -> bool:
        """Each image and prompt through its tower alone (the CPU: batch-invariant scores, see the
        module docstring), or the batch at once (a GPU). Cost on the CPU with the tiny model,
        whose forward is mostly fixed overhead (1 thread, a 2-core AMD EPYC that other jobs
        shared, medians of 20 alternated runs): 108 ms instead of 28 ms to score 64 images with
        16 prompts, 27 ms instead of 9 ms for 8 images with 8 prompts."""
        return self.device.type != "cuda"

    @torch.no_grad()
    def _text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings [len(prompts), E]; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        # Fixed-length padding: a prompt's embedding never depends on the other prompts of the batch.
        tok = self.tokenizer(
            unique, padding="max_length", truncation=True, max_length=self._text_len, return_tensors="pt"
        ).to(self.device)
        ids, mask = tok["input_ids"], tok["attention_mask"]
        if self._one_at_a_time():
            emb = torch.cat([self._text_features(ids[i : i + 1], mask[i : i + 1]) for i in range(len(unique))])
        else:
            emb = self._text_features(ids, mask)
        row = {p: i for i, p in enumerate(unique)}
        return emb[torch.tensor([row[p] for p in prompts], device=self.device)]

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def _image_embeddings(self, images: Sequence[Image]) -> torch.Tensor:
        """Normalised image embeddings [len(images), E]."""
        pixels = self._pixels(images)
        if self._one_at_a_time():
            # clone(): each image's pixels in a tensor of their own, so they start on the CPU
            # allocator's 64-byte boundary whatever their position in the batch.
            return torch.cat([self._image_features(pixels[i : i + 1].clone()) for i in range(len(images))])
        return self._image_features(pixels)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    @torch.no_grad()
    def _vision_prefix(self, images: Sequence[Image]) -> torch.Tensor:
        """Hidden states entering the first trained block (the frozen part of the vision tower)."""
        vm = self.model.vision_model
        h = vm.pre_layrnorm(vm.embeddings(self._pixels(images)))
        for layer in vm.encoder.layers[: self._split]:
            h = _layer_out(layer(h, None))
        return h

    def _vision_suffix(self, hidden: torch.Tensor) -> torch.Tensor:
        """Trained blocks -> pooled CLS -> projection: normalised image embeddings (with grad)."""
        vm = self.model.vision_model
        for layer in vm.encoder.layers[self._split :]:
            hidden = _layer_out(layer(hidden, None))
        emb = self.model.visual_projection(vm.post_layernorm(hidden[:, 0, :]))
        return F.normalize(emb, dim=-1)

    def _logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """s = logit_scale.exp() * cos(text, image), one per row."""
        return self.model.logit_scale.exp() * (image_emb * text_emb).sum(dim=-1)

    # -- RewardModel ---------------------------------------------------------------------------

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> np.ndarray:
        check_images(images, "images")
        check_prompts(images, prompts, "prompts")
        if not images:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            s = self._logits(self._image_embeddings(images), self._text_embeddings(prompts))
        return (s / self.params.scale).cpu().numpy().astype(np.float32)

    def update(
        self,
        references: Sequence[Image],
        reference_prompts: Sequence[str],
        generated: Sequence[Image],
        generated_prompts: Sequence[str],
        steps: int,
    ) -> ModelUpdate:
        if not self.trainable:
            raise FailedPrecondition(f"model {self.name} is not trainable (params.trainable: false)")
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
        have_refs = set(reference_prompts)
        for i, prompt in enumerate(generated_prompts):
            if prompt not in have_refs:
                raise InvalidArgument(f"generated_prompts[{i}]: no references for prompt {prompt!r}")

        mask = pair_mask(reference_prompts, generated_prompts).to(self.device)
        # Frozen parts are computed once per call: text embeddings and the vision prefix.
        ref_text, gen_text = self._text_embeddings(reference_prompts), self._text_embeddings(generated_prompts)
        ref_hidden, gen_hidden = self._vision_prefix(references), self._vision_prefix(generated)

        loss = torch.zeros(())
        for _ in range(steps):
            s_ref = self._logits(self._vision_suffix(ref_hidden), ref_text)
            s_gen = self._logits(self._vision_suffix(gen_hidden), gen_text)
            loss = pairwise_logistic_loss(s_ref, s_gen, mask)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

        with torch.no_grad():
            s_ref = self._logits(self._vision_suffix(ref_hidden), ref_text)
            s_gen = self._logits(self._vision_suffix(gen_hidden), gen_text)
        return ModelUpdate(
            loss=float(loss.detach()),
            reference_score=float((s_ref / self.params.scale).mean()),
            generated_score=float((s_gen / self.params.scale).mean()),
            accuracy=pairwise_accuracy(s_ref, s_gen, mask),
        )

    # -- state ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        p = self.params
        model = f"tiny-s{p.seed}" if p.model == TINY else p.model
        vc = self.model.config.vision_config
        return (
            f"pickscore|{model}|layers={vc.num_hidden_layers}|hidden={vc.hidden_size}"
            f"|trainable_blocks={p.trainable_blocks}"
        )

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        # The trained blocks' weights (+ optimizer when trainable); clones, because an export is
        # also the rollback snapshot of an update that changes these tensors in place.
        tensors = {
            _PARAM_PREFIX + n: p.detach().clone() for n, p in zip(self._state_names, self._state_params, strict=True)
        }
        metadata = {_FINGERPRINT_META: self.fingerprint()}
        if self.optimizer is not None:
            optim_tensors, groups = optimizer_state_to_tensors(self.optimizer, prefix=_OPTIM_PREFIX)
            tensors.update({k: v.detach().clone() for k, v in optim_tensors.items()})
            metadata[_OPTIM_META] = groups
        return tensors, metadata

    def import_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        fp = metadata.get(_FINGERPRINT_META)
        if fp is not None and fp != self.fingerprint():
            raise ValueError(f"model {self.name}: state is for {fp!r}, this model is {self.fingerprint()!r}")
        for n, p in zip(self._state_names, self._state_params, strict=True):
            got = tensors.get(_PARAM_PREFIX + n)
            if got is None or tuple(got.shape) != tuple(p.shape):
                shape = None if got is None else tuple(got.shape)
                raise ValueError(
                    f"model {self.name}: state tensor {_PARAM_PREFIX + n} is {shape}, expected {tuple(p.shape)}"
                )
        with torch.no_grad():  # in place: the optimizer holds references to these parameters
            for n, p in zip(self._state_names, self._state_params, strict=True):
                p.copy_(tensors[_PARAM_PREFIX + n])
        if self.optimizer is None:
            return  # a frozen model serves trained weights; optimizer state is irrelevant
        # Clones, so later steps never write into the caller's tensors (load_state_dict may alias them).
        optim = {k: v.detach().clone() for k, v in tensors.items() if k.startswith(_OPTIM_PREFIX)}
        if _OPTIM_META in metadata:
            optimizer_state_from_tensors(self.optimizer, optim, metadata[_OPTIM_META], prefix=_OPTIM_PREFIX)
        else:
            self.optimizer.state.clear()
        # The configured hyper-parameters win over saved ones (identical unless the config changed).
        for group in self.optimizer.param_groups:
            group["lr"] = self.params.lr
            group["betas"] = tuple(self.params.betas)


def _layer_out(out):
    # transformers 5 encoder layers return a tensor; 4.x returned a tuple.
    return out[0] if isinstance(out, tuple) else out
