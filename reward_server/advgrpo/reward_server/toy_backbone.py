"""Trains the toy world's DINOv2 backbone: ``python -m advgrpo.reward_server.toy_backbone --output DIR``.

The discriminator of the toy world (docs/EXPERIMENTS.md) needs what DINOv2 gives the real one: a
frozen visual model that already knows what images of its domain look like. A backbone with
random weights is not that. This script trains a small ``transformers.Dinov2Model`` (patch 4 on
32 px images: 64 patch tokens, width 64, 4 layers) self-supervised, in DINOv2's spirit:

* the CLS embedding (``pooler_output``) of two augmented views of a scene must find each other
  among the batch (a contrastive, SimCLR-style loss on a small projection head: DINO's image-level
  objective, in its simplest form);
* a third of the patch tokens are replaced by the mask token (``bool_masked_pos``) and the model
  must predict their pixels from the rest (iBOT's masked-token objective, as a pixel target).

Data: rendered scenes of ``advgrpo.common.toy_domain`` in both styles (day and night), nothing
else; no caption, label or output of the caption checker goes into the training. The views are
random resized crops and flips; colour is not jittered, so the features keep the hue that the
captions name. The projection and pixel heads are dropped: the folder holds the backbone only, as
``Dinov2Model.from_pretrained`` reads it, and ``training.json`` (command, curve, sha256 of the
weights). The shipped folder is ``advgrpo/reward_server/toy_dinov2`` (backbone id "toy").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("advgrpo.reward_server.toy_backbone")

IMAGE_SIZE = 32
PATCH = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DinoParams' defaults: the server normalises this way
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_untrained(seed: int):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        patch_size=PATCH,
        image_size=IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    return Dinov2Model(config)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> ImageNet-normalised, as the server's preprocessing does."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def random_views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random resized crop (0.55 to 1 of the side, anywhere inside) and a random horizontal flip
    of each image of ``x`` [B, 3, H, W], bilinear, at the same size."""
    b = x.shape[0]
    scale = 0.55 + 0.45 * torch.rand(b, generator=generator)
    shift = (1 - scale)[:, None] * (2 * torch.rand(b, 2, generator=generator) - 1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, 3*P*P], patches in the model's row-major token order."""
    b, c, h, w = x.shape
    p = PATCH
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: each of 2B embeddings must pick its other view among the other 2B - 1."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = a.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def train(
    model, images: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, mask_ratio: float = 1 / 3,
    temperature: float = 0.2, log_every: int = 100,
) -> list[dict]:  # fmt: skip
    """Trains ``model`` on ``images`` [N, 3, H, W] in [0, 1]; returns the loss curve."""
    width = model.config.hidden_size
    projector = nn.Sequential(nn.Linear(width, 128), nn.GELU(), nn.Linear(128, 64))
    pixel_head = nn.Linear(width, 3 * PATCH * PATCH)
    params = [*model.parameters(), *projector.parameters(), *pixel_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    g = torch.Generator().manual_seed(seed)
    n_tokens = (IMAGE_SIZE // PATCH) ** 2
    n_masked = int(round(mask_ratio * n_tokens))
    curve, running = [], []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = images[idx]
        v1, v2 = random_views(x, g), random_views(x, g)
        order = torch.rand(batch, n_tokens, generator=g).argsort(dim=1)
        masked = torch.zeros(batch, n_tokens, dtype=torch.bool)
        masked.scatter_(1, order[:, :n_masked], True)
        out1 = model(pixel_values=normalise(v1), bool_masked_pos=masked)
        out2 = model(pixel_values=normalise(v2))
        l_con = contrastive_loss(projector(out1.pooler_output), projector(out2.pooler_output), temperature)
        predicted = pixel_head(out1.last_hidden_state[:, 1:][masked])
        l_mask = F.mse_loss(predicted, patchify(normalise(v1))[masked])
        loss = l_con + l_mask
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running.append((l_con.item(), l_mask.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            c, m = np.mean(running, axis=0)
            curve.append(
                {
                    "step": step + 1,
                    "minutes": (time.perf_counter() - t0) / 60,
                    "contrastive": float(c),
                    "masked": float(m),
                }
            )
            log.info("step %d: contrastive %.3f, masked patches %.3f", step + 1, c, m)
            running = []
    model.eval()
    return curve


@torch.no_grad()
def embeddings(model, images: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """CLS embeddings (``pooler_output``) of ``images`` [N, 3, H, W] in [0, 1]."""
    return torch.cat(
        [model(pixel_values=normalise(images[i : i + chunk])).pooler_output for i in range(0, len(images), chunk)]
    ).numpy()


def nearest_centroid_accuracy(train_x: np.ndarray, train_y: list, test_x: np.ndarray, test_y: list) -> float:
    """How well the embeddings separate a property: each test image gets the label of the nearest
    class mean (cosine) of the training images. A diagnostic of the features, not a training signal."""

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    labels = sorted(set(train_y))
    ty = np.array(train_y)
    centroids = unit(np.stack([unit(train_x)[ty == lab].mean(axis=0) for lab in labels]))
    guess = np.array(labels)[np.argmax(unit(test_x) @ centroids.T, axis=1)]
    return float(np.mean(guess == np.array(test_y)))


def probe(model, seed: int, n: int = 600) -> dict[str, float]:
    """Nearest-centroid accuracy of the CLS embeddings for style, colour and shape (render labels
    of fresh scenes; chance 1/2, 1/4, 1/3)."""
    from advgrpo.common import toy_domain as td

    parts = {}
    for split, s in (("train", seed + 1), ("test", seed + 2)):
        imgs, labels = [], []
        for style in td.STYLES:
            im, texts = td.dataset(n // 2, size=IMAGE_SIZE, style=style, seed=s)
            imgs += im
            labels += [(style, *td.parse_caption(t)) for t in texts]
        parts[split] = (embeddings(model, to_tensor(imgs)), labels)
    (tx, tl), (ex, el) = parts["train"], parts["test"]
    return {
        name: nearest_centroid_accuracy(tx, [lab[i] for lab in tl], ex, [lab[i] for lab in el])
        for i, name in enumerate(("style", "colour", "shape"))
    }


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def file_digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def main(argv: list[str] | None = None) -> int:
    from advgrpo.common import toy_domain as td

    p = argparse.ArgumentParser(
        prog="python -m advgrpo.reward_server.toy_backbone", description=__doc__.splitlines()[0]
    )
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--images", type=int, default=12_000, help="rendered scenes per style")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    images = []
    for i, style in enumerate(td.STYLES):
        images += td.dataset(args.images, size=IMAGE_SIZE, style=style, seed=args.seed * 10 + i, per_caption=False)[0]
    model = build_untrained(args.seed)
    before = probe(model, args.seed + 100)
    curve = train(model, to_tensor(images), steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    after = probe(model, args.seed + 100)
    log.info("nearest-centroid accuracy: untrained %s, trained %s", before, after)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    record = {
        "command": "python -m advgrpo.reward_server.toy_backbone "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "torch": torch.__version__,
        "cpu_minutes": (time.perf_counter() - t0) / 60,
        "trained_on": f"{args.images} rendered scenes of each style (day, night), {IMAGE_SIZE} px",
        "curve": curve,
        "probe_untrained": before,
        "probe": after,
        "sha256": file_digests(args.output),
    }
    (args.output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
