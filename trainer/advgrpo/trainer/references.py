"""The reference set of Adv-GRPO: JSON {prompt: [image paths]}, validated whole at start-up."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from advgrpo.common.errors import ConfigError

_MAX_LISTED = 10  # problems listed in one error message


@dataclass
class ReferenceSet:
    source: Path
    images: dict[str, list[Path]]  # prompt -> absolute image paths

    @property
    def prompts(self) -> list[str]:
        return list(self.images)

    def __len__(self) -> int:
        return sum(len(v) for v in self.images.values())

    def missing(self, prompts: Sequence[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if p not in self.images]

    def pick(self, prompts: Sequence[str], budget: int, rng: random.Random) -> dict[str, list[Path]]:
        """References for an update: the given prompts' own images first (round-robin, so every
        prompt is represented), then others at random, up to ``budget`` images."""
        chosen: dict[str, list[Path]] = {}
        pools = {p: rng.sample(self.images[p], len(self.images[p])) for p in dict.fromkeys(prompts) if p in self.images}
        taken = 0
        while taken < budget and any(pools.values()):
            for prompt, pool in pools.items():
                if pool and taken < budget:
                    chosen.setdefault(prompt, []).append(pool.pop())
                    taken += 1
        if taken < budget:
            rest = [(p, path) for p, paths in self.images.items() for path in paths if path not in chosen.get(p, [])]
            for prompt, path in rng.sample(rest, min(budget - taken, len(rest))):
                chosen.setdefault(prompt, []).append(path)
        return chosen


def load_reference_set(path: str | Path, *, verify_images: bool = True) -> ReferenceSet:
    """Reads and checks the JSON; relative image paths are relative to the JSON file's folder.

    Every problem is collected first, so one error lists them all (up to a limit): missing or
    unreadable files, prompts without images, entries of the wrong type.
    """
    source = Path(path)
    try:
        data = json.loads(source.read_text())
    except OSError as exc:
        raise ConfigError(f"adversarial.references {source}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"adversarial.references {source}: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"adversarial.references {source}: expected a non-empty JSON object {{prompt: [image paths]}}"
        )
    problems: list[str] = []
    images: dict[str, list[Path]] = {}
    for prompt, paths in data.items():
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            problems.append(f"prompt {prompt!r}: expected a list of image paths")
            continue
        if not paths:
            problems.append(f"prompt {prompt!r}: no images")
            continue
        resolved = []
        for p in paths:
            full = (source.parent / p).resolve()
            if not full.is_file():
                problems.append(f"prompt {prompt!r}: missing file {full}")
                continue
            if verify_images:
                try:
                    with Image.open(full) as img:
                        img.verify()
                except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                    problems.append(f"prompt {prompt!r}: unreadable image {full} ({exc})")
                    continue
            resolved.append(full)
        if resolved:
            images[prompt] = resolved
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ConfigError(f"adversarial.references {source}: {len(problems)} problem(s):\n  {listed}{more}")
    return ReferenceSet(source, images)


def check_coverage(refs: ReferenceSet, prompts: Sequence[str]) -> None:
    """Raises ConfigError listing the training prompts that have no references."""
    missing = refs.missing(prompts)
    if missing:
        listed = "\n  ".join(repr(p) for p in missing[:_MAX_LISTED])
        more = f"\n  ... and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise ConfigError(
            f"adversarial.references {refs.source}: {len(missing)} training prompt(s) have no references "
            f"(a per-prompt discriminator needs them):\n  {listed}{more}"
        )


@lru_cache(maxsize=1024)
def load_reference_image(path: Path, resolution: int) -> np.ndarray:
    """uint8 [H, W, 3] at the training resolution (centre crop to square, then resize); cached."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def load_prompts(path: str | Path) -> list[str]:
    """A text file with one prompt per line (blank lines and '#' comments skipped)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"data.prompts {p}: cannot read ({exc.strerror})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"data.prompts {p}: no prompts")
    return prompts


def write_synthetic_references(
    root: Path, prompts: Sequence[str], per_prompt: int = 4, size: int = 48, seed: int = 0
) -> Path:
    """A stand-in reference set for demos and tests: smooth colour gradients (the "real" look the
    discriminator learns), saved as PNGs with a references.json in Adv-GRPO's format."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    data: dict[str, list[str]] = {}
    for i, prompt in enumerate(prompts):
        data[prompt] = []
        for j in range(per_prompt):
            c0, c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
            img = c0 * (1 - x[..., None]) + c1 * x[..., None] * (1 - y[..., None]) + c2 * y[..., None]
            name = f"ref_{i:03d}_{j:02d}.png"
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / name)
            data[prompt].append(name)
    path = root / "references.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def write_toy_references(
    root: Path, style: str = "day", per_caption: int = 16, seed: int = 0, night_share: float | None = None
) -> Path:
    """A reference set of the toy world (``advgrpo.common.toy_domain``): ``per_caption`` rendered
    32 px scenes of each of its 12 captions in ``style`` ("day" or "night"), or a mixture with
    ``night_share`` of night scenes, as PNGs with a references.json in Adv-GRPO's format."""
    from advgrpo.common import toy_domain as td

    root.mkdir(parents=True, exist_ok=True)
    n = per_caption * len(td.captions())
    images, texts = td.dataset(n, size=32, style=style, seed=seed, night_share=night_share)
    data: dict[str, list[str]] = {}
    for i, (img, text) in enumerate(zip(images, texts, strict=True)):
        name = f"{text.replace(' ', '_')}-{i:04d}.png"
        Image.fromarray(img).save(root / name)
        data.setdefault(text, []).append(name)
    path = root / "references.json"
    path.write_text(json.dumps(data, indent=1))
    return path
