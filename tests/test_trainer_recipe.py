"""The method's recipe as the trainer puts it together (issue 13): presets that carry the original
configs' values, --print-config without data, gradient accumulation that equals one step on the
whole batch, the VAE in fp32, the discriminator's data from every rank and schedules that keep
several processes in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from advgrpo.common.errors import ConfigError
from advgrpo.common.shared_memory import SHM_DIR
from advgrpo.trainer.config import PRESET_ALIASES, PRESETS, load_train_config, validate_for_training

from .conftest import REPO
from .trainer_helpers import free_port, make_reference_set

# (preset, key, value): the original config files' values (docs/METHOD.md cites each file).
ORIGINAL_VALUES = [
    # showlab/Adv-GRPO config/grpo.py:dino_cotrain_sd3_patch_fast
    *[
        ("dino_cotrain_sd3_patch_fast", k, v)
        for k, v in {
            "sampling.num_steps": 10,
            "sampling.eval_num_steps": 40,
            "sampling.guidance_scale": 4.5,
            "sampling.step": "cps",
            "sampling.noise_level": 0.8,
            "sampling.sde_window": 2,  # train_num_steps
            "sampling.sde_window_start": 0,  # random_timestep
            "sampling.group_size": 16,  # num_image_per_prompt
            "sampling.batch_size": 8,  # mini_num_image_per_prompt x train_batch_size 1
            "sampling.batches_per_epoch": 12,  # int(48 / (8 * 8 / 16))
            "optim.train_batch_size": 8,
            "optim.steps_per_epoch": 2,  # gradient_accumulation_steps = num_batches_per_epoch // 2
            "optim.clip_range": 1e-5,
            "optim.beta": 0.0,
            "optim.lr": 3e-4,
            "optim.betas": (0.9, 0.999),
            "optim.weight_decay": 1e-4,
            "optim.eps": 1e-8,
            "optim.max_grad_norm": 1.0,
            "optim.adv_clip_max": 5.0,
            "optim.global_std": True,
            "optim.inner_epochs": 1,
            "lora.init": "gaussian",
            "run.eval_weights": {"pickscore": 1.0},  # eval_reward_fn: pickscore + image_similarity
            "optim.timestep_fraction": 0.99,
            "optim.ema": True,
            "optim.ema_decay": 0.9,
            "optim.ema_every": 8,
            "model.resolution": 512,
            "model.vae_dtype": "float32",
            "lora.rank": 32,
            "lora.alpha": 64,
            "reward.weights": {"dino": 1.0},
            "adversarial.discriminator": "dino",
            "adversarial.schedule": "ratio",
            "adversarial.ratio_k": 10,  # d_times
            "adversarial.references_per_update": 0,
            "run.seed": 42,
            "run.eval_every": 60,
        }.items()
    ],
    ("pickscore_cotrain_sd3_fast", "adversarial.discriminator", "pickscore"),
    ("pickscore_cotrain_sd3_fast", "adversarial.schedule", "trigger"),
    ("pickscore_cotrain_sd3_fast", "adversarial.ratio_k", 20),
    ("pickscore_cotrain_sd3_fast", "sampling.step", "cps"),
    ("pickscore_cotrain_sd3_fast", "optim.clip_range", 1e-5),
    ("pickscore_cotrain_sd3_fast", "sampling.noise_level", 0.8),
    ("pickscore_cotrain_sd3_fast", "sampling.sde_window", 2),
    ("pickscore_cotrain_sd3_fast", "sampling.group_size", 16),
    ("pickscore_cotrain_sd3_fast", "sampling.batches_per_epoch", 12),
    ("pickscore_cotrain_sd3_fast", "optim.beta", 0.0),
    ("ocr_cotrain_sd3_fast", "adversarial.schedule", "trigger"),
    ("ocr_cotrain_sd3_fast", "sampling.step", "cps"),
    ("ocr_cotrain_sd3_fast", "reward.weights", {"ocr": 0.5, "pickscore": 0.5}),
    ("ocr_cotrain_sd3_fast", "adversarial.discriminator", "pickscore"),
    # yifan123/flow_grpo config/grpo.py:pickscore_sd3 and general_ocr_sd3 (over config/base.py)
    ("flow_grpo_pickscore_sd3", "sampling.step", "sde"),
    ("flow_grpo_pickscore_sd3", "sampling.noise_level", 0.7),
    ("flow_grpo_pickscore_sd3", "sampling.sde_window", 0),
    ("flow_grpo_pickscore_sd3", "sampling.group_size", 24),
    ("flow_grpo_pickscore_sd3", "sampling.batch_size", 9),
    ("flow_grpo_pickscore_sd3", "sampling.batches_per_epoch", 4),  # int(48 / (32 * 9 / 24))
    ("flow_grpo_pickscore_sd3", "optim.clip_range", 1e-4),
    ("flow_grpo_pickscore_sd3", "optim.beta", 0.01),
    ("flow_grpo_pickscore_sd3", "optim.steps_per_epoch", 2),
    ("flow_grpo_pickscore_sd3", "optim.timestep_fraction", 0.99),
    ("flow_grpo_pickscore_sd3", "adversarial.discriminator", ""),
    ("flow_grpo_general_ocr_sd3", "optim.beta", 0.04),
    ("flow_grpo_general_ocr_sd3", "reward.weights", {"ocr": 1.0}),
]


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("preset, key, value", ORIGINAL_VALUES, ids=[f"{p}:{k}" for p, k, _ in ORIGINAL_VALUES])
def test_presets_carry_the_original_configs_values(preset, key, value):
    assert _get(load_train_config(preset), key) == value


def test_older_preset_names_are_aliases_of_the_methods_presets():
    for old, new in PRESET_ALIASES.items():
        assert new in PRESETS and load_train_config(old) == load_train_config(new)


def test_print_config_needs_no_references_and_training_does():
    out = subprocess.run(
        [sys.executable, "-m", "advgrpo.trainer.train", "--preset", "dino_cotrain_sd3_patch_fast", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["sampling"]["step"] == "cps" and printed["optim"]["clip_range"] == 1e-5
    assert printed["adversarial"]["references"] is None
    cfg = load_train_config("dino_cotrain_sd3_patch_fast")
    with pytest.raises(ConfigError, match="adversarial.references: required"):
        validate_for_training(cfg, world_size=8)


def test_config_refuses_a_deterministic_trained_step_and_uneven_accumulation():
    with pytest.raises(ConfigError, match=r"timestep_fraction: with sampling.step=cps the last step"):
        load_train_config("tiny", sets=["sampling.sde_window=0", "optim.timestep_fraction=1.0"])
    load_train_config("tiny", sets=["sampling.sde_window=0", "optim.timestep_fraction=0.99"])
    with pytest.raises(ConfigError, match="optim.steps_per_epoch"):
        load_train_config("tiny", sets=["optim.train_batch_size=4", "optim.steps_per_epoch=3"])
    with pytest.raises(ConfigError, match="sampling.sde_window_start"):
        load_train_config("tiny", sets=["sampling.sde_window_start=4"])
    with pytest.raises(ConfigError, match="sampling.sde_window_range: set together with sampling.sde_window_start"):
        load_train_config("tiny", sets=["sampling.sde_window_range=[0, 1]"])
    load_train_config("tiny", sets=["sampling.sde_window_range=[0, 1]", "sampling.sde_window_start=null"])
    # Per-process sizes of a 32-GPU config: a group spans processes, checked with the process count.
    cfg = load_train_config("flow_grpo_pickscore_sd3", sets=["data.prompts=p.txt"])
    validate_for_training(cfg, world_size=32)
    with pytest.raises(ConfigError, match=r"sampling.group_size \(24\) must divide .* all 1 process"):
        validate_for_training(cfg, world_size=1)


# ------------------------------------------------------------------ with a trainer


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return make_reference_set(tmp_path_factory.mktemp("refs"))


def _config(tiny_server, references, out, *sets):
    return load_train_config(
        "tiny",
        sets=[f"adversarial.references={references}", *sets],
        overrides={"reward": {"server": tiny_server.target}, "run": {"output_dir": str(out / "run")}},
    )


@pytest.fixture
def make_trainer(tiny_server, references, tmp_path):
    """Builds trainers on the tiny server (``make_trainer(*sets, out=..., resume=...)``) and closes
    them after the test: an open trainer holds its client's shared-memory segments."""
    from advgrpo.trainer.loop import AdvGrpoTrainer

    made = []

    def make(*sets, out=tmp_path, resume=None):
        made.append(AdvGrpoTrainer(_config(tiny_server, references, out, *sets), resume=resume))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()


def _epoch_batch(trainer):
    from advgrpo.trainer.loop import TrainBatch
    from advgrpo.trainer.rewards import RewardStream

    stream = RewardStream(trainer.client, trainer.score_weights)
    trainer._submitted = []
    samples = trainer.sample_epoch(0, stream)
    stream.collect()
    advantages = torch.linspace(-1.5, 1.5, len(samples.images))
    return TrainBatch.from_samples(samples, advantages, trainer.prompts)


def _grads(trainer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in trainer.lora_params]


@pytest.mark.slow
def test_accumulated_step_equals_one_step_on_the_whole_batch(make_trainer):
    trainer = make_trainer("optim.beta=0.04")
    batch = _epoch_batch(trainer)
    # Move the policy off the sampling policy: ratios != 1, some clipped, a real KL.
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in trainer.lora_params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    steps = trainer.trained_steps(batch)
    assert steps == [0, 1]  # the tiny preset's window: steps 0 and 1, both trained
    n = batch.old_log_probs.shape[0]
    trainer.accumulate_gradients(batch, [torch.arange(n)], steps)
    whole = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    # The same gradient by plain autograd of the mean loss over the steps (no accelerate scaling).
    torch.testing.assert_close(whole, _plain_gradient(trainer, batch, steps), rtol=1e-5, atol=1e-8)
    stats: dict[str, list[float]] = {"loss": [], "policy_loss": [], "kl": [], "clip_frac": [], "approx_kl": []}
    trainer.accumulate_gradients(batch, list(torch.randperm(n).split(2)), steps, stats)
    accumulated = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    assert sum(float(g.abs().sum()) for g in whole) > 0
    # Micro-batches sum the same terms in another order: float32 rounding, relative to each
    # tensor's scale (an element near zero can differ by 1e-4 of itself and still be exact).
    for a, b in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert len(stats["loss"]) == 4 * 2 and max(stats["kl"]) > 0
    # The loop: optim.steps_per_epoch optimizer steps per epoch, whatever the micro-batch count.
    before = trainer.state.global_step
    trainer.cfg.optim.train_batch_size, trainer.cfg.optim.steps_per_epoch = 2, 2
    out = trainer._grpo_update(0, _samples_for(trainer, batch), batch.advantages)
    assert trainer.state.global_step - before == 2 and out["train_steps"] == 2


@pytest.mark.slow
def test_the_sde_window_is_where_the_config_puts_it(make_trainer):
    from advgrpo.trainer.rewards import RewardStream

    trainer = make_trainer("sampling.sde_window_start=1")
    trainer._submitted = []
    stream = RewardStream(trainer.client, trainer.score_weights)
    assert trainer.sample_epoch(0, stream).trajectories[0].step_indices == (1, 2)
    stream.collect()
    trainer.cfg.sampling.sde_window_start, trainer.cfg.sampling.sde_window_range = None, (0, 2)
    starts = set()
    for epoch in range(6):
        trainer._submitted = []
        stream = RewardStream(trainer.client, trainer.score_weights)
        starts.add(trainer.sample_epoch(epoch, stream).trajectories[0].step_indices[0])
        stream.collect()
    assert starts <= {0, 1, 2} and len(starts) > 1  # drawn per epoch from the range


@pytest.mark.slow
def test_every_score_call_asks_for_the_discriminators_last_acknowledged_version(make_trainer):
    """The trainer's score requests carry min_versions: each trainable model's version at start,
    the discriminator's raised to what its last update returned, so that the epoch after an update
    is scored by that version (on a Ray backend, by a replica that caught up first)."""
    trainer = make_trainer()
    sent: list[dict[str, int]] = []
    build = trainer.client._requests  # every Score and ScoreStream request is built here

    def spy(*args, **kwargs):
        for request, parts in build(*args, **kwargs):
            sent.append(dict(request.min_versions))
            yield request, parts

    trainer.client._requests = spy
    at_start = {m.name: m.version for m in trainer.client.list_models() if m.trainable}
    assert trainer.version_floor.min_versions() == at_start and "dino" in at_start
    first = trainer.train_epoch(0)  # ratio_k = 2: epoch 0 trains the discriminator
    assert first["d_version"] == at_start["dino"] + 1
    assert sent and all(m == at_start for m in sent)  # the stream's groups and the references alike
    assert trainer.version_floor.min_versions() == {**at_start, "dino": first["d_version"]}
    sent.clear()
    second = trainer.train_epoch(1)
    assert sent and all(m == {**at_start, "dino": first["d_version"]} for m in sent)
    assert second["reward_versions"]["dino"] == first["d_version"]


def _plain_gradient(trainer, batch, steps) -> list[torch.Tensor]:
    from advgrpo.trainer import pipeline as sd3
    from advgrpo.trainer.grpo import grpo_loss
    from advgrpo.trainer.sampling import step_log_prob
    from advgrpo.trainer.sde import kl_to_reference

    s, o, t = trainer.cfg.sampling, trainer.cfg.optim, batch.trajectory
    kw = dict(guidance_scale=s.guidance_scale, step=s.step, noise_level=s.noise_level, sigma_max=t.sigma_max)
    cond = trainer._conditioning(batch.prompts)
    total = 0.0
    for j in steps:
        args = (batch.latents[:, j], batch.next_latents[:, j], t.timesteps[j], t.sigmas[j], t.sigmas_next[j], cond)
        out = step_log_prob(trainer.transformer, *args, dtype=torch.float32, **kw)
        with torch.no_grad(), sd3.lora_disabled(trainer.transformer):
            ref = step_log_prob(trainer.transformer, *args, dtype=torch.float32, **kw)
        kl = kl_to_reference(out.mean, ref.mean, out.std_t)
        loss, _ = grpo_loss(out.log_prob, batch.old_log_probs[:, j], batch.advantages, o.clip_range, kl=kl, beta=o.beta)
        total = total + loss
    (total / len(steps)).backward()
    grads = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def _samples_for(trainer, batch):
    from advgrpo.trainer.loop import EpochSamples

    ids = torch.tensor([trainer.prompts.index(p) for p in batch.prompts])
    return EpochSamples(ids, [batch.trajectory], [])


@pytest.mark.slow
def test_vae_decodes_in_fp32_under_a_bf16_transformer(make_trainer, tmp_path):
    from advgrpo.trainer.loop import generate_images

    trainer = make_trainer("model.dtype=bfloat16")
    assert trainer.pipe.vae.dtype == torch.float32
    assert next(trainer.transformer.parameters()).dtype == torch.bfloat16
    images = generate_images(trainer.pipe, ["a red apple"], trainer.cfg, seed=0)
    assert images[0].dtype == np.uint8 and images[0].shape == (32, 32, 3)
    kept = make_trainer("model.dtype=bfloat16", "model.vae_dtype=bfloat16", out=tmp_path / "bf16")
    assert kept.pipe.vae.dtype == torch.bfloat16
    assert not np.array_equal(generate_images(kept.pipe, ["a red apple"], kept.cfg, seed=0)[0], images[0])


# ------------------------------------------------------------------ two processes (accelerate, gloo)


def _launch_two(server, references, out, *sets, timeout=240):
    cmd = [
        # accelerate's multi-process launcher (torchrun); run.device=cpu makes each process's
        # Accelerator MULTI_CPU, over gloo.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "advgrpo.trainer.train", "--preset", "tiny", "--server", server.target, "--output-dir", str(out),
        "--set", f"adversarial.references={references}", "--set", "adversarial.references_per_update=0",
        *[a for s in sets for a in ("--set", s)],
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    import os

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-4000:]
    phases = {}
    for rank in (0, 1):
        lines = (out / f"schedule-rank{rank}.jsonl").read_text().splitlines()
        phases[rank] = [json.loads(line) for line in lines]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return phases, {m["epoch"]: m for m in metrics if "reward_mean" in m}


@pytest.mark.slow
def test_two_processes_take_the_same_branch_and_update_once_per_d_epoch(start_server, references, tmp_path):
    """Two processes under the trigger schedule: its branch depends on means gathered over both
    ranks, and it takes both branches here. (The ratio's branch is a function of the epoch alone,
    test_trainer_math.py; a second 2-process launch cost 25 s of CI.)"""
    import random

    from PIL import Image

    from advgrpo.client import Group, RewardClient
    from advgrpo.common import toy_domain as td
    from advgrpo.trainer.references import load_reference_set

    epochs = 3
    server = start_server("--preset", "tiny", "--no-http")  # a fresh discriminator
    # One update with the roles swapped, so that the run starts in the discriminator's branch: the
    # discriminator learns to prefer scenes of the toy domain (what the toy SD3 draws) over the
    # reference set's gradients, until its own updates turn it round.
    rng = random.Random(0)
    scenes = [td.render(td.random_scene(rng, 32)) for _ in range(8)]
    paths = [path for paths in load_reference_set(references).images.values() for path in paths][:8]
    gradients = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    with RewardClient(server.target, timeout_s=60) as client:
        client.update_discriminator("dino", [Group("scenes", scenes)], [Group("gradients", gradients)], steps=1)
    out = tmp_path / "trigger"
    phases, records = _launch_two(server, references, out, "adversarial.schedule=trigger", f"run.epochs={epochs}")
    with RewardClient(server.target) as client:
        version = {m.name: m.version for m in client.list_models()}["dino"]
    d_epochs = [p["epoch"] for p in phases[0] if p["phase"] == "discriminator"]
    assert version - 1 == len(d_epochs) >= 1  # one update per D epoch, from the main process only
    # Every rank took the same branch in every epoch, decided on the same (gathered) means.
    assert [p["phase"] for p in phases[0]] == [p["phase"] for p in phases[1]]
    assert len(phases[0]) == epochs
    for a, b in zip(phases[0], phases[1], strict=True):
        assert a["generated_mean"] == b["generated_mean"] and a["reference_mean"] == b["reference_mean"]
    for p in phases[0]:  # D instead of G exactly when generations out-score references
        assert p["phase"] == ("discriminator" if p["generated_mean"] > p["reference_mean"] else "generator")
    # The swapped discriminator scores the generations higher at first; once trained, lower.
    assert {p["phase"] for p in phases[0]} == {"discriminator", "generator"}, phases[0]
    for epoch, rec in records.items():
        if epoch in d_epochs:
            # One update per D epoch with both ranks' generations (2 x 8) and as many references.
            assert rec["d_generated"] == 16 and rec["d_references"] == 16, rec
            assert rec["d_generated_prompts"] == _generated_prompts(out, epoch)
            assert "train_loss" not in rec
        else:
            assert "d_version" not in rec and "train_loss" in rec


def _generated_prompts(out, epoch: int) -> dict[str, int]:
    """Every rank's generations of the epoch by prompt, from each rank's own reward log."""
    counts: dict[str, int] = {}
    for rank in (0, 1):
        for line in (out / f"rewards-rank{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["epoch"] == epoch:
                assert r["rank"] == rank
                counts[r["prompt"]] = counts.get(r["prompt"], 0) + len(r["rewards"])
    return counts


@pytest.mark.slow
def test_start_up_refuses_what_would_fail_later(make_trainer):
    def our_segments():
        return set(SHM_DIR.glob(f"advgrpo-{os.getpid()}-*"))

    before = our_segments()
    # An update the socket cannot carry (16 generations + 16 references of 32x32 = 98 KB raw).
    with pytest.raises(ConfigError, match=r"over 3x the message limit .*shared memory"):
        make_trainer("reward.shared_memory=false", "reward.max_message_bytes=16384")
    with pytest.raises(ConfigError, match="run.eval_weights: 'nope' is not served"):
        make_trainer("run.eval_weights={nope: 1.0}")  # after its client placed a segment to probe the server
    # A refused start closes what it opened (the client's channel and shared-memory segments).
    assert our_segments() == before
    # A checkpoint resumes only under the recipe it was trained with.
    make_trainer().save(1)
    with pytest.raises(
        ConfigError, match=r"another recipe \(adversarial.ratio_k: 2 -> 3; optim.clip_range: 0.2 -> 0.1\)"
    ):
        make_trainer("optim.clip_range=0.1", "adversarial.ratio_k=3", resume="latest")
    assert make_trainer(resume="latest").state.epoch == 1


def test_method_doc_lists_every_preset_and_every_value_the_method_presets_set():
    doc = (REPO / "docs" / "METHOD.md").read_text()
    for name in PRESETS:
        assert f"`{name}`" in doc, name

    def leaves(mapping, prefix=""):
        for key, value in mapping.items():
            if isinstance(value, dict) and key != "weights" and not key.endswith("_weights"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    for preset in ("dino_cotrain_sd3_patch_fast", "flow_grpo_pickscore_sd3"):
        for key in leaves(PRESETS[preset]):
            section, _, leaf = key.rpartition(".")
            assert f"`{key}`" in doc or f"`{leaf}`" in doc, f"{preset}: {key} is not in docs/METHOD.md"
