"""Triton patch-scoring and hinge-loss kernels vs their PyTorch references (and the DINO model's math).

How the Triton cases run without a GPU. Triton's interpreter is a property of the process: it is
chosen from TRITON_INTERPRET when ``triton.language`` is first imported, because Triton's own
``tl.sum``/``tl.zeros``/... are ``@triton.jit`` functions decorated at that moment (a kernel can
only run in the mode they were built in). Setting the variable at the top of this module would be
too late whenever an earlier module imported triton (diffusers and peft do), and it would leak
into every later test of the same pytest process (``backend_for`` would route all their CPU
scoring through the slow interpreter). So:

* in the ordinary test process, the reference/dispatch/validation tests run here, the kernels
  are compiled offline for an H100 (sm_90, no GPU needed) to catch GPU-only compile errors, and
  ``test_triton_cases_in_interpreter`` runs this same file in a child pytest process with
  TRITON_INTERPRET=1 set from the start;
* in that child (``interpreter_active()``), the ``@triton_case`` tests run the kernels in the
  interpreter (few, large program instances: ~10 ms each).

Running ``TRITON_INTERPRET=1 pytest tests/test_kernels.py`` runs the Triton cases directly.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advgrpo import kernels
from advgrpo.kernels import (
    backend_for,
    patch_hinge_loss,
    patch_hinge_loss_reference,
    patch_score,
    patch_score_reference,
)
from advgrpo.kernels.patch_score import interpreter_active
from advgrpo.reward_server.models.dino import (
    build_head,
    discriminator_loss,
    head_scores,
    mix_seed,
    sample_patch_index,
    transform_tokens,
)

REPO = Path(__file__).resolve().parents[1]
# The module, not the function: ``advgrpo.kernels.patch_score`` (the attribute) is the public function.
ps = importlib.import_module("advgrpo.kernels.patch_score")
INTERPRETED = interpreter_active()
CHILD_ENV = "ADVGRPO_KERNELS_CHILD"

triton_case = pytest.mark.skipif(
    not INTERPRETED, reason="Triton case: runs in the TRITON_INTERPRET=1 child (test_triton_cases_in_interpreter)"
)
parent_only = pytest.mark.skipif(INTERPRETED, reason="needs a process without Triton's interpreter")

# (B, N, K, D, H): K and D not powers of two, K = 1, K = N, a block-sized case.
SHAPES = [(3, 37, 5, 24, 20), (5, 16, 16, 32, 64), (2, 9, 1, 17, 33), (4, 12, 12, 40, 24)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Outputs are O(0.1..1). fp32: tight. fp16/bf16 *inputs*: both sides upcast the same values in the
# interpreter, so they agree far better than this; the slack is for the GPU's 16-bit dots.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def make_case(b, n, k, d, h, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = transform_tokens(torch.randn(b, 1 + n, d, generator=g), "l2") * 4.0  # O(1) entries
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)]) if b else torch.zeros(0, k).long()
    head = build_head(d, h, seed)
    return tokens.to(dtype), index, head


def weights(head):
    return [head[0].weight, head[0].bias, head[2].weight, head[2].bias]


def close(a, b, tol, what=""):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def score_and_grads(fn, tokens, index, head, cls_weight, upstream):
    ws = weights(head)
    out = fn(tokens, index, *ws, cls_weight)
    loss = sum((o * u).sum() for o, u in zip(out, upstream, strict=True))
    return [o.detach() for o in out], torch.autograd.grad(loss, ws)


def hinge_targets(b: int, n_ref: int) -> torch.Tensor:
    return torch.tensor([1.0] * n_ref + [-1.0] * (b - n_ref))[
        torch.randperm(b, generator=torch.Generator().manual_seed(b))
    ]


# --------------------------------------------------------------------------------------------
# References vs the DINO model's own math (any process)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls_weight", [0.7, 0.0, 1.0])
def test_reference_matches_dino_head_scores(shape, cls_weight):
    tokens, index, head = make_case(*shape)
    cls, patch, reward = head_scores(tokens, index, head, cls_weight)
    ref = patch_score_reference(tokens, index, *weights(head), cls_weight)
    for got, want in zip(ref, (cls, patch.mean(1), reward), strict=True):
        close(got, want, 1e-6)


@pytest.mark.parametrize("b,n_ref", [(2, 1), (5, 2), (7, 5)])
@pytest.mark.parametrize("plw", [0.3, 0.0, 1.5])
def test_hinge_reference_matches_discriminator_loss(b, n_ref, plw):
    tokens, index, head = make_case(b, 20, 6, 24, 16)
    target = hinge_targets(b, n_ref)
    ref = target > 0
    cls, patch, _ = head_scores(tokens, index, head, 0.7)
    want = discriminator_loss(cls[ref], patch[ref], cls[~ref], patch[~ref], plw)
    got = patch_hinge_loss_reference(tokens, index, target, *weights(head), plw)
    close(got, want, 1e-6)


def test_input_validation():
    tokens, index, head = make_case(3, 10, 4, 16, 8)
    ws = weights(head)
    with pytest.raises(ValueError, match="tokens"):
        patch_score(tokens[0], index, *ws)
    with pytest.raises(TypeError, match="float32"):
        patch_score(tokens.double(), index, *ws)
    with pytest.raises(TypeError, match="integer"):
        patch_score(tokens, index.float(), *ws)
    with pytest.raises(ValueError, match="patch_index"):
        patch_score(tokens, index[:2], *ws)
    with pytest.raises(ValueError, match="K >= 1"):
        patch_score(tokens, index[:, :0], *ws)
    with pytest.raises(IndexError, match="0..9"):
        patch_score(tokens, index + 7, *ws)
    with pytest.raises(ValueError, match="w1"):
        patch_score(tokens, index, ws[0][:, :5], *ws[1:])
    with pytest.raises(ValueError, match="backend"):
        patch_score(tokens, index, *ws, backend="cuda")
    for bad, match in [([1, 1, 1], "references and generations"), ([1, 0, -1], r"\+1"), ([1, -1], "one value")]:
        with pytest.raises(ValueError, match=match):
            patch_hinge_loss(tokens, index, torch.tensor(bad), *ws, backend="torch")


def test_empty_batch_reference():
    tokens, index, head = make_case(0, 10, 4, 16, 8)
    for out in patch_score(tokens, index, *weights(head), backend="torch"):
        assert out.shape == (0,) and out.dtype == torch.float32


# D = 33 puts every other image's rows off a 16-byte boundary inside the batch (MKL then took
# another code path with 2+ threads); D = 21, K = 2: 3 rows of 84 bytes per image.
@pytest.mark.parametrize("d,hidden,k", [(32, 64, 8), (33, 17, 5), (21, 31, 2), (768, 512, 64)])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_reference_logits_do_not_depend_on_the_batch(d, hidden, k, threads):
    """The server's batcher puts an image in batches of any size, at any position: its logits,
    patch mean and reward must come out the same bit for bit (a single BLAS call over all rows
    did not, nor per-image products on rows that started off a 16-byte boundary)."""
    from advgrpo.kernels.patch_score import row_logits_reference

    g = torch.Generator().manual_seed(d)
    b = 24
    tokens = torch.randn(b, 1 + 3 * k, d, generator=g)
    index = torch.stack([torch.randperm(3 * k, generator=g)[:k] for _ in range(b)])
    w1, b1 = torch.randn(hidden, d, generator=g) * 0.1, torch.randn(hidden, generator=g) * 0.1
    w2, b2 = torch.randn(1, hidden, generator=g) * 0.1, torch.randn(1, generator=g) * 0.1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = row_logits_reference(tokens, index, w1, b1, w2, b2)
        scores = patch_score_reference(tokens, index, w1, b1, w2, b2, 0.7)
        for size in range(1, b):
            for start in sorted({0, 1, (b - size) // 2, b - size}):
                sl = slice(start, start + size)
                part = row_logits_reference(tokens[sl], index[sl], w1, b1, w2, b2)
                assert torch.equal(part, whole[sl]), f"{size} images from {start}"
                for got, want in zip(
                    patch_score_reference(tokens[sl], index[sl], w1, b1, w2, b2, 0.7), scores, strict=True
                ):
                    assert torch.equal(got, want[sl]), f"{size} images from {start}"
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_without_flag(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend_for(torch.zeros(1)) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_for(torch.zeros(1)) == "torch"
    for value in ("1", "true", "ON"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert backend_for(torch.zeros(1)) == "triton"


def _spy(monkeypatch, name):
    calls = []
    real = getattr(kernels, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, spy)  # the dispatcher looks these up in kernels/__init__
    return calls


@parent_only
def test_auto_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch_calls = _spy(monkeypatch, "patch_score_reference")
    triton_calls = _spy(monkeypatch, "patch_score_triton")
    tokens, index, head = make_case(2, 10, 3, 16, 8)
    patch_score(tokens, index, *weights(head))
    assert torch_calls and not triton_calls


@parent_only
def test_triton_selected_without_interpreter_raises(monkeypatch):
    """No silent fallback: the flag set after triton was imported selects Triton, which cannot run."""
    pytest.importorskip("triton")
    tokens, index, head = make_case(2, 10, 3, 16, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for(tokens) == "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 in the environment before triton"):
        patch_score(tokens, index, *weights(head))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        patch_hinge_loss(tokens, index, torch.tensor([1, -1]), *weights(head), backend="triton")


@triton_case
def test_auto_uses_triton_with_flag(monkeypatch):
    assert kernels.interpret_requested()
    torch_calls = _spy(monkeypatch, "patch_score_reference")
    triton_calls = _spy(monkeypatch, "patch_score_triton")
    tokens, index, head = make_case(2, 10, 3, 16, 8)
    assert backend_for(tokens) == "triton"
    out = patch_score(tokens, index, *weights(head))
    assert triton_calls and not torch_calls
    for got, want in zip(out, patch_score_reference(tokens, index, *weights(head)), strict=True):
        close(got, want, 1e-5)


def test_child_is_interpreted():
    """Guards the child run: it must really be in the interpreter, or its Triton cases would skip."""
    if os.environ.get(CHILD_ENV) == "1":
        assert INTERPRETED


# --------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (child process)


@triton_case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_patch_score_matches_reference(shape, dtype):
    tokens, index, head = make_case(*shape, dtype=dtype)
    upstream = torch.randn(3, shape[0], generator=torch.Generator().manual_seed(1))
    run = lambda backend: score_and_grads(  # noqa: E731
        lambda *a: patch_score(*a, backend=backend), tokens, index, head, 0.7, upstream
    )
    (out, grads), (ref_out, ref_grads) = run("triton"), run("torch")
    for name, got, want in zip(("cls", "patch", "reward"), out, ref_out, strict=True):
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        close(got, want, TOL[dtype], name)
    for name, got, want in zip(("dW1", "db1", "dW2", "db2"), grads, ref_grads, strict=True):
        assert got.shape == want.shape
        close(got, want, TOL[dtype], name)


@triton_case
@pytest.mark.parametrize("cls_weight", [0.0, 0.3, 1.0])
def test_patch_score_cls_weight(cls_weight):
    tokens, index, head = make_case(3, 37, 5, 24, 20)
    upstream = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    out, grads = score_and_grads(
        lambda *a: patch_score(*a, backend="triton"), tokens, index, head, cls_weight, upstream
    )
    ref_out, ref_grads = score_and_grads(patch_score_reference, tokens, index, head, cls_weight, upstream)
    for got, want in zip((*out, *grads), (*ref_out, *ref_grads), strict=True):
        close(got, want, 1e-5)


@triton_case
def test_non_contiguous_inputs():
    b, n, k, d, h = 3, 37, 5, 24, 20
    tokens, index, head = make_case(b, n, k, d, h)
    # tokens as a transposed view ([B, D, T] storage) and as every other column of a wider tensor;
    # patch_index as the transpose of an int32 [K, B] tensor.
    t_transposed = tokens.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(b, 1 + n, 2 * d)
    wide[:, :, ::2] = tokens
    t_strided = wide[:, :, ::2]
    i_transposed = index.t().contiguous().to(torch.int32).t()
    assert not t_transposed.is_contiguous() and not t_strided.is_contiguous() and not i_transposed.is_contiguous()
    w1_t = head[0].weight.detach().t().contiguous().t().requires_grad_()  # W1 with swapped strides too
    ws = [w1_t, head[0].bias, head[2].weight, head[2].bias]
    want = patch_score_reference(tokens, index, *weights(head))
    want_grads = torch.autograd.grad(sum(o.sum() for o in want), weights(head))
    for tok, idx in [(t_transposed, index), (t_strided, i_transposed), (t_transposed, i_transposed)]:
        got = patch_score(tok, idx, *ws, backend="triton")
        grads = torch.autograd.grad(sum(o.sum() for o in got), ws)
        for g, w in zip((*got, *grads), (*want, *want_grads), strict=True):
            close(g, w, 1e-5)


@triton_case
def test_gpu_style_tiling_many_blocks(monkeypatch):
    """Small tiles as on a GPU: images straddle row blocks (atomic per-image sums), H and D loop,
    the backward splits rows over 3 dW1 partials. Bitwise deterministic run to run."""
    small = dict(BLOCK_M=16, BLOCK_H=16, BLOCK_D=16)
    monkeypatch.setattr(ps, "CONFIG_OVERRIDE", {"fwd": small, "bwd": small, "split": 3})
    tokens, index, head = make_case(5, 16, 16, 40, 40)  # 85 rows -> 6 blocks; D, H -> 3 tiles
    upstream = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    run = lambda: score_and_grads(lambda *a: patch_score(*a, backend="triton"), tokens, index, head, 0.7, upstream)  # noqa: E731
    (out, grads), (out2, grads2) = run(), run()
    ref_out, ref_grads = score_and_grads(patch_score_reference, tokens, index, head, 0.7, upstream)
    for got, again, want in zip((*out, *grads), (*out2, *grads2), (*ref_out, *ref_grads), strict=True):
        close(got, want, 1e-5)
        assert torch.equal(got, again)
    target = hinge_targets(5, 2)
    ws = weights(head)
    with torch.no_grad():
        head[2].weight.mul_(30.0)  # some hinge terms inactive
    loss = patch_hinge_loss(tokens, index, target, *ws, backend="triton")
    want = patch_hinge_loss_reference(tokens, index, target, *ws)
    for got, w in zip((loss, *torch.autograd.grad(loss, ws)), (want, *torch.autograd.grad(want, ws)), strict=True):
        close(got, w, 1e-5)


@triton_case
def test_empty_batch_triton():
    tokens, index, head = make_case(0, 10, 4, 16, 8)
    for out in patch_score(tokens, index, *weights(head), backend="triton"):
        assert out.shape == (0,) and out.dtype == torch.float32


@triton_case
def test_tokens_requiring_grad_are_refused():
    tokens, index, head = make_case(2, 10, 3, 16, 8)
    with pytest.raises(NotImplementedError, match="tokens"):
        patch_score(tokens.requires_grad_(), index, *weights(head), backend="triton")


@triton_case
@pytest.mark.parametrize(
    "b,n_ref,plw,dtype",
    [
        (2, 1, 0.3, torch.float32),
        (5, 2, 0.3, torch.float32),
        (7, 5, 1.5, torch.float32),
        (6, 3, 0.0, torch.float32),
        (5, 3, 0.3, torch.bfloat16),
        (5, 2, 0.3, torch.float16),
    ],
)
def test_hinge_loss_matches(b, n_ref, plw, dtype):
    tokens, index, head = make_case(b, 23, 7, 20, 36, dtype=dtype, seed=b)
    with torch.no_grad():  # a head whose logits straddle the hinge margins (some terms active, some not)
        head[2].weight.mul_(30.0)
    target = hinge_targets(b, n_ref)
    ws = weights(head)
    loss = patch_hinge_loss(tokens, index, target, *ws, plw, backend="triton")
    grads = torch.autograd.grad(2.5 * loss, ws)  # a non-unit upstream gradient
    want = patch_hinge_loss_reference(tokens, index, target, *ws, plw)
    want_grads = torch.autograd.grad(2.5 * want, ws)
    # ... and the DINO model's own composition, on the same (upcast) features.
    ref = target > 0
    cls, patch, _ = head_scores(tokens.float(), index, head, 0.7)
    dino = discriminator_loss(cls[ref], patch[ref], cls[~ref], patch[~ref], plw)
    dino_grads = torch.autograd.grad(2.5 * dino, ws)
    assert loss.shape == () and loss.dtype == torch.float32
    close(loss, want, TOL[dtype], "loss")
    close(loss, dino, TOL[dtype], "loss vs dino")
    for name, got, w, dn in zip(("dW1", "db1", "dW2", "db2"), grads, want_grads, dino_grads, strict=True):
        close(got, w, TOL[dtype], name)
        close(got, dn, TOL[dtype], name + " vs dino")


@triton_case
def test_adam_training_matches_reference():
    """A discriminator trained for a few Adam steps through the kernels ends where the DINO
    model's training math (head_scores + discriminator_loss, per group) ends."""
    n_ref, n_gen, n, k, d, h, steps = 4, 6, 30, 8, 48, 32, 6
    g = torch.Generator().manual_seed(7)
    ref_tokens = transform_tokens(torch.randn(n_ref, 1 + n, d, generator=g) + 0.5, "l2")
    gen_tokens = transform_tokens(torch.randn(n_gen, 1 + n, d, generator=g) - 0.5, "l2")
    tokens = torch.cat([ref_tokens, gen_tokens])
    target = torch.tensor([1.0] * n_ref + [-1.0] * n_gen)
    heads = [build_head(d, h, seed=3) for _ in range(2)]
    for hd in heads:
        # Logits that straddle the margins. (At init every hinge term is active, and then d loss/d b2
        # is exactly 0: Adam would turn its rounding noise, which differs by summation order, into
        # full ±lr steps; that is Adam's, not the kernels', ill-conditioning.)
        with torch.no_grad():
            hd[2].weight.mul_(20.0)
    opts = [torch.optim.Adam(hd.parameters(), lr=1e-3, betas=(0.5, 0.999)) for hd in heads]
    losses = {0: [], 1: []}
    for step in range(steps):
        ref_index = sample_patch_index([mix_seed(i, 0, step) for i in range(n_ref)], n, k)
        gen_index = sample_patch_index([mix_seed(100 + i, 0, step) for i in range(n_gen)], n, k)
        # Kernel path: one fused call over references and generations.
        loss = patch_hinge_loss(
            tokens, torch.cat([ref_index, gen_index]), target, *weights(heads[0]), 0.3, backend="triton"
        )
        # Reference path: exactly DinoDiscriminator.update's step.
        rc, rp, _ = head_scores(ref_tokens, ref_index, heads[1], 0.7)
        gc, gp, _ = head_scores(gen_tokens, gen_index, heads[1], 0.7)
        ref_loss = discriminator_loss(rc, rp, gc, gp, 0.3)
        for i, (opt, ls) in enumerate(zip(opts, (loss, ref_loss), strict=True)):
            opt.zero_grad(set_to_none=True)
            ls.backward()
            opt.step()
            losses[i].append(float(ls.detach()))
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)
    assert losses[0][-1] < losses[0][0]  # it trained
    for p_kernel, p_ref in zip(heads[0].parameters(), heads[1].parameters(), strict=True):
        torch.testing.assert_close(p_kernel, p_ref, rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------
# The GPU build, without a GPU: compile every kernel variant for an H100 (sm_90) offline.


def _signature(fn, constexprs, tok_dtype):
    names = inspect.signature(fn).parameters
    floats = {"cls_weight", "inv_k", "patch_loss_weight"}

    def ty(name):
        if name in constexprs:
            return "constexpr"
        if name == "tok_ptr":
            return "*" + tok_dtype
        if name == "idx_ptr":
            return "*i64"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in floats else "i32"

    return {name: ty(name) for name in names}


@parent_only
def test_kernels_compile_for_h100():
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction

        assert os.path.exists(triton.knobs.nvidia.ptxas.path)
    except Exception as exc:  # an install without the NVIDIA backend or its bundled ptxas
        pytest.skip(f"no offline NVIDIA toolchain: {exc!r}")
    target = GPUTarget("cuda", 90, 32)
    d, h, k = 768, 512, 64
    cases = [  # (kernel, token dtype, hinge): the scoring path in bf16, training in fp32
        ("fwd", torch.bfloat16, False),
        ("fwd", torch.float32, True),
        ("bwd", torch.bfloat16, None),
        ("bwd", torch.float32, None),
    ]
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for kind, dtype, hinge in cases:
        t0 = time.perf_counter()
        if kind == "fwd":
            cfg = ps._fwd_config(64 * (k + 1), d, h, dtype, interpret=False)
            fn = ps._fwd_kernel
            constexprs = dict(HINGE=hinge, NB=ps._next_pow2((cfg["BLOCK_M"] - 1) // (k + 1) + 2))
        else:
            cfg = ps._bwd_tiles(d, h, dtype)
            fn = ps._bwd_kernel
            constexprs = dict(LOWP_DW=ps._bwd_lowp_dw(dtype, interpret=False))
        options = {key: cfg.pop(key) for key in ps.LAUNCH_OPTIONS if key in cfg}
        constexprs.update(cfg, **ps._precision(dtype, interpret=False))
        src = ASTSource(JITFunction(fn), _signature(fn, constexprs, names[dtype]), constexprs)
        compiled = triton.compile(src, target=target, options=options)
        assert compiled.asm["cubin"], (kind, dtype)
        print(f"{kind} {dtype} compiled for sm_90 in {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------------------------
# The driver: the Triton cases above, in a child process started with TRITON_INTERPRET=1.


@parent_only
def test_triton_cases_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_ENV: "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).relative_to(REPO))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreted Triton cases failed ({' '.join(cmd)}):\n{out[-8000:]}"
    assert " passed" in out and " failed" not in out, out[-4000:]
    print(f"child ({time.perf_counter() - t0:.1f}s): {out.strip().splitlines()[-1]}")
