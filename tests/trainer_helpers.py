"""Shared by the trainer tests: a reference set on disk and metrics reading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import smooth_image

PROMPTS = ["a red apple", "a blue car", "a green tree", "a yellow sun"]


def make_reference_set(root: Path, per_prompt: int = 4, seed: int = 0) -> Path:
    """Smooth gradients as "real" references, in Adv-GRPO's JSON format (relative paths)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for i, prompt in enumerate(PROMPTS):
        data[prompt] = []
        for j in range(per_prompt):
            name = f"ref_{i}_{j}.png"
            Image.fromarray(smooth_image(rng, 48)).save(root / name)
            data[prompt].append(name)
    path = root / "references.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_records(run_dir: Path) -> dict[int, dict]:
    return {m["epoch"]: m for m in read_metrics(run_dir) if "reward_mean" in m}
