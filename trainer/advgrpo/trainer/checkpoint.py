"""Checkpoints: everything ``--resume`` needs, no pickle.

checkpoints/epoch-000010/
  lora/                      the LoRA in diffusers format, EMA weights (what inference should use):
                             StableDiffusion3Pipeline.load_lora_weights(<dir>/lora) loads it
  lora/advgrpo.json          base model and sampling settings, for advgrpo-generate
  state.safetensors          live LoRA weights, optimizer state, EMA shadow, torch RNG state
  state.json                 epoch, global step, python RNG, discriminator versions seen, config
Written to a temporary folder and renamed, so a crash never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from advgrpo.common.errors import ConfigError

CHECKPOINT_PREFIX = "epoch-"


@dataclass
class TrainerState:
    epoch: int  # the next epoch to run
    global_step: int  # optimizer steps taken
    discriminator_versions: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(output_dir: Path, epoch: int) -> Path:
    return output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{epoch:06d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").exists())
    return done[-1] if done else None


def save_checkpoint(
    directory: Path,
    *,
    state: TrainerState,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    write_lora,
) -> Path:
    """``write_lora(path)`` writes the diffusers-format LoRA; ``tensors`` is the resumable state."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_lora(tmp / "lora")
    all_tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    all_tensors["rng.torch"] = torch.get_rng_state()
    save_file(all_tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(
        json.dumps(
            {
                "epoch": state.epoch,
                "global_step": state.global_step,
                "discriminator_versions": state.discriminator_versions,
                "python_rng": _py_rng_to_json(random.getstate()),
                **state.extra,
                **meta,
            },
            indent=2,
        )
    )
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def load_checkpoint(directory: Path) -> tuple[TrainerState, dict[str, torch.Tensor], dict[str, Any]]:
    state_json = directory / "state.json"
    if not state_json.exists():
        raise ConfigError(f"--resume {directory}: not a checkpoint (no state.json)")
    meta = json.loads(state_json.read_text())
    tensors = load_file(directory / "state.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    random.setstate(_py_rng_from_json(meta["python_rng"]))
    state = TrainerState(meta["epoch"], meta["global_step"], dict(meta.get("discriminator_versions", {})))
    return state, tensors, meta


def _py_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
