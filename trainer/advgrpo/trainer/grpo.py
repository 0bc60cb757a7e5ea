"""GRPO math: group-relative advantages and the PPO-clipped policy loss (Flow-GRPO's recipe).

Everything is computed in fp32 (advantages in fp64, then returned as fp32). Stats are returned as
detached 0-dim tensors so callers decide when to sync (``float(stats["clip_frac"])``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor


def _group_index(groups: Sequence[Hashable] | Tensor, n: int) -> Tensor:
    """Group labels -> contiguous ids 0..G-1 (LongTensor [N], on CPU for label lists)."""
    if isinstance(groups, Tensor):
        if groups.shape != (n,):
            raise ValueError(f"groups has shape {tuple(groups.shape)}, expected ({n},)")
        return torch.unique(groups, return_inverse=True)[1]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} rewards")
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(g, len(ids)) for g in groups], dtype=torch.long)


def group_advantages(
    rewards: Tensor,
    groups: Sequence[Hashable] | Tensor,
    *,
    global_std: bool = True,
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Tensor:
    """GRPO advantages [N]: (r - mean of r's group) / (std + eps), clipped to [-clip, clip].

    ``groups`` labels each reward with its prompt (any hashable, or a tensor of prompt ids).
    ``global_std=True`` (Flow-GRPO's default) divides by the std of the whole batch, False by each
    group's own std. Stds are population stds (ddof=0), like Flow-GRPO's ``np.std``. A group with a
    single image gets advantage 0; with ``global_std=False`` a group whose rewards are all equal
    does too (0 / eps). ``clip=None`` disables clipping.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    r = rewards.detach().to(torch.float64)
    idx = _group_index(groups, n).to(r.device)
    n_groups = int(idx.max().item()) + 1 if n else 0
    counts = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, idx, torch.ones_like(r))
    sums = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, idx, r)
    centered = r - (sums / counts)[idx]
    if global_std:
        std = r.std(correction=0)
    else:
        sq = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, idx, centered**2)
        std = (sq / counts).sqrt()[idx]
    adv = centered / (std + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(torch.float32)


def ppo_clipped_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise (scalar), and its stats.

    ratio = exp(log_prob - old_log_prob); loss = mean(max(-A*ratio, -A*clamp(ratio, 1-c, 1+c))).
    Stats: ``clip_frac`` = fraction with |ratio - 1| > c, ``approx_kl`` = 1/2 mean((log_prob -
    old_log_prob)^2) (a second-order estimate of KL(old || new)), ``ratio_mean``.
    All inputs are [B]; ``old_log_prob`` and ``advantages`` carry no gradient.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"shape mismatch: log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    logp = log_prob.float()
    diff = logp - old_log_prob.detach().float().to(logp.device)
    adv = advantages.detach().float().to(logp.device)
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (diff**2).mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, stats


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    *,
    kl: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective: PPO-clipped policy loss + beta * mean(kl).

    ``kl`` is the per-sample KL to the reference model ([B], ``sde.kl_to_reference``); it is needed
    when beta > 0 and logged whenever given. Stats: those of ``ppo_clipped_loss`` plus
    ``policy_loss`` and, when ``kl`` is given, ``kl`` (its mean); "kl" is absent rather than a
    misleading 0 when the reference was not run.
    """
    policy_loss, stats = ppo_clipped_loss(log_prob, old_log_prob, advantages, clip_range)
    stats["policy_loss"] = policy_loss.detach()
    loss = policy_loss
    if kl is not None:
        kl_mean = kl.float().mean()
        stats["kl"] = kl_mean.detach()
        if beta:
            loss = loss + beta * kl_mean
    elif beta:
        raise ValueError("grpo_loss: beta > 0 needs kl")
    return loss, stats
