"""OCR reward: the pure reward math, and the real PP-OCRv4 weights on text rendered with PIL.

Images are square (512²) on purpose: the detector scales the short side up to 736 px, so wide
images cost far more detector time than square ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from advgrpo.common.errors import ConfigError, InvalidArgument
from advgrpo.reward_server.config import ModelConfig, OcrParams
from advgrpo.reward_server.models import build_model
from advgrpo.reward_server.models.ocr import (
    MAX_ASPECT,
    OcrReward,
    normalise,
    ocr_reward,
    ocr_target,
    pad_thin,
)


def render(text: str, size: int = 512, font_size: int = 64) -> np.ndarray:
    """Black text (lines split on newlines), centred on white: uint8 [size, size, 3] RGB."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.multiline_text(xy, text, fill="black", font=font, align="center")
    return np.asarray(img)


@pytest.fixture(scope="module")
def model() -> OcrReward:
    return OcrReward("ocr", OcrParams())


@pytest.fixture(scope="module")
def hello() -> np.ndarray:
    return render("hello world")


# ---------------------------------------------------------------- ocr_target


@pytest.mark.parametrize(
    "prompt, target",
    [
        ('a sign that says "hello world"', "hello world"),
        ("a sign that says “hello world”", "hello world"),
        ('"first" then "second"', "first"),
        ('a “curly” then a "straight" quote', "curly"),
        ('a "straight" then a “curly” quote', "straight"),
        ('a banner reading "Open 24/7!" at night', "Open 24/7!"),
    ],
)
def test_ocr_target_first_quoted_span(prompt, target):
    assert ocr_target(prompt) == target


@pytest.mark.parametrize("prompt", ["a cat on a mat", 'an empty "" quote', 'blank "   " quote', 'unclosed "quote'])
def test_ocr_target_none(prompt):
    assert ocr_target(prompt) is None


def test_normalise():
    assert normalise("  Hello\tWORLD\n ok ") == "helloworldok"
    assert normalise("") == ""


# ---------------------------------------------------------------- ocr_reward


def test_ocr_reward_exact_and_substring():
    assert ocr_reward("hello world", "hello world") == 1.0
    assert ocr_reward("Hello World", "helloworld") == 1.0  # case and spaces do not count
    assert ocr_reward("the sign says HELLO there", "hello") == 1.0  # target inside the text


def test_ocr_reward_edits():
    assert ocr_reward("hallo", "hello") == pytest.approx(0.8)  # 1 substitution of 5
    assert ocr_reward("hell", "hello") == pytest.approx(0.8)  # 1 deletion
    assert ocr_reward("heXllo", "hello") == pytest.approx(0.8)  # 1 insertion
    assert ocr_reward("hxllx", "hello") == pytest.approx(0.6)  # 2 substitutions


def test_ocr_reward_clipped_at_zero():
    # Levenshtein("zzzzzzzzzz", "hello") = 10 > 5: clipped to len(target), reward 0, never negative.
    assert ocr_reward("zzzzzzzzzz", "hello") == 0.0
    assert ocr_reward("", "hello") == 0.0  # nothing recognised


def test_ocr_reward_rejects_empty_target():
    with pytest.raises(ValueError):
        ocr_reward("anything", "  ")


# ---------------------------------------------------------------- the model


def test_validate_names_the_group(model):
    model.validate(['a "ok" sign', "a “curly” sign"], ["group 0", "group 1"])
    with pytest.raises(InvalidArgument) as err:
        model.validate(['a "ok" sign', "a sign without quotes"], ["group 0", "group 7"])
    assert "group 7" in str(err.value) and "a sign without quotes" in str(err.value)
    with pytest.raises(InvalidArgument, match="group 2"):
        model.validate(['empty "" quotes'], ["group 2"])


def test_matching_text_scores_high(model, hello):
    assert model.recognise(hello).lower() == "hello world"
    rewards = model.score([hello], ['a sign that says "hello world"'])
    assert rewards.dtype == np.float32 and rewards.shape == (1,)
    assert rewards[0] >= 0.9


def test_wrong_text_scores_lower(model, hello):
    right, wrong, partial = model.score(
        [hello, hello, hello],
        ['a sign that says "hello world"', 'a sign that says "goodbye"', 'a sign that says "hello moon"'],
    )
    assert right - wrong >= 0.5
    assert wrong < partial < right  # a partly right target sits in between


def test_blank_image_scores_zero(model):
    blank = np.full((512, 512, 3), 255, dtype=np.uint8)
    assert model.recognise(blank) == ""
    assert model.score([blank], ['a sign that says "hello"'])[0] == 0.0


def test_lines_are_read_top_to_bottom(model):
    img = render("first line\nsecond line", font_size=56)
    assert normalise(model.recognise(img)) == "firstlinesecondline"
    in_order, reversed_ = model.score([img, img], ['"first line second line"', '"second line first line"'])
    assert in_order == 1.0 and reversed_ < 1.0


def test_coloured_text_reads(model):
    # Generated images are rarely black on white: light text on a dark blue background.
    img = Image.new("RGB", (512, 512), (20, 40, 200))
    ImageDraw.Draw(img).text((60, 220), "RGB OK", fill=(250, 240, 40), font=ImageFont.load_default(size=72))
    assert model.score([np.asarray(img)], ['"rgb ok"'])[0] >= 0.9


def test_warmup(model):
    model.warmup()  # a 64x64 grey image with 'a "warmup" image': finite, shape (1,)


def test_min_confidence_drops_spans(hello):
    strict = OcrReward("ocr", OcrParams(min_confidence=1.01))  # no span can reach it
    assert strict.recognise(hello) == ""
    assert strict.score([hello], ['"hello world"'])[0] == 0.0


def test_score_length_mismatch(model, hello):
    with pytest.raises(ValueError):
        model.score([hello], ['"a"', '"b"'])


def test_bad_thread_count():
    with pytest.raises(ConfigError, match="num_threads"):
        OcrReward("ocr", OcrParams(num_threads=-1))


def test_build_model():
    m = build_model(ModelConfig(name="text", kind="ocr", params=OcrParams()))
    assert isinstance(m, OcrReward) and m.name == "text" and m.kind == "ocr" and not m.trainable


# ---------------------------------------------------------------- thin images


THIN = [(1, 4096), (4096, 1), (20, 2500), (3, 40), (1, 1000), (1000, 1), (2, 8192), (1, 17), (1, 1)]


@pytest.mark.parametrize("h, w", THIN)
def test_pad_thin_survives_rapidocr_resize(model, h, w):
    # RapidOCR's own preprocessing (limit-side resizes, rounding to multiples of 32) on the
    # padded image: both sides at least 32, and no side blown up past what a 1:16 image gives.
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    padded = pad_thin(img)
    out, _, _ = model._engine.preprocess(padded)
    assert min(out.shape[:2]) >= 32
    assert max(out.shape[:2]) / min(out.shape[:2]) <= MAX_ASPECT + 1


@pytest.mark.parametrize("h, w", [(1, 4096), (4096, 1), (20, 2500)])
def test_rapidocr_alone_fails_on_thin_images(model, h, w):
    # Why pad_thin exists: the unpadded image breaks RapidOCR's resize.
    from rapidocr_onnxruntime.utils.process_img import ResizeImgError

    with pytest.raises(ResizeImgError):
        model._engine.preprocess(np.zeros((h, w, 3), dtype=np.uint8))


def test_pad_thin_geometry_and_fill():
    img = np.full((3, 100, 3), (10, 20, 30), dtype=np.uint8)
    img[1, 50] = (255, 255, 255)  # one odd pixel does not change the background
    padded = pad_thin(img)
    assert padded.shape == (7, 100, 3) and padded.dtype == np.uint8  # ceil(100 / 16) = 7
    assert np.array_equal(padded[2:5], img)  # centred
    assert (padded[:2] == (10, 20, 30)).all() and (padded[5:] == (10, 20, 30)).all()

    tall = np.zeros((64, 1, 3), dtype=np.uint8)
    assert pad_thin(tall).shape == (64, 4, 3)
    assert np.array_equal(pad_thin(tall)[:, 1:2], tall)


@pytest.mark.parametrize("h, w", [(512, 512), (16, 256), (256, 16), (3, 40), (40, 3), (1, 1)])
def test_pad_thin_leaves_images_within_the_ratio_alone(h, w):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    assert pad_thin(img) is img


def test_thin_images_score_zero_instead_of_raising(model):
    # One call, as a merged batch would make it: no image fails the others.
    shapes = [(1, 4096), (20, 2500), (3, 40)]
    images = [np.zeros((h, w, 3), dtype=np.uint8) for h, w in shapes]
    images.append(np.random.default_rng(0).integers(0, 256, (20, 2500, 3), dtype=np.uint8))
    rewards = model.score(images, ['a sign that says "hello world"'] * len(images))
    assert rewards.shape == (4,) and rewards.dtype == np.float32
    assert rewards[:3].tolist() == [0.0, 0.0, 0.0]
    assert 0.0 <= rewards[3] <= 1.0


@pytest.mark.slow
def test_tall_thin_image_scores_zero_instead_of_raising(model):
    # Tall images are slow in RapidOCR (~10 s here): its detector scales the short side to 736 px.
    assert model.score([np.zeros((4096, 1, 3), dtype=np.uint8)], ['"hello world"']).tolist() == [0.0]
