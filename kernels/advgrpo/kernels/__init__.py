"""Triton kernels for the DINO discriminator's hot paths, each with its PyTorch reference.

    from advgrpo.kernels import patch_score, patch_hinge_loss

    cls_logit, patch_logit, reward = patch_score(tokens, patch_index, w1, b1, w2, b2, cls_weight=0.7)
    loss = patch_hinge_loss(tokens, patch_index, target, w1, b1, w2, b2, patch_loss_weight=0.3)

tokens [B, 1+N, D] (fp32/fp16/bf16, CLS at 0, any strides), patch_index [B, K] (integer, into
the N patches), the head ``Linear(D,H) -> GELU(erf) -> Linear(H,1)`` as w1 [H, D], b1 [H],
w2 [1, H], b2 [1]. Outputs are fp32; gradients flow to w1, b1, w2, b2 (tokens: frozen features,
no gradient). See ``patch_score.py`` and ``hinge_loss.py`` beside this file for the kernels.

Dispatch — one point, ``backend_for(tensor)``:

* a CUDA tensor -> ``"triton"`` (compiled kernels);
* a CPU tensor -> ``"torch"`` (the reference), unless TRITON_INTERPRET is set (1/true/yes/on),
  then ``"triton"``: the kernels in Triton's interpreter.

``backend="auto" | "triton" | "torch"`` on the public functions overrides it (tests,
benchmarks). There is no fallback: when Triton is selected and cannot run (not installed, or a
CPU tensor while the interpreter is off), the call raises.

TRITON_INTERPRET and processes. Triton builds its own language library (``tl.sum``, ``tl.zeros``,
...) as interpreted or compiled functions when ``triton.language`` is first imported, and a kernel
runs only in that mode. So the interpreter is a property of the whole process, fixed by the
environment at the first ``import triton`` (which diffusers and peft also trigger); setting the
variable later neither turns it on nor off. Our kernels follow that mode (wrapped lazily,
``patch_score.interpreter_active``). ``backend_for`` reads the variable at call time; if it says
Triton but the interpreter is off, the kernel call raises with that explanation.
``tests/test_kernels.py`` therefore runs its Triton cases in a child pytest process started with
TRITON_INTERPRET=1 instead of setting the variable in the shared test process, where it would
also route every other module's CPU scoring through the (slow) interpreter.
"""

from __future__ import annotations

import os

import torch

from advgrpo.kernels.hinge_loss import patch_hinge_loss_reference, patch_hinge_loss_triton
from advgrpo.kernels.patch_score import check_inputs, interpreter_active, patch_score_reference, patch_score_triton

__all__ = [
    "BACKENDS",
    "backend_for",
    "interpret_requested",
    "interpreter_active",
    "patch_hinge_loss",
    "patch_hinge_loss_reference",
    "patch_score",
    "patch_score_reference",
]

BACKENDS = ("auto", "triton", "torch")
_TRUE = {"1", "true", "yes", "on"}


def interpret_requested() -> bool:
    """TRITON_INTERPRET as Triton reads it (1/true/yes/on, any case), at call time."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def backend_for(tensor: torch.Tensor) -> str:
    """``"triton"`` for CUDA tensors, or anywhere when TRITON_INTERPRET is set; else ``"torch"``."""
    if tensor.is_cuda or interpret_requested():
        return "triton"
    return "torch"


def _resolve(backend: str, tensor: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend_for(tensor) if backend == "auto" else backend


def patch_score(
    tokens: torch.Tensor,
    patch_index: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    cls_weight: float = 0.7,
    *,
    backend: str = "auto",
    batch_invariant: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cls_logit, patch_logit, reward), each [B] fp32: the head on CLS, the mean of the head over
    the K sampled patches, and cls_weight·cls + (1 − cls_weight)·patch.

    ``batch_invariant``: each image's outputs are the same bit for bit in any batch (what scoring
    needs). False lets the torch backend run one product over all rows (faster; for figures about
    a whole batch). The Triton kernel works on each image's rows alone either way."""
    check_inputs(tokens, patch_index, w1, b1, w2, b2)
    if _resolve(backend, tokens) == "torch":
        return patch_score_reference(tokens, patch_index, w1, b1, w2, b2, cls_weight, batch_invariant)
    return patch_score_triton(tokens, patch_index, w1, b1, w2, b2, cls_weight)


def patch_hinge_loss(
    tokens: torch.Tensor,
    patch_index: torch.Tensor,
    target,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    patch_loss_weight: float = 0.3,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The discriminator hinge loss (a scalar): target[b] = +1 for references, −1 for generations;
    equals ``advgrpo.reward_server.models.dino.discriminator_loss`` on the head's CLS and patch logits."""
    check_inputs(tokens, patch_index, w1, b1, w2, b2)
    if _resolve(backend, tokens) == "torch":
        return patch_hinge_loss_reference(tokens, patch_index, target, w1, b1, w2, b2, patch_loss_weight)
    return patch_hinge_loss_triton(tokens, patch_index, target, w1, b1, w2, b2, patch_loss_weight)
