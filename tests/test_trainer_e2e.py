"""The trainer against a real reward-server process: it learns, the discriminator trains,
checkpoints resume exactly, advgrpo-generate reproduces the eval images, bad configs fail fast."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from advgrpo.trainer.config import load_train_config
from advgrpo.trainer.loop import AdvGrpoTrainer

from .conftest import REPO
from .trainer_helpers import PROMPTS, epoch_records, free_port, make_reference_set, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return make_reference_set(tmp_path_factory.mktemp("refs"))


def tiny_config(server, references, out, *sets, epochs=4):
    return load_train_config(
        "tiny",
        sets=[f"adversarial.references={references}", *sets],
        overrides={"reward": {"server": server.target}, "run": {"output_dir": str(out), "epochs": epochs}},
    )


def test_tiny_preset_trains_lora_and_discriminator(start_server, references, tmp_path):
    server = start_server("--preset", "tiny", "--no-http")
    cfg = tiny_config(server, references, tmp_path / "run", epochs=4)
    trainer = AdvGrpoTrainer(cfg)
    before = [p.detach().clone() for p in trainer.lora_params]
    trainer.run()
    unchanged = [
        n for n, a, b in zip(trainer.lora_names, before, trainer.lora_params, strict=True) if torch.equal(a, b)
    ]
    # Every LoRA tensor moved but the last block's context-query B: that block is context_pre_only,
    # its context outputs are discarded, so no gradient reaches it (and B = 0 stays 0 under decay).
    last = trainer.transformer.config.num_layers - 1
    assert all(f"transformer_blocks.{last}.attn.add_q_proj.lora_B" in n for n in unchanged), unchanged
    records = epoch_records(tmp_path / "run")
    assert sorted(records) == [0, 1, 2, 3]
    # ratio_k = 2: the discriminator trains on epochs 0 and 2, the generator on 1 and 3.
    assert [records[e].get("d_version") for e in range(4)] == [1, None, 2, None]
    assert "train_loss" in records[1] and "train_loss" in records[3] and "train_loss" not in records[0]
    # Rewards of later epochs were produced by the updated discriminator.
    assert records[3]["reward_versions"]["dino"] == 2
    for key in (
        "reward_dino_mean",
        "reward_dino_std",
        "reference_mean",
        "generated_mean",
        "d_loss",
        "d_accuracy",
        "train_clip_frac",
        "train_approx_kl",
        "time_sample_s",
        "time_reward_s",
        "time_train_s",
    ):
        assert any(key in r for r in records.values()), key
    # Every group's rewards are logged with the versions that produced them.
    logged = [json.loads(line) for line in (tmp_path / "run" / "rewards-rank0.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in logged} == {0, 1, 2, 3}
    assert sum(len(r["rewards"]) for r in logged) == 4 * cfg.sampling.batch_size
    assert {r["model_versions"]["dino"] for r in logged if r["epoch"] == 3} == {2}
    ckpt = tmp_path / "run" / "checkpoints" / "epoch-000004"
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").exists() and (ckpt / "state.json").exists()
    assert (tmp_path / "run" / "samples" / "epoch-000004.png").exists()
    # The eval reports the training reward and Adv-GRPO's metric: DINO similarity to the references.
    (evaluation,) = [m for m in read_metrics(tmp_path / "run") if "eval_grid" in m]
    assert -1.0 <= evaluation["eval_similarity_mean"] <= 1.0 and evaluation["eval_similarity_images"] == 4
    assert np.isfinite(evaluation["eval_reward_mean"]) and "eval_reward_dino_mean" in evaluation


def test_resume_gives_the_same_next_epochs_as_an_unbroken_run(start_server, references, tmp_path):
    # Two micro-batches, one optimizer step each: the second has ratio != 1, a real loss.
    sets = ["optim.train_batch_size=4", "optim.steps_per_epoch=2"]
    unbroken_server = start_server("--preset", "tiny", "--no-http")
    AdvGrpoTrainer(tiny_config(unbroken_server, references, tmp_path / "a", *sets, epochs=4)).run()

    server = start_server("--preset", "tiny", "--no-http")
    AdvGrpoTrainer(tiny_config(server, references, tmp_path / "b", *sets, epochs=2)).run()
    resumed = AdvGrpoTrainer(tiny_config(server, references, tmp_path / "b", *sets, epochs=4), resume="latest")
    assert resumed.state.epoch == 2 and resumed.state.global_step > 0
    resumed.run()

    a, b = epoch_records(tmp_path / "a"), epoch_records(tmp_path / "b")
    for epoch in (2, 3):
        for key in (
            "reward_mean",
            "generated_mean",
            "reference_mean",
            "d_loss",
            "train_loss",
            "train_grad_norm",
            "train_approx_kl",
        ):
            if key in a[epoch]:
                assert b[epoch][key] == pytest.approx(a[epoch][key], rel=1e-5, abs=1e-7), (epoch, key)
    assert a[3]["train_loss"] != 0.0 and a[3]["train_approx_kl"] > 0.0


def test_generate_reproduces_the_trainers_eval_images(start_server, references, tmp_path):
    server = start_server("--preset", "tiny", "--no-http")
    run = tmp_path / "run"
    AdvGrpoTrainer(tiny_config(server, references, run, epochs=2)).run()
    out = tmp_path / "gen"
    cmd = [
        sys.executable,
        "-m",
        "advgrpo.trainer.generate",
        "--lora",
        str(run / "checkpoints" / "epoch-000002"),
        "--n",
        "1",
        "--output",
        str(out),
    ]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("0*.png"))) == len(PROMPTS)
    eval_grid = np.asarray(Image.open(run / "samples" / "epoch-000002.png"), dtype=np.int16)
    generated = np.asarray(Image.open(out / "grid.png"), dtype=np.int16)
    assert eval_grid.shape == generated.shape
    assert np.abs(eval_grid - generated).max() <= 1  # same pixels, up to a rounding step


def test_grpo_raises_a_brightness_reward(start_server, tmp_path):
    cfg_file = tmp_path / "bright.yaml"
    cfg_file.write_text("models:\n  brightness: {kind: brightness, weight: 1.0}\n")
    server = start_server("--config", str(cfg_file), "--no-http")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = load_train_config(
        "tiny",
        sets=[
            "adversarial.discriminator=",
            f"data.prompts={prompts}",
            "reward.weights={brightness: 1.0}",
            "optim.lr=3e-2",
            "sampling.batch_size=64",
            "sampling.group_size=16",
            "optim.train_batch_size=64",
        ],
        overrides={
            "reward": {"server": server.target},
            "run": {"output_dir": str(tmp_path / "run"), "epochs": 20, "seed": 7},
        },
    )
    AdvGrpoTrainer(cfg).run()
    records = epoch_records(tmp_path / "run")
    rewards = [records[e]["reward_mean"] for e in range(20)]
    assert records[19]["global_step"] == 20
    start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])
    # Per-image brightness varies by ~0.007 (std); a batch mean of 64 by ~0.001.
    assert end - start > 0.02, rewards


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "optim.lrr=1"], "optim.lrr: unknown key"),
        (["--set", "optim.lr=fast"], "optim.lr: expected a number"),
        (["--set", "sampling.group_size=3"], "sampling.group_size"),
        (["--set", "sampling.batch_size=true"], "sampling.batch_size: expected an integer"),
        (["--preset", "nope"], "invalid choice"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(references, tmp_path, args, message):
    cmd = [
        sys.executable,
        "-m",
        "advgrpo.trainer.train",
        "--preset",
        "tiny",
        "--set",
        f"adversarial.references={references}",
        "--output-dir",
        str(tmp_path / "run"),
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unreachable_server_and_bad_references_fail_fast(tmp_path, references):
    address = f"127.0.0.1:{free_port()}"
    base = [
        sys.executable,
        "-m",
        "advgrpo.trainer.train",
        "--preset",
        "tiny",
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        "reward.connect_timeout_s=1",
    ]
    result = subprocess.run(
        [*base, "--server", address, "--set", f"adversarial.references={references}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and address in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.json"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad.write_text('{"a cat": ["missing.png", "broken.png"], "a dog": []}')
    result = subprocess.run(
        [*base, "--server", address, "--set", f"adversarial.references={bad}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for fragment in ("missing.png", "broken.png", "'a dog': no images", "3 problem(s)"):
        assert fragment in result.stderr, result.stderr
