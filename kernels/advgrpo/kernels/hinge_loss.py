"""Fused discriminator hinge loss over CLS + K sampled patch logits (training the DINO head).

For target[b] = +1 (reference) or -1 (generation), with the head's row logits
cls_b = head(tokens[b, 0]) and p_bk = head(tokens[b, 1 + patch_index[b, k]]):

    loss = ½ (mean_{b ref} relu(1 - cls_b) + mean_{b gen} relu(1 + cls_b))
         + patch_loss_weight · ½ (mean_{(b,k) ref} relu(1 - p_bk) + mean_{(b,k) gen} relu(1 + p_bk))

which is ``advgrpo.reward_server.models.dino.discriminator_loss(ref_cls, ref_patch, gen_cls, gen_patch, w)``
on the head's outputs: each mean is over its own group (n_ref or n_gen images, n·K patches), so the
two groups weigh the same whatever their sizes. Both groups must be non-empty (the reference's
mean over an empty group is NaN; this op refuses instead).

The forward is ``advgrpo.kernels.patch_score``'s forward kernel in hinge mode: each row's hinge term
carries a weight (½/n_group for CLS, patch_loss_weight·½/(n_group·K) for patches, from a per-image
weight computed by torch), so the loss is one weighted sum, reduced to one partial per program
(summed by torch: deterministic). The same pass writes d loss / d row-logit
(-weight·t_b where the hinge is active, else 0; relu'(0) = 0 as in torch) to a [B·(1+K)] fp32
buffer: the backward scales it by the incoming gradient and runs the shared weight-gradient
kernel (recomputing the hidden), as Liger's fused losses do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advgrpo.kernels.patch_score import _refuse_token_grad, _weight_grads, forward_rows, row_logits_batched, triton_mode

__all__ = ["HingeLossFunction", "check_target", "patch_hinge_loss_reference", "patch_hinge_loss_triton"]


def check_target(target, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """target as fp32 [B] on ``device`` (every value +1 or -1, at least one of each), and the
    per-image weight ½/|its group| that makes the loss ½(mean over references + mean over
    generations)."""
    t = torch.as_tensor(target, device=device).to(torch.float32).reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"target must hold one value per image ({batch}), got {t.numel()}")
    is_ref = t == 1
    n_ref, n_gen = torch.stack([is_ref.sum(), (t == -1).sum()]).tolist()  # one device sync
    if n_ref + n_gen != batch:
        raise ValueError("target values must be +1 (reference) or -1 (generation)")
    if n_ref == 0 or n_gen == 0:
        raise ValueError(f"the hinge loss needs references and generations, got {n_ref} and {n_gen}")
    return t, torch.where(is_ref, 0.5 / n_ref, 0.5 / n_gen)


class HingeLossFunction(torch.autograd.Function):
    """(tokens, patch_index, target, wimg, w1, b1, w2, b2, patch_loss_weight, interpret) -> loss []."""

    @staticmethod
    def forward(ctx, tokens, patch_index, target, wimg, w1, b1, w2, b2, patch_loss_weight, interpret):
        loss, g_rows = forward_rows(
            tokens, patch_index, w1, b1, w2, b2, interpret, hinge=(target, wimg, float(patch_loss_weight))
        )
        ctx.save_for_backward(tokens, patch_index, w1, b1, w2, b2)
        ctx.g_rows = g_rows  # d loss / d row-logit, [B*(1+K)] fp32; needs no grad itself
        ctx.interpret = interpret
        ctx.weight_slot = 4
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        return (None, None, None, None, *_weight_grads(ctx, ctx.g_rows * g_loss), None, None)


def patch_hinge_loss_triton(tokens, patch_index, target, w1, b1, w2, b2, patch_loss_weight: float = 0.3):
    """The Triton path. Inputs are validated by the caller; ``target`` by ``check_target``."""
    interpret = triton_mode(tokens)
    _refuse_token_grad(tokens)
    # Per-image weight ½/n_group (its CLS term; patches get patch_loss_weight/K of it in the kernel).
    t, wimg = check_target(target, tokens.shape[0], tokens.device)
    return HingeLossFunction.apply(
        tokens, patch_index, t, wimg, w1, b1, w2, b2, float(patch_loss_weight), bool(interpret)
    )


def patch_hinge_loss_reference(tokens, patch_index, target, w1, b1, w2, b2, patch_loss_weight: float = 0.3):
    """The PyTorch reference: the head on CLS + sampled patches, then the two hinge terms.

    ½(mean over references of relu(1 − D) + mean over generations of relu(1 + D)) for the CLS
    logits, plus ``patch_loss_weight`` × the same over every patch logit; written as one sum with
    the per-image weight ½/|group| (as the kernel does), which needs no boolean indexing: the
    hinge margins [B, 1+K] times the slot weights (1 for CLS, patch_loss_weight/K per patch)
    give each image's term, and the per-image weights sum them."""
    t, wimg = check_target(target, tokens.shape[0], tokens.device)
    logits = row_logits_batched(tokens, patch_index, w1, b1, w2, b2)  # [B, 1+K]
    k = logits.shape[1] - 1
    slot = torch.full((1 + k,), patch_loss_weight / k, dtype=torch.float32, device=logits.device)
    slot[0] = 1.0
    margins = F.relu(1.0 - t[:, None] * logits)
    return wimg @ (margins @ slot)
