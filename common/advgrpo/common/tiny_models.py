"""Tiny random-initialised transformers models: the "tiny" model id, for tests and the tiny preset.

They are real ``transformers`` classes (same code paths as the full models) built from small
configs, with weights drawn from a seeded RNG: the same seed always gives bit-identical weights,
so a restarted server rebuilds the same frozen backbone its saved discriminator head was trained
on. The global torch RNG is left untouched (``fork_rng``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Imported from its module directly: transformers 5 only falls back to the PIL processor (with a
# warning) when torchvision is missing, and torchvision must never be installed here.
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

__all__ = ["TINY_CLIP_IMAGE_SIZE", "tiny_clip", "tiny_clip_tokenizer", "tiny_dinov2"]

TINY_CLIP_IMAGE_SIZE = 32
_TEXT_MAX_LEN = 77  # CLIP's context length, kept so prompts truncate like the real model's
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# A few BPE merges so the tokenizer really merges (words seen in test prompts).
_MERGES = ["a t</w>", "c at</w>", "d o", "do g</w>", "t h", "th e</w>", "r e", "re d</w>"]


def _seeded_build(seed: int, build):
    """Runs ``build()`` with the torch RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()  # models built from a config start in training mode (dropout on)


def tiny_dinov2(image_size: int, seed: int, hidden_size: int = 32, num_heads: int = 2) -> Dinov2Model:
    """A 2-layer DINOv2 (hidden 32, patch 14) whose position grid matches ``image_size``.
    ``hidden_size``/``num_heads``: other widths for tests (e.g. 33 puts tokens off 16-byte boundaries)."""
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        patch_size=14,
        image_size=image_size,
    )
    return _seeded_build(seed, lambda: Dinov2Model(config))


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A real byte-level BPE CLIP tokenizer from a small vocab (every byte, alone and word-final).

    Shared with the tiny SD3 pipeline (``advgrpo.trainer.pipeline``), whose two CLIP text encoders use it.
    """
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in _MERGES] + [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    # Written to files and loaded by from_pretrained: the loading path real checkpoints take.
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=_TEXT_MAX_LEN)
    return tokenizer


def tiny_clip(seed: int) -> tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessorPil]:
    """A 2-layer CLIP (text and vision, hidden 32, 32 px images) with its tokenizer and processor."""
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=_TEXT_MAX_LEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_CLIP_IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = _seeded_build(seed, lambda: CLIPModel(config))
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    return model, tokenizer, processor
