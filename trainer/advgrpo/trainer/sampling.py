"""Sampling with log-probs (Flow-GRPO): the denoising loop over a frozen SD3 with a LoRA policy.

Every step runs the transformer with classifier-free guidance. Steps inside the SDE window take a
stochastic step ('sde' or 'cps') whose log-prob is recorded; steps outside take the deterministic
ODE (Euler) step. Only window steps are stored, as (latent before, latent after, timestep, sigma,
sigma_next, log-prob): exactly what the GRPO update needs to recompute the log-prob under the
current policy. The step math itself lives in ``advgrpo.trainer.sde``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from advgrpo.trainer.sde import StepOutput, cps_step, ode_step, sde_step


@dataclass
class Conditioning:
    """Text conditioning of a batch: the prompts' embeddings and the empty prompt's (for CFG)."""

    embeds: torch.Tensor  # [B, S, D]
    pooled: torch.Tensor  # [B, P]
    neg_embeds: torch.Tensor  # [B, S, D]
    neg_pooled: torch.Tensor  # [B, P]

    def index(self, idx: torch.Tensor | slice) -> "Conditioning":
        return Conditioning(self.embeds[idx], self.pooled[idx], self.neg_embeds[idx], self.neg_pooled[idx])


@dataclass
class Trajectory:
    """One sampling batch. S stored (window) steps per image."""

    latents: torch.Tensor  # [B, S, C, h, w] latent before each stored step
    next_latents: torch.Tensor  # [B, S, C, h, w] latent after it
    log_probs: torch.Tensor  # [B, S] under the sampling policy
    timesteps: torch.Tensor  # [S] transformer timesteps of the stored steps
    sigmas: torch.Tensor  # [S]
    sigmas_next: torch.Tensor  # [S]
    sigma_max: float  # the schedule's sigmas[1], used by the 'sde' step at sigma == 1
    final_latents: torch.Tensor  # [B, C, h, w]
    step_indices: tuple[int, ...] = ()  # [S] the stored steps' positions in the trajectory (0-based)


def guided_velocity(
    transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, guidance_scale: float
) -> torch.Tensor:
    """The CFG velocity: uncond + g * (cond - uncond), one transformer call on the doubled batch."""
    b = latents.shape[0]
    if guidance_scale == 1.0:
        return transformer(
            hidden_states=latents,
            timestep=timestep.expand(b),
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]
    model_in = torch.cat([latents, latents])
    out = transformer(
        hidden_states=model_in,
        timestep=timestep.expand(2 * b),
        encoder_hidden_states=torch.cat([cond.neg_embeds, cond.embeds]),
        pooled_projections=torch.cat([cond.neg_pooled, cond.pooled]),
        return_dict=False,
    )[0]
    uncond, text = out.chunk(2)
    return uncond + guidance_scale * (text - uncond)


def stochastic_step(kind: str) -> Callable[..., StepOutput]:
    if kind == "sde":
        return sde_step
    if kind == "cps":
        return cps_step
    raise ValueError(f"unknown step {kind!r} (expected 'sde' or 'cps')")


@torch.no_grad()
def sample_with_logprobs(
    transformer,
    scheduler,
    cond: Conditioning,
    *,
    num_steps: int,
    guidance_scale: float,
    step: str,
    noise_level: float,
    window: range,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Trajectory:
    """Samples a batch from pure noise; records the window steps (see module doc)."""
    b = cond.embeds.shape[0]
    scheduler.set_timesteps(num_steps, device=device)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    timesteps = scheduler.timesteps.to(device)
    sigma_max = sigmas[1].item() if len(sigmas) > 1 else 1.0
    step_fn = stochastic_step(step)
    latents = torch.randn((b, *latent_shape), generator=generator, device=device, dtype=torch.float32)
    stored = {"latents": [], "next": [], "logp": []}
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = guided_velocity(transformer, latents.to(dtype), timesteps[i], cond, guidance_scale).float()
        if i in window:
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
            out = step_fn(latents, v, sigma, sigma_next, noise_level=noise_level, sigma_max=sigma_max, noise=noise)
            stored["latents"].append(latents)
            stored["next"].append(out.prev_sample)
            stored["logp"].append(out.log_prob)
            latents = out.prev_sample
        else:
            latents = ode_step(latents, v, sigma, sigma_next)
    idx = list(window)
    return Trajectory(
        latents=torch.stack(stored["latents"], dim=1),
        next_latents=torch.stack(stored["next"], dim=1),
        log_probs=torch.stack(stored["logp"], dim=1),
        timesteps=timesteps[idx],
        sigmas=sigmas[idx],
        sigmas_next=sigmas[[i + 1 for i in idx]],
        sigma_max=sigma_max,
        final_latents=latents,
        step_indices=tuple(idx),
    )


def step_log_prob(
    transformer,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timestep: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    cond: Conditioning,
    *,
    guidance_scale: float,
    step: str,
    noise_level: float,
    sigma_max: float,
    dtype: torch.dtype,
) -> StepOutput:
    """Log-prob of a stored transition under the current transformer (with gradients)."""
    v = guided_velocity(transformer, latents.to(dtype), timestep, cond, guidance_scale).float()
    return stochastic_step(step)(
        latents, v, sigma, sigma_next, noise_level=noise_level, sigma_max=sigma_max, prev_sample=next_latents
    )
