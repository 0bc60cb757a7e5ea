"""Sampling with log-probs on the tiny SD3: window storage, and log-probs recomputed at train time."""

from __future__ import annotations

import torch

from advgrpo.trainer import pipeline as sd3
from advgrpo.trainer.config import LoraConfig
from advgrpo.trainer.sampling import Conditioning, sample_with_logprobs, step_log_prob


def setup(n: int = 3):
    pipe = sd3.build_tiny_sd3_pipeline(0)
    sd3.add_lora(pipe.transformer, LoraConfig(rank=4, alpha=8))
    embeds, pooled = sd3.encode_prompts(pipe, ["a cat"] * n, device="cpu", max_sequence_length=16)
    neg, neg_pooled = sd3.encode_negative_prompt(pipe, device="cpu", max_sequence_length=16, batch_size=n)
    return pipe, Conditioning(embeds, pooled, neg, neg_pooled)


def sample(pipe, cond, window, step="sde", seed=0):
    return sample_with_logprobs(
        pipe.transformer,
        pipe.scheduler,
        cond,
        num_steps=4,
        guidance_scale=4.5,
        step=step,
        noise_level=0.7 if step == "sde" else 0.8,
        window=window,
        latent_shape=(16, 8, 8),
        generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def test_only_window_steps_are_stored_and_their_log_probs_recompute_exactly():
    pipe, cond = setup()
    for step in ("sde", "cps"):
        traj = sample(pipe, cond, range(1, 3), step)
        assert traj.latents.shape == (3, 2, 16, 8, 8) and traj.log_probs.shape == (3, 2)
        pipe.scheduler.set_timesteps(4)
        assert torch.equal(traj.timesteps, pipe.scheduler.timesteps[1:3])
        assert torch.equal(traj.sigmas_next, pipe.scheduler.sigmas[2:4].float())
        # Consecutive stored steps chain: the latent after step 1 is the latent before step 2.
        assert torch.equal(traj.next_latents[:, 0], traj.latents[:, 1])
        for j in range(2):
            out = step_log_prob(
                pipe.transformer,
                traj.latents[:, j],
                traj.next_latents[:, j],
                traj.timesteps[j],
                traj.sigmas[j],
                traj.sigmas_next[j],
                cond,
                guidance_scale=4.5,
                step=step,
                noise_level=0.7 if step == "sde" else 0.8,
                sigma_max=traj.sigma_max,
                dtype=torch.float32,
            )
            torch.testing.assert_close(out.log_prob, traj.log_probs[:, j], rtol=1e-5, atol=1e-5)


def test_outside_the_window_sampling_is_deterministic_ode():
    pipe, cond = setup()
    # Window at the last step only: steps 0-2 are ODE (no noise drawn), so the stored latent before
    # step 3 is a deterministic function of the initial noise.
    a = sample(pipe, cond, range(3, 4), seed=1)
    b = sample(pipe, cond, range(3, 4), seed=1)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.final_latents, b.final_latents)
    full = sample(pipe, cond, range(4), seed=1)
    assert full.latents.shape[1] == 4
    assert not torch.equal(full.latents[:, 3], a.latents[:, 0])  # SDE noise changed the path
