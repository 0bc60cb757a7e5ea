"""The toy world's DINOv2 backbone that ships with the reward server
(advgrpo.reward_server.toy_backbone): its weights load as backbone "toy" and match the training
script's record, its features separate what the domain varies (far better than the untrained
model's), the training script writes exactly that kind of folder, and the toy preset's proxy
reward is the saturation it says it is."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from advgrpo.reward_server.config import TOY, TOY_DINOV2_DIR, ModelConfig, SaturationParams, load_config  # noqa: E402
from advgrpo.reward_server.models import build_model  # noqa: E402
from advgrpo.reward_server.models.dinov2 import load_dinov2, toy_backbone_digest  # noqa: E402
from advgrpo.reward_server.toy_backbone import build_untrained, file_digests, main, probe  # noqa: E402


def test_shipped_backbone_loads_as_toy_and_matches_its_record():
    record = json.loads((TOY_DINOV2_DIR / "training.json").read_text())
    assert file_digests(TOY_DINOV2_DIR) == record["sha256"] == {"model.safetensors": toy_backbone_digest()}
    assert record["command"].startswith("python -m advgrpo.reward_server.toy_backbone ")
    model = load_dinov2(TOY, 32, 0, torch.device("cpu"))
    assert (model.config.patch_size, model.config.image_size, model.config.hidden_size) == (4, 32, 64)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # The preset's discriminator names the shipped weights by content in its state's fingerprint.
    dino = build_model(load_config("toy").model("dino"))
    assert toy_backbone_digest()[:16] in dino.fingerprint()


@pytest.mark.slow
def test_shipped_backbone_separates_style_colour_and_shape():
    """Nearest-centroid accuracy of the CLS embedding on fresh scenes (render labels; a diagnostic,
    never a training signal): well above chance (1/2, 1/4, 1/3) and above the untrained model."""
    trained = probe(load_dinov2(TOY, 32, 0, torch.device("cpu")), seed=777, n=300)
    untrained = probe(build_untrained(0).eval(), seed=777, n=300)
    assert trained["style"] >= 0.95 and trained["colour"] >= 0.9 and trained["shape"] >= 0.5, trained
    assert trained["colour"] > untrained["colour"] + 0.2, (trained, untrained)


def test_the_training_script_writes_a_folder_dinov2_loads(tmp_path):
    from transformers import Dinov2Model

    assert main(["--output", str(tmp_path), "--steps", "2", "--images", "24", "--batch", "8"]) == 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["sha256"] == file_digests(tmp_path) and len(record["curve"]) == 1
    model = Dinov2Model.from_pretrained(tmp_path)
    out = model(pixel_values=torch.zeros(1, 3, 32, 32))
    assert out.last_hidden_state.shape == (1, 1 + 64, 64)


def test_saturation_is_mean_hsv_saturation():
    model = build_model(ModelConfig("saturation", "saturation", params=SaturationParams()))
    grey = np.full((8, 8, 3), 200, np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    half = grey.copy()
    half[:4] = (255, 0, 0)
    black = np.zeros((8, 8, 3), np.uint8)
    np.testing.assert_allclose(model.score([grey, red, half, black], [""] * 4), [0.0, 1.0, 0.5, 0.0], atol=1e-6)
