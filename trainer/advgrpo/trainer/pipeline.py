"""SD3 pipeline loading, the tiny in-memory SD3, and LoRA on its transformer (no training logic).

The trainer holds one ``StableDiffusion3Pipeline``: frozen text encoders, VAE and transformer, plus
a LoRA adapter on the transformer's joint-attention projections. The reference model of the KL
term is the same transformer with the adapter switched off (``lora_disabled``), so no second
copy of the weights is kept. LoRA checkpoints are written in diffusers' own format, so a plain
``StableDiffusion3Pipeline.load_lora_weights(dir)`` (what ``advgrpo-generate`` does) loads them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from advgrpo.common import library_noise

# Before diffusers imports transformers' image processors (SD3's SigLIP feature extractor).
library_noise.quiet_torchvision_fallback()
library_noise.drop(*library_noise.T5_TRUNCATION)

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from advgrpo.common.errors import ConfigError
from advgrpo.common.tiny_models import tiny_clip_tokenizer

# Flow-GRPO's targets: both streams of every joint-attention block. Suffix matches, so the SD3.5
# dual-attention ``attn2`` (image-only self-attention) stays frozen, as in the original.
from advgrpo.trainer.config import LORA_TARGETS

log = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGETS",
    "TINY_IMAGE_SIZE",
    "LoraSettings",
    "ModelLoadError",
    "add_lora",
    "build_tiny_sd3_pipeline",
    "decode_latents",
    "encode_negative_prompt",
    "encode_prompts",
    "truncated_prompts",
    "load_lora",
    "load_sd3_pipeline",
    "lora_disabled",
    "lora_wrapped_modules",
    "save_lora",
]

# Tiny SD3: 3 VAE blocks (downsampling 4) x latent 8 x patch 2 -> 32 px images, 16 image tokens.
TINY_LATENT_SIZE = 8
TINY_VAE_SCALE = 4
TINY_IMAGE_SIZE = TINY_LATENT_SIZE * TINY_VAE_SCALE


# The pretrained toy text-to-image model that ships with the trainer (docs/EXPERIMENTS.md): a
# diffusers pipeline directory written by ``python -m advgrpo.trainer.toy_model``, with its
# training record (training.json: command, curve, sha256 of every weight file).
TOY = "toy"
TOY_MODEL_DIR = Path(__file__).parent / "toy_sd3"


class ModelLoadError(ConfigError):
    """A model that cannot be loaded (missing path, unreachable hub); the CLI prints the message."""


# ---------------------------------------------------------------- the tiny SD3


def _tiny_t5_tokenizer() -> T5Tokenizer:
    """A real (tokenizers-backed) T5 Unigram tokenizer over a small vocab: T5's special ids, every
    printable ASCII character alone and word-initial, and a few whole words so it really segments."""
    chars = [chr(c) for c in range(33, 127)]
    words = ["a", "the", "cat", "dog", "red", "photo", "of"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]  # T5 ids: pad 0, eos 1, unk 2
    vocab += [("▁" + w, -2.0) for w in words]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_clip_text_encoder(hidden: int, tokenizer) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,  # as in SD3 (CLIP-L 768/768, CLIP-G 1280/1280)
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A real ``StableDiffusion3Pipeline`` of tiny random-initialised components, built in memory.

    Shaped like SD3.5-Medium, scaled down: 16 latent channels, patch 2, RMS q/k norm, a
    dual-attention first block and a ``context_pre_only`` last block; two CLIP text encoders
    (hidden 32 and 48, pooled 32+48=80) and a T5 encoder (d_model 96 >= 32+48, so the CLIP
    embeddings are zero-padded to it as in SD3). Default size 32x32 px (latent 16x8x8).
    The same seed gives bit-identical weights; the caller's torch RNG state is left untouched.
    """
    clip_tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = _tiny_t5_tokenizer()
    clip_hidden = (32, 48)
    t5_dim = 96
    latent_channels = 16

    with torch.random.fork_rng(devices=[]):
        # One seed per component, so changing one component's config leaves the others' weights alone.
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=TINY_LATENT_SIZE,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            caption_projection_dim=32,  # = heads * head_dim (the context stream's width)
            pooled_projection_dim=sum(clip_hidden),
            pos_embed_max_size=32,  # up to 64x64 latents (256 px)
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=TINY_IMAGE_SIZE,
            scaling_factor=1.5305,  # SD3's VAE factors, so the (de)normalisation path is exercised
            shift_factor=0.0609,
            use_quant_conv=False,  # SD3's VAE has neither quant conv
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_clip_text_encoder(clip_hidden[0], clip_tokenizer)
        torch.manual_seed(seed + 3)
        text_encoder_2 = _tiny_clip_text_encoder(clip_hidden[1], clip_tokenizer)
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=t5_dim,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3 uses
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        )

    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler config
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    for module in _modules(pipeline):
        module.eval()  # models built from a config start in training mode (dropout on)
    return pipeline


# ---------------------------------------------------------------- loading


def _modules(pipeline: StableDiffusion3Pipeline) -> list[torch.nn.Module]:
    return [c for c in pipeline.components.values() if isinstance(c, torch.nn.Module)]


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else (absolute, relative, home, deeper) is a path.
    return model.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model)


@contextlib.contextmanager
def _no_progress_bars(quiet: bool) -> Iterator[None]:
    """diffusers' and transformers' loading bars off while a local folder loads (on a laptop they
    fill the terminal with nothing but a few milliseconds each; a hub download keeps them)."""
    if not quiet:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def load_sd3_pipeline(
    model: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> StableDiffusion3Pipeline:
    """The frozen SD3 pipeline ``model`` names, in eval mode, on ``device``.

    ``model`` is a hub id (e.g. "stabilityai/stable-diffusion-3.5-medium"), a local directory
    written by ``save_pretrained``, "toy" (the shipped pretrained toy model, ``TOY_MODEL_DIR``) or
    "tiny" (``build_tiny_sd3_pipeline(seed)``, random weights). Failures raise
    ``ModelLoadError`` with a message naming the model.
    """
    dtype = _as_dtype(dtype)
    if model == TOY:  # the shipped pretrained toy model (advgrpo.trainer.toy_model): a local directory
        model = str(TOY_MODEL_DIR)
    if model == "tiny":
        pipeline = build_tiny_sd3_pipeline(seed)
        if dtype != torch.float32:  # (diffusers 0.42 warns on every dtype cast, even with nothing to keep fp32)
            pipeline.to(dtype=dtype)
    else:
        path = Path(model).expanduser()
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"model {model!r}: not a diffusers pipeline directory (no model_index.json)")
            source = str(path)
        elif _looks_like_path(model):
            raise ModelLoadError(f"model {model!r}: no such directory")
        else:
            source = model
        try:
            # diffusers 0.42 deprecates ``torch_dtype`` in favour of ``dtype``.
            with _no_progress_bars(quiet=path.exists()):
                pipeline = StableDiffusion3Pipeline.from_pretrained(source, dtype=dtype)
        except Exception as err:  # hub, network, file and config errors all arrive here
            lines = str(err).strip().splitlines()
            reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
            if path.exists():
                raise ModelLoadError(
                    f"model {model!r}: cannot load the SD3 pipeline in this directory: {reason}"
                ) from err
            raise ModelLoadError(
                f"model {model!r}: not a local directory, and loading it as a hub id failed"
                f" (offline and not in the cache?): {reason}"
            ) from err
    for module in _modules(pipeline):
        module.requires_grad_(False)
        module.eval()
    return pipeline.to(device)


# ---------------------------------------------------------------- LoRA


@dataclass
class LoraSettings:
    rank: int = 32
    alpha: int = 64
    init: str = "gaussian"  # peft's init_lora_weights: "gaussian" (A ~ N(0, 1/r), B = 0) or "default"
    target_modules: Sequence[str] = LORA_TARGETS
    dropout: float = 0.0


def add_lora(
    transformer: SD3Transformer2DModel,
    settings: LoraSettings | None = None,
    adapter_name: str = "default",
    *,
    dtype: torch.dtype = torch.float32,
) -> list[torch.nn.Parameter]:
    """Adds a LoRA adapter to ``transformer`` and returns its parameters, the only trainable ones.

    The adapter's weights are kept in ``dtype`` (fp32) even when the frozen base is bf16: peft
    casts the input to the adapter's dtype and the sum back to the base's.
    """
    settings = settings or LoraSettings()
    init = {"default": True}.get(settings.init, settings.init)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        init_lora_weights=init,
        target_modules=list(settings.target_modules),
        lora_dropout=settings.dropout,
    )
    # peft raises if no target module exists; suffix matching skips the absent ones (the last
    # block is context_pre_only: no to_add_out).
    transformer.add_adapter(config, adapter_name=adapter_name)
    # Only this adapter trains: any other adapter (an EMA copy, a loaded one) stays frozen.
    params = [
        param
        for name, param in transformer.named_parameters()
        if f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name
    ]
    transformer.requires_grad_(False)
    for param in params:
        param.data = param.data.to(dtype)
        param.requires_grad_(True)
    return params


def lora_wrapped_modules(transformer: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter (sorted)."""
    return sorted(name for name, m in transformer.named_modules() if isinstance(m, BaseTunerLayer))


@contextlib.contextmanager
def lora_disabled(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Runs the base model (every adapter off) inside the block; the previous adapter state and every
    parameter's ``requires_grad`` are restored on exit, exceptions included.

    Restoring ``requires_grad`` matters: peft's ``enable_adapters`` marks adapter weights trainable
    again, which would unfreeze an adapter that was loaded for inference only.
    """
    layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
    was_enabled = [not layer.disable_adapters for layer in layers]
    grads = [(p, p.requires_grad) for p in transformer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield transformer
    finally:
        for layer, enabled in zip(layers, was_enabled, strict=True):
            if enabled:
                layer.enable_adapters(True)
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)


def save_lora(
    pipeline_or_transformer: StableDiffusion3Pipeline | SD3Transformer2DModel,
    directory: str | os.PathLike,
    adapter_name: str = "default",
) -> Path:
    """Writes the adapter in diffusers' LoRA format (``pytorch_lora_weights.safetensors``).

    The peft config goes into the file's metadata: without it, diffusers' loader assumes
    alpha = rank and the loaded LoRA would act at half strength (alpha/rank = 64/32 here).
    """
    transformer = getattr(pipeline_or_transformer, "transformer", pipeline_or_transformer)
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = transformer.peft_config[adapter_name].to_dict()
    directory = Path(directory)
    StableDiffusion3Pipeline.save_lora_weights(
        directory, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    return directory


def load_lora(pipeline: StableDiffusion3Pipeline, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Loads a LoRA written by ``save_lora`` (or any diffusers SD3 LoRA) into ``pipeline``."""
    pipeline.load_lora_weights(str(directory), adapter_name=adapter_name)


# ---------------------------------------------------------------- prompts and latents


@torch.no_grad()
def encode_prompts(
    pipeline: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    *,
    device: torch.device | str,
    max_sequence_length: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77+L, D_t5], pooled_prompt_embeds [B, D_clip1+D_clip2]) for ``prompts``."""
    embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=list(prompts),
        prompt_2=None,
        prompt_3=None,
        device=torch.device(device),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


def truncated_prompts(
    pipeline: StableDiffusion3Pipeline, prompts: Sequence[str], max_sequence_length: int
) -> list[str]:
    """The prompts longer than ``max_sequence_length`` T5 tokens: the text encoder sees only their
    first ``max_sequence_length`` tokens (as in Flow-GRPO and Adv-GRPO)."""
    tokenizer = pipeline.tokenizer_3
    if tokenizer is None:
        return []
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True).input_ids]
    return [p for p, n in zip(prompts, lengths, strict=True) if n > max_sequence_length]


def encode_negative_prompt(
    pipeline: StableDiffusion3Pipeline,
    *,
    device: torch.device | str,
    max_sequence_length: int = 128,
    batch_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unconditional (empty-prompt) embeddings of CFG, repeated ``batch_size`` times.

    Identical to what ``encode_prompt(do_classifier_free_guidance=True)`` computes for its
    default negative prompt "", at the cost of one prompt; encode once and reuse.
    """
    embeds, pooled = encode_prompts(pipeline, [""], device=device, max_sequence_length=max_sequence_length)
    return embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)


@torch.no_grad()  # images go to the reward server; no gradient flows back through the VAE
def decode_latents(pipeline: StableDiffusion3Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Float32 images [B, 3, H, W] in [0, 1] from SD3 latents (the VAE's shift/scale undone)."""
    vae = pipeline.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(latents, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)
