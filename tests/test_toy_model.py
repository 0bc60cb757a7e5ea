"""The pretrained toy text-to-image model that ships with the trainer (advgrpo.trainer.toy_model):
its weights load and match the training script's record, its samples follow their captions well
above chance by the rule-based checker, and the training script writes exactly that kind of
directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from advgrpo.trainer.pipeline import TOY_MODEL_DIR, load_sd3_pipeline  # noqa: E402
from advgrpo.trainer.toy_model import IMAGE_SIZE, file_digests, main, sample_accuracy  # noqa: E402

# 1/4 of colours and 1/12 of captions are right by chance.
CHANCE_COLOUR, CHANCE_BOTH = 0.25, 1 / 12


def test_shipped_weights_load_and_match_the_training_record():
    record = json.loads((TOY_MODEL_DIR / "training.json").read_text())
    digests = file_digests(TOY_MODEL_DIR)
    assert digests and digests == record["sha256"]
    assert {"transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(
        digests
    )
    pipe = load_sd3_pipeline("toy")
    assert pipe.transformer.config.in_channels == 4 and pipe.vae.config.sample_size == IMAGE_SIZE
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert record["command"].startswith("python -m advgrpo.trainer.toy_model ")


@pytest.mark.slow
def test_shipped_models_samples_follow_their_captions():
    pipe = load_sd3_pipeline("toy")
    acc = sample_accuracy(pipe, 4, seed=3000)  # 48 ODE samples, 4 per caption, seeds unseen in training
    record = json.loads((TOY_MODEL_DIR / "training.json").read_text())
    # Far above chance; the record's 300-sample figure is what the training run measured.
    assert acc["colour"] >= 0.9, acc
    assert acc["both"] >= max(4 * CHANCE_BOTH, record["final_accuracy"]["both"] - 0.2), acc
    # It draws both styles of its training mixture (a quarter night), unasked.
    assert 0.1 <= acc["night"] <= 0.45, acc


@pytest.mark.slow
def test_the_training_script_writes_a_loadable_pipeline_and_its_record(tmp_path):
    out = tmp_path / "toy"
    argv = ["--output", str(out), "--steps", "3", "--vae-steps", "3", "--images", "96", "--night-share", "0.5"]
    argv += ["--batch", "8", "--eval-every", "2", "--final-samples", "1"]
    assert main(argv) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["sha256"] == file_digests(out) and record["command"].endswith(" ".join(argv))
    assert [p["step"] for p in record["curve"]] == [2, 3]
    assert set(record["final_accuracy"]) == {"colour", "shape", "both", "night"}
    pipe = load_sd3_pipeline(str(out))
    assert pipe.tokenizer.model_max_length == 24 and pipe.vae.config.scaling_factor > 0


def test_the_training_pipeline_samples_as_the_saved_one_loads():
    """The training script's evaluations draw from the pipeline it builds in memory: with the
    shipped weights it gives the saved pipeline's pixels (it once kept the tiny VAE's latent size,
    and its curve measured 8x8-latent samples)."""
    from advgrpo.trainer.loop import generate_images
    from advgrpo.trainer.toy_model import build_untrained

    shipped = load_sd3_pipeline("toy")
    built = build_untrained(0)
    assert built.vae_scale_factor == shipped.vae_scale_factor == 2
    built.transformer.load_state_dict(shipped.transformer.state_dict())
    built.vae.load_state_dict(shipped.vae.state_dict())
    built.vae.register_to_config(
        shift_factor=shipped.vae.config.shift_factor, scaling_factor=shipped.vae.config.scaling_factor
    )
    built.transformer.eval()
    built.vae.eval()
    settings = {"resolution": IMAGE_SIZE, "num_steps": 4, "guidance_scale": 4.5, "max_sequence_length": 24}
    prompts = ["a red circle", "a blue triangle"]
    for a, b in zip(
        generate_images(built, prompts, settings, seed=5),
        generate_images(shipped, prompts, settings, seed=5),
        strict=True,
    ):
        assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
