"""advgrpo.common.toy_domain: the synthetic captioned domain and its rule-based caption checker
agree on rendered ground truth, in both styles and at both sizes; the checker stays right on
degraded images and does not pass static."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from advgrpo.common import toy_domain as td


@pytest.mark.parametrize("style", td.STYLES)
@pytest.mark.parametrize("size", [32, 64])
def test_checker_reads_every_rendered_scene_right(style, size):
    images, texts = td.dataset(600, size=size, style=style, seed=11)
    assert td.caption_accuracy(images, texts) == {"colour": 1.0, "shape": 1.0, "both": 1.0}
    assert {td.style_of(img) for img in images} == {style}
    assert sorted(set(texts)) == sorted(td.captions()) and len(td.captions()) == 12


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    noisy = blurred + rng.normal(0, 12, blurred.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def test_checker_is_robust_to_blur_and_noise_but_does_not_pass_static():
    rng = np.random.default_rng(0)
    images, texts = td.dataset(600, seed=5)
    degraded = [_degrade(img, rng) for img in images]
    acc = td.caption_accuracy(degraded, texts)
    assert acc["colour"] == 1.0 and acc["shape"] >= 0.97, acc
    # Coloured static, what an untrained generator draws: near or below chance (1/12 for both).
    static = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(300)]
    assert td.caption_accuracy(static, texts[:300])["both"] < 0.15


def test_scenes_are_deterministic_and_inside_the_image():
    a, _ = td.dataset(24, seed=3)
    b, _ = td.dataset(24, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    rng = random.Random(0)
    for _ in range(500):
        s = td.random_scene(rng, 32)
        assert s.radius <= s.cx <= 32 - s.radius and s.radius <= s.cy <= 32 - s.radius


def test_bad_captions_and_images_are_clear_errors():
    assert td.parse_caption("A Red circle") == ("red", "circle")
    for bad in ("a purple circle", "red circle", "a red hexagon", ""):
        with pytest.raises(ValueError, match="not a caption of the toy domain"):
            td.parse_caption(bad)
    with pytest.raises(ValueError, match="uint8"):
        td.read_image(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="unknown style"):
        td.render(td.Scene("red", "circle", 16, 16, 8), style="dusk")
    blank = np.full((32, 32, 3), 225, np.uint8)
    assert td.read_image(blank).caption is None


def test_a_mixture_of_styles_holds_its_night_share_per_caption():
    images, texts = td.dataset(96, seed=8, night_share=0.25)
    styles = [td.style_of(img) for img in images]
    for caption in td.captions():  # 8 scenes of each caption: exactly 2 at night
        assert sum(s == "night" for s, t in zip(styles, texts, strict=True) if t == caption) == 2
    assert td.caption_accuracy(images, texts)["both"] == 1.0
    drawn, _ = td.dataset(600, seed=8, night_share=0.25, per_caption=False)
    assert 0.2 < np.mean([td.style_of(img) == "night" for img in drawn]) < 0.3
    # Without a share, one style, as before.
    assert {td.style_of(img) for img in td.dataset(24, seed=8)[0]} == {"day"}
