"""DINO head scoring: the Triton kernels vs eager PyTorch (the reference) vs torch.compile of it.

Cases: B in {16, 64, 256} images, K = 64 sampled patches of N = 1369 (DINOv2 ViT-B/14 at 518 px),
D in {768, 1024} (ViT-B / ViT-L), H = 512, tokens in bf16 (``--dtype`` to change). Two ops:

* ``score fwd``: ``patch_score`` under no_grad (the reward server's scoring path);
* ``hinge fwd+bwd``: ``patch_hinge_loss`` forward and the gradients of the head (half the batch
  references, half generations: one discriminator training step without the optimizer).

Each implementation is called below the dispatcher (``patch_score_reference`` and
``patch_hinge_loss_reference``, eager or under ``torch.compile``; ``patch_score_triton`` and
``patch_hinge_loss_triton``), the inputs checked once up front; the hinge loss checks its targets on
the host on every path (one synchronisation; a graph break for torch.compile). The reference
upcasts the tokens and runs the head in fp32; the Triton kernels use bf16 tensor-core dots with
fp32 accumulation for bf16 tokens (see advgrpo/kernels/patch_score.py), so before timing each case the
Triton outputs and gradients are compared with the reference (``max_rel_err``: max |diff| over
max |reference|); a case over tolerance is reported and makes the run exit 1.

Timing: ``triton.testing.do_bench`` (CUDA events, median of the repetitions) on a GPU; the peak
memory a call allocates beyond its inputs is reported too (the kernels never materialise the
gathered [B, 1+K, D] tokens or the [B, 1+K, H] hidden). Results: a markdown table on stdout and
``bench/results/kernels.json`` with the GPU model.

    python -m bench.kernels                 # needs a CUDA GPU: refuses (exit 2) without one
    python -m bench.kernels --device cpu    # smoke run: eager vs torch.compile only, no Triton,
                                            # small sizes, no JSON unless --out is given
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from advgrpo.kernels import patch_hinge_loss_reference, patch_score_reference
from advgrpo.kernels.hinge_loss import patch_hinge_loss_triton
from advgrpo.kernels.patch_score import check_inputs, patch_score_triton
from advgrpo.reward_server.models.dino import build_head, sample_patch_index

from .common import machine_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "kernels.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}  # max_rel_err


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batch", type=int, nargs="+", help="images per call (default 16 64 256; cpu: 16)")
    p.add_argument("--dims", type=int, nargs="+", help="token dim D (default 768 1024; cpu: 768)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--k", type=int, default=64, help="sampled patches per image")
    p.add_argument("--patches", type=int, default=1369, help="N patch tokens per image")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles once per shape)")
    p.add_argument("--no-backward", action="store_true", help="time the scoring forward only")
    p.add_argument("--reps", type=int, default=10, help="cpu: timed calls per measurement")
    p.add_argument("--out", type=Path, help=f"JSON results (default on cuda: {DEFAULT_OUT.relative_to(REPO)})")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.batch = args.batch or ([16] if cpu else [16, 64, 256])
    args.dims = args.dims or ([768] if cpu else [768, 1024])
    if args.out is None and not cpu:
        args.out = DEFAULT_OUT
    return args


def make_inputs(b: int, n: int, k: int, d: int, h: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(b * 10007 + d)
    tokens = torch.randn(b, 1 + n, d, generator=g).to(device=device, dtype=dtype)  # ~ layer-normed ViT output
    index = sample_patch_index(list(range(b)), n, k, device)
    head = build_head(d, h, seed=0).to(device)
    with torch.no_grad():
        # Logits that straddle the hinge margins, as in training. (At init every hinge term is
        # active and d loss / d b2 is exactly 0: a relative error on it would be meaningless.)
        head[2].weight.mul_(5.0)
    target = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(b)], device=device)
    return tokens, index, head, target


def weights(head) -> list[torch.Tensor]:
    return [head[0].weight, head[0].bias, head[2].weight, head[2].bias]


def score_fn(backend: str):
    impl = patch_score_triton if backend == "triton" else patch_score_reference

    def run(tokens, index, w1, b1, w2, b2):
        with torch.no_grad():
            return impl(tokens, index, w1, b1, w2, b2, 0.7)

    return run


def hinge_fn(backend: str):
    impl = patch_hinge_loss_triton if backend == "triton" else patch_hinge_loss_reference

    def run(tokens, index, target, w1, b1, w2, b2):
        loss = impl(tokens, index, target, w1, b1, w2, b2, 0.3)
        return (loss.detach(), *torch.autograd.grad(loss, (w1, b1, w2, b2)))

    return run


def max_rel_err(got, want) -> float:
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        scale = max(float(w.abs().max()), 1e-6)
        worst = max(worst, float((g.float() - w.float()).abs().max()) / scale)
    return worst


def time_ms(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)


def device_info(device: str) -> dict:
    info = machine_info()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sms=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run(args: argparse.Namespace) -> dict:
    dev = args.device
    dtype = DTYPES[args.dtype]
    impls = ["eager"] + ([] if args.no_compile else ["compile"]) + (["triton"] if dev == "cuda" else [])
    ops = ["score fwd"] + ([] if args.no_backward else ["hinge fwd+bwd"])
    compiled = {}
    if not args.no_compile:
        compiled = {
            "score fwd": torch.compile(score_fn("torch"), dynamic=False),
            "hinge fwd+bwd": torch.compile(hinge_fn("torch"), dynamic=False),
        }
    rows = []
    for d in args.dims:
        for b in args.batch:
            tokens, index, head, target = make_inputs(b, args.patches, args.k, d, args.hidden, dtype, dev)
            ws = weights(head)
            check_inputs(tokens, index, *ws)
            for op in ops:
                inputs = (tokens, index, *ws) if op == "score fwd" else (tokens, index, target, *ws)
                make = score_fn if op == "score fwd" else hinge_fn
                fns = {"eager": make("torch"), "triton": make("triton")}
                if "compile" in impls:
                    fns["compile"] = compiled[op]
                reference = fns["eager"](*inputs)
                row = {
                    "op": op,
                    "B": b,
                    "D": d,
                    "K": args.k,
                    "N": args.patches,
                    "H": args.hidden,
                    "dtype": args.dtype,
                    "ms": {},
                    "peak_mib": {},
                    "max_rel_err": {},
                }
                for name in impls:
                    call = lambda f=fns[name], inputs=inputs: f(*inputs)
                    t0 = time.perf_counter()
                    out = call()  # first call: compiles (torch.compile / Triton JIT)
                    row.setdefault("first_call_s", {})[name] = round(time.perf_counter() - t0, 2)
                    if name != "eager":
                        row["max_rel_err"][name] = max_rel_err(out, reference)
                    row["ms"][name] = round(time_ms(call, dev, args.reps), 4)
                    row["peak_mib"][name] = peak_mib(call, dev)
                rows.append(row)
                print(
                    f"  {op:13s} B={b:<4d} D={d:<5d} " + "  ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items()),
                    file=sys.stderr,
                    flush=True,
                )
            del tokens
    failures = [
        f"{r['op']} B={r['B']} D={r['D']} {name}: max_rel_err {err:.2e} > {TOLERANCE[dtype]:.0e}"
        for r in rows
        for name, err in r["max_rel_err"].items()
        if err > TOLERANCE[dtype]
    ]
    return {
        "machine": device_info(dev),
        "config": {
            "device": dev,
            "dtype": args.dtype,
            "K": args.k,
            "N": args.patches,
            "H": args.hidden,
            "batch": args.batch,
            "dims": args.dims,
            "impls": impls,
            "timing": "triton.testing.do_bench median (CUDA events)"
            if dev == "cuda"
            else f"median of {args.reps} wall-clock calls",
            "tolerance_max_rel_err": TOLERANCE[dtype],
        },
        "results": rows,
        "failures": failures,
    }


def table(results: dict) -> str:
    impls = results["config"]["impls"]
    m = results["machine"]
    where = m.get("gpu") if results["config"]["device"] == "cuda" else f"CPU: {m.get('cpu_model')}"
    head = ["op", "B", "D"] + [f"{i} ms" for i in impls]
    if "triton" in impls:
        head += ["triton vs eager"] + (["triton vs compile"] if "compile" in impls else [])
        head += ["triton peak MiB", "eager peak MiB", "max rel err"]
    elif "compile" in impls:
        head += ["compile vs eager"]
    lines = [
        f"{where}; tokens {results['config']['dtype']}, K={results['config']['K']}, "
        f"N={results['config']['N']}, H={results['config']['H']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results["results"]:
        ms = r["ms"]
        cells = [r["op"], str(r["B"]), str(r["D"])] + [f"{ms[i]:.3f}" for i in impls]
        if "triton" in impls:
            cells.append(f"{ms['eager'] / ms['triton']:.2f}x")
            if "compile" in impls:
                cells.append(f"{ms['compile'] / ms['triton']:.2f}x")
            cells += [str(r["peak_mib"]["triton"]), str(r["peak_mib"]["eager"]), f"{r['max_rel_err']['triton']:.1e}"]
        elif "compile" in impls:
            cells.append(f"{ms['eager'] / ms['compile']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break notes: expected, see above
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench.kernels: no CUDA device available. The Triton kernels are benchmarked on a GPU only; "
            "run this on a machine with one, or use `python -m bench.kernels --device cpu` for a smoke run "
            "(eager vs torch.compile, no Triton).",
            file=sys.stderr,
        )
        return 2
    results = run(args)
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}", file=sys.stderr)
    if results["failures"]:
        print("\nresults out of tolerance:\n  " + "\n  ".join(results["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
