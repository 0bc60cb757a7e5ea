"""Feature-cache benchmark: discriminator updates (and reference scoring) with vs without the cache.

In-process, CPU, no server: two ``DinoDiscriminator`` instances identical but for
``feature_cache_bytes`` (0 vs 1 GiB), fed the same inputs, timed in alternating rounds (off, on,
off, on, ...) so drift and noisy neighbours hit both alike. Every round also checks that the two
give identical update results and head weights, bit for bit.

Workload, as in Adv-GRPO's discriminator epochs: every update brings the same references (drawn
from a fixed set) and as many fresh generations, 1 optimizer step (the trainer's default): 32 + 32
for the tiny backbone, 16 + 16 for the ViT-B-sized one (to fit the run in ~2 minutes on 2 cores;
the ratio, which bounds the speedup, is the same). Reported per backbone:

- ``update``: images/s of UpdateDiscriminator's model work (references + generations per second).
  The generations are new every update, so their backbone pass remains: with equal numbers of
  references and generations, the cache can at most halve the work (a 2x ceiling whatever the
  backbone); it comes close when the backbone dominates.
- ``update after scoring``: the trainer's order: the generations were scored just before the
  update (untimed; the trainer scores them with or without the cache), so with the pool of
  recently scored images the update runs no backbone at all.
- ``reference scoring``: images/s of scoring the references (what the trainer does every
  epoch before its update): all hits once the references are cached.
- ``first update``: the update that fills the cache (cold), to show a miss costs nothing extra.

Backbones:

- ``tiny``: the random in-memory tiny DINOv2 (2 layers, hidden 32, 56 px; 64x64 inputs), the
  tiny preset's dino until it moved to the toy backbone; kept so that the figures stay comparable.
- ``vitb-112``: a random-initialised DINOv2 with ViT-B/14 dimensions (12 layers, hidden 768,
  12 heads, MLP 3072, patch 14) at a reduced 112 px (8x8 patches; the real model runs 518 px,
  37x37 patches), head 512, K=64; 128x128 inputs. Built in memory, saved with save_pretrained
  and loaded by path (the real-checkpoint code path). Not DINOv2 weights: the timings are what
  matter, and they do not depend on the weights.

Run: ``python -m bench.feature_cache [--quick]`` (~45 s on 2 idle cores, ~2 minutes on busy ones;
--quick: ~20 s idle).
Writes bench/results/feature_cache.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import REPO, machine_info

DEFAULT_OUT = REPO / "bench" / "results" / "feature_cache.json"
STEPS = 1
CACHE_BYTES = 1 << 30


def _tiny_params() -> dict:
    return {"backbone": "tiny", "image_size": 56, "head_hidden": 64, "num_patches": 8, "lr": 3e-2}


def _vitb_backbone(directory: Path, image_size: int) -> str:
    from transformers import Dinov2Config, Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # saving and loading 86M parameters: no bars in the table

    config = Dinov2Config(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        patch_size=14,
        image_size=image_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(config).save_pretrained(directory)
    return str(directory)


def _images(rng: np.random.Generator, n: int, side: int, smooth: bool) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        if smooth:  # "reference-like": a colour gradient
            y, x = np.mgrid[0:side, 0:side] / (side - 1)
            c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
            img = c0 * (1 - x[..., None]) + c1 * x[..., None] * (1 - y[..., None]) + 0.2 * y[..., None]
            out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
        else:  # "generation-like": noise
            out.append(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    return out


def _same_state(a, b) -> bool:
    ta, tb = a.export_state()[0], b.export_state()[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def run_backbone(label: str, params: dict, side: int, n_refs: int, n_gens: int, rounds: int, score_rounds: int) -> dict:
    from advgrpo.reward_server.config import DinoParams
    from advgrpo.reward_server.models.dino import DinoDiscriminator

    t0 = time.perf_counter()
    models = {
        "off": DinoDiscriminator(
            "dino", DinoParams(**params, feature_cache_bytes=0, recent_feature_cache_bytes=0), device="cpu"
        ),
        "on": DinoDiscriminator(
            "dino",
            DinoParams(**params, feature_cache_bytes=CACHE_BYTES, recent_feature_cache_bytes=CACHE_BYTES),
            device="cpu",
        ),
    }
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    refs = _images(rng, n_refs, side, smooth=True)
    blank_r, blank_g = [""] * n_refs, [""] * n_gens
    identical = True
    update_s: dict[str, list[float]] = {"off": [], "on": []}
    flow_s: dict[str, list[float]] = {"off": [], "on": []}  # generations scored before the update
    first_s: dict[str, float] = {}

    def update(mode: str, gens: list[np.ndarray]):
        m = models[mode]
        t = time.perf_counter()
        result = m.update(refs, blank_r, gens, blank_g, steps=STEPS)
        elapsed = time.perf_counter() - t
        m.version += 1
        return result, elapsed

    # Round 0: the cache is cold (and torch warms up); reported apart. Then rounds with
    # generations the model has never seen, then rounds in the trainer's order: the generations
    # were scored (ScoreStream) before they come to UpdateDiscriminator.
    for r in range(2 * rounds + 1):
        gens = _images(rng, n_gens, side, smooth=False)  # fresh generations every update
        prescored = r > rounds
        out = {}
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            if prescored:
                models[mode].score(gens, blank_g)  # untimed: the trainer scores them either way
            out[mode], elapsed = update(mode, gens)
            if r == 0:
                first_s[mode] = elapsed
            else:
                (flow_s if prescored else update_s)[mode].append(elapsed)
        identical &= out["on"] == out["off"] and _same_state(models["on"], models["off"])

    score_s: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(score_rounds):
        got = {}
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            t = time.perf_counter()
            got[mode] = models[mode].score(refs, blank_r)
            score_s[mode].append(time.perf_counter() - t)
        identical &= bool(np.array_equal(got["on"], got["off"]))

    n_update = n_refs + n_gens
    stats = models["on"].stats()

    def mode_summary(mode: str) -> dict:
        u, s, f = np.median(update_s[mode]), np.median(score_s[mode]), np.median(flow_s[mode])
        return {
            "update_median_ms": round(1000 * float(u), 1),
            "update_images_per_s": round(n_update / float(u), 1),
            "flow_update_median_ms": round(1000 * float(f), 1),
            "flow_update_images_per_s": round(n_update / float(f), 1),
            "first_update_ms": round(1000 * first_s[mode], 1),
            "ref_scoring_median_ms": round(1000 * float(s), 2),
            "ref_scoring_images_per_s": round(n_refs / float(s), 1),
        }

    off, on = mode_summary("off"), mode_summary("on")
    return {
        "label": label,
        "params": {k: v for k, v in params.items() if k != "backbone"} | {"backbone": label},
        "input_side": side,
        "references_per_update": n_refs,
        "generations_per_update": n_gens,
        "tokens_per_image": models["on"].n_patches + 1,
        "hidden": models["on"].dim,
        "build_s": round(build_s, 1),
        "rounds": rounds,
        "off": off,
        "on": on,
        "update_speedup": round(on["update_images_per_s"] / off["update_images_per_s"], 2),
        "update_speedup_ceiling": round(n_update / n_gens, 2),
        "flow_update_speedup": round(on["flow_update_images_per_s"] / off["flow_update_images_per_s"], 1),
        "ref_scoring_speedup": round(on["ref_scoring_images_per_s"] / off["ref_scoring_images_per_s"], 1),
        "bit_identical": bool(identical),
        "cache_stats": stats,
    }


def run(quick: bool = False) -> dict:
    results: dict = {"machine": machine_info()}
    results["machine"]["loadavg_1m_before"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    results["workload"] = (
        f"every update: the same references + as many fresh generations, {STEPS} optimizer step; "
        f"cache off (both pools 0) vs on ({CACHE_BYTES >> 20} MiB each), alternating rounds"
    )
    results["tiny"] = run_backbone(
        "tiny", _tiny_params(), 64, n_refs=32, n_gens=32, rounds=4 if quick else 20, score_rounds=10
    )
    with tempfile.TemporaryDirectory(prefix="bench-vitb-") as tmp:
        size = 112
        params = {
            "backbone": _vitb_backbone(Path(tmp) / "dinov2-vitb-random", size),
            "image_size": size,
            "head_hidden": 512,
            "num_patches": 64,
        }
        results["vitb_112"] = run_backbone(
            "ViT-B/14 dims, 112 px (random init)",
            params,
            128,
            n_refs=16,
            n_gens=16,
            rounds=1 if quick else 5,
            score_rounds=1 if quick else 4,
        )
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    results["targets"] = {
        "update_speedup_5x_tiny": results["tiny"]["update_speedup"] >= 5.0,
        "update_speedup_5x_vitb_112": results["vitb_112"]["update_speedup"] >= 5.0,
        "flow_update_speedup_5x_tiny": results["tiny"]["flow_update_speedup"] >= 5.0,
        "flow_update_speedup_5x_vitb_112": results["vitb_112"]["flow_update_speedup"] >= 5.0,
        "ref_scoring_speedup_5x_vitb_112": results["vitb_112"]["ref_scoring_speedup"] >= 5.0,
    }
    return results


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Feature cache, {results['workload']}. CPU: {m['cpu_model']}, {m['cpu_affinity']} cores, "
        f"torch {m['torch']} ({m['torch_threads']} threads); load average {m['loadavg_1m_before']:.1f} before, "
        f"{m['loadavg_1m_after']:.1f} after.",
        "",
        "| Backbone | Tokens x D | Refs + gens per update | Update, cache off | Update, cache on "
        "| Speedup (ceiling) | Update after scoring, off / on | Speedup | Ref. scoring, off / on | Speedup "
        "| Bit-identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("tiny", "vitb_112"):
        r = results[key]
        off, on = r["off"], r["on"]
        lines.append(
            f"| {r['label']} | {r['tokens_per_image']} x {r['hidden']} "
            f"| {r['references_per_update']} + {r['generations_per_update']} "
            f"| {off['update_images_per_s']:.0f} img/s ({off['update_median_ms']:.0f} ms) "
            f"| {on['update_images_per_s']:.0f} img/s ({on['update_median_ms']:.0f} ms) "
            f"| {r['update_speedup']:.2f}x ({r['update_speedup_ceiling']:.0f}x) "
            f"| {off['flow_update_images_per_s']:.0f} / {on['flow_update_images_per_s']:.0f} img/s "
            f"| {r['flow_update_speedup']:.1f}x "
            f"| {off['ref_scoring_images_per_s']:.0f} / {on['ref_scoring_images_per_s']:.0f} img/s "
            f"| {r['ref_scoring_speedup']:.0f}x | {'yes' if r['bit_identical'] else '**no**'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n(full results: {args.out}; {results['wall_s']:.0f} s)")
    return 0 if results["tiny"]["bit_identical"] and results["vitb_112"]["bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
