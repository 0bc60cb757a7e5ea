"""Fused DINO patch scoring: gather CLS + K sampled patch tokens, run the head, reduce per image.

The head is ``nn.Sequential(Linear(D, H), GELU() [exact, erf], Linear(H, 1))``; for every image b

    cls_logit[b]   = head(tokens[b, 0])
    patch_logit[b] = mean_k head(tokens[b, 1 + patch_index[b, k]])
    reward[b]      = cls_weight * cls_logit[b] + (1 - cls_weight) * patch_logit[b]

(``advgrpo.reward_server.models.dino.head_scores`` with the patch logits averaged).

Layout of the work. The B images x R = 1 + K scored rows are flattened into M = B * R *rows*
(row r is image r // R, slot r % R; slot 0 is CLS, slot j > 0 is patch ``patch_index[b, j - 1]``).

Forward (``_fwd_kernel``), grid = cdiv(M, BLOCK_M): one program per block of BLOCK_M rows (a
block may hold several images, or part of one). It gathers its rows' token addresses from
``patch_index`` in the kernel, and for each H tile accumulates z = x @ W1^T over D tiles with
``tl.dot`` (nothing gathered is written back: no [B, K, D] copy, no [B, K, H] hidden in global
memory), applies bias + exact GELU, and folds the tile into the row logit with w2. Then

* score mode: rows are summed per image in registers (a one-hot [BLOCK_M, NB] segment sum over
  the at most NB images a block touches). The CLS logit has exactly one writer (plain store); the
  patch mean and the reward are ``atomic_add``-ed into zeroed outputs. An image spans at most two
  blocks when K <= BLOCK_M, and two fp32 additions onto 0 commute, so the result is bitwise
  deterministic then (always so in the tests; for K > BLOCK_M the order of 3+ adds can vary).
* hinge mode (``advgrpo.kernels.hinge_loss``): each row's hinge term relu(1 - t_b * logit) is weighted
  (½/n_group for CLS, patch_loss_weight·½/(n_group·K) for patches) and summed into one partial
  per program (summed on the host side by torch: deterministic); d loss / d logit for every row
  is written to a small [M] fp32 buffer for the backward.

Backward (``_bwd_kernel``), given g = d loss / d row-logit ([M] fp32, tiny):
recompute z for an H tile, then

    dw2 += sum_r g_r gelu(z_r)      dz = g_r w2 gelu'(z_r)      db1 += sum_r dz_r
    dW1[h_tile, :] += dz^T @ x      db2 = sum_r g_r (done by torch)

grid = (cdiv(H, BLOCK_H), SPLIT): program (h, s) owns the H tile h and the row blocks
s, s + SPLIT, ...; it accumulates db1/dw2 in registers and dW1 into its *own* fp32 partial slice
[s, h_tile, :] (read-add-write, no atomics), and the SPLIT partials are summed by torch. So the
backward is deterministic, and on a GPU SPLIT is chosen to fill the SMs.

Launch configuration (no autotuning). Interpreter: ~10 ms per program instance, so the blocks
are as large as the problem (BLOCK_M up to 512 rows, BLOCK_H / BLOCK_D covering H and D): the
test shapes run as one forward and one backward program. GPU: BLOCK_M = BLOCK_H = 64, BLOCK_D =
64 (16-bit tokens) or 32 (fp32), 8 warps; these compile for sm_90 without register spills
(checked offline). Known limit: the forward runs cdiv(B·(1+K), 64) programs, so B = 16, K = 64
fills only 17 SMs; splitting H across programs (partial logits) would be the next step there.

Precision: tokens are loaded in their dtype and converted to fp32 for all elementwise math;
the outputs are fp32. Dots accumulate in fp32. In the interpreter every dot is fp32 (numpy has
no bf16 arithmetic). On a GPU: fp32 tokens use 3xTF32 dots (``tf32x3``: tensor cores, close to
fp32 accuracy); fp16/bf16 tokens use 16-bit tensor-core dots for z (W1 rounded to the tokens'
dtype in the kernel) and, with bf16, for dW1 too (fp16's range would flush the small gradients,
so fp16 uses tf32x3 there). The GPU precision paths are not run by the CPU tests (they compile
them for sm_90 offline); ``bench/kernels.py`` compares against the reference before it times.

Strides: tokens, patch_index and w1 are addressed through their strides (no copies); b1, w2,
b2 are flattened with ``.contiguous()`` (H floats). Indices must lie in 0..N-1: checked on the
host for CPU tensors; on CUDA with ``torch._assert_async`` (no synchronisation).

Interpreted or compiled: the kernels are plain functions here, wrapped on first use by
``_kernels`` in the mode Triton's own library was built in (``interpreter_active``). Triton
decides that once per process, when ``triton.language`` is first imported (its ``tl.sum``,
``tl.zeros``, ... are ``@triton.jit`` functions decorated then), so TRITON_INTERPRET=1 has to be
in the environment before the first ``import triton``; see ``advgrpo/kernels/__init__.py``.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

try:  # Triton is optional: the reference path (and CPU deployments) work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = [
    "PatchScoreFunction",
    "check_inputs",
    "interpreter_active",
    "patch_score_reference",
    "patch_score_triton",
    "row_logits_batched",
    "row_logits_reference",
    "triton_mode",
]

_TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels. Plain functions: ``_kernels`` wraps them (jit or interpreter) on first use.
# ``from __future__ import annotations`` keeps ``tl.constexpr`` a string, which Triton accepts,
# so this module imports even without triton. Constants are literals (globals must be constexpr).


def _fwd_kernel(
    tok_ptr,
    idx_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    cls_ptr,
    patch_ptr,
    reward_ptr,  # score mode: [B] fp32 (patch/reward zeroed)
    wimg_ptr,
    tgt_ptr,
    grow_ptr,
    part_ptr,  # hinge mode: [B], [B], [M], [n_programs] fp32
    M,
    R,
    D,
    H,
    stride_tb,
    stride_tt,
    stride_td,
    stride_ib,
    stride_ik,
    stride_wh,
    stride_wd,
    cls_weight,
    inv_k,
    patch_loss_weight,
    HINGE: tl.constexpr,
    LOWP: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NB: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < M
    img = rows // R
    slot = rows - img * R
    is_cls = valid & (slot == 0)
    is_patch = valid & (slot > 0)
    img64 = img.to(tl.int64)
    pj = tl.load(idx_ptr + img64 * stride_ib + (slot - 1).to(tl.int64) * stride_ik, mask=is_patch, other=0)
    tok = tl.where(is_patch, pj.to(tl.int64) + 1, 0)
    row_off = img64 * stride_tb + tok * stride_tt  # [BLOCK_M] int64 element offsets

    offs_h0 = tl.arange(0, BLOCK_H)
    offs_d0 = tl.arange(0, BLOCK_D)
    logit = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + offs_h0
        mask_h = offs_h < H
        z = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            mask_d = offs_d < D
            x = tl.load(
                tok_ptr + row_off[:, None] + offs_d[None, :] * stride_td,
                mask=valid[:, None] & mask_d[None, :],
                other=0.0,
            )
            w = tl.load(
                w1_ptr + offs_h[:, None] * stride_wh + offs_d[None, :] * stride_wd,
                mask=mask_h[:, None] & mask_d[None, :],
                other=0.0,
            )
            if LOWP:
                z = tl.dot(x, tl.trans(w.to(x.dtype)), z)
            else:
                z = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), z, input_precision=PREC)
        b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        w2 = tl.load(w2_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        z = z + b1[None, :]
        a = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # exact GELU
        logit += tl.sum(a * w2[None, :], axis=1)
    logit += tl.load(b2_ptr).to(tl.float32)

    if HINGE:
        t = tl.load(tgt_ptr + img, mask=valid, other=0.0)
        wi = tl.load(wimg_ptr + img, mask=valid, other=0.0)
        w_row = tl.where(is_cls, wi, wi * (patch_loss_weight * inv_k))
        margin = 1.0 - t * logit
        active = valid & (margin > 0.0)  # relu'(0) = 0, as in torch
        tl.store(part_ptr + pid, tl.sum(tl.where(active, w_row * margin, 0.0), axis=0))
        tl.store(grow_ptr + rows, tl.where(active, -w_row * t, 0.0), mask=valid)
    else:
        # Per-image segment sums over the <= NB images this block touches.
        first = (pid * BLOCK_M) // R
        slots = tl.arange(0, NB)
        onehot = ((img - first)[:, None] == slots[None, :]) & valid[:, None]  # [BLOCK_M, NB]
        cls_v = tl.where(is_cls, logit, 0.0)
        patch_v = tl.where(is_patch, logit * inv_k, 0.0)
        rew_v = cls_weight * cls_v + (1.0 - cls_weight) * patch_v
        cls_sum = tl.sum(tl.where(onehot, cls_v[:, None], 0.0), axis=0)
        patch_sum = tl.sum(tl.where(onehot, patch_v[:, None], 0.0), axis=0)
        rew_sum = tl.sum(tl.where(onehot, rew_v[:, None], 0.0), axis=0)
        has_cls = tl.sum((onehot & is_cls[:, None]).to(tl.int32), axis=0) > 0
        has_patch = tl.sum((onehot & is_patch[:, None]).to(tl.int32), axis=0) > 0
        out = first + slots
        tl.store(cls_ptr + out, cls_sum, mask=has_cls)  # the CLS row lives in exactly one block
        tl.atomic_add(patch_ptr + out, patch_sum, mask=has_patch)
        tl.atomic_add(reward_ptr + out, rew_sum, mask=has_cls | has_patch)


def _bwd_kernel(
    tok_ptr,
    idx_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    g_ptr,
    dw1_ptr,
    db1_ptr,
    dw2_ptr,  # fp32 partials [SPLIT, H, D], [SPLIT, H], [SPLIT, H], zeroed
    M,
    R,
    D,
    H,
    n_blocks,
    stride_tb,
    stride_tt,
    stride_td,
    stride_ib,
    stride_ik,
    stride_wh,
    stride_wd,
    LOWP: tl.constexpr,
    LOWP_DW: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_d0 = tl.arange(0, BLOCK_D)
    b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    acc_db1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_dw2 = tl.zeros([BLOCK_H], dtype=tl.float32)
    dw1_base = dw1_ptr + pid_s.to(tl.int64) * H * D

    for blk in range(pid_s, n_blocks, n_split):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < M
        img = rows // R
        slot = rows - img * R
        is_patch = valid & (slot > 0)
        img64 = img.to(tl.int64)
        pj = tl.load(idx_ptr + img64 * stride_ib + (slot - 1).to(tl.int64) * stride_ik, mask=is_patch, other=0)
        tok = tl.where(is_patch, pj.to(tl.int64) + 1, 0)
        row_off = img64 * stride_tb + tok * stride_tt
        g = tl.load(g_ptr + rows, mask=valid, other=0.0)

        # Recompute the hidden pre-activation for this H tile.
        z = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            mask_d = offs_d < D
            x = tl.load(
                tok_ptr + row_off[:, None] + offs_d[None, :] * stride_td,
                mask=valid[:, None] & mask_d[None, :],
                other=0.0,
            )
            w = tl.load(
                w1_ptr + offs_h[:, None] * stride_wh + offs_d[None, :] * stride_wd,
                mask=mask_h[:, None] & mask_d[None, :],
                other=0.0,
            )
            if LOWP:
                z = tl.dot(x, tl.trans(w.to(x.dtype)), z)
            else:
                z = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), z, input_precision=PREC)
        z = z + b1[None, :]
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        acc_dw2 += tl.sum(g[:, None] * (z * cdf), axis=0)
        dz = g[:, None] * w2[None, :] * (cdf + z * pdf)  # [BLOCK_M, BLOCK_H]; 0 on masked rows
        acc_db1 += tl.sum(dz, axis=0)

        # dW1[h_tile, :] += dz^T @ x, into this program's own partial slice.
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            mask_d = offs_d < D
            x = tl.load(
                tok_ptr + row_off[:, None] + offs_d[None, :] * stride_td,
                mask=valid[:, None] & mask_d[None, :],
                other=0.0,
            )
            if LOWP_DW:
                part = tl.dot(tl.trans(dz.to(x.dtype)), x)
            else:
                part = tl.dot(tl.trans(dz), x.to(tl.float32), input_precision=PREC)
            ptrs = dw1_base + offs_h[:, None] * D + offs_d[None, :]
            mask = mask_h[:, None] & mask_d[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + part, mask=mask)

    tl.store(db1_ptr + pid_s * H + offs_h, acc_db1, mask=mask_h)
    tl.store(dw2_ptr + pid_s * H + offs_h, acc_dw2, mask=mask_h)


_KERNELS: dict[bool, types.SimpleNamespace] = {}


def interpreter_active() -> bool:
    """Whether Triton runs in its interpreter in this process.

    Triton fixes this when ``triton.language`` is first imported: its own library functions
    (``tl.zeros``, ``tl.sum``, ...) are ``@triton.jit`` functions decorated then, and a kernel can
    only run in the mode they were built for. So TRITON_INTERPRET=1 must be in the environment
    before anything imports triton (diffusers and peft do); setting it later changes nothing here.
    """
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernels, wrapped on first use in the mode Triton's own library was built in."""
    if triton is None:
        raise RuntimeError("the Triton backend was requested but triton is not installed (pip install triton)")
    if interpret != interpreter_active():
        raise RuntimeError(
            f"Triton kernels requested with interpret={interpret} in a process where the interpreter "
            f"is {'on' if interpreter_active() else 'off'}"
        )
    ns = _KERNELS.get(interpret)
    if ns is None:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
        ns = types.SimpleNamespace(fwd=wrap(_fwd_kernel), bwd=wrap(_bwd_kernel))
        _KERNELS[interpret] = ns
    return ns


def triton_mode(tensor: torch.Tensor) -> bool:
    """``interpret`` for running the Triton kernels on ``tensor``'s device; raises where they cannot run."""
    if triton is None:
        raise RuntimeError("the Triton backend was requested but triton is not installed (pip install triton)")
    if interpreter_active():
        return True  # Triton's rule: with the interpreter on, every launch is interpreted (CUDA tensors too)
    if tensor.is_cuda:
        return False
    raise RuntimeError(
        f"the Triton kernels cannot run on {tensor.device} tensors here: on a CPU they run only in Triton's "
        "interpreter, which needs TRITON_INTERPRET=1 in the environment before triton is first imported "
        "(it was imported without it). Use backend='torch' or start the process with TRITON_INTERPRET=1."
    )


# --------------------------------------------------------------------------------------------
# Launch configuration


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(n)))


# Test/tuning hook: ``{"fwd": {...}, "bwd": {...}, "split": int}`` replaces the computed launch
# configuration (tests use it to run the GPU-style tiling, with many blocks, in the interpreter).
CONFIG_OVERRIDE: dict | None = None
# FMA contraction on, explicitly (Triton 3.9's default, which 3.10 changes; unset, it warns).
_GPU_OPTIONS = dict(enable_fp_fusion=True)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")  # the non-constexpr config keys


def _fwd_config(m: int, d: int, h: int, dtype: torch.dtype, interpret: bool) -> dict:
    if CONFIG_OVERRIDE and "fwd" in CONFIG_OVERRIDE:
        return dict(CONFIG_OVERRIDE["fwd"])
    if interpret:
        # ~10 ms per program instance in the interpreter: few, large blocks (numpy does the work).
        return dict(BLOCK_M=_block(m, 16, 512), BLOCK_H=_block(h, 16, 512), BLOCK_D=_block(d, 16, 1024))
    # GPU, one config, no autotuning. Compiled offline for sm_90 (tests/test_kernels.py): no
    # register spills at these tiles with 8 warps (fp32 uses tf32x3 dots: the wider operands
    # need the smaller D tile).
    bd = 64 if dtype != torch.float32 else 32
    return dict(
        BLOCK_M=64,
        BLOCK_H=_block(h, 16, 64),
        BLOCK_D=_block(d, 16, bd),
        num_warps=8,
        num_stages=3 if dtype != torch.float32 else 2,
        **_GPU_OPTIONS,
    )


def _bwd_tiles(d: int, h: int, dtype: torch.dtype) -> dict:
    """GPU tiles of the backward (compiled offline for sm_90 without spills, like the forward's)."""
    return dict(
        BLOCK_M=64, BLOCK_H=_block(h, 16, 64), BLOCK_D=_block(d, 16, 32), num_warps=8, num_stages=2, **_GPU_OPTIONS
    )


def _bwd_config(m: int, d: int, h: int, dtype: torch.dtype, device: torch.device, interpret: bool) -> tuple[dict, int]:
    if CONFIG_OVERRIDE and "bwd" in CONFIG_OVERRIDE:
        return dict(CONFIG_OVERRIDE["bwd"]), int(CONFIG_OVERRIDE.get("split", 1))
    if interpret:
        cfg = dict(BLOCK_M=_block(m, 16, 512), BLOCK_H=_block(h, 16, 512), BLOCK_D=_block(d, 16, 1024))
        return cfg, 1
    cfg = _bwd_tiles(d, h, dtype)
    n_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    n_h = triton.cdiv(h, cfg["BLOCK_H"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # Enough (h, split) programs to cover the SMs twice; at most 16 fp32 dW1 partials.
    split = max(1, min(n_blocks, 16, triton.cdiv(2 * sms, n_h)))
    return cfg, split


def _precision(dtype: torch.dtype, interpret: bool) -> dict:
    """Dot precision constexprs. Interpreter: fp32 everywhere (numpy has no bf16 arithmetic).
    GPU: 16-bit tokens -> 16-bit tensor-core dots for z (W1 rounded to the token dtype); dW1 with
    bf16 in bf16 (fp16's range would flush the small gradients), else fp32 as 3xTF32 ("tf32x3",
    near-fp32 accuracy on tensor cores)."""
    if interpret:
        return dict(LOWP=False, PREC="ieee")
    return dict(LOWP=dtype in (torch.float16, torch.bfloat16), PREC="tf32x3")


def _bwd_lowp_dw(dtype: torch.dtype, interpret: bool) -> bool:
    return dtype == torch.bfloat16 and not interpret


# --------------------------------------------------------------------------------------------
# Host side


def check_inputs(tokens, patch_index, w1, b1, w2, b2) -> tuple[int, int, int, int, int]:
    """Validates shapes, dtypes, devices (and, on the CPU, index range). Returns B, N, K, D, H."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, 1+N, D], got {tuple(tokens.shape)}")
    if tokens.dtype not in _TOKEN_DTYPES:
        raise TypeError(f"tokens must be float32, float16 or bfloat16, got {tokens.dtype}")
    b, t, d = tokens.shape
    n = t - 1
    if patch_index.dim() != 2 or patch_index.shape[0] != b:
        raise ValueError(f"patch_index must be [B={b}, K], got {tuple(patch_index.shape)}")
    if patch_index.dtype.is_floating_point or patch_index.dtype.is_complex or patch_index.dtype == torch.bool:
        raise TypeError(f"patch_index must be an integer tensor, got {patch_index.dtype}")
    k = patch_index.shape[1]
    if k < 1:
        raise ValueError("patch_index must select at least one patch (K >= 1)")
    if w1.dim() != 2 or w1.shape[1] != d:
        raise ValueError(f"w1 must be [H, D={d}], got {tuple(w1.shape)}")
    h = w1.shape[0]
    if b1.numel() != h or w2.numel() != h or b2.numel() != 1:
        raise ValueError(
            f"expected b1 [H={h}], w2 [1, {h}], b2 [1]; got {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}"
        )
    devices = {x.device for x in (tokens, patch_index, w1, b1, w2, b2)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if b and k:
        if n < 1:
            raise ValueError("tokens hold no patch tokens (N = 0)")
        if patch_index.is_cuda:
            torch._assert_async(((patch_index >= 0) & (patch_index < n)).all(), "patch_index out of range")
        elif patch_index.device.type == "cpu":
            lo, hi = int(patch_index.min()), int(patch_index.max())
            if lo < 0 or hi >= n:
                raise IndexError(f"patch_index values must lie in 0..{n - 1}, got {lo}..{hi}")
    return b, n, k, d, h


def _index(patch_index: torch.Tensor) -> torch.Tensor:
    """int32/int64 indices are read in place (any strides); other integer types become int64."""
    return patch_index if patch_index.dtype in (torch.int32, torch.int64) else patch_index.long()


def _flat(p: torch.Tensor) -> torch.Tensor:
    return p.reshape(-1).contiguous()


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1, ...)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward_rows(tokens, patch_index, w1, b1, w2, b2, interpret: bool, *, cls_weight: float = 0.7, hinge=None):
    """Launches the forward kernel. Score mode returns (cls, patch, reward); hinge mode
    (``hinge=(target_f32, wimg, patch_loss_weight)``) returns (loss, g_rows)."""
    b, t, d = tokens.shape
    k = patch_index.shape[1]
    h = w1.shape[0]
    r = k + 1
    m = b * r
    dev = tokens.device
    idx = _index(patch_index)
    cfg = _fwd_config(m, d, h, tokens.dtype, interpret)
    n_prog = triton.cdiv(m, cfg["BLOCK_M"])
    nb = _next_pow2((cfg["BLOCK_M"] - 1) // r + 2)
    f32 = dict(dtype=torch.float32, device=dev)
    if hinge is None:
        cls = torch.empty(b, **f32)
        patch = torch.zeros(b, **f32)
        reward = torch.zeros(b, **f32)
        tgt = wimg = grow = part = cls  # unused in this mode
        plw = 0.0
    else:
        tgt, wimg, plw = hinge
        grow = torch.empty(m, **f32)
        part = torch.empty(n_prog, **f32)
        cls = patch = reward = part  # unused in this mode
    with _device_guard(tokens):
        _kernels(interpret).fwd[(n_prog,)](
            tokens,
            idx,
            w1,
            _flat(b1),
            _flat(w2),
            _flat(b2),
            cls,
            patch,
            reward,
            wimg,
            tgt,
            grow,
            part,
            m,
            r,
            d,
            h,
            tokens.stride(0),
            tokens.stride(1),
            tokens.stride(2),
            idx.stride(0),
            idx.stride(1),
            w1.stride(0),
            w1.stride(1),
            float(cls_weight),
            1.0 / k,
            float(plw),
            HINGE=hinge is not None,
            NB=nb,
            **_precision(tokens.dtype, interpret),
            **cfg,
        )
    if hinge is None:
        return cls, patch, reward
    return part.sum(), grow


def backward_weights(tokens, patch_index, w1, b1, w2, g_rows: torch.Tensor, interpret: bool):
    """dW1 [H, D], db1 [H], dw2 [H], db2 [] (fp32) for d loss / d row-logit ``g_rows`` [B*(1+K)]."""
    b, t, d = tokens.shape
    k = patch_index.shape[1]
    h = w1.shape[0]
    r = k + 1
    m = b * r
    idx = _index(patch_index)
    g_rows = g_rows.to(torch.float32).contiguous()
    cfg, split = _bwd_config(m, d, h, tokens.dtype, tokens.device, interpret)
    n_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    f32 = dict(dtype=torch.float32, device=tokens.device)
    dw1 = torch.zeros(split, h, d, **f32)
    db1 = torch.empty(split, h, **f32)
    dw2 = torch.empty(split, h, **f32)
    grid = (triton.cdiv(h, cfg["BLOCK_H"]), split)
    with _device_guard(tokens):
        _kernels(interpret).bwd[grid](
            tokens,
            idx,
            w1,
            _flat(b1),
            _flat(w2),
            g_rows,
            dw1,
            db1,
            dw2,
            m,
            r,
            d,
            h,
            n_blocks,
            tokens.stride(0),
            tokens.stride(1),
            tokens.stride(2),
            idx.stride(0),
            idx.stride(1),
            w1.stride(0),
            w1.stride(1),
            LOWP_DW=_bwd_lowp_dw(tokens.dtype, interpret),
            **_precision(tokens.dtype, interpret),
            **cfg,
        )
    if split == 1:
        return dw1[0], db1[0], dw2[0], g_rows.sum()
    return dw1.sum(0), db1.sum(0), dw2.sum(0), g_rows.sum()


def _weight_grads(ctx, g_rows: torch.Tensor):
    """Gradients for (w1, b1, w2, b2) in their shapes and dtypes (None where not needed)."""
    tokens, patch_index, w1, b1, w2, b2 = ctx.saved_tensors
    needs = ctx.needs_input_grad[ctx.weight_slot : ctx.weight_slot + 4]
    if not any(needs):
        return None, None, None, None
    dw1, db1, dw2, db2 = backward_weights(tokens, patch_index, w1, b1, w2, g_rows, ctx.interpret)
    grads = (dw1, db1, dw2, db2)
    params = (w1, b1, w2, b2)
    return tuple(
        gr.reshape(p.shape).to(p.dtype) if need else None for gr, p, need in zip(grads, params, needs, strict=True)
    )


def _refuse_token_grad(tokens: torch.Tensor) -> None:
    if tokens.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "the Triton patch kernels give gradients for the head only; tokens (frozen backbone features) "
            "must not require grad: pass tokens.detach() or use backend='torch'"
        )


class PatchScoreFunction(torch.autograd.Function):
    """(tokens, patch_index, w1, b1, w2, b2, cls_weight, interpret) -> (cls, patch, reward) [B] fp32."""

    @staticmethod
    def forward(ctx, tokens, patch_index, w1, b1, w2, b2, cls_weight, interpret):
        cls, patch, reward = forward_rows(tokens, patch_index, w1, b1, w2, b2, interpret, cls_weight=cls_weight)
        ctx.save_for_backward(tokens, patch_index, w1, b1, w2, b2)
        ctx.cls_weight = float(cls_weight)
        ctx.interpret = interpret
        ctx.weight_slot = 2
        return cls, patch, reward

    @staticmethod
    def backward(ctx, g_cls, g_patch, g_reward):
        k = ctx.saved_tensors[1].shape[1]
        cw = ctx.cls_weight
        # d out / d row-logit: CLS rows feed cls and reward; patch rows feed patch and reward, 1/K each.
        g_rows = torch.empty(g_cls.shape[0], k + 1, dtype=torch.float32, device=g_cls.device)
        g_rows[:, 0] = g_cls + cw * g_reward
        g_rows[:, 1:] = ((g_patch + (1.0 - cw) * g_reward) / k)[:, None]
        return (None, None, *_weight_grads(ctx, g_rows.reshape(-1)), None, None)


def patch_score_triton(tokens, patch_index, w1, b1, w2, b2, cls_weight: float = 0.7):
    """The Triton path (interpreted where Triton's interpreter is on). Inputs are validated by the caller."""
    interpret = triton_mode(tokens)
    _refuse_token_grad(tokens)
    if tokens.shape[0] == 0:
        z = torch.zeros(0, dtype=torch.float32, device=tokens.device)
        return z, z.clone(), z.clone()
    return PatchScoreFunction.apply(tokens, patch_index, w1, b1, w2, b2, float(cls_weight), bool(interpret))


# --------------------------------------------------------------------------------------------
# PyTorch reference


def _picked_rows(tokens, patch_index) -> torch.Tensor:
    """CLS (slot 0) and the sampled patch tokens of each image: [B, 1+K, D] fp32, one gather."""
    b, _, d = tokens.shape
    k = patch_index.shape[1]
    rows = F.pad(patch_index.long() + 1, (1, 0))  # token ids: CLS is 0, patch j is 1 + j
    return tokens.gather(1, rows.unsqueeze(-1).expand(b, 1 + k, d)).to(torch.float32)


# Bytes: torch's CPU allocator (c10's gAlignment), a cache line, an AVX-512 register.
_ALIGNMENT = 64


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` when it is contiguous and starts on a 64-byte boundary, else a copy that does."""
    if x.is_contiguous() and x.data_ptr() % _ALIGNMENT == 0:
        return x
    size = x.element_size()
    buf = torch.empty(x.numel() + _ALIGNMENT // size, dtype=x.dtype, device=x.device)
    start = (-buf.data_ptr() % _ALIGNMENT) // size  # the allocator aligns to the element size at least
    return buf[start : start + x.numel()].view(x.shape).copy_(x)


def row_logits_reference(tokens, patch_index, w1, b1, w2, b2) -> torch.Tensor:
    """head(x) for CLS and the sampled patches: [B, 1+K] fp32 (slot 0 = CLS). Same math as
    ``advgrpo.reward_server.models.dino.head_scores``: gather, Linear, exact GELU, Linear, in fp32.

    The scoring path: an image's logits must not depend on the batch it came in (the batcher
    merges requests), on any CPU and with any number of threads. MKL's SGEMM picks its kernel,
    and with it the summation order, by the operands' shape *and* memory alignment (measured on
    an AMD EPYC, Zen 4, MKL 2024.2): in one [M, D] product over all B(1+K) rows, a row's bits
    changed with M (for M up to 11); and a fixed [1+K, D] product gave other bits when its first
    row did not start on a 16-byte boundary (with 1 thread for D = 21 and 3 rows, with 2 or
    more for D = 33 and 6 rows too), as image b's rows in one [B, 1+K, D] tensor, at byte
    b(1+K)D·4, do not for such D. MKL's conditional numerical reproducibility mode
    (``MKL_CBWR``) removed that dependence, so it is MKL's. So the first layer runs per image,
    always as one [1+K, D] product whose operand starts on a 64-byte boundary (``_aligned``: a
    copy only where the image's rows do not), with the same weights: one shape, one alignment,
    so one code path and one summation order for every image in every batch, for a given
    number of threads.

    The rest is elementwise (GELU, the product with w2, + b2: each element computed alone, the
    same wherever it lies) or reduces each row over the hidden units on its own (``sum(-1)``, in
    an order their number sets), and the patch mean in ``patch_score_reference`` likewise over
    K: checked bit for bit on that machine for sub-batches of 1..23 of 24 images at the start,
    second and last position, H in {1, 7, 16, 17, 33, 64, 100, 512}, 1+K in {2, 3, 6, 9, 17,
    65}, with 1, 2 and 5 threads."""
    picked = _picked_rows(tokens, patch_index)
    if picked.shape[0] == 0:
        return picked.new_zeros(0, picked.shape[1])
    w1, b1 = _aligned(w1.float()), b1.float()
    first = torch.stack([F.linear(_aligned(rows_of_one), w1, b1) for rows_of_one in picked])
    hidden = F.gelu(first, approximate="none")
    return (hidden * w2.float().reshape(-1)).sum(-1) + b2.float().reshape(())


def row_logits_batched(tokens, patch_index, w1, b1, w2, b2) -> torch.Tensor:
    """``row_logits_reference`` as two products over all B(1+K) rows: faster, and what training
    uses (a loss over one given batch); an image's logits may differ in their last bits with the
    batch around it, so scoring never uses this."""
    picked = _picked_rows(tokens, patch_index)
    hidden = F.gelu(F.linear(picked, w1.float(), b1.float()), approximate="none")
    return F.linear(hidden, w2.float().reshape(1, -1), b2.float().reshape(1)).squeeze(-1)


def patch_score_reference(tokens, patch_index, w1, b1, w2, b2, cls_weight: float = 0.7, batch_invariant: bool = True):
    """The PyTorch reference: (cls_logit, patch_logit = mean over K, reward), each [B] fp32.
    ``batch_invariant=False``: through ``row_logits_batched`` (faster; not for scoring)."""
    rows = row_logits_reference if batch_invariant else row_logits_batched
    logits = rows(tokens, patch_index, w1, b1, w2, b2)
    cls_logit, patch_logit = logits[:, 0], logits[:, 1:].mean(dim=1)
    return cls_logit, patch_logit, cls_weight * cls_logit + (1.0 - cls_weight) * patch_logit
