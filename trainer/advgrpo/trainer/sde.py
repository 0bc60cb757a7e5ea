"""Flow-GRPO step math: the stochastic sampling steps with their log-probs, the ODE step, the KL
to the reference model and the Fast variant's SDE window.

Conventions (shared by every function here):

* Latents are ``[B, C, H, W]`` (any ``[B, ...]`` works); ``sigma``/``sigma_next`` are floats,
  0-dim tensors or ``[B]`` tensors and broadcast to ``[B, 1, 1, 1]``. ``sigma`` is the current
  noise level, ``sigma_next`` the next (smaller) one, so ``dt = sigma_next - sigma < 0``.
* All step math runs in fp32: inputs are cast up (bf16 overflows in the mean, see Flow-GRPO) and
  every returned tensor is fp32, whatever the input dtype.
* Log-probs are averaged (not summed) over all non-batch dims, as in Flow-GRPO: the PPO ratio of
  an image is then a per-element geometric mean, which keeps it near 1 at 10^5 latent elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: Tensor  # x' = the latent after the step, fp32 [B, C, H, W]
    log_prob: Tensor  # [B], log-density of x' averaged over all non-batch dims
    mean: Tensor  # mean of x' given x, fp32 [B, C, H, W]
    std: Tensor  # std of x' given x, [B, 1, 1, 1]: std_t*sqrt(-dt) for 'sde', sigma'*sin(a*pi/2) for 'cps'
    # Flow-GRPO's ``std_dev_t``: the SDE's diffusion coefficient std_t (without sqrt(-dt)) for 'sde',
    # equal to ``std`` for 'cps'. Flow-GRPO's KL divides by this one (see ``kl_to_reference``).
    std_t: Tensor | None = None  # [B, 1, 1, 1]


def _as_sigma(sigma: float | Tensor, like: Tensor) -> Tensor:
    """float / 0-dim / [B] (or already [B,1,1,1]) -> fp32 [B or 1, 1, ..., 1] on like's device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def _noise(shape: torch.Size, device: torch.device, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    if noise is not None:
        if noise.shape != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        return noise.to(device=device, dtype=torch.float32)
    # Draw on the generator's device (a CPU generator with CUDA latents is common), then move.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _mean_over_non_batch(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


def sde_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    noise_level: float = 0.7,
    sigma_max: float | Tensor | None = None,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Flow-GRPO's 'sde' step: the reverse-time SDE with the same marginals as the flow ODE.

    std_t = a*sqrt(sigma / (1 - sigma)); at sigma == 1 the denominator uses ``sigma_max`` (the
    scheduler's ``sigmas[1]``) instead, as Flow-GRPO does, so the first step stays finite.
    mean  = x*(1 + std_t^2/(2 sigma)*dt) + v*(1 + std_t^2 (1 - sigma)/(2 sigma))*dt
    x'    = mean + std_t*sqrt(-dt)*eps        (unless ``prev_sample`` is given)
    log_prob = mean over C,H,W of log N(x'; mean, (std_t*sqrt(-dt))^2)

    Pass ``prev_sample`` to recompute the log-prob of a stored transition (train time): gradients
    then flow through ``mean`` only (x' is detached, as in Flow-GRPO). ``noise`` (a standard
    normal of the sample's shape) wins over ``generator``.
    """
    if noise_level <= 0:
        raise ValueError("sde_step: noise_level must be > 0 (the log-density is undefined without noise)")
    x = sample.float()
    v = velocity.float()
    s = _as_sigma(sigma, x)
    s_next = _as_sigma(sigma_next, x)
    if sigma_max is None:
        if bool((s == 1).any()):
            raise ValueError("sde_step: sigma == 1 needs sigma_max (the scheduler's sigmas[1])")
        denom_sigma = s
    else:
        denom_sigma = torch.where(s == 1, torch.as_tensor(sigma_max, dtype=torch.float32, device=x.device), s)
    dt = s_next - s
    std_t = noise_level * torch.sqrt(s / (1 - denom_sigma))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        x_next = mean + std * _noise(x.shape, x.device, noise, generator)
    else:
        x_next = prev_sample.float()
    # Same as Normal(mean, std).log_prob(x'), written out so that x' is detached explicitly.
    log_prob = -((x_next.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    b = (x.shape[0], *std.shape[1:])
    return StepOutput(x_next, _mean_over_non_batch(log_prob), mean, std.expand(b), std_t.expand(b))


def cps_step(
    sample: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    noise_level: float = 0.8,
    sigma_max: float | Tensor | None = None,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Flow-GRPO's 'cps' (coefficient-preserving) step.

    std  = sigma'*sin(a*pi/2); x0 = x - sigma*v; x1 = x + (1 - sigma)*v
    mean = (1 - sigma')*x0 + sqrt(sigma'^2 - std^2)*x1;  x' = mean + std*eps
    log_prob = -mean over C,H,W of (x' - mean)^2

    The log-prob drops the Gaussian's constants and its 1/(2 std^2) factor, exactly as Flow-GRPO
    does: it is only used in ratios of two log-probs at the same step (same std), where the
    constants cancel, and the missing scale acts as a fixed per-step temperature. ``sigma_max``
    is accepted (and ignored) so that both steps share one call signature.
    """
    del sigma_max
    if noise_level < 0:
        raise ValueError("cps_step: noise_level must be >= 0")
    x = sample.float()
    v = velocity.float()
    s = _as_sigma(sigma, x)
    s_next = _as_sigma(sigma_next, x)
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0 = x - s * v
    x1 = x + (1 - s) * v
    # sigma'^2 - std^2 = (sigma' cos)^2 >= 0 analytically; clamp rounding below zero (sqrt -> NaN).
    mean = (1 - s_next) * x0 + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * x1
    if prev_sample is None:
        x_next = mean + std * _noise(x.shape, x.device, noise, generator)
    else:
        x_next = prev_sample.float()
    log_prob = _mean_over_non_batch(-((x_next.detach() - mean) ** 2))
    std = std.expand(x.shape[0], *std.shape[1:])
    return StepOutput(x_next, log_prob, mean, std, std)


def ode_step(sample: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Deterministic Euler step x + v*dt of the flow ODE (steps outside the SDE window); fp32."""
    x = sample.float()
    return x + velocity.float() * (_as_sigma(sigma_next, x) - _as_sigma(sigma, x))


def kl_to_reference(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """KL(policy step || reference step) per sample, [B]: mean over C,H,W of (mu - mu_ref)^2 / (2 std^2).

    Both steps are Gaussians with the same std (it depends only on the schedule), so the KL is the
    scaled squared distance of the means (per element, averaged like the log-probs).

    Which std: with ``StepOutput.std`` (std of x', std_t*sqrt(-dt) for 'sde') this is the exact
    Gaussian KL. Flow-GRPO divides by ``std_dev_t`` instead (``StepOutput.std_t``, no sqrt(-dt)),
    which for 'sde' is the exact KL times (-dt); pass ``std_t`` to reproduce Flow-GRPO's scale
    (its beta = 0.04 is tuned for that scale). For 'cps' the two are the same.
    """
    diff2 = (mean.float() - ref_mean.float()) ** 2
    std = torch.as_tensor(std, dtype=torch.float32, device=diff2.device)
    if not bool((std > 0).all()):
        raise ValueError("kl_to_reference: std is 0 (a deterministic step); the KL is undefined there")
    # Divide after averaging (std is constant over C,H,W), as Flow-GRPO does.
    return _mean_over_non_batch(diff2) / (2 * std.reshape(-1) ** 2)


def sde_window(
    num_steps: int,
    window_size: int,
    *,
    start: int | None = None,
    start_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> range:
    """The steps that take the SDE step (and are stored and trained); the others take the ODE step.

    ``window_size`` consecutive steps from ``start``. With ``start`` given the window is fixed
    there (Adv-GRPO: ``random_timestep = 0``). Otherwise ``start`` is drawn uniformly from
    ``start_range`` = (lo, hi), both ends included, default (0, num_steps // 2): Flow-GRPO-Fast's
    ``random.randint(0, num_steps // 2)``. A start that would run the window past the last step
    is moved back so that the window ends at the last step.
    ``window_size >= num_steps`` gives ``range(num_steps)`` (plain Flow-GRPO: every step).
    Deterministic for a seeded ``generator`` (global torch RNG otherwise); all ranks must draw the
    same window, so pass them a generator seeded alike.
    """
    if num_steps < 1:
        raise ValueError("sde_window: num_steps must be >= 1")
    if window_size < 1:
        raise ValueError("sde_window: window_size must be >= 1")
    if window_size >= num_steps:
        return range(num_steps)
    last_start = num_steps - window_size  # the last start that keeps the window inside the trajectory
    if start is None:
        lo, hi = start_range if start_range is not None else (0, num_steps // 2)
        if not 0 <= lo <= hi < num_steps:
            raise ValueError(f"sde_window: start_range {(lo, hi)} must satisfy 0 <= lo <= hi < num_steps ({num_steps})")
        start = lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=generator).item())
    elif not 0 <= start < num_steps:
        raise ValueError(f"sde_window: start {start} must be in 0..{num_steps - 1}")
    start = min(start, last_start)
    return range(start, start + window_size)


def trained_steps(window: range, num_steps: int, timestep_fraction: float) -> list[int]:
    """Positions (0-based, in the stored window) of the steps the GRPO update trains on.

    Flow-GRPO trains the first ``int(num_steps * timestep_fraction)`` steps of the trajectory, in
    order (``timestep_fraction = 0.99`` with 10 steps: steps 0..8, never the last one, where
    sigma' = 0). Here only window steps are stored, so the trained steps are the window's steps
    that lie in that prefix: all of Adv-GRPO's 2-step window at step 0, steps 0..8 of a full window.
    """
    limit = int(num_steps * timestep_fraction)
    return [k for k, i in enumerate(window) if i < limit]


def step_std(step: str, sigma: float, sigma_next: float, noise_level: float, sigma_max: float | None = None) -> float:
    """The std of x' given x for one step (what the log-prob and the KL divide by); 0 means the
    step is deterministic and carries no policy gradient."""
    if step == "cps":
        return float(sigma_next) * math.sin(noise_level * math.pi / 2)
    if step == "sde":
        denom = sigma_max if sigma == 1 and sigma_max is not None else sigma
        if denom >= 1 or sigma <= sigma_next:
            return 0.0
        return noise_level * math.sqrt(sigma / (1 - denom)) * math.sqrt(sigma - sigma_next)
    raise ValueError(f"unknown step {step!r} (expected 'sde' or 'cps')")


def check_trainable_steps(
    steps: list[int],
    window: range,
    sigmas: Tensor,
    sigmas_next: Tensor,
    *,
    step: str,
    noise_level: float,
    sigma_max: float | None = None,
) -> None:
    """Raises ValueError naming the step when a trained step is deterministic (std 0): its log-prob
    is constant and the KL would divide by zero (e.g. 'cps' at the last step, where sigma' = 0)."""
    if not steps:
        raise ValueError(
            f"no step to train: the SDE window {list(window)} lies outside the trained prefix "
            "(optim.timestep_fraction); widen the fraction or move the window (sampling.sde_window_start)"
        )
    for k in steps:
        std = step_std(step, float(sigmas[k]), float(sigmas_next[k]), noise_level, sigma_max)
        if not std > 0:
            raise ValueError(
                f"step {window[k]} (sigma {float(sigmas[k]):.4g} -> {float(sigmas_next[k]):.4g}) is deterministic "
                f"under sampling.step={step!r} (std 0): it cannot be trained. Set optim.timestep_fraction below 1 "
                "(Flow-GRPO: 0.99 skips the last step) or keep the SDE window off it"
            )


def step_kind(i: int, window: range) -> str:
    """'sde' for steps inside the window (stochastic, stored, trained), else 'ode'."""
    return "sde" if i in window else "ode"
